"""Secrets never reach any output, log, ledger row or exception, in any escaped form."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from kiki_billing_adapters.stripe import StripeAdapter
from typer.testing import CliRunner

from kiki_billing.cli import app
from kiki_billing.hub import registry
from kiki_billing.plugin import secret_forms
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

# A key with characters that escape differently in repr, JSON and URLs.
SECRET = "sk_test_Se/cr+et=Key'0123456789abcdef"
FORMS = {
    SECRET,
    repr(SECRET)[1:-1],
    json.dumps(SECRET)[1:-1],
    quote(SECRET, safe=""),
    quote_plus(SECRET),
    quote(SECRET),
}


def test_secret_forms_cover_every_escaping() -> None:
    assert secret_forms(SECRET) >= FORMS


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=3) as server:
        yield server


@pytest.fixture
def month(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeStripe) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KIKI_") and name != "KIKI_ADAPTER_PACKAGES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("KIKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KIKI_STRIPE_API_KEY", SECRET)
    monkeypatch.setenv("KIKI_STRIPE_API_BASE", fake.url)
    monkeypatch.setenv("KIKI_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("KIKI_RETRY_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("KIKI_RETRY_INITIAL_WAIT", "0")
    registry.reset_cache()
    (tmp_path / "metrics.csv").write_text(
        "client_id,campaign_id,spend,ltv,period\n"
        "acme,campaign_001,36000.00,130090.00,2026-01\n"
        "tech,campaign_002,44000.00,164130.00,2026-01\n"
    )
    (tmp_path / "contracts.toml").write_text(
        '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n\n'
        '[[clients]]\nid = "tech"\nname = "Tech"\ntargets = ["stripe"]\n'
    )
    return tmp_path


def everything(root: Path, *texts: str) -> str:
    """All the text a user or an auditor could see: outputs, logs, every ledger cell."""
    parts = list(texts)
    with sqlite3.connect(root / "data" / "ledger.sqlite3") as conn:
        tables = [
            row[0] for row in conn.execute("select name from sqlite_master where type='table'")
        ]
        for table in tables:
            for row in conn.execute(f"select * from {table}"):
                parts.extend(str(cell) for cell in row)
    return "\n".join(parts)


def assert_no_secret(text: str) -> None:
    for form in FORMS:
        assert form not in text, form


def push():
    return CliRunner().invoke(
        app,
        [
            "push",
            "--period",
            "2026-01",
            "--contracts",
            "contracts.toml",
            "--metrics",
            "metrics.csv",
        ],
    )


def test_a_failing_push_shows_no_secret_anywhere(
    month: Path, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider echoes the key in an error; an SDK bug puts it in an exception; a 503 retry
    # logs; a lost connection too.
    fake.inject_invalid_request("POST", "/v1/invoices", message=f"key {SECRET} refused")
    fake.inject_503("POST", "/v1/invoiceitems")

    def boom(self, ctx, request):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"boom {SECRET!r} {quote(SECRET, safe='')} {json.dumps(SECRET)}")

    monkeypatch.setattr(StripeAdapter, "_send_finalize", boom)
    result = push()
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "refused" in result.stderr and "boom" in result.stderr
    text = everything(month, result.stdout, result.stderr)
    assert "step.retry" in text  # the DEBUG logs are in there
    assert_no_secret(text)
    for command in (["status"], ["status", "--json"]):
        shown = CliRunner().invoke(app, command)
        assert_no_secret(shown.stdout + shown.stderr)


def test_retry_takes_the_fixed_contracts_file(month: Path, fake: FakeStripe) -> None:
    contracts = month / "contracts.toml"
    contracts.write_text(
        '[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n'
        '[clients.stripe]\ncustomer = "cus_NoSuchCustomer"\n'
    )
    (month / "metrics.csv").write_text(
        "client_id,campaign_id,spend,ltv,period\nacme,campaign_001,36000.00,130090.00,2026-01\n"
    )
    first = push()
    assert first.exit_code == 1 and "No such customer" in first.stderr
    # The operator fixes the contract (the customer was wrong): retry plans with the fix.
    contracts.write_text('[[clients]]\nid = "acme"\nname = "Acme Corp"\ntargets = ["stripe"]\n')
    retried = CliRunner().invoke(app, ["retry", "--contracts", str(contracts)])
    assert retried.exit_code == 0, retried.stdout + retried.stderr
    assert "1 delivered" in retried.stdout
    (invoice,) = fake.state()["invoices"]
    assert invoice["customer"] != "cus_NoSuchCustomer"
    assert CliRunner().invoke(app, ["status"]).exit_code == 0
