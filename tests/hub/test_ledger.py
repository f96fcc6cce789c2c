"""The delivery ledger on SQLite and on a real PostgreSQL server, with the same code.

Every test runs against both backends (``ledger_url``): a SQLite file in ``tmp_path`` and a new
database on the throwaway PostgreSQL cluster of ``tests.support.postgres``. The race tests give
each thread its own :class:`Ledger` (its own engine, as a separate process would have) and check
that a delivery is claimed, and an invoice sent upstream, exactly once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import (
    DeliveryState,
    InvoiceConflictError,
    Ledger,
    owner_is_dead,
    process_owner,
)
from kiki_billing.hub.ledger.schema import deliveries_table, invoices_table
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.models import Invoice
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem
from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401

from .conftest import deliveries

HOST = socket.gethostname()
NOW = 1_000_000.0
ALL_BUT_DELIVERED = [DeliveryState.PENDING, DeliveryState.DEFERRED, DeliveryState.FAILED]
HUB_CLAIMABLE = [DeliveryState.PENDING, DeliveryState.DEFERRED]


# Helpers ------------------------------------------------------------------------------------


def invoice(number: int = 1, *, period: str = "2026-01", lines: int = 2) -> Invoice:
    inv = sample_invoice(lines=lines)
    return inv.model_copy(
        update={
            "number": f"KIKI-OaaS-{period.replace('-', '')}-{number:06d}",
            "client_id": f"client{number}",
            "period": period,
        }
    ).sealed()


def owner_of(pid: int) -> str:
    """``host:pid:start`` of a running process, read from /proc independently of the ledger."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        start = handle.read().rsplit(b")", 1)[1].split()[19].decode()
    return f"{HOST}:{pid}:{start}"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def run_at_once(jobs: list[Callable[[], Any]], timeout: float = 120.0) -> list[Any]:
    """Run ``jobs`` on threads released together by a barrier; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = jobs[index]()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a racing thread hung"
    if errors:
        raise errors[0]
    return results


# Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.server)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("postgres_db_url")


@pytest.fixture
def open_ledger(ledger_url: str) -> Iterator[Callable[..., Ledger]]:
    """Open more ledgers on the same database (each with its own engine), closed at the end."""
    opened: list[Ledger] = []

    def make(**kwargs: Any) -> Ledger:
        ledger = Ledger(ledger_url, **kwargs)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger: Callable[..., Ledger]) -> Ledger:
    return open_ledger()


@pytest.fixture
def live_owners() -> Iterator[Callable[[], tuple[str, subprocess.Popen[bytes]]]]:
    """Owner strings of real processes on this host, which ``owner_is_dead`` sees as alive."""
    started: list[subprocess.Popen[bytes]] = []

    def make() -> tuple[str, subprocess.Popen[bytes]]:
        proc = subprocess.Popen(["sleep", "600"])
        started.append(proc)
        return owner_of(proc.pid), proc

    yield make
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def raw_row(ledger: Ledger, delivery_id: int) -> Any:
    with ledger.engine.connect() as conn:
        return conn.execute(
            sa.select(deliveries_table).where(deliveries_table.c.id == delivery_id)
        ).one()


# Invoices -----------------------------------------------------------------------------------


def test_record_invoice_is_idempotent_and_keeps_the_document(ledger: Ledger) -> None:
    inv = invoice()
    ledger.record_invoice(inv)
    ledger.record_invoice(inv)
    assert ledger.load_invoice(inv.number, inv.revision) == inv
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM invoices").scalar_one() == 1


def test_record_invoice_refuses_changed_content_but_takes_a_new_revision(ledger: Ledger) -> None:
    inv = invoice()
    ledger.record_invoice(inv)
    changed = inv.model_copy(update={"client_name": "Someone Else"}).sealed()
    with pytest.raises(InvoiceConflictError, match="a correction needs a new revision"):
        ledger.record_invoice(changed)
    assert ledger.load_invoice(inv.number, 0) == inv
    corrected = changed.model_copy(update={"revision": 1}).sealed()
    ledger.record_invoice(corrected)
    assert ledger.load_invoice(inv.number, 1) == corrected


@pytest.mark.parametrize("same_content", [True, False])
def test_record_invoice_that_another_process_inserts_first(
    open_ledger: Callable[..., Ledger], same_content: bool
) -> None:
    """The insert loses the race (IntegrityError) after the look-up found nothing."""
    ours, theirs = open_ledger(), open_ledger()
    inv = invoice()
    other = inv if same_content else inv.model_copy(update={"client_name": "Other"}).sealed()
    fired: list[str] = []

    @sa.event.listens_for(ours.engine, "before_cursor_execute")
    def _insert_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO invoices") and not fired:
            fired.append(statement)
            theirs.record_invoice(other)

    if same_content:
        ours.record_invoice(inv)
    else:
        with pytest.raises(InvoiceConflictError):
            ours.record_invoice(inv)
    assert fired
    assert ours.load_invoice(inv.number, 0) == other


# Deliveries ---------------------------------------------------------------------------------


def test_ensure_delivery_is_idempotent(ledger: Ledger) -> None:
    inv = invoice()
    first = ledger.ensure_delivery(inv, "memory", "acct", {"customer": "cus_9"})
    second = ledger.ensure_delivery(inv, "memory", "acct", {"customer": "changed"})
    assert second == first
    assert first.state is DeliveryState.PENDING
    assert (first.attempts, first.refs, first.last_error, first.owner) == (0, {}, None, None)
    assert first.client_settings == {"customer": "cus_9"}
    assert (first.invoice_number, first.revision, first.target, first.account) == (
        inv.number,
        0,
        "memory",
        "acct",
    )
    assert (first.client_id, first.period, first.content_hash) == (
        inv.client_id,
        "2026-01",
        inv.content_hash,
    )
    assert len(ledger.deliveries()) == 1
    other_target = ledger.ensure_delivery(inv, "json", "acct", {})
    revised = inv.model_copy(update={"revision": 1}).sealed()
    other_revision = ledger.ensure_delivery(revised, "memory", "acct", {})
    assert len({first.id, other_target.id, other_revision.id}) == 3
    assert ledger.find_delivery(inv.number, 0, "memory", "acct") == first
    assert ledger.find_delivery(inv.number, 0, "nowhere", "acct") is None
    other_account = ledger.ensure_delivery(inv, "memory", "live:other", {})
    assert other_account.id != first.id
    assert ledger.find_delivery(inv.number, 0, "memory", "live:other") == other_account
    assert ledger.get_delivery(first.id) == first


def test_ensure_delivery_that_another_process_creates_first(
    open_ledger: Callable[..., Ledger],
) -> None:
    ours, theirs = open_ledger(), open_ledger()
    inv = invoice()
    created: list[int] = []

    @sa.event.listens_for(ours.engine, "before_cursor_execute")
    def _create_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO deliveries") and not created:
            created.append(theirs.ensure_delivery(inv, "memory", "acct", {}).id)

    record = ours.ensure_delivery(inv, "memory", "acct", {})
    assert created == [record.id]
    assert len(ours.deliveries()) == 1


def test_timestamps_are_recorded(ledger: Ledger) -> None:
    before = time.time()
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    row = raw_row(ledger, record.id)
    assert row.created_at is not None and row.updated_at is not None
    assert row.delivered_at is None

    def epoch(value: Any) -> float:
        # SQLite hands back naive UTC datetimes, PostgreSQL aware ones.
        return value.timestamp() if value.tzinfo else value.replace(tzinfo=UTC).timestamp()

    assert epoch(record.updated_at) == epoch(row.updated_at)

    assert before - 5 <= epoch(row.created_at) <= time.time() + 5
    owner = process_owner()
    assert ledger.claim(record.id, owner, HUB_CLAIMABLE, NOW)
    time.sleep(0.01)
    ledger.finish(record.id, owner, DeliveryState.DELIVERED, {"invoice_id": "inv_1"})
    done = raw_row(ledger, record.id)
    assert done.created_at == row.created_at
    assert done.updated_at > row.updated_at
    assert done.delivered_at == done.updated_at
    ledger.record_invoice(invoice())
    with ledger.engine.connect() as conn:
        (recorded_at,) = conn.execute(sa.select(invoices_table.c.recorded_at)).scalars()
    assert before - 5 <= epoch(recorded_at) <= time.time() + 5


def test_updated_at_is_aware_utc_on_every_backend(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert record.updated_at.utcoffset() == timedelta(0)


# Claims -------------------------------------------------------------------------------------


def test_pending_is_claimable_once_and_counts_an_attempt(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    me = process_owner()
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW)
    held = ledger.get_delivery(record.id)
    assert (held.state, held.owner, held.attempts) == (DeliveryState.IN_FLIGHT, me, 1)
    assert raw_row(ledger, record.id).lease_until == NOW + ledger.lease_seconds
    # Not even the holder claims it twice.
    assert not ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 1)
    assert ledger.get_delivery(record.id).attempts == 1


def test_a_live_holder_blocks_until_its_lease_expires(ledger: Ledger, live_owners) -> None:
    holder, _ = live_owners()
    assert not owner_is_dead(holder)
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.claim(record.id, holder, HUB_CLAIMABLE, NOW)
    me = process_owner()
    lease = ledger.lease_seconds
    assert not ledger.claim(record.id, me, ALL_BUT_DELIVERED, NOW + lease - 1)
    assert ledger.get_delivery(record.id).owner == holder
    # A heartbeat by someone else does not extend the holder's lease; the holder's does.
    ledger.heartbeat([record.id], me, NOW + lease)
    assert raw_row(ledger, record.id).lease_until == NOW + lease
    ledger.heartbeat([record.id], holder, NOW + 50)
    assert raw_row(ledger, record.id).lease_until == NOW + 50 + lease
    assert not ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + lease + 1)
    # The lease expired: the holder is presumed stuck or gone.
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 50 + lease + 1)
    taken = ledger.get_delivery(record.id)
    assert (taken.owner, taken.attempts) == (me, 2)


def test_a_holder_on_another_host_is_only_overtaken_by_lease_expiry(ledger: Ledger) -> None:
    remote = "some-other-host:1:1"
    assert not owner_is_dead(remote)
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.claim(record.id, remote, HUB_CLAIMABLE, NOW)
    me = process_owner()
    assert not ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 1)
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + ledger.lease_seconds + 1)


@pytest.mark.parametrize(
    "dead",
    [
        pytest.param(lambda: f"{HOST}:999999:0", id="no-such-pid"),
        pytest.param(lambda: f"{HOST}:{dead_pid()}:0", id="exited-pid"),
        # The pid runs, but it is another process than the one that claimed (pid reuse).
        pytest.param(lambda: f"{HOST}:{os.getpid()}:1", id="reused-pid"),
    ],
)
def test_a_dead_local_holder_is_stolen_before_its_lease_expires(
    ledger: Ledger, dead: Callable[[], str]
) -> None:
    owner = dead()
    if owner.split(":")[1] == "999999" and os.path.exists("/proc/999999"):
        pytest.skip("pid 999999 is running here")
    assert owner_is_dead(owner)
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.claim(record.id, owner, HUB_CLAIMABLE, NOW)
    me = process_owner()
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 1)
    taken = ledger.get_delivery(record.id)
    assert (taken.state, taken.owner, taken.attempts) == (DeliveryState.IN_FLIGHT, me, 2)


def test_a_holder_that_dies_is_stolen(ledger: Ledger, live_owners) -> None:
    holder, proc = live_owners()
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.claim(record.id, holder, HUB_CLAIMABLE, NOW)
    me = process_owner()
    assert not ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 1)
    proc.kill()
    proc.wait()
    assert owner_is_dead(holder)
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 2)


def test_delivered_is_never_claimable(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    me = process_owner()
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW)
    ledger.finish(record.id, me, DeliveryState.DELIVERED, {"invoice_id": "inv_1"})
    far_future = NOW + 10 * ledger.lease_seconds
    for owner in (me, f"{HOST}:999999:0", "some-other-host:1:1"):
        assert not ledger.claim(record.id, owner, ALL_BUT_DELIVERED, far_future)
    done = ledger.get_delivery(record.id)
    assert (done.state, done.owner, done.attempts) == (DeliveryState.DELIVERED, None, 1)
    assert done.refs == {"invoice_id": "inv_1"}


def test_failed_is_claimable_only_when_asked(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    me = process_owner()
    assert ledger.claim(record.id, me, HUB_CLAIMABLE, NOW)
    ledger.finish(record.id, me, DeliveryState.FAILED, {"customer_id": "cus_1"}, "draft: 400")
    failed = ledger.get_delivery(record.id)
    assert (failed.state, failed.last_error, failed.owner) == (
        DeliveryState.FAILED,
        "draft: 400",
        None,
    )
    assert raw_row(ledger, record.id).delivered_at is None
    assert not ledger.claim(record.id, me, HUB_CLAIMABLE, NOW + 1)
    assert ledger.claim(record.id, me, [*HUB_CLAIMABLE, DeliveryState.FAILED], NOW + 1)
    again = ledger.get_delivery(record.id)
    assert (again.state, again.attempts) == (DeliveryState.IN_FLIGHT, 2)


def test_deferred_is_claimable_and_defer_only_touches_unstarted(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    ledger.defer(record.id, "deferred: circuit open")
    deferred = ledger.get_delivery(record.id)
    assert (deferred.state, deferred.last_error) == (
        DeliveryState.DEFERRED,
        "deferred: circuit open",
    )
    assert not ledger.claim(record.id, process_owner(), [DeliveryState.PENDING], NOW)
    assert ledger.claim(record.id, process_owner(), HUB_CLAIMABLE, NOW)
    ledger.defer(record.id, "too late")
    assert ledger.get_delivery(record.id).state is DeliveryState.IN_FLIGHT


def test_finish_only_by_the_owner(ledger: Ledger, live_owners) -> None:
    holder, _ = live_owners()
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.claim(record.id, holder, HUB_CLAIMABLE, NOW)
    ledger.finish(record.id, process_owner(), DeliveryState.DELIVERED, {"x": "1"})
    held = ledger.get_delivery(record.id)
    assert (held.state, held.owner, held.refs) == (DeliveryState.IN_FLIGHT, holder, {})
    ledger.finish(record.id, holder, DeliveryState.DEFERRED, {"invoice_id": "inv_1"}, "503")
    done = ledger.get_delivery(record.id)
    assert (done.state, done.owner, done.refs, done.last_error) == (
        DeliveryState.DEFERRED,
        None,
        {"invoice_id": "inv_1"},
        "503",
    )
    assert raw_row(ledger, record.id).lease_until is None
    # A late finish by the former holder no longer changes anything.
    ledger.finish(record.id, holder, DeliveryState.DELIVERED, {})
    assert ledger.get_delivery(record.id).state is DeliveryState.DEFERRED


# Steps --------------------------------------------------------------------------------------


def test_step_transitions_count_attempts_and_keep_refs_and_errors(ledger: Ledger) -> None:
    record = ledger.ensure_delivery(invoice(), "memory", "acct", {})
    assert ledger.steps(record.id) == {}
    ledger.step_started(record.id, "draft", "key-draft")
    (draft,) = ledger.steps(record.id).values()
    assert (draft.step, draft.idempotency_key, draft.state, draft.attempts) == (
        "draft",
        "key-draft",
        DeliveryState.IN_FLIGHT,
        1,
    )
    assert (draft.refs, draft.last_error) == ({}, None)
    ledger.step_finished(record.id, "draft", "key-draft", DeliveryState.DEFERRED, error="503")
    draft = ledger.steps(record.id)["draft"]
    assert (draft.state, draft.attempts, draft.last_error) == (DeliveryState.DEFERRED, 1, "503")
    ledger.step_started(record.id, "draft", "key-draft")
    assert ledger.steps(record.id)["draft"].state is DeliveryState.IN_FLIGHT
    assert ledger.steps(record.id)["draft"].attempts == 2
    ledger.step_finished(
        record.id, "draft", "key-draft", DeliveryState.DELIVERED, {"invoice_id": "inv_7"}
    )
    draft = ledger.steps(record.id)["draft"]
    assert (draft.state, draft.attempts, draft.refs, draft.last_error) == (
        DeliveryState.DELIVERED,
        2,
        {"invoice_id": "inv_7"},
        None,
    )
    # Found upstream without sending: recorded with no attempt.
    ledger.step_finished(
        record.id, "customer", "key-cus", DeliveryState.DELIVERED, {"customer_id": "cus_1"}
    )
    steps = ledger.steps(record.id)
    assert set(steps) == {"draft", "customer"}
    assert (steps["customer"].attempts, steps["customer"].idempotency_key) == (0, "key-cus")
    # Steps belong to one delivery.
    other = ledger.ensure_delivery(invoice(2), "memory", "acct", {})
    assert ledger.steps(other.id) == {}


# Client ids ---------------------------------------------------------------------------------


def test_client_refs_are_remembered_and_updated(ledger: Ledger) -> None:
    assert ledger.client_refs("memory", "acct", "client1") == {}
    ledger.remember_client_refs("memory", "acct", "client1", {"customer_id": "cus_1"})
    ledger.remember_client_refs("memory", "acct", "client1", {"customer_id": "cus_1"})
    assert ledger.client_refs("memory", "acct", "client1") == {"customer_id": "cus_1"}
    ledger.remember_client_refs(
        "memory", "acct", "client1", {"customer_id": "cus_2", "contact_id": "c_9"}
    )
    assert ledger.client_refs("memory", "acct", "client1") == {
        "customer_id": "cus_2",
        "contact_id": "c_9",
    }
    assert ledger.client_refs("memory", "other-acct", "client1") == {}
    assert ledger.client_refs("stripe", "acct", "client1") == {}
    assert ledger.client_refs("memory", "acct", "client2") == {}


# Listing ------------------------------------------------------------------------------------


def test_deliveries_filters_and_order(ledger: Ledger) -> None:
    jan1, jan2, feb1 = invoice(1), invoice(2), invoice(1, period="2026-02")
    a = ledger.ensure_delivery(jan2, "memory", "acct", {})
    b = ledger.ensure_delivery(feb1, "memory", "acct", {})
    c = ledger.ensure_delivery(jan1, "memory", "acct", {})
    d = ledger.ensure_delivery(jan1, "json", "acct", {})
    me = process_owner()
    assert ledger.claim(c.id, me, HUB_CLAIMABLE, NOW)
    ledger.finish(c.id, me, DeliveryState.DELIVERED, {})
    ledger.defer(a.id, "circuit open")

    def ids(**filters: Any) -> list[int]:
        return [r.id for r in ledger.deliveries(**filters)]

    assert ids() == [d.id, c.id, a.id, b.id]
    assert ids(period="2026-01") == [d.id, c.id, a.id]
    assert ids(period="2026-03") == []
    assert ids(target="json") == [d.id]
    assert ids(client_id="client1") == [d.id, c.id, b.id]
    assert ids(states=[DeliveryState.PENDING]) == [d.id, b.id]
    assert ids(states=[DeliveryState.DELIVERED, DeliveryState.DEFERRED]) == [c.id, a.id]
    assert ids(states=[]) == []
    assert ids(period="2026-01", target="memory", states=[DeliveryState.DELIVERED]) == [c.id]


# Liveness of owners -------------------------------------------------------------------------


def test_owner_liveness(live_owners) -> None:
    assert process_owner() == owner_of(os.getpid())
    assert not owner_is_dead(process_owner())
    alive, proc = live_owners()
    assert not owner_is_dead(alive)
    assert owner_is_dead(None) and owner_is_dead("")
    assert owner_is_dead(f"{HOST}:{dead_pid()}:0")
    # The same pid with another start time is another process: made-up start times look dead,
    # so fake hub owners in the race tests are real processes, not ``pid:a`` / ``pid:b``. What
    # follows ``host:pid:start`` (a thread of a lock holder) does not change who it is.
    assert not owner_is_dead(f"{process_owner()}:a")
    assert owner_is_dead(f"{HOST}:{os.getpid()}:a")
    assert not owner_is_dead("elsewhere:1:1")  # another host: cannot tell, so alive
    proc.kill()
    proc.wait()
    assert owner_is_dead(alive)


# Races --------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["pending", "dead-holder"])
def test_concurrent_claims_take_each_delivery_exactly_once(
    open_ledger: Callable[..., Ledger], live_owners, start: str
) -> None:
    threads, count = 8, 25
    setup = open_ledger()
    ids = [setup.ensure_delivery(invoice(n), "memory", "acct", {}).id for n in range(count)]
    if start == "dead-holder":
        dead = f"{HOST}:{dead_pid()}:0"
        for delivery_id in ids:
            assert setup.claim(delivery_id, dead, HUB_CLAIMABLE, NOW)
    # One ledger (engine) per racer, opened before the race.
    racers = [(open_ledger(), live_owners()[0]) for _ in range(threads)]
    now = time.time()

    def race(ledger: Ledger, owner: str) -> list[int]:
        order = ids[:]
        random.shuffle(order)
        return [i for i in order if ledger.claim(i, owner, HUB_CLAIMABLE, now)]

    won = run_at_once([lambda lg=lg, ow=ow: race(lg, ow) for lg, ow in racers])
    claims = Counter(i for taken in won for i in taken)
    assert claims == Counter(ids), claims
    owners = {ow for _, ow in racers}
    for index, (_, owner) in enumerate(racers):
        for delivery_id in won[index]:
            record = setup.get_delivery(delivery_id)
            assert (record.state, record.owner) == (DeliveryState.IN_FLIGHT, owner)
            assert record.attempts == (2 if start == "dead-holder" else 1)
    assert {setup.get_delivery(i).owner for i in ids} <= owners


def test_processes_opening_a_new_ledger_at_once(ledger_url: str) -> None:
    def open_and_use() -> int:
        ledger = Ledger(ledger_url)
        try:
            return ledger.ensure_delivery(invoice(), "memory", "acct", {}).id
        finally:
            ledger.close()

    ids = run_at_once([open_and_use] * 8)
    assert len(set(ids)) == 1


def test_two_hubs_pushing_at_once_deliver_each_invoice_once(
    open_ledger: Callable[..., Ledger], live_owners
) -> None:
    count = 16
    system = MemoryBillingSystem()
    invoices = [invoice(n, lines=3) for n in range(1, count + 1)]
    hubs = []
    for _ in range(2):
        hub = Hub(
            open_ledger(),
            {"memory": MemoryAdapter(system=system)},
            RetryPolicy(max_attempts=2, initial_wait=0),
            sleep=lambda _seconds: None,
        )
        hub.owner = live_owners()[0]
        hubs.append(hub)
    assert hubs[0].owner != hubs[1].owner

    results = run_at_once([lambda h=h: h.push(deliveries(*invoices)) for h in hubs])

    for inv in invoices:
        (upstream,) = system.invoices_numbered(inv.number)
        assert upstream["status"] == "open"
        assert set(upstream["lines"]) == {1, 2, 3}
    sent = Counter(op for op, _ in system.calls)
    assert sent["create_invoice"] == count
    assert sent["finalize"] == count
    assert sent["add_line"] == 3 * count
    writes = [call for call in system.calls if call[1] is not None]
    assert len(writes) == len(set(writes))  # no key sent twice
    settled = (DeliveryState.DELIVERED, DeliveryState.IN_FLIGHT)
    assert all(o.state in settled for result in results for o in result)
    fresh = [o for result in results for o in result if o.note is None]
    assert sorted(o.invoice_number for o in fresh) == sorted(i.number for i in invoices)
    assert all(o.state is DeliveryState.DELIVERED for o in fresh)
    records = hubs[0].ledger.deliveries()
    assert len(records) == count
    for record in records:
        assert (record.state, record.owner, record.attempts) == (DeliveryState.DELIVERED, None, 1)
        assert set(record.refs) >= {"customer_id", "invoice_id", "status"}


# Secrets ------------------------------------------------------------------------------------


@pytest.mark.server
def test_ledger_password_never_appears_in_errors_or_logs(
    postgres_url: str,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kiki_billing.cli_delivery import open_ledger as cli_ledger
    from kiki_billing.errors import ConfigurationError
    from kiki_billing.hub.settings import HubSettings

    secret = "s3cr3t-Pw"
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    logging.getLogger("sqlalchemy.pool").setLevel(logging.DEBUG)
    good = sa.make_url(postgres_db_url).set(password=secret)
    missing = good.set(database="no_such_database")
    refused = good.set(port=1)
    try:
        # Trust authentication: the password is accepted and ignored.
        ledger = Ledger(good.render_as_string(hide_password=False))
        try:
            ledger.record_invoice(invoice())
            assert secret not in repr(ledger) + repr(ledger.engine) + str(ledger.engine.url)
        finally:
            ledger.close()
        for url in (missing, refused):
            raw = url.render_as_string(hide_password=False)
            with pytest.raises(sa.exc.OperationalError) as caught:
                Ledger(raw)
            assert secret not in str(caught.value) + repr(caught.value)
            monkeypatch.setenv("KIKI_LEDGER_URL", raw)
            with pytest.raises(ConfigurationError) as clear, cli_ledger(HubSettings()):
                pass
            message = str(clear.value)
            assert secret not in message
            assert "cannot open the ledger postgresql+psycopg://postgres:***@127.0.0.1:" in message
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
        logging.getLogger("sqlalchemy.pool").setLevel(logging.WARNING)
    assert caplog.records, "the SQLAlchemy logs were not captured"
    assert secret not in caplog.text
