from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem, MemoryClientSettings


class Sleeps(list[float]):
    """A fake clock: records the retry waits the hub asked for instead of sleeping.

    Waits for a rate-limit slot (``pace``) advance the clock too but are not recorded.
    """

    now = 0.0

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        self.now += seconds

    def pace(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield ledger
    ledger.close()


@pytest.fixture
def system() -> MemoryBillingSystem:
    return MemoryBillingSystem()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_hub(ledger: Ledger, system: MemoryBillingSystem, sleeps: Sleeps):
    def make(policy: RetryPolicy | None = None, **kwargs: object) -> Hub:
        return Hub(
            ledger,
            {"memory": MemoryAdapter(system=system)},
            policy or RetryPolicy(max_attempts=4, initial_wait=0.1, max_wait=1.0),
            sleep=sleeps,
            pace=sleeps.pace,
            clock=sleeps.clock,
            **kwargs,  # type: ignore[arg-type]
        )

    return make


def deliveries(*invoices, account: str = "default") -> list[Delivery]:
    return [
        Delivery(invoice=inv, target="memory", client=MemoryClientSettings(), account=account)
        for inv in invoices
    ]
