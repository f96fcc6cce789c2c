"""Reading back what Zuora holds: ``ZuoraAdapter.remote_invoices`` against the SOAP fake.

Every test pushes through the real Hub, changes the invoice as Zuora's UI would (a control call
to the fake), reads it back and checks that the read sent only logins and queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from decimal import Decimal

import pytest
from kiki_billing_adapters.zuora import ZuoraAdapter
from kiki_billing_adapters.zuora.wire import notes_revision, zuora_payment_state

from kiki_billing.hub.ledger import DeliveryState
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import PaymentState, RemoteInvoice
from tests.adapters.zuora.conftest import MakeAdapter, Pusher, invoice
from tests.support.fake_zuora import FakeZuora, soap_operation

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


def delivered(pusher: Pusher, adapter: ZuoraAdapter, made: Invoice, **kw: str) -> DeliveryOutcome:
    [outcome] = pusher.push(adapter, made, **kw)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    return outcome


def read_back(
    fake: FakeZuora, adapter: ZuoraAdapter, made: Invoice, refs: Mapping[str, str]
) -> list[RemoteInvoice]:
    """``remote_invoices``, checking that it sent nothing but logins and queries."""
    start = len(fake.requests)
    found = adapter.remote_invoices(made, refs)
    assert {soap_operation(r.body) for r in fake.requests[start:]} <= {"login", "query"}
    assert fake.writes_since(start) == []
    return found


def test_a_pushed_invoice_is_read_back_open(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, made = make_adapter(), invoice()
    outcome = delivered(pusher, adapter, made)
    start = len(fake.requests)
    [found] = read_back(fake, adapter, made, outcome.refs)
    assert len(fake.requests) - start == 3  # subscriptions, their items, the invoices
    assert found.state is PaymentState.OPEN
    assert (found.total, found.currency) == (made.total_fee, "USD")
    assert found.amount_paid == Decimal("0.00")
    assert (found.kiki_number, found.kiki_revision) == (made.number, 0)
    assert found.refs["invoice_id"] == outcome.refs["invoice_id"]
    assert found.number == outcome.refs["invoice_number"]
    assert found.refs["subscription_name"] == outcome.refs["subscription_name"]
    assert found.due_date == date(2026, 3, 3)  # Net 30 from the invoice date


def test_without_refs_the_currency_is_read_from_the_account(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, made = make_adapter(), invoice(currency="EUR")
    outcome = delivered(pusher, adapter, made)
    start = len(fake.requests)
    [found] = read_back(fake, adapter, made, {})
    assert len(fake.requests) - start == 4
    assert (found.refs["invoice_id"], found.currency) == (outcome.refs["invoice_id"], "EUR")


@pytest.mark.parametrize(
    ("mark", "amount", "state", "paid"),
    [
        ("paid", None, PaymentState.PAID, Decimal("200.30")),
        ("partly_paid", "100.00", PaymentState.PARTLY_PAID, Decimal("100.00")),
        ("void", None, PaymentState.VOID, Decimal("0")),
    ],
)
def test_what_happened_in_zuora_is_read_back(
    fake: FakeZuora,
    make_adapter: MakeAdapter,
    pusher: Pusher,
    mark: str,
    amount: str | None,
    state: PaymentState,
    paid: Decimal,
) -> None:
    adapter, made = make_adapter(), invoice()
    outcome = delivered(pusher, adapter, made)
    fake.mark_invoice(outcome.refs["invoice_id"], mark, amount)
    [found] = read_back(fake, adapter, made, outcome.refs)
    assert found.state is state
    assert (found.total, found.amount_paid) == (Decimal("200.30"), paid)


def test_a_deleted_invoice_is_gone(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, made = make_adapter(), invoice()
    outcome = delivered(pusher, adapter, made)
    fake.mark_invoice(outcome.refs["invoice_id"], "deleted")
    assert read_back(fake, adapter, made, outcome.refs) == []


def test_a_duplicate_made_outside_is_found(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, made = make_adapter(), invoice()
    outcome = delivered(pusher, adapter, made)
    copy = fake.duplicate_invoice(outcome.refs["invoice_id"])
    found = read_back(fake, adapter, made, outcome.refs)
    assert sorted(f.refs["invoice_id"] for f in found) == sorted([outcome.refs["invoice_id"], copy])
    assert all(f.total == made.total_fee for f in found)


def test_another_revision_and_another_invoice_are_not_returned(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, made = make_adapter(), invoice()
    revised = made.model_copy(update={"revision": 1}).sealed()
    first = delivered(pusher, adapter, made, ledger="a")
    second = delivered(pusher, adapter, revised, ledger="b")
    delivered(pusher, adapter, invoice(11, client="client1"), ledger="c")  # same account
    [found] = read_back(fake, adapter, made, first.refs)
    assert found.refs["invoice_id"] == first.refs["invoice_id"]
    [found] = read_back(fake, adapter, revised, second.refs)
    assert (found.refs["invoice_id"], found.kiki_revision) == (second.refs["invoice_id"], 1)


@pytest.mark.parametrize(
    ("status", "balance", "state"),
    [
        ("Draft", "10", PaymentState.DRAFT),
        ("Posted", "10", PaymentState.OPEN),
        ("Posted", "4", PaymentState.PARTLY_PAID),
        ("Posted", "0", PaymentState.PAID),
        ("Canceled", "0", PaymentState.VOID),
        ("Error", "10", None),
    ],
)
def test_zuora_statuses_map_to_payment_states(
    status: str, balance: str, state: PaymentState | None
) -> None:
    assert zuora_payment_state(status, Decimal(10), Decimal(balance)) is state


def test_the_revision_is_read_from_the_notes() -> None:
    made = invoice()
    assert notes_revision(f"Profit share 2026-01, invoice {made.number}", made) == 0
    assert notes_revision(f"Profit share 2026-01, invoice {made.number} revision 2", made) == 2
    assert notes_revision(f"Profit share 2026-01, invoice {made.number}0", made) is None
    assert notes_revision(None, made) is None
