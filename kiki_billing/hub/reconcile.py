"""Reconciliation: what each billing system holds against what the ledger says was delivered.

For every delivery in the ledger (a revision of an invoice to a target account) the provider is
read back (:meth:`~kiki_billing.plugin.BillingAdapter.remote_invoices`, reads only) and checked:

- **exists**: a delivered revision exists upstream exactly once (a superseded one at most once);
  an undelivered one not at all; the object found is the one the ledger recorded;
- **amount** and **currency**: its total and currency equal the invoice's, to the minor unit;
- **status**: open, paid or void as the ledger knows it: a superseded revision voided or
  credited as its successor's delivery recorded, the current one as its delivery (or a payment
  sync) recorded, open otherwise;
- **orphan**: objects the provider holds for the period that carry our numbers but that no
  delivery of the ledger made (made outside kiki-billing, or by a run whose ledger was lost)
  (:meth:`~kiki_billing.plugin.BillingAdapter.remote_period_invoices`).

Nothing is written anywhere: no ledger row, no provider object.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import structlog

from kiki_billing.hub.corrections import assessment_step
from kiki_billing.hub.ledger import DeliveryRecord, DeliveryState, Ledger
from kiki_billing.models import Invoice
from kiki_billing.plugin import (
    BillingAdapter,
    CorrectionAction,
    DeliveryError,
    PaymentState,
    RemoteInvoice,
)

log = structlog.get_logger("kiki_billing.reconcile")

Reader = Callable[[BillingAdapter[Any, Any], Callable[[], Any]], Any]
"""Runs one read of an adapter (through its account's limiter and the retry policy)."""


class Check(StrEnum):
    """What a finding checked."""

    EXISTS = "exists"
    AMOUNT = "amount"
    CURRENCY = "currency"
    STATUS = "status"
    ORPHAN = "orphan"
    READ = "read"


class Result(StrEnum):
    """How a check came out."""

    MATCH = "match"
    DRIFT = "drift"
    SKIPPED = "skipped"
    """Not checkable here (another account configured now; the adapter cannot read back)."""


@dataclass(frozen=True)
class Finding:
    """One check of one delivery (or one orphan) at one target account."""

    period: str
    invoice: str
    revision: int | None
    target: str
    account: str
    check: Check
    result: Result
    expected: str = ""
    found: str = ""
    detail: str = ""
    refs: Mapping[str, str] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        """Whether this finding is a difference between the ledger and the provider."""
        return self.result is Result.DRIFT

    def as_json(self) -> dict[str, Any]:
        """The finding as JSON data."""
        return {
            "period": self.period,
            "invoice": self.invoice,
            "revision": self.revision,
            "target": self.target,
            "account": self.account,
            "check": self.check.value,
            "result": self.result.value,
            "expected": self.expected,
            "found": self.found,
            "detail": self.detail,
            "refs": dict(self.refs),
        }


_GROUPS = {
    PaymentState.DRAFT: "draft",
    PaymentState.OPEN: "open",
    PaymentState.PAYMENT_FAILED: "open",
    PaymentState.PARTLY_PAID: "paid",
    PaymentState.PAID: "paid",
    PaymentState.VOID: "void",
    PaymentState.UNCOLLECTIBLE: "void",
}
"""Status as reconcile compares it: draft, open, paid (in part or whole) or void."""


def status_group(state: PaymentState) -> str:
    """``draft``, ``open``, ``paid`` or ``void``."""
    return _GROUPS[state]


def reconcile(
    ledger: Ledger,
    adapters: Mapping[str, BillingAdapter[Any, Any]],
    read: Reader,
    *,
    period: str | None = None,
    target: str | None = None,
    known_state: Callable[[DeliveryRecord, BillingAdapter[Any, Any]], PaymentState | None]
    | None = None,
) -> list[Finding]:
    """Check every delivery of the ledger (filtered) and look for orphans (read-only).

    Args:
        ledger: The ledger (only read).
        adapters: Configured adapters by target name (every target of the deliveries checked).
        read: Runs one read through the account's limiter and the retry policy.
        period: Only this period (``YYYY-MM``).
        target: Only this target.
        known_state: The payment state the ledger knows for a delivery beyond what its steps
            recorded (a payment sync), if any.

    Returns:
        The findings, in period, invoice, revision and target order.
    """
    records = [r for r in ledger.deliveries(period=period, target=target) if r.target in adapters]
    latest = ledger.latest_revisions(r.invoice_number for r in records)
    findings: list[Finding] = []
    invoices: dict[tuple[str, int], Invoice] = {}
    for record in records:
        adapter = adapters[record.target]
        key = (record.invoice_number, record.revision)
        if key not in invoices:
            invoices[key] = ledger.load_invoice(*key)
        newest = latest.get(record.invoice_number, record.revision)
        findings.extend(
            _check_delivery(ledger, adapter, read, record, invoices[key], newest, known_state)
        )
    periods = sorted({r.period for r in records} | ({period} if period else set()))
    targets = {r.target for r in records}
    if target is not None and target in adapters:
        targets.add(target)
    for name in sorted(targets):
        for month in periods:
            findings.extend(_orphans(ledger, adapters[name], read, name, month))
    return findings


def _finding(record: DeliveryRecord, check: Check, result: Result, **kw: Any) -> Finding:
    return Finding(
        record.period,
        record.invoice_number,
        record.revision,
        record.target,
        record.account,
        check,
        result,
        **kw,
    )


def _check_delivery(
    ledger: Ledger,
    adapter: BillingAdapter[Any, Any],
    read: Reader,
    record: DeliveryRecord,
    invoice: Invoice,
    newest: int,
    known_state: Callable[[DeliveryRecord, BillingAdapter[Any, Any]], PaymentState | None] | None,
) -> list[Finding]:
    if adapter.account != record.account:
        return [
            _finding(
                record,
                Check.READ,
                Result.SKIPPED,
                detail=f"delivered to account {record.account}; {adapter.account} is configured",
            )
        ]
    refs = ledger.known_refs(record)
    try:
        found: list[RemoteInvoice] = read(
            adapter, functools.partial(adapter.remote_invoices, invoice, refs)
        )
    except NotImplementedError:
        return [_finding(record, Check.READ, Result.SKIPPED, detail="cannot read invoices back")]
    except DeliveryError as exc:
        error = exc.scrubbed(adapter.secrets())
        return [_finding(record, Check.READ, Result.DRIFT, detail=f"could not read: {error}")]
    superseded = record.revision < newest
    delivered = record.state is DeliveryState.DELIVERED
    ids = ", ".join(sorted(_object_id(r) for r in found)) or "nothing"
    findings: list[Finding] = []
    if not delivered:
        result = Result.MATCH if not found else Result.DRIFT
        detail = (
            f"{record.state.value} in the ledger, nothing upstream"
            if not found
            else f"{record.state.value} in the ledger, yet upstream holds {ids}"
        )
        return [
            _finding(
                record, Check.EXISTS, result, expected="0", found=str(len(found)), detail=detail
            )
        ]
    expected_count = "0 or 1" if superseded else "1"
    if len(found) > 1:
        findings.append(
            _finding(
                record,
                Check.EXISTS,
                Result.DRIFT,
                expected=expected_count,
                found=str(len(found)),
                detail=f"duplicate upstream: {ids}",
            )
        )
        return findings
    if not found:
        if superseded:
            correction = _recorded_correction(ledger, record, newest)
            detail = f"gone upstream ({correction or 'not corrected yet'})"
            return [
                _finding(
                    record,
                    Check.EXISTS,
                    Result.MATCH,
                    expected=expected_count,
                    found="0",
                    detail=detail,
                )
            ]
        return [
            _finding(
                record,
                Check.EXISTS,
                Result.DRIFT,
                expected="1",
                found="0",
                detail="missing upstream (deleted there?)",
            )
        ]
    remote = found[0]
    recorded_id = refs.get("invoice_id")
    held_id = remote.refs.get("invoice_id")
    if recorded_id and held_id and recorded_id != held_id:
        findings.append(
            _finding(
                record,
                Check.EXISTS,
                Result.DRIFT,
                expected=recorded_id,
                found=held_id,
                detail="upstream holds another object than the one recorded",
                refs=remote.refs,
            )
        )
    else:
        findings.append(
            _finding(
                record,
                Check.EXISTS,
                Result.MATCH,
                expected=expected_count,
                found="1",
                detail=_object_id(remote),
                refs=remote.refs,
            )
        )
    if remote.currency:
        ok = remote.currency.upper() == invoice.currency.upper()
        findings.append(
            _finding(
                record,
                Check.CURRENCY,
                Result.MATCH if ok else Result.DRIFT,
                expected=invoice.currency,
                found=remote.currency,
            )
        )
    if remote.state is not PaymentState.VOID and remote.total:
        ok = _same_money(remote.total, invoice.total_fee, invoice.currency)
        findings.append(
            _finding(
                record,
                Check.AMOUNT,
                Result.MATCH if ok else Result.DRIFT,
                expected=format(invoice.total_fee, "f"),
                found=format(remote.total, "f"),
                detail="" if ok else "total edited upstream?",
            )
        )
    findings.append(_status(ledger, adapter, record, remote, newest, known_state))
    return findings


def _status(
    ledger: Ledger,
    adapter: BillingAdapter[Any, Any],
    record: DeliveryRecord,
    remote: RemoteInvoice,
    newest: int,
    known_state: Callable[[DeliveryRecord, BillingAdapter[Any, Any]], PaymentState | None] | None,
) -> Finding:
    held = status_group(remote.state)
    found = f"{held} ({remote.state.value})"
    if record.revision < newest:
        correction = _recorded_correction(ledger, record, newest)
        if correction is None:
            return _finding(
                record,
                Check.STATUS,
                Result.DRIFT,
                expected="void or credited",
                found=found,
                detail=f"superseded by revision {newest}, whose delivery has not corrected it",
            )
        expected = "void" if correction == CorrectionAction.VOID.value else "paid"
        if correction == CorrectionAction.NONE.value:
            expected = held if held == "void" else "void"
        ok = held == expected
        return _finding(
            record,
            Check.STATUS,
            Result.MATCH if ok else Result.DRIFT,
            expected=f"{expected} ({correction} by revision {newest})",
            found=found,
            detail="" if ok else "changed upstream after it was corrected",
        )
    state = (known_state(record, adapter) if known_state else None) or (
        adapter.recorded_payment_state(ledger.known_refs(record))
    )
    expected = status_group(state) if state is not None else "open"
    ok = held == expected
    detail = ""
    if not ok:
        detail = {
            "paid": "paid upstream; the ledger does not know",
            "void": "void upstream; the ledger has it standing",
            "open": "open upstream; the ledger has it " + expected,
            "draft": "a draft upstream; the ledger has it issued",
        }[held]
    return _finding(
        record,
        Check.STATUS,
        Result.MATCH if ok else Result.DRIFT,
        expected=expected,
        found=found,
        detail=detail,
    )


def _recorded_correction(ledger: Ledger, record: DeliveryRecord, newest: int) -> str | None:
    """What the newest revision's delivery to this target recorded for this revision."""
    successor = ledger.find_delivery(record.invoice_number, newest, record.target, record.account)
    if successor is None:
        return None
    step = ledger.steps(successor.id).get(assessment_step(record.revision))
    if step is None or step.state is not DeliveryState.DELIVERED:
        return None
    return step.refs.get("action")


def _orphans(
    ledger: Ledger,
    adapter: BillingAdapter[Any, Any],
    read: Reader,
    target: str,
    period: str,
) -> list[Finding]:
    account = adapter.account
    try:
        listed: list[RemoteInvoice] = read(
            adapter, functools.partial(adapter.remote_period_invoices, period)
        )
    except NotImplementedError:
        return [
            Finding(
                period,
                "",
                None,
                target,
                account,
                Check.ORPHAN,
                Result.SKIPPED,
                detail="the adapter cannot list a period's invoices",
            )
        ]
    except DeliveryError as exc:
        error = exc.scrubbed(adapter.secrets())
        return [
            Finding(
                period, "", None, target, account, Check.ORPHAN, Result.DRIFT, detail=str(error)
            )
        ]
    known = {
        (r.invoice_number, r.revision)
        for r in ledger.deliveries(period=period, target=target)
        if r.account == account
    }
    findings = []
    for remote in listed:
        if remote.kiki_number is None or (remote.kiki_number, remote.kiki_revision or 0) in known:
            continue
        harmless = remote.state is PaymentState.VOID
        findings.append(
            Finding(
                period,
                remote.kiki_number,
                remote.kiki_revision,
                target,
                account,
                Check.ORPHAN,
                Result.MATCH if harmless else Result.DRIFT,
                expected="no object",
                found=f"{_object_id(remote)} {status_group(remote.state)}",
                detail=(
                    "void, not in the ledger"
                    if harmless
                    else "carries our number but no delivery of the ledger made it"
                ),
                refs=remote.refs,
            )
        )
    return findings


def _object_id(remote: RemoteInvoice) -> str:
    for key in ("invoice_id", "path"):
        if remote.refs.get(key):
            return remote.refs[key]
    return remote.number or "?"


def _same_money(held: Decimal, expected: Decimal, currency: str) -> bool:
    # NOTE: compared exactly: both are decimals at the currency's minor unit (or finer).
    return held == expected


def drift_count(findings: Iterable[Finding]) -> int:
    """How many findings are drift."""
    return sum(1 for f in findings if f.drift)


def summary(findings: Sequence[Finding]) -> dict[str, int]:
    """Counts of matches, drift and skipped checks."""
    return {
        "checks": len(findings),
        "match": sum(1 for f in findings if f.result is Result.MATCH),
        "drift": drift_count(findings),
        "skipped": sum(1 for f in findings if f.result is Result.SKIPPED),
    }
