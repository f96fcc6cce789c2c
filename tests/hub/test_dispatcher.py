"""The hub's guarantees, made exact with the in-memory billing system."""

from __future__ import annotations

import pytest

from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.testing.contract import AdapterContractSuite, sample_invoice
from kiki_billing.testing.memory import Fault, MemoryAdapter, MemoryBillingSystem

from .conftest import deliveries


def invoice(number: int = 1, lines: int = 2):
    inv = sample_invoice(lines=lines)
    return inv.model_copy(
        update={"number": f"KIKI-OaaS-202601-{number:06d}", "client_id": f"client{number}"}
    ).sealed()


def keys_sent(system: MemoryBillingSystem, operation: str) -> list[str | None]:
    return [key for op, key in system.calls if op == operation]


def test_push_runs_every_step_with_derived_keys(make_hub, system, ledger: Ledger) -> None:
    inv = invoice()
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    assert [op for op, _ in system.calls] == [
        "find_customer",
        "create_customer",
        "create_invoice",
        "add_line",
        "add_line",
        "finalize",
    ]
    assert keys_sent(system, "create_invoice") == [
        idempotency_key(inv.number, 0, "memory", "draft")
    ]
    (upstream,) = system.invoices_numbered(inv.number)
    assert upstream["lines"] == {1: 10010, 2: 10020}
    assert upstream["status"] == "open"
    (record,) = ledger.deliveries()
    assert record.state is DeliveryState.DELIVERED
    assert record.refs["invoice_id"] == outcome.refs["invoice_id"]
    assert set(ledger.steps(record.id)) == {"customer", "draft", "line-1", "line-2", "finalize"}


def test_second_push_sends_nothing(make_hub, system) -> None:
    inv = invoice()
    make_hub().push(deliveries(inv))
    calls = len(system.calls)
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    assert outcome.note == "delivered before"
    assert len(system.calls) == calls


def test_transient_503_is_retried_with_the_same_key(make_hub, system, sleeps) -> None:
    system.faults.append(Fault("unavailable", operation="create_invoice"))
    inv = invoice()
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    sent = keys_sent(system, "create_invoice")
    assert len(sent) == 2 and sent[0] == sent[1]
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 1.0
    assert len(system.invoices_numbered(inv.number)) == 1


@pytest.mark.parametrize("kind", ["unavailable", "reset"])
def test_lost_response_after_write_does_not_duplicate(make_hub, system, kind) -> None:
    system.faults.append(Fault(kind, after_write=True, operation="create_invoice"))
    system.faults.append(Fault(kind, after_write=True, operation="add_line"))
    inv = invoice()
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    assert len(system.invoices_numbered(inv.number)) == 1
    assert system.invoices_numbered(inv.number)[0]["lines"] == {1: 10010, 2: 10020}


def test_retry_after_is_honoured_and_pauses_the_account(make_hub, system, sleeps) -> None:
    system.faults.append(Fault("throttled", retry_after=7.0, operation="add_line"))
    hub = make_hub()
    (outcome,) = hub.push(deliveries(invoice()))
    assert outcome.state is DeliveryState.DELIVERED
    assert 7.0 in sleeps
    sent = keys_sent(system, "add_line")
    assert sent[0] == sent[1]


def test_retry_after_longer_than_policy_defers(make_hub, system) -> None:
    system.faults.append(Fault("throttled", retry_after=3600.0, operation="create_invoice"))
    (outcome,) = make_hub(RetryPolicy(max_retry_after=60)).push(deliveries(invoice()))
    assert outcome.state is DeliveryState.DEFERRED
    assert "scripted throttled" in (outcome.error or "")


def test_terminal_error_fails_at_once_and_others_go_on(make_hub, system, ledger) -> None:
    first, second = invoice(1), invoice(2)
    system.faults.append(Fault("invalid", operation="create_invoice"))
    outcomes = make_hub().push(deliveries(first, second))
    states = sorted(o.state.value for o in outcomes)
    assert states == ["delivered", "failed"]
    failed = next(o for o in outcomes if o.state is DeliveryState.FAILED)
    assert failed.error == "draft: scripted invalid (HTTP 400)"
    assert len(keys_sent(system, "create_invoice")) == 2  # one per invoice, no retry


def test_exhausted_transient_is_deferred_then_completed_without_duplicate(make_hub, system) -> None:
    inv = invoice()
    system.faults.extend([Fault("unavailable", after_write=True, operation="finalize")] * 4)
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DEFERRED
    assert len(keys_sent(system, "finalize")) == 4
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    assert len(set(keys_sent(system, "finalize"))) == 1
    assert len(system.invoices_numbered(inv.number)) == 1


