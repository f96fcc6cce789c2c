"""OAuth with Intuit: refresh before expiry and on 401, rotation stored before use, one refresh
across processes, and the authorization-code flow (``OAuthConnect``)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksAdapter
from kiki_billing_adapters.quickbooks.oauth import (
    ACCESS_TOKEN,
    EXPIRES_AT,
    REFRESH_TOKEN,
    SEED,
)
from quickbooks.exceptions import AuthorizationException

from kiki_billing.errors import ConfigurationError
from kiki_billing.hub.credentials import LedgerCredentialStore
from kiki_billing.hub.ledger import Ledger
from kiki_billing.plugin import MemoryCredentialStore, OAuthConnect
from tests.adapters.quickbooks.conftest import settings_for
from tests.conftest import REPO
from tests.support.fake_quickbooks import (
    CLIENT_ID,
    CLIENT_SECRET,
    REALM,
    TOKEN_PATH,
    FakeQuickBooks,
)

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

Made = Callable[..., QuickBooksAdapter]
REDIRECT = "http://127.0.0.1:8765/callback"


def grants(fake: FakeQuickBooks) -> int:
    count: int = fake.state()["token_grants"]
    return count


def stored_chain(fake: FakeQuickBooks, adapter: QuickBooksAdapter, left: float) -> dict[str, str]:
    """What a previous run stored: a live access token with ``left`` seconds to go."""
    return {
        ACCESS_TOKEN: fake.app.issue_access_token(lifetime=left),
        REFRESH_TOKEN: fake.app.issue_refresh_token(),
        EXPIRES_AT: f"{time.time() + left:.0f}",
        SEED: adapter.settings.seed_fingerprint(),
    }


class RecordingStore(MemoryCredentialStore):
    """A store that notes when new values were kept."""

    def __init__(self, events: list[str], values: Mapping[str, str] | None = None) -> None:
        super().__init__(values)
        self.events = events

    def update(self, change: Any) -> Mapping[str, str]:
        result = super().update(change)
        self.events.append("stored " + result.get(ACCESS_TOKEN, "")[-8:])
        return result


def test_a_token_near_expiry_is_refreshed_first(fake: FakeQuickBooks, make_adapter: Made) -> None:
    adapter = make_adapter()
    adapter.credentials = MemoryCredentialStore(stored_chain(fake, adapter, 3000))
    kept = adapter.credentials.load()[ACCESS_TOKEN]
    assert adapter.tokens.access_token() == kept and grants(fake) == 0
    adapter = make_adapter()
    adapter.credentials = MemoryCredentialStore(stored_chain(fake, adapter, 200))
    fresh = adapter.tokens.access_token()
    assert grants(fake) == 1 and fresh != adapter.tokens.seen() - {fresh}
    assert adapter.credentials.load()[ACCESS_TOKEN] == fresh
    assert float(adapter.credentials.load()[EXPIRES_AT]) > time.time() + 3000


def test_new_tokens_are_stored_before_the_access_token_is_used(
    fake: FakeQuickBooks, make_adapter: Made
) -> None:
    events: list[str] = []
    adapter = make_adapter(credentials=RecordingStore(events))
    real = fake.app.authenticate

    def noting(request: Any) -> str:
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            events.append("used " + header[-8:])
        elif request.path == TOKEN_PATH:
            events.append("token endpoint")
        return real(request)

    fake.app.authenticate = noting  # type: ignore[method-assign]
    adapter._call(lambda qb: qb.query("select * from Item"))
    fake.app.access_tokens.clear()  # refused: refreshed before the next request
    with pytest.raises(Exception, match="Application authentication failed"):
        adapter._call(lambda qb: qb.query("select * from Item"))
    adapter._call(lambda qb: qb.query("select * from Item"))
    first, second = (e.split()[-1] for e in events if e.startswith("stored"))
    assert events == [
        "token endpoint",
        f"stored {first}",
        f"used {first}",
        f"used {first}",
        "token endpoint",
        f"stored {second}",
        f"used {second}",
    ]


def test_threads_needing_a_token_at_once_refresh_once(
    fake: FakeQuickBooks, make_adapter: Made
) -> None:
    fake.inject_delay("POST", TOKEN_PATH, seconds=0.3)
    adapters = [make_adapter() for _ in range(5)]  # one store, five token keepers
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda a=a: tokens.append(a.tokens.access_token()))
        for a in adapters
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert grants(fake) == 1 and len(set(tokens)) == 1


def test_a_new_seed_in_the_environment_starts_a_new_chain(
    fake: FakeQuickBooks, make_adapter: Made
) -> None:
    first = make_adapter()
    first.tokens.access_token()
    chain = first.credentials.load()
    reconnected = fake.app.issue_refresh_token()
    second = QuickBooksAdapter(settings_for(fake, reconnected))
    second.credentials = first.credentials
    second.tokens.access_token()
    now = second.credentials.load()
    assert now[SEED] == second.settings.seed_fingerprint() != chain[SEED]
    assert now[REFRESH_TOKEN] not in (chain[REFRESH_TOKEN], reconnected)
    assert grants(fake) == 2


def test_the_stored_chain_outlives_the_spent_seed(fake: FakeQuickBooks, make_adapter: Made) -> None:
    first = make_adapter()
    first.tokens.access_token()
    hour_later = {**first.credentials.load(), EXPIRES_AT: f"{time.time() - 1:.0f}"}
    first.credentials.update(lambda _current: hour_later)
    later = make_adapter()  # the same, spent seed in the environment; the same store
    later._call(lambda qb: qb.query("select * from Item"))
    assert grants(fake) == 2


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import hashlib, sys
    from kiki_billing.hub.credentials import LedgerCredentialStore
    from kiki_billing.hub.ledger import Ledger
    from kiki_billing.hub.registry import create_adapter

    ledger = Ledger(sys.argv[1])
    adapter = create_adapter(
        "quickbooks", lambda target, account: LedgerCredentialStore(ledger, target, account)
    )
    token = adapter.tokens.access_token()
    adapter._call(lambda qb: qb.query("select * from Item"))
    print(hashlib.sha256(token.encode()).hexdigest()[:16], adapter.tokens.refreshes)
    """
)


