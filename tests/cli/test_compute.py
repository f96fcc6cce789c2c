"""End-to-end tests of ``kiki-billing compute`` and ``demo`` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiki_billing.cli import app
from kiki_billing.exports.csv_formats import QUICKBOOKS_HEADER, XERO_HEADER

runner = CliRunner()

CONTRACTS = """\
[defaults]
currency = "USD"
baseline_roas = "3.0"
share_rate = "0.10"

[[clients]]
id = "acme"
name = "Acme Corp"
email = "billing@acme.example"

[[clients]]
id = "techstartup"
name = "TechStartup Inc"
"""
HEADER = "client_id,campaign_id,spend,ltv\n"
GOOD_ROWS = "acme,campaign_001,36000.00,130090.00\ntechstartup,campaign_002,44000.00,164130.00\n"


def run_compute(tmp_path: Path, metrics: str | bytes, contracts: str = CONTRACTS, *extra: str):
    contracts_file = tmp_path / "contracts.toml"
    contracts_file.write_text(contracts)
    metrics_file = tmp_path / "metrics.csv"
    if isinstance(metrics, bytes):
        metrics_file.write_bytes(metrics)
    else:
        metrics_file.write_text(metrics)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "compute",
            "--period",
            "2026-01",
            "--contracts",
            str(contracts_file),
            "--metrics",
            str(metrics_file),
            "--out",
            str(out),
            *extra,
        ],
    )
    return result, out


def test_compute_json_prints_summary_and_invoices(tmp_path: Path) -> None:
    result, out = run_compute(tmp_path, HEADER + GOOD_ROWS, CONTRACTS, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["total_fee"] == "5422.00"
    assert data["summary"]["total_margin_recovered"] == "54220.00"
    invoices = {inv["client_id"]: inv for inv in data["invoices"]}
    acme = invoices["acme"]
    assert acme["number"].startswith("KIKI-OaaS-202601-")
    assert acme["currency"] == "USD"
    assert acme["total_fee"] == "2209.00"
    assert acme["total_margin_recovered"] == "22090.00"
    line = acme["lines"][0]
    assert (
        line["campaign_id"],
        line["spend"],
        line["ltv"],
        line["margin_recovered"],
        line["fee"],
    ) == ("campaign_001", "36000.00", "130090.00", "22090.00", "2209.00")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        [f"invoices/{inv['number']}.json" for inv in data["invoices"]]
        + ["summary.json", "quickbooks-invoices.csv", "xero-invoices.csv"]
    )
    stored = json.loads((out / f"invoices/{acme['number']}.json").read_text())
    assert stored == acme


def test_compute_csv_exports_have_the_providers_headers_and_reconcile(tmp_path: Path) -> None:
    result, out = run_compute(tmp_path, HEADER + GOOD_ROWS)
    assert result.exit_code == 0, result.output
    qbo = (out / "quickbooks-invoices.csv").read_text().splitlines()
    xero = (out / "xero-invoices.csv").read_text().splitlines()
    assert qbo[0].split(",") == QUICKBOOKS_HEADER
    assert xero[0] == ",".join(XERO_HEADER)
    assert sum(float(row.split(",")[-2]) for row in qbo[1:]) == 5422.0
    assert xero[1].split(",")[12] == "01/02/2026"  # DD/MM/YYYY by default


def test_demo_reproduces_the_worked_example(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "kiki-out"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    summary = data["summary"]
    assert (summary["total_fee"], summary["total_margin_recovered"]) == ("8121.00", "81210.00")
    assert (summary["total_spend"], summary["total_ltv"]) == ("145000.00", "516210.00")
    assert (summary["total_baseline_value"], summary["client_keeps"]) == ("435000.00", "73089.00")
    fees = {inv["client_name"]: inv["total_fee"] for inv in data["invoices"]}
    assert fees == {
        "Acme Corp": "2209.00",
        "TechStartup Inc": "3213.00",
        "E-commerce Co": "1753.00",
        "SaaS Platform": "946.00",
    }


def test_demo_table_runs_as_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("kiki-billing")
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    done = subprocess.run(
        [str(script), "demo"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "8,121.00" in done.stdout and "81,210.00" in done.stdout
    assert (tmp_path / "kiki-out" / "summary.json").exists()


BAD_INPUTS = {
    "missing_column": (
        HEADER.replace(",ltv", "") + "acme,c,1\n",
        CONTRACTS,
        "metrics.csv, row 1, field 'ltv': missing required column",
    ),
    "non_numeric": (
        HEADER + "acme,c,abc,5\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'spend': not a decimal amount: 'abc'",
    ),
    "float_exponent": (
        HEADER + "acme,c,1,5e3\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'ltv': not a decimal amount: '5e3'",
    ),
    "negative_spend": (
        HEADER + "acme,c,-1.00,5\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'spend': must not be negative",
    ),
    "nan": (
        HEADER + "acme,c,NaN,5\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'spend': not a decimal amount: 'NaN'",
    ),
    "infinity": (
        HEADER + "acme,c,1,Infinity\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'ltv': not a decimal amount: 'Infinity'",
    ),
    "duplicate_campaign": (
        HEADER + GOOD_ROWS + "acme,campaign_001,1,5\n",
        CONTRACTS,
        "metrics.csv, row 4, field 'campaign_id': duplicate campaign",
    ),
    "client_without_contract": (
        HEADER + "ghost,c,1,5\n",
        CONTRACTS,
        "metrics.csv, row 2, field 'client_id': client 'ghost' has no contract",
    ),
    "unknown_currency": (
        HEADER + GOOD_ROWS,
        CONTRACTS.replace('currency = "USD"', 'currency = "XYZ"'),
        "field 'defaults.currency': client 'acme': unknown currency 'XYZ'",
    ),
    "share_rate_out_of_range": (
        HEADER + GOOD_ROWS,
        CONTRACTS.replace('"0.10"', '"1.5"'),
        "field 'defaults.share_rate': client 'acme': share rate must be between 0 and 1",
    ),
    "non_utf8": (
        HEADER.encode() + b"acme,caf\xe9,1,5\n",
        CONTRACTS,
        "metrics.csv, row 2: not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    metrics, contracts, expected = BAD_INPUTS[case]
    result, out = run_compute(tmp_path, metrics, contracts)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unknown_currency_names_the_contracts_file_and_row(tmp_path: Path) -> None:
    result, _ = run_compute(tmp_path, HEADER + GOOD_ROWS, CONTRACTS.replace('"USD"', '"XYZ"'))
    assert "contracts.toml" in result.stderr


def test_share_rate_error_names_the_client_line(tmp_path: Path) -> None:
    bad = CONTRACTS + '\n[[clients]]\nid = "gamma"\nname = "G"\nshare_rate = "-0.1"\n'
    result, _ = run_compute(tmp_path, HEADER + GOOD_ROWS, bad)
    assert result.exit_code == 2
    assert "contracts.toml, row 16, field 'share_rate': client 'gamma': share rate" in result.stderr


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "compute",
            "--period",
            "2026-01",
            "--contracts",
            str(tmp_path / "contracts.toml"),
            "--metrics",
            str(tmp_path),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2
    assert "is a directory" in result.stderr or "Invalid value" in result.output
    if os.geteuid() != 0:
        unreadable = tmp_path / "secret.csv"
        unreadable.write_text(HEADER)
        unreadable.chmod(0)
        result = runner.invoke(
            app,
            [
                "compute",
                "--period",
                "2026-01",
                "--contracts",
                str(tmp_path / "contracts.toml"),
                "--metrics",
                str(unreadable),
            ],
        )
        assert result.exit_code == 2 and "cannot read file" in result.stderr
    missing = runner.invoke(
        app,
        [
            "compute",
            "--period",
            "2026-01",
            "--contracts",
            str(tmp_path / "contracts.toml"),
            "--metrics",
            str(tmp_path / "nope.csv"),
            "--out",
            str(out),
        ],
    )
    assert missing.exit_code == 2
    assert "nope.csv: file not found" in missing.stderr
    assert not out.exists()


def test_existing_outputs_survive_a_failed_run(tmp_path: Path) -> None:
    result, out = run_compute(tmp_path, HEADER + GOOD_ROWS)
    assert result.exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result, out = run_compute(tmp_path, HEADER + "acme,c,oops,1\n")
    assert result.exit_code == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_tampered_audit_trail_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from kiki_billing.sources.audit_trail import AuditEvent, append_audit_events

    trail = tmp_path / "audit.csv"
    at = datetime(2026, 1, 10, tzinfo=UTC)
    append_audit_events(
        trail,
        [
            AuditEvent(at, "acme", "campaign_001", "spend", Decimal("36000.00")),
            AuditEvent(at, "acme", "campaign_001", "ltv", Decimal("130090.00")),
        ],
    )
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    args = [
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        str(tmp_path / "contracts.toml"),
        "--audit",
        str(trail),
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    good = runner.invoke(app, args)
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["summary"]["total_fee"] == "2209.00"
    trail.write_text(trail.read_text().replace("130090.00", "130990.00"))
    args[-2] = str(tmp_path / "out2")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {trail}, row 3, field 'record_hash'")
    assert not (tmp_path / "out2").exists()


@pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])
def test_unreachable_prometheus_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "compute",
            "--period",
            "2026-01",
            "--contracts",
            str(tmp_path / "contracts.toml"),
            "--prometheus",
            "http://127.0.0.1:9",
            "--prometheus-timeout",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "cannot reach Prometheus at http://127.0.0.1:9" in line
    assert not out.exists()
