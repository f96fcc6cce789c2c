"""Crash recovery: ``kiki-billing push`` killed with SIGKILL at random moments, then run again.

A real ``kiki-billing push`` subprocess delivers a period's invoices to a local Stripe-compatible
fake (a separate process that honours ``Idempotency-Key``). It is killed with SIGKILL at seeded
random moments and restarted, and finally run to completion. Then, from the fake's own state,
every invoice exists upstream exactly once with the right lines, amounts and status, every client
has exactly one customer, and the ledger shows every delivery ``delivered``. The same holds with
two pushes started at the same moment, and with one of two concurrent pushes killed and restarted
while the other runs.

Half of the kills come at a random delay after the start (start-up, reading the ledger, or any
step), half at a random delay after the run has claimed a delivery (mid-delivery, whatever the
machine's load). The fake answers some writes late (after the operation ran), and its customer
search lags as Stripe's does, so a kill often leaves a step done upstream but unknown to the
ledger; the re-run must settle it by looking the object up or by re-sending it under the same
key, which the fake then answers with ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiki_billing.models import BillingPeriod, Invoice, LineKind
from kiki_billing.pipeline import MetricsSource, compute_period
from tests.support.fake_stripe import spawn_fake_stripe

pytestmark = [
    pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"]),
    # Slow (tens of seconds), but part of the README's test command and of CI.
    pytest.mark.slow,
]

KIKI = Path(sys.executable).with_name("kiki-billing")
SEED = 20260131
CLIENTS = 15
COLLECTIONS = ("auto", "now", "send_invoice")
EXPECTED_STATUS = {"auto": "open", "now": "paid", "send_invoice": "open"}
# Writes the fake answers late: the operation ran and its result is kept under the key, but the
# client hears of it only after this many seconds (a kill in between leaves an unknown outcome).
# The first matching fault applies; a path without "*" is a prefix (drafts and finalize here).
SLOW_WRITES = (
    ("POST", "/v1/customers", 0.3),
    ("POST", "/v1/invoices/*/send", 0.5),
    ("POST", "/v1/invoices/*/pay", 0.2),
    ("POST", "/v1/invoices", 0.1),
)
RUN_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class Fake:
    """Control of the fake Stripe process over its ``/_fake`` endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        """Forget every object, key, request and fault; answer the slow writes late."""
        self._call("POST", "/_fake/reset", {})
        self._call(
            "POST",
            "/_fake/faults",
            [
                {"preset": "delay", "method": method, "path": path, "seconds": seconds}
                | {"after": True, "times": 1_000_000}
                for method, path, seconds in SLOW_WRITES
            ],
        )

    def state(self) -> dict[str, Any]:
        """``GET /_fake/state``."""
        state: dict[str, Any] = self._call("GET", "/_fake/state")
        return state


@pytest.fixture(scope="module")
def fake_process() -> Iterator[str]:
    """One fake Stripe process for the module (stopped by its pid): 10 ms per request, and
    customers show in ``/search`` only after 30 s (Stripe's search is not read-after-write)."""
    args = ("--latency", "0.01", "--search-lag", "30", "--seed", str(SEED))
    with spawn_fake_stripe(*args) as (url, _process):
        yield url


@pytest.fixture
def fake(fake_process: str) -> Fake:
    """The module's fake, reset for this test."""
    control = Fake(fake_process)
    control.reset()
    return control


# --------------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------------


def contracts_toml() -> str:
    """Fifteen Stripe clients: every collection mode, a minimum fee, a fee cap, one in EUR."""
    parts = [
        "[defaults]\n"
        'currency = "USD"\n'
        'baseline_roas = "3.0"\n'
        'share_rate = "0.10"\n'
        "payment_terms_days = 30\n"
    ]
    for index in range(CLIENTS):
        extra = {
            3: 'minimum_fee = "5000.00"\n',  # a positive adjustment line
            4: 'fee_cap = "150.00"\n',  # a negative adjustment line
            5: 'currency = "EUR"\n',
        }.get(index, "")
        parts.append(
            "[[clients]]\n"
            f'id = "client-{index:02d}"\n'
            f'name = "Client {index:02d} Ltd"\n'
            f'email = "ap@client-{index:02d}.example"\n'
            'targets = ["stripe"]\n'
            f"{extra}"
            "[clients.stripe]\n"
            f'collection = "{COLLECTIONS[index % 3]}"\n'
        )
    return "\n".join(parts)


