"""``carry_forward_below`` as a user runs it: January's small fee waits for February's invoice."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_push import run

JANUARY = "acme,c1,100.00,303.00,2026-01\n"  # fee 0.30
FEBRUARY = "acme,c1,100.00,400.00,2026-02\n"  # fee 10.00
HEADER = "client_id,campaign_id,spend,ltv,period\n"


def setup(tmp_path: Path, below: str = '"0.50"') -> Path:
    path = tmp_path / "contracts.toml"
    path.write_text(
        f'[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["json"]\n'
        f"carry_forward_below = {below}\n"
    )
    return path


def push(tmp_path: Path, contracts: Path, period: str, metrics: str, *extra: str):
    args = ["push", "--period", period, "--contracts", str(contracts)]
    return run(tmp_path, *args, "--metrics", str(tmp_path / "metrics.csv"), *extra, metrics=metrics)


def exported(tmp_path: Path) -> dict[str, dict]:
    folder = tmp_path / "kiki-out" / "exports" / "json"
    return (
        {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
        if folder.exists()
        else {}
    )


def test_a_small_fee_is_carried_to_the_next_invoice_once(tmp_path: Path) -> None:
    contracts = setup(tmp_path)
    metrics = HEADER + JANUARY + FEBRUARY
    january = push(tmp_path, contracts, "2026-01", metrics)
    assert january.returncode == 0, january.stderr
    assert "carried_forward: 0.30 USD" in january.stderr
    assert exported(tmp_path) == {}
    again = push(tmp_path, contracts, "2026-01", metrics)
    assert again.returncode == 0, again.stderr

    computed = run(
        tmp_path,
        "compute",
        "--period",
        "2026-02",
        "--contracts",
        str(contracts),
        "--metrics",
        str(tmp_path / "metrics.csv"),
        "--json",
        metrics=metrics,
    )
    assert computed.returncode == 0, computed.stderr
    [planned] = json.loads(computed.stdout)["invoices"]
    assert planned["total_fee"] == "10.30"

    february = push(tmp_path, contracts, "2026-02", metrics)
    assert february.returncode == 0, february.stderr
    [invoice] = exported(tmp_path).values()
    fees = [(line["kind"], line["fee"], line.get("carried_from")) for line in invoice["lines"]]
    assert fees == [("campaign", "10.00", None), ("carried_forward", "0.30", "2026-01")]
    assert invoice["total_fee"] == "10.30" == planned["total_fee"]

    # Carried once: March (no metrics) carries nothing, February again is delivered before.
    assert push(tmp_path, contracts, "2026-02", metrics).returncode == 0
    assert len(exported(tmp_path)) == 1

    # January changed after its fee was billed in February: refused, nothing sent.
    changed = HEADER + JANUARY.replace("303.00", "320.00") + FEBRUARY
    refused = push(tmp_path, contracts, "2026-01", changed)
    assert refused.returncode == 2
    assert "billed on invoice" in refused.stderr and "carry_forward_below" in refused.stderr
    assert len(exported(tmp_path)) == 1


def test_a_bad_threshold_names_file_row_and_field(tmp_path: Path) -> None:
    contracts = setup(tmp_path, '"0.001"')
    done = push(tmp_path, contracts, "2026-01", HEADER + JANUARY)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "contracts.toml" in line and "row 2" in line and "carry_forward_below" in line
    assert not (tmp_path / "data").exists()
