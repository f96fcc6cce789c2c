"""Corrections through the real hub: a superseded revision is voided or credited exactly once.

The in-memory billing system refuses what providers refuse (a void of a paid invoice, a credit
over the invoice's total, a credit note number used twice) and scripts lost answers, so every
path of :mod:`kiki_billing.hub.corrections` is exact here; the adapters' own tests run the same
paths through each provider's fake.
"""

from __future__ import annotations

import time
from decimal import Decimal

from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.revisions import as_revision
from kiki_billing.models import Invoice
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import Fault, MemoryBillingSystem

from .conftest import deliveries

ONE_TRY = RetryPolicy(max_attempts=1)


def issued() -> Invoice:
    return sample_invoice(lines=2)  # 100.10 + 100.20 = 200.30 USD


def revised(invoice: Invoice, revision: int = 1, lines: int = 1) -> Invoice:
    """The same number with other content (one line less by default), as the next revision."""
    kept = invoice.lines[:lines]
    changed = invoice.model_copy(update={"lines": kept, "total_fee": sum(li.fee for li in kept)})
    return as_revision(changed, revision)


def upstream(system: MemoryBillingSystem, invoice: Invoice) -> list[dict]:
    return [
        inv
        for inv in system.invoices.values()
        if inv["number"] == invoice.number and inv["revision"] == invoice.revision
    ]


def only(system: MemoryBillingSystem, invoice: Invoice) -> dict:
    (found,) = upstream(system, invoice)
    return found


def ops(system: MemoryBillingSystem) -> list[str]:
    return [op for op, _ in system.calls]


def test_unpaid_revision_is_voided_then_the_new_one_pushed(make_hub, system, ledger: Ledger):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    assert done.ok
    second = revised(first)
    (outcome,) = make_hub().push(deliveries(second))
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["corrected_r0"] == "void"
    assert only(system, first)["status"] == "void"
    new = only(system, second)
    assert new["status"] == "open" and new["lines"] == {1: 10010}
    assert system.credit_notes == {}
    # The void came before anything of the new revision was written.
    calls = ops(system)
    assert calls.index("void") < calls.index("create_invoice", calls.index("void") - 1)
    record = ledger.find_delivery(second.number, 1, "memory", "default")
    assert record is not None
    steps = ledger.steps(record.id)
    assert steps["correct-r0"].refs["action"] == "void"
    assert steps["r0-void"].state is DeliveryState.DELIVERED
    assert steps["r0-void"].idempotency_key != steps["draft"].idempotency_key


def test_paid_revision_is_credited_in_full_and_the_payment_becomes_credit(
    make_hub, system, ledger: Ledger
):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    system.mark_invoice(done.refs["invoice_id"], "paid")
    second = revised(first)  # 100.10: amended down below what was paid
    (outcome,) = make_hub().push(deliveries(second))
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    (note,) = system.credit_notes.values()
    assert note["number"] == f"{first.number}-CN"
    assert note["amount"] == 20030 and note["applied"] == 0
    customer = system.customers[only(system, first)["customer"]]
    assert customer["balance"] == 20030  # what was paid is the client's credit
    assert only(system, first)["status"] == "paid"
    # Never a negative invoice: the revision bills its own total.
    assert sum(only(system, second)["lines"].values()) == 10010


def test_partly_paid_revision_credit_settles_what_is_due(make_hub, system):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    system.mark_invoice(done.refs["invoice_id"], "partly_paid", 5000)
    (outcome,) = make_hub().push(deliveries(revised(first, lines=2).model_copy()))
    # Same content as issued: nothing to correct, nothing to push.
    assert outcome.ok
    higher = as_revision(
        first.model_copy(update={"lines": first.lines, "total_fee": first.total_fee}), 1
    )
    (outcome,) = make_hub().push(deliveries(higher))
    assert outcome.ok, outcome.error
    (note,) = system.credit_notes.values()
    assert (note["amount"], note["applied"]) == (20030, 15030)
    assert only(system, first)["status"] == "paid"
    assert system.customers[only(system, first)["customer"]]["balance"] == 5000


def test_void_whose_answer_is_lost_is_found_on_the_rerun(make_hub, system, ledger: Ledger):
    first = issued()
    make_hub().push(deliveries(first))
    second = revised(first)
    system.faults.append(Fault("unavailable", after_write=True, operation="void"))
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.state is DeliveryState.DEFERRED
    assert only(system, first)["status"] == "void"
    assert upstream(system, second) == []
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.ok, outcome.error
    # The re-run read the state again (void now) and recorded the void as found, never resent.
    assert ops(system).count("void") == 1
    record = ledger.find_delivery(second.number, 1, "memory", "default")
    step = ledger.steps(record.id)["r0-void"]
    assert step.origin.value == "found" and step.attempts == 1
    assert len(upstream(system, second)) == 1


def test_credit_whose_answer_is_lost_is_found_on_the_rerun(make_hub, system):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    system.mark_invoice(done.refs["invoice_id"], "paid")
    second = revised(first)
    system.faults.append(Fault("reset", after_write=True, operation="credit"))
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.state is DeliveryState.DEFERRED
    assert len(system.credit_notes) == 1
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.ok, outcome.error
    assert len(system.credit_notes) == 1
    # Looked up before the first send, and again after the lost answer: found, never resent.
    assert ops(system).count("find_credit") == 2
    assert ops(system).count("credit") == 1
    assert len(upstream(system, second)) == 1


