"""QuickBooks Online webhooks: ``intuit-signature`` (base64 HMAC-SHA256 of the raw body with
the app's Verifier Token), both payload formats (``eventNotifications`` and CloudEvents), and
an Invoice change read back through the adapter that moves the invoice to paid."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kiki_billing_adapters.quickbooks import QuickBooksAdapter, QuickBooksClientSettings
from kiki_billing_adapters.quickbooks.webhooks import (
    read_quickbooks_events,
    verify_quickbooks_signature,
)

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import payment_records
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.webhooks import Receiver, build_app
from kiki_billing.plugin import PaymentState, WebhookRejected
from kiki_billing.testing.contract import sample_invoice
from tests.support.asgi import AsgiClient
from tests.support.fake_quickbooks import REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

VERIFIER = "e8a6b4c2-verifier-token-0123456789abcdef"
Made = Callable[..., QuickBooksAdapter]


def signature(body: bytes, token: str = VERIFIER) -> dict[str, str]:
    digest = hmac.new(token.encode(), body, hashlib.sha256).digest()
    return {
        "intuit-signature": base64.b64encode(digest).decode(),
        "Content-Type": "application/json",
    }


def legacy(realm: str, *entities: dict[str, str]) -> bytes:
    # The sample payload of developer.intuit.com "Managing webhooks notifications".
    body = {
        "eventNotifications": [{"realmId": realm, "dataChangeEvent": {"entities": list(entities)}}]
    }
    return json.dumps(body).encode()


def entity(name: str, ident: str, operation: str = "Update") -> dict[str, str]:
    return {
        "name": name,
        "id": ident,
        "operation": operation,
        "lastUpdated": "2026-02-02T14:42:19-0700",
    }


def cloudevent(realm: str, kind: str, ident: str, event_id: str) -> dict[str, Any]:
    # The sample of Intuit's "Upcoming change to webhooks payload structure" (2025-11-12).
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "intuit.dsnBgbseACLLRZNxo2dfc4evmEJdxde58xeeYcZliOU=",
        "type": kind,
        "datacontenttype": "application/json",
        "time": "2026-02-02T21:31:25.179851517Z",
        "intuitentityid": ident,
        "intuitaccountid": realm,
        "data": {},
    }


def test_the_verifier_token_signature_is_checked_on_the_raw_body() -> None:
    body = legacy(REALM, entity("Invoice", "130"))
    verify_quickbooks_signature(signature(body), body, VERIFIER)
    for headers, raw in (
        (signature(body, "another token"), body),
        (signature(body), body.replace(b"130", b"131")),
        ({}, body),
        ({"intuit-signature": "not base64!"}, body),
    ):
        with pytest.raises(WebhookRejected) as refused:
            verify_quickbooks_signature(headers, raw, VERIFIER)
        assert refused.value.status == 400


def test_both_payload_formats_read_as_invoice_changes() -> None:
    accounts = {REALM: "sandbox:" + REALM}
    old = read_quickbooks_events(
        legacy(REALM, entity("Invoice", "130"), entity("Customer", "7", "Create")), accounts
    )
    assert [(e.event_type, dict(e.refs), e.account) for e in old] == [
        ("Invoice.Update", {"invoice_id": "130"}, "sandbox:" + REALM),
        ("Customer.Create", {}, "sandbox:" + REALM),
    ]
    assert old[0].event_id == f"{REALM}:Invoice:130:Update:2026-02-02T14:42:19-0700"
    new = read_quickbooks_events(
        json.dumps(
            [
                cloudevent(REALM, "qbo.invoice.updated.v1", "130", "88cd52aa-1"),
                cloudevent("999", "qbo.invoice.deleted.v1", "4", "88cd52aa-2"),
            ]
        ).encode(),
        accounts,
    )
    assert [(e.event_id, e.event_type, dict(e.refs), e.state, e.account) for e in new] == [
        ("88cd52aa-1", "invoice.updated", {"invoice_id": "130"}, None, "sandbox:" + REALM),
        ("88cd52aa-2", "invoice.deleted", {"invoice_id": "4"}, PaymentState.VOID, "realm:999"),
    ]


@pytest.mark.parametrize("body", [b"{", b"{}", b'{"eventNotifications": [{"realmId": "1"}]}'])
def test_a_signed_body_that_is_no_notification_is_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected):
        read_quickbooks_events(body, {})


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


@pytest.mark.parametrize("form", ["eventNotifications", "CloudEvents"])
def test_an_invoice_change_is_read_back_and_recorded_paid(
    fake: FakeQuickBooks, make_adapter: Made, ledger: Ledger, form: str
) -> None:
    adapter = make_adapter()
    hub = Hub(ledger, {"quickbooks": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
    delivery = Delivery(sample_invoice(), "quickbooks", QuickBooksClientSettings(), adapter.account)
    [outcome] = hub.push([delivery])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    invoice_id = outcome.refs["invoice_id"]
    fake.mark_invoice(invoice_id, "paid")
    client = AsgiClient(build_app(ledger, {"quickbooks": Receiver(adapter, VERIFIER)}))
    if form == "CloudEvents":
        body = json.dumps(
            [cloudevent(REALM, "qbo.invoice.updated.v1", invoice_id, "ce-1")]
        ).encode()
    else:
        body = legacy(REALM, entity("Invoice", invoice_id))

    wrong = client.post("/webhooks/quickbooks", content=body, headers=signature(body, "nope"))
    assert wrong.status_code == 400 and recorded(ledger) == ([], [])

    start = len(fake.requests)
    answer = client.post("/webhooks/quickbooks", content=body, headers=signature(body))
    assert answer.status_code == 200
    assert [(r.method, r.path) for r in fake.requests[start:]] == [
        ("POST", f"/v3/company/{REALM}/query")
    ]
    assert fake.writes_since(start) == []
    [record] = payment_records(ledger).values()
    assert record.state is PaymentState.PAID and record.amount_paid == sample_invoice().total_fee

    before, reads = recorded(ledger), len(fake.requests)
    assert (
        client.post("/webhooks/quickbooks", content=body, headers=signature(body)).status_code
        == 200
    )
    assert recorded(ledger) == before and len(fake.requests) == reads


def test_a_provider_that_cannot_be_read_gets_503_so_it_sends_again(
    fake: FakeQuickBooks, make_adapter: Made, ledger: Ledger
) -> None:
    adapter = make_adapter()
    hub = Hub(ledger, {"quickbooks": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
    delivery = Delivery(sample_invoice(), "quickbooks", QuickBooksClientSettings(), adapter.account)
    [outcome] = hub.push([delivery])
    body = legacy(REALM, entity("Invoice", outcome.refs["invoice_id"]))
    client = AsgiClient(build_app(ledger, {"quickbooks": Receiver(adapter, VERIFIER)}))
    fake.inject_error("POST", f"/v3/company/{REALM}/query", status=503)  # QBO is down
    answer = client.post("/webhooks/quickbooks", content=body, headers=signature(body))
    assert answer.status_code == 503 and recorded(ledger) == ([], [])
