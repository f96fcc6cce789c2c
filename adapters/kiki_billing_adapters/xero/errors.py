"""Xero's errors, classified: its rate-limit problem header first, then the common HTTP rules.

The adapter sends with ``requests``; a response that is not a 2xx becomes a
:class:`XeroHTTPError` carrying the status, the headers and the parsed body, and
:func:`classify_xero_error` turns it (or a ``requests`` exception) into the hub's errors::

    429 X-Rate-Limit-Problem: minute | concurrent | appminute   RateLimitedError, Retry-After
    429 X-Rate-Limit-Problem: day                               RateLimitedError(window="day"),
                                                                retry_after = seconds to reset
    401                                                         CredentialsExpired (refresh, retry)
    400 ValidationException, 403, 404, other 4xx               TerminalError (Xero's messages)
    5xx, connection errors, timeouts                            TransientError
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kiki_billing.plugin import (
    CredentialsExpired,
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
    classify_http_status,
    parse_retry_after,
)

from .wire import error_message

CORRELATION_HEADER = "xero-correlation-id"


class XeroHTTPError(Exception):
    """A Xero answer that is not a 2xx (no secret is kept: request headers are not).

    Args:
        status: The HTTP status.
        headers: The response headers.
        body: The parsed JSON body, or the text when it is not JSON.
        what: What was being done (``PUT /Invoices``), for the message.
    """

    def __init__(self, status: int, headers: Mapping[str, str], body: Any, what: str) -> None:
        self.status = status
        self.headers = {str(k).lower(): str(v) for k, v in headers.items()}
        self.body = body
        self.what = what
        super().__init__(f"{what}: HTTP {status}")

    @property
    def request_id(self) -> str | None:
        """Xero's correlation id of the request."""
        return self.headers.get(CORRELATION_HEADER)


def _reset_note(retry_after: float | None) -> str:
    if retry_after is None:
        return "until Xero's daily window frees a slot"
    reset = datetime.now(UTC) + timedelta(seconds=retry_after)
    return f"until {reset.strftime('%Y-%m-%dT%H:%M:%SZ')} ({retry_after:.0f} s)"


def classify_xero_error(error: Exception) -> DeliveryError:
    """Map a Xero answer or a ``requests`` failure to a transient or terminal error.

    Args:
        error: What a request raised (already classified errors pass through unchanged).

    Returns:
        The classified error, carrying Xero's message, correlation id, status and error type.
    """
    if isinstance(error, DeliveryError):
        return error
    if not isinstance(error, XeroHTTPError):
        import requests

        message = f"{type(error).__name__}: {error}"
        # NOTE: no answer (reset, refused, timed out): the outcome is unknown; the hub retries
        # with the same Idempotency-Key and looks the object up if the key window has passed.
        if isinstance(error, requests.RequestException | OSError):
            return TransientError(message)
        return TerminalError(message)

    status, headers = error.status, error.headers
    fallback = f"{error.what}: Xero answered HTTP {status}"
    if isinstance(error.body, str) and error.body.strip():
        fallback = f"{fallback}: {error.body.strip()[:300]}"
    message, code = error_message(error.body, fallback)
    details: dict[str, Any] = {"request_id": error.request_id, "status": status, "code": code}
    retry_after = parse_retry_after(headers.get("retry-after"))

    if status == 429:
        # NOTE: X-Rate-Limit-Problem names the limit hit: minute, day, concurrent, or the
        # app's minute limit across organisations (developer.xero.com "OAuth 2.0 API limits").
        problem = (headers.get("x-rate-limit-problem") or "").strip().lower() or None
        if problem in ("day", "daily"):
            # The organisation's 5,000 a day are spent: the hub defers its deliveries until
            # the reset (a Retry-After longer than it waits) while other targets go on.
            return RateLimitedError(
                f"Xero's daily call limit for this organisation is used up; deliveries wait "
                f"{_reset_note(retry_after)}",
                window="day",
                retry_after=retry_after,
                **details,
            )
        return RateLimitedError(
            f"Xero rate limit ({problem or 'unspecified'}): {message}",
            window=problem,
            retry_after=retry_after,
            **details,
        )
    if status == 401:
        # NOTE: access tokens live 30 minutes; a 401 is an expired or revoked one: the adapter
        # refreshes before the hub's one immediate retry (developer.xero.com OAuth 2.0 FAQ).
        return CredentialsExpired(f"Xero refused the access token: {message}", **details)
    if status == 403:
        return TerminalError(
            f"Xero refused access to the organisation ({message}): is KIKI_XERO_TENANT_ID one "
            "of the connected organisations? `kiki-billing connect xero` lists them",
            **details,
        )
    return classify_http_status(
        status, message, headers=headers, request_id=error.request_id, code=code
    )
