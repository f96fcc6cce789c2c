"""Rate limits and circuit breakers, one of each per (target, provider account).

:class:`AccountLimiter` keeps an account under every window the provider publishes
(``100/s``; ``60/min`` and ``5000/day``; ...) counted the strictest way: at most N requests in
*any* interval of the window's length, as a sliding-window provider counts them. It spaces
requests evenly at the shortest window's rate instead of letting a burst out after a pause or
at start-up, keeps a little headroom under each window for network jitter, holds a concurrency
cap, and adapts when the provider answers 429 anyway: a ``Retry-After`` pauses the whole
account; a 429 without one slows the pace a little and recovers it slowly, so one throttle
never stalls the account for long.

What the limiter counts lives in a :class:`LimiterState`: by default in this process; with the
Celery executor in Redis (:mod:`kiki_billing.hub.shared_limits`), where the same rules hold for
every worker process of every machine together. The circuit breaker (:class:`Breaker`) is
kept either way too.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from kiki_billing.plugin import RateLimit, RateLimitedError, RateWindow

# NOTE: 4% under every window (at least one request): a request's arrival at the provider
# lags its departure by a varying latency, so two requests sent just over a window apart can
# arrive just inside one. With 100/s this paces at 96/s (wall time 1.04x the bound).
HEADROOM = 0.04
# A 429 without Retry-After slows the pace by this factor, down to FLOOR of the published
# rate; every RECOVER_AFTER requests without a 429 win back RECOVER_STEP of it.
SLOWDOWN = 0.9
LOCAL_LIMIT = "local_rate_limit"
"""The code of a :class:`RateLimitedError` raised here, before any request was sent."""
FLOOR = 0.5
CONCURRENT = "concurrent"
"""The window of a :class:`RateLimitedError` for too many requests at once."""
RECOVER_AFTER = 50
RECOVER_STEP = 0.02

_THREAD = threading.local()
"""Per thread: the limiter whose slot it holds (``limiter``) and its latest slot (``due``)."""


@dataclass
class _Window:
    requests: int
    seconds: float
    name: str
    sent: deque[float] = field(default_factory=deque)


@dataclass(frozen=True)
class PacedWindow:
    """A provider window as the limiter keeps it: the published count less the headroom."""

    requests: int
    seconds: float
    name: str


def paced_windows(limit: RateLimit) -> list[PacedWindow]:
    """The windows the limiter counts, shortest first, each with :data:`HEADROOM` kept free."""
    if not limit.windows:
        raise ValueError("a rate limit needs at least one window")
    return [
        PacedWindow(max(1, w.requests - math.ceil(w.requests * HEADROOM)), w.seconds, w.name)
        for w in sorted(limit.windows, key=lambda w: w.seconds)
    ]


def too_far(wait: float, reason: str | None) -> RateLimitedError:
    """The error a reservation further away than ``max_wait`` raises (nothing is reserved)."""
    return RateLimitedError(
        code=LOCAL_LIMIT,
        message=f"rate limit ({reason or 'window'}) reached for this account; "
        f"next request possible in {wait:.0f} s",
        window=reason,
        retry_after=wait,
    )


class LimiterState(Protocol):
    """Where an account's limiter keeps its windows, pace, pause and concurrency slots.

    :class:`LocalLimiterState` keeps them in this process (the default); a shared state (see
    :mod:`kiki_billing.hub.shared_limits`) keeps them where every worker process of every
    machine counts against the same numbers. Both follow the rules of this module's docstring.
    """

    @property
    def interval(self) -> float:
        """Seconds between two requests at the current pace."""
        ...

    def reserve(self, max_wait: float) -> float:
        """Reserve the next send slot; return the seconds until it comes due.

        Raises:
            RateLimitedError: The slot is further away than ``max_wait``; nothing reserved.
        """
        ...

    def throttled(self, retry_after: float | None) -> float:
        """Record a 429: pause (``retry_after``) or slow the pace; return the wait."""
        ...

    def slot(self) -> AbstractContextManager[object]:
        """Hold one of the account's concurrent request slots."""
        ...

    def crowded(self) -> None:
        """The provider refused a request for too many at once: hold fewer slots.

        The cap drops below the requests in flight (at least one is kept) and wins one slot
        back every :data:`RECOVER_AFTER` requests that leave without such a refusal, up to
        the published cap.
        """
        ...


