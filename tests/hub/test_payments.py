"""Payment states in the ledger: forward only, each webhook event once, overdue by time zone,
and ``sync-status``'s read-back through an adapter (the in-memory billing system)."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import (
    apply_payment_state,
    deliveries_with_ref,
    is_overdue,
    may_move,
    payment_records,
)
from kiki_billing.hub.payments import direct_call, process_event, sync_delivery
from kiki_billing.plugin import PaymentState, WebhookEvent
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem
from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401

from .conftest import deliveries

P = PaymentState


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.server)])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_db_url")
    ledger = Ledger(url)
    yield ledger
    ledger.close()


def delivered(ledger: Ledger, system: MemoryBillingSystem, *invoices):
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.retry import RetryPolicy

    adapter = MemoryAdapter(system=system)
    hub = Hub(ledger, {"memory": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
    outcomes = hub.push(deliveries(*invoices))
    assert all(o.state is DeliveryState.DELIVERED for o in outcomes)
    return adapter, [
        ledger.find_delivery(i.number, i.revision, "memory", "default") for i in invoices
    ]


@pytest.mark.parametrize(
    ("current", "new", "moves"),
    [
        (None, P.OPEN, True),
        (P.OPEN, P.PAYMENT_FAILED, True),
        (P.PAYMENT_FAILED, P.OPEN, False),
        (P.PAYMENT_FAILED, P.PAID, True),
        (P.PAID, P.PAYMENT_FAILED, False),
        (P.PAID, P.VOID, False),
        (P.VOID, P.PAID, False),
        (P.UNCOLLECTIBLE, P.PAID, True),
        (P.UNCOLLECTIBLE, P.VOID, True),
        (P.PARTLY_PAID, P.OPEN, False),
        (P.OPEN, P.OPEN, False),
    ],
)
def test_a_state_only_moves_forward(current, new, moves) -> None:
    assert may_move(current, new) is moves


def test_a_second_part_payment_records_the_larger_amount() -> None:
    assert may_move(P.PARTLY_PAID, P.PARTLY_PAID, Decimal("10"), Decimal("15"))
    assert not may_move(P.PARTLY_PAID, P.PARTLY_PAID, Decimal("15"), Decimal("10"))


def test_an_event_is_applied_once_and_never_moves_a_state_backwards(any_ledger: Ledger) -> None:
    _adapter, [record] = delivered(any_ledger, MemoryBillingSystem(), sample_invoice())
    event = ("memory", "default", "invoice.paid")
    paid = apply_payment_state(
        any_ledger, record.id, P.PAID, amount_paid=Decimal("601.00"), event_id="evt_1",
        source="webhook", event=event,
    )  # fmt: skip
    assert (paid.outcome, paid.before, paid.after) == ("applied", None, P.PAID)
    again = apply_payment_state(
        any_ledger, record.id, P.PAID, amount_paid=Decimal("601.00"), event_id="evt_1",
        source="webhook", event=event,
    )  # fmt: skip
    assert again.outcome == "replayed"
    late = apply_payment_state(
        any_ledger, record.id, P.PAYMENT_FAILED, amount_paid=None, event_id="evt_0",
        source="webhook", event=("memory", "default", "invoice.payment_failed"),
    )  # fmt: skip
    assert (late.outcome, late.after) == ("unchanged", P.PAID)
    stored = payment_records(any_ledger)[record.id]
    assert (stored.state, stored.amount_paid, stored.event_id) == (
        P.PAID,
        Decimal("601.00"),
        "evt_1",
    )
    with any_ledger.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT event_id, outcome FROM webhook_events")).all()
    assert sorted(map(tuple, rows)) == [("evt_0", "unchanged"), ("evt_1", "applied")]


def test_the_same_event_arriving_twice_at_once_is_applied_once(any_ledger: Ledger) -> None:
    _adapter, [record] = delivered(any_ledger, MemoryBillingSystem(), sample_invoice())
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def arrive() -> None:
        start.wait()
        change = apply_payment_state(
            any_ledger, record.id, P.PAID, amount_paid=None, event_id="evt_same",
            source="webhook", event=("memory", "default", "invoice.paid"),
        )  # fmt: skip
        outcomes.append(change.outcome)

    threads = [threading.Thread(target=arrive) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["applied", "replayed", "replayed", "replayed"]


def test_a_delivery_is_found_by_an_exact_provider_id(ledger: Ledger) -> None:
    system = MemoryBillingSystem()
    _adapter, records = delivered(
        ledger, system, sample_invoice(number=1), sample_invoice(client_id="b", number=2)
    )
    first = records[0].refs["invoice_id"]
    assert [r.id for r in deliveries_with_ref(ledger, "memory", "invoice_id", first)] == [
        records[0].id
    ]
    assert deliveries_with_ref(ledger, "memory", "invoice_id", first[:-1]) == []
    assert deliveries_with_ref(ledger, "memory", "invoice_id", first[:-1] + "_") == []
    assert deliveries_with_ref(ledger, "memory", "invoice_id", first, "other account") == []


@pytest.mark.parametrize(
    ("zone", "overdue"),
    [("UTC", False), ("Asia/Tokyo", True), ("America/Los_Angeles", False)],
)
def test_overdue_is_decided_in_the_clients_time_zone(zone: str, overdue: bool) -> None:
    # 23:30 UTC on the due date: already the next day in Tokyo, still the due date elsewhere.
    now = datetime(2026, 3, 3, 23, 30, tzinfo=UTC)
    assert is_overdue(date(2026, 3, 3), zone, None, now) is overdue
    assert is_overdue(date(2026, 3, 3), zone, P.PAYMENT_FAILED, now) is overdue
    assert not is_overdue(date(2026, 3, 3), zone, P.PAID, now)
    assert not is_overdue(date(2026, 3, 3), zone, P.VOID, now)


def test_sync_reads_the_state_back_and_never_backwards(ledger: Ledger) -> None:
    system = MemoryBillingSystem()
    adapter, [record] = delivered(ledger, system, sample_invoice())
    first = sync_delivery(ledger, adapter, record, direct_call)
    assert (first.outcome, first.before, first.after) == ("applied", None, P.OPEN)
    system.mark_invoice(record.refs["invoice_id"], "paid")
    paid = sync_delivery(ledger, adapter, record, direct_call)
    assert (paid.outcome, paid.after) == ("applied", P.PAID)
    assert payment_records(ledger)[record.id].amount_paid == sample_invoice().total_fee
    assert sync_delivery(ledger, adapter, record, direct_call).outcome == "unchanged"


def test_sync_reports_an_invoice_gone_or_copied_upstream(ledger: Ledger) -> None:
    system = MemoryBillingSystem()
    adapter, [gone, copied] = delivered(
        ledger, system, sample_invoice(number=1), sample_invoice(client_id="b", number=2)
    )
    system.mark_invoice(gone.refs["invoice_id"], "deleted")
    system.duplicate_invoice(copied.refs["invoice_id"])
    assert sync_delivery(ledger, adapter, gone, direct_call).outcome == "gone"
    result = sync_delivery(ledger, adapter, copied, direct_call)
    assert (result.outcome, result.after) == ("duplicate", P.OPEN)
    assert result.note == "2 copies upstream"


def test_sync_skips_a_delivery_of_another_account(ledger: Ledger) -> None:
    system = MemoryBillingSystem()
    _adapter, [record] = delivered(ledger, system, sample_invoice())
    other = MemoryAdapter(system=system, account="elsewhere")
    result = sync_delivery(ledger, other, record, direct_call)
    assert result.outcome == "skipped" and payment_records(ledger) == {}


def test_an_event_naming_ids_only_reads_the_invoice_back(ledger: Ledger) -> None:
    system = MemoryBillingSystem()
    adapter, [record] = delivered(ledger, system, sample_invoice())
    system.mark_invoice(record.refs["invoice_id"], "void")
    event = WebhookEvent("e1", "Invoice.Update", {"invoice_id": record.refs["invoice_id"]})
    done = process_event(ledger, adapter, event)
    assert (done.outcome, done.state, done.invoice) == ("applied", P.VOID, record.invoice_number)
    reads = len(system.calls)
    assert process_event(ledger, adapter, event).outcome == "replayed"
    assert len(system.calls) == reads  # a replay does not read the provider again


def test_events_about_nothing_of_ours_change_nothing(ledger: Ledger) -> None:
    adapter, _records = delivered(ledger, MemoryBillingSystem(), sample_invoice())
    unknown = WebhookEvent("e2", "invoice.paid", {"invoice_id": "in_not_ours"}, state=P.PAID)
    customer = WebhookEvent("e3", "customer.created", {})
    elsewhere = WebhookEvent("e4", "invoice.paid", {"invoice_id": "x"}, P.PAID, account="other")
    assert process_event(ledger, adapter, unknown).outcome == "unknown_invoice"
    assert process_event(ledger, adapter, customer).outcome == "ignored"
    assert process_event(ledger, adapter, elsewhere).outcome == "ignored"
    assert payment_records(ledger) == {}
