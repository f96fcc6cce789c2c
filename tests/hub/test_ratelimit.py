from __future__ import annotations

import pytest

from kiki_billing.hub.errors import TerminalError, TransientError
from kiki_billing.hub.keys import KEY_LENGTH, idempotency_key
from kiki_billing.hub.ratelimit import CircuitBreaker, TokenBucket
from kiki_billing.hub.retry import RetryPolicy, run_with_retry


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_spaces_requests_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(5.0, burst=1, clock=clock, sleep=clock.sleep)
    for _ in range(11):
        bucket.acquire()
    assert clock.now == pytest.approx(2.0)  # 1 immediately, then 10 at 5/s


def test_token_bucket_allows_its_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, burst=5, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(7)]
    assert waits[:5] == [0.0] * 5
    assert clock.now == pytest.approx(0.2)


def test_token_bucket_pause_holds_every_slot() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, burst=10, clock=clock, sleep=clock.sleep)
    bucket.pause(3.0)
    bucket.acquire()
    assert clock.now == pytest.approx(3.0)


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
