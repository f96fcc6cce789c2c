"""Each provider account's health, carried from a run's limiters and breakers to the ledger.

The limiters and circuit breakers live in one process; the metrics are read from the ledger,
so every process, and a restart, sees the same counts. A :class:`HealthRecorder` adds what
each account's limiter counted since the last write (requests, 429s, seconds waited for a
slot) and records whether its circuit is open, at most once a second per push and once at
its end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.ledger.payments import add_account_health
from kiki_billing.hub.runner import AccountMachinery

log = structlog.get_logger("kiki_billing.hub")


@dataclass
class _Seen:
    requests: int = 0
    throttled: int = 0
    waited: float = 0.0
    open_until: float | None = None
    circuit_known: bool = False


class HealthRecorder:
    """Writes the accounts' counters and circuits of one hub to the ledger.

    Args:
        ledger: The ledger.
        machinery: The hub's limiters and breakers.
        every: Seconds between two writes while a push runs.
        clock: Monotonic seconds (injected in tests).
        wall: Epoch seconds, for the time an open circuit closes.
    """

    def __init__(
        self,
        ledger: Ledger,
        machinery: AccountMachinery,
        *,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.machinery = machinery
        self.every = every
        self._clock = clock
        self._wall = wall
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._lock = threading.Lock()
        self._last = -float("inf")

    def flush(self, *, force: bool = False) -> None:
        """Write what changed since the last write (unless one was written under a second ago).

        A failed write is logged and retried with the next one: health never fails a push.
        """
        with self._lock:
            now = self._clock()
            if not force and now - self._last < self.every:
                return
            self._last = now
            limiters = self.machinery.limiters()
            breakers = self.machinery.breakers()
            for key in sorted(set(limiters) | set(breakers)):
                seen = self._seen.setdefault(key, _Seen())
                limiter = limiters.get(key)
                requests = limiter.requests if limiter else seen.requests
                throttled = limiter.throttled if limiter else seen.throttled
                waited = limiter.waited if limiter else seen.waited
                breaker = breakers.get(key)
                open_for = breaker.open_for() if breaker else None
                open_until = None if open_for is None else self._wall() + open_for
                circuit_changed = not seen.circuit_known or (open_until is None) != (
                    seen.open_until is None
                )
                counts = (
                    requests - seen.requests,
                    throttled - seen.throttled,
                    waited - seen.waited,
                )
                if not circuit_changed and not any(counts):
                    continue
                try:
                    add_account_health(
                        self.ledger,
                        key[0],
                        key[1],
                        requests=counts[0],
                        throttled=counts[1],
                        waited=counts[2],
                        circuit=(open_until,) if circuit_changed else None,
                    )
                except Exception as exc:  # the next flush carries these counts again
                    log.warning("health.not_recorded", target=key[0], error=type(exc).__name__)
                    continue
                seen.requests, seen.throttled, seen.waited = requests, throttled, waited
                seen.open_until, seen.circuit_known = open_until, True