def test_unknown_outcome_is_looked_up_before_resending(make_hub, system, ledger) -> None:
    inv = invoice()
    hub = make_hub()
    hub.push(deliveries(inv))
    # A process died after sending the draft step: its outcome is unknown in the ledger.
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE delivery_steps SET state='in_flight', refs='{}' "
            "WHERE step IN ('draft','line-1','line-2','finalize')"
        )
        conn.exec_driver_sql(
            "UPDATE deliveries SET state='in_flight', owner='dead-host:1:1', lease_until=0, "
            "refs='{}'"
        )
    calls_before = len(system.calls)
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.DELIVERED
    new_calls = [op for op, _ in system.calls[calls_before:]]
    assert new_calls[0] == "find_invoice"
    assert "create_invoice" not in new_calls
    assert len(system.invoices_numbered(inv.number)) == 1


def test_live_holder_is_not_disturbed(make_hub, system, ledger) -> None:
    import os
    import time

    inv = invoice()
    hub = make_hub()
    record = ledger.ensure_delivery(inv, "memory", "default", {})
    ledger.record_invoice(inv)
    assert ledger.claim(record.id, hub.owner, [DeliveryState.PENDING], now=time.time())
    other = make_hub()
    other.owner = f"{os.uname().nodename}:{os.getpid()}:other"
    (outcome,) = other.push(deliveries(inv))
    assert outcome.state is DeliveryState.IN_FLIGHT
    assert (outcome.note or "").startswith("being delivered by another process")
    assert system.calls == []


def test_circuit_breaker_defers_a_failing_target(make_hub, system) -> None:
    system.faults.extend([Fault("unavailable")] * 100)
    hub = make_hub(RetryPolicy(max_attempts=2, initial_wait=0), breaker_threshold=2)
    outcomes = hub.push(deliveries(*(invoice(n) for n in range(1, 9))))
    assert all(o.state is DeliveryState.DEFERRED for o in outcomes)
    # Up to four deliveries run at once; once the circuit opens the rest never reach the provider.
    assert sum("circuit open" in (o.error or "") for o in outcomes) >= 3
    assert len({key for _, key in system.calls if key}) <= 5


def test_changed_content_under_the_same_number_is_refused(make_hub, system) -> None:
    inv = invoice()
    make_hub().push(deliveries(inv))
    changed = inv.model_copy(update={"client_name": "Someone Else"}).sealed()
    calls = len(system.calls)
    (outcome,) = make_hub().push(deliveries(changed))
    assert outcome.state is DeliveryState.FAILED
    assert "a correction needs a new revision" in (outcome.error or "")
    assert len(system.calls) == calls


def test_customer_id_is_reused_next_period(make_hub, system) -> None:
    january = invoice(1)
    february = january.model_copy(
        update={"number": "KIKI-OaaS-202602-000001", "period": "2026-02"}
    ).sealed()
    make_hub().push(deliveries(january))
    make_hub().push(deliveries(february))
    assert len(keys_sent(system, "create_customer")) == 1
    customers = {inv["customer"] for inv in system.invoices.values()}
    assert len(customers) == 1


class TestMemoryAdapterContract(AdapterContractSuite):
    registered = False

    @pytest.fixture(autouse=True)
    def _system(self) -> None:
        self.system = MemoryBillingSystem()

    def adapter(self) -> MemoryAdapter:
        return MemoryAdapter(system=self.system)

    def sample_errors(self):
        from kiki_billing.testing.memory import MemoryProviderError

        return {
            "throttled": MemoryProviderError(429, "slow down", 1.0),
            "unavailable": MemoryProviderError(503, "down"),
            "connection": MemoryProviderError(None, "reset"),
            "invalid": MemoryProviderError(400, "bad"),
        }

    def upstream_invoices(self, invoice) -> int:
        return len(self.system.invoices_numbered(invoice.number))

    def upstream_customers(self, invoice) -> int:
        return sum(1 for c in self.system.customers.values() if c["client_id"] == invoice.client_id)

    def inject(self, kind: str, *, after_write: bool) -> None:
        fault = {"unavailable": "unavailable", "connection": "reset"}[kind]
        self.system.faults.append(Fault(fault, after_write=after_write))

    def expire_keys(self) -> None:
        self.system._replies.clear()

    def writes(self) -> int:
        return sum(1 for _, key in self.system.calls if key is not None)


def test_a_second_number_for_the_same_client_and_period_is_refused(make_hub, system) -> None:
    inv = invoice()
    make_hub().push(deliveries(inv))
    renumbered = inv.model_copy(update={"number": "KIKI-OaaS-202601-999999"}).sealed()
    calls = len(system.calls)
    (outcome,) = make_hub().push(deliveries(renumbered))
    assert outcome.state is DeliveryState.FAILED
    assert "would bill the period twice" in (outcome.error or "")
    assert len(system.calls) == calls