def worker_env(fake: FakeQuickBooks, seed: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    env.update(
        {
            "KIKI_QUICKBOOKS_CLIENT_ID": CLIENT_ID,
            "KIKI_QUICKBOOKS_CLIENT_SECRET": CLIENT_SECRET,
            "KIKI_QUICKBOOKS_REFRESH_TOKEN": seed,
            "KIKI_QUICKBOOKS_REALM_ID": REALM,
            "KIKI_QUICKBOOKS_ENVIRONMENT": "sandbox",
            "KIKI_QUICKBOOKS_API_BASE": fake.api_base,
            "KIKI_QUICKBOOKS_TOKEN_URL": fake.token_url,
            "KIKI_LOG_LEVEL": "ERROR",
        }
    )
    return env


def start_worker(fake: FakeQuickBooks, seed: str, ledger_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, ledger_url],
        cwd=REPO,
        env=worker_env(fake, seed),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_line(output: str) -> list[str]:
    """The worker's result: the token's digest and how many refreshes it made."""
    return output.strip().splitlines()[-1].split()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_two_processes_refresh_once_and_the_second_reads_the_new_tokens(
    fake: FakeQuickBooks, tmp_path: Path
) -> None:
    seed = fake.app.issue_refresh_token()
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    Ledger(url).close()  # the schema, before two processes race for it
    fake.inject_delay("POST", TOKEN_PATH, seconds=1.0)
    first = start_worker(fake, seed, url)
    wait_for(lambda: any(r.path == TOKEN_PATH for r in fake.requests))
    second = start_worker(fake, seed, url)  # while the first holds the account's lock
    outputs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    (hash_a, refreshes_a), (hash_b, refreshes_b) = (last_line(out) for out, _ in outputs)
    assert hash_a == hash_b
    assert sorted([refreshes_a, refreshes_b]) == ["0", "1"]
    assert grants(fake) == 1
    assert sum(r.path == TOKEN_PATH for r in fake.requests) == 1


def test_a_process_killed_after_the_refresh_leaves_usable_tokens(
    fake: FakeQuickBooks, tmp_path: Path
) -> None:
    seed = fake.app.issue_refresh_token()
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    Ledger(url).close()
    query = f"/v3/company/{REALM}/query"
    fake.inject_delay("POST", query, seconds=30.0)
    doomed = start_worker(fake, seed, url)
    wait_for(lambda: any(r.path == query for r in fake.requests))  # refreshed, stored, sent
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    fake.clear_faults()
    survivor = start_worker(fake, seed, url)
    out, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, err
    token_hash, refreshes = last_line(out)
    assert refreshes == "0"  # no refresh: the killed process had stored the tokens
    assert grants(fake) == 1
    ledger = Ledger(url)
    stored = LedgerCredentialStore(ledger, "quickbooks", f"sandbox:{REALM}").load()
    assert hashlib.sha256(stored[ACCESS_TOKEN].encode()).hexdigest()[:16] == token_hash
    ledger.close()


def test_a_lost_token_response_is_retried_and_said_plainly_if_the_token_is_spent(
    fake: FakeQuickBooks, make_adapter: Made
) -> None:
    import requests

    fake.inject_drop("POST", TOKEN_PATH)  # before Intuit acted: nothing spent
    adapter = make_adapter()
    with pytest.raises(requests.ConnectionError):
        adapter.tokens.access_token()
    assert adapter.tokens.access_token() and grants(fake) == 1
    # After Intuit rotated, a lost answer strands a strictly rotating refresh token: the error
    # says how to reconnect (Intuit's real tokens change at most daily, which narrows this).
    fake.inject_lost_response("POST", TOKEN_PATH)
    fake.app.access_tokens.clear()
    with pytest.raises(AuthorizationException):  # the 401 marks the token refused
        adapter._call(lambda qb: qb.query("select * from Item"))
    with pytest.raises(requests.ConnectionError):  # the refresh's answer is lost
        adapter._call(lambda qb: qb.query("select * from Item"))
    with pytest.raises(Exception) as spent:
        adapter._call(lambda qb: qb.query("select * from Item"))
    message = str(adapter.classify_error(spent.value))
    assert "invalid_grant" in message and "kiki-billing connect quickbooks" in message


# ------------------------------------------------------------------------------------------
# OAuthConnect
# ------------------------------------------------------------------------------------------


def test_the_adapter_offers_the_consent_flow(make_adapter: Made) -> None:
    adapter = make_adapter()
    assert isinstance(adapter, OAuthConnect)
    url = adapter.authorization_url(REDIRECT, "xyz")
    assert url.startswith("https://appcenter.intuit.com/connect/oauth2?client_id=")
    assert "response_type=code" in url and "scope=com.intuit.quickbooks.accounting" in url


def test_complete_authorization_stores_tokens_a_push_then_uses(fake: FakeQuickBooks) -> None:
    adapter = QuickBooksAdapter(settings_for(fake, None))  # no refresh token in the environment
    code = fake.app.authorization_code(REDIRECT)
    shown = adapter.complete_authorization(
        {"code": code, "state": "xyz", "realmId": REALM}, REDIRECT
    )
    assert shown == f"realm {REALM} (sandbox)"
    stored = adapter.credentials.load()
    assert set(stored) >= {ACCESS_TOKEN, REFRESH_TOKEN, EXPIRES_AT, SEED}
    assert code not in str(stored)
    adapter._call(lambda qb: qb.query("select * from Item"))
    fake.app.access_tokens.clear()
    with pytest.raises(AuthorizationException):
        adapter._call(lambda qb: qb.query("select * from Item"))
    adapter._call(lambda qb: qb.query("select * from Item"))  # refreshed from the stored chain
    assert grants(fake) == 2


@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        ({"error": "access_denied"}, "QuickBooks did not grant access: access_denied"),
        ({"code": "c", "realmId": "123"}, f"realm) 123, but KIKI_QUICKBOOKS_REALM_ID is {REALM}"),
        ({"code": "c", "realmId": "<script>"}, "connected company (realm) another company"),
        ({"realmId": REALM}, "no code"),
        ({"code": "AB11notissued", "realmId": REALM}, "refused the authorization code"),
    ],
)
def test_complete_authorization_refuses_clearly(
    fake: FakeQuickBooks, callback: dict[str, str], expected: str
) -> None:
    adapter = QuickBooksAdapter(settings_for(fake, None))
    with pytest.raises(ConfigurationError) as refused:
        adapter.complete_authorization(callback, REDIRECT)
    assert expected in str(refused.value)
    assert "AB11notissued" not in str(refused.value)
    assert adapter.credentials.load() == {}
