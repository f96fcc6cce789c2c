"""Crash recovery across Stripe, QuickBooks, Xero and Zuora at once, past Xero's key window.

Clients bill to four targets, each provider's fake running as its own process. A real
``kiki-billing push`` is SIGKILLed at seeded random moments (half after a random delay from its
start, half a random delay after it has claimed a delivery; half of them, instead, a random
moment into a Xero token refresh if one starts first) and started again; then a final run
completes the period. Every fake answers its writes late (after the operation ran), so a kill
often falls between the provider's answer and the ledger's record of it.

Between two runs every fake's clock moves six minutes on. That is longer than Xero's
idempotency-key window (300 s in its fake), so a re-run cannot count on Xero replaying a key:
the hub has to find what an unknown outcome created by looking it up. It also ages the OAuth
access tokens on the providers' side, so QuickBooks and Xero answer 401 every few runs and the
adapters refresh, rotating the single-use refresh tokens; Xero's token endpoint answers late,
so some kills land between Xero's rotation and the ledger's write (its 30-minute grace then
lets the next run carry on).

Afterwards, from the fakes' own state: every invoice exists exactly once in each system with
the right total and lines, each client has one Stripe customer, one QuickBooks customer, one
Xero contact and one Zuora account, and the ledger has every delivery ``delivered``. Then each
fake's clock is moved past Xero's grace period and the refresh tokens stored in the ledger are
spent at the token endpoints: both chains must still be alive.

One window is left alone on purpose: between Intuit issuing a new refresh token (which kills the
old one at once) and the ledger storing it. No client can close it, so a kill never falls while
a process holds the QuickBooks credential lock (the test waits for the lock to be released; the
fake's token endpoint holds each request 0.3 s before rotating, so a kill sent just after the
check cannot land inside a refresh that started after it).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiki_billing.hub.ledger import Ledger
from kiki_billing.models import BillingPeriod, Invoice, LineKind
from kiki_billing.money import to_minor_units
from kiki_billing.pipeline import MetricsSource, compute_period
from tests.support.fake_provider import spawn_fake
from tests.support.fake_xero import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT
from tests.support.fake_zuora import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
)

pytestmark = [
    pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"]),
    # Slow (tens of seconds), but part of the README's test command and of CI.
    pytest.mark.slow,
]

KIKI = Path(sys.executable).with_name("kiki-billing")
SEED = int(os.environ.get("CRASH_SEED", "20260907"))
"""Kill moments, metrics and the fakes' ids; ``CRASH_SEED=N`` explores other runs."""
CLIENTS = 10
PERIODS = ["2026-09", "2026-10"]
KILLS_PER_PERIOD = 8
TARGETS = ("stripe", "quickbooks", "xero", "zuora")
CLOCK_STEP = 360.0
"""Six minutes of every fake's clock between two runs: past Xero's 300 s key window."""
XERO_GRACE = 1800.0
TOKEN_LIFETIME = 900.0
"""Access tokens of QuickBooks and Xero live 15 minutes here (an hour and 30 minutes at Intuit
and Xero), so that the providers refuse them, and the adapters refresh, every few runs."""
RUN_TIMEOUT = 120.0
COLLECTIONS = ("auto", "now", "send_invoice")
STRIPE_STATUS = {"auto": "open", "now": "paid", "send_invoice": "open"}
CURRENCIES = {5: "EUR", 7: "JPY"}
XERO_PREFIX = "/api.xro/2.0"
QUICKBOOKS_TOKEN_PATH = "/oauth2/v1/tokens/bearer"
XERO_TOKEN_PATH = "/connect/token"
QUICKBOOKS_ROTATION_HOLD = 0.3
"""Seconds the QuickBooks token endpoint holds a request before it rotates the token."""

