"""What an operator hits on a real month: each class of silent double billing or silent miss.

Each test names the class it covers and tries several cases of it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiki_billing.cli import app
from kiki_billing.hub import registry
from kiki_billing.hub.ledger import DeliveryState, Ledger

METRICS = (
    "client_id,campaign_id,spend,ltv,period\n"
    "acme,campaign_001,36000.00,130090.00,2026-01\n"
    "tech,campaign_002,44000.00,164130.00,2026-01\n"
)
CONTRACTS = """\
[[clients]]
id = "acme"
name = "Acme Corp"
targets = ["json"]

[[clients]]
id = "tech"
name = "TechStartup Inc"
targets = ["json"]
"""


@pytest.fixture
def month(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KIKI_") and name != "KIKI_ADAPTER_PACKAGES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("KIKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KIKI_JSON_DIR", str(tmp_path / "out-json"))
    registry.reset_cache()
    (tmp_path / "metrics.csv").write_text(METRICS)
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    return tmp_path


def run(*args: str | Path, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env or {})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result


def push(
    *extra: str | Path,
    metrics: str | Path = "metrics.csv",
    period: str = "2026-01",
    env: dict[str, str] | None = None,
):
    return run(
        "push",
        "--period",
        period,
        "--contracts",
        "contracts.toml",
        "--metrics",
        metrics,
        *extra,
        env=env,
    )


def ledger(root: Path) -> Ledger:
    return Ledger(f"sqlite:///{root / 'data' / 'ledger.sqlite3'}")


# 3. An invoice's identity is its billing content ------------------------------------------------


@pytest.mark.parametrize(
    "copy",
    [
        "other-folder/metrics.csv",  # another working folder
        "renamed-metrics-jan.csv",  # another file name
        "crlf.csv",  # Windows line endings
        "./sub/../metrics-again.csv",  # another spelling of a path
    ],
)
def test_the_same_month_from_another_copy_is_delivered_before(month: Path, copy: str) -> None:
    first = push()
    assert first.exit_code == 0, first.stderr
    target = month / copy
    target.parent.mkdir(parents=True, exist_ok=True)
    (month / "sub").mkdir(exist_ok=True)
    text = METRICS.replace("\n", "\r\n") if copy == "crlf.csv" else METRICS
    target.write_bytes(text.encode())
    shown = push("--dry-run", metrics=copy)
    assert shown.exit_code == 0, shown.stdout + shown.stderr
    assert shown.stdout.count("delivered before: nothing to send") == 2
    again = push(metrics=copy)
    assert again.exit_code == 0, again.stdout + again.stderr
    assert "2 delivered" in again.stdout and "delivered before" in again.stdout


def test_changed_billed_content_is_a_conflict_in_dry_run_and_push_alike(month: Path) -> None:
    assert push().exit_code == 0
    (month / "metrics.csv").write_text(METRICS.replace("130090.00", "130190.00"))
    shown = push("--dry-run")
    assert shown.exit_code == 1
    assert "would fail" in shown.stdout and "new revision" in shown.stdout
    pushed = push()
    assert pushed.exit_code == 1
    assert "a correction needs a new revision" in pushed.stderr


# 4. Nothing billable silently goes nowhere ------------------------------------------------------


def test_a_billable_client_without_targets_stops_the_push(month: Path) -> None:
    (month / "contracts.toml").write_text(CONTRACTS.replace('targets = ["json"]\n\n[[', "\n[[", 1))
    refused = push()
    assert refused.exit_code == 2
    assert "without targets: acme (2209.00 USD)" in refused.stderr
    assert not (month / "out-json").exists()
    allowed = push("--skip-untargeted")
    assert allowed.exit_code == 0, allowed.stderr
    assert "not billed anywhere" in allowed.stderr
    assert len(list((month / "out-json").glob("*.json"))) == 1


def test_a_source_without_rows_for_the_period_is_an_error_unless_allowed(month: Path) -> None:
    for period in ("2025-11", "2025-12"):
        refused = push(period=period)
        assert refused.exit_code == 2 and "no metrics for period" in refused.stderr
    allowed = push("--allow-empty", period="2025-12")
    assert allowed.exit_code == 0, allowed.stderr


def test_an_undated_metrics_file_is_billed_for_one_period_only(month: Path) -> None:
    undated = month / "undated.csv"
    undated.write_text("client_id,campaign_id,spend,ltv\nacme,campaign_001,36000.00,130090.00\n")
    (month / "contracts.toml").write_text(CONTRACTS.split("\n\n")[0] + "\n")
    first = push(metrics="undated.csv", period="2026-01")
    assert first.exit_code == 0, first.stderr
    assert "has no period column" in first.stderr
    for period in ("2026-02", "2025-12"):
        again = push(metrics="undated.csv", period=period)
        assert again.exit_code == 2, again.stdout
        assert "was billed for 2026-01" in again.stderr
        assert "dry-run" not in again.stderr
    assert push("--dry-run", metrics="undated.csv", period="2026-02").exit_code == 2
    assert push(metrics="undated.csv", period="2026-01").exit_code == 0


def test_an_open_period_needs_a_flag(month: Path) -> None:
    current = time.strftime("%Y-%m", time.gmtime())
    (month / "metrics.csv").write_text(METRICS.replace("2026-01", current))
    refused = push(period=current)
    assert refused.exit_code == 2 and "--allow-open-period" in refused.stderr
    allowed = push("--allow-open-period", period=current)
    assert allowed.exit_code == 0, allowed.stderr
    assert "has not ended yet" in allowed.stderr


# 5. Exit codes a cron job can trust -------------------------------------------------------------


def test_push_exits_1_while_another_host_holds_a_delivery(month: Path) -> None:
    assert push("--dry-run").exit_code == 0
    first = push("--client", "acme")
    assert first.exit_code == 0
    store = ledger(month)
    computed = store.deliveries()[0]
    held = run("status", "--json")
    assert held.exit_code == 0
    # A second push elsewhere has claimed the other client's delivery and still runs.
    from kiki_billing.models import BillingPeriod
    from kiki_billing.pipeline import MetricsSource, compute_period

    period = compute_period(
        month / "contracts.toml",
        MetricsSource("metrics_file", str(month / "metrics.csv")),
        BillingPeriod.month("2026-01"),
    )
    tech = next(inv for inv in period.run.invoices if inv.client_id == "tech")
    record = store.ensure_delivery(tech, "json", computed.account, {})
    store.record_invoice(tech)
    assert store.claim(record.id, "other-host:77:1", [DeliveryState.PENDING], time.time())
    pushed = push()
    assert pushed.exit_code == 1
    assert "being delivered by another process" in pushed.stderr
    assert run("status").exit_code == 0  # held by a live lease: not stuck
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE deliveries SET lease_until = 0 WHERE state = 'in_flight'")
    stuck = run("status")
    assert stuck.exit_code == 1 and "stuck" in stuck.stdout
    assert push().exit_code == 0  # the expired lease is taken over and delivered
    assert run("status").exit_code == 0
    store.close()


@pytest.mark.parametrize("state", ["failed", "deferred"])
def test_status_exits_1_when_anything_is_failed_or_deferred(month: Path, state: str) -> None:
    assert push().exit_code == 0
    assert run("status").exit_code == 0
    with sqlite3.connect(month / "data" / "ledger.sqlite3") as conn:
        conn.execute("UPDATE deliveries SET state = ? WHERE client_id = 'acme'", (state,))
    assert run("status").exit_code == 1
    assert run("status", "--client", "tech").exit_code == 0
    assert run("status", "--state", state, "--json").exit_code == 1


def test_quiet_push_prints_one_summary_line(month: Path) -> None:
    quiet = push("--quiet")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stdout.strip() == "2 delivered"
    assert quiet.stderr == ""


def test_progress_counts_each_delivery_once(month: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    advanced: list[str] = []
    from rich.progress import Progress

    real = Progress.advance

    def count(self, task_id, advance=1):  # type: ignore[no-untyped-def]
        advanced.append(self.tasks[task_id].description)
        real(self, task_id, advance)
        task = self.tasks[task_id]
        assert task.completed <= task.total

    monkeypatch.setattr(Progress, "advance", count)
    assert push().exit_code == 0
    assert push().exit_code == 0  # delivered before: counted once each again
    assert advanced == ["json"] * 4


# 2. The account is part of a delivery's identity ------------------------------------------------


def test_another_account_of_the_same_target_is_another_delivery(month: Path) -> None:
    assert push().exit_code == 0
    other = month / "other-account"
    moved = push(env={"KIKI_JSON_DIR": str(other)})
    assert moved.exit_code == 0, moved.stderr
    assert "2 delivered" in moved.stdout and "delivered before" not in moved.stdout
    rows = json.loads(run("status", "--json").stdout)
    assert {row["account"] for row in rows} == {
        str((month / "out-json").resolve()),
        str(other.resolve()),
    }
    shown = run("show", rows[0]["invoice"])
    assert shown.exit_code == 0
    assert shown.stdout.count("json account ") == 2


# 9. Files an accountant can open safely ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ['=HYPERLINK("http://x")', "+1 555", "-sum(A1)", "@cmd", "\tTab Co", "\rCR Co"]
)
def test_no_csv_cell_starts_a_formula(month: Path, name: str) -> None:
    contracts = CONTRACTS.replace('"Acme Corp"', json.dumps(name))
    (month / "contracts.toml").write_text(contracts)
    done = run(
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        "contracts.toml",
        "--metrics",
        "metrics.csv",
        "--out",
        "files",
    )
    assert done.exit_code == 0, done.stderr
    import csv

    for csv_file in (month / "files").glob("*.csv"):
        with csv_file.open(newline="") as handle:
            rows = list(csv.reader(handle))
        for row in rows[1:]:
            for header, cell in zip(rows[0], row, strict=True):
                if header in (
                    "*UnitAmount",
                    "ItemRate",
                    "*ItemAmount",
                    "*Quantity",
                    "ItemQuantity",
                ):
                    float(cell)  # amounts stay numeric
                    continue
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (header, cell)
        assert any(f"'{name}" in cell for row in rows for cell in row)


def test_a_negative_adjustment_stays_a_number_in_the_csv(month: Path) -> None:
    (month / "contracts.toml").write_text(
        CONTRACTS.replace('targets = ["json"]', 'fee_cap = "1000"\ntargets = ["json"]', 1)
    )
    done = run(
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        "contracts.toml",
        "--metrics",
        "metrics.csv",
        "--out",
        "files",
    )
    assert done.exit_code == 0, done.stderr
    text = (month / "files" / "xero-invoices.csv").read_text()
    assert ",-1209.00," in text


def test_compute_into_a_used_folder_leaves_no_stale_invoice(month: Path) -> None:
    args = ("compute", "--period", "2026-01", "--contracts", "contracts.toml", "--metrics")
    assert run(*args, "metrics.csv", "--out", "files").exit_code == 0
    assert len(list((month / "files" / "invoices").glob("*.json"))) == 2
    (month / "contracts.toml").write_text(CONTRACTS.split("\n\n")[0] + "\n")
    (month / "one.csv").write_text(METRICS.splitlines()[0] + "\n" + METRICS.splitlines()[1] + "\n")
    (month / "files" / "notes.txt").write_text("mine")
    assert run(*args, "one.csv", "--out", "files").exit_code == 0
    invoices = list((month / "files" / "invoices").glob("*.json"))
    summary = json.loads((month / "files" / "summary.json").read_text())
    assert len(invoices) == summary["invoices"] == 1
    assert (month / "files" / "notes.txt").read_text() == "mine"  # not ours: left alone


def test_files_and_ledger_are_readable_by_their_owner_only(month: Path) -> None:
    assert push().exit_code == 0
    assert (
        run(
            "compute",
            "--period",
            "2026-01",
            "--contracts",
            "contracts.toml",
            "--metrics",
            "metrics.csv",
            "--out",
            "files",
        ).exit_code
        == 0
    )
    paths = [
        month / "data" / "ledger.sqlite3",
        *(month / "out-json").glob("*"),
        *(month / "files").rglob("*.json"),
        *(month / "files").glob("*.csv"),
    ]
    assert paths
    for path in paths:
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))


# 8. Operator tools --------------------------------------------------------------------------------


def test_version_and_contracts_from_the_environment(month: Path) -> None:
    version = run("--version")
    assert version.exit_code == 0 and version.stdout.startswith("kiki-billing ")
    done = run(
        "push",
        "--period",
        "2026-01",
        "--metrics",
        "metrics.csv",
        env={"KIKI_CONTRACTS": str(month / "contracts.toml")},
    )
    assert done.exit_code == 0, done.stderr
    retried = run("retry", env={"KIKI_CONTRACTS": str(month / "contracts.toml")})
    assert retried.exit_code == 0 and "Nothing to retry" in retried.stdout


def test_show_lists_every_delivery_and_step(month: Path) -> None:
    assert push().exit_code == 0
    number = json.loads(run("status", "--json").stdout)[0]["invoice"]
    shown = run("show", number)
    assert shown.exit_code == 0
    assert number in shown.stdout and "write" in shown.stdout and "k1-" in shown.stdout
    data = json.loads(run("show", number, "--json").stdout)
    assert data["deliveries"][0]["steps"][0]["idempotency_key"].startswith("k1-")


def test_adapters_print_install_commands_that_paste(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "stripe" else real(name, *a)
    )
    registry.reset_cache()
    shown = run("adapters")
    assert shown.exit_code == 0
    assert "stripe: pip install 'kiki-billing[stripe]'" in shown.stdout.splitlines()


def test_the_example_contracts_file_matches_the_sample_data(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = run(
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        root / "config" / "contracts.example.toml",
        "--metrics",
        root / "kiki_billing" / "data" / "sample_metrics.csv",
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert done.exit_code == 0, done.stderr
    data = json.loads(done.stdout)
    fees = {inv["client_id"]: inv["total_fee"] for inv in data["invoices"]}
    assert fees == {
        "acme": "2209.00",
        "techstartup": "3213.00",
        "ecommerce": "1753.00",
        "saas": "946.00",
    }