class LocalLimiterState:
    """The limiter's state in this process (thread-safe).

    Args:
        limit: The account's windows and concurrency cap.
        clock: Monotonic seconds (tests inject one).
    """

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows = [_Window(w.requests, w.seconds, w.name) for w in paced_windows(limit)]
        self._pace = 1.0
        self._since_throttle = 0
        self._last = -math.inf
        self._paused_until = -math.inf
        self._max_slots = max(1, limit.concurrency)
        self._cap = self._max_slots
        self._in_flight = 0
        self._since_crowded = 0
        self._slot_freed = threading.Condition(self._lock)

    @property
    def interval(self) -> float:
        """Seconds between two requests at the current pace."""
        shortest = self._windows[0]
        return shortest.seconds / (shortest.requests * self._pace)

    @property
    def cap(self) -> int:
        """Requests allowed in flight now (the published cap, less after a refusal)."""
        return self._cap

    def _due(self, now: float) -> tuple[float, str | None]:
        due = max(now, self._last + self.interval, self._paused_until)
        reason = "paused" if self._paused_until > now else None
        for window in self._windows:
            while window.sent and window.sent[0] <= now - window.seconds:
                window.sent.popleft()
            if len(window.sent) >= window.requests:
                # NOTE: a millisecond past the window, so a provider that counts both ends
                # of its interval still sees at most N.
                free_at = window.sent[-window.requests] + window.seconds + 0.001
                if free_at > due:
                    due, reason = free_at, window.name
        return due, reason

    def reserve(self, max_wait: float) -> float:
        """Reserve the next send slot; return the seconds until it comes due (not slept)."""
        with self._lock:
            now = self._clock()
            due, reason = self._due(now)
            wait = due - now
            if wait > max_wait:
                raise too_far(wait, reason)
            self._last = due
            for window in self._windows:
                window.sent.append(due)
            self._since_throttle += 1
            if self._pace < 1.0 and self._since_throttle % RECOVER_AFTER == 0:
                self._pace = min(1.0, self._pace + RECOVER_STEP)
            return max(0.0, wait)

    def throttled(self, retry_after: float | None) -> float:
        """Pause the account ``retry_after``, or slow the pace and wait one interval."""
        with self._lock:
            now = self._clock()
            self._since_throttle = 0
            if retry_after is not None:
                self._paused_until = max(self._paused_until, now + retry_after)
                return retry_after
            self._pace = max(FLOOR, self._pace * SLOWDOWN)
            # The window frees a slot within one interval: wait that long, not a backoff.
            self._paused_until = max(self._paused_until, now + self.interval)
            return self.interval

    @contextmanager
    def slot(self) -> Iterator[object]:
        """One of the account's concurrent slots (counted in this process)."""
        with self._slot_freed:
            while self._in_flight >= self._cap:
                self._slot_freed.wait()
            self._in_flight += 1
            self._since_crowded += 1
            if self._cap < self._max_slots and self._since_crowded % RECOVER_AFTER == 0:
                self._cap += 1
                self._slot_freed.notify()
        try:
            yield self
        finally:
            with self._slot_freed:
                self._in_flight -= 1
                self._slot_freed.notify()

    def crowded(self) -> None:
        """Hold one slot fewer than are in flight now (at least one)."""
        with self._lock:
            self._cap = max(1, min(self._cap, self._in_flight - 1))
            self._since_crowded = 0


