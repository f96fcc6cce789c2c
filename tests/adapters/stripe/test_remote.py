"""Reading back what Stripe holds: ``StripeAdapter.remote_invoices`` against the local fake.

Every test pushes through the real Hub, changes the invoice the way the Dashboard or a customer
would (a control call to the fake, never the adapter), then reads it back and checks that the
read sent no write.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from kiki_billing_adapters.stripe import StripeAdapter, StripeClientSettings, StripeSettings
from kiki_billing_adapters.stripe.wire import stripe_payment_state

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import PaymentState, RemoteInvoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

TEST_KEY = "sk_test_kiki_remote_0123456789abcdef"
T0 = 1_769_904_000.0  # 2026-02-01T00:00:00Z, after the sample invoice's period


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=3, clock=lambda: T0) as server:
        yield server


@pytest.fixture
def adapter(fake: FakeStripe) -> Iterator[StripeAdapter]:
    made = StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=fake.url))
    yield made
    made.close()


def push(
    adapter: StripeAdapter,
    invoice: Invoice,
    tmp_path: Path,
    client: StripeClientSettings | None = None,
    ledger: str = "ledger",
) -> DeliveryOutcome:
    book = Ledger(f"sqlite:///{tmp_path / (ledger + '.sqlite3')}")
    try:
        hub = Hub(book, {"stripe": adapter}, RetryPolicy(max_attempts=1), sleep=lambda _: None)
        delivery = Delivery(invoice, "stripe", client or StripeClientSettings(), adapter.account)
        [outcome] = hub.push([delivery])
        return outcome
    finally:
        book.close()


def read_back(
    fake: FakeStripe, adapter: StripeAdapter, invoice: Invoice, refs: Mapping[str, str]
) -> list[RemoteInvoice]:
    """``remote_invoices``, checking that it sent reads only."""
    start = len(fake.requests)
    found = adapter.remote_invoices(invoice, refs)
    assert fake.requests[start:], "nothing was read"
    assert fake.writes_since(start) == []
    return found


def test_a_pushed_invoice_is_read_back_open(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is PaymentState.OPEN
    assert (found.total, found.currency) == (Decimal("200.30"), "USD")
    assert found.total == invoice.total_fee
    assert found.amount_paid == Decimal("0.00")
    assert (found.kiki_number, found.kiki_revision) == (invoice.number, 0)
    assert found.refs["invoice_id"] == outcome.refs["invoice_id"]
    assert found.number == outcome.refs["invoice_number"]
    assert found.due_date is None  # charge_automatically invoices have no due date


def test_send_invoice_keeps_its_due_date(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    outcome = push(adapter, invoice, tmp_path, StripeClientSettings(collection="send_invoice"))
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    # NOTE: the fake counts days_until_due from the draft's creation (T0), as Stripe does.
    assert found.due_date == date(2026, 3, 3)


def test_a_zero_decimal_currency_is_read_in_whole_units(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice("JPY")
    outcome = push(adapter, invoice, tmp_path)
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert (found.total, found.currency) == (invoice.total_fee, "JPY")


@pytest.mark.parametrize(
    ("mark", "state", "paid"),
    [
        ("paid", PaymentState.PAID, Decimal("200.30")),
        ("partly_paid", PaymentState.PARTLY_PAID, Decimal("50.00")),
        ("payment_failed", PaymentState.PAYMENT_FAILED, Decimal("0.00")),
        ("uncollectible", PaymentState.UNCOLLECTIBLE, Decimal("0.00")),
        ("void", PaymentState.VOID, Decimal("0.00")),
    ],
)
def test_what_happened_at_stripe_is_read_back(
    fake: FakeStripe,
    adapter: StripeAdapter,
    tmp_path: Path,
    mark: str,
    state: PaymentState,
    paid: Decimal,
) -> None:
    invoice = sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    fake.mark_invoice(outcome.refs["invoice_id"], mark, "50.00" if mark == "partly_paid" else None)
    [found] = read_back(fake, adapter, invoice, outcome.refs)
    assert found.state is state
    assert (found.total, found.amount_paid) == (Decimal("200.30"), paid)


def test_a_draft_then_deleted_upstream_is_gone(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    fake.inject_invalid_request("POST", "/v1/invoiceitems", message="No such price.")
    outcome = push(adapter, invoice, tmp_path)
    assert outcome.state is DeliveryState.FAILED
    [draft] = read_back(fake, adapter, invoice, outcome.refs)
    assert draft.state is PaymentState.DRAFT and draft.total == Decimal("0.00")
    fake.mark_invoice(outcome.refs["invoice_id"], "deleted")
    assert read_back(fake, adapter, invoice, outcome.refs) == []


def test_a_duplicate_of_the_same_customer_is_found(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    copy = fake.duplicate_invoice(outcome.refs["invoice_id"])
    found = read_back(fake, adapter, invoice, outcome.refs)
    assert sorted(f.refs["invoice_id"] for f in found) == sorted([outcome.refs["invoice_id"], copy])
    assert all(f.total == invoice.total_fee for f in found)


def test_a_duplicate_under_another_customer_is_found(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    """A run that lost its ledger and did not find the customer made a second of both."""
    invoice = sample_invoice()
    first = push(adapter, invoice, tmp_path, ledger="a")
    fake.advance_clock(24 * 3600 + 1)  # the idempotency keys expire
    fake.app.search_lag = 2 * 86400.0  # and Search does not see the customer yet
    second = push(adapter, invoice, tmp_path, ledger="b")
    assert second.state is DeliveryState.DELIVERED, second.error
    assert second.refs["customer_id"] != first.refs["customer_id"]
    fake.app.search_lag = 0.0
    for refs in (first.refs, second.refs, {}):
        found = read_back(fake, adapter, invoice, refs)
        assert sorted(f.refs["customer_id"] for f in found) == sorted(
            [first.refs["customer_id"], second.refs["customer_id"]]
        )


def test_another_revision_is_not_returned(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    revised = invoice.model_copy(update={"revision": 1}).sealed()
    first = push(adapter, invoice, tmp_path, ledger="a")
    second = push(adapter, revised, tmp_path, ledger="b")
    assert second.state is DeliveryState.DELIVERED, second.error
    [found] = read_back(fake, adapter, invoice, first.refs)
    assert found.refs["invoice_id"] == first.refs["invoice_id"]
    [found] = read_back(fake, adapter, revised, second.refs)
    assert (found.refs["invoice_id"], found.kiki_revision) == (second.refs["invoice_id"], 1)


def test_reading_back_is_two_requests(
    fake: FakeStripe, adapter: StripeAdapter, tmp_path: Path
) -> None:
    invoice = sample_invoice()
    outcome = push(adapter, invoice, tmp_path)
    start = len(fake.requests)
    adapter.remote_invoices(invoice, outcome.refs)
    assert [(r.method, r.path) for r in fake.requests[start:]] == [
        ("GET", "/v1/invoices"),
        ("GET", "/v1/invoices/search"),
    ]


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"status": "draft"}, PaymentState.DRAFT),
        ({"status": "open"}, PaymentState.OPEN),
        ({"status": "open", "attempt_count": 2, "paid": False}, PaymentState.PAYMENT_FAILED),
        ({"status": "open", "attempt_count": 1, "amount_paid": 5}, PaymentState.PARTLY_PAID),
        ({"status": "paid", "paid": True, "attempt_count": 1}, PaymentState.PAID),
        ({"status": "uncollectible", "attempt_count": 4}, PaymentState.UNCOLLECTIBLE),
        ({"status": "void"}, PaymentState.VOID),
    ],
)
def test_stripe_statuses_map_to_payment_states(
    fields: dict[str, object], state: PaymentState
) -> None:
    assert stripe_payment_state(fields) is state


def test_an_unknown_stripe_status_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Stripe invoice status"):
        stripe_payment_state({"status": "deleted"})
