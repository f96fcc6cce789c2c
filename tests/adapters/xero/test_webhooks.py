"""Xero webhooks: intent to receive (200 to a correctly signed payload, 401 to an incorrectly
signed one), and an INVOICE event read back through the adapter moves the invoice to paid.

Payloads follow Xero's webhooks OpenAPI (tests/specs/xero/webhooks.yaml) and are checked
against it; signatures are made as Xero documents them: HMAC-SHA256 of the raw body with the
webhook key, base64-encoded, in ``x-xero-signature``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa
import yaml
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings
from kiki_billing_adapters.xero.webhooks import read_xero_events, verify_xero_signature

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
from tests.support.fake_xero import FakeXero

from .conftest import MakeAdapter

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

KEY = "Xw3bh00k+Key/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU=="
SPEC = Path(__file__).resolve().parents[2] / "specs" / "xero" / "webhooks.yaml"


@cache
def payload_schema() -> dict[str, Any]:
    spec = yaml.safe_load(SPEC.read_text())
    schema = dict(spec["components"]["schemas"]["WebhookEvent"])
    return schema


def payload(events: list[dict[str, Any]], sequence: int = 1) -> bytes:
    body = {
        "events": events,
        "firstEventSequence": sequence,
        "lastEventSequence": sequence + max(0, len(events) - 1),
        "entropy": "S0m3r4Nd0mt3xt",
    }
    jsonschema.validate(body, payload_schema())
    return json.dumps(body).encode()


def intent_to_receive() -> bytes:
    # NOTE: the validation request of developer.xero.com "Intent to receive": no events and
    # sequence 0 (the spec's minimum of 1 describes real deliveries, so it is not checked).
    return json.dumps(
        {"events": [], "lastEventSequence": 0, "firstEventSequence": 0, "entropy": "S0m3r4Nd0m"}
    ).encode()


def invoice_event(tenant: str, invoice_id: str, when: str = "2026-02-02T01:15:39.902") -> dict:
    return {
        "resourceUrl": f"https://api.xero.com/api.xro/2.0/Invoices/{invoice_id}",
        "resourceId": invoice_id,
        "eventDateUtc": when,
        "eventType": "UPDATE",
        "eventCategory": "INVOICE",
        "tenantId": tenant,
        "tenantType": "ORGANISATION",
    }


def signature(body: bytes, key: str = KEY) -> dict[str, str]:
    digest = hmac.new(key.encode(), body, hashlib.sha256).digest()
    return {
        "x-xero-signature": base64.b64encode(digest).decode(),
        "Content-Type": "application/json",
    }


def test_intent_to_receive_verifies_a_correct_signature_and_refuses_a_wrong_one() -> None:
    body = intent_to_receive()
    verify_xero_signature(signature(body), body, KEY)
    assert read_xero_events(body, "any-tenant") == []
    with pytest.raises(WebhookRejected) as refused:
        verify_xero_signature(signature(body, "another key"), body, KEY)
    assert refused.value.status == 401
    with pytest.raises(WebhookRejected) as unsigned:
        verify_xero_signature({}, body, KEY)
    assert unsigned.value.status == 401


def test_events_read_as_invoice_ids_of_their_tenant() -> None:
    tenant = "aef86862-2015-4b6b-88bc-d89032cecc50"
    contact = dict(invoice_event(tenant, "717f2bfc-c6d4-41fd-b238-3f2f0c0cf777"))
    contact["eventCategory"] = "CONTACT"
    body = payload([invoice_event(tenant, "55d84274-a3da-4829-a7c0-0cab601b95cc"), contact])
    invoice, other = read_xero_events(body, tenant)
    assert dict(invoice.refs) == {"invoice_id": "55d84274-a3da-4829-a7c0-0cab601b95cc"}
    assert invoice.state is None and invoice.account == tenant
    assert invoice.event_type == "INVOICE.UPDATE"
    assert dict(other.refs) == {}
    [foreign] = read_xero_events(payload([invoice_event(tenant, "x" * 36)]), "t2")
    assert foreign.account == f"tenant:{tenant}"


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"events": {}}'])
def test_a_signed_body_that_is_no_payload_is_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected):
        read_xero_events(body, "t")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


def recorded(ledger: Ledger) -> tuple[list[Any], list[Any]]:
    with ledger.engine.connect() as conn:
        payments = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM delivery_payments"))]
        events = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM webhook_events"))]
    return payments, events


def test_an_invoice_event_reads_the_invoice_back_and_records_it_paid(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter: XeroAdapter = make_adapter()
    hub = Hub(ledger, {"xero": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
    delivery = Delivery(
        sample_invoice(), "xero", XeroClientSettings(tax_type="NONE"), adapter.account
    )
    [outcome] = hub.push([delivery])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    invoice_id = outcome.refs["invoice_id"]
    fake.mark_invoice(invoice_id, "paid")
    client = AsgiClient(build_app(ledger, {"xero": Receiver(adapter, KEY)}))

    itr = intent_to_receive()
    ok = client.post("/webhooks/xero", content=itr, headers=signature(itr))
    assert (ok.status_code, ok.content, ok.headers.get("set-cookie")) == (200, b"", None)
    bad = client.post("/webhooks/xero", content=itr, headers=signature(itr, "wrong key"))
    assert (bad.status_code, bad.content) == (401, b"")

    body = payload([invoice_event(adapter.account, invoice_id)])
    tampered = body.replace(b"UPDATE", b"CREATE")
    assert (
        client.post("/webhooks/xero", content=tampered, headers=signature(body)).status_code == 401
    )
    assert recorded(ledger) == ([], [])

    start = len(fake.requests)
    answer = client.post("/webhooks/xero", content=body, headers=signature(body))
    assert (answer.status_code, answer.content) == (200, b"")
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests[start:]] == [
        ("GET", "Invoices")
    ]
    [record] = payment_records(ledger).values()
    assert record.state is PaymentState.PAID and record.amount_paid == sample_invoice().total_fee
    assert (
        'kiki_ooaS_invoices_generated_total{status="paid"} 1'
        in render(ledger_registry(ledger)).decode()
    )

    before, reads = recorded(ledger), len(fake.requests)
    replay = client.post("/webhooks/xero", content=body, headers=signature(body))
    assert replay.status_code == 200
    assert recorded(ledger) == before and len(fake.requests) == reads
