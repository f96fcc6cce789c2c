"""``kiki-billing reconcile`` as a user runs it, against the Stripe fake (reads only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_push import contracts, push_args, run
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

KEY = "sk_test_kiki_reconcile_cli_0123456789"


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=9) as server:
        yield server


def env(fake: FakeStripe) -> dict[str, str]:
    return {"KIKI_STRIPE_API_KEY": KEY, "KIKI_STRIPE_API_BASE": fake.url}


def reconciled(tmp_path: Path, fake: FakeStripe, *args: str) -> tuple[int, dict]:
    done = run(tmp_path, "reconcile", "--json", *args, env=env(fake))
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_reconcile_matches_then_reports_each_drift(tmp_path: Path, fake: FakeStripe) -> None:
    file = contracts(tmp_path, '["stripe"]')
    pushed = run(tmp_path, *push_args(tmp_path, file), env=env(fake))
    assert pushed.returncode == 0, pushed.stderr
    writes = len(fake.writes_since(0))

    code, data = reconciled(tmp_path, fake)
    assert code == 0, data
    assert data["summary"]["drift"] == 0 and data["summary"]["match"] >= 4
    table = run(tmp_path, "reconcile", env=env(fake))
    assert table.returncode == 0 and "0 drift" in table.stdout

    (invoice,) = fake.state()["invoices"]
    fake.mark_invoice(invoice["id"], "paid")
    copy = fake.duplicate_invoice(invoice["id"])
    code, data = reconciled(tmp_path, fake, "--period", "2026-01", "--target", "stripe")
    assert code == 1
    drift = {(f["check"], f["detail"]) for f in data["findings"] if f["result"] == "drift"}
    assert any(check == "exists" and copy in detail for check, detail in drift), drift
    shown = run(tmp_path, "reconcile", env=env(fake))
    assert shown.returncode == 1
    assert "drift:" in shown.stderr and "duplicate upstream" in shown.stderr

    # Nothing of either run wrote to Stripe.
    assert len(fake.writes_since(0)) == writes


def test_a_paid_invoice_the_ledger_does_not_know_is_drift(tmp_path: Path, fake: FakeStripe):
    file = contracts(tmp_path, '["stripe"]')
    assert run(tmp_path, *push_args(tmp_path, file), env=env(fake)).returncode == 0
    (invoice,) = fake.state()["invoices"]
    fake.mark_invoice(invoice["id"], "paid")
    code, data = reconciled(tmp_path, fake)
    assert code == 1
    [status] = [f for f in data["findings"] if f["check"] == "status"]
    assert status["detail"] == "paid upstream; the ledger does not know"
    # Once the ledger hears of the payment (sync-status here; a webhook alike), it matches.
    synced = run(tmp_path, "sync-status", env=env(fake))
    assert synced.returncode == 0, synced.stderr
    code, data = reconciled(tmp_path, fake)
    assert code == 0, data
    [status] = [f for f in data["findings"] if f["check"] == "status"]
    assert status["result"] == "match" and status["expected"] == "paid"


def test_reconcile_without_a_ledger_or_with_a_bad_target(tmp_path: Path, fake: FakeStripe):
    code, data = reconciled(tmp_path, fake)
    assert code == 0 and data == {
        "summary": {"checks": 0, "match": 0, "drift": 0, "skipped": 0},
        "findings": [],
    }
    bad = run(tmp_path, "reconcile", "--target", "nope", env=env(fake))
    assert bad.returncode == 2 and "unknown target 'nope'" in bad.stderr
    bad_period = run(tmp_path, "reconcile", "--period", "2026-13", env=env(fake))
    assert bad_period.returncode == 2 and "--period" in bad_period.stderr
