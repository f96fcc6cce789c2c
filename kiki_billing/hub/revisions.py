"""Which revision a freshly computed invoice is: the one issued, or a new one (``--amend``).

An invoice number keeps every revision in the ledger. A recomputed invoice whose billed
content equals the newest revision recorded *is* that revision (a re-run resumes or finds it
delivered); one whose content differs is an amendment: ``push --amend`` issues it as the next
revision, whose delivery first voids or credits the revision it supersedes at every target that
revision reached (:mod:`kiki_billing.hub.corrections`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kiki_billing.errors import InputError
from kiki_billing.hub.ledger import Ledger
from kiki_billing.models import MAX_REVISION, Invoice, InvoiceLine

# What a revision changes besides its lines (shown in the diff, in this order).
_HEADER_FIELDS = (
    "client_name",
    "client_email",
    "currency",
    "issue_date",
    "due_date",
    "payment_terms_days",
    "period_start",
    "period_end",
)


@dataclass(frozen=True)
class LineChange:
    """One line added, removed or changed between two revisions (fees in major units)."""

    key: str
    description: str
    before: Decimal | None
    after: Decimal | None

    @property
    def kind(self) -> str:
        """``added``, ``removed`` or ``changed``."""
        if self.before is None:
            return "added"
        if self.after is None:
            return "removed"
        return "changed"


@dataclass(frozen=True)
class Amendment:
    """An issued revision and the revision that corrects it."""

    issued: Invoice
    revised: Invoice
    lines: tuple[LineChange, ...]
    header: tuple[tuple[str, str, str], ...]
    """``(field, before, after)`` of every other billed field that changed."""

    @property
    def difference(self) -> Decimal:
        """New total less old total (negative: amended down)."""
        return self.revised.total_fee - self.issued.total_fee


@dataclass(frozen=True)
class RevisionPlan:
    """The run's invoices sorted against the ledger."""

    current: list[Invoice]
    """New invoices (revision 0) and unchanged ones (as the newest revision recorded)."""
    amendments: list[Amendment]
    """Invoices whose billed content changed since their newest revision was recorded."""


def as_revision(invoice: Invoice, revision: int) -> Invoice:
    """``invoice`` under another revision (sealed again: the revision is billed content)."""
    if invoice.revision == revision:
        return invoice
    return invoice.model_copy(update={"revision": revision, "content_hash": ""}).sealed()


def plan_revisions(invoices: Sequence[Invoice], ledger: Ledger) -> RevisionPlan:
    """Sort freshly computed invoices against the revisions the ledger recorded (read-only).

    Raises:
        InputError: An invoice already has :data:`~kiki_billing.models.MAX_REVISION` revisions.
    """
    latest = ledger.latest_revisions(inv.number for inv in invoices)
    current: list[Invoice] = []
    amendments: list[Amendment] = []
    for invoice in invoices:
        newest = latest.get(invoice.number)
        if newest is None:
            current.append(invoice)
            continue
        candidate = as_revision(invoice, newest)
        if ledger.recorded_hash(invoice.number, newest) == candidate.billing_hash():
            current.append(candidate)
            continue
        if newest >= MAX_REVISION:
            raise InputError(
                f"invoice {invoice.number} has {newest} revisions already; a number takes at "
                f"most {MAX_REVISION}"
            )
        issued = ledger.load_invoice(invoice.number, newest)
        amendments.append(amendment(issued, as_revision(invoice, newest + 1)))
    return RevisionPlan(current, amendments)


def amendment(issued: Invoice, revised: Invoice) -> Amendment:
    """The line-by-line and header difference between two revisions."""
    before = {_line_key(line): line for line in issued.lines}
    after = {_line_key(line): line for line in revised.lines}
    changes = []
    for key in [*before, *(k for k in after if k not in before)]:
        old, new = before.get(key), after.get(key)
        if old is not None and new is not None and _same(old, new):
            continue
        shown = new if new is not None else old
        assert shown is not None
        changes.append(
            LineChange(
                key,
                shown.description,
                old.fee if old is not None else None,
                new.fee if new is not None else None,
            )
        )
    header = tuple(
        (name, _text(getattr(issued, name)), _text(getattr(revised, name)))
        for name in _HEADER_FIELDS
        if getattr(issued, name) != getattr(revised, name)
    )
    return Amendment(issued, revised, tuple(changes), header)


def _line_key(line: InvoiceLine) -> str:
    if line.campaign_id:
        return f"campaign {line.campaign_id}"
    if line.carried_from:
        return f"carried from {line.carried_from}"
    return line.kind.value


def _same(old: InvoiceLine, new: InvoiceLine) -> bool:
    ignore = {"line_no"}
    return old.model_dump(exclude=ignore) == new.model_dump(exclude=ignore)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
