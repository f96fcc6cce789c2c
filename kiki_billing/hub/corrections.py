"""Corrections: what happens upstream to a revision that a newer one supersedes.

A delivery of revision R (R >= 1) first corrects every older revision of the same number that
was delivered, or attempted, to the same target account: each is read back from the provider
(:meth:`~kiki_billing.plugin.BillingAdapter.remote_invoices`) and then

- voided when nothing was paid of it (a Stripe void, a QuickBooks void, Xero ``VOIDED``, a
  Zuora cancel; a draft is deleted),
- credited in full when something was paid (a credit note set against what is still due; what
  was paid stays with the customer as credit), or
- left alone when the provider holds nothing of it or holds it void already.

The decision is recorded as a step of the new revision's delivery (``correct-r<old>``), and the
adapter's void or credit steps follow it as ordinary steps (``r<old>-<name>``): each with its
own deterministic key, its natural-key look-up and its row in the ledger. Until they are all
done the decision is taken again from the provider's view on every run, so a kill at any
instant, a payment that lands meanwhile, or a re-run gives exactly one void or one credit;
the new revision's own steps run only once the corrections are done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

from kiki_billing.models import Invoice
from kiki_billing.plugin import (
    Correction,
    CorrectionAction,
    PaymentState,
    RemoteInvoice,
    Step,
    TerminalError,
)

UNPAID_STATES = frozenset(
    {PaymentState.DRAFT, PaymentState.OPEN, PaymentState.PAYMENT_FAILED, PaymentState.UNCOLLECTIBLE}
)
_REMOTE = "remote."


def assessment_step(revision: int) -> str:
    """The name of the step that records how revision ``revision`` is corrected."""
    return f"correct-r{revision}"


def step_prefix(revision: int) -> str:
    """What the hub puts in front of the names of a correction's steps."""
    return f"r{revision}-"


def prefixed(steps: Sequence[Step[Any]], revision: int) -> list[Step[Any]]:
    """The adapter's correction steps, named (and ``new_under`` linked) within the delivery."""
    prefix = step_prefix(revision)
    return [
        replace(
            step,
            name=prefix + step.name,
            new_under=prefix + step.new_under if step.new_under else None,
        )
        for step in steps
    ]


def decide(
    found: Sequence[RemoteInvoice],
    invoice: Invoice,
    replacement: Invoice,
    refs: Mapping[str, str],
    *,
    target: str,
    earlier: Correction | None = None,
) -> Correction:
    """What to do with superseded revision ``invoice``, from what the provider holds of it.

    Args:
        found: :meth:`~kiki_billing.plugin.BillingAdapter.remote_invoices` of it.
        invoice: The superseded revision.
        replacement: The revision being pushed.
        refs: The ids recorded for the superseded revision's delivery.
        target: The target's name (for messages).
        earlier: What an earlier run decided, when its steps are not all done yet: a void or
            credit it may have made already is never turned into the other.

    Raises:
        TerminalError: The provider holds the revision more than once (resolve by hand).
    """
    if len(found) > 1:
        ids = ", ".join(sorted(_main_id(r) for r in found))
        raise TerminalError(
            f"{target} holds revision {invoice.revision} of {invoice.number} {len(found)} "
            f"times ({ids}); resolve the duplicate in {target} (`kiki-billing reconcile` "
            "lists it), then run `kiki-billing retry`",
            code="duplicate_upstream",
        )
    prior = earlier.action if earlier is not None else None
    if not found:
        # Gone upstream: a draft an earlier run deleted (its look-up confirms), deleted by
        # someone in the provider, or never created.
        if earlier is not None and prior is not CorrectionAction.NONE:
            return earlier
        return _correction(CorrectionAction.NONE, invoice, replacement, None, refs)
    remote = found[0]
    merged = {**refs, **remote.refs}
    if remote.state is PaymentState.VOID:
        action = CorrectionAction.VOID if prior is CorrectionAction.VOID else CorrectionAction.NONE
        return _correction(action, invoice, replacement, remote, merged)
    if (
        prior is CorrectionAction.CREDIT
        or remote.amount_paid > 0
        or remote.state in (PaymentState.PAID, PaymentState.PARTLY_PAID)
    ):
        return _correction(CorrectionAction.CREDIT, invoice, replacement, remote, merged)
    if remote.state in UNPAID_STATES:
        return _correction(CorrectionAction.VOID, invoice, replacement, remote, merged)
    raise TerminalError(  # pragma: no cover - every PaymentState is handled above
        f"{target}: revision {invoice.revision} of {invoice.number} is {remote.state.value}"
    )


def _correction(
    action: CorrectionAction,
    invoice: Invoice,
    replacement: Invoice,
    remote: RemoteInvoice | None,
    refs: Mapping[str, str],
) -> Correction:
    return Correction(action, invoice, replacement, remote, dict(refs))


def _main_id(remote: RemoteInvoice) -> str:
    return remote.refs.get("invoice_id") or next(iter(remote.refs.values()), "?")


def recorded_refs(correction: Correction) -> dict[str, str]:
    """The decision as the ledger keeps it (the assessment step's refs)."""
    refs = {"action": correction.action.value}
    remote = correction.remote
    if remote is not None:
        refs.update(
            {
                "state": remote.state.value,
                "total": format(remote.total, "f"),
                "paid": format(remote.amount_paid, "f"),
                "currency": remote.currency,
            }
        )
        if remote.number:
            refs["number"] = remote.number
        refs.update({_REMOTE + key: value for key, value in remote.refs.items()})
    return refs


def from_recorded(
    recorded: Mapping[str, str],
    invoice: Invoice,
    replacement: Invoice,
    refs: Mapping[str, str],
) -> Correction | None:
    """A decision back from the assessment step's refs (``None`` if they are not one)."""
    try:
        action = CorrectionAction(recorded.get("action", ""))
    except ValueError:
        return None
    remote = None
    if "state" in recorded:
        remote_refs = {k[len(_REMOTE) :]: v for k, v in recorded.items() if k.startswith(_REMOTE)}
        remote = RemoteInvoice(
            refs=remote_refs,
            kiki_number=invoice.number,
            kiki_revision=invoice.revision,
            number=recorded.get("number"),
            currency=recorded.get("currency", invoice.currency),
            total=Decimal(recorded.get("total", "0")),
            amount_paid=Decimal(recorded.get("paid", "0")),
            state=PaymentState(recorded["state"]),
        )
    merged = {**refs, **(remote.refs if remote is not None else {})}
    return Correction(action, invoice, replacement, remote, merged)
