"""Crash recovery of corrections: ``kiki-billing push --amend --yes`` killed with SIGKILL at
random moments, then run again, against a Stripe fake running as its own process.

Revision 0 of a period is pushed to completion for nine clients (every collection mode); some
invoices are then paid in full or in part outside kiki-billing (control calls to the fake). The
metrics change (some fees down, some up) and ``push --amend --yes`` is killed at seeded random
moments (half after a random delay, half a random delay after it claimed a delivery) and
restarted, then run to completion. The fake answers voids, credit notes and drafts late (after the
write happened), so kills leave steps whose outcome is unknown.

Afterwards, from the fake's own state: each client has exactly one revision 0 and one revision 1
invoice; an unpaid revision 0 is void and was never credited; a paid one carries credit notes
adding up to its total, one per part, never two; revision 1 bills the new lines and owes what the
client's payment does not cover; and the ledger has every delivery delivered.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiki_billing.models import BillingPeriod, Invoice
from kiki_billing.pipeline import MetricsSource, compute_period
from tests.crash.test_crash_recovery import Stats, Workspace, cents
from tests.support.fake_stripe import spawn_fake_stripe

pytestmark = [
    pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"]),
    pytest.mark.slow,
]

KIKI = Path(sys.executable).with_name("kiki-billing")
SEED = 20260211
CLIENTS = 9
PERIOD = "2026-01"
COLLECTIONS = ("auto", "now", "send_invoice")
PAID = {3: "paid", 5: "partly_paid", 6: "paid"}
"""Clients whose revision 0 is paid outside kiki-billing (the "now" ones are paid by it)."""
SLOW_WRITES = (
    ("POST", "/v1/invoices/*/void", 0.4),
    ("POST", "/v1/credit_notes", 0.4),
    ("DELETE", "/v1/invoices/", 0.3),
    ("POST", "/v1/invoices/*/pay", 0.2),
    ("POST", "/v1/invoices", 0.15),
)
RUN_TIMEOUT = 120.0
KILLS = 14


class Fake:
    """The fake Stripe process's control endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.call("GET", "/_fake/state")
        return state


@pytest.fixture
def fake() -> Iterator[Fake]:
    args = ("--latency", "0.01", "--seed", str(SEED))
    with spawn_fake_stripe(*args) as (url, _process):
        control = Fake(url)
        control.call(
            "POST",
            "/_fake/faults",
            [
                {"preset": "delay", "method": method, "path": path, "seconds": seconds}
                | {"after": True, "times": 1_000_000}
                for method, path, seconds in SLOW_WRITES
            ],
        )
        yield control


def contracts() -> str:
    """Nine Stripe clients, every collection mode, one in EUR."""
    parts = []
    for index in range(CLIENTS):
        currency = 'currency = "EUR"\n' if index == 7 else ""
        parts.append(
            "[[clients]]\n"
            f'id = "client-{index:02d}"\n'
            f'name = "Client {index:02d} Ltd"\n'
            'targets = ["stripe"]\n'
            f"{currency}"
            "[clients.stripe]\n"
            f'collection = "{COLLECTIONS[index % 3]}"\n'
        )
    return "\n".join(parts)


def metrics(version: int) -> str:
    """One or two campaigns per client; version 2 moves even clients' fees down, odd ones up."""
    rng = random.Random(SEED)
    rows = ["client_id,campaign_id,spend,ltv,period"]
    for index in range(CLIENTS):
        for campaign in range(1 + index % 2):
            spend = Decimal(rng.randint(50_000, 400_000)) / 100
            extra = Decimal(rng.randint(5_000, 300_000)) / 100
            if version == 2:
                extra = extra / 2 if index % 2 == 0 else extra * 2
                extra = extra.quantize(Decimal("0.01"))
            rows.append(f"client-{index:02d},camp-{campaign},{spend},{spend * 3 + extra},{PERIOD}")
    return "\n".join(rows) + "\n"


