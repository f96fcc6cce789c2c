"""Payment states back from the providers: verified webhook events and ``sync-status``.

Both end in :func:`~kiki_billing.hub.ledger.payments.apply_payment_state`: a state only moves
forward, and a webhook event id is applied once. Where an event names ids only (QuickBooks,
Xero) the invoice is read back through the adapter's read-only
:meth:`~kiki_billing.plugin.BillingAdapter.remote_invoices`, within the account's rate limit
and the hub's retry policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from kiki_billing.hub.ledger import DeliveryRecord, DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import (
    PaymentChange,
    apply_payment_state,
    deliveries_with_ref,
    event_applied,
)
from kiki_billing.plugin import BillingAdapter, PaymentState, RemoteInvoice, WebhookEvent

T = TypeVar("T")
log = structlog.get_logger("kiki_billing.payments")

Call = Callable[[BillingAdapter[Any, Any], Callable[[], T]], T]
"""Runs one provider read for an adapter (through its limiter and the retry policy)."""


def direct_call(adapter: BillingAdapter[Any, Any], read: Callable[[], T]) -> T:
    """Run a read as is, classifying a failure (tests and tools without a hub)."""
    try:
        return read()
    except Exception as exc:
        raise adapter.classify_error(exc) from None


@dataclass(frozen=True)
class EventOutcome:
    """What the hub did with one webhook event.

    Attributes:
        outcome: ``applied``, ``unchanged`` (it would have moved the state backwards),
            ``replayed`` (seen before), ``ignored`` (not about an invoice, or another account),
            ``unknown_invoice`` (no delivery of ours holds it) or ``gone`` (the provider no
            longer has the invoice).
    """

    event_id: str
    event_type: str
    outcome: str
    invoice: str | None = None
    state: PaymentState | None = None
    reason: str | None = None


def find_delivery_for(
    ledger: Ledger, adapter: BillingAdapter[Any, Any], event: WebhookEvent
) -> DeliveryRecord | None:
    """The delivery an event is about: by our number and revision, else by the provider's ids."""
    if event.kiki_number and event.kiki_revision is not None:
        found = ledger.find_delivery(
            event.kiki_number, event.kiki_revision, adapter.name, adapter.account
        )
        if found is not None:
            return found
    for name, value in sorted(event.refs.items(), key=lambda item: item[0] != "invoice_id"):
        matches = deliveries_with_ref(ledger, adapter.name, name, value, adapter.account)
        if matches:
            return max(matches, key=lambda record: record.revision)
    return None


def pick_remote(found: Sequence[RemoteInvoice], refs: Mapping[str, str]) -> RemoteInvoice | None:
    """The provider object a delivery recorded (by its invoice id), else the only one found."""
    recorded = refs.get("invoice_id")
    if recorded:
        for remote in found:
            if remote.refs.get("invoice_id") == recorded:
                return remote
    return found[0] if len(found) == 1 else None


def process_event(
    ledger: Ledger,
    adapter: BillingAdapter[Any, Any],
    event: WebhookEvent,
    call: Call[Any] = direct_call,
) -> EventOutcome:
    """Apply one verified event to the ledger.

    Raises:
        DeliveryError: Reading the invoice back failed (the caller answers so that the
            provider sends the event again).
    """
    base = functools.partial(EventOutcome, event.event_id, event.event_type)
    if not event.refs and not event.kiki_number:
        return base(outcome="ignored", reason="not about an invoice")
    if event.account is not None and event.account != adapter.account:
        return base(outcome="ignored", reason="another account")
    delivery = find_delivery_for(ledger, adapter, event)
    if delivery is None:
        return base(outcome="unknown_invoice", reason="no delivery holds it")
    invoice = delivery.invoice_number
    if event_applied(ledger, adapter.name, adapter.account, event.event_id):
        return base(outcome="replayed", invoice=invoice)
    state, paid = event.state, event.amount_paid
    if state is None:
        document = ledger.load_invoice(delivery.invoice_number, delivery.revision)
        found = call(adapter, functools.partial(adapter.remote_invoices, document, delivery.refs))
        remote = pick_remote(found, delivery.refs)
        if remote is None:
            return base(outcome="gone", invoice=invoice, reason="not upstream")
        state, paid = remote.state, remote.amount_paid
    change = apply_payment_state(
        ledger,
        delivery.id,
        state,
        amount_paid=paid,
        event_id=event.event_id,
        source="webhook",
        occurred_at=event.occurred_at,
        event=(adapter.name, adapter.account, event.event_type),
    )
    return base(outcome=change.outcome, invoice=invoice, state=change.after)


# sync-status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncOutcome:
    """What ``sync-status`` found for one delivery."""

    delivery: DeliveryRecord
    before: PaymentState | None
    after: PaymentState | None
    outcome: str
    """``applied``, ``unchanged``, ``gone`` (not upstream), ``duplicate`` (more than one
    upstream; the recorded one is used), ``skipped`` (another account), ``error``."""
    note: str | None = None


def sync_delivery(
    ledger: Ledger,
    adapter: BillingAdapter[Any, Any],
    delivery: DeliveryRecord,
    call: Call[Any] = direct_call,
    *,
    now: datetime | None = None,
) -> SyncOutcome:
    """Read one delivered invoice back and record its payment state (never backwards).

    Raises:
        DeliveryError: The provider could not be read.
    """
    from kiki_billing.hub.ledger.payments import payment_records

    recorded = payment_records(ledger, [delivery.id]).get(delivery.id)
    before = recorded.state if recorded else None
    if delivery.state is not DeliveryState.DELIVERED:
        return SyncOutcome(delivery, before, before, "skipped", "not delivered")
    if delivery.account != adapter.account:
        return SyncOutcome(
            delivery, before, before, "skipped", f"the settings reach account {adapter.account}"
        )
    document = ledger.load_invoice(delivery.invoice_number, delivery.revision)
    found = call(adapter, functools.partial(adapter.remote_invoices, document, delivery.refs))
    remote = pick_remote(found, delivery.refs)
    if remote is None:
        missing = "not found upstream" if not found else f"{len(found)} copies upstream"
        return SyncOutcome(delivery, before, before, "gone" if not found else "duplicate", missing)
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    change: PaymentChange = apply_payment_state(
        ledger,
        delivery.id,
        remote.state,
        amount_paid=remote.amount_paid,
        event_id=f"sync:{stamp}",
        source="sync",
    )
    duplicate = len(found) > 1
    note = f"{len(found)} copies upstream" if duplicate else None
    outcome = "duplicate" if duplicate else change.outcome
    log.info(
        "payment.synced",
        invoice=delivery.invoice_number,
        target=delivery.target,
        state=remote.state.value,
        outcome=change.outcome,
    )
    return SyncOutcome(delivery, before, change.after, outcome, note)
