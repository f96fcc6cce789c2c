"""Xero's OAuth done right: early and 401 refreshes, rotation stored before use, crash safety,
two processes sharing one refresh token, the first connection, and no token anywhere it
should not be.

The credential store is the hub's own (:class:`LedgerCredentialStore` on a SQLite ledger)
wherever a test is about what is stored; the fake's refresh tokens are single-use.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings

from kiki_billing.errors import ConfigurationError
from kiki_billing.hub.credentials import LedgerCredentialStore
from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.plugin import CredentialStore, MemoryCredentialStore, TerminalError
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_xero import DEFAULT_TENANT, PREFIX, FakeXero

from .conftest import MakeAdapter, settings_for, settings_without_seed

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

REPO = Path(__file__).resolve().parents[3]
OTHER_TENANT = "0b9a2c1e-7d3f-4e5a-8b6c-9d0e1f2a3b4c"
CLIENT = XeroClientSettings(tax_type="NONE")


def ledger_store(tmp_path: Path, adapter: XeroAdapter | None = None) -> LedgerCredentialStore:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    return LedgerCredentialStore(ledger, "xero", adapter.account if adapter else DEFAULT_TENANT)


def push(
    adapter: XeroAdapter, tmp_path: Path, invoice: Any = None, name: str = "ledger"
) -> DeliveryOutcome:
    ledger = Ledger(f"sqlite:///{tmp_path / (name + '.sqlite3')}")
    hub = Hub(
        ledger,
        {"xero": adapter},
        RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0),
        sleep=lambda _: None,
    )
    invoice = invoice or sample_invoice()
    [outcome] = hub.push([Delivery(invoice, "xero", CLIENT, adapter.account)])
    return outcome


def refreshes(fake: FakeXero) -> int:
    return fake.app.token_requests.count("refresh_token")


# --------------------------------------------------------------------------------------------
# Refreshing
# --------------------------------------------------------------------------------------------


def test_the_rotated_refresh_token_is_stored_before_the_access_token_is_used(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    store = ledger_store(tmp_path)
    adapter = make_adapter(store=store)
    seed = adapter.settings.refresh_token
    assert seed is not None
    seen: list[Mapping[str, str]] = []
    session = adapter._http()
    request = session.request

    def spying(method: str, url: str, **kwargs: Any) -> Any:
        if PREFIX in url:
            seen.append(dict(store.load()))  # what a process killed now would find
        return request(method, url, **kwargs)

    session.request = spying
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert seen, "no Accounting request was made"
    first = seen[0]
    assert first["refresh_token"] != seed.get_secret_value()
    assert first["refresh_token"] in fake.app.refresh_tokens  # the rotated one, issued
    assert fake.app.refresh_tokens[first["refresh_token"]].spent_at is None
    assert first["seed"] == adapter.settings.seed_fingerprint
    assert seed.get_secret_value() not in json.dumps(dict(store.load()))
    assert refreshes(fake) == 1


def test_access_tokens_are_refreshed_five_minutes_before_they_expire(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    now = [1_000_000.0]
    adapter.tokens.clock = lambda: now[0]
    first = adapter.tokens.access_token()
    now[0] += 1800 - 301
    assert adapter.tokens.access_token() == first
    now[0] += 2  # 299 s left: less than the 5-minute margin
    second = adapter.tokens.access_token()
    assert second != first and refreshes(fake) == 2
    # Another adapter (process) reading the same store uses the fresh token, refreshing nothing.
    other = make_adapter()
    other.tokens.clock = lambda: now[0]
    assert other.tokens.access_token() == second and refreshes(fake) == 2


def test_a_401_is_refreshed_and_retried_once_at_once(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    adapter = make_adapter()
    adapter.tokens.access_token()
    fake.app.revoke_access_tokens()
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    statuses = [(r.method, r.path, r.status) for r in fake.requests if r.path.startswith(PREFIX)]
    assert statuses[:2] == [
        ("GET", f"{PREFIX}/Contacts", 401),
        ("GET", f"{PREFIX}/Contacts", 200),
    ]
    assert refreshes(fake) == 2


def test_a_second_401_in_a_row_is_terminal(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    adapter = make_adapter()
    fake.inject_error("GET", f"{PREFIX}/Contacts", status=401, times=2)
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None and "refused again after a token refresh" in outcome.error
    assert refreshes(fake) == 2  # the first token, then one refresh before the retry


def test_a_new_seed_in_the_environment_starts_a_new_chain(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    store = ledger_store(tmp_path)
    make_adapter(store=store).tokens.access_token()
    stored = store.load()["refresh_token"]
    # The user connected again and set a new first token; the stored access token has expired.
    store.update(lambda current: {**current, "expires_at": "0"})
    new_seed = fake.app.issue_refresh_token()
    adapter = make_adapter(store=store, refresh_token=new_seed)
    adapter.tokens.access_token()
    assert fake.app.refresh_tokens[new_seed].spent_at is not None
    assert fake.app.refresh_tokens[stored].spent_at is None
    # The same seed again afterwards: the stored chain goes on, the seed is not spent twice.
    store.update(lambda current: {**current, "expires_at": "0"})
    make_adapter(store=store, refresh_token=new_seed).tokens.access_token()
    assert refreshes(fake) == 3


def test_without_any_refresh_token_the_delivery_fails_saying_what_to_do(
    fake: FakeXero, tmp_path: Path
) -> None:
    adapter = XeroAdapter(settings_without_seed(fake))
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    assert "run `kiki-billing connect xero`, or set KIKI_XERO_REFRESH_TOKEN" in outcome.error
    assert fake.requests == []


def test_a_spent_refresh_token_fails_with_guidance(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    fake.configure(refresh_grace=0)
    seed = fake.app.issue_refresh_token()
    make_adapter(refresh_token=seed, store=MemoryCredentialStore()).tokens.access_token()
    adapter = make_adapter(refresh_token=seed, store=MemoryCredentialStore())
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None and "invalid_grant" in outcome.error
    assert "kiki-billing connect xero" in outcome.error and seed not in outcome.error


# --------------------------------------------------------------------------------------------
# Crashes and concurrency
# --------------------------------------------------------------------------------------------


class KilledAfterRefresh(Exception):
    """Stands for SIGKILL between the token endpoint's answer and the store's commit."""


class DyingStore:
    """A credential store whose process dies after ``change`` ran but before storing."""

    def __init__(self, inner: CredentialStore) -> None:
        self.inner = inner

    def load(self) -> Mapping[str, str]:
        return self.inner.load()

    def update(
        self, change: Callable[[Mapping[str, str]], Mapping[str, str] | None]
    ) -> Mapping[str, str]:
        def dying(current: Mapping[str, str]) -> Mapping[str, str] | None:
            change(current)  # the token endpoint answered: the old refresh token is spent
            raise KilledAfterRefresh

        return self.inner.update(dying)


def test_a_kill_between_the_refresh_and_the_store_never_strands_the_account(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    store = ledger_store(tmp_path)
    make_adapter(store=store).tokens.access_token()
    spent = store.load()["refresh_token"]
    store.update(lambda current: {**current, "expires_at": "0"})
    with pytest.raises(KilledAfterRefresh):
        make_adapter(store=DyingStore(store)).tokens.access_token()
    assert store.load()["refresh_token"] == spent  # nothing stored: the old token stays
    assert fake.app.refresh_tokens[spent].spent_at is not None
    # The next run uses the stored token again, inside Xero's 30-minute grace period.
    outcome = push(make_adapter(store=store), tmp_path, name="after-kill")
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert store.load()["refresh_token"] != spent


def test_a_kill_right_after_the_store_leaves_the_new_token(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    fake.configure(refresh_grace=0)  # no second chance: only the stored token can work
    store = ledger_store(tmp_path)
    make_adapter(store=store).tokens.access_token()
    rotated = store.load()["refresh_token"]
    store.update(lambda current: {**current, "expires_at": "0"})
    outcome = push(make_adapter(store=store), tmp_path)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert fake.app.refresh_tokens[rotated].spent_at is not None


PROCESS = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    from kiki_billing_adapters.xero import XeroAdapter, XeroSettings
    from kiki_billing.hub.credentials import LedgerCredentialStore
    from kiki_billing.hub.ledger import Ledger
    from kiki_billing.plugin import TransientError

    settings = XeroSettings()
    store = LedgerCredentialStore(Ledger(os.environ["LEDGER"]), "xero", settings.tenant_id)
    adapter = XeroAdapter(settings, credentials=store)
    go = Path(os.environ["GO"])
    while not go.exists():
        time.sleep(0.005)
    for attempt in range(3):  # as the hub does: a transient failure is retried
        try:
            token = adapter.tokens.access_token()
            break
        except TransientError:
            time.sleep(0.2)
    print(json.dumps({"token": hashlib.sha256(token.encode()).hexdigest(),
                      "refreshed": adapter.tokens.refreshes}))
    """
)


