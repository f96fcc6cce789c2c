"""What became of delivered invoices: payment states, webhook events, terms and account health.

Four tables of schema version 2, kept apart from the delivery tables they refer to:

- ``delivery_payments``: the payment state a provider reports for one delivery (``paid``,
  ``payment_failed``, ``void``, ...), what was paid, when, and the event (or sync) that set it.
  A state only moves forward (:func:`may_move`): a late or replayed event never undoes a
  payment.
- ``webhook_events``: every provider event applied, once per (target, account, event id), so a
  replayed webhook changes nothing.
- ``invoice_terms``: each invoice's due date and its client's time zone, recorded when it is
  pushed, so *overdue* is decided in the client's time zone without the contracts file.
- ``account_health``: per provider account, requests sent, 429s, seconds waited for a rate
  slot, and until when its circuit breaker is open, for the metrics of every process.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from kiki_billing.hub.ledger.schema import deliveries_table, metadata
from kiki_billing.plugin import PaymentState

if TYPE_CHECKING:
    from kiki_billing.hub.ledger.store import DeliveryRecord, Ledger

delivery_payments_table = sa.Table(
    "delivery_payments",
    metadata,
    sa.Column("delivery_id", sa.Integer, sa.ForeignKey("deliveries.id"), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("amount_paid", sa.String(32)),
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
"""The payment state of a delivery; ``event_id`` names the event or sync that set it."""

webhook_events_table = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("event_type", sa.String(128), nullable=False),
    sa.Column("delivery_id", sa.Integer, sa.ForeignKey("deliveries.id"), nullable=False),
    sa.Column("state", sa.String(16)),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)
"""Provider events applied to a delivery, each once (a replay finds its row)."""

invoice_terms_table = sa.Table(
    "invoice_terms",
    metadata,
    sa.Column("number", sa.String(64), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("due_date", sa.Date, nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)
"""An invoice's due date and its client's time zone (from the contract when pushed)."""

account_health_table = sa.Table(
    "account_health",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
    sa.Column("throttled", sa.BigInteger, nullable=False, default=0),
    sa.Column("waited_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("circuit_open_until", sa.Float),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
"""Counters of a provider account across runs; the circuit is open until an epoch time."""

DEFAULT_TIMEZONE = "UTC"
"""The time zone of an invoice pushed without terms (by an older kiki-billing)."""

# NOTE: a state moves only up this order. Paid and void are final (a paid invoice cannot be
# voided at Stripe, QuickBooks or Xero, and a voided one cannot be paid); an uncollectible
# invoice may still be paid or voided (Stripe: "marked_uncollectible" invoices stay payable).
_RANK = {
    PaymentState.DRAFT: 0,
    PaymentState.OPEN: 1,
    PaymentState.PAYMENT_FAILED: 2,
    PaymentState.PARTLY_PAID: 3,
    PaymentState.UNCOLLECTIBLE: 4,
    PaymentState.VOID: 5,
    PaymentState.PAID: 6,
}
FINAL_STATES = frozenset({PaymentState.PAID, PaymentState.VOID})
SETTLED_STATES = frozenset({PaymentState.PAID, PaymentState.VOID, PaymentState.UNCOLLECTIBLE})
"""States in which an invoice is no longer awaiting payment (never overdue)."""


def may_move(
    current: PaymentState | None,
    new: PaymentState,
    current_paid: Decimal | None = None,
    new_paid: Decimal | None = None,
) -> bool:
    """Whether a reported state may replace the recorded one (never backwards).

    A final state (paid, void) never changes; otherwise a state moves up the order draft, open,
    payment_failed, partly_paid, uncollectible, void, paid. The same state may record a larger
    amount paid (a second part payment).
    """
    if current is None:
        return True
    if current in FINAL_STATES:
        return False
    if new == current:
        return new_paid is not None and (current_paid is None or new_paid > current_paid)
    return _RANK[new] > _RANK[current]


@dataclass(frozen=True)
class PaymentRecord:
    """A row of ``delivery_payments``."""

    delivery_id: int
    state: PaymentState
    amount_paid: Decimal | None
    event_id: str
    source: str
    occurred_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class PaymentChange:
    """What applying one reported state did.

    Attributes:
        outcome: ``applied`` (the state moved), ``unchanged`` (it would have moved backwards or
            it is the same), or ``replayed`` (this event id was applied before: nothing done).
        before: The state recorded before.
        after: The state recorded now.
    """

    outcome: str
    before: PaymentState | None
    after: PaymentState | None


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _payment(row: Any) -> PaymentRecord:
    return PaymentRecord(
        delivery_id=row.delivery_id,
        state=PaymentState(row.state),
        amount_paid=Decimal(row.amount_paid) if row.amount_paid is not None else None,
        event_id=row.event_id,
        source=row.source,
        occurred_at=_aware(row.occurred_at),
        updated_at=_aware(row.updated_at) or _now(),
    )


def apply_payment_state(
    ledger: Ledger,
    delivery_id: int,
    state: PaymentState,
    *,
    amount_paid: Decimal | None,
    event_id: str,
    source: str,
    occurred_at: datetime | None = None,
    event: tuple[str, str, str] | None = None,
) -> PaymentChange:
    """Record a reported payment state for a delivery, in one transaction, never backwards.

    Args:
        ledger: The ledger.
        delivery_id: The delivery the state is about.
        state: The state the provider reports.
        amount_paid: What the provider says is paid (major units), when it says.
        event_id: The event (or sync run) reporting it, kept with the state.
        source: ``webhook`` or ``sync``.
        occurred_at: When it happened at the provider.
        event: ``(target, account, event_type)`` for a webhook event: the event id is stored
            once, and a second arrival of the same id changes nothing (``replayed``).

    Returns:
        What happened.
    """
    now = _now()
    with ledger.engine.begin() as conn:
        if event is not None:
            target, account, event_type = event
            # The insert comes first: it takes SQLite's write lock for the whole transaction,
            # and on PostgreSQL a second arrival of the same event waits here for the first.
            inserted = _insert_if_new(
                conn,
                ledger,
                webhook_events_table,
                {
                    "target": target,
                    "account": account,
                    "event_id": event_id[:255],
                    "event_type": event_type[:128],
                    "delivery_id": delivery_id,
                    "state": state.value,
                    "outcome": "pending",
                    "received_at": now,
                },
            )
            if not inserted:
                current = _current(conn, delivery_id)
                after = current.state if current else None
                return PaymentChange("replayed", after, after)
        # Serialise changes of one delivery's payment across processes (PostgreSQL).
        conn.execute(
            sa.select(deliveries_table.c.id)
            .where(deliveries_table.c.id == delivery_id)
            .with_for_update()
        )
        current = _current(conn, delivery_id)
        before = current.state if current else None
        moved = may_move(before, state, current.amount_paid if current else None, amount_paid)
        if moved:
            values = {
                "state": state.value,
                "amount_paid": format(amount_paid, "f") if amount_paid is not None else None,
                "event_id": event_id,
                "source": source,
                "occurred_at": occurred_at,
                "updated_at": now,
            }
            if current is None:
                conn.execute(
                    delivery_payments_table.insert().values(delivery_id=delivery_id, **values)
                )
            else:
                conn.execute(
                    delivery_payments_table.update()
                    .where(delivery_payments_table.c.delivery_id == delivery_id)
                    .values(**values)
                )
        outcome = "applied" if moved else "unchanged"
        if event is not None:
            conn.execute(
                webhook_events_table.update()
                .where(
                    webhook_events_table.c.target == event[0],
                    webhook_events_table.c.account == event[1],
                    webhook_events_table.c.event_id == event_id[:255],
                )
                .values(outcome=outcome)
            )
    return PaymentChange(outcome, before, state if moved else before)


def _current(conn: sa.Connection, delivery_id: int) -> PaymentRecord | None:
    row = conn.execute(
        sa.select(delivery_payments_table).where(
            delivery_payments_table.c.delivery_id == delivery_id
        )
    ).one_or_none()
    return None if row is None else _payment(row)


def _insert_if_new(
    conn: sa.Connection, ledger: Ledger, table: sa.Table, row: dict[str, Any]
) -> bool:
    """Insert ``row`` unless its key exists; whether it was inserted.

    ``RETURNING`` tells, where the database has it: with psycopg, an ``INSERT ... ON CONFLICT
    DO NOTHING`` reports a rowcount of -1 whether or not it inserted.
    """
    statement = _insert_new(ledger, table)
    if ledger.engine.dialect.insert_returning:
        key = next(iter(table.primary_key.columns))
        return conn.execute(statement.returning(key), row).first() is not None
    return bool(conn.execute(statement, row).rowcount == 1)


def _insert_new(ledger: Ledger, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the ledger's database."""
    dialect = ledger.engine.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return table.insert().prefix_with("IGNORE")


