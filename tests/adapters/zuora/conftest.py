"""Fixtures of the Zuora adapter tests: the SOAP fake, settings aimed at it, a hub on a ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.zuora import ZuoraAdapter, ZuoraClientSettings, ZuoraSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_zuora import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
    FakeZuora,
)
from tests.support.zuora_wsdl import WSDL_78


@pytest.fixture
def fake() -> Iterator[FakeZuora]:
    with FakeZuora(seed=7, wsdl=WSDL_78) as server:
        yield server
    assert server.app.rejected == [], "the fake refused an envelope the WSDL does not allow"


def zuora_settings(fake: FakeZuora, **overrides: Any) -> ZuoraSettings:
    values: dict[str, Any] = {
        "username": DEFAULT_USERNAME,
        "password": DEFAULT_PASSWORD,
        "api_base": fake.endpoint,
        "wsdl": str(fake.app.schema.path),
    }
    values.update(overrides)
    return ZuoraSettings(**values)


def client_settings(**overrides: Any) -> ZuoraClientSettings:
    values: dict[str, Any] = {
        "product_rate_plan_id": ONE_TIME_RATE_PLAN,
        "product_rate_plan_charge_id": ONE_TIME_CHARGE,
    }
    values.update(overrides)
    return ZuoraClientSettings(**values)


def invoice(
    number: int = 1,
    *,
    lines: int = 2,
    currency: str = "USD",
    client: str = "",
    period: str = "2026-01",
) -> Invoice:
    """A sample invoice with its own number and client (for ``period``, a later month)."""
    made = sample_invoice(currency, lines, client_id=client or f"client{number}", number=number)
    if period != made.period:
        compact = period.replace("-", "")
        made = made.model_copy(
            update={"period": period, "number": f"KIKI-OaaS-{compact}-{number:06d}"}
        )
    return made.sealed()


class Pusher:
    """Pushes deliveries through a real Hub on a ledger in ``tmp_path``; nothing sleeps."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.waits: list[float] = []
        self.ledgers: dict[str, Ledger] = {}

    def ledger(self, name: str = "ledger") -> Ledger:
        if name not in self.ledgers:
            self.ledgers[name] = Ledger(f"sqlite:///{self.tmp_path / (name + '.sqlite3')}")
        return self.ledgers[name]

    def hub(self, adapters: dict[str, Any], *, ledger: str = "ledger", attempts: int = 4) -> Hub:
        policy = RetryPolicy(max_attempts=attempts, initial_wait=0.0, max_wait=0.0)
        return Hub(self.ledger(ledger), adapters, policy, sleep=self.waits.append)

    def push(
        self,
        adapter: ZuoraAdapter,
        *invoices: Invoice,
        client: ZuoraClientSettings | None = None,
        ledger: str = "ledger",
        attempts: int = 4,
        redrive: bool = False,
    ) -> list[DeliveryOutcome]:
        settings = client or client_settings()
        hub = self.hub({"zuora": adapter}, ledger=ledger, attempts=attempts)
        deliveries = [Delivery(inv, "zuora", settings, adapter.account) for inv in invoices]
        return hub.push(deliveries, redrive_failed=redrive)

    def close(self) -> None:
        for ledger in self.ledgers.values():
            ledger.close()


@pytest.fixture
def pusher(tmp_path: Path) -> Iterator[Pusher]:
    made = Pusher(tmp_path)
    yield made
    made.close()


MakeAdapter = Callable[..., ZuoraAdapter]


@pytest.fixture
def make_adapter(fake: FakeZuora) -> Iterator[MakeAdapter]:
    made: list[ZuoraAdapter] = []

    def make(**overrides: Any) -> ZuoraAdapter:
        clock = overrides.pop("clock", None)
        kwargs = {"clock": clock} if clock is not None else {}
        adapter = ZuoraAdapter(zuora_settings(fake, **overrides), **kwargs)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()
