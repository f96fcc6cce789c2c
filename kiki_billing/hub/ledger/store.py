"""The delivery ledger: the one place that records what was sent where (SQLAlchemy Core).

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
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kiki_billing.hub.ledger.ownership import owner_is_dead
from kiki_billing.hub.ledger.schema import (
    DeliveryState,
    StepOrigin,
    account_locks_table,
    carried_fees_table,
    client_refs_table,
    create_or_migrate,
    credentials_table,
    deliveries_table,
    dumps,
    invoices_table,
    steps_table,
    undated_sources_table,
)
from kiki_billing.models import Invoice, LineKind
from kiki_billing.profit_share import CarriedFee


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
    lease_until: float | None
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
    origin: StepOrigin | None
    updated_at: datetime


@dataclass(frozen=True)
class StepWrite:
    """One change to a step's row: started (``in_flight``) or finished."""

    step: str
    key: str
    state: DeliveryState
    refs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    origin: StepOrigin | None = None
    new: bool = False
    """The step has no row yet: insert without trying an update first."""

    @classmethod
    def started(cls, step: str, key: str, *, new: bool) -> StepWrite:
        """The step is about to be sent."""
        return cls(step, key, DeliveryState.IN_FLIGHT, new=new)


@dataclass(frozen=True)
class OpenedDelivery:
    """What :meth:`Ledger.open_delivery` found.

    Attributes:
        record: The delivery (``None`` when the invoice was refused).
        attempts: Its attempts counting this one when this process now holds it, else ``None``.
        conflict: Why the invoice was refused (other content or another number).
        breaker_open: The delivery was not started because its account's circuit is open.
    """

    record: DeliveryRecord | None
    attempts: int | None
    conflict: str | None
    breaker_open: bool = False


class InvoiceConflictError(Exception):
    """The invoice clashes with one issued before.

    Either the same number and revision with other billed content, or another number for the
    same client, period and revision.
    """


def _now() -> datetime:
    return datetime.now(UTC)


