"""No traceback for any user mistake: every command and setting fed hostile values.

Each case must end with exit code 2 and one ``error:`` line on stderr (naming the file, row,
field or variable), no traceback, nothing sent and nothing written: no output folder, no ledger
rows, no file target written.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiki_billing.cli import app
from kiki_billing.hub import registry

METRICS = "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"
SECRET = "sk_test_" + "HostileSecret0123456789"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("KIKI_") and name != "KIKI_ADAPTER_PACKAGES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("KIKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KIKI_JSON_DIR", str(tmp_path / "out-json"))
    registry.reset_cache()
    (tmp_path / "metrics.csv").write_text(METRICS)
    (tmp_path / "contracts.toml").write_text(
        textwrap.dedent(
            """\
            [[clients]]
            id = "acme"
            name = "Acme Corp"
            targets = ["json"]
            """
        )
    )
    return tmp_path


def run(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(app, args, env=env or {}, catch_exceptions=True)


def assert_clean_error(result, *expected: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"traceback: {result.exception!r}"
    )
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert SECRET not in result.stdout + result.stderr


def assert_nothing_written(root: Path) -> None:
    assert not (root / "kiki-out").exists()
    assert not (root / "out-json").exists()
    ledger = root / "data" / "ledger.sqlite3"
    if ledger.exists():
        import sqlite3

        rows = sqlite3.connect(ledger).execute("select count(*) from deliveries").fetchone()
        assert rows == (0,)


PUSH = ["push", "--period", "2026-01", "--contracts", "contracts.toml", "--metrics", "metrics.csv"]
COMPUTE = [
    "compute",
    "--period",
    "2026-01",
    "--contracts",
    "contracts.toml",
    "--metrics",
    "metrics.csv",
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--period", "2026-13"], "--period"),
        (["--period", "0000-01"], "--period"),
        (["--period", "9999-12"], "--period"),
        (["--period", "2026-1"], "--period"),
        (["--period", "２０２６-０１"], "--period"),
        (["--period", ""], "--period"),
        (["--period", "2099-01"], "has not started"),
        (["--period", "2026-01", "--issue-date", "2026-02-30"], "--issue-date"),
        (["--period", "2026-01", "--issue-date", "0001-01-01"], "--issue-date"),
        (["--period", "2026-01", "--issue-date", "2026-01-15"], "before the end of period"),
        (["--period", "2026-01", "--issue-date", "tomorrow"], "--issue-date"),
    ],
)
@pytest.mark.parametrize("command", ["compute", "push"])
def test_bad_periods_and_dates_are_one_line_errors(
    workspace: Path, command: str, args: list[str], expected: str
) -> None:
    base = [command, "--contracts", "contracts.toml", "--metrics", "metrics.csv"]
    assert_clean_error(run([*base, *args]), expected)
    assert_nothing_written(workspace)


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "1e308", "601"])
def test_bad_timeouts_are_one_line_errors(workspace: Path, timeout: str) -> None:
    args = [
        "compute",
        "--period",
        "2026-01",
        "--contracts",
        "contracts.toml",
        "--prometheus",
        "http://127.0.0.1:1",
        "--prometheus-timeout",
        timeout,
    ]
    result = run(args)
    if result.exit_code == 2 and "Invalid value" in result.stderr:
        return  # typer refused a value that is not a number at all (its own usage error)
    assert_clean_error(result, "--prometheus-timeout")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KIKI_RETRY_MAX_ATTEMPTS", "0"),
        ("KIKI_RETRY_MAX_ATTEMPTS", "-1"),
        ("KIKI_RETRY_MAX_ATTEMPTS", "many"),
        ("KIKI_RETRY_MAX_SECONDS", "0"),
        ("KIKI_RETRY_MAX_SECONDS", "-3"),
        ("KIKI_RETRY_MAX_SECONDS", "nan"),
        ("KIKI_RETRY_MAX_SECONDS", "inf"),
        ("KIKI_RETRY_INITIAL_WAIT", "-1"),
        ("KIKI_RETRY_MAX_RETRY_AFTER", "1e12"),
        ("KIKI_BREAKER_THRESHOLD", "0"),
        ("KIKI_BREAKER_COOLDOWN", "-1"),
        ("KIKI_LEASE_SECONDS", "0"),
        ("KIKI_LEASE_SECONDS", "abc"),
        ("KIKI_SLOT_LEASE", "-1"),
        ("KIKI_CELERY_VISIBILITY_TIMEOUT", "0"),
        ("KIKI_CELERY_RESEND_AFTER", "0"),
        ("KIKI_CELERY_RESEND_AFTER", "soon"),
        ("KIKI_CELERY_RESEND_AFTER", "nan"),
        ("KIKI_LOG_LEVEL", "chatty"),
        ("KIKI_JSON_RATE_LIMIT", "0"),
        ("KIKI_JSON_RATE_LIMIT", "-1"),
        ("KIKI_JSON_RATE_LIMIT", "fast"),
        ("KIKI_JSON_RATE_LIMIT", "10/fortnight"),
        ("KIKI_JSON_RATE_LIMIT", "1e309"),
        ("KIKI_JSON_CONCURRENCY", "0"),
        ("KIKI_JSON_CONCURRENCY", "-2"),
        ("KIKI_JSON_CONCURRENCY", "100000"),
        ("KIKI_LEDGER_URL", "mysql+pymysql://user:pw@127.0.0.1/kiki"),
        ("KIKI_LEDGER_URL", "not a url at all"),
        ("KIKI_LEDGER_URL", "sqlite:////proc/no/such/dir/ledger.db"),
        ("KIKI_DATA_DIR", "/dev/null/kiki"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_variable(
    workspace: Path, variable: str, value: str
) -> None:
    result = run(PUSH, env={variable: value})
    if variable == "KIKI_DATA_DIR" or value.startswith(("mysql", "sqlite")):
        # The ledger's location is named (its password masked): the operator needs to see it.
        assert_clean_error(result, "cannot open the ledger")
        assert "pw" not in result.stderr
    else:
        assert_clean_error(result, variable)
        assert value not in result.stderr or value.isdigit() or value in ("nan", "inf")
    assert_nothing_written(workspace)


def test_a_missing_database_driver_names_the_extra(workspace: Path) -> None:
    result = run(["status"], env={"KIKI_LEDGER_URL": "postgresql+nosuchdriver://u:pw@h/db"})
    assert_clean_error(result, "cannot open the ledger")
    assert "pw" not in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" " + SECRET, "whitespace"),
        (SECRET + "\n", "whitespace"),
        (SECRET[:10] + "\t" + SECRET[10:], "whitespace"),
        ("", "is empty"),
        ("pk_test_0123456789abcdef", "publishable key"),
        ("not-a-key", "not a Stripe secret"),
    ],
)
def test_bad_stripe_keys_are_refused_before_any_request(
    workspace: Path, value: str, expected: str
) -> None:
    (workspace / "contracts.toml").write_text(
        '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n'
    )
    result = run(PUSH, env={"KIKI_STRIPE_API_KEY": value})
    assert_clean_error(result, "KIKI_STRIPE_API_KEY", expected)
    assert_nothing_written(workspace)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("not a url", "not an absolute http(s) URL"),
        ("ftp://api.stripe.com", "not an absolute http(s) URL"),
        ("http://api.stripe.com", "plain http"),
        ("https://user:pw@api.stripe.com", "must not carry credentials"),
        ("https://api.stripe.com/ ", "not an absolute http(s) URL"),
    ],
)
def test_bad_api_bases_are_refused_before_any_request(
    workspace: Path, base: str, expected: str
) -> None:
    (workspace / "contracts.toml").write_text(
        '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n'
    )
    result = run(PUSH, env={"KIKI_STRIPE_API_KEY": SECRET, "KIKI_STRIPE_API_BASE": base})
    assert_clean_error(result, "KIKI_STRIPE_API_BASE", expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--client", "nobody"], "--client"),
        (["--client", "[bold]acme[/bold]"], "--client"),
        (["--target", "nope"], "unknown target"),
        (["--target", ""], "unknown target"),
    ],
)
def test_bad_filters_are_one_line_errors(workspace: Path, args: list[str], expected: str) -> None:
    assert_clean_error(run([*PUSH, *args]), expected)
    assert_nothing_written(workspace)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "--state", "lost"], "--state"),
        (["status", "--period", "20260"], "--period"),
        (["show", "KIKI-OaaS-209901-000001"], "no invoice"),
        (["show", ""], "no invoice"),
        (["retry", "--contracts", "missing.toml"], "missing.toml"),
        (["audit", "verify", "missing.csv"], "missing.csv"),
    ],
)
def test_bad_arguments_of_other_commands_are_one_line_errors(
    workspace: Path, args: list[str], expected: str
) -> None:
    assert_clean_error(run(args), expected)


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (b"", "no [[clients]]"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
        (b"[[clients]]\nid = 'acme'\nname = 'Acme'\ntargets = 'json'\n", "targets"),
        (b"[[clients]]\nid = 'acme'\nname = 'Acme'\ntargets = ['json', 'json']\n", "twice"),
        (b"[[clients]]\nid = 'acme'\nname = 'Acme'\nbaseline_roas = '1e9'\n", "baseline_roas"),
        (b"[[clients]]\nid = 'acme'\nname = 'Acme'\nshare_rate = 'NaN'\n", "share_rate"),
        (b"[[clients]]\nid = 'a' \nname = 'A'\n[clients.json]\ntargets = ['json']\n", "inside"),
        (
            b"[targets.json]\nfolder = 'x'\n"
            b"[[clients]]\nid = 'acme'\nname = 'A'\ntargets = ['json']\n",
            "targets.json.folder",
        ),
    ],
)
def test_bad_contracts_files_are_one_line_errors(
    workspace: Path, contents: bytes, expected: str
) -> None:
    (workspace / "contracts.toml").write_bytes(contents)
    result = run(PUSH)
    assert_clean_error(result, "contracts.toml", expected)
    assert_nothing_written(workspace)


@pytest.mark.parametrize(
    "name", ["[bold red]Acme[/]", "[link=http://x]Acme[/link]", "Acme\x1b[31m"]
)
def test_client_names_that_look_like_markup_are_shown_as_written(
    workspace: Path, name: str
) -> None:
    (workspace / "contracts.toml").write_text(
        f'[[clients]]\nid = "acme"\nname = {json.dumps(name)}\ntargets = ["json"]\n'
    )
    result = run(COMPUTE)
    assert result.exit_code == 0, result.stderr
    if "\x1b" not in name:
        assert name in result.stdout


def test_dry_run_of_an_amount_stripe_refuses_reports_it(workspace: Path) -> None:
    (workspace / "metrics.csv").write_text(
        "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,1.00,9999999999999.00,2026-01\n"
    )
    (workspace / "contracts.toml").write_text(
        '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n'
    )
    result = run([*PUSH, "--dry-run"], env={"KIKI_STRIPE_API_KEY": SECRET})
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 1
    assert "would fail" in result.stdout and "99,999,999" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert_nothing_written(workspace)


def test_a_very_long_file_target_folder_is_stored_whole(workspace: Path) -> None:
    deep = workspace / ("d" * 200) / ("e" * 200)
    result = run(PUSH, env={"KIKI_JSON_DIR": str(deep)})
    assert result.exit_code == 0, result.stderr
    status = run(["status", "--json"])
    (row,) = json.loads(status.stdout)
    assert row["account"] == str(deep.resolve())


@pytest.mark.parametrize(
    ("target", "env"),
    [
        (
            "quickbooks",
            {
                "KIKI_QUICKBOOKS_CLIENT_ID": "client",
                "KIKI_QUICKBOOKS_CLIENT_SECRET": "secret-value",
                "KIKI_QUICKBOOKS_REALM_ID": "1234567890",
            },
        ),
        (
            "xero",
            {
                "KIKI_XERO_CLIENT_ID": "0123456789ABCDEF0123456789ABCDEF",
                "KIKI_XERO_CLIENT_SECRET": "secret-value",
                "KIKI_XERO_TENANT_ID": "6f1c2a9e-4b7d-4c1e-9a3f-2d5e8b0c7a14",
            },
        ),
    ],
)
def test_an_oauth_target_without_any_refresh_token_stops_before_sending(
    workspace: Path, target: str, env: dict[str, str]
) -> None:
    (workspace / "contracts.toml").write_text(
        f'[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["{target}"]\n'
    )
    result = run(PUSH, env=env)
    assert_clean_error(result, f"KIKI_{target.upper()}_REFRESH_TOKEN is not set", "connect")
    assert "secret-value" not in result.stderr
    assert_nothing_written(workspace)
