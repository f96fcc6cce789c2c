"""The ledger's tables, its schema version, and the migrations between versions.

Version 2 keys a delivery by (invoice, revision, target, **account**), records how each step's
ids were obtained (``origin``), keeps rotating provider credentials with a per-account lock,
and compares invoices by the hash of what is billed (not of the evidence). A version-1 ledger
(no ``kiki_meta`` table) is migrated in place the first time it is opened.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

SCHEMA_VERSION = 2


class DeliveryState(StrEnum):
    """Where a delivery (one invoice to one target account) stands."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"


class StepOrigin(StrEnum):
    """How a step's ids were obtained."""

    SENT = "sent"
    """This delivery created the object (so objects under it cannot exist yet)."""
    FOUND = "found"
    """A look-up by natural key found it upstream."""
    SKIPPED = "skipped"
    """Nothing to send (configured, or known from an earlier period)."""


metadata = sa.MetaData()

meta_table = sa.Table(
    "kiki_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

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
    sa.Column("account", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("client_settings", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("refs", sa.Text, nullable=False, default="{}"),
    sa.Column("last_error", sa.Text),
    sa.Column("owner", sa.Text),
    sa.Column("lease_until", sa.Float),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("invoice_number", "revision", "target", "account", name="uq_delivery"),
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
    sa.Column("origin", sa.String(16)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

client_refs_table = sa.Table(
    "client_refs",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

credentials_table = sa.Table(
    "credentials",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

account_locks_table = sa.Table(
    "account_locks",
    metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text),
    sa.Column("lock_until", sa.Float),
)


carried_fees_table = sa.Table(
    "carried_fees",
    metadata,
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("period", sa.String(32), primary_key=True),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.String(32), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)
"""Fees below a contract's ``carry_forward_below``: not issued for their period, billed on the
client's next invoice (a line per period). Applied once an invoice recorded for a later period
carries a line with that period (``carried_from``)."""


undated_sources_table = sa.Table(
    "undated_sources",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("period", sa.String(32), nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)
"""Metrics files without a period column, and the one period each was billed for."""


def billing_hash_of_document(document: str) -> str:
    """The billing hash of an invoice stored as canonical JSON (see ``Invoice.billing_hash``)."""
    from kiki_billing.models import Invoice

    return Invoice.model_validate_json(document).billing_hash()


def create_or_migrate(conn: sa.Connection) -> None:
    """Create a new ledger's tables, or bring an older one to :data:`SCHEMA_VERSION`.

    Runs inside the caller's transaction (serialised across processes by the caller).
    """
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())
    if "deliveries" in existing and "kiki_meta" not in existing:
        _migrate_v1(conn, inspector)
        inspector = sa.inspect(conn)
    _add_missing_columns(conn, inspector, existing)
    metadata.create_all(conn)
    version = conn.execute(
        sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
    ).scalar()
    if version is None:
        # Another process opening the same new ledger may insert it first (SQLite takes no
        # lock for the read above): a conflict is that, not an error.
        conn.execute(
            _insert_unless_present(conn).values(key="schema_version", value=str(SCHEMA_VERSION))
        )
    elif int(version) > SCHEMA_VERSION:
        raise RuntimeError(
            f"the ledger has schema version {version}; this kiki-billing knows up to "
            f"{SCHEMA_VERSION}: upgrade kiki-billing"
        )


def _insert_unless_present(conn: sa.Connection) -> Any:
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(meta_table).on_conflict_do_nothing()
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(meta_table).on_conflict_do_nothing()
    return meta_table.insert()


def _add_missing_columns(conn: sa.Connection, inspector: Any, existing: set[str]) -> None:
    """Add every nullable column the schema defines that an existing table lacks.

    Additive changes need no version of their own: a ledger written before a column existed
    gets it (empty) when it is next opened.
    """
    for table in metadata.sorted_tables:
        if table.name not in existing:
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.primary_key:
                raise RuntimeError(
                    f"the ledger's {table.name} table lacks the required column {column.name}"
                )
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


def _migrate_v1(conn: sa.Connection, inspector: Any) -> None:
    """Version 1: deliveries unique per (invoice, revision, target); hashes over the evidence."""
    if conn.dialect.name == "sqlite":
        # NOTE: SQLite cannot drop a constraint: rebuild the table (sqlite.org/lang_altertable
        # "other kinds of table schema changes": create new, copy, drop old, rename new).
        old_columns = {c["name"] for c in inspector.get_columns("deliveries")}
        columns = ", ".join(c.name for c in deliveries_table.columns if c.name in old_columns)
        conn.execute(sa.text("ALTER TABLE deliveries RENAME TO deliveries_v1"))
        conn.execute(sa.text("DROP INDEX IF EXISTS ix_deliveries_period"))
        conn.execute(sa.text("DROP INDEX IF EXISTS ix_deliveries_state"))
        deliveries_table.create(conn)
        conn.execute(
            sa.text(f"INSERT INTO deliveries ({columns}) SELECT {columns} FROM deliveries_v1")  # noqa: S608
        )
        conn.execute(sa.text("DROP TABLE deliveries_v1"))
    else:
        conn.execute(sa.text("ALTER TABLE deliveries DROP CONSTRAINT uq_delivery"))
        conn.execute(
            sa.text(
                "ALTER TABLE deliveries ADD CONSTRAINT uq_delivery "
                "UNIQUE (invoice_number, revision, target, account)"
            )
        )
        conn.execute(sa.text("ALTER TABLE deliveries ALTER COLUMN account TYPE TEXT"))
        conn.execute(sa.text("ALTER TABLE client_refs ALTER COLUMN account TYPE TEXT"))
        conn.execute(sa.text("ALTER TABLE client_refs ALTER COLUMN value TYPE TEXT"))
    # Content hashes become hashes of what is billed; the stored documents stay as issued.
    rows = conn.execute(
        sa.select(invoices_table.c.number, invoices_table.c.revision, invoices_table.c.document)
    ).all()
    for row in rows:
        billing = billing_hash_of_document(row.document)
        conn.execute(
            invoices_table.update()
            .where(invoices_table.c.number == row.number, invoices_table.c.revision == row.revision)
            .values(content_hash=billing)
        )
        conn.execute(
            deliveries_table.update()
            .where(
                deliveries_table.c.invoice_number == row.number,
                deliveries_table.c.revision == row.revision,
            )
            .values(content_hash=billing)
        )


def dumps(value: Any) -> str:
    """JSON as the ledger stores it (sorted keys)."""
    return json.dumps(value, sort_keys=True)
