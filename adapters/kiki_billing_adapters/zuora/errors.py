"""Zuora's errors, classified: its error codes first, then the common HTTP rules.

Zuora's SOAP API reports a failure in one of three ways, all turned into :class:`ZuoraApiError`
by the adapter: a SOAP fault (``faultcode`` ``fns:INVALID_SESSION``, HTTP 500, or 429 when
throttled), an error inside a 200 answer (``Success=false`` with ``Errors[{Code, Message}]``
in a create, update or subscribe result), or an HTTP error without a SOAP body (a 503 page of
a load balancer). No answer at all (a reset, a timeout) comes as a ``requests`` exception.
"""

from __future__ import annotations

from typing import Any

from kiki_billing.plugin import (
    ConfigurationError,
    CredentialsExpired,
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
    classify_http_status,
)

# NOTE: Zuora's published retry advice (PROVIDERS.md): throttling, lock contention, temporary
# errors, an unavailable server and a timed-out transaction are worth retrying as is.
THROTTLED_CODES = frozenset({"REQUEST_EXCEEDED_LIMIT", "REQUEST_EXCEEDED_RATE"})
TRANSIENT_CODES = frozenset(
    {
        "LOCK_COMPETITION",
        "TEMPORARY_ERROR",
        "SERVER_UNAVAILABLE",
        "TRANSACTION_TIMEOUT",
        # NOTE: not in Zuora's retry list (UNVERIFIED): an unexplained server-side failure and
        # a terminated transaction. Retrying is safe here because every write is deduplicated
        # (a unique AccountNumber and Subscription.Name), and a terminal error on an unknown
        # outcome would make `retry` re-send under a new key.
        "UNKNOWN_ERROR",
        "TRANSACTION_TERMINATED",
    }
)
INVALID_SESSION = "INVALID_SESSION"
DUPLICATE_VALUE = "DUPLICATE_VALUE"


class ZuoraApiError(Exception):
    """A failed Zuora call: a SOAP fault, an error result, or an HTTP error without SOAP.

    Args:
        message: Zuora's message (never a credential or a session id).
        operation: The SOAP operation (``login``, ``query``, ``create``, ``subscribe``, ...).
        code: Zuora's error code (``INVALID_VALUE``), without the ``fns:`` prefix.
        status: The HTTP status when the failure was an HTTP error or a SOAP fault.
        request_id: The ``Zuora-Request-Id`` header, when sent.
        retry_after: Seconds from a ``Retry-After`` header.
        field: The field Zuora named in an error result.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.operation = operation
        self.code = code
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        self.field = field
        super().__init__(f"Zuora {operation}: {message}")


def fault_code(code: str | None) -> str | None:
    """``INVALID_SESSION`` from a SOAP faultcode such as ``fns:INVALID_SESSION``."""
    if not code:
        return None
    return code.rpartition(":")[2].strip() or None


def classify_zuora_error(error: Exception) -> DeliveryError:
    """Map what a Zuora call raised to a transient or terminal :class:`DeliveryError`.

    Zuora's code decides first (throttled, transient, ``INVALID_SESSION``, a refused login,
    validation); an HTTP error without a code follows the common rules (5xx and 429 retried);
    no answer at all is transient; anything else is terminal. The hub scrubs secrets from the
    message.

    Args:
        error: What a step raised.

    Returns:
        The classified error, with Zuora's message, code, status and request id.
    """
    if isinstance(error, DeliveryError):
        return error
    if isinstance(error, ZuoraApiError):
        return _classify_api_error(error)
    if isinstance(error, ConfigurationError):
        return TerminalError(str(error))
    zeep_fault = _zeep_fault(error)
    if zeep_fault is not None:
        return _classify_api_error(zeep_fault)
    name = type(error).__name__
    if _is_lost_connection(error):
        # NOTE: no answer (reset, timeout): the call may have happened; a retry is safe because
        # the hub looks the object up first, or Zuora refuses the duplicate subscription name.
        return TransientError(f"no answer from Zuora ({name}: {error})")
    status = getattr(error, "status_code", None)
    if name == "TransportError" and isinstance(status, int):
        return classify_http_status(status, f"Zuora answered HTTP {status} without a SOAP body")
    if name in ("XMLSyntaxError", "XMLParseError"):
        return TransientError(f"Zuora's answer could not be read ({name})")
    if isinstance(error, OSError):
        return TransientError(f"{name}: {error}")
    return TerminalError(f"{name}: {error}")


def _classify_api_error(error: ZuoraApiError) -> DeliveryError:
    code = error.code
    message = f"Zuora {error.operation}: {error.message}"
    if error.field:
        message += f" (field {error.field})"
    details: dict[str, Any] = {
        "request_id": error.request_id,
        "status": error.status,
        "code": code,
    }
    if code in THROTTLED_CODES or error.status == 429:
        # NOTE: Zuora answers REQUEST_EXCEEDED_LIMIT for its concurrency and per-minute limits
        # and REQUEST_EXCEEDED_RATE for the request rate (PROVIDERS.md); both slow the tenant.
        # A refusal for too many requests at once says "concurrent" (Zuora's "Concurrent
        # Request Limits" policy): the hub then holds fewer requests in flight.
        window = "minute" if code == "REQUEST_EXCEEDED_RATE" else None
        if "concurren" in error.message.lower():
            window = "concurrent"
        return RateLimitedError(message, window=window, retry_after=error.retry_after, **details)
    if code in TRANSIENT_CODES:
        return TransientError(message, retry_after=error.retry_after, **details)
    if code == INVALID_SESSION:
        # NOTE: the session expired or was revoked; the adapter has dropped it, so the hub's
        # one immediate retry logs in again (a second INVALID_SESSION in a row is terminal).
        return CredentialsExpired(message, **details)
    if error.operation == "login":
        return TerminalError(
            f"Zuora refused the login of KIKI_ZUORA_USERNAME: {error.message}", **details
        )
    if code is None and error.status is not None:
        return classify_http_status(
            error.status,
            message,
            request_id=error.request_id,
            headers=(
                {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
            ),
        )
    return TerminalError(message, **details)


def _zeep_fault(error: Exception) -> ZuoraApiError | None:
    """A raw ``zeep.exceptions.Fault`` as a :class:`ZuoraApiError` (operation unknown)."""
    if type(error).__name__ != "Fault" or not hasattr(error, "code"):
        return None
    message = str(getattr(error, "message", "") or error)
    return ZuoraApiError(message, operation="call", code=fault_code(getattr(error, "code", None)))


def _is_lost_connection(error: Exception) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests is a core dependency
        return False
    lost = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    )
    return isinstance(error, lost)
