"""Corrections through the real hub and QuickBooksAdapter against the local QuickBooks fake.

The fake is as strict as QBO: a void names the invoice's current SyncToken and is refused once a
payment or credit is applied, every credit memo and payment is checked against Intuit's XSD, a
payment never applies more than an open balance.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksClientSettings

from kiki_billing.hub.ledger import DeliveryState
from kiki_billing.hub.revisions import as_revision
from kiki_billing.models import Invoice
from tests.adapters.quickbooks.test_hub import API, Made, Pusher
from tests.adapters.stripe.test_cassettes import saas
from tests.support.fake_quickbooks import FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

CLIENT = QuickBooksClientSettings()


@pytest.fixture
def push(tmp_path: Path) -> Pusher:
    return Pusher(tmp_path)


def amended(invoice: Invoice, factor: str = "0.5") -> Invoice:
    """Revision 1 with every line's fee scaled by ``factor`` (to the cent)."""
    lines = tuple(
        line.model_copy(update={"fee": (line.fee * Decimal(factor)).quantize(Decimal("0.01"))})
        for line in invoice.lines
    )
    total = sum(line.fee for line in lines)
    return as_revision(invoice.model_copy(update={"lines": lines, "total_fee": total}), 1)


def company(fake: FakeQuickBooks) -> dict[str, Any]:
    return fake.state()


def invoice_numbered(fake: FakeQuickBooks, number: str) -> dict[str, Any]:
    (found,) = [i for i in company(fake)["invoices"] if i["DocNumber"] == number]
    return found


def posts(fake: FakeQuickBooks, tail: str) -> list[Any]:
    return [r for r in fake.requests if r.method == "POST" and r.path == f"{API}{tail}"]


def test_unpaid_invoice_is_voided_then_reissued(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    assert done.ok, done.error
    second = amended(first)
    [outcome] = push(adapter, [second])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["corrected_r0"] == "void"
    number = first.number.removeprefix("KIKI-")
    old = invoice_numbered(fake, number)
    assert old["PrivateNote"].startswith("Voided") and Decimal(str(old["TotalAmt"])) == 0
    new = invoice_numbered(fake, f"{number}-R1")
    assert Decimal(str(new["TotalAmt"])) == second.total_fee
    [void] = [r for r in posts(fake, "/invoice") if "operation=void" in r.query]
    assert "requestid=" in void.query
    assert company(fake)["credit_memos"] == []


def test_paid_invoice_amended_down_gets_a_credit_memo(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    second = amended(first)
    [outcome] = push(adapter, [second])
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    [memo] = company(fake)["credit_memos"]
    number = first.number.removeprefix("KIKI-")
    assert memo["DocNumber"] == f"{number}-C0"
    assert Decimal(str(memo["TotalAmt"])) == first.total_fee
    # Nothing was due: nothing applied, the whole memo is the client's credit.
    assert Decimal(str(memo["RemainingCredit"])) == first.total_fee
    assert company(fake)["payments"] == []
    new = invoice_numbered(fake, f"{number}-R1")
    assert Decimal(str(new["TotalAmt"])) == second.total_fee > 0


def test_part_paid_invoice_credit_memo_is_applied_to_its_balance(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "100.00")
    second = amended(first, "1.5")  # amended up
    [outcome] = push(adapter, [second])
    assert outcome.ok, outcome.error
    [memo] = company(fake)["credit_memos"]
    [payment] = company(fake)["payments"]
    due = first.total_fee - Decimal("100.00")
    assert Decimal(str(payment["TotalAmt"])) == 0
    assert [Decimal(str(line["Amount"])) for line in payment["Line"]] == [due, due]
    assert Decimal(str(memo["RemainingCredit"])) == Decimal("100.00")
    old = invoice_numbered(fake, first.number.removeprefix("KIKI-"))
    assert Decimal(str(old["Balance"])) == 0


def test_a_lost_credit_memo_answer_is_found_by_its_number(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "100.00")
    fake.inject_error("POST", f"{API}/creditmemo", status=503, after=True, times=4)
    [deferred] = push(adapter, [amended(first)])
    assert deferred.state is DeliveryState.DEFERRED
    fake.advance_clock(2 * 86_400)  # requestids long forgotten
    [outcome] = push(make_adapter(), [amended(first)])
    assert outcome.ok, outcome.error
    assert len(company(fake)["credit_memos"]) == 1
    assert len(company(fake)["payments"]) == 1


def test_a_lost_application_answer_is_found_through_the_invoice(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "100.00")
    fake.inject_error("POST", f"{API}/payment", status=503, after=True, times=4)
    [deferred] = push(adapter, [amended(first)])
    assert deferred.state is DeliveryState.DEFERRED
    fake.advance_clock(2 * 86_400)
    [outcome] = push(make_adapter(), [amended(first)])
    assert outcome.ok, outcome.error
    assert len(company(fake)["payments"]) == 1


def test_the_fake_refuses_what_quickbooks_refuses(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    import json

    import quickbooks.exceptions  # type: ignore[import-untyped]

    adapter, first = make_adapter(), saas()
    [done] = push(adapter, [first])
    invoice_id = done.refs["invoice_id"]
    fake.mark_invoice(invoice_id, "partly_paid", "100.00")
    stale = json.dumps({"Id": invoice_id, "SyncToken": "0"})
    with pytest.raises(quickbooks.exceptions.QuickbooksException) as stale_error:
        adapter._call(lambda c: c.create_object("Invoice", stale, params={"operation": "void"}))
    assert "Stale Object Error" in str(stale_error.value.message)
    current = json.dumps({"Id": invoice_id, "SyncToken": "1"})
    with pytest.raises(quickbooks.exceptions.QuickbooksException) as paid_error:
        adapter._call(lambda c: c.create_object("Invoice", current, params={"operation": "void"}))
    assert "cannot be voided" in str(paid_error.value.detail)
    too_much = json.dumps(
        {
            "CustomerRef": {"value": done.refs["customer_id"]},
            "TotalAmt": 9999,
            "Line": [{"Amount": 9999, "LinkedTxn": [{"TxnId": invoice_id, "TxnType": "Invoice"}]}],
        }
    )
    with pytest.raises(quickbooks.exceptions.QuickbooksException) as over:
        adapter._call(lambda c: c.create_object("Payment", too_much))
    assert "more than the open balance" in str(over.value.detail)


def test_the_period_listing_finds_every_revision(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter, first = make_adapter(), saas()
    push(adapter, [first])
    push(adapter, [amended(first)])
    start = len(fake.requests)
    listed = adapter.remote_period_invoices(first.period)
    assert fake.writes_since(start) == []
    assert sorted((r.kiki_number, r.kiki_revision, r.state.value) for r in listed) == [
        (first.number, 0, "void"),
        (first.number, 1, "open"),
    ]