# Writes each fake answers late: the operation has run (and its result is kept under the key,
# where the provider has keys) when the answer leaves, so a kill in between leaves an unknown
# outcome. The first matching fault applies; a path without "*" is a prefix.
STRIPE_SLOW = [
    ("POST", "/v1/customers", 0.3),
    ("POST", "/v1/invoices/*/send", 0.3),
    ("POST", "/v1/invoices/*/pay", 0.2),
    ("POST", "/v1/invoiceitems", 0.05),
    ("POST", "/v1/invoices", 0.1),
]
QUICKBOOKS_SLOW = [
    ("POST", "/v3/company/*/customer", 0.2),
    ("POST", "/v3/company/*/item", 0.1),
    ("POST", "/v3/company/*/invoice/*/send", 0.2),
    ("POST", "/v3/company/*/invoice", 0.3),
]
XERO_SLOW = [
    ("PUT", f"{XERO_PREFIX}/Contacts", 0.3),
    ("PUT", f"{XERO_PREFIX}/Invoices", 0.4),
    ("POST", XERO_TOKEN_PATH, 0.3),
]
ZUORA_SLOW = [("create", 0.15), ("update", 0.1), ("subscribe", 0.4)]


# --------------------------------------------------------------------------------------------
# The fakes
# --------------------------------------------------------------------------------------------


