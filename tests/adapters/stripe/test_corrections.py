"""Corrections through the real hub, StripeAdapter and stripe SDK against the local Stripe fake.

Revision 0 is pushed, changed the way a customer or the Dashboard would (a control call to the
fake), then revision 1 is pushed: the fake (strict as Stripe: no void of a paid invoice, no
credit note over what is left, post-payment notes must put their total somewhere, every request
checked against the 2023-08-16 OpenAPI spec) must end with exactly one void or the credit notes,
and one revision 1 whose amount due takes the customer's credit into account.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.stripe import StripeAdapter, StripeClientSettings, StripeSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.revisions import as_revision
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

TEST_KEY = "sk_test_kiki_corrections_0123456789ab"
T0 = 1_769_904_000.0  # 2026-02-01T00:00:00Z


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=5, clock=lambda: T0) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


def push(
    fake: FakeStripe,
    ledger: Ledger,
    invoice: Invoice,
    *,
    attempts: int = 3,
    client: StripeClientSettings | None = None,
    redrive: bool = False,
) -> DeliveryOutcome:
    adapter = StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=fake.url))
    try:
        hub = Hub(
            ledger, {"stripe": adapter}, RetryPolicy(max_attempts=attempts), sleep=lambda _: None
        )
        delivery = Delivery(invoice, "stripe", client or StripeClientSettings(), adapter.account)
        [outcome] = hub.push([delivery], redrive_failed=redrive)
        return outcome
    finally:
        adapter.close()


def issued() -> Invoice:
    return sample_invoice(lines=2)  # 100.10 + 100.20 = 200.30 USD


def amended(invoice: Invoice, keep: int = 1, extra: Invoice | None = None) -> Invoice:
    """Revision 1 with the first ``keep`` lines (and the lines of ``extra`` after them)."""
    lines = list(invoice.lines[:keep])
    if extra is not None:
        lines += [
            line.model_copy(update={"line_no": len(lines) + n})
            for n, line in enumerate(extra.lines, 1)
        ]
    total = sum(line.fee for line in lines)
    return as_revision(invoice.model_copy(update={"lines": tuple(lines), "total_fee": total}), 1)


def invoices_of(fake: FakeStripe, invoice: Invoice) -> list[dict[str, Any]]:
    return [
        inv
        for inv in fake.state()["invoices"]
        if inv["metadata"].get("kiki_invoice_number") == invoice.number
        and inv["metadata"].get("kiki_revision") == str(invoice.revision)
    ]


def one(fake: FakeStripe, invoice: Invoice) -> dict[str, Any]:
    (found,) = invoices_of(fake, invoice)
    return found


def requests_to(fake: FakeStripe, method: str, suffix: str) -> list[Any]:
    return [r for r in fake.requests if r.method == method and r.path.endswith(suffix)]


def customer_balance(fake: FakeStripe) -> int:
    (customer,) = fake.state()["customers"]
    return int(customer["balance"])


def test_unpaid_invoice_is_voided_then_reissued(fake: FakeStripe, ledger: Ledger) -> None:
    first = issued()
    assert push(fake, ledger, first).ok
    second = amended(first)
    outcome = push(fake, ledger, second)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["corrected_r0"] == "void"
    assert one(fake, first)["status"] == "void"
    new = one(fake, second)
    assert new["status"] == "open"
    assert new["total"] == new["amount_due"] == 10010
    assert new["description"] == f"Profit share 2026-01, invoice {first.number}-R1 (revision 1)"
    assert fake.state()["credit_notes"] == []
    [void] = requests_to(fake, "POST", "/void")
    assert void.headers.get("idempotency-key")
    # The void went out before anything of revision 1.
    paths = [r.path for r in fake.requests if r.method == "POST"]
    after = paths[paths.index(void.path) + 1 :]
    assert after == ["/v1/invoices", "/v1/invoiceitems", f"/v1/invoices/{new['id']}/finalize"]


def test_paid_invoice_amended_down_is_credited_and_the_revision_paid_by_credit(
    fake: FakeStripe, ledger: Ledger
) -> None:
    first = issued()
    done = push(fake, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    second = amended(first)  # 100.10, below the 200.30 paid
    outcome = push(fake, ledger, second)
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    [note] = fake.state()["credit_notes"]
    assert note["type"] == "post_payment"
    assert (note["total"], note["invoice"]) == (20030, done.refs["invoice_id"])
    assert note["metadata"]["kiki_credits"] == f"{first.number}-CN"
    assert note["metadata"]["kiki_part"] == "paid"
    assert note["lines"]["data"][0]["amount"] == note["total"]
    assert one(fake, first)["status"] == "paid"
    new = one(fake, second)
    # Never a negative invoice: the revision bills 100.10 and the client's credit pays it.
    assert new["total"] == 10010
    assert (new["starting_balance"], new["ending_balance"]) == (-20030, -10020)
    assert new["amount_due"] == 0 and new["status"] == "paid"
    assert customer_balance(fake) == -10020  # the rest stays the client's credit


def test_paid_invoice_amended_up_bills_only_the_difference(fake: FakeStripe, ledger: Ledger):
    first = issued()
    done = push(fake, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    second = amended(first, keep=2, extra=sample_invoice(lines=1))  # 200.30 + 100.10
    outcome = push(fake, ledger, second)
    assert outcome.ok, outcome.error
    new = one(fake, second)
    assert new["total"] == 30040
    assert new["amount_due"] == 10010 and new["status"] == "open"
    assert customer_balance(fake) == 0


def test_partly_paid_invoice_gets_one_note_for_what_is_due_and_one_for_what_was_paid(
    fake: FakeStripe, ledger: Ledger
) -> None:
    first = issued()
    done = push(fake, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    outcome = push(fake, ledger, amended(first))
    assert outcome.ok, outcome.error
    notes = sorted(fake.state()["credit_notes"], key=lambda n: n["metadata"]["kiki_part"])
    assert [(n["metadata"]["kiki_part"], n["type"], n["total"]) for n in notes] == [
        ("due", "pre_payment", 15030),
        ("paid", "post_payment", 5000),
    ]
    assert sum(n["total"] for n in notes) == 20030  # credited in full, to the cent
    old = one(fake, first)
    assert old["status"] == "paid" and old["amount_remaining"] == 0
    assert one(fake, amended(first))["amount_due"] == 10010 - 5000


def test_a_draft_left_by_a_failed_delivery_is_deleted(fake: FakeStripe, ledger: Ledger):
    first = issued()
    fake.inject_invalid_request("POST", "/v1/invoices/*/finalize", times=1)
    failed = push(fake, ledger, first, attempts=1)
    assert failed.state is DeliveryState.FAILED
    assert one(fake, first)["status"] == "draft"
    second = amended(first)
    outcome = push(fake, ledger, second)
    assert outcome.ok, outcome.error
    assert invoices_of(fake, first) == []
    assert len(requests_to(fake, "DELETE", failed.refs["invoice_id"])) == 1
    assert one(fake, second)["status"] == "open"


def test_void_with_a_lost_answer_is_found_by_the_rerun(fake: FakeStripe, ledger: Ledger):
    first = issued()
    push(fake, ledger, first)
    second = amended(first)
    fake.inject_503("POST", "/v1/invoices/*/void", after=True)
    deferred = push(fake, ledger, second, attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    assert one(fake, first)["status"] == "void"
    assert invoices_of(fake, second) == []
    outcome = push(fake, ledger, second, attempts=1)
    assert outcome.ok, outcome.error
    assert len(requests_to(fake, "POST", "/void")) == 1
    assert len(invoices_of(fake, second)) == 1


def test_credit_note_with_a_lost_answer_is_found_by_the_rerun(fake: FakeStripe, ledger: Ledger):
    first = issued()
    done = push(fake, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    second = amended(first)
    fake.inject_503("POST", "/v1/credit_notes", after=True)
    deferred = push(fake, ledger, second, attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    assert len(fake.state()["credit_notes"]) == 1
    outcome = push(fake, ledger, second, attempts=1)
    assert outcome.ok, outcome.error
    assert len(fake.state()["credit_notes"]) == 1
    assert len(requests_to(fake, "POST", "/v1/credit_notes")) == 1
    assert one(fake, second)["amount_due"] == 0


def test_a_retry_after_a_lost_answer_replays_the_same_key(fake: FakeStripe, ledger: Ledger):
    first = issued()
    done = push(fake, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    fake.inject_503("POST", "/v1/credit_notes", after=True)
    outcome = push(fake, ledger, amended(first), attempts=2)
    assert outcome.ok, outcome.error
    sent = requests_to(fake, "POST", "/v1/credit_notes")
    assert len(sent) == 2
    assert sent[0].headers["idempotency-key"] == sent[1].headers["idempotency-key"]
    assert len(fake.state()["credit_notes"]) == 1


def test_the_fake_refuses_what_stripe_refuses(fake: FakeStripe, ledger: Ledger) -> None:
    import stripe

    first = issued()
    done = push(fake, ledger, first)
    invoice_id = done.refs["invoice_id"]
    client = fake.stripe_client(TEST_KEY)
    line = {"type": "custom_line_item", "description": "x", "quantity": 1}
    with pytest.raises(stripe.InvalidRequestError, match="amount remaining"):
        client.v1.credit_notes.create(
            params={"invoice": invoice_id, "lines": [{**line, "unit_amount": 20031}]}
        )
    with pytest.raises(stripe.InvalidRequestError, match="paid invoices only"):
        client.v1.credit_notes.create(
            params={
                "invoice": invoice_id,
                "lines": [{**line, "unit_amount": 100}],
                "credit_amount": 100,
            }
        )
    fake.mark_invoice(invoice_id, "paid")
    with pytest.raises(stripe.InvalidRequestError, match="only void open or uncollectible"):
        client.v1.invoices.void_invoice(invoice_id)
    with pytest.raises(stripe.InvalidRequestError, match="must equal the credit note total"):
        client.v1.credit_notes.create(
            params={"invoice": invoice_id, "lines": [{**line, "unit_amount": 100}]}
        )
    with pytest.raises(stripe.InvalidRequestError, match="left to credit"):
        client.v1.credit_notes.create(
            params={
                "invoice": invoice_id,
                "lines": [{**line, "unit_amount": 20031}],
                "credit_amount": 20031,
            }
        )
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter"):
        client.v1.credit_notes.create(
            params={"invoice": invoice_id, "amount": 1, "credit_amount": 1, "bogus": "x"}  # type: ignore[typeddict-unknown-key]
        )
    assert fake.state()["credit_notes"] == []


def test_the_period_listing_finds_every_revision(fake: FakeStripe, ledger: Ledger) -> None:
    first = issued()
    push(fake, ledger, first)
    push(fake, ledger, amended(first))
    adapter = StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=fake.url))
    start = len(fake.requests)
    listed = adapter.remote_period_invoices("2026-01")
    assert fake.writes_since(start) == []
    assert sorted((r.kiki_number, r.kiki_revision, r.state.value) for r in listed) == [
        (first.number, 0, "void"),
        (first.number, 1, "open"),
    ]
    assert adapter.remote_period_invoices("2026-02") == []
    adapter.close()
