"""The Celery executor's two halves without Celery: ``enqueue`` and the worker's task logic.

The worker runtime runs against a real PostgreSQL ledger and real Redis limits (server tests),
with the in-memory billing system as the provider; the broker is replaced by a list.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kiki_billing.errors import ConfigurationError
from kiki_billing.hub.celery_executor import (
    Watch,
    WorkerRuntime,
    check_distributed,
    enqueue,
    settle,
    task_payload,
)
from kiki_billing.hub.ledger import DeliveryState, Ledger, worker_owner
from kiki_billing.hub.settings import HubSettings
from kiki_billing.hub.shared_limits import RedisLimits
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem
from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401
from tests.support.redis import redis_url  # noqa: F401

from .conftest import deliveries

pytestmark = [pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])]

PG = "postgresql+psycopg://kiki@db/kiki"


def invoice(number: int = 1):
    inv = sample_invoice(lines=2)
    return inv.model_copy(
        update={"number": f"KIKI-OaaS-202601-{number:06d}", "client_id": f"client{number}"}
    ).sealed()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "SQLite cannot be shared"),
        ({"ledger_url": "sqlite:///x.db"}, "SQLite cannot be shared"),
        ({"ledger_url": PG}, "KIKI_BROKER_URL"),
        ({"ledger_url": PG, "broker_url": "amqp://guest@mq//"}, "KIKI_LIMITS_URL"),
        (
            {"ledger_url": PG, "broker_url": "redis://r/0", "celery_visibility_timeout": 300},
            "KIKI_CELERY_VISIBILITY_TIMEOUT",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_distributed(HubSettings(**settings))


def test_a_rabbitmq_broker_keeps_limits_in_redis() -> None:
    checked = check_distributed(
        HubSettings(ledger_url=PG, broker_url="amqp://mq//", limits_url="redis://r/1")
    )
    assert checked.limits_url == "redis://r/1"
    assert check_distributed(HubSettings(ledger_url=PG, broker_url="redis://r/0")).limits_url


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    db = request.getfixturevalue("postgres_db_url")
    redis = str(request.getfixturevalue("redis_url"))
    settings = HubSettings(
        ledger_url=db, broker_url=redis, lease_seconds=5, retry_initial_wait=0.01
    )
    system = MemoryBillingSystem()
    limits = RedisLimits(redis, prefix=f"test-{id(system)}")
    ledger = Ledger(db, lease_seconds=5)

    def runtime(node: str, account: str = "default") -> WorkerRuntime:
        return WorkerRuntime(
            settings,
            worker_owner(node),
            create_adapter=lambda _name, _ledger: MemoryAdapter(system=system, account=account),
            limits=limits,
        )

    yield {"ledger": ledger, "system": system, "runtime": runtime}
    ledger.close()


@pytest.mark.server
def test_a_queued_delivery_is_delivered_once_even_when_its_task_runs_twice(
    world: dict[str, Any],
) -> None:
    ledger, system = world["ledger"], world["system"]
    sent: list[dict[str, Any]] = []
    queued = enqueue(ledger, deliveries(invoice(1), invoice(2)), sent.append)
    assert len(sent) == 2 and settle(ledger, queued) == 2
    assert {r.state for r in ledger.deliveries()} == {DeliveryState.PENDING}
    worker = world["runtime"]("w1@host-a")
    assert [worker.deliver(p).state for p in sent] == ["delivered", "delivered"]
    assert settle(ledger, queued) == 0
    # The broker hands a task over again (visibility timeout): nothing is sent twice.
    again = world["runtime"]("w2@host-b").deliver(sent[0])
    assert again.state == "delivered" and again.note == "delivered before"
    assert len(system.invoices_numbered(invoice(1).number)) == 1
    # A second push queues nothing new.
    assert enqueue(ledger, deliveries(invoice(1), invoice(2)), sent.append)[0].outcome
    assert len(sent) == 2


@pytest.mark.server
def test_a_dead_workers_delivery_is_retried_after_its_lease_then_taken_over(
    world: dict[str, Any],
) -> None:
    ledger = world["ledger"]
    sent: list[dict[str, Any]] = []
    enqueue(ledger, deliveries(invoice(3)), sent.append)
    record = ledger.find_delivery(invoice(3).number, invoice(3).revision, "memory", "default")
    assert record is not None
    # A worker on another host claimed it, then died (no heartbeat): its lease still runs.
    assert ledger.claim(record.id, "w9@host-z:4242:1", [DeliveryState.PENDING], time.time())
    result = world["runtime"]("w1@host-a").deliver(sent[0])
    assert result.state == "in_flight" and result.retry_in is not None
    assert 1.0 <= result.retry_in <= 6.0
    # Its lease runs out (as if 10 s had passed): the redelivered task claims it and delivers it.
    ledger.heartbeat([record.id], "w9@host-z:4242:1", time.time() - 10)
    taken = world["runtime"]("w1@host-a").deliver(sent[0])
    assert taken.state == "delivered"
    assert ledger.get_delivery(record.id).attempts == 2


@pytest.mark.server
def test_a_worker_with_another_account_defers_instead_of_delivering(
    world: dict[str, Any],
) -> None:
    ledger, system = world["ledger"], world["system"]
    sent: list[dict[str, Any]] = []
    queued = enqueue(ledger, deliveries(invoice(4)), sent.append)
    result = world["runtime"]("w1@host-a", account="other").deliver(sent[0])
    assert result.state == "deferred"
    assert "workers need the settings the push used" in (result.note or "")
    assert not system.invoices and settle(ledger, queued) == 0
    # Pushed again: the deferred delivery is queued again as pending.
    again: list[dict[str, Any]] = []
    enqueue(ledger, deliveries(invoice(4)), again.append)
    assert again == [task_payload(deliveries(invoice(4))[0], redrive=False)]
    assert ledger.deliveries()[0].state is DeliveryState.PENDING


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.server
def test_a_push_queues_again_the_tasks_of_deliveries_that_stopped_moving(
    world: dict[str, Any],
) -> None:
    ledger = world["ledger"]
    sent: list[dict[str, Any]] = []
    queued = enqueue(ledger, deliveries(invoice(5), invoice(6), invoice(7)), sent.append)
    sent.clear()  # the broker lost all three
    clock = Clock()
    watch = Watch(ledger, queued, sent.append, resend_after=60, clock=clock)
    assert watch.poll() == 3 and not sent
    clock.now += 59
    assert watch.poll() == 3 and not sent  # not yet: a queue can be slow
    clock.now += 1
    assert watch.poll() == 3
    assert sorted(p["invoice"] for p in sent) == [invoice(n).number for n in (5, 6, 7)]

    # One copy is delivered, one is claimed by a worker whose lease still runs: progress.
    by_number = {p["invoice"]: p for p in sent}
    assert world["runtime"]("w1@host-a").deliver(by_number[invoice(5).number]).state == (
        "delivered"
    )
    held = ledger.find_delivery(invoice(6).number, invoice(6).revision, "memory", "default")
    assert held is not None
    assert ledger.claim(held.id, "w9@host-z:1:1", [DeliveryState.PENDING], time.time())
    sent.clear()
    assert watch.poll() == 2 and not sent
    # Nothing moves for a minute again: only the unheld one is sent again.
    clock.now += 60
    assert watch.poll() == 2
    assert [p["invoice"] for p in sent] == [invoice(7).number]
    # Without progress the next re-send waits twice as long.
    sent.clear()
    clock.now += 119
    assert watch.poll() == 2 and not sent
    clock.now += 1
    watch.poll()
    assert [p["invoice"] for p in sent] == [invoice(7).number]
    # The held one's worker died; its lease runs out: its task is sent again as well.
    ledger.heartbeat([held.id], "w9@host-z:1:1", time.time() - 10)
    sent.clear()
    watch.poll()  # the lease moved: progress
    clock.now += 60
    watch.poll()
    assert sorted(p["invoice"] for p in sent) == [invoice(6).number, invoice(7).number]
    # Whatever the copies, each invoice is delivered once.
    worker = world["runtime"]("w2@host-b")
    for payload in sent + sent:
        worker.deliver(payload)
    assert watch.poll() == 0 and watch.resent == 7
    for n in (5, 6, 7):
        assert len(world["system"].invoices_numbered(invoice(n).number)) == 1