def test_two_processes_refreshing_at_once_spend_the_refresh_token_once(
    fake: FakeXero, tmp_path: Path
) -> None:
    fake.configure(refresh_grace=0)  # a second spend of the same token would be refused
    ledger_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    Ledger(ledger_url).close()  # schema made once, before the race
    go = tmp_path / "go"
    env = {
        **os.environ,
        **fake.settings_env(),
        "LEDGER": ledger_url,
        "GO": str(go),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # The seed was turned into one token pair; both processes use it, and the stored refresh
    # token still works (the account is not stranded).
    assert fake.app.grants == ["refresh_token"]
    assert sum(r["refreshed"] for r in results) == 1
    assert results[0]["token"] == results[1]["token"]
    store = LedgerCredentialStore(Ledger(ledger_url), "xero", DEFAULT_TENANT)
    store.update(lambda current: {**current, "expires_at": "0"})
    adapter = XeroAdapter(settings_for(fake, env["KIKI_XERO_REFRESH_TOKEN"]), credentials=store)
    adapter.tokens.access_token()
    assert fake.app.grants == ["refresh_token", "refresh_token"]


def test_the_ledgers_credential_lock_is_held_against_other_processes() -> None:
    import threading

    from kiki_billing.hub.ledger import owner_is_dead, process_owner

    assert not owner_is_dead(f"{process_owner()}:{threading.get_ident()}")


# --------------------------------------------------------------------------------------------
# The first connection
# --------------------------------------------------------------------------------------------

REDIRECT = "http://127.0.0.1:8765/callback"


def test_connect_exchanges_the_code_names_the_tenant_and_stores_the_tokens(
    fake: FakeXero, tmp_path: Path
) -> None:
    adapter = XeroAdapter(settings_without_seed(fake))
    adapter.credentials = ledger_store(tmp_path, adapter)
    code = fake.app.authorize(REDIRECT)
    shown = adapter.complete_authorization({"code": code, "state": "s"}, REDIRECT)
    assert shown == f"tenant Kiki Demo Company (US) ({DEFAULT_TENANT})"
    stored = adapter.credentials.load()
    assert stored["refresh_token"] in fake.app.refresh_tokens and stored["seed"] == ""
    assert [r.path for r in fake.requests] == ["/connect/token", "/connections"]
    # Pushing needs no KIKI_XERO_REFRESH_TOKEN now: the stored one is used.
    outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert fake.app.token_requests == ["authorization_code"]


def test_connect_refuses_a_connection_that_does_not_reach_the_tenant(
    fake: FakeXero, tmp_path: Path
) -> None:
    fake.app.add_organisation(OTHER_TENANT, "Other Ltd")
    adapter = XeroAdapter(settings_without_seed(fake))
    adapter.credentials = MemoryCredentialStore()
    code = fake.app.authorize(REDIRECT, tenants=[OTHER_TENANT])
    with pytest.raises(ConfigurationError) as refused:
        adapter.complete_authorization({"code": code}, REDIRECT)
    assert "does not reach KIKI_XERO_TENANT_ID" in str(refused.value)
    assert f"'Other Ltd' (tenant id {OTHER_TENANT})" in str(refused.value)
    assert adapter.credentials.load() == {}


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        ({"error": "access_denied"}, "did not grant access: access_denied"),
        ({"state": "s"}, "no authorization code"),
        ({"code": "made-up"}, "invalid_grant"),
    ],
)
def test_connect_failures_are_configuration_errors(
    fake: FakeXero, callback: dict[str, str], message: str
) -> None:
    adapter = XeroAdapter(settings_without_seed(fake))
    with pytest.raises(ConfigurationError, match=message):
        adapter.complete_authorization(callback, REDIRECT)


