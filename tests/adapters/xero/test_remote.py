"""Reading back what Xero holds: ``XeroAdapter.remote_invoices`` against the local fake.

Every test pushes through the real Hub, changes the invoice as Xero's UI would (a control call
to the fake), reads it back and checks that the read sent one GET and no write.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings
from kiki_billing_adapters.xero.wire import xero_date, xero_payment_state

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import PaymentState, RemoteInvoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_xero import PREFIX, FakeXero

from .conftest import MakeAdapter

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

TAX_FREE = XeroClientSettings(tax_type="NONE")


def push(
    adapter: XeroAdapter,
    invoice: Invoice,
    tmp_path: Path,
    client: XeroClientSettings = TAX_FREE,
    ledger: str = "ledger",
) -> DeliveryOutcome:
    book = Ledger(f"sqlite:///{tmp_path / (ledger + '.sqlite3')}")
    try:
        hub = Hub(book, {"xero": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
        [outcome] = hub.push([Delivery(invoice, "xero", client, adapter.account)])
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        return outcome
    finally:
        book.close()


def read_back(
    fake: FakeXero, adapter: XeroAdapter, invoice: Invoice, refs: Mapping[str, str]
) -> list[RemoteInvoice]:
    """``remote_invoices``, checking that it sent one GET and nothing else."""
    start = len(fake.requests)
    found = adapter.remote_invoices(invoice, refs)
    assert [(r.method, r.path) for r in fake.requests[start:]] == [("GET", f"{PREFIX}/Invoices")]
    assert fake.writes_since(start) == []
    return found


def test_a_pushed_invoice_is_read_back_open(
    fake: FakeXero, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is PaymentState.OPEN
    assert (found.total, found.currency) == (invoice.total_fee, "USD")
    assert found.amount_paid == Decimal("0.00")
    assert (found.kiki_number, found.kiki_revision, found.number) == (
        invoice.number,
        0,
        invoice.number,
    )
    assert found.refs["invoice_id"] == outcome.refs["invoice_id"]
    assert found.refs["contact_id"] == outcome.refs["contact_id"]
    assert found.due_date == invoice.due_date == date(2026, 3, 3)


def test_a_draft_reads_draft(fake: FakeXero, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    push(adapter, invoice, tmp_path, XeroClientSettings(tax_type="NONE", status="DRAFT"))
    [found] = read_back(fake, adapter, invoice, {})
    assert (found.state, found.total) == (PaymentState.DRAFT, invoice.total_fee)


@pytest.mark.parametrize(
    ("mark", "amount", "state", "paid"),
    [
        ("paid", None, PaymentState.PAID, Decimal("200.30")),
        ("partly_paid", "0.30", PaymentState.PARTLY_PAID, Decimal("0.30")),
        ("void", None, PaymentState.VOID, Decimal("0.00")),
    ],
)
def test_what_happened_in_xero_is_read_back(
    fake: FakeXero,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    mark: str,
    amount: str | None,
    state: PaymentState,
    paid: Decimal,
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    fake.mark_invoice(outcome.refs["invoice_id"], mark, amount)
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is state
    assert (found.total, found.amount_paid) == (Decimal("200.30"), paid)


def test_a_deleted_invoice_is_gone(
    fake: FakeXero, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path, XeroClientSettings(tax_type="NONE", status="DRAFT"))
    fake.mark_invoice(outcome.refs["invoice_id"], "deleted")
    assert [i["Status"] for i in fake.invoices()] == ["DELETED"]  # Xero keeps it
    assert read_back(fake, adapter, invoice, outcome.refs) == []


def test_a_duplicate_made_outside_is_found(
    fake: FakeXero, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    copy = fake.duplicate_invoice(outcome.refs["invoice_id"])
    found = read_back(fake, adapter, invoice, outcome.refs)
    assert sorted(f.refs["invoice_id"] for f in found) == sorted([outcome.refs["invoice_id"], copy])


def test_another_revision_is_not_returned(
    fake: FakeXero, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    revised = invoice.model_copy(update={"revision": 1}).sealed()
    first = push(adapter, invoice, tmp_path, ledger="a")
    second = push(adapter, revised, tmp_path, ledger="b")
    [found] = read_back(fake, adapter, invoice, first.refs)
    assert found.refs["invoice_id"] == first.refs["invoice_id"]
    [found] = read_back(fake, adapter, revised, second.refs)
    assert (found.refs["invoice_id"], found.kiki_revision) == (second.refs["invoice_id"], 1)
    assert found.number == f"{invoice.number}-R1"


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"Status": "DRAFT"}, PaymentState.DRAFT),
        ({"Status": "SUBMITTED"}, PaymentState.DRAFT),
        ({"Status": "AUTHORISED", "Total": "5", "AmountDue": "5"}, PaymentState.OPEN),
        (
            {"Status": "AUTHORISED", "Total": "5", "AmountDue": "3", "AmountCredited": "2"},
            PaymentState.PARTLY_PAID,
        ),
        ({"Status": "PAID", "Total": "5", "AmountDue": "0"}, PaymentState.PAID),
        ({"Status": "VOIDED"}, PaymentState.VOID),
    ],
)
def test_xero_statuses_map_to_payment_states(fields: dict[str, str], state: PaymentState) -> None:
    assert xero_payment_state(fields) is state


def test_xero_dates_in_both_forms() -> None:
    assert xero_date("/Date(1772496000000+0000)/") == date(2026, 3, 3)
    assert xero_date("2026-03-03T00:00:00") == date(2026, 3, 3)
    assert xero_date(None) is None
