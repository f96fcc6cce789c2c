"""Retrying transient failures: the one place it happens (tenacity).

Every attempt of a step resends the same idempotency key (fixed before the loop). Transient
errors are retried with exponential backoff plus up to ``initial_wait`` of jitter, after the
provider's ``Retry-After`` when it gives one, or after the account limiter's short wait for a
429 without one; terminal errors stop at once. A refused access token is retried once at once
(the adapter refreshes it first); a second refusal in a row is terminal. Attempts and total
time are bounded, and a ``Retry-After`` longer than the policy allows is not waited out: the
delivery is deferred instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from kiki_billing.plugin import (
    CredentialsExpired,
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
)

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How hard to try one step before giving up (``KIKI_RETRY_*``)."""

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(default=6, ge=1, le=50)
    max_seconds: float = Field(default=300.0, gt=0, le=86400)
    initial_wait: float = Field(default=0.5, ge=0, le=3600)
    max_wait: float = Field(default=30.0, ge=0, le=3600)
    max_retry_after: float = Field(default=120.0, ge=0, le=86400)
    """A longer ``Retry-After`` is not waited out: the delivery is deferred instead."""

    def longest_step(self) -> float:
        """The longest one step can take with every retry (a bound for leases)."""
        return self.max_seconds + self.max_retry_after + self.max_wait


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, DeliveryError) and error.retriable


class _Wait:
    """``Retry-After`` when given; the limiter's short wait for a bare 429; else backoff."""

    def __init__(self, policy: RetryPolicy, throttled: Callable[[DeliveryError], float] | None):
        self.backoff = wait_exponential_jitter(
            multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.initial_wait
        )
        self.throttled = throttled

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, CredentialsExpired):
            return 0.0
        if isinstance(error, RateLimitedError) and self.throttled is not None:
            return self.throttled(error)
        if isinstance(error, TransientError) and error.retry_after is not None:
            return error.retry_after
        return float(self.backoff(state))


class _StopOnLongRetryAfter(stop_base):
    """Stop when the provider asks for a longer wait than we are willing to block for."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        return (
            isinstance(error, TransientError)
            and error.retry_after is not None
            and error.retry_after > self.limit
        )


def run_with_retry(
    send: Callable[[], T],
    classify: Callable[[Exception], DeliveryError],
    policy: RetryPolicy,
    *,
    before_attempt: Callable[[int], None] | None = None,
    on_retry: Callable[[DeliveryError, int, float], None] | None = None,
    throttled: Callable[[DeliveryError], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``send`` until it succeeds, fails terminally, or the policy runs out.

    Args:
        send: One attempt (it must reuse the same idempotency key every time).
        classify: Maps an SDK exception to a :class:`DeliveryError`.
        policy: Attempts and time bounds.
        before_attempt: Called with the attempt number before each attempt.
        on_retry: Called with the error, the attempt number and the wait before a retry.
        throttled: For a 429: tells the account's limiter (a pause for ``Retry-After``, a
            slower pace without one) and returns the wait before the retry.
        sleep: Injected in tests.

    Returns:
        What ``send`` returned.

    Raises:
        DeliveryError: The last error, classified.
    """
    previous: list[DeliveryError] = []

    def attempt() -> T:
        number = len(previous) + 1
        if before_attempt is not None:
            before_attempt(number)
        try:
            return send()
        except Exception as exc:
            error = exc if isinstance(exc, DeliveryError) else classify(exc)
            if isinstance(error, CredentialsExpired) and any(
                isinstance(p, CredentialsExpired) for p in previous[-1:]
            ):
                error = TerminalError(
                    f"{error.message} (refused again after a token refresh)",
                    request_id=error.request_id,
                    status=error.status,
                    code=error.code,
                )
            previous.append(error)
            if error is exc:
                raise
            raise error from exc

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if on_retry is not None and isinstance(error, DeliveryError):
            on_retry(error, state.attempt_number, wait)

    retrying = Retrying(
        retry=retry_if_exception(_is_transient),
        stop=(
            stop_after_attempt(policy.max_attempts)
            | stop_after_delay(policy.max_seconds)
            | _StopOnLongRetryAfter(policy.max_retry_after)
        ),
        wait=_Wait(policy, throttled),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
