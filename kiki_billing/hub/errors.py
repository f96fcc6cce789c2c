"""What can go wrong when delivering, as the hub sees it.

::

    DeliveryError                 every failure an adapter reports (classify() returns one)
    ├── TransientError            retry with the same idempotency key (network, 5xx, 409 lock)
    │   └── RateLimitedError      429 / throttled; carries the provider's Retry-After
    └── TerminalError             do not retry: validation, auth, not found, duplicate
        └── AmountLimitError      an amount the provider cannot represent, found before any call

Retry code checks these markers, never a list of SDK exception classes. Every error carries the
provider's message and request id, which show in ``str(error)``.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """A failure reported by a billing system or found before calling it.

    Args:
        message: The provider's own message (or ours, before any call).
        request_id: The provider's request id, when it sent one.
        status: The HTTP status, when there was one.
        code: The provider's error code (``lock_timeout``, ``6240``, ...).
    """

    retriable = False

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.message = message
        self.request_id = request_id
        self.status = status
        self.code = code
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.message]
        details = [
            f"HTTP {self.status}" if self.status else None,
            f"code {self.code}" if self.code else None,
            f"request {self.request_id}" if self.request_id else None,
        ]
        shown = ", ".join(d for d in details if d)
        return f"{parts[0]} ({shown})" if shown else parts[0]


class TransientError(DeliveryError):
    """Worth retrying with the same idempotency key.

    Args:
        retry_after: Seconds the provider asked us to wait, if it said.
    """

    retriable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class RateLimitedError(TransientError):
    """The provider throttled us; the whole account should slow down."""


class TerminalError(DeliveryError):
    """Retrying cannot help; fix the cause (or the data) first."""


class AmountLimitError(TerminalError):
    """An amount the provider cannot represent; found before any call is made."""