def metrics_csv(periods: list[str]) -> str:
    """One to three campaigns per client and period, amounts with cents, every fee positive."""
    rng = random.Random(SEED)
    rows = ["client_id,campaign_id,spend,ltv,period"]
    for period in periods:
        for index in range(CLIENTS):
            for campaign in range(1 + index % 3):
                spend = Decimal(rng.randint(50_000, 900_000)) / 100
                ltv = spend * 3 + Decimal(rng.randint(1_000, 600_000)) / 100
                rows.append(
                    f"client-{index:02d},camp-{index:02d}-{campaign},{spend},{ltv},{period}"
                )
    return "\n".join(rows) + "\n"


def collection_of(client_id: str) -> str:
    return COLLECTIONS[int(client_id.rsplit("-", 1)[1]) % 3]


# --------------------------------------------------------------------------------------------
# Runs, kills and the ledger
# --------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What the kills did."""

    kills: int = 0
    mid_delivery: int = 0
    """Kills that left a delivery of the killed process ``in_flight`` in the ledger."""
    mid_step: int = 0
    """Kills that left a step of the killed process ``in_flight``: its outcome unknown."""
    finished_first: int = 0
    """Runs that had ended by themselves when their kill came."""
    exit_codes: Counter[int] = field(default_factory=Counter)
    """Of the runs that ended by themselves."""

    def line(self) -> str:
        return (
            f"kills={self.kills} mid-delivery={self.mid_delivery} mid-step={self.mid_step} "
            f"finished-first={self.finished_first} exit-codes={dict(self.exit_codes)}"
        )


