"""Stripe webhooks: events signed with Stripe's own scheme move an invoice to paid; a wrong
signature, a stale timestamp, a tampered body are refused and change nothing; a replay is a
no-op; a late failure never undoes a payment.

Signatures are made by stripe-python's ``WebhookSignature.generate_signature_header`` (the
library's helper "for signing payloads in unit tests"; on SDKs older than that helper, by the
documented scheme with the SDK's own ``_compute_signature``), and ours are checked by its
``verify_header``: both sides of the documented scheme.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kiki_billing_adapters.stripe import StripeAdapter, StripeClientSettings, StripeSettings
from kiki_billing_adapters.stripe.webhooks import read_stripe_event, verify_stripe_signature
from stripe._webhook import WebhookSignature

from kiki_billing import metrics as names
from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import payment_records
from kiki_billing.hub.metrics import ledger_registry, render
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.webhooks import Receiver, build_app
from kiki_billing.plugin import PaymentState, WebhookRejected
from kiki_billing.testing.contract import sample_invoice
from tests.support.asgi import AsgiClient
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

SECRET = "whsec_kiki_test_0123456789abcdefABCDEF"
TEST_KEY = "sk_test_kiki_webhooks_0123456789abcdef"
T0 = 1_769_904_000  # 2026-02-01T00:00:00Z
NOW = datetime.fromtimestamp(T0 + 60, UTC)


def signed(body: bytes, timestamp: int = T0, secret: str = SECRET) -> dict[str, str]:
    generate = getattr(WebhookSignature, "generate_signature_header", None)
    if generate is not None:
        header = generate(body.decode(), secret, timestamp)
    else:  # an older SDK: "t=<timestamp>,v1=<HMAC-SHA256 of <timestamp>.<body>>"
        payload = f"{timestamp}.{body.decode()}"
        header = f"t={timestamp},v1={WebhookSignature._compute_signature(payload, secret)}"
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def event(kind: str, invoice: dict[str, Any], event_id: str = "evt_1") -> bytes:
    body = {
        "id": event_id,
        "object": "event",
        "api_version": "2023-08-16",
        "created": T0,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
        "data": {"object": invoice},
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- the signature, as Stripe documents it ----------------------------------------------------


def test_stripes_own_signature_verifies_and_ours_verifies_with_stripe() -> None:
    body = event("invoice.paid", {"id": "in_1", "object": "invoice"})
    headers = signed(body)
    verify_stripe_signature({k.lower(): v for k, v in headers.items()}, body, SECRET, NOW)
    assert WebhookSignature.verify_header(body.decode(), headers["Stripe-Signature"], SECRET)


def test_a_rolled_secret_sends_two_signatures_and_either_matches() -> None:
    body = event("invoice.paid", {"id": "in_1", "object": "invoice"})
    old = signed(body, secret="whsec_old_secret_0123456789")["Stripe-Signature"]
    new = signed(body)["Stripe-Signature"].split(",")[1]
    verify_stripe_signature({"stripe-signature": f"{old},{new},v0=ignored"}, body, SECRET, NOW)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no Stripe-Signature header"),
        ({"stripe-signature": "garbage"}, "no timestamp"),
        ({"stripe-signature": f"t={T0}"}, "no v1 signature"),
        ({"stripe-signature": f"t={T0},v1=zz"}, "does not match"),
    ],
)
def test_malformed_signatures_are_refused(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(WebhookRejected, match=reason) as refused:
        verify_stripe_signature(headers, b"{}", SECRET, NOW)
    assert refused.value.status == 400


def test_a_signature_older_than_300_seconds_is_refused() -> None:
    body = event("invoice.paid", {"id": "in_1", "object": "invoice"})
    fresh = signed(body, timestamp=T0 + 60 - 300)
    verify_stripe_signature({k.lower(): v for k, v in fresh.items()}, body, SECRET, NOW)
    stale = signed(body, timestamp=T0 + 60 - 301)
    with pytest.raises(WebhookRejected, match="301 s old"):
        verify_stripe_signature({k.lower(): v for k, v in stale.items()}, body, SECRET, NOW)


def test_an_invoice_event_reads_as_its_state_and_ids() -> None:
    invoice = {
        "id": "in_1",
        "object": "invoice",
        "customer": "cus_1",
        "currency": "usd",
        "status": "open",
        "amount_paid": 0,
        "attempt_count": 1,
        "paid": False,
        "metadata": {"kiki_invoice_number": "KIKI-OaaS-202601-000001", "kiki_revision": "0"},
    }
    found = read_stripe_event(event("invoice.payment_failed", invoice))
    assert found.state is PaymentState.PAYMENT_FAILED
    assert dict(found.refs) == {"invoice_id": "in_1", "customer_id": "cus_1"}
    assert (found.kiki_number, found.kiki_revision) == ("KIKI-OaaS-202601-000001", 0)
    assert found.amount_paid == Decimal("0.00")
    other = read_stripe_event(event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert dict(other.refs) == {} and other.event_type == "customer.created"


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"id": "evt_1"}'])
def test_a_body_that_is_no_stripe_event_is_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected):
        read_stripe_event(body)


# -- end to end: a pushed invoice, paid at Stripe, reported by a signed event ------------------


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=3, clock=lambda: float(T0)) as server:
        yield server


@pytest.fixture
def adapter(fake: FakeStripe) -> Iterator[StripeAdapter]:
    made = StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=fake.url))
    yield made
    made.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


@pytest.fixture
def pushed(adapter: StripeAdapter, ledger: Ledger) -> dict[str, str]:
    hub = Hub(ledger, {"stripe": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
    invoice = sample_invoice()
    [outcome] = hub.push([Delivery(invoice, "stripe", StripeClientSettings(), adapter.account)])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    return dict(outcome.refs)


@pytest.fixture
def client(adapter: StripeAdapter, ledger: Ledger) -> AsgiClient:
    app = build_app(ledger, {"stripe": Receiver(adapter, SECRET)}, clock=lambda: NOW)
    return AsgiClient(app)


def recorded(ledger: Ledger) -> tuple[list[Any], list[Any]]:
    with ledger.engine.connect() as conn:
        payments = conn.execute(sa.text("SELECT * FROM delivery_payments")).all()
        events = conn.execute(sa.text("SELECT * FROM webhook_events")).all()
    return [tuple(r) for r in payments], [tuple(r) for r in events]


def status_count(ledger: Ledger, status: str) -> float:
    text = render(ledger_registry(ledger)).decode()
    line = f'{names.INVOICES.name}{{status="{status}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def test_a_signed_paid_event_moves_the_invoice_to_paid_once(
    fake: FakeStripe, ledger: Ledger, pushed: dict[str, str], client: AsgiClient
) -> None:
    paid = fake.mark_invoice(pushed["invoice_id"], "paid")
    body = event("invoice.paid", paid)
    answer = client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert (answer.status_code, answer.content) == (200, b"")
    [record] = payment_records(ledger).values()
    assert (record.state, record.event_id, record.source) == (PaymentState.PAID, "evt_1", "webhook")
    assert record.amount_paid == sample_invoice().total_fee
    assert status_count(ledger, "paid") == 1
    before = recorded(ledger)
    replay = client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert replay.status_code == 200 and recorded(ledger) == before


def test_a_late_failure_never_undoes_a_payment(
    fake: FakeStripe, ledger: Ledger, pushed: dict[str, str], client: AsgiClient
) -> None:
    failed = fake.mark_invoice(pushed["invoice_id"], "payment_failed")
    paid = fake.mark_invoice(pushed["invoice_id"], "paid")
    first = event("invoice.paid", paid, "evt_2")
    assert client.post("/webhooks/stripe", content=first, headers=signed(first)).status_code == 200
    late = event("invoice.payment_failed", failed, "evt_1")
    assert client.post("/webhooks/stripe", content=late, headers=signed(late)).status_code == 200
    [record] = payment_records(ledger).values()
    assert (record.state, record.event_id) == (PaymentState.PAID, "evt_2")


@pytest.mark.parametrize("forgery", ["wrong secret", "stale", "tampered", "unsigned"])
def test_forged_events_get_400_and_change_nothing(
    fake: FakeStripe, ledger: Ledger, pushed: dict[str, str], client: AsgiClient, forgery: str
) -> None:
    body = event("invoice.paid", fake.mark_invoice(pushed["invoice_id"], "paid"))
    headers = {
        "wrong secret": signed(body, secret="whsec_someone_else_0123456789"),
        "stale": signed(body, timestamp=T0 - 400),
        "tampered": signed(body),
        "unsigned": {"Content-Type": "application/json"},
    }[forgery]
    if forgery == "tampered":
        body = body.replace(b'"invoice.paid"', b'"invoice.voided"')
    before = recorded(ledger)
    answer = client.post("/webhooks/stripe", content=body, headers=headers)
    assert answer.status_code == 400
    assert recorded(ledger) == before == ([], [])


def test_unknown_invoices_and_event_types_are_answered_and_change_nothing(
    ledger: Ledger, pushed: dict[str, str], client: AsgiClient
) -> None:
    stranger = event("invoice.paid", {"id": "in_not_ours", "object": "invoice", "status": "paid"})
    other = event("customer.created", {"id": "cus_9", "object": "customer"}, "evt_9")
    for body in (stranger, other):
        assert (
            client.post("/webhooks/stripe", content=body, headers=signed(body)).status_code == 200
        )
    assert recorded(ledger) == ([], [])
    bad = b"{not json"
    assert client.post("/webhooks/stripe", content=bad, headers=signed(bad)).status_code == 400


def test_a_body_over_the_cap_is_refused_unread(adapter: StripeAdapter, ledger: Ledger) -> None:
    app = build_app(ledger, {"stripe": Receiver(adapter, SECRET)}, max_body_bytes=1024)
    body = event("invoice.paid", {"id": "in_1", "object": "invoice", "description": "x" * 2000})
    answer = AsgiClient(app).post("/webhooks/stripe", content=body, headers=signed(body))
    assert answer.status_code == 413 and recorded(ledger) == ([], [])


def test_only_configured_targets_are_served(client: AsgiClient) -> None:
    assert client.post("/webhooks/xero", content=b"{}").status_code == 404
    assert client.get("/webhooks/stripe").status_code == 405
    assert client.get("/healthz").status_code == 200