def default_ledger_url(data_dir: Path) -> str:
    """The SQLite file in the data directory (created readable by its owner only)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"sqlite:///{data_dir / 'ledger.sqlite3'}"


def _create_private_file(url: str) -> None:
    """Create a new SQLite ledger file as 0600 (its WAL and SHM files inherit the mode)."""
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Ledger:
    """Reads and writes the delivery ledger.

    Args:
        url: A SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``).
        lease_seconds: How long a claim holds without a heartbeat.
    """

    def __init__(self, url: str, *, lease_seconds: float = 120.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        if url.startswith("sqlite"):
            _create_private_file(url)
        self.engine = self._engine(url)
        self._statements: dict[str, Any] = {}
        self._create_schema()

    def _create_schema(self) -> None:
        """Create or migrate the tables, atomically, and one process at a time."""
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
            self._create_sqlite_schema()
            return
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Concurrent CREATE TABLEs collide in pg_type: serialise them (the lock is
                # released at commit, and the next creator then finds the tables).
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7049590145)"))
            create_or_migrate(conn)

    def _create_sqlite_schema(self) -> None:
        # NOTE: Python's sqlite3 runs DDL outside any transaction (it begins one only before
        # INSERT/UPDATE/DELETE), so a migration killed halfway would leave a half-migrated
        # ledger and two processes could migrate at once. Schema work gets its own engine
        # whose transactions start with BEGIN IMMEDIATE: atomic, and serialised by SQLite's
        # write lock (the busy timeout makes the others wait, then find the work done).
        engine = sa.create_engine(self.url, connect_args={"timeout": 60}, poolclass=sa.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_connection: Any, _record: Any) -> None:
            _journal_mode_wal(dbapi_connection.cursor())
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _immediate(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with engine.begin() as conn:
                create_or_migrate(conn)
        finally:
            engine.dispose()

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

    def _statement(self, name: str, build: Callable[[], Any]) -> Any:
        """A statement built once per ledger (building one costs more than running it)."""
        statement = self._statements.get(name)
        if statement is None:
            statement = self._statements[name] = build()
        return statement

    # Invoices -------------------------------------------------------------------------------

    def record_invoice(self, invoice: Invoice) -> None:
        """Keep the issued invoice; the same number and revision must bill the same content.

        Raises:
            InvoiceConflictError: It was recorded before with other billed content, or the
                client already has another number for the period.
        """
        document, billing = invoice.document_and_billing_hash()
        with self.engine.begin() as conn:
            problem = self._record_invoice(conn, invoice, document, billing)
        if problem is not None:
            raise InvoiceConflictError(problem)

    def invoice_conflict(self, invoice: Invoice) -> str | None:
        """Why :meth:`record_invoice` would refuse ``invoice``, without writing anything."""
        with self.engine.connect() as conn:
            return self._invoice_problem(conn, invoice, invoice.billing_hash())[0]

    def _invoice_problem(
        self, conn: sa.Connection, invoice: Invoice, billing: str
    ) -> tuple[str | None, bool]:
        """Why the invoice clashes with the recorded ones, and whether it is recorded."""
        rows = conn.execute(
            self._statement(
                "invoice_of_client",
                lambda: sa.select(invoices_table.c.number, invoices_table.c.content_hash).where(
                    invoices_table.c.client_id == sa.bindparam("client_id"),
                    invoices_table.c.period == sa.bindparam("period"),
                    invoices_table.c.revision == sa.bindparam("revision"),
                ),
            ),
            {
                "client_id": invoice.client_id,
                "period": invoice.period,
                "revision": invoice.revision,
            },
        ).all()
        for row in rows:
            if row.number != invoice.number:
                return other_number_message(invoice, row.number), True
            if row.content_hash != billing:
                return conflict_message(invoice, row.content_hash), True
        return None, bool(rows)

    def _record_invoice(
        self, conn: sa.Connection, invoice: Invoice, document: str, billing: str
    ) -> str | None:
        """Record the invoice unless it is; the reason it clashes, or ``None``."""
        problem, recorded = self._invoice_problem(conn, invoice, billing)
        if problem is not None or recorded:
            return problem
        inserted = conn.execute(
            self._insert_new(invoices_table),
            {
                "number": invoice.number,
                "revision": invoice.revision,
                "client_id": invoice.client_id,
                "period": invoice.period,
                "currency": invoice.currency,
                "total_fee": format(invoice.total_fee, "f"),
                "content_hash": billing,
                "document": document,
                "recorded_at": _now(),
            },
        )
        if inserted.rowcount != 1:  # another process recorded it meanwhile: check again
            return self._invoice_problem(conn, invoice, billing)[0]
        return None

    def recorded_hash(
        self, number: str, revision: int, conn: sa.Connection | None = None
    ) -> str | None:
        """The billing hash an invoice revision was recorded with, if it was."""
        query = sa.select(invoices_table.c.content_hash).where(
            invoices_table.c.number == number, invoices_table.c.revision == revision
        )
        if conn is not None:
            return conn.execute(query).scalar_one_or_none()
        with self.engine.connect() as own:
            return own.execute(query).scalar_one_or_none()

    def invoice_revisions(self, number: str) -> list[int]:
        """The revisions recorded under an invoice number, oldest first."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(invoices_table.c.revision)
                    .where(invoices_table.c.number == number)
                    .order_by(invoices_table.c.revision)
                ).scalars()
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

    # Opening a delivery: the hot path of a push ------------------------------------------------

    def open_delivery(
        self,
        invoice: Invoice,
        target: str,
        account: str,
        client_settings: Mapping[str, Any],
        owner: str,
        claimable: Iterable[DeliveryState],
        may_start: Callable[[], bool],
        now: float,
    ) -> OpenedDelivery:
        """Record the invoice, find or create its delivery, and claim it, in one transaction.

        What :meth:`record_invoice`, :meth:`ensure_delivery` and :meth:`claim` do one after the
        other, with the fewest statements: a new delivery is inserted already claimed.

        Args:
            invoice: The invoice.
            target: The adapter name.
            account: The provider account.
            client_settings: The client's settings for the target (kept for the record).
            owner: This process.
            claimable: States this run may take the delivery from.
            may_start: Asked before a claim (the circuit breaker); when it says no, a delivery
                that is pending or deferred is marked deferred instead.
            now: The current time (epoch seconds).

        Returns:
            The delivery, whether this process now holds it, or why the invoice was refused.
        """
        document, billing = invoice.document_and_billing_hash()
        values = {
            "number": invoice.number,
            "revision": invoice.revision,
            "target": target,
            "account": account,
        }
        with self.engine.begin() as conn:
            problem = self._record_invoice(conn, invoice, document, billing)
            if problem is not None:
                return OpenedDelivery(None, None, problem)
            found = conn.execute(self._find_delivery(), values).one_or_none()
            if found is None:
                started = may_start()
                stamp = _now()
                new_row: dict[str, Any] = {
                    "invoice_number": invoice.number,
                    "revision": invoice.revision,
                    "client_id": invoice.client_id,
                    "period": invoice.period,
                    "target": target,
                    "account": account,
                    "content_hash": billing,
                    "client_settings": dumps(dict(client_settings)),
                    "state": (DeliveryState.IN_FLIGHT if started else DeliveryState.PENDING).value,
                    "attempts": 1 if started else 0,
                    "refs": "{}",
                    "last_error": None,
                    "owner": owner if started else None,
                    "lease_until": now + self.lease_seconds if started else None,
                    "created_at": stamp,
                    "updated_at": stamp,
                    "delivered_at": None,
                }
                new_id = self._insert_delivery(conn, new_row)
                if new_id is not None:
                    created = _delivery(SimpleNamespace(id=new_id, **new_row))
                    return OpenedDelivery(
                        created, 1 if started else None, None, breaker_open=not started
                    )
                found = conn.execute(self._find_delivery(), values).one()
        record = _delivery(found)
        if record.state is DeliveryState.DELIVERED:
            return OpenedDelivery(record, None, None)
        states = set(claimable)
        if record.state in states and not may_start():
            return OpenedDelivery(record, None, None, breaker_open=True)
        return OpenedDelivery(record, self.claim(record.id, owner, states, now), None)

    def _insert_new(self, table: sa.Table) -> Any:
        """``INSERT ... ON CONFLICT DO NOTHING`` (no savepoint; rowcount 0 on a conflict)."""

        def build() -> Any:
            if self.engine.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                return pg_insert(table).on_conflict_do_nothing()
            if self.engine.dialect.name == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                return sqlite_insert(table).on_conflict_do_nothing()
            return table.insert().prefix_with("IGNORE")  # MySQL and MariaDB

        return self._statement(f"insert_new_{table.name}", build)

    def _insert_delivery(self, conn: sa.Connection, row: Mapping[str, Any]) -> int | None:
        """Insert a delivery unless one exists; its new id, or ``None`` on a conflict."""
        if self.engine.dialect.insert_returning:
            statement = self._statement(
                "delivery_insert_returning",
                lambda: self._insert_new(deliveries_table).returning(deliveries_table.c.id),
            )
            return conn.execute(statement, dict(row)).scalar_one_or_none()
        inserted = conn.execute(self._insert_new(deliveries_table), dict(row))
        if inserted.rowcount != 1:
            return None
        key = inserted.inserted_primary_key
        return int(key[0]) if key else None

    def _find_delivery(self) -> Any:
        return self._statement(
            "find_delivery",
            lambda: sa.select(deliveries_table).where(
                deliveries_table.c.invoice_number == sa.bindparam("number"),
                deliveries_table.c.revision == sa.bindparam("revision"),
                deliveries_table.c.target == sa.bindparam("target"),
                deliveries_table.c.account == sa.bindparam("account"),
            ),
        )

    # Deliveries -----------------------------------------------------------------------------

    def ensure_delivery(
        self,
        invoice: Invoice,
        target: str,
        account: str,
        client_settings: Mapping[str, Any],
    ) -> DeliveryRecord:
        """The delivery of ``invoice`` to ``target`` at ``account``, created ``pending`` if new."""
        key = (invoice.number, invoice.revision, target, account)
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
                        content_hash=invoice.billing_hash(),
                        client_settings=dumps(dict(client_settings)),
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

    def find_delivery(
        self, number: str, revision: int, target: str, account: str
    ) -> DeliveryRecord | None:
        """The delivery of an invoice revision to a target account, if recorded."""
        with self.engine.connect() as conn:
            row = conn.execute(
                self._find_delivery(),
                {"number": number, "revision": revision, "target": target, "account": account},
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
    ) -> int | None:
        """Take the delivery for ``owner`` if it is in a claimable state or its holder is gone.

        Returns:
            The delivery's attempts counting this one when this process now holds it (1: no
            step can have been recorded yet); ``None`` when it is delivered, held by a live
            process, not in a claimable state, or another process claimed it meanwhile.
        """
        current = self.get_delivery(delivery_id)
        stale = current.state is DeliveryState.IN_FLIGHT and owner_is_dead(current.owner)

        def build() -> Any:
            in_flight = deliveries_table.c.state == DeliveryState.IN_FLIGHT.value
            condition = deliveries_table.c.state.in_(sa.bindparam("states", expanding=True)) | (
                in_flight & (deliveries_table.c.lease_until < sa.bindparam("now"))
            )
            if stale:
                condition = condition | (
                    in_flight & (deliveries_table.c.owner == sa.bindparam("dead_owner"))
                )
            return deliveries_table.update().where(
                deliveries_table.c.id == sa.bindparam("row_id"),
                deliveries_table.c.attempts == sa.bindparam("seen_attempts"),
                condition,
            )

        params: dict[str, Any] = {
            "row_id": delivery_id,
            "seen_attempts": current.attempts,
            "states": [s.value for s in claimable],
            "now": now,
            "state": DeliveryState.IN_FLIGHT.value,
            "owner": owner,
            "lease_until": now + self.lease_seconds,
            "attempts": current.attempts + 1,
            "updated_at": _now(),
        }
        if stale:
            params["dead_owner"] = current.owner
        with self.engine.begin() as conn:
            result = conn.execute(self._statement(f"claim_{stale}", build), params)
        return current.attempts + 1 if result.rowcount == 1 else None

    def heartbeat(self, delivery_ids: Iterable[int], owner: str, now: float) -> int:
        """Extend this owner's claims on ``delivery_ids``; returns how many it still holds."""
        ids = list(delivery_ids)
        if not ids:
            return 0
        with self.engine.begin() as conn:
            result = conn.execute(
                deliveries_table.update()
                .where(
                    deliveries_table.c.id.in_(ids),
                    deliveries_table.c.owner == owner,
                    deliveries_table.c.state == DeliveryState.IN_FLIGHT.value,
                )
                .values(lease_until=now + self.lease_seconds)
            )
        return int(result.rowcount)

    def finish(
        self,
        delivery_id: int,
        owner: str,
        state: DeliveryState,
        refs: Mapping[str, str],
        error: str | None = None,
    ) -> None:
        """Record the outcome of a delivery and release it."""
        with self.engine.begin() as conn:
            self._finish(conn, delivery_id, owner, state, refs, error, _now())

    def _finish(
        self,
        conn: sa.Connection,
        delivery_id: int,
        owner: str,
        state: DeliveryState,
        refs: Mapping[str, str],
        error: str | None,
        now: datetime,
    ) -> None:
        conn.execute(
            self._statement(
                "finish",
                lambda: deliveries_table.update().where(
                    deliveries_table.c.id == sa.bindparam("delivery_id"),
                    deliveries_table.c.owner == sa.bindparam("holder"),
                ),
            ),
            {
                "delivery_id": delivery_id,
                "holder": owner,
                "state": state.value,
                "refs": dumps(dict(refs)),
                "last_error": error,
                "owner": None,
                "lease_until": None,
                "updated_at": now,
                "delivered_at": now if state is DeliveryState.DELIVERED else None,
            },
        )

    def defer(self, delivery_id: int, reason: str) -> None:
        """Mark a delivery that was not started (circuit open, day limit) as deferred."""
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

    def requeue(self, delivery_ids: Iterable[int]) -> None:
        """Mark deferred (and failed, when re-driven) deliveries ``pending`` again: queued."""
        ids = list(delivery_ids)
        for start in range(0, len(ids), 500):
            with self.engine.begin() as conn:
                conn.execute(
                    deliveries_table.update()
                    .where(
                        deliveries_table.c.id.in_(ids[start : start + 500]),
                        deliveries_table.c.state.in_(
                            [DeliveryState.DEFERRED.value, DeliveryState.FAILED.value]
                        ),
                    )
                    .values(state=DeliveryState.PENDING.value, updated_at=_now())
                )

    def deliveries_by_id(self, delivery_ids: Iterable[int]) -> list[DeliveryRecord]:
        """The deliveries with these ids (any order)."""
        ids = list(delivery_ids)
        found: list[DeliveryRecord] = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    sa.select(deliveries_table).where(
                        deliveries_table.c.id.in_(ids[start : start + 500])
                    )
                )
                found.extend(_delivery(row) for row in rows)
        return found

    def deliveries(
        self,
        *,
        period: str | None = None,
        states: Iterable[DeliveryState] | None = None,
        target: str | None = None,
        client_id: str | None = None,
        invoice_number: str | None = None,
    ) -> list[DeliveryRecord]:
        """Deliveries, filtered, in period, invoice, target and account order."""
        query = sa.select(deliveries_table).order_by(
            deliveries_table.c.period,
            deliveries_table.c.invoice_number,
            deliveries_table.c.revision,
            deliveries_table.c.target,
            deliveries_table.c.account,
        )
        if period is not None:
            query = query.where(deliveries_table.c.period == period)
        if states is not None:
            query = query.where(deliveries_table.c.state.in_([s.value for s in states]))
        if target is not None:
            query = query.where(deliveries_table.c.target == target)
        if client_id is not None:
            query = query.where(deliveries_table.c.client_id == client_id)
        if invoice_number is not None:
            query = query.where(deliveries_table.c.invoice_number == invoice_number)
        with self.engine.connect() as conn:
            return [_delivery(row) for row in conn.execute(query)]

    def superseded(
        self, number: str, revision: int, target: str, account: str
    ) -> list[DeliveryRecord]:
        """Deliveries of revisions of ``number`` older than ``revision`` to a target account.

        Each was superseded by ``revision``: its delivery corrects them (void or credit) first.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries_table)
                .where(
                    deliveries_table.c.invoice_number == number,
                    deliveries_table.c.revision < revision,
                    deliveries_table.c.target == target,
                    deliveries_table.c.account == account,
                )
                .order_by(deliveries_table.c.revision)
            ).all()
        return [_delivery(row) for row in rows]

    def latest_revisions(self, numbers: Iterable[str]) -> dict[str, int]:
        """The newest revision recorded for each of ``numbers`` that has any."""
        wanted = sorted(set(numbers))
        found: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = conn.execute(
                    sa.select(invoices_table.c.number, sa.func.max(invoices_table.c.revision))
                    .where(invoices_table.c.number.in_(chunk))
                    .group_by(invoices_table.c.number)
                ).all()
                found.update({row[0]: int(row[1]) for row in rows})
        return found

    def known_refs(self, record: DeliveryRecord) -> dict[str, str]:
        """The ids a delivery obtained: its recorded refs and those of every step done.

        A delivery killed mid-way has no refs of its own yet; its steps have.
        """
        refs: dict[str, str] = {}
        for step in self.steps(record.id).values():
            if step.state is DeliveryState.DELIVERED:
                refs.update(step.refs)
        refs.update(record.refs)
        return refs

    # Steps ----------------------------------------------------------------------------------

    def steps(self, delivery_id: int) -> dict[str, StepRecord]:
        """The recorded steps of a delivery, by name."""
        query = self._statement(
            "steps",
            lambda: sa.select(steps_table).where(
                steps_table.c.delivery_id == sa.bindparam("delivery_id")
            ),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query, {"delivery_id": delivery_id}).all()
        return {
            row.step: StepRecord(
                step=row.step,
                idempotency_key=row.idempotency_key,
                state=DeliveryState(row.state),
                attempts=row.attempts,
                refs=json.loads(row.refs),
                last_error=row.last_error,
                origin=StepOrigin(row.origin) if row.origin else None,
                updated_at=_aware(row.updated_at),
            )
            for row in rows
        }

    def step_started(self, delivery_id: int, step: str, key: str, *, new: bool = False) -> None:
        """Committed before the provider is called: this step's outcome is now unknown.

        Args:
            delivery_id: The delivery.
            step: The step's name.
            key: Its idempotency key.
            new: The step has no row yet (the caller read the delivery's steps): insert only.
        """
        self.record_steps(delivery_id, [StepWrite.started(step, key, new=new)])

    def step_finished(
        self,
        delivery_id: int,
        step: str,
        key: str,
        state: DeliveryState,
        refs: Mapping[str, str] | None = None,
        error: str | None = None,
        origin: StepOrigin | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Record a step's outcome (delivered with its ids and origin, or the error).

        ``new``: the step has no row yet (found or skipped without being sent): insert only.
        """
        write = StepWrite(step, key, state, dict(refs or {}), error, origin, new=new)
        self.record_steps(delivery_id, [write])

    def record_steps(
        self,
        delivery_id: int,
        writes: Iterable[StepWrite],
        *,
        client_refs: tuple[str, str, str, Mapping[str, str]] | None = None,
        finish: tuple[str, DeliveryState, Mapping[str, str], str | None] | None = None,
    ) -> None:
        """Apply step writes (and keep client ids, and finish the delivery) in one transaction.

        The runner batches a step's result with the start of the next one: both happen at the
        same moment, and a kill between the provider's answer and this commit leaves the same
        unknown outcome a kill just before the answer would.

        Args:
            delivery_id: The delivery.
            writes: In order.
            client_refs: ``(target, account, client_id, refs)`` to keep for later periods.
            finish: ``(owner, state, refs, error)`` to end the delivery with.
        """
        now = _now()
        with self.engine.begin() as conn:
            for write in writes:
                self._apply_step(conn, delivery_id, write, now)
            if client_refs is not None:
                target, account, client_id, refs = client_refs
                self._remember(conn, target, account, client_id, refs)
            if finish is not None:
                owner, state, refs_done, error = finish
                self._finish(conn, delivery_id, owner, state, refs_done, error, now)

    def _apply_step(
        self, conn: sa.Connection, delivery_id: int, write: StepWrite, now: datetime
    ) -> None:
        values: dict[str, Any] = {
            "state": write.state.value,
            "last_error": write.error,
            "updated_at": now,
        }
        if write.state is DeliveryState.IN_FLIGHT:
            values["idempotency_key"] = write.key
        else:
            values["refs"] = dumps(write.refs)
        if write.origin is not None:
            values["origin"] = write.origin.value
        if not write.new:
            started = write.state is DeliveryState.IN_FLIGHT

            def build() -> Any:
                update = steps_table.update().where(
                    steps_table.c.delivery_id == sa.bindparam("row_delivery"),
                    steps_table.c.step == sa.bindparam("row_step"),
                )
                if started:
                    update = update.values(attempts=steps_table.c.attempts + 1)
                return update

            statement = self._statement(f"step_update_{started}_{sorted(values)}", build)
            params = {"row_delivery": delivery_id, "row_step": write.step, **values}
            if conn.execute(statement, params).rowcount:
                return
        conn.execute(
            self._statement("step_insert", steps_table.insert),
            {
                "delivery_id": delivery_id,
                "step": write.step,
                "idempotency_key": write.key,
                "attempts": 1 if write.state is DeliveryState.IN_FLIGHT else 0,
                "refs": dumps(write.refs),
                "origin": None,
                **values,
            },
        )

    # Ids that belong to the client ----------------------------------------------------------

    def client_refs(self, target: str, account: str, client_id: str) -> dict[str, str]:
        """Ids recorded for the client at this target and account (e.g. its customer id)."""
        query = self._statement(
            "client_refs",
            lambda: sa.select(client_refs_table.c.name, client_refs_table.c.value).where(
                client_refs_table.c.target == sa.bindparam("target"),
                client_refs_table.c.account == sa.bindparam("account"),
                client_refs_table.c.client_id == sa.bindparam("client_id"),
            ),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                query, {"target": target, "account": account, "client_id": client_id}
            ).all()
        return {row.name: row.value for row in rows}

    def remember_client_refs(
        self, target: str, account: str, client_id: str, refs: Mapping[str, str]
    ) -> None:
        """Keep the client's ids for the next period."""
        with self.engine.begin() as conn:
            self._remember(conn, target, account, client_id, refs)

    def _remember(
        self,
        conn: sa.Connection,
        target: str,
        account: str,
        client_id: str,
        refs: Mapping[str, str],
    ) -> None:
        update = self._statement(
            "client_ref_update",
            lambda: client_refs_table.update().where(
                client_refs_table.c.target == sa.bindparam("row_target"),
                client_refs_table.c.account == sa.bindparam("row_account"),
                client_refs_table.c.client_id == sa.bindparam("row_client"),
                client_refs_table.c.name == sa.bindparam("row_name"),
            ),
        )
        for name, value in refs.items():
            where = {
                "row_target": target,
                "row_account": account,
                "row_client": client_id,
                "row_name": name,
            }
            # NOTE: a driver may report -1 (unknown) for a row count: only a 1 is trusted.
            if conn.execute(update, {**where, "value": value}).rowcount == 1:
                continue
            keys = {"target": target, "account": account, "client_id": client_id, "name": name}
            inserted = conn.execute(self._insert_new(client_refs_table), {**keys, "value": value})
            if inserted.rowcount != 1:  # another process kept it meanwhile: ours is as good
                conn.execute(update, {**where, "value": value})

    # Fees carried forward ---------------------------------------------------------------------

    def carried_into(self, period: str) -> dict[str, list[CarriedFee]]:
        """Fees of periods before ``period`` not yet billed, by client (oldest first).

        A carried fee is billed once an invoice recorded for another period carries a line with
        its period; an invoice of ``period`` itself does not count (a re-run of the same period
        bills the same lines again).
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(carried_fees_table)
                .where(carried_fees_table.c.period < period)
                .order_by(carried_fees_table.c.client_id, carried_fees_table.c.period)
            ).all()
        if not rows:
            return {}
        applied = self._carried_applied({row.client_id for row in rows}, exclude=period)
        found: dict[str, list[CarriedFee]] = {}
        for row in rows:
            if (row.client_id, row.period) in applied:
                continue
            found.setdefault(row.client_id, []).append(
                CarriedFee(row.period, row.currency, Decimal(row.amount))
            )
        return found

    def _carried_applied(
        self, clients: set[str], *, exclude: str | None = None
    ) -> dict[tuple[str, str], str]:
        """``(client, carried period) -> invoice number`` of every carried line recorded."""
        query = sa.select(
            invoices_table.c.client_id,
            invoices_table.c.number,
            invoices_table.c.period,
            invoices_table.c.document,
        ).where(invoices_table.c.client_id.in_(sorted(clients)))
        applied: dict[tuple[str, str], str] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                if row.period == exclude:
                    continue
                for line in json.loads(row.document).get("lines", []):
                    if line.get("kind") == LineKind.CARRIED_FORWARD.value and line.get(
                        "carried_from"
                    ):
                        applied[(row.client_id, line["carried_from"])] = row.number
        return applied

    def record_carried(self, client_id: str, period: str, currency: str, amount: Decimal) -> None:
        """Keep a period's fee that was carried forward (a corrected one while none billed it).

        Raises:
            InvoiceConflictError: Another fee of that period was billed on a later invoice.
        """
        applied = self._carried_applied({client_id}).get((client_id, period))
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(carried_fees_table).where(
                    carried_fees_table.c.client_id == client_id,
                    carried_fees_table.c.period == period,
                )
            ).one_or_none()
            text = format(amount, "f")
            if row is not None and row.amount == text and row.currency == currency:
                return
            if row is not None and applied is not None:
                raise InvoiceConflictError(
                    f"client {client_id}'s fee of {period} ({row.amount} {row.currency}) was "
                    f"carried forward and billed on invoice {applied}; it is now {text} "
                    f"{currency}: amend invoice {applied} instead"
                )
            if row is not None:
                conn.execute(
                    carried_fees_table.update()
                    .where(
                        carried_fees_table.c.client_id == client_id,
                        carried_fees_table.c.period == period,
                    )
                    .values(currency=currency, amount=text, recorded_at=_now())
                )
                return
            conn.execute(
                self._insert_new(carried_fees_table),
                {
                    "client_id": client_id,
                    "period": period,
                    "currency": currency,
                    "amount": text,
                    "recorded_at": _now(),
                },
            )

    def check_not_carried(self, client_id: str, period: str) -> None:
        """Refuse to invoice a period whose fee was carried and billed; forget an unbilled one.

        A carried fee not billed yet is dropped: the period's own invoice bills it now.

        Raises:
            InvoiceConflictError: The period's fee was carried and billed on a later invoice.
        """
        applied = self._carried_applied({client_id}).get((client_id, period))
        if applied is not None:
            raise InvoiceConflictError(
                f"client {client_id}'s fee of {period} was carried forward and billed on invoice "
                f"{applied}; its own invoice would bill it twice: amend invoice {applied} instead"
            )
        with self.engine.begin() as conn:
            conn.execute(
                carried_fees_table.delete().where(
                    carried_fees_table.c.client_id == client_id,
                    carried_fees_table.c.period == period,
                )
            )

    # Undated sources -------------------------------------------------------------------------

    def undated_source_period(self, sha256: str) -> tuple[str, str] | None:
        """The period (and file) an undated metrics file with this hash was billed for."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(undated_sources_table.c.period, undated_sources_table.c.location).where(
                    undated_sources_table.c.sha256 == sha256
                )
            ).one_or_none()
        return None if row is None else (row.period, row.location)

    def record_undated_source(self, sha256: str, period: str, location: str) -> tuple[str, str]:
        """Bind an undated metrics file to ``period``; returns the period it is bound to."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    undated_sources_table.insert().values(
                        sha256=sha256, period=period, location=location, recorded_at=_now()
                    )
                )
        except sa.exc.IntegrityError:
            pass
        found = self.undated_source_period(sha256)
        assert found is not None
        return found

    # Credentials ------------------------------------------------------------------------------

    def load_credentials(self, target: str, account: str) -> dict[str, str]:
        """The stored credentials of a provider account."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(credentials_table.c.name, credentials_table.c.value).where(
                    credentials_table.c.target == target, credentials_table.c.account == account
                )
            ).all()
        return {row.name: row.value for row in rows}

    def store_credentials(self, target: str, account: str, values: Mapping[str, str]) -> None:
        """Replace the stored credentials of a provider account in one transaction."""
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(
                credentials_table.delete().where(
                    credentials_table.c.target == target, credentials_table.c.account == account
                )
            )
            if values:
                conn.execute(
                    credentials_table.insert(),
                    [
                        {
                            "target": target,
                            "account": account,
                            "name": name,
                            "value": value,
                            "updated_at": now,
                        }
                        for name, value in values.items()
                    ],
                )

    def lock_account(self, target: str, account: str, owner: str, seconds: float) -> bool:
        """Take the account's lock for ``seconds`` unless a live holder has it."""
        now = time.time()
        where = (account_locks_table.c.target == target, account_locks_table.c.account == account)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(account_locks_table).where(*where)).one_or_none()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            account_locks_table.insert().values(
                                target=target,
                                account=account,
                                owner=owner,
                                lock_until=now + seconds,
                            )
                        )
                    return True
                except sa.exc.IntegrityError:
                    row = conn.execute(sa.select(account_locks_table).where(*where)).one()
            free = (
                row.owner is None
                or row.owner == owner
                or (row.lock_until or 0) < now
                or owner_is_dead(row.owner)
            )
            if not free:
                return False
            result = conn.execute(
                account_locks_table.update()
                .where(
                    *where,
                    sa.or_(
                        account_locks_table.c.owner.is_(None),
                        account_locks_table.c.owner == row.owner,
                    ),
                )
                .values(owner=owner, lock_until=now + seconds)
            )
            return bool(result.rowcount == 1)

    def unlock_account(self, target: str, account: str, owner: str) -> None:
        """Release the account's lock if ``owner`` holds it."""
        with self.engine.begin() as conn:
            conn.execute(
                account_locks_table.update()
                .where(
                    account_locks_table.c.target == target,
                    account_locks_table.c.account == account,
                    account_locks_table.c.owner == owner,
                )
                .values(owner=None, lock_until=None)
            )


def other_number_message(invoice: Invoice, other: str) -> str:
    """Why a second number for the same client, period and revision is refused."""
    return (
        f"client {invoice.client_id} already has invoice {other} for {invoice.period}; "
        f"{invoice.number} would bill the period twice (was the client's invoice_sequence "
        "changed? pin it back with invoice_sequence)"
    )


def conflict_message(invoice: Invoice, recorded_hash: str | None) -> str:
    """Why an invoice cannot be pushed under its number and revision."""
    shown = (recorded_hash or "?")[:12]
    return (
        f"invoice {invoice.number} revision {invoice.revision} was issued before with other "
        f"billed content (hash {shown}, now {invoice.billing_hash()[:12]}); "
        "a correction needs a new revision: review it with `kiki-billing push --amend --dry-run`, "
        "then issue it with `kiki-billing push --amend`"
    )


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
        lease_until=row.lease_until,
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
