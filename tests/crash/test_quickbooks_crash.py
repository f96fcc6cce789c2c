"""Crash recovery for QuickBooks: ``kiki-billing push`` SIGKILLed at seeded random moments.

A real push process delivers a period's invoices to the QuickBooks fake running as its own
process; the fake answers creates and sends late (after the operation ran, its result kept under
the ``requestid``), so kills often leave a step done upstream but unknown to the ledger. After
the kills a push runs to completion. Then, from the fake's state: every invoice exists once, each
client has one customer, the realm one service item, each emailed invoice was emailed once, and
the ledger has every delivery ``delivered``. The access token is stored in the ledger before the
runs (as a previous run would have left it), so the kills exercise deliveries, not Intuit's
token rotation (whose window between rotation and storage no client can close).
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
from pathlib import Path
from typing import Any

import pytest

from kiki_billing.hub.credentials import LedgerCredentialStore
from kiki_billing.hub.ledger import Ledger
from tests.support.fake_provider import spawn_fake

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

KIKI = Path(sys.executable).with_name("kiki-billing")
SEED = 20260214
CLIENTS = 8
KILLS = 8
RUN_TIMEOUT = 120.0


def control(url: str, method: str, path: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def contracts() -> str:
    parts = ['[defaults]\ncurrency = "USD"\nbaseline_roas = "3.0"\nshare_rate = "0.10"\n']
    for index in range(CLIENTS):
        parts.append(
            f'[[clients]]\nid = "client-{index}"\nname = "Client {index} Ltd"\n'
            f'email = "ap@client-{index}.example"\ntargets = ["quickbooks"]\n'
            f"[clients.quickbooks]\nsend = {'true' if index % 2 else 'false'}\n"
        )
    return "\n".join(parts)


def metrics() -> str:
    rng = random.Random(SEED)
    rows = ["client_id,campaign_id,spend,ltv,period"]
    for index in range(CLIENTS):
        for campaign in range(1 + index % 3):
            spend = rng.randint(50_000, 900_000) / 100
            rows.append(f"client-{index},c-{index}-{campaign},{spend:.2f},{spend * 4:.2f},2026-01")
    return "\n".join(rows) + "\n"


def test_push_killed_at_random_moments_then_rerun_delivers_each_invoice_once(
    tmp_path: Path,
) -> None:
    with spawn_fake("tests.support.fake_quickbooks", "--seed", str(SEED), "--latency", "0.01") as (
        url,
        _process,
    ):
        for path in ("customer", "item", "invoice", "invoice/*/send"):
            control(
                url,
                "POST",
                "/_fake/faults",
                {"preset": "delay", "method": "POST", "path": f"/v3/company/*/{path}",
                 "seconds": 0.15, "after": True, "times": 10_000},
            )  # fmt: skip
        tokens = control(url, "POST", "/_fake/quickbooks/tokens")
        (tmp_path / "contracts.toml").write_text(contracts())
        (tmp_path / "metrics.csv").write_text(metrics())
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")} | {
            "KIKI_DATA_DIR": str(tmp_path / "data"),
            "KIKI_LOG_LEVEL": "ERROR",
            "KIKI_QUICKBOOKS_CLIENT_ID": tokens["client_id"],
            "KIKI_QUICKBOOKS_CLIENT_SECRET": tokens["client_secret"],
            "KIKI_QUICKBOOKS_REFRESH_TOKEN": tokens["refresh_token"],
            "KIKI_QUICKBOOKS_REALM_ID": tokens["realm"],
            "KIKI_QUICKBOOKS_ENVIRONMENT": "sandbox",
            "KIKI_QUICKBOOKS_API_BASE": f"{url}/v3",
            "KIKI_QUICKBOOKS_TOKEN_URL": f"{url}/oauth2/v1/tokens/bearer",
            "KIKI_QUICKBOOKS_CONCURRENCY": "3",
            "KIKI_RETRY_INITIAL_WAIT": "0.05",
            "KIKI_RETRY_MAX_WAIT": "0.5",
        }
        (tmp_path / "data").mkdir()
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite3'}")
        from kiki_billing_adapters.quickbooks import QuickBooksSettings

        seed = QuickBooksSettings(
            client_id="x", client_secret="x", realm_id="1", refresh_token=tokens["refresh_token"]
        ).seed_fingerprint()
        store = LedgerCredentialStore(ledger, "quickbooks", f"sandbox:{tokens['realm']}")
        store.update(
            lambda _current: {
                "access_token": tokens["access_token"],
                "refresh_token": tokens["refresh_token"],
                "expires_at": f"{time.time() + 3000:.0f}",
                "seed": seed,
            }
        )
        ledger.close()

        def start() -> subprocess.Popen[bytes]:
            command = [str(KIKI), "push", "--period", "2026-01", "--contracts", "contracts.toml",
                       "--metrics", "metrics.csv"]  # fmt: skip
            return subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )

        rng = random.Random(SEED)
        finished_first = 0
        for _ in range(KILLS):
            process = start()
            time.sleep(rng.uniform(0.6, 2.5))  # start-up takes ~0.5 s; then mid-delivery
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            else:
                finished_first += 1
            process.wait(timeout=30)
        for _ in range(3):
            final = start()
            _, err = final.communicate(timeout=RUN_TIMEOUT)
            if final.returncode == 0:
                break
            assert final.returncode == 1, err.decode(errors="replace")
        assert final.returncode == 0, err.decode(errors="replace")

        state = control(url, "GET", "/_fake/state")
        numbers = Counter(i["DocNumber"] for i in state["invoices"])
        assert len(numbers) == CLIENTS and set(numbers.values()) == {1}, numbers
        names = Counter(c["DisplayName"] for c in state["customers"])
        assert len(names) == CLIENTS and set(names.values()) == {1}, names
        assert [i["Name"] for i in state["items"]] == ["Profit share"]
        emailed = Counter(e["invoice"] for e in state["emails"])
        assert len(emailed) == CLIENTS // 2 and set(emailed.values()) == {1}, emailed
        assert state["token_grants"] == 0
        status = subprocess.run(
            [str(KIKI), "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        rows = json.loads(status.stdout)
        assert [r["state"] for r in rows] == ["delivered"] * CLIENTS
        assert finished_first < KILLS  # most kills landed mid-run
        ledger = sqlite3.connect(tmp_path / "data" / "ledger.sqlite3")
        settled = ledger.execute(
            "SELECT count(*) FROM delivery_steps WHERE origin = 'found' AND attempts > 0"
        ).fetchone()[0]
        ledger.close()
        assert settled > 0  # some kill left an unknown outcome that a look-up settled
