"""``kiki-billing adapters``, ``push`` (and ``--dry-run``), ``status`` and ``retry`` with Zuora.

The CLI runs as a user runs it (a subprocess with ``KIKI_ZUORA_*`` in its environment) against
the SOAP fake, which serves on 127.0.0.1 in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_zuora import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
    FakeZuora,
)

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

METRICS = "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"
UNKNOWN_CHARGE = "2c92c0f8000000000000000000000bad"


@pytest.fixture
def fake() -> Iterator[FakeZuora]:
    with FakeZuora(seed=11) as server:
        yield server
    assert server.app.rejected == []


def contracts(tmp_path: Path, *, charge: str = ONE_TIME_CHARGE, targets: str = '["zuora"]') -> Path:
    path = tmp_path / "contracts.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [targets.zuora]
            product_rate_plan_id = "{ONE_TIME_RATE_PLAN}"
            product_rate_plan_charge_id = "{charge}"

            [[clients]]
            id = "acme"
            name = "Acme Corp"
            email = "billing@acme.example"
            targets = {targets}
            [clients.zuora]
            account_number = "ACME-001"
            """
        )
    )
    return path


def run(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "metrics.csv").write_text(METRICS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")} | {
        "KIKI_DATA_DIR": str(tmp_path / "data"),
        "KIKI_LOG_LEVEL": "ERROR",
        "COLUMNS": "400",
    }
    command = [sys.executable, "-c", "from kiki_billing.cli import main; main()", *args]
    return subprocess.run(
        command, cwd=tmp_path, env=base | env, capture_output=True, text=True, check=False
    )


def push(tmp_path: Path, file: Path, *extra: str, env: dict[str, str]) -> Any:
    return run(
        tmp_path,
        "push",
        "--period",
        "2026-01",
        "--contracts",
        str(file),
        "--metrics",
        str(tmp_path / "metrics.csv"),
        *extra,
        env=env,
    )


def zuora_env(fake: FakeZuora, **overrides: str) -> dict[str, str]:
    return {
        "KIKI_ZUORA_USERNAME": DEFAULT_USERNAME,
        "KIKI_ZUORA_PASSWORD": DEFAULT_PASSWORD,
        "KIKI_ZUORA_API_BASE": fake.endpoint,
        **overrides,
    }


def test_adapters_lists_zuora_with_its_extra(tmp_path: Path) -> None:
    done = run(tmp_path, "adapters", env={})
    assert done.returncode == 0, done.stderr
    assert "(kiki_billing_adapters.zuora:ZuoraAdapter)" in done.stdout
    [row] = [line for line in done.stdout.splitlines() if line.startswith("│ zuora ")]
    assert "present" in row and "Zuora Billing" in row


def test_dry_run_shows_each_envelope_with_the_session_masked_and_sends_nothing(
    fake: FakeZuora, tmp_path: Path
) -> None:
    done = push(tmp_path, contracts(tmp_path), "--dry-run", env=zuora_env(fake))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in ("account", "contact", "activate", "subscribe", "verify"):
        assert f"  {step}: " in out, step
    assert "POST /apps/services/a/78.0" in out
    assert "<ns0:session>***</ns0:session>" in out
    assert "ACME-001" in out and ">{account_id}<" in out
    assert DEFAULT_PASSWORD not in out + done.stderr
    assert DEFAULT_USERNAME not in out + done.stderr
    assert fake.requests == []  # not even a login


def test_push_then_status_then_nothing_twice(fake: FakeZuora, tmp_path: Path) -> None:
    file, env = contracts(tmp_path), zuora_env(fake)
    done = push(tmp_path, file, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 delivered" in done.stdout
    state = fake.state()
    [account] = state["accounts"]
    [invoice] = state["invoices"]
    assert account["AccountNumber"] == "ACME-001"
    assert Decimal(invoice["Amount"]) == Decimal("2209.00")
    status = run(tmp_path, "status", "--period", "2026-01", "--json", env=env)
    [row] = json.loads(status.stdout)
    assert (row["target"], row["state"]) == ("zuora", "delivered")
    assert row["refs"]["invoice_number"] == invoice["InvoiceNumber"]
    assert row["refs"]["invoice_id"] == invoice["Id"]
    again = push(tmp_path, file, env=env)
    assert again.returncode == 0 and "delivered before" in again.stdout
    assert len(fake.state()["invoices"]) == 1


def test_an_unknown_charge_fails_with_zuoras_reason_then_retry_delivers(
    fake: FakeZuora, tmp_path: Path
) -> None:
    env = zuora_env(fake)
    done = push(tmp_path, contracts(tmp_path, charge=UNKNOWN_CHARGE), "--quiet", env=env)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    expected = (
        "zuora: failed: subscribe: Zuora subscribe: The product rate plan charge "
        f"{UNKNOWN_CHARGE} is not a charge of the product rate plan {ONE_TIME_RATE_PLAN}."
    )
    assert line.startswith("KIKI-OaaS-202601-") and expected in line
    assert "Traceback" not in done.stderr
    assert fake.state()["subscriptions"] == []
    contracts(tmp_path)  # the operator fixes the charge id
    retried = run(tmp_path, "retry", "--contracts", str(tmp_path / "contracts.toml"), env=env)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "1 delivered" in retried.stdout
    state = fake.state()
    assert len(state["accounts"]) == len(state["invoices"]) == 1


def test_a_wsdl_that_does_not_exist_is_a_one_line_configuration_error(
    fake: FakeZuora, tmp_path: Path
) -> None:
    missing = tmp_path / "tenant.wsdl"
    env = zuora_env(fake, KIKI_ZUORA_WSDL=str(missing))
    done = push(tmp_path, contracts(tmp_path, targets='["zuora", "json"]'), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line == f"error: KIKI_ZUORA_WSDL: {missing} cannot be read (No such file or directory)"
    assert not (tmp_path / "kiki-out").exists()  # nothing pushed anywhere
    assert fake.requests == []
    missing.write_text("<definitions>not a wsdl")
    done = push(tmp_path, contracts(tmp_path), env=env)
    assert done.returncode == 2 and "is not a WSDL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_catalogue_ids_name_the_field(fake: FakeZuora, tmp_path: Path) -> None:
    file = tmp_path / "contracts.toml"
    file.write_text('[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["zuora"]\n')
    done = push(tmp_path, file, env=zuora_env(fake))
    assert done.returncode == 2
    assert "clients.zuora.product_rate_plan_id" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_wrong_credentials_fail_that_delivery_and_other_targets_go_on(
    fake: FakeZuora, tmp_path: Path
) -> None:
    env = zuora_env(fake, KIKI_ZUORA_PASSWORD="not-the-password")
    done = push(tmp_path, contracts(tmp_path, targets='["zuora", "json"]'), "--quiet", env=env)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert (
        "zuora: failed: account: Zuora refused the login of KIKI_ZUORA_USERNAME: Invalid login. "
        "User name and password do not match. (HTTP 500, code INVALID_VALUE, request "
    ) in line
    assert "not-the-password" not in done.stdout + done.stderr
    assert "1 delivered" in done.stdout and "1 failed" in done.stdout
    assert list((tmp_path / "kiki-out" / "exports" / "json").glob("*.json"))
    assert fake.state()["accounts"] == []
