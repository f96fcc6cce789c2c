"""Corrections through the real hub and ZuoraAdapter against the SOAP fake (WSDL 78.0).

The fake is as strict as Zuora: an invoice is unposted only without payments or adjustments and
canceled only as a Draft; an invoice item takes one adjustment and a credit never takes the
balance below zero; every envelope is checked against the WSDL.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from kiki_billing_adapters.zuora.wire import notes_revision

from kiki_billing.hub.ledger import DeliveryState
from kiki_billing.hub.revisions import as_revision
from kiki_billing.models import Invoice
from tests.adapters.zuora.conftest import MakeAdapter, Pusher, invoice
from tests.support.fake_zuora import FakeZuora, soap_operation

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


def amended(made: Invoice, factor: str) -> Invoice:
    lines = tuple(
        line.model_copy(update={"fee": (line.fee * Decimal(factor)).quantize(Decimal("0.01"))})
        for line in made.lines
    )
    total = sum(line.fee for line in lines)
    return as_revision(made.model_copy(update={"lines": lines, "total_fee": total}), 1)


def invoices_of(fake: FakeZuora, made: Invoice) -> list[dict[str, Any]]:
    state = fake.state()
    names = {
        s["Id"]
        for s in state["subscriptions"]
        if s["Name"].startswith(made.number + "-")
        and notes_revision(s["Notes"], made.number) == made.revision
    }
    return [inv for inv in state["invoices"] if {i["SubscriptionId"] for i in inv["items"]} & names]


def one(fake: FakeZuora, made: Invoice) -> dict[str, Any]:
    (found,) = invoices_of(fake, made)
    return found


def operations(fake: FakeZuora) -> list[str | None]:
    return [soap_operation(r.body) for r in fake.requests]


def test_unpaid_invoice_is_unposted_canceled_then_reissued(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    [done] = pusher.push(adapter, first)
    assert done.ok, done.error
    second = amended(first, "0.5")
    [outcome] = pusher.push(adapter, second)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["corrected_r0"] == "void"
    old = one(fake, first)
    assert old["Status"] == "Canceled" and Decimal(str(old["Balance"])) == 0
    new = one(fake, second)
    assert Decimal(str(new["Amount"])) == second.total_fee
    assert fake.state()["adjustments"] == []
    assert operations(fake).count("update") >= 3  # activate, unpost, cancel


def test_paid_invoice_amended_down_sets_the_payment_against_the_revision(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    [done] = pusher.push(adapter, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    second = amended(first, "0.5")
    [outcome] = pusher.push(adapter, second)
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    old = one(fake, first)
    assert old["Status"] == "Posted" and Decimal(str(old["Balance"])) == 0  # nothing was due
    new = one(fake, second)
    # The 200.30 paid covers the 100.15 revision in full; the rest stays with the client.
    assert Decimal(str(new["Amount"])) == second.total_fee
    assert Decimal(str(new["Balance"])) == 0
    adjustments = fake.state()["adjustments"]
    assert {a["InvoiceId"] for a in adjustments} == {new["Id"]}
    assert sum(Decimal(str(a["Amount"])) for a in adjustments) == second.total_fee
    assert all(a["Type"] == "Credit" for a in adjustments)


def test_part_paid_invoice_amended_up(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    [done] = pusher.push(adapter, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    second = amended(first, "2")
    [outcome] = pusher.push(adapter, second)
    assert outcome.ok, outcome.error
    old, new = one(fake, first), one(fake, second)
    assert Decimal(str(old["Balance"])) == 0
    on_old = [a for a in fake.state()["adjustments"] if a["InvoiceId"] == old["Id"]]
    assert sum(Decimal(str(a["Amount"])) for a in on_old) == first.total_fee - Decimal("50.00")
    # The 50.00 paid is set against the revision, which owes the rest.
    assert Decimal(str(new["Balance"])) == second.total_fee - Decimal("50.00")


def test_a_lost_adjustment_answer_is_found_by_its_item(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    [done] = pusher.push(adapter, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    fake.inject_lost("create")
    [deferred] = pusher.push(adapter, amended(first, "0.5"), attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    [outcome] = pusher.push(adapter, amended(first, "0.5"), attempts=1)
    assert outcome.ok, outcome.error
    old = one(fake, first)
    on_old = [a for a in fake.state()["adjustments"] if a["InvoiceId"] == old["Id"]]
    # One adjustment per item, none twice, together what was due.
    assert len({a["SourceId"] for a in on_old}) == len(on_old)
    assert sum(Decimal(str(a["Amount"])) for a in on_old) == first.total_fee - Decimal("50.00")


def test_a_cancel_interrupted_after_the_unpost_is_finished_by_the_rerun(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    pusher.push(adapter, first)
    second = amended(first, "0.5")
    # The account is active already: the next update is the unpost, whose answer is lost.
    fake.inject_lost("update")
    [deferred] = pusher.push(adapter, second, attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    assert one(fake, first)["Status"] == "Draft"
    [outcome] = pusher.push(adapter, second, attempts=1)
    assert outcome.ok, outcome.error
    assert one(fake, first)["Status"] == "Canceled"
    assert len(invoices_of(fake, second)) == 1


def test_the_period_listing_finds_every_revision(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter, first = make_adapter(), invoice()
    pusher.push(adapter, first)
    pusher.push(adapter, amended(first, "0.5"))
    start = len(fake.requests)
    listed = adapter.remote_period_invoices("2026-01")
    assert fake.app.writes_since(start) == []
    assert sorted((r.kiki_number, r.kiki_revision, r.state.value) for r in listed) == [
        (first.number, 0, "void"),
        (first.number, 1, "open"),
    ]
    assert adapter.remote_period_invoices("2026-02") == []
