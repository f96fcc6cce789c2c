"""``kiki-billing push`` to QuickBooks as a user runs it: settings from the environment, tokens
kept in the ledger database, and no token or secret in any output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_provider import RateLimits
from tests.support.fake_quickbooks import CLIENT_ID, CLIENT_SECRET, REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

METRICS = "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"
CONTRACTS = textwrap.dedent(
    """\
    [[clients]]
    id = "acme"
    name = "Acme Corp"
    email = "billing@acme.example"
    targets = ["quickbooks"]
    [clients.quickbooks]
    send = true

    [exports.quickbooks]
    item = "Outcome fees"
    """
)


class Issued:
    """Every token the fake hands out, to look for in the outputs."""

    def __init__(self, fake: FakeQuickBooks) -> None:
        self.values: list[str] = []
        for name in ("issue_refresh_token", "issue_access_token"):
            real = getattr(fake.app, name)

            def issue(*args: Any, real: Any = real, **kwargs: Any) -> str:
                value: str = real(*args, **kwargs)
                self.values.append(value)
                return value

            setattr(fake.app, name, issue)


@pytest.fixture
def fake() -> Iterator[FakeQuickBooks]:
    with FakeQuickBooks(seed=21, rate_limits=RateLimits()) as server:
        yield server


def run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "contracts.toml").write_text(CONTRACTS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    base.update({"KIKI_DATA_DIR": str(tmp_path / "data"), "KIKI_LOG_LEVEL": "DEBUG", **env})
    command = [sys.executable, "-c", "from kiki_billing.cli import main; main()", *args]
    return subprocess.run(command, cwd=tmp_path, env=base, capture_output=True, text=True)


def push(
    tmp_path: Path, env: dict[str, str], *extra: str, period: str = "2026-01"
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "metrics.csv").write_text(METRICS.replace("2026-01", period))
    return run(
        tmp_path,
        env,
        "push",
        "--period",
        period,
        "--contracts",
        str(tmp_path / "contracts.toml"),
        "--metrics",
        str(tmp_path / "metrics.csv"),
        *extra,
    )


def settings_env(fake: FakeQuickBooks, refresh_token: str) -> dict[str, str]:
    return {
        "KIKI_QUICKBOOKS_CLIENT_ID": CLIENT_ID,
        "KIKI_QUICKBOOKS_CLIENT_SECRET": CLIENT_SECRET,
        "KIKI_QUICKBOOKS_REFRESH_TOKEN": refresh_token,
        "KIKI_QUICKBOOKS_REALM_ID": REALM,
        "KIKI_QUICKBOOKS_ENVIRONMENT": "sandbox",
        "KIKI_QUICKBOOKS_API_BASE": fake.api_base,
        "KIKI_QUICKBOOKS_TOKEN_URL": fake.token_url,
    }


def test_push_status_and_dry_run_never_show_a_token(fake: FakeQuickBooks, tmp_path: Path) -> None:
    issued = Issued(fake)
    env = settings_env(fake, fake.app.issue_refresh_token())

    preview = push(tmp_path, env, "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert f"/v3/company/{REALM}/query" in preview.stdout
    assert "Outcome fees" in preview.stdout  # the item name from [exports.quickbooks]
    assert fake.requests == []  # a dry run sends nothing, not even a token refresh

    done = push(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 delivered" in done.stdout
    invoices = fake.invoices()
    assert [i["EmailStatus"] for i in invoices] == ["EmailSent"]
    assert [i["Name"] for i in fake.state()["items"]] == ["Outcome fees"]

    again = push(tmp_path, env)
    assert again.returncode == 0 and "delivered before" in again.stdout
    status = run(tmp_path, env, "status", "--period", "2026-01", "--json")
    rows = json.loads(status.stdout)
    assert [(r["target"], r["account"], r["state"]) for r in rows] == [
        ("quickbooks", f"sandbox:{REALM}", "delivered")
    ]
    shown = "".join(p.stdout + p.stderr for p in (preview, done, again, status))
    assert issued.values and env["KIKI_QUICKBOOKS_REFRESH_TOKEN"] in issued.values
    for secret in (*issued.values, CLIENT_SECRET):
        assert secret not in shown
    assert "quickbooks.token_refreshed" in done.stdout + done.stderr
    assert fake.state()["token_grants"] == 1  # the second push used the stored token


def test_the_rotated_token_in_the_ledger_outlives_the_environments(
    fake: FakeQuickBooks, tmp_path: Path
) -> None:
    env = settings_env(fake, fake.app.issue_refresh_token())
    assert push(tmp_path, env).returncode == 0
    fake.app.access_tokens.clear()  # later: the access token is refused, the seed long spent
    done = push(tmp_path, env, period="2026-02")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fake.state()["token_grants"] == 2
    assert len(fake.invoices()) == 2


def test_a_missing_setting_exits_2_naming_it(fake: FakeQuickBooks, tmp_path: Path) -> None:
    env = settings_env(fake, "AB11seed")
    del env["KIKI_QUICKBOOKS_REALM_ID"]
    done = push(tmp_path, env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: adapter 'quickbooks': KIKI_QUICKBOOKS_REALM_ID is not set"
    )
    env = {**settings_env(fake, "AB11seed"), "KIKI_QUICKBOOKS_REALM_ID": "realm-of-acme"}
    done = push(tmp_path, env)
    assert done.returncode == 2 and "KIKI_QUICKBOOKS_REALM_ID is invalid" in done.stderr
    assert "realm-of-acme" not in done.stderr
    assert fake.requests == []
