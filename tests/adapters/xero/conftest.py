"""Fixtures of the Xero adapter tests: the local fake and adapters configured against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kiki_billing_adapters.xero import XeroAdapter, XeroSettings

from kiki_billing.plugin import CredentialStore, MemoryCredentialStore
from tests.support.fake_xero import FakeXero, FakeXeroApp


def settings_for(
    fake: FakeXero, refresh_token: str | None = None, **overrides: Any
) -> XeroSettings:
    """Settings pointing at ``fake`` (a new seed refresh token unless one is given)."""
    env = fake.settings_env(refresh_token)
    values: dict[str, Any] = {k.removeprefix("KIKI_XERO_").lower(): v for k, v in env.items()}
    values.update(overrides)
    return XeroSettings(**values)


def settings_without_seed(fake: FakeXero) -> XeroSettings:
    """Settings pointing at ``fake`` with no ``KIKI_XERO_REFRESH_TOKEN`` (connect first)."""
    return settings_for(fake, "unused-seed").model_copy(update={"refresh_token": None})


@pytest.fixture
def fake() -> Iterator[FakeXero]:
    with FakeXero(FakeXeroApp(seed=5)) as server:
        yield server


MakeAdapter = Callable[..., XeroAdapter]


@pytest.fixture
def make_adapter(fake: FakeXero) -> MakeAdapter:
    """``make_adapter(store=None, **settings)``: one seed per test, shared by its adapters."""
    seed = fake.app.issue_refresh_token()
    shared = MemoryCredentialStore()

    def make(store: CredentialStore | None = None, **overrides: Any) -> XeroAdapter:
        settings = settings_for(fake, overrides.pop("refresh_token", seed), **overrides)
        return XeroAdapter(settings, credentials=store or shared)

    return make
