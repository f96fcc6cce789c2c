"""``kiki-billing push`` / ``status`` / ``retry`` / ``adapters`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "kiki_billing" / "data"

METRICS = "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"


def contracts(tmp_path: Path, targets: str, extra: str = "") -> Path:
    path = tmp_path / "contracts.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [[clients]]
            id = "acme"
            name = "Acme Corp"
            targets = {targets}
            """
        )
        + extra
    )
    return path


def run(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    code: str | None = None,
    metrics: str = METRICS,
    stdin: str | None = None,
):
    (tmp_path / "metrics.csv").write_text(metrics)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")} | {
        "KIKI_DATA_DIR": str(tmp_path / "data"),
        "KIKI_LOG_LEVEL": "ERROR",
        "KIKI_ADAPTER_PACKAGES": "kiki-billing",
    }
    base.update(env or {})
    command = [sys.executable, "-c", code or "from kiki_billing.cli import main; main()", *args]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=base,
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def push_args(tmp_path: Path, contracts_file: Path, *extra: str) -> list[str]:
    return [
        "push",
        "--period",
        "2026-01",
        "--contracts",
        str(contracts_file),
        "--metrics",
        str(tmp_path / "metrics.csv"),
        *extra,
    ]


def assert_one_line_error(done, expected: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_push_to_file_targets_then_status_then_nothing_twice(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json", "xero_csv"]')
    done = run(tmp_path, *push_args(tmp_path, file))
    assert done.returncode == 0, done.stderr
    assert "2 delivered" in done.stdout
    written = sorted(p.name for p in (tmp_path / "kiki-out" / "exports").rglob("*.*"))
    assert len(written) == 2
    again = run(tmp_path, *push_args(tmp_path, file))
    assert again.returncode == 0 and "delivered before" in again.stdout
    status = run(tmp_path, "status", "--period", "2026-01", "--json")
    rows = json.loads(status.stdout)
    assert {(r["target"], r["state"], r["attempts"]) for r in rows} == {
        ("json", "delivered", 1),
        ("xero_csv", "delivered", 1),
    }


def test_dry_run_sends_and_records_nothing(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json"]')
    done = run(tmp_path, *push_args(tmp_path, file, "--dry-run"))
    assert done.returncode == 0, done.stderr
    assert (
        "json (account " in done.stdout
        and "): 1 invoices" in done.stdout
        and "WRITE" in done.stdout
        and "new: would send" in done.stdout
    )
    assert not (tmp_path / "kiki-out").exists()
    status = run(tmp_path, "status", "--json")
    assert json.loads(status.stdout) == []


def test_unknown_target_is_a_configuration_error(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["strpe"]')
    assert_one_line_error(run(tmp_path, *push_args(tmp_path, file)), "unknown target 'strpe'")


def test_unknown_target_option(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json"]')
    assert_one_line_error(
        run(tmp_path, *push_args(tmp_path, file, "--target", "nope")), "unknown target 'nope'"
    )


def test_missing_credentials_name_the_variable_and_send_nothing(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json", "stripe"]')
    done = run(tmp_path, *push_args(tmp_path, file))
    assert_one_line_error(done, "adapter 'stripe': KIKI_STRIPE_API_KEY is not set")
    assert not (tmp_path / "kiki-out").exists()  # not even the json target ran


def test_missing_sdk_names_the_extra_to_install(tmp_path: Path) -> None:
    hide_stripe = (
        "import importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda n, p=None: None if n.split('.')[0] == 'stripe' else real(n, p); "
        "from kiki_billing.cli import main; main()"
    )
    file = contracts(tmp_path, '["stripe"]')
    done = run(
        tmp_path,
        *push_args(tmp_path, file),
        env={"KIKI_STRIPE_API_KEY": "sk_test_x"},
        code=hide_stripe,
    )
    assert_one_line_error(done, "pip install 'kiki-billing[stripe]'")
    listing = run(tmp_path, "adapters", code=hide_stripe)
    assert listing.returncode == 0
    assert "missing" in listing.stdout


def test_malformed_client_setting_names_file_and_field(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["stripe"]', '[clients.stripe]\ncollection = "weekly"\n')
    done = run(tmp_path, *push_args(tmp_path, file), env={"KIKI_STRIPE_API_KEY": "sk_test_x"})
    assert_one_line_error(done, "field 'clients.stripe.collection'")
    assert "contracts.toml" in done.stderr


def test_settings_for_an_unknown_target_are_refused(tmp_path: Path) -> None:
    file = contracts(tmp_path, '["json"]', '[clients.stirpe]\ncollection = "now"\n')
    assert_one_line_error(
        run(tmp_path, *push_args(tmp_path, file)), "'stirpe' is not in its targets"
    )
    file = contracts(tmp_path, '["json", "stirpe"]', '[clients.stirpe]\ncollection = "now"\n')
    assert_one_line_error(run(tmp_path, *push_args(tmp_path, file)), "unknown target 'stirpe'")


def test_secret_never_reaches_output(tmp_path: Path) -> None:
    secret = "sk_test_" + "S3cr3t" * 5
    file = contracts(tmp_path, '["stripe"]', '[clients.stripe]\ncollection = "weekly"\n')
    done = run(
        tmp_path,
        *push_args(tmp_path, file),
        env={"KIKI_STRIPE_API_KEY": secret, "KIKI_LOG_LEVEL": "DEBUG"},
    )
    assert secret not in done.stdout + done.stderr


THIRD_PARTY = '''
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic_settings import SettingsConfigDict

from kiki_billing.plugin import (
    AdapterSettings,
    BillingAdapter,
    NoClientSettings,
    Step,
    StepRequest,
    TerminalError,
)


class AcmeLedgerSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="KIKI_ACME_LEDGER_", extra="ignore", frozen=True)
    path: Path


class AcmeLedgerAdapter(BillingAdapter[AcmeLedgerSettings, NoClientSettings]):
    """Appends invoices to a text ledger (a third-party adapter)."""

    name = "acme_ledger"

    def steps(self, invoice, client) -> Sequence[Step]:
        line = f"{invoice.number} {invoice.client_id} {invoice.total_fee} {invoice.currency}"

        def request(ctx) -> StepRequest:
            return StepRequest("APPEND", str(self.settings.path), {"line": line})

        def send(ctx, request) -> Mapping[str, str]:
            with open(request.path, "a") as handle:
                handle.write(f"{request.payload['line']} {ctx.idempotency_key}\\n")
            return {"line": line}

        def lookup(ctx) -> Mapping[str, str] | None:
            path = Path(self.settings.path)
            held = path.read_text().splitlines() if path.exists() else []
            return {"line": line} if any(h.startswith(line + " ") for h in held) else None

        return [Step("post", request=request, send=send, lookup=lookup)]

    def classify(self, error):
        return TerminalError(str(error))
'''


def test_a_third_party_adapter_registers_through_entry_points(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "kiki_acme_adapter-1.0.dist-info").mkdir(parents=True)
    (site / "kiki_acme_adapter.py").write_text(THIRD_PARTY)
    (site / "kiki_acme_adapter-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kiki-acme-adapter\nVersion: 1.0\n"
    )
    (site / "kiki_acme_adapter-1.0.dist-info" / "entry_points.txt").write_text(
        "[kiki_billing.adapters]\nacme_ledger = kiki_acme_adapter:AcmeLedgerAdapter\n"
    )
    env = {
        "PYTHONPATH": str(site),
        "KIKI_ACME_LEDGER_PATH": str(tmp_path / "acme.txt"),
        "KIKI_ADAPTER_PACKAGES": "kiki-billing,kiki-acme-adapter",
    }
    listing = run(tmp_path, "adapters", env=env)
    assert "acme_ledger" in listing.stdout and "kiki-acme-adapter" in listing.stdout
    file = contracts(tmp_path, '["acme_ledger"]')
    done = run(tmp_path, *push_args(tmp_path, file), env=env)
    assert done.returncode == 0, done.stderr
    (entry,) = (tmp_path / "acme.txt").read_text().splitlines()
    assert entry.startswith("KIKI-OaaS-202601-") and " acme 2209.00 USD k1-" in entry
    run(tmp_path, *push_args(tmp_path, file), env=env)
    assert len((tmp_path / "acme.txt").read_text().splitlines()) == 1


@pytest.mark.parametrize("command", ["status", "retry"])
def test_bad_ledger_url_is_a_clear_error(tmp_path: Path, command: str) -> None:
    file = contracts(tmp_path, '["json"]')
    done = run(
        tmp_path,
        command,
        env={
            "KIKI_LEDGER_URL": "postgresql+psycopg://u:pw@127.0.0.1:1/x",
            "KIKI_CONTRACTS": str(file),
        },
    )
    assert_one_line_error(done, "cannot open the ledger postgresql+psycopg://u:***@127.0.0.1:1/x")


def test_file_targets_take_export_defaults_and_client_overrides(tmp_path: Path) -> None:
    file = contracts(
        tmp_path,
        '["xero_csv"]',
        '[clients.xero_csv]\naccount_code = "400"\n\n[exports.xero]\ndate_format = "MM/DD/YYYY"\n',
    )
    done = run(tmp_path, *push_args(tmp_path, file))
    assert done.returncode == 0, done.stderr
    (csv_file,) = (tmp_path / "kiki-out" / "exports" / "xero").glob("*.csv")
    row = csv_file.read_text().splitlines()[1].split(",")
    assert row[12] == "02/01/2026"  # *InvoiceDate, US order from [exports.xero]
    assert row[19] == "400"  # *AccountCode from [clients.xero_csv]
