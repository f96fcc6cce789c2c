"""Stripe's errors, classified: its retry hint first, then the common HTTP rules."""

from __future__ import annotations

from typing import Any

from kiki_billing.plugin import (
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
    classify_http_status,
    parse_retry_after,
)


def _error_code(error: Any) -> str | None:
    """The Stripe error code, wherever the SDK put it."""
    # NOTE: stripe-python 16 builds RateLimitError, IdempotencyError, AuthenticationError,
    # PermissionError and APIError without `code`; it is only in the body (json_body/.error).
    code = getattr(error, "code", None)
    if code:
        return str(code)
    body = getattr(error, "json_body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        found = body["error"].get("code")
        return str(found) if found else None
    return None


def classify_stripe_error(error: Exception) -> DeliveryError:
    """Map a ``stripe`` SDK exception to a transient or terminal :class:`DeliveryError`.

    ``Stripe-Should-Retry`` outranks the status; ``lock_timeout`` is a transient lock on one
    object, not a throttle; then the common rules (connection errors, 408/409/425/5xx
    transient, 429 rate limited, other 4xx terminal). The hub scrubs secrets from the message.

    Args:
        error: What the SDK raised (or anything else a step raised).

    Returns:
        The classified error, carrying Stripe's message, request id, status and code.
    """
    if isinstance(error, DeliveryError):
        return error
    try:
        import stripe
    except ImportError:  # pragma: no cover - without the SDK only our own errors occur
        stripe = None  # type: ignore[assignment]
    if stripe is None or not isinstance(error, stripe.StripeError):
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, OSError):
            return TransientError(message)
        return TerminalError(message)

    headers = {str(k).lower(): str(v) for k, v in dict(error.headers or {}).items()}
    status = error.http_status
    code = _error_code(error)
    message = error.user_message or f"Stripe {type(error).__name__}"
    request_id = headers.get("request-id") or error.request_id
    details: dict[str, Any] = {"request_id": request_id, "status": status, "code": code}
    throttled = status == 429 or isinstance(error, stripe.RateLimitError)
    retry_after = parse_retry_after(headers.get("retry-after"))

    # NOTE: Stripe-Should-Retry outranks the status code (stripe-python _http_client.py
    # _should_retry; PROVIDERS.md).
    should_retry = headers.get("stripe-should-retry")
    if should_retry == "false":
        return TerminalError(message, **details)
    # NOTE: lock_timeout is a lock on one object (arrives as a 429), not an account-wide
    # throttle: retry it with the same key without slowing the whole account down.
    if code == "lock_timeout":
        return TransientError(message, retry_after=retry_after, **details)
    if should_retry == "true":
        kind = RateLimitedError if throttled else TransientError
        return kind(message, retry_after=retry_after, **details)
    if isinstance(error, stripe.APIConnectionError):
        return TransientError(message, **details)
    if throttled:
        return RateLimitedError(message, retry_after=retry_after, **details)
    # NOTE: an APIError without a status is an unreadable response (stripe-python
    # _api_requestor.py); other errors without one were raised locally by the SDK.
    if status is None:
        if isinstance(error, stripe.APIError):
            return TransientError(message, **details)
        return TerminalError(message, **details)
    return classify_http_status(status, message, headers=headers, request_id=request_id, code=code)
