"""A ledger written by the first released schema is upgraded in place, history intact.

Version 1 keyed a delivery by (invoice, revision, target) and hashed invoices over their
evidence; version 2 keys it by account too and hashes what is billed. The upgrade must keep
every delivery, step and client id, so that a push after it finds what was delivered before
and sends nothing twice.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import SCHEMA_VERSION, DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem, MemoryClientSettings
from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401

V1 = sa.MetaData()
sa.Table(
    "invoices",
    V1,
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
sa.Table(
    "deliveries",
    V1,
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
sa.Table(
    "delivery_steps",
    V1,
    sa.Column("delivery_id", sa.Integer, sa.ForeignKey("deliveries.id"), primary_key=True),
    sa.Column("step", sa.String(64), primary_key=True),
    sa.Column("idempotency_key", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("refs", sa.Text, nullable=False, default="{}"),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Table(
    "client_refs",
    V1,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("account", sa.String(128), primary_key=True),
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.server)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("postgres_db_url")


def write_v1_ledger(url: str) -> dict:
    """A version-1 ledger holding one delivered invoice, as the first release left it."""
    invoice = sample_invoice()
    # Version 1 hashed the whole document, evidence included: another hash than today's.
    document = json.loads(invoice.canonical_json())
    document["content_hash"] = "0" * 64
    now = datetime.now(UTC)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        V1.create_all(conn)
        conn.execute(
            V1.tables["invoices"]
            .insert()
            .values(
                number=invoice.number,
                revision=0,
                client_id=invoice.client_id,
                period=invoice.period,
                currency=invoice.currency,
                total_fee=str(invoice.total_fee),
                content_hash="0" * 64,
                document=json.dumps(document, sort_keys=True),
                recorded_at=now,
            )
        )
        delivery_id = conn.execute(
            V1.tables["deliveries"]
            .insert()
            .values(
                invoice_number=invoice.number,
                revision=0,
                client_id=invoice.client_id,
                period=invoice.period,
                target="memory",
                account="default",
                content_hash="0" * 64,
                client_settings="{}",
                state="delivered",
                attempts=1,
                refs=json.dumps({"customer_id": "cus_1", "invoice_id": "inv_2"}),
                created_at=now,
                updated_at=now,
                delivered_at=now,
            )
        ).inserted_primary_key[0]
        conn.execute(
            V1.tables["delivery_steps"]
            .insert()
            .values(
                delivery_id=delivery_id,
                step="draft",
                idempotency_key="k1-" + "a" * 32,
                state="delivered",
                attempts=1,
                refs=json.dumps({"invoice_id": "inv_2"}),
                updated_at=now,
            )
        )
        conn.execute(
            V1.tables["client_refs"]
            .insert()
            .values(
                target="memory",
                account="default",
                client_id=invoice.client_id,
                name="customer_id",
                value="cus_1",
            )
        )
    engine.dispose()
    return {"invoice": invoice, "delivery_id": delivery_id}


def test_a_version_1_ledger_is_upgraded_with_its_history(url: str) -> None:
    old = write_v1_ledger(url)
    invoice = old["invoice"]
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        version = conn.execute(sa.text("SELECT value FROM kiki_meta")).scalar()
    assert version == str(SCHEMA_VERSION)
    (record,) = ledger.deliveries()
    assert (record.id, record.state, record.account) == (
        old["delivery_id"],
        DeliveryState.DELIVERED,
        "default",
    )
    # Hashes now name what is billed: the same invoice computed again is not a conflict.
    assert record.content_hash == invoice.billing_hash()
    assert ledger.invoice_conflict(invoice) is None
    assert ledger.steps(record.id)["draft"].refs == {"invoice_id": "inv_2"}
    assert ledger.client_refs("memory", "default", invoice.client_id) == {"customer_id": "cus_1"}
    # The stored document stays as it was issued.
    assert ledger.load_invoice(invoice.number, 0).content_hash == "0" * 64

    system = MemoryBillingSystem()
    hub = Hub(ledger, {"memory": MemoryAdapter(system=system)}, RetryPolicy())
    delivery = Delivery(invoice, "memory", MemoryClientSettings(), "default")
    (again,) = hub.push([delivery])
    assert again.state is DeliveryState.DELIVERED and again.note == "delivered before"
    assert system.calls == []
    # The account is now part of the key: another account is another delivery.
    other = Delivery(invoice, "memory", MemoryClientSettings(), "live:other")
    (elsewhere,) = hub.push([other])
    assert elsewhere.state is DeliveryState.DELIVERED and elsewhere.note is None
    assert len(ledger.deliveries()) == 2
    ledger.close()
    # Opening it again changes nothing.
    reopened = Ledger(url)
    assert len(reopened.deliveries()) == 2
    reopened.close()


def test_a_column_added_to_the_schema_is_added_to_an_existing_ledger(url: str) -> None:
    Ledger(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE delivery_steps DROP COLUMN origin"))
    engine.dispose()
    ledger = Ledger(url)
    columns = {c["name"] for c in sa.inspect(ledger.engine).get_columns("delivery_steps")}
    assert "origin" in columns
    ledger.close()


def test_processes_upgrading_one_ledger_at_once_upgrade_it_once(url: str) -> None:
    from tests.hub.test_ledger import run_at_once

    write_v1_ledger(url)

    def open_it() -> int:
        ledger = Ledger(url)
        try:
            return len(ledger.deliveries())
        finally:
            ledger.close()

    assert run_at_once([open_it] * 6) == [1] * 6
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM kiki_meta")).scalar() == 1
    ledger.close()


def test_an_upgrade_that_fails_halfway_leaves_the_old_ledger_whole(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_v1_ledger(url)
    from kiki_billing.hub.ledger import schema

    def killed(document: str) -> str:
        raise RuntimeError("killed while rehashing invoices")

    monkeypatch.setattr(schema, "billing_hash_of_document", killed)
    with pytest.raises(RuntimeError, match="killed"):
        Ledger(url)
    engine = sa.create_engine(url)
    tables = set(sa.inspect(engine).get_table_names())
    assert "kiki_meta" not in tables and "deliveries_v1" not in tables
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM deliveries")).scalar() == 1
    engine.dispose()
    monkeypatch.undo()
    ledger = Ledger(url)  # the next opening upgrades it
    assert len(ledger.deliveries()) == 1
    ledger.close()