@dataclass
class Workspace:
    """A contracts file, a metrics file, a ledger and the environment of every run."""

    root: Path
    fake: Fake
    periods: list[str]
    runs: int = 0
    pushed: list[str] = field(default_factory=list)
    """The periods pushed so far, in order."""

    def __post_init__(self) -> None:
        (self.root / "contracts.toml").write_text(contracts_toml())
        (self.root / "metrics.csv").write_text(metrics_csv(self.periods))
        (self.root / "logs").mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
        self.env = base | {
            "KIKI_DATA_DIR": str(self.root / "data"),
            "KIKI_LOG_LEVEL": "ERROR",
            "KIKI_ADAPTER_PACKAGES": "kiki-billing",
            "KIKI_STRIPE_API_KEY": "sk_test_kiki_crash_recovery",
            "KIKI_STRIPE_API_BASE": self.fake.url,
            "KIKI_STRIPE_RATE_LIMIT": "1000",
            # Three in flight: a push spans many steps, so kills land among them.
            "KIKI_STRIPE_CONCURRENCY": "3",
            "KIKI_RETRY_INITIAL_WAIT": "0.05",
            "KIKI_RETRY_MAX_WAIT": "0.5",
        }

    # -- runs ---------------------------------------------------------------------------------

    def start_push(self, period: str) -> subprocess.Popen[bytes]:
        """Start ``kiki-billing push`` for ``period``; its output goes to ``logs/``."""
        self.runs += 1
        if period not in self.pushed:
            self.pushed.append(period)
        with (self.root / "logs" / f"run-{self.runs:03d}.log").open("wb") as log:
            return subprocess.Popen(
                [
                    str(KIKI),
                    "push",
                    "--period",
                    period,
                    "--contracts",
                    str(self.root / "contracts.toml"),
                    "--metrics",
                    str(self.root / "metrics.csv"),
                ],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, run: int | None = None) -> str:
        name = f"run-{run or self.runs:03d}.log"
        return (self.root / "logs" / name).read_text(errors="replace")[-3000:]

    def push_to_completion(self, period: str, *, attempts: int = 3) -> None:
        """Run push until it exits 0 (a deferred delivery exits 1: run again, bounded)."""
        for _ in range(attempts):
            code = self.start_push(period).wait(timeout=RUN_TIMEOUT)
            if code == 0:
                return
            assert code == 1, f"push exited {code}:\n{self.log_tail()}"
        pytest.fail(f"push did not complete in {attempts} runs:\n{self.log_tail()}")

    def status(self) -> list[dict[str, Any]]:
        """``kiki-billing status --json``."""
        done = subprocess.run(
            [str(KIKI), "status", "--json"],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=RUN_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    # -- the ledger, read directly ------------------------------------------------------------

    def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        ledger = self.root / "data" / "ledger.sqlite3"
        if not ledger.exists():
            return []
        connection = sqlite3.connect(ledger, timeout=30)
        try:
            return connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the run was killed before creating it
                return []
            raise
        finally:
            connection.close()

    def held_by(self, pid: int) -> tuple[int, int]:
        """(deliveries, steps) ``in_flight`` under a claim of process ``pid``."""
        owner = f"%:{pid}:%"
        deliveries = self._query(
            "SELECT count(*) FROM deliveries WHERE state = 'in_flight' AND owner LIKE ?", owner
        )
        steps = self._query(
            "SELECT count(*) FROM delivery_steps s JOIN deliveries d ON d.id = s.delivery_id "
            "WHERE s.state = 'in_flight' AND d.state = 'in_flight' AND d.owner LIKE ?",
            owner,
        )
        return (deliveries[0][0] if deliveries else 0), (steps[0][0] if steps else 0)

    def delivered(self, period: str) -> int:
        """Deliveries of ``period`` the ledger has as ``delivered``."""
        rows = self._query(
            "SELECT count(*) FROM deliveries WHERE period = ? AND state = 'delivered'", period
        )
        return rows[0][0] if rows else 0

    def settled_by_lookup(self) -> int:
        """Steps sent before a kill (outcome unknown) that a re-run then found upstream."""
        rows = self._query(
            "SELECT count(*) FROM delivery_steps WHERE origin = 'found' AND attempts >= 1"
        )
        return int(rows[0][0]) if rows else 0

    def resent_steps(self) -> int:
        """Steps sent more than once: outcome unknown after a kill, not found by a look-up."""
        rows = self._query("SELECT count(*) FROM delivery_steps WHERE attempts > 1")
        return int(rows[0][0]) if rows else 0

    # -- kills --------------------------------------------------------------------------------

    def wait_for_claim(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        """Until ``process`` holds a delivery, has ended, or ``deadline`` passes."""
        while process.poll() is None and time.monotonic() < deadline:
            if self.held_by(process.pid)[0]:
                return
            time.sleep(0.01)

    def kill_at_random(
        self, process: subprocess.Popen[bytes], rng: random.Random, stats: Stats
    ) -> None:
        """SIGKILL ``process`` at a random moment: after a random delay from now, or a random
        delay after it has claimed a delivery."""
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.05, 1.5))
        else:
            self.wait_for_claim(process, time.monotonic() + 15)
            time.sleep(rng.uniform(0.0, 0.5))
        self.kill(process, stats)

    def kill(self, process: subprocess.Popen[bytes], stats: Stats) -> None:
        """SIGKILL ``process`` (by its pid) if it still runs, reap it, note what it left."""
        if process.poll() is not None:
            stats.finished_first += 1
            stats.exit_codes[process.returncode] += 1
            return
        process.send_signal(signal.SIGKILL)
        # NOTE: reaped at once: a zombie still answers kill(pid, 0) with its old start time,
        # so the ledger would take its claims for live ones until their lease ran out.
        process.wait(timeout=30)
        stats.kills += 1
        deliveries, steps = self.held_by(process.pid)
        stats.mid_delivery += deliveries > 0
        stats.mid_step += steps > 0


@pytest.fixture
def make_workspace(tmp_path: Path, fake: Fake) -> Callable[[list[str]], Workspace]:
    def make(periods: list[str]) -> Workspace:
        return Workspace(tmp_path, fake, periods)

    return make


# --------------------------------------------------------------------------------------------
# What must hold afterwards
# --------------------------------------------------------------------------------------------


def expected_invoices(workspace: Workspace, period: str) -> list[Invoice]:
    """The period's invoices, computed in-process from the same files."""
    computed = compute_period(
        workspace.root / "contracts.toml",
        MetricsSource("metrics_file", str(workspace.root / "metrics.csv")),
        BillingPeriod.month(period),
    )
    assert not computed.run.not_billed
    assert len(computed.run.invoices) == CLIENTS
    return list(computed.run.invoices)


def cents(amount: Decimal) -> int:
    scaled = amount * 100
    assert scaled == scaled.to_integral_value(), amount
    return int(scaled)


