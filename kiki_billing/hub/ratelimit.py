"""Rate limits and circuit breakers, one of each per (target, provider account)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class TokenBucket:
    """A token bucket that hands out send slots at ``rate`` per second, ``burst`` at once.

    Callers reserve a slot and sleep outside the lock until it comes due, so many threads
    share one account's rate fairly and none spins. A provider's ``Retry-After`` pauses the
    whole bucket (:meth:`pause`), so no thread of the account sends until it has passed.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._paused_until = 0.0

    def acquire(self, requests: int = 1) -> float:
        """Wait for slots for ``requests`` requests sent back to back; return the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= requests
            due = now if self._tokens >= 0 else now - self._tokens / self.rate
            due = max(due, self._paused_until)
        wait = due - now
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)

    def pause(self, seconds: float) -> None:
        """Hold every slot of this account for ``seconds`` (the provider said so)."""
        with self._lock:
            now = self._clock()
            self._paused_until = max(self._paused_until, now + seconds)
            self._tokens = min(self._tokens, 0.0)


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; lets one trial through after ``cooldown``.

    While open, the hub defers the target's deliveries instead of sending them, so a provider
    that is down does not hold up the others.
    """

    threshold: int = 5
    cooldown: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: int = 0
    _opened_at: float | None = None
    _trial_out: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self) -> bool:
        """May a delivery start now?"""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial_out or self.clock() - self._opened_at < self.cooldown:
                return False
            self._trial_out = True
            return True

    def record_success(self) -> None:
        """A delivery went through: close the circuit."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_out = False

    def record_failure(self) -> None:
        """A delivery failed for a reason that says the provider is unwell."""
        with self._lock:
            self._failures += 1
            if self._trial_out or self._failures >= self.threshold:
                self._opened_at = self.clock()
            self._trial_out = False

    @property
    def is_open(self) -> bool:
        """True while deliveries are being deferred."""
        with self._lock:
            return self._opened_at is not None
