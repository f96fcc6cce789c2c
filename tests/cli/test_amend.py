"""``kiki-billing push --amend`` as a user runs it, through the file targets.

The file targets carry a correction as a credit-note file beside the superseded revision's
file (a file cannot be voided once imported); the billing systems' voids and credit notes are
tested through each adapter's fake (``tests/adapters/*/test_corrections.py``) and the crash test
(``tests/crash/test_crash_amend.py``).
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

from tests.cli.test_push import METRICS, contracts, push_args, run

CHANGED = METRICS.replace("130090.00", "120090.00")  # fee 2209.00 -> 1209.00
TARGETS = '["json", "xero_csv", "quickbooks_csv"]'
NUMBER = "KIKI-OaaS-202601-"


def exports(tmp_path: Path) -> dict[str, Path]:
    """Every exported file by ``<folder>/<name>``."""
    return {
        f"{p.parent.name}/{p.name}": p for p in (tmp_path / "kiki-out" / "exports").rglob("*.*")
    }


def test_amend_flow_with_file_targets(tmp_path: Path) -> None:
    file = contracts(tmp_path, TARGETS)
    first = run(tmp_path, *push_args(tmp_path, file))
    assert first.returncode == 0, first.stderr
    issued = set(exports(tmp_path))
    assert len(issued) == 3

    # Changed metrics, plain push: refused, nothing written, the way out named.
    plain = run(tmp_path, *push_args(tmp_path, file), metrics=CHANGED)
    assert plain.returncode == 1
    assert "push --amend" in plain.stderr
    assert set(exports(tmp_path)) == issued

    # The dry run shows the difference per line and in total, and the correction per target.
    dry = run(tmp_path, *push_args(tmp_path, file, "--amend", "--dry-run"), metrics=CHANGED)
    assert dry.returncode == 0, dry.stderr
    assert "revision 0 -> 1" in dry.stdout
    assert "2,209.00 -> 1,209.00 USD (-1,000.00)" in dry.stdout
    assert "-1,000.00" in dry.stdout
    assert "correct-r0" in dry.stdout
    assert "json (account" in dry.stdout and "voided if unpaid" in dry.stdout
    assert set(exports(tmp_path)) == issued

    # compute reads the ledger: the changed invoice is the next revision, in every file.
    out = tmp_path / "computed"
    computed = run(
        tmp_path,
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        str(file),
        "--metrics",
        str(tmp_path / "metrics.csv"),
        "--out",
        str(out),
        metrics=CHANGED,
    )
    assert computed.returncode == 0, computed.stderr
    assert "this is revision 1" in computed.stderr and "push --amend" in computed.stderr
    [document] = (out / "invoices").glob("*.json")
    assert document.name.endswith("-R1.json")
    assert json.loads(document.read_text())["revision"] == 1
    assert "-R1," in (out / "xero-invoices.csv").read_text()
    assert set(exports(tmp_path)) == issued

    # Not confirmed (no terminal, no --yes): nothing sent.
    refused = run(tmp_path, *push_args(tmp_path, file, "--amend"), metrics=CHANGED)
    assert refused.returncode == 1
    assert "nothing was sent" in refused.stderr
    assert set(exports(tmp_path)) == issued

    # Confirmed on the prompt.
    done = run(tmp_path, *push_args(tmp_path, file, "--amend"), metrics=CHANGED, stdin="y\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 delivered" in done.stdout
    files = exports(tmp_path)
    number = sorted(issued)[0].split("/")[1].split(".")[0]
    assert number.startswith(NUMBER)
    assert set(files) == issued | {
        f"{folder}/{number}.{name}{suffix}"
        for folder, suffix in (("json", ".json"), ("xero", ".csv"), ("quickbooks", ".csv"))
        for name in ("r1", "r0.credit-note")
    }

    revised = json.loads((tmp_path / "kiki-out/exports/json" / f"{number}.r1.json").read_text())
    assert revised["revision"] == 1 and revised["total_fee"] == "1209.00"
    note = json.loads(
        (tmp_path / "kiki-out/exports/json" / f"{number}.r0.credit-note.json").read_text()
    )
    assert note["credit_note_number"] == f"{number}-CN"
    assert note["credits"]["revision"] == 0
    assert note["replaced_by"]["document_number"] == f"{number}-R1"
    assert note["total"] == "2209.00"
    assert sum(Decimal(line["amount"]) for line in note["lines"]) == Decimal(note["total"])

    xero = list(
        csv.DictReader(
            io.StringIO(
                (tmp_path / "kiki-out/exports/xero").joinpath(f"{number}.r1.csv").read_text()
            )
        )
    )
    assert [row["*InvoiceNumber"] for row in xero] == [f"{number}-R1"]
    xero_note = list(
        csv.DictReader(
            io.StringIO(
                (tmp_path / "kiki-out/exports/xero")
                .joinpath(f"{number}.r0.credit-note.csv")
                .read_text()
            )
        )
    )
    assert [(r["*CreditNoteNumber"], r["*UnitAmount"]) for r in xero_note] == [
        (f"{number}-CN", "2209.00")
    ]
    qbo = list(
        csv.DictReader(
            io.StringIO(
                (tmp_path / "kiki-out/exports/quickbooks").joinpath(f"{number}.r1.csv").read_text()
            )
        )
    )
    assert [row["*InvoiceNo"] for row in qbo] == [number.removeprefix("KIKI-") + "-R1"]
    memo = list(
        csv.DictReader(
            io.StringIO(
                (tmp_path / "kiki-out/exports/quickbooks")
                .joinpath(f"{number}.r0.credit-note.csv")
                .read_text()
            )
        )
    )
    assert [r["*CreditMemoNo"] for r in memo] == [number.removeprefix("KIKI-") + "-C0"]

    # Everything settled: a plain push of the same numbers now finds revision 1 delivered.
    again = run(tmp_path, *push_args(tmp_path, file), metrics=CHANGED)
    assert again.returncode == 0, again.stderr
    assert "delivered before" in again.stdout
    status = run(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert (
        sorted((r["revision"], r["state"]) for r in rows)
        == [(0, "delivered")] * 3 + [(1, "delivered")] * 3
    )
    assert {r["superseded_by"] for r in rows if r["revision"] == 0} == {1}
    show = run(tmp_path, "show", number)
    assert "r0-credit-note" in show.stdout and "correct-r0" in show.stdout

    # Nothing changed any more: --amend says so and sends nothing new.
    nothing = run(tmp_path, *push_args(tmp_path, file, "--amend", "--yes"), metrics=CHANGED)
    assert nothing.returncode == 0, nothing.stderr
    assert "Nothing to amend" in nothing.stdout


def test_yes_without_amend_is_refused(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json"]')
    done = run(tmp_path, *push_args(tmp_path, file, "--yes"))
    assert done.returncode == 2
    assert "--yes" in done.stderr
    assert not (tmp_path / "kiki-out").exists()