class AmendWorkspace(Workspace):
    """The crash-recovery workspace, with nine clients and ``push --amend --yes``."""

    def start_amend(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        with (self.root / "logs" / f"run-{self.runs:03d}.log").open("wb") as log:
            return subprocess.Popen(
                [
                    str(KIKI),
                    "push",
                    "--period",
                    PERIOD,
                    "--contracts",
                    str(self.root / "contracts.toml"),
                    "--metrics",
                    str(self.root / "metrics.csv"),
                    "--amend",
                    "--yes",
                ],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )


def computed(workspace: Workspace) -> dict[str, Invoice]:
    run = compute_period(
        workspace.root / "contracts.toml",
        MetricsSource("metrics_file", str(workspace.root / "metrics.csv")),
        BillingPeriod.month(PERIOD),
    ).run
    return {inv.client_id: inv for inv in run.invoices}


def test_amend_killed_at_random_moments_then_rerun_corrects_each_invoice_once(
    tmp_path: Path, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.crash.test_crash_recovery as base

    monkeypatch.setattr(base, "CLIENTS", CLIENTS)
    workspace = AmendWorkspace(tmp_path, fake, [PERIOD])  # type: ignore[arg-type]
    (tmp_path / "contracts.toml").write_text(contracts())
    (tmp_path / "metrics.csv").write_text(metrics(1))
    workspace.env["KIKI_STRIPE_CONCURRENCY"] = "2"
    workspace.push_to_completion(PERIOD)
    issued = computed(workspace)
    by_number = {inv["metadata"]["kiki_invoice_number"]: inv for inv in fake.state()["invoices"]}
    payments: dict[str, int] = {}
    for index, how in PAID.items():
        invoice = by_number[issued[f"client-{index:02d}"].number]
        marked = fake.call("POST", "/_fake/invoices/mark", {"invoice": invoice["id"], "state": how})
        payments[f"client-{index:02d}"] = marked["amount_paid"]
    for index in range(CLIENTS):
        if COLLECTIONS[index % 3] == "now":
            payments[f"client-{index:02d}"] = by_number[issued[f"client-{index:02d}"].number][
                "amount_paid"
            ]

    (tmp_path / "metrics.csv").write_text(metrics(2))
    revised = computed(workspace)
    assert all(revised[c].total_fee != issued[c].total_fee for c in issued)
    rng = random.Random(SEED)
    stats = Stats()
    for _ in range(3 * KILLS):
        process = workspace.start_amend()
        workspace.kill_at_random(process, rng, stats)
        if stats.kills >= KILLS:
            break
    for _ in range(4):
        code = workspace.start_amend().wait(timeout=RUN_TIMEOUT)
        if code == 0:
            break
        assert code == 1, workspace.log_tail()
    else:
        pytest.fail(f"push --amend did not complete:\n{workspace.log_tail()}")

    state = fake.state()
    invoices: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for invoice in state["invoices"]:
        meta = invoice["metadata"]
        invoices.setdefault((meta["kiki_invoice_number"], meta["kiki_revision"]), []).append(
            invoice
        )
    twice = {k: [i["id"] for i in v] for k, v in invoices.items() if len(v) != 1}
    assert not twice, f"invoices upstream more than once: {twice}"
    notes = Counter(
        (n["metadata"]["kiki_credits"], n["metadata"]["kiki_part"]) for n in state["credit_notes"]
    )
    assert all(count == 1 for count in notes.values()), notes
    balances = {c["metadata"]["kiki_client_id"]: c["balance"] for c in state["customers"]}
    for client, old in issued.items():
        new = revised[client]
        [r0] = invoices[(old.number, "0")]
        [r1] = invoices[(new.number, "1")]
        paid = payments.get(client, 0)
        credited = [n for n in state["credit_notes"] if n["invoice"] == r0["id"]]
        where = f"{client} ({COLLECTIONS[int(client[-2:]) % 3]}, paid {paid})"
        if paid:
            assert r0["status"] == "paid", where
            assert sum(n["total"] for n in credited) == cents(old.total_fee), where
        else:
            assert r0["status"] == "void", where
            assert credited == [], where
        assert r1["total"] == cents(new.total_fee) > 0, where
        got = sorted(
            (int(li["metadata"]["kiki_line_no"]), li["amount"]) for li in r1["lines"]["data"]
        )
        assert got == sorted((li.line_no, cents(li.fee)) for li in new.lines), where
        # The client owes the new total less what it paid; a payment above it stays credit.
        applied = (r1["ending_balance"] or 0) - (r1["starting_balance"] or 0)
        assert applied == min(paid, cents(new.total_fee)), where
        assert balances[client] == -max(paid - cents(new.total_fee), 0), where
    rows = workspace.status()
    assert len(rows) == 2 * CLIENTS
    assert {(r["revision"], r["state"]) for r in rows} == {(0, "delivered"), (1, "delivered")}
    found = workspace.settled_by_lookup()
    report = (
        f"{stats.line()} runs={workspace.runs} notes={sum(notes.values())} found={found} "
        f"resent={workspace.resent_steps()}"
    )
    print(f"\n{report}")
    assert stats.kills >= KILLS // 2, report
    # Kills landed mid-delivery, some with a step's outcome unknown (a void, a credit note or
    # a draft in flight), which a re-run settled by its look-up or by the same key.
    assert stats.mid_delivery >= 1 and stats.mid_step >= 1, report