# --------------------------------------------------------------------------------------------
# No token anywhere it should not be
# --------------------------------------------------------------------------------------------


def test_tokens_never_reach_logs_errors_or_the_ledgers_deliveries(
    make_adapter: MakeAdapter, fake: FakeXero, tmp_path: Path
) -> None:
    store = ledger_store(tmp_path)
    adapter = make_adapter(store=store)
    seed = adapter.settings.refresh_token
    assert seed is not None
    adapter.tokens.access_token()
    fake.app.revoke_access_tokens()  # a 401 and a refresh on the way
    fake.inject_error("PUT", f"{PREFIX}/Invoices", status=400, message=f"bad {seed}")
    with structlog.testing.capture_logs() as logs:
        outcome = push(adapter, tmp_path)
    assert outcome.state is DeliveryState.FAILED
    tokens = {seed.get_secret_value(), adapter.settings.client_secret.get_secret_value()}
    tokens |= set(fake.app.refresh_tokens) | set(fake.app.access_tokens)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    rows = [
        (d.last_error, d.refs, [(s.refs, s.last_error) for s in ledger.steps(d.id).values()])
        for d in ledger.deliveries()
    ]
    shown = json.dumps([logs, rows, outcome.error, outcome.refs], default=str)
    for token in tokens:
        assert token not in shown
        assert hashlib.sha256(token.encode()).hexdigest()[:16] not in shown
    assert "bad ***" in (outcome.error or "")  # Xero echoing a secret is scrubbed


def test_a_token_echoed_by_xero_is_scrubbed_from_the_error(make_adapter: MakeAdapter) -> None:
    adapter = make_adapter()
    token = adapter.tokens.access_token()
    error = adapter.classify_error(TerminalError(f"token {token} refused"))
    assert token not in str(error) and "***" in str(error)
