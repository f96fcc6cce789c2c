"""Fixtures of the QuickBooks Online adapter's tests: the local fake and adapters pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksAdapter, QuickBooksSettings

from kiki_billing.plugin import CredentialStore, MemoryCredentialStore
from tests.support.fake_provider import RateLimits
from tests.support.fake_quickbooks import CLIENT_ID, CLIENT_SECRET, REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


def settings_for(
    fake: FakeQuickBooks, refresh_token: str | None, **extra: Any
) -> QuickBooksSettings:
    """Settings that point the adapter at ``fake`` (a sandbox company)."""
    values: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "realm_id": REALM,
        "environment": "sandbox",
        "api_base": fake.api_base,
        "token_url": fake.token_url,
        "refresh_token": refresh_token,
        **extra,
    }
    return QuickBooksSettings(**values)


@pytest.fixture
def fake() -> Iterator[FakeQuickBooks]:
    """The fake without rate limits (tests of the limits configure them)."""
    with FakeQuickBooks(seed=11, rate_limits=RateLimits()) as server:
        yield server


@pytest.fixture
def make_adapter(fake: FakeQuickBooks) -> Callable[..., QuickBooksAdapter]:
    """Adapters on one credential store, seeded with a refresh token the fake issued."""
    seed = fake.app.issue_refresh_token()
    store = MemoryCredentialStore()

    def make(credentials: CredentialStore | None = None, **extra: Any) -> QuickBooksAdapter:
        adapter = QuickBooksAdapter(settings_for(fake, seed, **extra))
        adapter.credentials = credentials or store
        return adapter

    make.seed = seed  # type: ignore[attr-defined]
    make.store = store  # type: ignore[attr-defined]
    return make