def test_a_done_correction_is_not_read_again_when_the_delivery_resumes(make_hub, system):
    first = issued()
    make_hub().push(deliveries(first))
    second = revised(first)
    system.faults.append(Fault("invalid", operation="create_invoice"))
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.state is DeliveryState.FAILED
    reads = ops(system).count("list_invoices")
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second), redrive_failed=True)
    assert outcome.ok, outcome.error
    assert ops(system).count("list_invoices") == reads
    assert ops(system).count("void") == 1


def test_paid_meanwhile_turns_the_refused_void_into_a_credit(make_hub, system):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    second = revised(first)
    # The void is refused (the client paid between our read and the void).
    system.faults.append(Fault("invalid", operation="void"))
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second))
    assert outcome.state is DeliveryState.FAILED
    assert "r0-void" in (outcome.error or "")
    system.mark_invoice(done.refs["invoice_id"], "paid")
    (outcome,) = make_hub(ONE_TRY).push(deliveries(second), redrive_failed=True)
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    assert len(system.credit_notes) == 1


def test_a_void_of_a_paid_invoice_is_refused_by_the_system(system):
    first = issued()
    system.customers["cus_1"] = {"client_id": "acme"}
    system.invoices["inv_9"] = {
        "number": first.number, "revision": 0, "currency": "USD", "customer": "cus_1",
        "lines": {1: 100}, "status": "paid", "paid": 100, "credited": 0, "applied": 0,
        "period": first.period,
    }  # fmt: skip
    import pytest

    from kiki_billing.testing.memory import MemoryProviderError

    with pytest.raises(MemoryProviderError, match="not voidable"):
        system.void_invoice("inv_9")
    with pytest.raises(MemoryProviderError, match="exceeds"):
        system.credit("inv_9", "X-CN", 101)


def test_a_duplicate_of_the_superseded_revision_stops_the_delivery(make_hub, system):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    system.duplicate_invoice(done.refs["invoice_id"])
    (outcome,) = make_hub(ONE_TRY).push(deliveries(revised(first)))
    assert outcome.state is DeliveryState.FAILED
    assert "2 times" in (outcome.error or "")
    assert all(inv["status"] == "open" for inv in upstream(system, first))
    assert upstream(system, revised(first)) == []


def test_a_revision_that_never_reached_the_provider_needs_no_correction(make_hub, system):
    first = issued()
    system.faults.append(Fault("invalid", operation="create_customer"))
    (outcome,) = make_hub(ONE_TRY).push(deliveries(first))
    assert outcome.state is DeliveryState.FAILED
    (outcome,) = make_hub(ONE_TRY).push(deliveries(revised(first)))
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "none"
    assert "void" not in ops(system)


def test_an_older_revision_still_in_flight_elsewhere_defers(make_hub, system, ledger: Ledger):
    first = issued()
    ledger.record_invoice(first)
    record = ledger.ensure_delivery(first, "memory", "default", {})
    # Held by a process on another host, its lease still running: never taken for dead.
    assert ledger.claim(record.id, "otherhost:1:1", [DeliveryState.PENDING], time.time()) == 1
    (outcome,) = make_hub(ONE_TRY).push(deliveries(revised(first)))
    assert outcome.state is DeliveryState.DEFERRED
    assert "being delivered to memory by another process" in (outcome.error or "")
    assert system.calls == []


def test_a_second_amendment_corrects_the_first_and_leaves_the_void_alone(make_hub, system):
    first = issued()
    make_hub().push(deliveries(first))
    second = revised(first, 1, lines=1)
    make_hub().push(deliveries(second))
    third = as_revision(
        first.model_copy(update={"lines": first.lines[1:], "total_fee": first.lines[1].fee}), 2
    )
    (outcome,) = make_hub().push(deliveries(third))
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "none"  # void already
    assert outcome.refs["corrected_r1"] == "void"
    assert ops(system).count("void") == 2
    assert only(system, first)["status"] == "void"
    assert only(system, second)["status"] == "void"
    assert only(system, third)["status"] == "open"
    assert sum(only(system, third)["lines"].values()) == 10020


def test_dry_run_shows_the_correction_before_the_revision(make_hub, system, ledger: Ledger):
    first = issued()
    make_hub().push(deliveries(first))
    calls = len(system.calls)
    preview = make_hub().preview(deliveries(revised(first))[0])
    names = [step.name for step in preview.steps]
    assert names[0] == "correct-r0"
    assert names[1:] == ["customer", "draft", "line-1", "finalize"]
    assert len(system.calls) == calls  # a dry run reads nothing upstream


def test_totals_reconcile_to_the_cent_across_revisions(make_hub, system):
    first = issued()
    (done,) = make_hub().push(deliveries(first))
    system.mark_invoice(done.refs["invoice_id"], "paid")
    second = revised(first)
    make_hub().push(deliveries(second))
    paid = only(system, first)["paid"]
    credited = sum(n["amount"] for n in system.credit_notes.values())
    billed_new = sum(only(system, second)["lines"].values())
    # Net billed to the client is the new revision's total; the rest is the client's credit.
    assert Decimal(paid - credited + billed_new).scaleb(-2) == second.total_fee