def payment_records(
    ledger: Ledger, delivery_ids: Iterable[int] | None = None
) -> dict[int, PaymentRecord]:
    """The recorded payment states, by delivery id (all of them, or of ``delivery_ids``)."""
    query = sa.select(delivery_payments_table)
    if delivery_ids is not None:
        ids = list(delivery_ids)
        if not ids:
            return {}
        query = query.where(delivery_payments_table.c.delivery_id.in_(ids))
    with ledger.engine.connect() as conn:
        return {row.delivery_id: _payment(row) for row in conn.execute(query)}


def event_applied(ledger: Ledger, target: str, account: str, event_id: str) -> bool:
    """Whether this webhook event id was applied before (a replay)."""
    table = webhook_events_table
    with ledger.engine.connect() as conn:
        found = conn.execute(
            sa.select(table.c.event_id).where(
                table.c.target == target,
                table.c.account == account,
                table.c.event_id == event_id[:255],
            )
        ).first()
    return found is not None


def webhook_event_counts(ledger: Ledger) -> dict[tuple[str, str], int]:
    """Recorded webhook events by (target, outcome)."""
    table = webhook_events_table
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.target, table.c.outcome, sa.func.count()).group_by(
                table.c.target, table.c.outcome
            )
        ).all()
    return {(row[0], row[1]): int(row[2]) for row in rows}


