"""The delivery ledger: the one place that records what was sent where (SQLAlchemy).

SQLite by default, any SQLAlchemy URL (PostgreSQL) by ``KIKI_LEDGER_URL``. Every write is its
own short transaction, committed *before* the provider is called (``in_flight``) and after it
answered (``delivered``/``failed``), so a process killed at any instant leaves a record that
says which step's outcome is unknown. A delivery is claimed with a conditional UPDATE, so two
processes never work on the same delivery at once.

States of a delivery: ``pending`` -> ``in_flight`` -> ``delivered`` | ``failed`` | ``deferred``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kiki_billing.models import Invoice


class DeliveryState(StrEnum):
    """Where a delivery (one invoice to one target) stands."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"


metadata = sa.MetaData()

invoices_table = sa.Table(
    "invoices",
    metadata,
    sa.Column("number", sa.String(64), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("period", sa.String(32), nullable=False, index=True),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total_fee", sa.String(32), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

deliveries_table = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("invoice_number", sa.String(64), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("period", sa.String(32), nullable=False, index=True),
    sa.Column("target", sa.String(64), nullable=False),
    sa.Column("account", sa.String(128), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("client_settings", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("refs", sa.Text, nullable=False, default="{}"),
    sa.Column("last_error", sa.Text),
    sa.Column("owner", sa.String(255)),
    sa.Column("lease_until", sa.Float),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("invoice_number", "revision", "target", name="uq_delivery"),
)

steps_table = sa.Table(
    "delivery_steps",
    metadata,
    sa.Column("delivery_id", sa.Integer, sa.ForeignKey("deliveries.id"), primary_key=True),
    sa.Column("step", sa.String(64), primary_key=True),
    sa.Column("idempotency_key", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("refs", sa.Text, nullable=False, default="{}"),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

client_refs_table = sa.Table(
    "client_refs",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.String(128), primary_key=True),
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)


@dataclass(frozen=True)
class DeliveryRecord:
    """A row of the ledger's ``deliveries`` table."""

    id: int
    invoice_number: str
    revision: int
    client_id: str
    period: str
    target: str
    account: str
    content_hash: str
    client_settings: dict[str, Any]
    state: DeliveryState
    attempts: int
    refs: dict[str, str]
    last_error: str | None
    owner: str | None
    updated_at: datetime


@dataclass(frozen=True)
class StepRecord:
    """A row of the ledger's ``delivery_steps`` table."""

    step: str
    idempotency_key: str
    state: DeliveryState
    attempts: int
    refs: dict[str, str]
    last_error: str | None


class InvoiceConflictError(Exception):
    """The invoice clashes with one issued before.

    Either the same number and revision with other content, or another number for the same
    client, period and revision.
    """


def _now() -> datetime:
    return datetime.now(UTC)


def process_owner() -> str:
    """``host:pid:start`` of this process: names who holds a delivery."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("Z" for a zombie, "0" if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return "Z" if fields[0] == b"Z" else fields[19].decode()
    except (OSError, IndexError):
        return "0"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a process of this host that no longer runs."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _process_start(pid) != start


def default_ledger_url(data_dir: Path) -> str:
    """The SQLite file in the data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir / 'ledger.sqlite3'}"


class Ledger:
    """Reads and writes the delivery ledger.

    Args:
        url: A SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``).
        lease_seconds: How long a claim holds without a heartbeat.
    """

    def __init__(self, url: str, *, lease_seconds: float = 120.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.engine = self._engine(url)
        self._create_schema()

    def _create_schema(self) -> None:
        """Create missing tables; safe when several processes open a new ledger at once."""
        for attempt in range(1, 6):
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        # Concurrent CREATE TABLEs collide in pg_type: serialise them (the lock
                        # is released at commit, and the next creator then finds the tables).
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7049590145)"))
                    metadata.create_all(conn)
                return
            except sa.exc.OperationalError as exc:
                # SQLite: another process created a table between the check and the CREATE.
                if attempt == 5 or "already exists" not in str(exc.orig):
                    raise

    @staticmethod
    def _engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            # NOTE: pooled, not one connection per write: closing the last connection of a WAL
            # database checkpoints and deletes the WAL, which cost 2-17 ms a write.
            engine = sa.create_engine(url, connect_args={"timeout": 60})

            @sa.event.listens_for(engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                _journal_mode_wal(cursor)
                # NOTE: in WAL mode NORMAL survives a killed process (the crash the ledger is
                # built for); a power cut may lose the last commits, which the idempotency keys
                # and the natural-key look-ups then cover.
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA busy_timeout=60000")
                cursor.close()

            return engine
        return sa.create_engine(url, pool_pre_ping=True)

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    # Invoices -------------------------------------------------------------------------------

    def record_invoice(self, invoice: Invoice) -> None:
        """Keep the issued invoice; the same number and revision must keep the same content.

        Raises:
            InvoiceConflictError: It was recorded before with a different content hash.
        """
        with self.engine.begin() as conn:
            other = conn.execute(
                sa.select(invoices_table.c.number).where(
                    invoices_table.c.client_id == invoice.client_id,
                    invoices_table.c.period == invoice.period,
                    invoices_table.c.revision == invoice.revision,
                    invoices_table.c.number != invoice.number,
                )
            ).scalar()
            if other is not None:
                raise InvoiceConflictError(
                    f"client {invoice.client_id} already has invoice {other} for "
                    f"{invoice.period}; {invoice.number} would bill the period twice (was the "
                    "client's invoice_sequence changed? pin it back with invoice_sequence)"
                )
            existing = conn.execute(
                sa.select(invoices_table.c.content_hash).where(
                    invoices_table.c.number == invoice.number,
                    invoices_table.c.revision == invoice.revision,
                )
            ).scalar_one_or_none()
            if existing is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            invoices_table.insert().values(
                                number=invoice.number,
                                revision=invoice.revision,
                                client_id=invoice.client_id,
                                period=invoice.period,
                                currency=invoice.currency,
                                total_fee=format(invoice.total_fee, "f"),
                                content_hash=invoice.content_hash,
                                document=invoice.canonical_json(),
                                recorded_at=_now(),
                            )
                        )
                    return
                except sa.exc.IntegrityError:
                    existing = conn.execute(
                        sa.select(invoices_table.c.content_hash).where(
                            invoices_table.c.number == invoice.number,
                            invoices_table.c.revision == invoice.revision,
                        )
                    ).scalar_one()
        if existing != invoice.content_hash:
            raise InvoiceConflictError(
                f"invoice {invoice.number} revision {invoice.revision} was issued before with "
                f"other content (hash {existing[:12]}, now {invoice.content_hash[:12]}); "
                "a correction needs a new revision"
            )

    def load_invoice(self, number: str, revision: int) -> Invoice:
        """The invoice exactly as it was recorded."""
        with self.engine.connect() as conn:
            document = conn.execute(
                sa.select(invoices_table.c.document).where(
                    invoices_table.c.number == number, invoices_table.c.revision == revision
                )
            ).scalar_one()
        return Invoice.model_validate_json(document)

    # Deliveries -----------------------------------------------------------------------------

    def ensure_delivery(
        self, invoice: Invoice, target: str, account: str, client_settings: Mapping[str, Any]
    ) -> DeliveryRecord:
        """The delivery of ``invoice`` to ``target``, created ``pending`` if new."""
        key = (invoice.number, invoice.revision, target)
        found = self.find_delivery(*key)
        if found is not None:
            return found
        now = _now()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    deliveries_table.insert().values(
                        invoice_number=invoice.number,
                        revision=invoice.revision,
                        client_id=invoice.client_id,
                        period=invoice.period,
                        target=target,
                        account=account,
                        content_hash=invoice.content_hash,
                        client_settings=json.dumps(dict(client_settings), sort_keys=True),
                        state=DeliveryState.PENDING.value,
                        attempts=0,
                        refs="{}",
                        created_at=now,
                        updated_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another process created it first
        created = self.find_delivery(*key)
        assert created is not None
        return created

    def find_delivery(self, number: str, revision: int, target: str) -> DeliveryRecord | None:
        """The delivery of an invoice revision to a target, if recorded."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(
                    deliveries_table.c.invoice_number == number,
                    deliveries_table.c.revision == revision,
                    deliveries_table.c.target == target,
                )
            ).one_or_none()
        return None if row is None else _delivery(row)

    def get_delivery(self, delivery_id: int) -> DeliveryRecord:
        """One delivery by id."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(deliveries_table.c.id == delivery_id)
            ).one()
        return _delivery(row)

    def claim(
        self, delivery_id: int, owner: str, claimable: Iterable[DeliveryState], now: float
    ) -> bool:
        """Take the delivery for ``owner`` if it is in a claimable state or its holder is gone.

        Returns:
            True when this process now holds it; False when it is delivered, held by a live
            process, or not in a claimable state.
        """
        current = self.get_delivery(delivery_id)
        states = [s.value for s in claimable]
        stale = current.state is DeliveryState.IN_FLIGHT and owner_is_dead(current.owner)
        condition = deliveries_table.c.state.in_(states) | (
            (deliveries_table.c.state == DeliveryState.IN_FLIGHT.value)
            & (deliveries_table.c.lease_until < now)
        )
        if stale:
            condition = condition | (
                (deliveries_table.c.state == DeliveryState.IN_FLIGHT.value)
                & (deliveries_table.c.owner == current.owner)
            )
        with self.engine.begin() as conn:
            result = conn.execute(
                deliveries_table.update()
                .where(deliveries_table.c.id == delivery_id, condition)
                .values(
                    state=DeliveryState.IN_FLIGHT.value,
                    owner=owner,
                    lease_until=now + self.lease_seconds,
                    attempts=deliveries_table.c.attempts + 1,
                    updated_at=_now(),
                )
            )
        return result.rowcount == 1

    def heartbeat(self, delivery_id: int, owner: str, now: float) -> None:
        """Extend the claim while a delivery makes progress."""
        with self.engine.begin() as conn:
            conn.execute(
                deliveries_table.update()
                .where(deliveries_table.c.id == delivery_id, deliveries_table.c.owner == owner)
                .values(lease_until=now + self.lease_seconds)
            )

    def finish(
        self,
        delivery_id: int,
        owner: str,
        state: DeliveryState,
        refs: Mapping[str, str],
        error: str | None = None,
    ) -> None:
        """Record the outcome of a delivery and release it."""
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(
                deliveries_table.update()
                .where(deliveries_table.c.id == delivery_id, deliveries_table.c.owner == owner)
                .values(
                    state=state.value,
                    refs=json.dumps(dict(refs), sort_keys=True),
                    last_error=error,
                    owner=None,
                    lease_until=None,
                    updated_at=now,
                    delivered_at=now if state is DeliveryState.DELIVERED else None,
                )
            )

    def defer(self, delivery_id: int, reason: str) -> None:
        """Mark a delivery that was not started (circuit open) as deferred."""
        with self.engine.begin() as conn:
            conn.execute(
                deliveries_table.update()
                .where(
                    deliveries_table.c.id == delivery_id,
                    deliveries_table.c.state.in_(
                        [DeliveryState.PENDING.value, DeliveryState.DEFERRED.value]
                    ),
                )
                .values(state=DeliveryState.DEFERRED.value, last_error=reason, updated_at=_now())
            )

    def deliveries(
        self,
        *,
        period: str | None = None,
        states: Iterable[DeliveryState] | None = None,
        target: str | None = None,
        client_id: str | None = None,
    ) -> list[DeliveryRecord]:
        """Deliveries, filtered, in invoice and target order."""
        query = sa.select(deliveries_table).order_by(
            deliveries_table.c.period, deliveries_table.c.invoice_number, deliveries_table.c.target
        )
        if period is not None:
            query = query.where(deliveries_table.c.period == period)
        if states is not None:
            query = query.where(deliveries_table.c.state.in_([s.value for s in states]))
        if target is not None:
            query = query.where(deliveries_table.c.target == target)
        if client_id is not None:
            query = query.where(deliveries_table.c.client_id == client_id)
        with self.engine.connect() as conn:
            return [_delivery(row) for row in conn.execute(query)]

    # Steps ----------------------------------------------------------------------------------

    def steps(self, delivery_id: int) -> dict[str, StepRecord]:
        """The recorded steps of a delivery, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(steps_table).where(steps_table.c.delivery_id == delivery_id)
            ).all()
        return {
            row.step: StepRecord(
                step=row.step,
                idempotency_key=row.idempotency_key,
                state=DeliveryState(row.state),
                attempts=row.attempts,
                refs=json.loads(row.refs),
                last_error=row.last_error,
            )
            for row in rows
        }

    def step_started(self, delivery_id: int, step: str, key: str) -> None:
        """Committed before the provider is called: this step's outcome is now unknown."""
        now = _now()
        with self.engine.begin() as conn:
            updated = conn.execute(
                steps_table.update()
                .where(steps_table.c.delivery_id == delivery_id, steps_table.c.step == step)
                .values(
                    idempotency_key=key,
                    state=DeliveryState.IN_FLIGHT.value,
                    attempts=steps_table.c.attempts + 1,
                    updated_at=now,
                )
            )
            if updated.rowcount == 0:
                conn.execute(
                    steps_table.insert().values(
                        delivery_id=delivery_id,
                        step=step,
                        idempotency_key=key,
                        state=DeliveryState.IN_FLIGHT.value,
                        attempts=1,
                        refs="{}",
                        updated_at=now,
                    )
                )

    def step_finished(
        self,
        delivery_id: int,
        step: str,
        key: str,
        state: DeliveryState,
        refs: Mapping[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        """Record a step's outcome (delivered with its ids, or failed with the error)."""
        values = {
            "state": state.value,
            "refs": json.dumps(dict(refs or {}), sort_keys=True),
            "last_error": error,
            "updated_at": _now(),
        }
        with self.engine.begin() as conn:
            updated = conn.execute(
                steps_table.update()
                .where(steps_table.c.delivery_id == delivery_id, steps_table.c.step == step)
                .values(**values)
            )
            if updated.rowcount == 0:
                conn.execute(
                    steps_table.insert().values(
                        delivery_id=delivery_id,
                        step=step,
                        idempotency_key=key,
                        attempts=0,
                        **values,
                    )
                )

    # Ids that belong to the client ----------------------------------------------------------

    def client_refs(self, target: str, account: str, client_id: str) -> dict[str, str]:
        """Ids recorded for the client at this target and account (e.g. its customer id)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(client_refs_table.c.name, client_refs_table.c.value).where(
                    client_refs_table.c.target == target,
                    client_refs_table.c.account == account,
                    client_refs_table.c.client_id == client_id,
                )
            ).all()
        return {row.name: row.value for row in rows}

    def remember_client_refs(
        self, target: str, account: str, client_id: str, refs: Mapping[str, str]
    ) -> None:
        """Keep the client's ids for the next period."""
        for name, value in refs.items():
            with self.engine.begin() as conn:
                updated = conn.execute(
                    client_refs_table.update()
                    .where(
                        client_refs_table.c.target == target,
                        client_refs_table.c.account == account,
                        client_refs_table.c.client_id == client_id,
                        client_refs_table.c.name == name,
                    )
                    .values(value=value)
                )
                if updated.rowcount == 0:
                    try:
                        with conn.begin_nested():
                            conn.execute(
                                client_refs_table.insert().values(
                                    target=target,
                                    account=account,
                                    client_id=client_id,
                                    name=name,
                                    value=value,
                                )
                            )
                    except sa.exc.IntegrityError:
                        pass


def _delivery(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        invoice_number=row.invoice_number,
        revision=row.revision,
        client_id=row.client_id,
        period=row.period,
        target=row.target,
        account=row.account,
        content_hash=row.content_hash,
        client_settings=json.loads(row.client_settings),
        state=DeliveryState(row.state),
        attempts=row.attempts,
        refs=json.loads(row.refs),
        last_error=row.last_error,
        owner=row.owner,
        updated_at=_aware(row.updated_at),
    )


def _journal_mode_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, waiting while another process creates the same file."""
    # NOTE: turning a new database to WAL takes an exclusive lock, and SQLite answers
    # "database is locked" at once (the busy timeout does not apply) while another connection
    # holds the file, as when two pushes open a new ledger together. On a file already in WAL
    # mode the pragma takes no such lock.
    deadline = time.monotonic() + 60
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; the ledger writes UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