def call(url: str, method: str, path: str, payload: Any = None) -> Any:
    """A JSON request to a fake's control endpoint."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def delay(method: str, path: str, seconds: float, *, after: bool = True) -> dict[str, Any]:
    return {"preset": "delay", "method": method, "path": path, "seconds": seconds} | {
        "after": after,
        "times": 1_000_000,
    }


@dataclass
class Fakes:
    """The four fake providers, each in its own process, and what the hub needs to reach them."""

    urls: dict[str, str]
    quickbooks_tokens: dict[str, str]
    xero_seed: str

    def state(self, target: str) -> dict[str, Any]:
        found: dict[str, Any] = call(self.urls[target], "GET", "/_fake/state")
        return found

    def advance_clocks(self, seconds: float) -> None:
        for url in self.urls.values():
            call(url, "POST", "/_fake/clock", {"advance": seconds})

    def env(self) -> dict[str, str]:
        stripe, quickbooks = self.urls["stripe"], self.urls["quickbooks"]
        xero, zuora = self.urls["xero"], self.urls["zuora"]
        tokens = self.quickbooks_tokens
        return {
            "KIKI_STRIPE_API_KEY": "sk_test_kiki_crash_all_targets",
            "KIKI_STRIPE_API_BASE": stripe,
            "KIKI_STRIPE_RATE_LIMIT": "100",
            "KIKI_STRIPE_CONCURRENCY": "3",
            "KIKI_QUICKBOOKS_CLIENT_ID": tokens["client_id"],
            "KIKI_QUICKBOOKS_CLIENT_SECRET": tokens["client_secret"],
            "KIKI_QUICKBOOKS_REFRESH_TOKEN": tokens["refresh_token"],
            "KIKI_QUICKBOOKS_REALM_ID": tokens["realm"],
            "KIKI_QUICKBOOKS_ENVIRONMENT": "sandbox",
            "KIKI_QUICKBOOKS_API_BASE": f"{quickbooks}/v3",
            "KIKI_QUICKBOOKS_TOKEN_URL": f"{quickbooks}{QUICKBOOKS_TOKEN_PATH}",
            # NOTE: 8/s rather than Intuit's 10/s: on a loaded machine a request can reach the
            # fake a tenth of a second after its slot, and QuickBooks' 429 costs a one-minute
            # pause (the fake keeps 10/s; throttling has tests of its own).
            "KIKI_QUICKBOOKS_RATE_LIMIT": "8/s,500/min",
            "KIKI_QUICKBOOKS_CONCURRENCY": "3",
            "KIKI_XERO_CLIENT_ID": DEFAULT_CLIENT_ID,
            "KIKI_XERO_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
            "KIKI_XERO_REFRESH_TOKEN": self.xero_seed,
            "KIKI_XERO_TENANT_ID": DEFAULT_TENANT,
            "KIKI_XERO_API_BASE": f"{xero}{XERO_PREFIX}",
            "KIKI_XERO_TOKEN_URL": f"{xero}{XERO_TOKEN_PATH}",
            # NOTE: Xero's 60/min, paced evenly, is one request a second; every run starts a
            # fresh minute on the fake's clock (moved on between runs), so a run may burst
            # within the same 60/min (and the fake still enforces 60/min and 5 in flight).
            "KIKI_XERO_RATE_LIMIT": "20/s,60/min,5000/day",
            "KIKI_XERO_CONCURRENCY": "3",
            "KIKI_ZUORA_USERNAME": DEFAULT_USERNAME,
            "KIKI_ZUORA_PASSWORD": DEFAULT_PASSWORD,
            "KIKI_ZUORA_API_BASE": f"{zuora}/apps/services/a/78.0",
            "KIKI_ZUORA_CONCURRENCY": "3",
        }


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """The four fakes (10 ms per request, seeded ids), each stopped by its pid afterwards."""
    common = ("--latency", "0.01", "--seed", str(SEED))
    xero_seed = "kiki-crash-xero-seed-" + "0" * 32
    with ExitStack() as stack:

        def start(name: str, *extra: str) -> str:
            url, _process = stack.enter_context(
                spawn_fake(f"tests.support.fake_{name}", *common, *extra)
            )
            return url

        urls = {
            # Customers show in Stripe's /search only after 30 s of its clock, as on Stripe.
            "stripe": start("stripe", "--search-lag", "30"),
            "quickbooks": start("quickbooks"),
            "xero": start("xero", "--refresh-token", xero_seed),
            "zuora": start("zuora"),
        }
        tokens = call(urls["quickbooks"], "POST", "/_fake/quickbooks/tokens")
        call(urls["xero"], "POST", "/_fake/config", {"currencies": sorted(CURRENCIES.values())})
        for target in ("quickbooks", "xero"):
            call(urls[target], "POST", "/_fake/config", {"access_token_lifetime": TOKEN_LIFETIME})
        assert call(urls["xero"], "GET", "/_fake/config")["refresh_grace"] == XERO_GRACE
        call(urls["stripe"], "POST", "/_fake/faults", [delay(*f) for f in STRIPE_SLOW])
        quickbooks = [delay(*f) for f in QUICKBOOKS_SLOW]
        quickbooks.append(
            delay("POST", QUICKBOOKS_TOKEN_PATH, QUICKBOOKS_ROTATION_HOLD, after=False)
        )
        call(urls["quickbooks"], "POST", "/_fake/faults", quickbooks)
        call(urls["xero"], "POST", "/_fake/faults", [delay(*f) for f in XERO_SLOW])
        zuora = [delay("POST", "/", seconds) | {"operation": op} for op, seconds in ZUORA_SLOW]
        call(urls["zuora"], "POST", "/_fake/faults", zuora)
        yield Fakes(urls, tokens, xero_seed)


# --------------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------------


def currency_of(index: int) -> str:
    return CURRENCIES.get(index, "USD")


def contracts_toml() -> str:
    """Clients on all four targets: every Stripe collection, QuickBooks emails for half of
    them, a minimum fee, a fee cap, one client in EUR and one in JPY."""
    parts = [
        "[defaults]\n"
        'currency = "USD"\n'
        'baseline_roas = "3.0"\n'
        'share_rate = "0.10"\n'
        "payment_terms_days = 30\n"
        "[targets.xero]\n"
        'tax_type = "NONE"\n'
        "[targets.zuora]\n"
        f'product_rate_plan_id = "{ONE_TIME_RATE_PLAN}"\n'
        f'product_rate_plan_charge_id = "{ONE_TIME_CHARGE}"\n'
    ]
    for index in range(CLIENTS):
        extra = {
            3: 'minimum_fee = "5000.00"\n',  # a positive adjustment line
            4: 'fee_cap = "150.00"\n',  # a negative adjustment line
        }.get(index, "")
        if index in CURRENCIES:
            extra += f'currency = "{currency_of(index)}"\n'
        parts.append(
            "[[clients]]\n"
            f'id = "client-{index:02d}"\n'
            f'name = "Client {index:02d} Ltd"\n'
            f'email = "ap@client-{index:02d}.example"\n'
            f"targets = {json.dumps(list(TARGETS))}\n"
            f"{extra}"
            "[clients.stripe]\n"
            f'collection = "{COLLECTIONS[index % 3]}"\n'
            "[clients.quickbooks]\n"
            f"send = {'true' if index % 2 else 'false'}\n"
        )
    return "\n".join(parts)


def metrics_csv() -> str:
    """One to three campaigns per client and period; whole yen for the JPY client."""
    rng = random.Random(SEED)
    rows = ["client_id,campaign_id,spend,ltv,period"]
    for period in PERIODS:
        for index in range(CLIENTS):
            for campaign in range(1 + index % 3):
                spend = Decimal(rng.randint(50_000, 900_000)) / 100
                ltv = spend * 3 + Decimal(rng.randint(1_000, 600_000)) / 100
                if currency_of(index) == "JPY":
                    spend, ltv = spend.to_integral_value() * 100, ltv.to_integral_value() * 100
                rows.append(
                    f"client-{index:02d},camp-{index:02d}-{campaign},{spend},{ltv},{period}"
                )
    return "\n".join(rows) + "\n"


def client_index(client_id: str) -> int:
    return int(client_id.rsplit("-", 1)[1])


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
    in_xero_refresh: int = 0
    """Kills while the process held Xero's credential lock (refreshing its tokens)."""
    held_off: int = 0
    """Kills put off until a QuickBooks token refresh had been stored."""
    finished_first: int = 0
    """Runs that had ended by themselves when their kill came."""
    runs: int = 0

    def line(self) -> str:
        return (
            f"kills={self.kills} mid-delivery={self.mid_delivery} mid-step={self.mid_step} "
            f"in-xero-refresh={self.in_xero_refresh} quickbooks-refresh-waits={self.held_off} "
            f"finished-first={self.finished_first} runs={self.runs}"
        )