class AccountLimiter:
    """Paces the requests of one provider account (thread-safe; one per account per process).

    Args:
        limit: The account's windows and concurrency cap.
        clock: Monotonic seconds (tests inject one).
        sleep: Sleeps (tests inject one).
        max_wait: A wait longer than this is not slept: :meth:`acquire` raises
            :class:`RateLimitedError` instead, and the hub defers the delivery.
        state: Where the windows, pace, pause and slots are kept (default: this process).
    """

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float = 120.0,
        state: LimiterState | None = None,
    ) -> None:
        if not limit.windows:
            raise ValueError("a rate limit needs at least one window")
        self.limit = limit
        self._clock = clock
        self._sleep = sleep
        self.max_wait = max_wait
        self.state: LimiterState = state if state is not None else LocalLimiterState(limit, clock)
        self._lock = threading.Lock()
        self.waited = 0.0
        self.throttled = 0
        self.requests = 0

    @property
    def interval(self) -> float:
        """Seconds between two requests at the current pace."""
        return self.state.interval

    def reserve(self) -> float:
        """Reserve the next send slot; return the seconds until it comes due (not slept).

        Raises:
            RateLimitedError: The slot is further away than ``max_wait`` (a day limit used
                up, a long pause): nothing is reserved.
        """
        wait = self.state.reserve(self.max_wait)
        _THREAD.due = (self, self._clock() + wait)
        with self._lock:
            self.requests += 1
        return wait

    def acquire(self) -> float:
        """Wait for the next send slot; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
            with self._lock:
                self.waited += wait
        return wait

    @contextmanager
    def request(self) -> Iterator[None]:
        """Hold one of the account's concurrent slots, then a rate slot, around one request.

        The concurrency slot is taken first, so the request leaves no earlier than the rate
        slot it reserved.
        """
        with self.state.slot():
            self.acquire()
            outer = getattr(_THREAD, "limiter", None)
            _THREAD.limiter = self
            try:
                yield
            finally:
                _THREAD.limiter = outer

    def catch_up(self) -> float:
        """The calling thread's request leaves only now: take a new slot if its own has passed.

        A request held up after its slot came due (waiting for another thread's token refresh)
        would otherwise leave together with the requests of the slots after it, a burst the
        provider counts in one window. A slot less than one interval old is kept.

        Returns:
            The seconds waited for the new slot (0 when the old one was kept).

        Raises:
            RateLimitedError: As :meth:`reserve`.
        """
        held: tuple[AccountLimiter, float] | None = getattr(_THREAD, "due", None)
        if held is None or held[0] is not self or self._clock() - held[1] <= self.interval:
            return 0.0
        return self.acquire()

    def throttled_by_provider(self, retry_after: float | None, window: str | None = None) -> float:
        """The provider answered 429: pause or slow down; return the wait before a retry.

        Args:
            retry_after: The provider's ``Retry-After``, when it sent one: every request of
                the account waits that long.
            window: Which of the provider's limits it was (``day`` pauses until ``retry_after``
                like any other). ``concurrent`` lowers the account's concurrency cap instead
                of its pace: the retry waits for a slot, not for the rate.
        """
        with self._lock:
            self.throttled += 1
        if window == CONCURRENT:
            self.state.crowded()
            return 0.0 if retry_after is None else self.state.throttled(retry_after)
        return self.state.throttled(retry_after)


class LimitsBackend(Protocol):
    """Makes the limiter states and breakers of provider accounts that several processes share.

    The hub's default keeps both in its process; :class:`kiki_billing.hub.shared_limits.
    RedisLimits` keeps them in Redis for the Celery executor's workers.
    """

    def limiter_state(self, target: str, account: str, limit: RateLimit) -> LimiterState:
        """The shared state of an account's limiter."""
        ...

    def breaker(self, target: str, account: str, *, threshold: int, cooldown: float) -> Breaker:
        """The shared circuit breaker of an account."""
        ...


class Breaker(Protocol):
    """A circuit breaker of one provider account: in this process, or shared by workers."""

    def allow(self) -> bool:
        """May a delivery start now?"""
        ...

    def record_success(self) -> None:
        """A delivery went through: close the circuit."""
        ...

    def record_failure(self) -> None:
        """A delivery failed for a reason that says the provider is unwell."""
        ...

    @property
    def is_open(self) -> bool:
        """True while deliveries are being deferred."""
        ...

    def open_for(self) -> float | None:
        """Seconds until a trial delivery is let through; ``None`` while the circuit is closed."""
        ...


def catch_up_held_slot() -> float:
    """For code that blocks a request inside its rate slot: see :meth:`AccountLimiter.catch_up`.

    Does nothing outside :meth:`AccountLimiter.request` (a ``connect``, a test).

    Returns:
        The seconds waited for a new slot.
    """
    limiter: AccountLimiter | None = getattr(_THREAD, "limiter", None)
    return 0.0 if limiter is None else limiter.catch_up()


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

    def open_for(self) -> float | None:
        """Seconds until a trial delivery is let through; ``None`` while the circuit is closed."""
        with self._lock:
            if self._opened_at is None:
                return None
            return max(0.0, self._opened_at + self.cooldown - self.clock())


__all__ = [
    "AccountLimiter",
    "Breaker",
    "CircuitBreaker",
    "LimiterState",
    "LimitsBackend",
    "LocalLimiterState",
    "RateLimit",
    "RateWindow",
    "catch_up_held_slot",
]