def assert_delivered_exactly_once(workspace: Workspace) -> dict[str, Any]:
    """Every invoice of every period pushed upstream exactly once and right; the ledger agrees."""
    state = workspace.fake.state()
    expected = [inv for period in workspace.pushed for inv in expected_invoices(workspace, period)]
    by_number = {inv.number: inv for inv in expected}
    assert len(by_number) == len(expected) == CLIENTS * len(workspace.pushed)
    # The fixture has both kinds of adjustment line, a negative one among them.
    kinds = {line.kind for inv in expected for line in inv.lines}
    assert {LineKind.MINIMUM_FEE, LineKind.FEE_CAP} <= kinds
    assert any(line.fee < 0 for inv in expected for line in inv.lines)

    customers: dict[str, list[str]] = {}
    for customer in state["customers"]:
        customers.setdefault(customer["metadata"].get("kiki_client_id"), []).append(customer["id"])
    duplicated = {client: ids for client, ids in customers.items() if len(ids) != 1}
    assert not duplicated, f"clients with more than one Stripe customer: {duplicated}"
    assert set(customers) == {inv.client_id for inv in expected}

    upstream: dict[str, list[dict[str, Any]]] = {}
    for invoice in state["invoices"]:
        upstream.setdefault(invoice["metadata"].get("kiki_invoice_number"), []).append(invoice)
    twice = {n: [i["id"] for i in found] for n, found in upstream.items() if len(found) != 1}
    assert not twice, f"invoices upstream more than once: {twice}"
    assert set(upstream) == set(by_number), "missing or unexpected invoices upstream"

    item_ids: set[str] = set()
    for number, inv in by_number.items():
        (stripe_invoice,) = upstream[number]
        collection = collection_of(inv.client_id)
        where = f"{number} ({inv.client_id}, {collection})"
        assert stripe_invoice["customer"] == customers[inv.client_id][0], where
        assert stripe_invoice["currency"] == inv.currency.lower(), where
        lines = stripe_invoice["lines"]["data"]
        got = sorted((int(line["metadata"]["kiki_line_no"]), line["amount"]) for line in lines)
        want = sorted((line.line_no, cents(line.fee)) for line in inv.lines)
        assert got == want, f"{where}: lines {got} != {want}"
        assert stripe_invoice["lines"]["total_count"] == len(inv.lines), where
        assert stripe_invoice["total"] == cents(inv.total_fee) > 0, where
        assert stripe_invoice["amount_due"] == cents(inv.total_fee), where
        assert stripe_invoice["status"] == EXPECTED_STATUS[collection], where
        method = "send_invoice" if collection == "send_invoice" else "charge_automatically"
        assert stripe_invoice["collection_method"] == method, where
        if collection == "auto":
            assert stripe_invoice["auto_advance"] is True, where
        if collection == "send_invoice":
            assert state["sent"].get(stripe_invoice["id"], 0) >= 1, f"{where}: never sent"
        item_ids.update(line["invoice_item"] for line in lines)
    # No stray invoice item: none sent twice, none left pending on a customer.
    stray = [item["id"] for item in state["invoice_items"] if item["id"] not in item_ids]
    assert not stray, f"invoice items on no invoice of ours: {stray}"

    rows = workspace.status()
    assert len(rows) == len(expected)
    undelivered = [(r["invoice"], r["state"], r["last_error"]) for r in rows]
    undelivered = [row for row in undelivered if row[1] != "delivered"]
    assert not undelivered, undelivered
    for row in rows:
        (stripe_invoice,) = upstream[row["invoice"]]
        assert row["refs"]["invoice_id"] == stripe_invoice["id"], row
        assert row["refs"]["customer_id"] == stripe_invoice["customer"], row
    return state


def create_ledger(workspace: Workspace) -> None:
    """Create the (empty) ledger before the kills.

    The test reads the ledger while pushes run; on a file still being created, such a reader
    can make a push's ``PRAGMA journal_mode=WAL`` fail. Opening a new ledger from two processes
    at once is left to :func:`test_two_concurrent_pushes_deliver_each_invoice_once`.
    """
    assert workspace.status() == []


def replays(state: dict[str, Any]) -> int:
    """Requests the fake answered from a stored key (``Idempotent-Replayed: true``)."""
    return sum(1 for request in state["requests"] if request["replayed"])


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

