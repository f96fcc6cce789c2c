"""``kiki-billing connect``: the first OAuth authorization, as a user runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from kiki_billing.hub.ledger import Ledger
from tests.support.fake_xero import DEFAULT_TENANT, FakeXero, FakeXeroApp

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


@pytest.fixture
def fake() -> Iterator[FakeXero]:
    with FakeXero(FakeXeroApp(seed=9)) as server:
        yield server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_connect(fake: FakeXero, tmp_path: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    env |= fake.settings_env()
    del env["KIKI_XERO_REFRESH_TOKEN"]  # the first connection: no token yet
    env |= {"KIKI_DATA_DIR": str(tmp_path / "data"), "KIKI_ADAPTER_PACKAGES": "kiki-billing"}
    command = [sys.executable, "-m", "kiki_billing", "connect", "xero", "--no-browser"]
    return subprocess.Popen(
        [*command, "--port", str(port), "--timeout", "60"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def consent_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line.startswith("https://login.xero.com/identity/connect/authorize?"), line
    return line


def test_connect_stores_the_first_tokens_in_the_ledger(fake: FakeXero, tmp_path: Path) -> None:
    port = free_port()
    process = start_connect(fake, tmp_path, port)
    query = parse_qs(urlsplit(consent_url(process)).query)
    redirect = query["redirect_uri"][0]
    assert redirect == f"http://127.0.0.1:{port}/callback"
    # The user consents; Xero sends the browser back with a code and the state.
    code = fake.app.authorize(redirect)
    answer = requests.get(redirect, params={"code": code, "state": query["state"][0]}, timeout=10)
    assert answer.status_code == 200 and "received the authorization" in answer.text
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"Connected xero: tenant Kiki Demo Company (US) ({DEFAULT_TENANT})" in out
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite3'}")
    stored = ledger.load_credentials("xero", DEFAULT_TENANT)
    assert stored["refresh_token"] in fake.app.refresh_tokens
    assert stored["refresh_token"] not in out + err and code not in out + err
    ledger.close()


def test_a_redirect_with_another_state_stores_nothing(fake: FakeXero, tmp_path: Path) -> None:
    port = free_port()
    process = start_connect(fake, tmp_path, port)
    query = parse_qs(urlsplit(consent_url(process)).query)
    code = fake.app.authorize(query["redirect_uri"][0])
    requests.get(query["redirect_uri"][0], params={"code": code, "state": "forged"}, timeout=10)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: the redirect's state does not match")
    assert "Traceback" not in err
    assert fake.app.token_requests == []


def test_connect_refuses_an_adapter_without_oauth(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    env |= {"KIKI_STRIPE_API_KEY": "sk_test_" + "x" * 24, "KIKI_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "kiki_billing", "connect", "stripe", "--no-browser"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: adapter 'stripe' does not use OAuth: set its credentials in the environment"
    )