# Finding a delivery from a provider's ids ------------------------------------------------------


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def deliveries_with_ref(
    ledger: Ledger, target: str, name: str, value: str, account: str | None = None
) -> list[DeliveryRecord]:
    """Deliveries of ``target`` whose recorded provider ids hold ``name = value``.

    The ids are kept as JSON text; a ``LIKE`` narrows the rows in the database and each
    candidate's ids are then compared exactly.
    """
    from kiki_billing.hub.ledger.store import _delivery

    needle = json.dumps({name: value})[1:-1]  # '"name": "value"' as json.dumps writes it
    query = sa.select(deliveries_table).where(
        deliveries_table.c.target == target,
        deliveries_table.c.refs.like(f"%{_like_escape(needle)}%", escape="\\"),
    )
    if account is not None:
        query = query.where(deliveries_table.c.account == account)
    with ledger.engine.connect() as conn:
        found = [_delivery(row) for row in conn.execute(query)]
    return [record for record in found if record.refs.get(name) == value]


# Invoice terms ------------------------------------------------------------------------------


def record_invoice_terms(ledger: Ledger, terms: Iterable[tuple[str, int, date, str]]) -> None:
    """Keep each invoice's due date and client time zone (first record wins: it was issued so).

    Args:
        ledger: The ledger.
        terms: ``(number, revision, due_date, timezone)`` per invoice.
    """
    rows = [
        {"number": n, "revision": r, "due_date": d, "timezone": tz, "recorded_at": _now()}
        for n, r, d, tz in terms
    ]
    if not rows:
        return
    with ledger.engine.begin() as conn:
        conn.execute(_insert_new(ledger, invoice_terms_table), rows)


def invoice_terms(ledger: Ledger) -> dict[tuple[str, int], tuple[date, str]]:
    """Every recorded ``(number, revision) -> (due_date, timezone)``."""
    table = invoice_terms_table
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.number, table.c.revision, table.c.due_date, table.c.timezone)
        ).all()
    return {(row.number, row.revision): (row.due_date, row.timezone) for row in rows}


def is_overdue(due: date, timezone: str, state: PaymentState | None, now: datetime) -> bool:
    """Unpaid and past the due date in the client's time zone.

    An invoice is due *on* its due date: it is overdue from the next day, in the client's
    time zone.
    """
    from zoneinfo import ZoneInfo

    if state in SETTLED_STATES:
        return False
    try:
        zone = ZoneInfo(timezone)
    except (KeyError, ValueError):
        zone = ZoneInfo(DEFAULT_TIMEZONE)
    return now.astimezone(zone).date() > due


# Account health ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountHealth:
    """A row of ``account_health``."""

    target: str
    account: str
    requests: int
    throttled: int
    waited_seconds: float
    circuit_open_until: float | None


def add_account_health(
    ledger: Ledger,
    target: str,
    account: str,
    *,
    requests: int = 0,
    throttled: int = 0,
    waited: float = 0.0,
    circuit: tuple[float | None] | None = None,
) -> None:
    """Add counts to an account's row, and record its circuit when ``circuit`` is given.

    ``circuit`` is ``(open_until,)``: an epoch time while the breaker is open, ``None`` when
    it is closed; without it the recorded circuit is left as it is.
    """
    table = account_health_table
    where = (table.c.target == target, table.c.account == account)
    values: dict[str, Any] = {
        "requests": table.c.requests + requests,
        "throttled": table.c.throttled + throttled,
        "waited_seconds": table.c.waited_seconds + waited,
        "updated_at": _now(),
    }
    if circuit is not None:
        values["circuit_open_until"] = circuit[0]
    with ledger.engine.begin() as conn:
        if conn.execute(table.update().where(*where).values(**values)).rowcount == 1:
            return
        row = {
            "target": target,
            "account": account,
            "requests": requests,
            "throttled": throttled,
            "waited_seconds": waited,
            "circuit_open_until": values.get("circuit_open_until"),
            "updated_at": values["updated_at"],
        }
        if not _insert_if_new(conn, ledger, table, row):
            conn.execute(table.update().where(*where).values(**values))


def account_health(ledger: Ledger) -> list[AccountHealth]:
    """Every provider account's counters and circuit."""
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(account_health_table)).all()
    return [
        AccountHealth(
            row.target,
            row.account,
            int(row.requests),
            int(row.throttled),
            float(row.waited_seconds),
            row.circuit_open_until,
        )
        for row in rows
    ]