KILL_PERIODS = ["2026-01", "2026-02", "2026-03"]
KILLS_PER_PERIOD = 7


def test_push_killed_at_random_moments_then_rerun_delivers_each_invoice_once(
    make_workspace: Callable[[list[str]], Workspace],
) -> None:
    workspace = make_workspace(KILL_PERIODS)
    create_ledger(workspace)
    rng = random.Random(SEED)
    stats = Stats()
    for period in KILL_PERIODS:
        target = stats.kills + KILLS_PER_PERIOD
        for _ in range(3 * KILLS_PER_PERIOD):  # a run may end before its kill comes
            workspace.kill_at_random(workspace.start_push(period), rng, stats)
            if stats.kills == target:
                break
        workspace.push_to_completion(period)
    state = assert_delivered_exactly_once(workspace)
    found = workspace.settled_by_lookup()
    report = (
        f"{stats.line()} replays={replays(state)} found={found} resent={workspace.resent_steps()}"
    )
    print(f"\n{report}")

    assert stats.kills >= 20, report
    # Kills landed mid-delivery, some with a step's outcome unknown, which a re-run settled
    # (at least once) by finding the object upstream or sending it again under its key.
    assert stats.mid_delivery >= 5, report
    assert stats.mid_step >= 1, report
    assert replays(state) + found >= 1, report
    assert stats.exit_codes.keys() <= {0}, report


def test_two_concurrent_pushes_deliver_each_invoice_once(
    make_workspace: Callable[[list[str]], Workspace],
) -> None:
    periods = ["2026-05", "2026-06"]
    workspace = make_workspace(periods)
    for period in periods:
        # Started at the same moment on the same (at first not yet created) ledger.
        first, second = workspace.start_push(period), workspace.start_push(period)
        codes = [first.wait(timeout=RUN_TIMEOUT), second.wait(timeout=RUN_TIMEOUT)]
        # A push that met deliveries "being delivered by another process" exits 1 (not all
        # settled by it); a later push then finds everything delivered and exits 0.
        assert set(codes) <= {0, 1}, (
            f"{codes}\n{workspace.log_tail(workspace.runs - 1)}\n{workspace.log_tail()}"
        )
        workspace.push_to_completion(period)
    assert_delivered_exactly_once(workspace)
    # Each delivery was claimed once and each step sent once: no process redid another's work.
    assert {row["attempts"] for row in workspace.status()} == {1}
    assert workspace.resent_steps() == 0


CHAOS_PERIODS = ["2026-07", "2026-08", "2026-09", "2026-10"]
CHAOS_KILLS = 12


def test_one_of_two_concurrent_pushes_killed_and_restarted(
    make_workspace: Callable[[list[str]], Workspace],
) -> None:
    workspace = make_workspace(CHAOS_PERIODS)
    create_ledger(workspace)
    rng = random.Random(SEED + 1)
    stats = Stats()
    for period in CHAOS_PERIODS:
        if stats.kills >= CHAOS_KILLS:
            break
        # Two pushes at all times: one of them, chosen at random, is killed at a random moment
        # and restarted while the other runs on (one that ends by itself is started again),
        # until the period is delivered; then the next period, until enough kills.
        running = [workspace.start_push(period), workspace.start_push(period)]
        for _ in range(3 * CHAOS_KILLS):
            if stats.kills >= CHAOS_KILLS or workspace.delivered(period) == CLIENTS:
                break
            victim = rng.randrange(2)
            workspace.kill_at_random(running[victim], rng, stats)
            running[victim] = workspace.start_push(period)
            other = running[1 - victim]
            if other.poll() is not None:
                stats.exit_codes[other.returncode] += 1
                running[1 - victim] = workspace.start_push(period)
        for process in running:
            stats.exit_codes[process.wait(timeout=RUN_TIMEOUT)] += 1
        workspace.push_to_completion(period)
    state = assert_delivered_exactly_once(workspace)
    report = f"{stats.line()} replays={replays(state)} resent={workspace.resent_steps()}"
    print(f"\n{report} periods={len(workspace.pushed)}")

    assert stats.kills >= CHAOS_KILLS, report
    assert stats.mid_delivery >= 2, report
    # A push that was not killed ended cleanly (1: another push held some deliveries), even
    # beside dying ones.
    assert stats.exit_codes.keys() <= {0, 1}, report
