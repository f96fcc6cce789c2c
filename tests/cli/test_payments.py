"""``webhooks serve``, ``sync-status``, ``status`` with payment states, and ``metrics write``,
run as a user runs them: separate processes, a Stripe fake, a real HTTP request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from stripe._webhook import WebhookSignature

from tests.support.fake_stripe import FakeStripe
from tests.support.servers import free_port

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

API_KEY = "sk_test_kiki_cli_payments_0123456789abcdef"
WEBHOOK_SECRET = "whsec_kiki_cli_Secret+0123456789abcdef"
WAIT = 120.0
METRICS = "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"
CONTRACTS = (
    '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntimezone = "Asia/Tokyo"\n'
    'targets = ["stripe", "json"]\n'
)


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=7) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, fake: FakeStripe) -> dict[str, str]:
    (tmp_path / "metrics.csv").write_text(METRICS)
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    return base | {
        "KIKI_DATA_DIR": str(tmp_path / "data"),
        "KIKI_LOG_LEVEL": "INFO",
        "KIKI_ADAPTER_PACKAGES": "kiki-billing",
        "KIKI_STRIPE_API_KEY": API_KEY,
        "KIKI_STRIPE_API_BASE": fake.url,
    }


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiki_billing", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


def pushed(tmp_path: Path, env: dict[str, str]) -> dict:
    done = cli(tmp_path, env, "push", "--period", "2026-01", "--contracts", "contracts.toml",
               "--metrics", "metrics.csv", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(cli(tmp_path, env, "status", "--json", "--target", "stripe").stdout)
    [row] = rows
    return row


def stripe_event(kind: str, invoice: dict, event_id: str) -> bytes:
    body = {"id": event_id, "object": "event", "api_version": "2023-08-16",
            "created": int(time.time()), "livemode": False, "type": kind,
            "data": {"object": invoice}}  # fmt: skip
    return json.dumps(body).encode()


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    header = WebhookSignature.generate_signature_header(body.decode(), secret)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def wait_until_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while process.poll() is None:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not come up: {process.communicate()}")


def test_a_signed_stripe_webhook_to_the_running_server_marks_the_invoice_paid(
    tmp_path: Path, env: dict[str, str], fake: FakeStripe
) -> None:
    row = pushed(tmp_path, env)
    assert (row["payment_state"], row["timezone"], row["due_date"]) == (
        None,
        "Asia/Tokyo",
        "2026-03-03",
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kiki_billing", "webhooks", "serve", "--port", str(port)],
        cwd=tmp_path, env=env | {"KIKI_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        invoice = fake.mark_invoice(row["refs"]["invoice_id"], "paid")
        body = stripe_event("invoice.paid", invoice, "evt_cli_1")
        forged = requests.post(
            f"{url}/webhooks/stripe", data=body, headers=sign(body, "whsec_x0123456789"), timeout=30
        )
        assert forged.status_code == 400
        answer = requests.post(f"{url}/webhooks/stripe", data=body, headers=sign(body), timeout=30)
        assert answer.status_code == 200
        again = requests.post(f"{url}/webhooks/stripe", data=body, headers=sign(body), timeout=30)
        assert again.status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    outcomes = [(e.get("event"), e.get("outcome") or e.get("status")) for e in lines]
    assert ("webhook.rejected", 400) in outcomes
    assert ("webhook.event", "applied") in outcomes and ("webhook.event", "replayed") in outcomes
    for text in (out, err):
        assert WEBHOOK_SECRET not in text and API_KEY not in text
    [paid] = json.loads(cli(tmp_path, env, "status", "--json", "--target", "stripe").stdout)
    assert (paid["payment_state"], paid["payment_event"], paid["overdue"]) == (
        "paid",
        "evt_cli_1",
        False,
    )
    shown = cli(tmp_path, env, "status", "--target", "stripe")
    assert "paid" in shown.stdout
    assert cli(tmp_path, env, "metrics", "write", "kiki.prom").returncode == 0
    prom = (tmp_path / "kiki.prom").read_text()
    assert 'kiki_ooaS_invoices_generated_total{status="paid"} 1' in prom
    assert 'kiki_billing_webhook_events_total{outcome="applied",target="stripe"} 1' in prom


def test_sync_status_reads_states_back_without_webhooks(
    tmp_path: Path, env: dict[str, str], fake: FakeStripe
) -> None:
    row = pushed(tmp_path, env)
    first = cli(tmp_path, env, "sync-status", "--period", "2026-01", "--json")
    assert first.returncode == 0, first.stderr
    assert [
        (r["target"], r["before"], r["after"], r["outcome"]) for r in json.loads(first.stdout)
    ] == [("stripe", None, "open", "applied")]
    assert "json: cannot read payment states back; skipped" in first.stderr
    fake.mark_invoice(row["refs"]["invoice_id"], "paid")
    second = cli(tmp_path, env, "sync-status", "--target", "stripe")
    assert second.returncode == 0, second.stderr
    assert "open" in second.stdout and "paid" in second.stdout and "1 applied" in second.stdout
    third = cli(tmp_path, env, "sync-status", "--json")
    assert [r["outcome"] for r in json.loads(third.stdout)] == ["unchanged"]
    [status] = json.loads(cli(tmp_path, env, "status", "--json", "--target", "stripe").stdout)
    assert status["payment_state"] == "paid" and status["payment_source"] == "sync"


def test_sync_status_exits_1_when_a_provider_cannot_be_read(
    tmp_path: Path, env: dict[str, str], fake: FakeStripe
) -> None:
    pushed(tmp_path, env)
    fake.inject_503("GET", "/v1/invoices", times=20)
    done = cli(
        tmp_path, env | {"KIKI_RETRY_MAX_ATTEMPTS": "1"}, "sync-status", "--target", "stripe"
    )
    assert done.returncode == 1
    assert "error" in done.stdout and API_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "extra", "expected"),
    [
        (["sync-status", "--target", "nope"], {}, "unknown target 'nope'"),
        (["sync-status", "--period", "2026-13"], {}, "period"),
        (["webhooks", "serve"], {}, "no webhook secret is set"),
        (["webhooks", "serve"], {"KIKI_STRIPE_WEBHOOK_SECRET": "whsec with space"},
         "KIKI_STRIPE_WEBHOOK_SECRET is invalid"),
        (["webhooks", "serve"], {"KIKI_ZUORA_WEBHOOK_SECRET": "abcdef123456"},
         "adapter 'zuora' receives no webhooks; unset KIKI_ZUORA_WEBHOOK_SECRET"),
        (["webhooks", "serve", "--port", "70000"], {}, "Invalid value for '--port'"),
        (["metrics", "serve", "--port", "-1"], {}, "Invalid value for '--port'"),
        (["metrics", "write", "no/such/folder/k.prom"], {}, "its folder does not exist"),
        (["metrics", "write", "."], {}, "is a folder"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_with_nothing_changed(
    tmp_path: Path, env: dict[str, str], args: list[str], extra: dict[str, str], expected: str
) -> None:
    pushed(tmp_path, env)
    ledger = (tmp_path / "data" / "ledger.sqlite3").read_bytes()
    done = cli(tmp_path, env | extra, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "data" / "ledger.sqlite3").read_bytes() == ledger
    assert "whsec with space" not in done.stderr


def test_metrics_need_a_ledger(tmp_path: Path, env: dict[str, str]) -> None:
    done = cli(tmp_path, env, "metrics", "write", "kiki.prom")
    assert done.returncode == 2 and "no ledger" in done.stderr
    assert not (tmp_path / "kiki.prom").exists() and not (tmp_path / "data").exists()


def test_metrics_write_replaces_the_file_atomically(tmp_path: Path, env: dict[str, str]) -> None:
    pushed(tmp_path, env)
    target = tmp_path / "kiki.prom"
    target.write_text("old\n")
    done = cli(tmp_path, env, "metrics", "write", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_text().startswith("# HELP kiki_ooaS_revenue_total_micros")
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".kiki.prom")) == []
    warned = cli(tmp_path, env, "metrics", "write", str(tmp_path / "kiki.txt"))
    assert warned.returncode == 0 and "reads only *.prom" in warned.stderr


def test_metrics_serve_answers_and_stops_cleanly(tmp_path: Path, env: dict[str, str]) -> None:
    pushed(tmp_path, env)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kiki_billing", "metrics", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        scrape = requests.get(f"{url}/metrics", timeout=30)
        assert scrape.status_code == 200
        assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "kiki_ooaS_revenue_total_micros" in scrape.text
        assert requests.get(f"{url}/nope", timeout=30).status_code == 404
        assert requests.post(f"{url}/metrics", timeout=30).status_code == 405
        busy = cli(tmp_path, env, "metrics", "serve", "--port", str(port))
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        server.send_signal(signal.SIGINT)
        _out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert f"serving http://127.0.0.1:{port}/metrics" in err


def test_a_file_target_has_no_payment_state_and_is_never_overdue(
    tmp_path: Path, env: dict[str, str]
) -> None:
    done = cli(tmp_path, env, "push", "--period", "2026-01", "--contracts", "contracts.toml",
               "--metrics", "metrics.csv", "--issue-date", "2026-02-01", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["target"]: r for r in json.loads(cli(tmp_path, env, "status", "--json").stdout)}
    # Due 30 days after 2026-02-01 and nothing heard from Stripe: overdue there...
    assert (rows["stripe"]["payment_state"], rows["stripe"]["overdue"]) == (None, True)
    # ...while a JSON file cannot be paid or overdue.
    assert (rows["json"]["payment_state"], rows["json"]["overdue"]) == (None, False)
    table = cli(tmp_path, env, "status", "--target", "json").stdout
    assert "overdue" not in table and "unknown" not in table