@dataclass
class Workspace:
    """A contracts file, a metrics file, a ledger, the environment of every run."""

    root: Path
    fakes: Fakes
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        (self.root / "contracts.toml").write_text(contracts_toml())
        (self.root / "metrics.csv").write_text(metrics_csv())
        (self.root / "logs").mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
        self.env = (
            base
            | self.fakes.env()
            | {
                "KIKI_DATA_DIR": str(self.root / "data"),
                "KIKI_LOG_LEVEL": "ERROR",
                "KIKI_ADAPTER_PACKAGES": "kiki-billing",
                "KIKI_RETRY_INITIAL_WAIT": "0.05",
                "KIKI_RETRY_MAX_WAIT": "0.5",
            }
        )

    @property
    def ledger_path(self) -> Path:
        return self.root / "data" / "ledger.sqlite3"

    # -- runs ---------------------------------------------------------------------------------

    def start_push(self, period: str) -> subprocess.Popen[bytes]:
        """Move every fake's clock on six minutes, then start ``kiki-billing push``."""
        self.fakes.advance_clocks(CLOCK_STEP)
        self.stats.runs += 1
        command = [str(KIKI), "push", "--period", period, "--contracts", "contracts.toml"]
        command += ["--metrics", "metrics.csv"]
        with (self.root / "logs" / f"run-{self.stats.runs:03d}.log").open("wb") as log:
            return subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def log_tail(self) -> str:
        log = self.root / "logs" / f"run-{self.stats.runs:03d}.log"
        return log.read_text(errors="replace")[-4000:]

    def push_to_completion(self, period: str, *, attempts: int = 3) -> None:
        """Run push until it exits 0 (a deferred delivery exits 1: run again, bounded)."""
        for _ in range(attempts):
            code = self.start_push(period).wait(timeout=RUN_TIMEOUT)
            if code == 0:
                return
            assert code == 1, f"push exited {code}:\n{self.log_tail()}"
        pytest.fail(f"push did not complete in {attempts} runs:\n{self.log_tail()}")

    def kiki(self, *args: str) -> str:
        done = subprocess.run(
            [str(KIKI), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=RUN_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    # -- the ledger, read directly ------------------------------------------------------------

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if not self.ledger_path.exists():
            return []
        connection = sqlite3.connect(self.ledger_path, timeout=30)
        try:
            return connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a run killed before creating it
                return []
            raise
        finally:
            connection.close()

    def count(self, sql: str, *params: object) -> int:
        rows = self.query(sql, *params)
        return int(rows[0][0]) if rows else 0

    def held_by(self, pid: int) -> tuple[int, int]:
        """(deliveries, steps) ``in_flight`` under a claim of process ``pid``."""
        owner = f"%:{pid}:%"
        deliveries = self.count(
            "SELECT count(*) FROM deliveries WHERE state = 'in_flight' AND owner LIKE ?", owner
        )
        steps = self.count(
            "SELECT count(*) FROM delivery_steps s JOIN deliveries d ON d.id = s.delivery_id "
            "WHERE s.state = 'in_flight' AND d.state = 'in_flight' AND d.owner LIKE ?",
            owner,
        )
        return deliveries, steps

    def refreshing(self, pid: int, target: str) -> bool:
        """Whether process ``pid`` holds ``target``'s credential lock (a token refresh)."""
        return bool(
            self.count(
                "SELECT count(*) FROM account_locks WHERE target = ? AND owner LIKE ?",
                target,
                f"%:{pid}:%",
            )
        )

    # -- kills --------------------------------------------------------------------------------

    def kill_at_random(self, process: subprocess.Popen[bytes], rng: random.Random) -> None:
        """SIGKILL ``process`` a random delay after its start or after its first claim; half of
        the time, a random moment into a Xero token refresh if one starts before that."""
        into_refresh = rng.random() < 0.5
        if rng.random() < 0.5:
            deadline = time.monotonic() + rng.uniform(0.3, 2.0)
        else:
            limit = time.monotonic() + 20
            while process.poll() is None and time.monotonic() < limit:
                if self.held_by(process.pid)[0]:
                    break
                time.sleep(0.01)
            deadline = time.monotonic() + rng.uniform(0.0, 0.8)
        while process.poll() is None and time.monotonic() < deadline:
            if into_refresh and self.refreshing(process.pid, "xero"):
                # Xero's token endpoint answers 0.3 s late: before or after its rotation.
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.01)
        self.kill(process)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``process`` (by its pid) unless it ended, reap it, note what it left."""
        stats = self.stats
        # Never inside a QuickBooks token refresh (see the module's docstring).
        if self.refreshing(process.pid, "quickbooks"):
            stats.held_off += 1
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                if not self.refreshing(process.pid, "quickbooks"):
                    break
                time.sleep(0.005)
        if process.poll() is not None:
            stats.finished_first += 1
            assert process.returncode in (0, 1), self.log_tail()
            return
        in_xero_refresh = self.refreshing(process.pid, "xero")
        process.send_signal(signal.SIGKILL)
        # NOTE: reaped at once: a zombie still answers kill(pid, 0) with its old start time,
        # so the ledger would take its claims for live ones until their lease ran out.
        process.wait(timeout=30)
        stats.kills += 1
        stats.in_xero_refresh += in_xero_refresh
        deliveries, steps = self.held_by(process.pid)
        stats.mid_delivery += deliveries > 0
        stats.mid_step += steps > 0

    # -- what the runs settled ----------------------------------------------------------------

    def found_by_lookup(self) -> dict[str, int]:
        """Per target: steps sent before a kill (outcome unknown) that a re-run found upstream."""
        rows = self.query(
            "SELECT d.target, count(*) FROM delivery_steps s JOIN deliveries d "
            "ON d.id = s.delivery_id WHERE s.origin = 'found' AND s.attempts >= 1 "
            "GROUP BY d.target"
        )
        return {str(target): int(n) for target, n in rows}

    def resent(self) -> int:
        """Steps sent more than once (outcome unknown, not found by a look-up)."""
        return self.count("SELECT count(*) FROM delivery_steps WHERE attempts > 1")


@pytest.fixture
def workspace(tmp_path: Path, fakes: Fakes) -> Workspace:
    return Workspace(tmp_path, fakes)


# --------------------------------------------------------------------------------------------
# What must hold afterwards
# --------------------------------------------------------------------------------------------


def expected_invoices(workspace: Workspace) -> dict[str, Invoice]:
    """Every period's invoices, computed in-process from the same files, by number."""
    found: dict[str, Invoice] = {}
    for period in PERIODS:
        computed = compute_period(
            workspace.root / "contracts.toml",
            MetricsSource("metrics_file", str(workspace.root / "metrics.csv")),
            BillingPeriod.month(period),
        )
        assert not computed.run.not_billed
        assert len(computed.run.invoices) == CLIENTS
        found |= {invoice.number: invoice for invoice in computed.run.invoices}
    assert len(found) == CLIENTS * len(PERIODS)
    lines = [line for invoice in found.values() for line in invoice.lines]
    assert {LineKind.MINIMUM_FEE, LineKind.FEE_CAP} <= {line.kind for line in lines}
    assert any(line.fee < 0 for line in lines)
    assert {invoice.currency for invoice in found.values()} == {"USD", "EUR", "JPY"}
    return found


def amount(value: Any) -> Decimal:
    return Decimal(str(value))


def once(keys: list[str], what: str) -> None:
    counted = Counter(keys)
    repeated = {key: n for key, n in counted.items() if n != 1}
    assert not repeated, f"{what} more than once: {repeated}"


def check_stripe(state: dict[str, Any], invoices: dict[str, Invoice]) -> None:
    customers = [c["metadata"].get("kiki_client_id") for c in state["customers"]]
    once(customers, "Stripe customers")
    assert set(customers) == {i.client_id for i in invoices.values()}
    customer_of = {c["metadata"]["kiki_client_id"]: c["id"] for c in state["customers"]}
    numbers = [i["metadata"].get("kiki_invoice_number") for i in state["invoices"]]
    once(numbers, "Stripe invoices")
    assert set(numbers) == set(invoices)
    item_ids: set[str] = set()
    for held in state["invoices"]:
        invoice = invoices[held["metadata"]["kiki_invoice_number"]]
        collection = COLLECTIONS[client_index(invoice.client_id) % 3]
        where = f"Stripe {invoice.number} ({collection})"
        assert held["customer"] == customer_of[invoice.client_id], where
        assert held["currency"] == invoice.currency.lower(), where
        lines = held["lines"]["data"]
        got = sorted((int(line["metadata"]["kiki_line_no"]), line["amount"]) for line in lines)
        want = sorted(
            (line.line_no, to_minor_units(line.fee, invoice.currency)) for line in invoice.lines
        )
        assert got == want, where
        assert held["total"] == to_minor_units(invoice.total_fee, invoice.currency), where
        assert held["status"] == STRIPE_STATUS[collection], where
        if collection == "send_invoice":
            assert state["sent"].get(held["id"], 0) >= 1, f"{where}: never sent"
        item_ids.update(line["invoice_item"] for line in lines)
    stray = [item["id"] for item in state["invoice_items"] if item["id"] not in item_ids]
    assert not stray, f"Stripe invoice items on no invoice of ours: {stray}"


def check_quickbooks(state: dict[str, Any], invoices: dict[str, Invoice]) -> None:
    names = [c["DisplayName"] for c in state["customers"]]
    once(names, "QuickBooks customers")
    assert set(names) == {i.client_name for i in invoices.values()}
    assert [item["Name"] for item in state["items"]] == ["Profit share"]
    by_doc = {number.removeprefix("KIKI-"): invoice for number, invoice in invoices.items()}
    numbers = [i["DocNumber"] for i in state["invoices"]]
    once(numbers, "QuickBooks invoices")
    assert set(numbers) == set(by_doc)
    customer_of = {c["DisplayName"]: c["Id"] for c in state["customers"]}
    for held in state["invoices"]:
        invoice = by_doc[held["DocNumber"]]
        where = f"QuickBooks {invoice.number}"
        assert held["CustomerRef"]["value"] == customer_of[invoice.client_name], where
        assert held["CurrencyRef"]["value"] == invoice.currency, where
        assert amount(held["TotalAmt"]) == invoice.total_fee, where
        sales = [line for line in held["Line"] if line["DetailType"] == "SalesItemLineDetail"]
        assert [amount(line["Amount"]) for line in sales] == [line.fee for line in invoice.lines], (
            where
        )
    emailed = Counter(e["invoice"] for e in state["emails"])
    assert set(emailed.values()) <= {1}, f"QuickBooks invoices emailed twice: {emailed}"
    wanted = sum(1 for i in invoices.values() if client_index(i.client_id) % 2)
    assert len(emailed) == wanted


def check_xero(state: dict[str, Any], invoices: dict[str, Invoice]) -> None:
    organisation = state["organisations"][DEFAULT_TENANT]
    contacts = organisation["contacts"]
    once([c.get("ContactNumber") for c in contacts], "Xero contacts")
    assert {c.get("ContactNumber") for c in contacts} == {i.client_id for i in invoices.values()}
    contact_of = {c["ContactNumber"]: c["ContactID"] for c in contacts}
    held_invoices = organisation["invoices"]
    numbers = [i["InvoiceNumber"] for i in held_invoices]
    once(numbers, "Xero invoices")
    assert set(numbers) == set(invoices)
    for held in held_invoices:
        invoice = invoices[held["InvoiceNumber"]]
        where = f"Xero {invoice.number}"
        assert held["Type"] == "ACCREC" and held["Status"] == "AUTHORISED", where
        assert held["Contact"]["ContactID"] == contact_of[invoice.client_id], where
        assert held["CurrencyCode"] == invoice.currency, where
        assert amount(held["Total"]) == amount(held["SubTotal"]) == invoice.total_fee, where
        assert [amount(line["LineAmount"]) for line in held["LineItems"]] == [
            line.fee for line in invoice.lines
        ], where


def check_zuora(state: dict[str, Any], invoices: dict[str, Invoice]) -> None:
    accounts = state["accounts"]
    once([a["AccountNumber"] for a in accounts], "Zuora accounts")
    assert {a["AccountNumber"] for a in accounts} == {i.client_id for i in invoices.values()}
    assert {a["Status"] for a in accounts} == {"Active"}
    account_of = {a["AccountNumber"]: a["Id"] for a in accounts}
    by_subscription: dict[str, str] = {}
    for subscription in state["subscriptions"]:
        number = subscription["Name"].split("-k1-")[0]
        by_subscription[subscription["Id"]] = number
    once(list(by_subscription.values()), "Zuora subscriptions")
    assert set(by_subscription.values()) == set(invoices)
    billed: list[str] = []
    for held in state["invoices"]:
        subscriptions = {item["SubscriptionId"] for item in held["items"]}
        assert len(subscriptions) == 1, held["InvoiceNumber"]
        invoice = invoices[by_subscription[subscriptions.pop()]]
        billed.append(invoice.number)
        where = f"Zuora {invoice.number} ({held['InvoiceNumber']})"
        assert held["AccountId"] == account_of[invoice.client_id], where
        assert amount(held["Amount"]) == invoice.total_fee, where
        assert sorted(amount(item["ChargeAmount"]) for item in held["items"]) == sorted(
            line.fee for line in invoice.lines
        ), where
    once(billed, "Zuora invoices")
    assert set(billed) == set(invoices)


def check_ledger(workspace: Workspace, invoices: dict[str, Invoice]) -> None:
    rows: list[dict[str, Any]] = json.loads(workspace.kiki("status", "--json"))
    assert len(rows) == len(invoices) * len(TARGETS)
    assert Counter(row["target"] for row in rows) == dict.fromkeys(TARGETS, len(invoices))
    undelivered = [(r["invoice"], r["target"], r["state"], r["last_error"]) for r in rows]
    undelivered = [row for row in undelivered if row[2] != "delivered"]
    assert not undelivered, undelivered


def spend_refresh_token(url: str, path: str, client_id: str, secret: str, token: str) -> int:
    """The HTTP status of a ``refresh_token`` grant at a fake's token endpoint."""
    form = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": token})
    request = urllib.request.Request(f"{url}{path}", data=form.encode(), method="POST")
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    request.add_header("Authorization", f"Basic {basic}")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    request.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
            assert body["refresh_token"] and body["access_token"]
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def check_refresh_tokens(workspace: Workspace, fakes: Fakes) -> dict[str, int]:
    """The refresh tokens the ledger holds are the live ends of their chains; their grants."""
    grants = {
        "quickbooks": int(fakes.state("quickbooks")["token_grants"]),
        "xero": len(fakes.state("xero")["grants"]),
    }
    # Both chains rotated during the runs (the seed, then refreshes after 401s).
    assert grants["quickbooks"] >= 2 and grants["xero"] >= 2, grants
    tokens = fakes.quickbooks_tokens
    ledger = Ledger(f"sqlite:///{workspace.ledger_path}")
    try:
        quickbooks = ledger.load_credentials("quickbooks", f"sandbox:{tokens['realm']}")
        xero = ledger.load_credentials("xero", DEFAULT_TENANT)
    finally:
        ledger.close()
    assert quickbooks["refresh_token"] != tokens["refresh_token"]
    assert xero["refresh_token"] != fakes.xero_seed
    # Past Xero's grace period a spent refresh token is refused: only the last one works.
    fakes.advance_clocks(XERO_GRACE + CLOCK_STEP)
    statuses = {
        "quickbooks": spend_refresh_token(
            fakes.urls["quickbooks"],
            QUICKBOOKS_TOKEN_PATH,
            tokens["client_id"],
            tokens["client_secret"],
            quickbooks["refresh_token"],
        ),
        "xero": spend_refresh_token(
            fakes.urls["xero"],
            XERO_TOKEN_PATH,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_SECRET,
            xero["refresh_token"],
        ),
    }
    assert statuses == {"quickbooks": 200, "xero": 200}, "a refresh token was lost"
    return grants


def throttled(states: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Requests each fake answered 429 (a provider limit reached)."""
    return {t: sum(1 for r in s["requests"] if r["rate_limited"]) for t, s in states.items()}


def replays(states: dict[str, dict[str, Any]]) -> int:
    """Requests the fakes answered from a stored key (a replayed idempotent write)."""
    return sum(1 for s in states.values() for r in s["requests"] if r["replayed"])


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def test_pushes_to_four_providers_killed_at_random_then_rerun_deliver_each_invoice_once(
    workspace: Workspace, fakes: Fakes
) -> None:
    assert workspace.kiki("status", "--json").strip() == "[]"  # the ledger, made before the kills
    rng = random.Random(SEED)
    stats = workspace.stats
    for period in PERIODS:
        target = stats.kills + KILLS_PER_PERIOD
        for _ in range(3 * KILLS_PER_PERIOD):  # a run may end before its kill comes
            workspace.kill_at_random(workspace.start_push(period), rng)
            if stats.kills == target:
                break
        workspace.push_to_completion(period)

    invoices = expected_invoices(workspace)
    states = {target: fakes.state(target) for target in TARGETS}
    check_stripe(states["stripe"], invoices)
    check_quickbooks(states["quickbooks"], invoices)
    check_xero(states["xero"], invoices)
    check_zuora(states["zuora"], invoices)
    check_ledger(workspace, invoices)
    found = workspace.found_by_lookup()
    grants = check_refresh_tokens(workspace, fakes)
    report = (
        f"{stats.line()} found-by-lookup={sum(found.values())} {found} "
        f"replays={replays(states)} resent={workspace.resent()} token-grants={grants} "
        f"throttled={throttled(states)}"
    )
    print(f"\n{report}")

    assert stats.kills >= 2 * KILLS_PER_PERIOD - 2, report
    # Kills landed mid-delivery, some with a step's outcome unknown, and a re-run settled some
    # of them by finding the object upstream (the keys of Xero had expired by then).
    assert stats.mid_delivery >= 4, report
    assert stats.mid_step >= 1, report
    assert sum(found.values()) >= 1, report
