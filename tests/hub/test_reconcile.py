"""Reconciliation through the in-memory billing system: each kind of drift is found, nothing is
written, and a clean ledger matches everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.reconcile import Check, Finding, Result, reconcile, summary
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.revisions import as_revision
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem

from .conftest import deliveries


def run(ledger: Ledger, system: MemoryBillingSystem, **kw: Any) -> list[Finding]:
    adapter = MemoryAdapter(system=system)
    hub = Hub(ledger, {"memory": adapter}, RetryPolicy(max_attempts=1))
    logger = structlog.get_logger("test")
    rows = _rows(ledger)
    found = reconcile(
        ledger,
        {"memory": adapter},
        lambda a, read: hub.runner.call(a, read, logger)[0],
        **kw,
    )
    assert _rows(ledger) == rows, "reconcile wrote to the ledger"
    return found


def _rows(ledger: Ledger) -> list[Any]:
    return [(r.id, r.state, r.attempts, r.updated_at) for r in ledger.deliveries()]


def drift(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.check.value, f.detail) for f in findings if f.result is Result.DRIFT]


def writes(system: MemoryBillingSystem) -> list[str]:
    reads = {"list_invoices", "list_period", "find_customer", "find_invoice", "find_line"}
    return [op for op, _ in system.calls if op not in reads and not op.startswith("find")]


def pushed(make_hub: Callable[..., Hub], *invoices: Any) -> list[Any]:
    outcomes = make_hub().push(deliveries(*invoices))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    return outcomes


def test_a_clean_ledger_matches_everywhere(make_hub, system, ledger: Ledger) -> None:
    pushed(make_hub, sample_invoice(number=1), sample_invoice(number=2, client_id="beta"))
    before = writes(system)
    findings = run(ledger, system)
    assert drift(findings) == []
    assert {f.check for f in findings} == {
        Check.EXISTS,
        Check.CURRENCY,
        Check.AMOUNT,
        Check.STATUS,
    }
    assert summary(findings)["drift"] == 0
    assert writes(system) == before  # reads only


def test_an_invoice_deleted_upstream_is_drift(make_hub, system, ledger: Ledger) -> None:
    [done] = pushed(make_hub, sample_invoice())
    system.mark_invoice(done.refs["invoice_id"], "deleted")
    assert drift(run(ledger, system)) == [("exists", "missing upstream (deleted there?)")]


def test_an_amount_edited_upstream_is_drift(make_hub, system, ledger: Ledger) -> None:
    [done] = pushed(make_hub, sample_invoice())
    system.invoices[done.refs["invoice_id"]]["lines"][1] += 1
    [(check, detail)] = drift(run(ledger, system))
    assert check == "amount" and "edited upstream" in detail
    [amount] = [f for f in run(ledger, system) if f.check is Check.AMOUNT]
    assert (amount.expected, amount.found) == ("200.30", "200.31")


def test_a_duplicate_created_upstream_is_drift(make_hub, system, ledger: Ledger) -> None:
    [done] = pushed(make_hub, sample_invoice())
    copy = system.duplicate_invoice(done.refs["invoice_id"])
    [(check, detail)] = drift(run(ledger, system))
    assert check == "exists" and "duplicate upstream" in detail and copy in detail


def test_a_paid_status_the_ledger_does_not_know_is_drift(make_hub, system, ledger: Ledger):
    [done] = pushed(make_hub, sample_invoice())
    system.mark_invoice(done.refs["invoice_id"], "paid")
    [status] = [f for f in run(ledger, system) if f.check is Check.STATUS]
    assert status.result is Result.DRIFT
    assert (status.expected, status.found) == ("open", "paid (paid)")
    assert status.detail == "paid upstream; the ledger does not know"


def test_a_payment_the_ledger_knows_is_no_drift(make_hub, system, ledger: Ledger) -> None:
    from kiki_billing.plugin import PaymentState

    [done] = pushed(make_hub, sample_invoice())
    system.mark_invoice(done.refs["invoice_id"], "paid")
    adapter = MemoryAdapter(system=system)
    hub = Hub(ledger, {"memory": adapter}, RetryPolicy(max_attempts=1))
    findings = reconcile(
        ledger,
        {"memory": adapter},
        lambda a, read: hub.runner.call(a, read, structlog.get_logger("t"))[0],
        known_state=lambda record, _: PaymentState.PAID,
    )
    assert drift(findings) == []


def test_an_object_the_ledger_never_recorded_is_an_orphan(
    make_hub, system, ledger: Ledger, tmp_path
) -> None:
    pushed(make_hub, sample_invoice())
    # A run whose ledger was lost pushed another client's invoice of the same period.
    other = Ledger(f"sqlite:///{tmp_path / 'lost.sqlite3'}")
    try:
        Hub(other, {"memory": MemoryAdapter(system=system)}, RetryPolicy(max_attempts=1)).push(
            deliveries(sample_invoice(number=7, client_id="gamma"))
        )
    finally:
        other.close()
    [(check, detail)] = drift(run(ledger, system))
    assert check == "orphan" and "no delivery of the ledger made it" in detail
    [orphan] = [f for f in run(ledger, system) if f.check is Check.ORPHAN]
    assert (orphan.invoice, orphan.revision) == ("KIKI-OaaS-202601-000007", 0)


def test_void_upstream_and_undelivered_ones_are_checked_too(make_hub, system, ledger: Ledger):
    from kiki_billing.testing.memory import Fault

    [done] = pushed(make_hub, sample_invoice())
    system.mark_invoice(done.refs["invoice_id"], "void")
    system.faults.append(Fault("invalid", operation="finalize"))
    failed = sample_invoice(number=2, client_id="beta")
    [outcome] = make_hub(RetryPolicy(max_attempts=1)).push(deliveries(failed))
    assert not outcome.ok
    found = drift(run(ledger, system))
    assert ("status", "void upstream; the ledger has it standing") in found
    assert any(
        check == "exists" and "failed in the ledger, yet upstream holds" in detail
        for check, detail in found
    )


def test_a_corrected_revision_matches_once_its_successor_is_delivered(
    make_hub, system, ledger: Ledger
) -> None:
    first = sample_invoice()
    [done] = pushed(make_hub, first)
    system.mark_invoice(done.refs["invoice_id"], "paid")
    kept = first.lines[:1]
    second = as_revision(first.model_copy(update={"lines": kept, "total_fee": kept[0].fee}), 1)
    pushed(make_hub, second)
    findings = run(ledger, system)
    assert drift(findings) == []
    [old] = [f for f in findings if f.check is Check.STATUS and f.revision == 0]
    assert old.expected == "paid (credit by revision 1)"
    assert run(ledger, system, period="2026-02") == []
