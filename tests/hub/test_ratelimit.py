from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from kiki_billing.hub.credentials import LedgerCredentialStore
from kiki_billing.hub.keys import KEY_LENGTH, idempotency_key
from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.ratelimit import RECOVER_AFTER, AccountLimiter, CircuitBreaker
from kiki_billing.hub.retry import RetryPolicy, run_with_retry
from kiki_billing.plugin import (
    RateLimit,
    RateLimitedError,
    RateWindow,
    TerminalError,
    TransientError,
    parse_rate_limit,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(*windows: tuple[int, float], concurrency: int = 4, **kw: object):
    clock = FakeClock()
    limit = RateLimit(tuple(RateWindow(n, s) for n, s in windows), concurrency)
    return AccountLimiter(limit, clock=clock, sleep=clock.sleep, **kw), clock  # type: ignore[arg-type]


def max_in_any_window(times: list[float], seconds: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_limiter_spaces_requests_evenly_under_the_window_with_headroom() -> None:
    lim, clock = limiter((100, 1.0))
    sent = []
    for _ in range(500):
        lim.acquire()
        sent.append(clock.now)
    # 4% headroom: 96 per second, evenly spaced, never a burst.
    assert max_in_any_window(sent, 1.0) <= 96
    assert sent[-1] == pytest.approx(499 / 96, rel=2e-3)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) == pytest.approx(1 / 96)


def test_limiter_does_not_burst_after_a_pause_in_traffic() -> None:
    lim, clock = limiter((100, 1.0))
    for _ in range(10):
        lim.acquire()
    clock.now += 30.0  # idle: a token bucket as deep as its rate would now release 100 at once
    start = clock.now
    sent = []
    for _ in range(10):
        lim.acquire()
        sent.append(clock.now - start)
    assert sent[-1] == pytest.approx(9 / 96, rel=2e-3)


def test_limiter_keeps_every_window_at_once() -> None:
    # QuickBooks: 10/s and 500/min; 5000/day beside 60/min for Xero.
    lim, clock = limiter((10, 1.0), (500, 60.0))
    sent = []
    for _ in range(1500):
        lim.acquire()
        sent.append(clock.now)
    assert max_in_any_window(sent, 1.0) <= 10
    assert max_in_any_window(sent, 60.0) <= 480
    assert clock.now > 120  # the minute window, not the second one, sets the pace


def test_limiter_defers_instead_of_sleeping_out_a_day_window() -> None:
    lim, _ = limiter((5, 60.0), (20, 86400.0), max_wait=120.0)
    for _ in range(19):  # 4% headroom: 19 of the day's 20
        lim.acquire()
    with pytest.raises(RateLimitedError) as caught:
        lim.acquire()
    assert caught.value.window == "day"
    assert caught.value.retry_after is not None and caught.value.retry_after > 80000


def test_retry_after_pauses_the_account_and_a_bare_429_slows_it_briefly() -> None:
    lim, clock = limiter((100, 1.0))
    lim.acquire()
    assert lim.throttled_by_provider(3.0) == 3.0
    lim.acquire()
    assert clock.now == pytest.approx(3.0)
    wait = lim.throttled_by_provider(None)
    assert wait < 0.02  # a slot frees within one interval: no second-long stall
    before = lim.interval
    assert before > 1 / 96  # and the pace slowed a little
    for _ in range(2000):
        lim.acquire()
    assert lim.interval == pytest.approx(1 / 96)  # recovered


def test_limiter_holds_the_concurrency_cap() -> None:
    lim, _ = limiter((1000, 1.0), concurrency=2)
    in_flight = []
    peak = [0]
    lock = threading.Lock()

    def request() -> None:
        with lim.request():
            with lock:
                in_flight.append(1)
                peak[0] = max(peak[0], len(in_flight))
            time.sleep(0.01)
            with lock:
                in_flight.pop()

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 2


def test_a_refusal_for_too_many_at_once_lowers_the_cap_then_wins_it_back() -> None:
    lim, _ = limiter((100_000, 1.0), concurrency=6)
    state = lim.state
    # Four in flight when the provider refuses one for concurrency: three at most from now.
    with lim.request(), lim.request(), lim.request(), lim.request():
        wait = lim.throttled_by_provider(None, "concurrent")
    assert wait == 0.0  # the retry waits for a slot, not for the rate
    assert state.cap == 3  # type: ignore[attr-defined]
    assert lim.interval == pytest.approx(1 / 96_000)  # the pace is untouched
    blocked = threading.Event()
    entered = threading.Event()

    def fourth() -> None:
        blocked.set()
        with lim.request():
            entered.set()

    with lim.request(), lim.request(), lim.request():
        thread = threading.Thread(target=fourth)
        thread.start()
        blocked.wait(5)
        assert not entered.wait(0.2)  # a fourth request waits for a slot
    thread.join(5)
    assert entered.is_set()
    # Every RECOVER_AFTER requests without a refusal win one slot back, up to the cap of 6.
    for _ in range(RECOVER_AFTER * 5):
        with lim.request():
            pass
    assert state.cap == 6  # type: ignore[attr-defined]
    # However crowded, one request is always let through.
    with lim.request():
        lim.throttled_by_provider(None, "concurrent")
        lim.throttled_by_provider(None, "concurrent")
    assert state.cap == 1  # type: ignore[attr-defined]


def test_rate_limit_settings_parse_windows() -> None:
    assert parse_rate_limit("100") == (RateWindow(100, 1.0),)
    assert parse_rate_limit("500/min, 10/s") == (RateWindow(10, 1.0), RateWindow(500, 60.0))
    assert parse_rate_limit("5000/day") == (RateWindow(5000, 86400.0),)
    assert parse_rate_limit("0.5") == (RateWindow(1, 2.0),)
    for bad in ("", "abc", "10/fortnight", "-1", "0", "1.5/min"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


def test_circuit_breaker_opens_then_lets_one_trial_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown=10.0, clock=clock)
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    assert not breaker.allow()  # one trial at a time
    breaker.record_success()
    assert breaker.allow() and not breaker.is_open


def test_retry_stops_at_the_attempt_bound_with_the_last_error() -> None:
    attempts = []

    def send() -> str:
        attempts.append(1)
        raise TransientError("still down", status=503)

    with pytest.raises(TransientError, match="still down"):
        run_with_retry(
            send, lambda e: TerminalError(str(e)), RetryPolicy(max_attempts=3), sleep=lambda s: None
        )
    assert len(attempts) == 3


def test_retry_backoff_grows_and_is_capped() -> None:
    waits: list[float] = []

    def send() -> str:
        raise TransientError("down")

    policy = RetryPolicy(max_attempts=8, initial_wait=1.0, max_wait=5.0)
    with pytest.raises(TransientError):
        run_with_retry(send, lambda e: TerminalError(str(e)), policy, sleep=waits.append)
    assert len(waits) == 7
    assert all(0 <= w <= 5.0 + 1.0 for w in waits)
    assert max(waits) > 2.0


def test_unknown_exceptions_are_classified_by_the_adapter() -> None:
    def send() -> str:
        raise KeyError("x")

    with pytest.raises(TerminalError, match="classified"):
        run_with_retry(
            send, lambda e: TerminalError("classified"), RetryPolicy(), sleep=lambda s: None
        )


def test_keys_are_deterministic_versioned_and_short() -> None:
    key = idempotency_key("KIKI-OaaS-202601-000001", 0, "stripe", "draft")
    assert key == idempotency_key("KIKI-OaaS-202601-000001", 0, "stripe", "draft")
    assert key.startswith("k1-") and len(key) == KEY_LENGTH <= 36
    others = {
        idempotency_key("KIKI-OaaS-202601-000001", 1, "stripe", "draft"),
        idempotency_key("KIKI-OaaS-202601-000001", 0, "xero", "draft"),
        idempotency_key("KIKI-OaaS-202601-000001", 0, "stripe", "line-1"),
        idempotency_key("KIKI-OaaS-202601-000002", 0, "stripe", "draft"),
    }
    assert key not in others and len(others) == 4


def test_requests_held_up_by_a_token_refresh_take_new_slots(tmp_path: Path) -> None:
    """Three workers reserve their slots, then wait in the credential store while one of them
    refreshes the token (0.5 s). Sent as soon as the new token is stored, the three would leave
    at once and, with the slots after them, put 12 requests in one second of QuickBooks' 10/s
    window (a 429, and Intuit's one-minute pause). Each takes a new slot instead."""
    lim, clock = limiter((10, 1.0), (500, 60.0), concurrency=3)
    store = LedgerCredentialStore(Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}"), "qb", "1")
    sent: list[float] = []
    turn = [threading.Event() for _ in range(7)]

    def refresh(current: Mapping[str, str]) -> Mapping[str, str] | None:
        if current.get("access_token"):
            return None  # another worker refreshed meanwhile
        clock.now += 0.5  # the token endpoint answers
        return {"access_token": "new"}

    def worker(number: int) -> None:
        with lim.request():  # the slot is reserved (and come due) ...
            turn[number + 1].set()
            turn[number + 3].wait()
            store.update(refresh)  # ... but the request waits for the token
            sent.append(clock.now)
            turn[number + 4].set()

    # One at a time: each worker reserves its slot in turn (the last one's reservation lets
    # the first go on), then each waits for the token in turn.
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    turn[0].set()
    for number, thread in enumerate(threads):
        turn[number].wait()
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(10):  # and the account goes on
        with lim.request():
            sent.append(clock.now)

    assert sent[0] == pytest.approx(2 / 9 + 0.5)  # the third slot came due, then the refresh
    assert max_in_any_window(sent, 1.0) <= 9  # 10/s less the headroom
