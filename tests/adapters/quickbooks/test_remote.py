"""Reading back what QuickBooks Online holds: ``QuickBooksAdapter.remote_invoices``.

Every test pushes through the real Hub against the local fake, changes the invoice as QBO's UI
would (a control call to the fake), reads it back and checks that the read sent no write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksAdapter, QuickBooksClientSettings
from kiki_billing_adapters.quickbooks.wire import qbo_payment_state

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import PaymentState, RemoteInvoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_quickbooks import REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

Made = Callable[..., QuickBooksAdapter]


def push(
    adapter: QuickBooksAdapter, invoice: Invoice, tmp_path: Path, ledger: str = "ledger"
) -> DeliveryOutcome:
    book = Ledger(f"sqlite:///{tmp_path / (ledger + '.sqlite3')}")
    try:
        hub = Hub(book, {"quickbooks": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
        delivery = Delivery(invoice, "quickbooks", QuickBooksClientSettings(), adapter.account)
        [outcome] = hub.push([delivery])
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        return outcome
    finally:
        book.close()


def read_back(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter, invoice: Invoice, refs: Mapping[str, str]
) -> list[RemoteInvoice]:
    """``remote_invoices``, checking that it sent one query and nothing else."""
    start = len(fake.requests)
    found = adapter.remote_invoices(invoice, refs)
    sent = fake.requests[start:]
    assert [(r.method, r.path) for r in sent] == [("POST", f"/v3/company/{REALM}/query")]
    assert fake.writes_since(start) == []
    return found


def test_a_pushed_invoice_is_read_back_open(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is PaymentState.OPEN
    assert (found.total, found.currency) == (invoice.total_fee, "USD")
    assert found.amount_paid == Decimal("0.00")
    assert (found.kiki_number, found.kiki_revision) == (invoice.number, 0)
    assert found.number == "OaaS-202601-000001"
    assert found.refs["invoice_id"] == outcome.refs["invoice_id"]
    assert found.refs["customer_id"] == outcome.refs["customer_id"]
    assert found.due_date == invoice.due_date == date(2026, 3, 3)


def test_the_invoice_is_found_without_refs(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice("EUR")
    outcome = push(adapter, invoice, tmp_path)
    [found] = read_back(fake, adapter, invoice, {})
    assert (found.refs["invoice_id"], found.currency) == (outcome.refs["invoice_id"], "EUR")


@pytest.mark.parametrize(
    ("mark", "amount", "state", "paid"),
    [
        ("paid", None, PaymentState.PAID, Decimal("200.30")),
        ("partly_paid", "80.30", PaymentState.PARTLY_PAID, Decimal("80.30")),
    ],
)
def test_payments_are_read_back(
    fake: FakeQuickBooks,
    make_adapter: Made,
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


def test_a_voided_invoice_reads_void_with_nothing_left(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    fake.mark_invoice(outcome.refs["invoice_id"], "void")
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is PaymentState.VOID
    assert (found.total, found.amount_paid) == (Decimal(0), Decimal(0))
    assert (found.kiki_number, found.kiki_revision) == (invoice.number, 0)


def test_a_deleted_invoice_is_gone(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    fake.mark_invoice(outcome.refs["invoice_id"], "deleted")
    assert read_back(fake, adapter, invoice, outcome.refs) == []


def test_a_duplicate_made_outside_is_found(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    adapter, invoice = make_adapter(), sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    copy = fake.duplicate_invoice(outcome.refs["invoice_id"])
    found = read_back(fake, adapter, invoice, outcome.refs)
    assert sorted(f.refs["invoice_id"] for f in found) == sorted([outcome.refs["invoice_id"], copy])


def test_another_revision_and_a_foreign_invoice_are_not_returned(
    fake: FakeQuickBooks, make_adapter: Made, tmp_path: Path
) -> None:
    fake.configure(duplicate_doc_numbers=True)
    adapter, invoice = make_adapter(), sample_invoice()
    revised = invoice.model_copy(update={"revision": 1}).sealed()
    first = push(adapter, invoice, tmp_path, "a")
    second = push(adapter, revised, tmp_path, "b")
    foreign = fake.duplicate_invoice(first.refs["invoice_id"])
    with fake.app.lock:  # someone's own invoice that happens to use our DocNumber
        fake.app.companies[REALM].invoices[foreign]["PrivateNote"] = "typed by hand"
    [found] = read_back(fake, adapter, invoice, first.refs)
    assert found.refs["invoice_id"] == first.refs["invoice_id"]
    [found] = read_back(fake, adapter, revised, second.refs)
    assert (found.refs["invoice_id"], found.kiki_revision) == (second.refs["invoice_id"], 1)


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"TotalAmt": "10.00", "Balance": "10.00"}, PaymentState.OPEN),
        ({"TotalAmt": "10.00", "Balance": "0.01"}, PaymentState.PARTLY_PAID),
        ({"TotalAmt": "10.00", "Balance": "0"}, PaymentState.PAID),
        ({"TotalAmt": "0", "Balance": "0", "PrivateNote": "kiki-billing"}, PaymentState.PAID),
        ({"TotalAmt": "0", "Balance": "0", "PrivateNote": "Voided"}, PaymentState.VOID),
    ],
)
def test_quickbooks_amounts_map_to_payment_states(
    fields: dict[str, str], state: PaymentState
) -> None:
    assert qbo_payment_state(fields) is state
