"""The in-memory billing system read back: what adapter authors model their own tests on."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kiki_billing.hub.ledger import DeliveryState
from kiki_billing.plugin import PaymentState
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem
from tests.hub.conftest import deliveries


@pytest.fixture
def pushed(make_hub, system: MemoryBillingSystem):
    invoice = sample_invoice("JPY")
    [outcome] = make_hub().push(deliveries(invoice))
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    return invoice, outcome


def read(system: MemoryBillingSystem, invoice, refs):
    calls = len(system.calls)
    found = MemoryAdapter(system=system).remote_invoices(invoice, refs)
    assert system.calls[calls:] == [("list_invoices", None)]  # one read, no write
    return found


def test_a_pushed_invoice_reads_open_in_whole_yen(system, pushed) -> None:
    invoice, outcome = pushed
    [found] = read(system, invoice, outcome.refs)
    assert (found.state, found.total, found.currency) == (
        PaymentState.OPEN,
        invoice.total_fee,
        "JPY",
    )
    assert found.refs["invoice_id"] == outcome.refs["invoice_id"]


@pytest.mark.parametrize(
    ("mark", "state", "share"),
    [
        ("paid", PaymentState.PAID, Decimal(1)),
        ("partly_paid", PaymentState.PARTLY_PAID, Decimal("0.5")),
        ("void", PaymentState.VOID, Decimal(0)),
    ],
)
def test_marks_are_read_back(system, pushed, mark, state, share) -> None:
    invoice, outcome = pushed
    system.mark_invoice(outcome.refs["invoice_id"], mark)
    [found] = read(system, invoice, outcome.refs)
    assert (found.state, found.amount_paid) == (state, invoice.total_fee * share)


def test_deleted_duplicated_and_revised(make_hub, system, pushed) -> None:
    invoice, outcome = pushed
    copy = system.duplicate_invoice(outcome.refs["invoice_id"])
    assert {f.refs["invoice_id"] for f in read(system, invoice, outcome.refs)} == {
        outcome.refs["invoice_id"],
        copy,
    }
    system.mark_invoice(copy, "deleted")
    assert len(read(system, invoice, outcome.refs)) == 1
    revised = invoice.model_copy(update={"revision": 1}).sealed()
    assert read(system, revised, {}) == []
