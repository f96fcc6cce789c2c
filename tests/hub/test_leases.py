"""Leases that hold: a live holder keeps its delivery however long a step takes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import MemoryAdapter, MemoryBillingSystem

from .conftest import deliveries

LEASE = 0.5


def slow_system(
    seconds: float, started: threading.Event, operation: str = "create_invoice"
) -> MemoryBillingSystem:
    """A provider whose ``operation`` takes ``seconds`` (a long retry wait, a slow API)."""
    system = MemoryBillingSystem()
    real = system.call

    def call(op, key, write):
        if op == operation:
            started.set()
            time.sleep(seconds)
        return real(op, key, write)

    system.call = call  # type: ignore[method-assign]
    return system


def test_a_slow_live_holder_keeps_its_delivery_past_its_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    slow = threading.Event()
    system = slow_system(6 * LEASE, slow)
    holder = Hub(
        Ledger(url, lease_seconds=LEASE), {"memory": MemoryAdapter(system=system)}, RetryPolicy()
    )
    # The rival is another host: only an expired lease would let it take the delivery over.
    rival = Hub(
        Ledger(url, lease_seconds=LEASE), {"memory": MemoryAdapter(system=system)}, RetryPolicy()
    )
    rival.owner = "another-host:4242:1"
    invoice = sample_invoice()
    results: dict[str, list] = {}
    pushing = threading.Thread(
        target=lambda: results.update(holder=holder.push(deliveries(invoice)))
    )
    pushing.start()
    assert slow.wait(10), "the holder never reached the slow step"
    attempts = []
    while pushing.is_alive():
        # Well past the lease: without heartbeats the rival would take the delivery over.
        (outcome,) = rival.push(deliveries(invoice))
        attempts.append(outcome.state)
        time.sleep(LEASE / 2)
    pushing.join()
    assert len(attempts) >= 4
    assert set(attempts) <= {DeliveryState.IN_FLIGHT, DeliveryState.DELIVERED}
    assert attempts[0] is DeliveryState.IN_FLIGHT
    (done,) = results["holder"]
    assert done.state is DeliveryState.DELIVERED
    assert len(system.invoices_numbered(invoice.number)) == 1
    assert [op for op, _ in system.calls].count("create_invoice") == 1
    assert holder.leases.beats >= 3


def test_a_holder_that_stops_beating_is_taken_over_after_its_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = Ledger(url, lease_seconds=LEASE)
    invoice = sample_invoice()
    record = ledger.ensure_delivery(invoice, "memory", "default", {})
    ledger.record_invoice(invoice)
    # A holder on another host that died without a word: no heartbeats reach the ledger.
    assert ledger.claim(record.id, "gone-host:1:1", [DeliveryState.PENDING], time.time())
    system = MemoryBillingSystem()
    hub = Hub(
        Ledger(url, lease_seconds=LEASE), {"memory": MemoryAdapter(system=system)}, RetryPolicy()
    )
    (early,) = hub.push(deliveries(invoice))
    assert early.state is DeliveryState.IN_FLIGHT
    time.sleep(LEASE * 1.5)
    (late,) = hub.push(deliveries(invoice))
    assert late.state is DeliveryState.DELIVERED
    assert len(system.invoices_numbered(invoice.number)) == 1


def test_an_owner_with_a_thread_suffix_is_alive_while_its_process_runs() -> None:
    from kiki_billing.hub.ledger import owner_is_dead, process_owner

    assert not owner_is_dead(f"{process_owner()}:140234")
    assert not owner_is_dead(process_owner())
