"""Pushing a plan: every target account in parallel, each within its own limits.

The :class:`Hub` runs each delivery of a :class:`~kiki_billing.hub.plan.Plan` through a
:class:`~kiki_billing.hub.runner.DeliveryRunner`, with as many workers per provider account as
the account may have requests in flight, and keeps the ledger leases of the deliveries it holds
alive from a heartbeat thread, so a step that waits out long retries is never taken over by
another process while this one lives.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kiki_billing.hub.health import HealthRecorder
from kiki_billing.hub.ledger import Ledger, process_owner
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import (
    AccountMachinery,
    DeliveryOutcome,
    DeliveryRunner,
    Preview,
)
from kiki_billing.plugin import BillingAdapter


class LeaseKeeper:
    """Extends the leases of the deliveries this process holds, from a daemon thread.

    It beats every quarter lease while anything is held; when this process dies the beats stop
    and the leases run out, so another host can take the deliveries over.
    """

    def __init__(self, ledger: Ledger, owner: str) -> None:
        self.ledger = ledger
        self.owner = owner
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def hold(self, delivery_id: int) -> Callable[[], None]:
        """Keep ``delivery_id``'s lease alive until the returned release is called."""
        with self._lock:
            self._held.add(delivery_id)
            if self._thread is None or not self._thread.is_alive():
                self._wake.clear()
                self._thread = threading.Thread(
                    target=self._beat, name="kiki-lease-keeper", daemon=True
                )
                self._thread.start()

        def release() -> None:
            with self._lock:
                self._held.discard(delivery_id)

        return release

    def _beat(self) -> None:
        period = max(0.05, self.ledger.lease_seconds / 4)
        while not self._wake.wait(period):
            with self._lock:
                held = list(self._held)
            if held:
                try:
                    self.ledger.heartbeat(held, self.owner, time.time())
                    self.beats += 1
                except Exception:  # noqa: S112 - a missed beat is retried next period
                    continue

    def stop(self) -> None:
        """Stop beating (after a push)."""
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Hub:
    """Delivers invoices through adapters with keys, retries, rate limits and the ledger.

    Args:
        ledger: The delivery ledger.
        adapters: Configured adapters by target name.
        policy: The retry policy.
        breaker_threshold: Consecutive failures that open a target account's circuit.
        breaker_cooldown: Seconds before a trial delivery is let through again.
        on_outcome: Called (from worker threads) after each delivery, for progress bars.
        sleep: Waits before a retry (injected in tests).
        pace: Waits for a rate-limit slot (default: ``sleep``).
        clock: Monotonic seconds for the limiters and breakers (injected in tests).
    """

    def __init__(
        self,
        ledger: Ledger,
        adapters: Mapping[str, BillingAdapter[Any, Any]],
        policy: RetryPolicy,
        *,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 60.0,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        pace: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.adapters = dict(adapters)
        self.policy = policy
        self.on_outcome = on_outcome
        owner = process_owner()
        self.machinery = AccountMachinery(
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            max_wait=policy.max_retry_after,
            sleep=pace or sleep,
            clock=clock,
        )
        self.leases = LeaseKeeper(ledger, owner)
        self.runner = DeliveryRunner(ledger, policy, self.machinery, owner, self.leases.hold, sleep)
        self.health = HealthRecorder(ledger, self.machinery, clock=clock)

    @property
    def owner(self) -> str:
        """The name this hub's claims carry in the ledger (``host:pid:start``)."""
        return self.runner.owner

    @owner.setter
    def owner(self, value: str) -> None:
        self.runner.owner = self.leases.owner = value

    def push(
        self, deliveries: Sequence[Delivery], *, redrive_failed: bool = False
    ) -> list[DeliveryOutcome]:
        """Deliver everything; target accounts in parallel, each within its limits.

        Args:
            deliveries: From :func:`~kiki_billing.hub.plan.plan_deliveries`.
            redrive_failed: Also retry deliveries that failed terminally before.

        Returns:
            One outcome per delivery, in the order given.
        """
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, delivery in enumerate(deliveries):
            groups[(delivery.target, delivery.account)].append(index)
        outcomes: list[DeliveryOutcome | None] = [None] * len(deliveries)

        def deliver(index: int) -> None:
            delivery = deliveries[index]
            result = self.runner.deliver(
                delivery, self.adapters[delivery.target], redrive_failed=redrive_failed
            )
            outcomes[index] = result
            self.health.flush()
            if self.on_outcome is not None:
                self.on_outcome(result)

        def run_group(key: tuple[str, str], indexes: list[int]) -> None:
            workers = max(1, self.adapters[key[0]].rate_limit().concurrency)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=key[0]) as pool:
                for future in [pool.submit(deliver, index) for index in indexes]:
                    future.result()

        try:
            with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
                for future in [pool.submit(run_group, k, v) for k, v in groups.items()]:
                    future.result()
        finally:
            self.leases.stop()
            self.health.flush(force=True)
        return [outcome for outcome in outcomes if outcome is not None]

    def preview(self, delivery: Delivery) -> Preview:
        """What pushing ``delivery`` would do now, without sending or recording anything."""
        return self.runner.preview(delivery, self.adapters[delivery.target])
