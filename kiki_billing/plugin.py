"""The adapter API: everything a billing-system adapter imports, from this one module.

An adapter turns an :class:`Invoice` into a sequence of :class:`Step` s (find or create the
customer, create the invoice, add its lines, finalize, collect). Each step builds its request
with a pure mapper (:attr:`Step.request`), and :attr:`Step.send` sends exactly that request
through the provider's SDK. The hub owns everything around a step: the idempotency key,
look-ups by natural key, retries, rate limits, the circuit breaker, credentials and the ledger.
An adapter never sleeps, never retries and never writes the ledger.

A third-party adapter imports from here and nothing else of ``kiki_billing``::

    from kiki_billing.plugin import AdapterSettings, BillingAdapter, ClientSettings, Step

    class AcmeAdapter(BillingAdapter[AcmeSettings, AcmeClient]):
        name = "acme"
        def steps(self, invoice, client): ...
        def classify(self, error): ...

Errors an adapter reports (:meth:`BillingAdapter.classify` returns one)::

    DeliveryError                 every failure an adapter reports
    ├── TransientError            retry with the same idempotency key (network, 5xx, 409 lock)
    │   ├── RateLimitedError      429 / throttled: the whole account slows down
    │   └── CredentialsExpired    401 on a token that can be refreshed: one retry, then terminal
    └── TerminalError             do not retry: validation, auth, not found, duplicate
        └── AmountLimitError      an amount the provider cannot represent, found before any call

Retry code checks these markers, never a list of SDK exception classes. Every error carries the
provider's message and request id, which show in ``str(error)``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import (
    Any,
    ClassVar,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    final,
    get_args,
    get_origin,
    runtime_checkable,
)
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.models import Invoice, InvoiceLine, LineKind, revision_number
from kiki_billing.money import MONEY_CONTEXT, currency_exponent, format_money, to_minor_units

__all__ = [
    "MONEY_CONTEXT",
    "AdapterSettings",
    "AmountLimitError",
    "BillingAdapter",
    "ClientSettings",
    "ConfigurationError",
    "Correction",
    "CorrectionAction",
    "CredentialStore",
    "CredentialsExpired",
    "DeliveryError",
    "InputError",
    "Invoice",
    "InvoiceLine",
    "LineKind",
    "MemoryCredentialStore",
    "NoClientSettings",
    "OAuthConnect",
    "PaymentState",
    "RateLimit",
    "RateLimitedError",
    "RateWindow",
    "RemoteInvoice",
    "SecretStr",
    "Step",
    "StepContext",
    "StepRequest",
    "TerminalError",
    "TransientError",
    "WebhookEvent",
    "WebhookRejected",
    "WebhookSource",
    "classify_http_status",
    "credit_note_number",
    "currency_exponent",
    "format_money",
    "hmac_sha256_matches",
    "parse_rate_limit",
    "parse_retry_after",
    "revision_number",
    "scrub_secrets",
    "secret_forms",
    "to_minor_units",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


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
        details = [
            f"HTTP {self.status}" if self.status else None,
            f"code {self.code}" if self.code else None,
            f"request {self.request_id}" if self.request_id else None,
        ]
        shown = ", ".join(d for d in details if d)
        return f"{self.message} ({shown})" if shown else self.message

    def scrubbed(self, secrets: Iterable[str]) -> DeliveryError:
        """This error with every form of every secret removed from its message."""
        clean = scrub_secrets(self.message, secrets)
        if clean != self.message:
            self.message = clean
            self.args = (str(self),)
        return self


class TransientError(DeliveryError):
    """Worth retrying with the same idempotency key.

    Args:
        retry_after: Seconds the provider asked us to wait, if it said.
    """

    retriable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, request_id=request_id, status=status, code=code)


class RateLimitedError(TransientError):
    """The provider throttled the account: every request of the account slows down.

    Args:
        window: Which of the provider's limits was hit, when it says (``second``, ``minute``,
            ``day``, ``concurrent``); a ``day`` limit defers the account's deliveries.
    """

    def __init__(
        self,
        message: str,
        *,
        window: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.window = window
        super().__init__(
            message, retry_after=retry_after, request_id=request_id, status=status, code=code
        )


class CredentialsExpired(TransientError):
    """The provider refused an access token that a refresh may renew (HTTP 401).

    The hub retries the step once at once; the adapter refreshes before that attempt. A second
    401 in a row is terminal.
    """


class TerminalError(DeliveryError):
    """Retrying cannot help; fix the cause (or the data) first."""


class AmountLimitError(TerminalError):
    """An amount the provider cannot represent; found before any call is made."""


# --------------------------------------------------------------------------------------------
# Helpers every HTTP adapter needs
# --------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: The header's value, or ``None``.
        now: The current time (tests); default: the clock.

    Returns:
        Non-negative seconds, or ``None`` when the header is absent or unreadable.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# NOTE: RFC 9110: 408 Request Timeout, 425 Too Early and 429 are worth retrying; 409 is a
# conflict that several providers use for "the same key is in flight" (Stripe, Zuora REST).
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def classify_http_status(
    status: int | None,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    code: str | None = None,
) -> DeliveryError:
    """The common classification of an HTTP outcome.

    ``None`` (no response: a connection error, a timeout), 408, 409, 425 and 5xx are transient;
    429 is rate limited (with ``Retry-After`` when sent); every other 4xx is terminal.
    Provider-specific rules (a retry hint header, a throttling code in a 400 body) go first in
    the adapter's own ``classify``.

    Args:
        status: The HTTP status, or ``None`` when no response arrived.
        message: The provider's message.
        headers: The response headers (any case).
        request_id: The provider's request id.
        code: The provider's error code.

    Returns:
        The classified error.
    """
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    retry_after = parse_retry_after(lowered.get("retry-after"))
    details: dict[str, Any] = {"request_id": request_id, "status": status, "code": code}
    if status == 429:
        return RateLimitedError(message, retry_after=retry_after, **details)
    if status is None or status in _TRANSIENT_STATUSES or status >= 500:
        return TransientError(message, retry_after=retry_after, **details)
    return TerminalError(message, **details)


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` that could reach a log: raw, ``repr``, JSON, URL-encoded."""
    if not secret:
        return set()
    forms = {
        secret,
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        quote(secret),
    }
    import json

    forms.add(json.dumps(secret)[1:-1])
    return {form for form in forms if form}


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of every secret (see :func:`secret_forms`) replaced by ``***``."""
    forms = sorted({form for secret in secrets for form in secret_forms(secret)}, key=len)
    for form in reversed(forms):  # longest first, so a form inside another goes with it
        text = text.replace(form, "***")
    return text


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0}
_UNITS |= {"hour": 3600.0, "d": 86400.0, "day": 86400.0}
_WINDOW_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}


@dataclass(frozen=True)
class RateWindow:
    """At most ``requests`` requests in any interval of ``seconds`` seconds."""

    requests: int
    seconds: float

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.seconds > 0:
            raise ValueError("a rate window needs at least 1 request in a positive interval")

    @property
    def name(self) -> str:
        """``second``, ``minute``, ``day``, or the interval in seconds."""
        return _WINDOW_NAMES.get(self.seconds, f"{self.seconds:g}s")

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}.get(self.seconds)
        return f"{self.requests}/{unit}" if unit else f"{self.requests}/{self.seconds:g}s"


@dataclass(frozen=True)
class RateLimit:
    """A provider's published limits for one account: windows and requests in flight."""

    windows: tuple[RateWindow, ...]
    concurrency: int = 4

    @classmethod
    def per_second(cls, rate: float, concurrency: int = 4) -> RateLimit:
        """``rate`` requests per second (a fractional rate becomes a longer window)."""
        if rate >= 1:
            return cls((RateWindow(round(rate), 1.0),), concurrency)
        return cls((RateWindow(1, 1.0 / rate),), concurrency)

    def __str__(self) -> str:
        return ", ".join(str(w) for w in self.windows) + f", {self.concurrency} in flight"


def parse_rate_limit(text: str) -> tuple[RateWindow, ...]:
    """Windows from ``"100"`` (per second), ``"10/s,500/min"`` or ``"5000/day"``.

    Raises:
        ValueError: Not of that form, or a count below 1.
    """
    windows = []
    for part in text.split(","):
        item = part.strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:/\s*(\d*)\s*([a-z]+))?", item)
        if not match:
            raise ValueError("is not a rate like 100/s, 500/min or 5000/day")
        count, multiple, unit = match.groups()
        seconds = _UNITS.get(unit or "s")
        if seconds is None:
            raise ValueError("has an unknown unit (use s, min, h or day)")
        seconds *= int(multiple) if multiple else 1
        rate = float(count)
        if rate <= 0:
            raise ValueError("a rate must be positive")
        if rate < 1 and unit in (None, "s", "sec", "second"):
            windows.append(RateWindow(1, seconds / rate))
        elif rate != int(rate):
            raise ValueError("needs a whole number of requests per minute, hour or day")
        else:
            windows.append(RateWindow(int(rate), seconds))
    return tuple(sorted(windows, key=lambda w: w.seconds))


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class AdapterSettings(BaseSettings):
    """Credentials, endpoint and limits of one adapter, from ``KIKI_<ADAPTER>_*`` variables.

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="KIKI_<ADAPTER>_")`` and hold
    secrets as :class:`SecretStr`, so they never reach a log or an exception.
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    rate_limit: str | None = None
    """``KIKI_<ADAPTER>_RATE_LIMIT``: ``100`` (per second) or windows ``10/s,500/min,5000/day``."""
    concurrency: int | None = Field(default=None, ge=1, le=1000)
    """``KIKI_<ADAPTER>_CONCURRENCY``: requests in flight per account."""

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value


class ClientSettings(BaseModel):
    """Per-client settings of one target (``[clients.<adapter>]`` in the contracts file)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class NoClientSettings(ClientSettings):
    """An adapter without per-client settings."""


# --------------------------------------------------------------------------------------------
# Credentials that rotate
# --------------------------------------------------------------------------------------------


class CredentialStore(Protocol):
    """Tokens of one provider account, kept by the hub (in the ledger database).

    An OAuth adapter keeps its rotating refresh token and current access token here. Every
    change runs under the account's lock, across threads and processes, and is stored before
    :meth:`update` returns, so a process killed right after a refresh never strands the
    account, and two processes never spend the same single-use refresh token.
    """

    def load(self) -> Mapping[str, str]:
        """The stored values (empty when nothing was stored yet)."""
        ...

    def update(
        self, change: Callable[[Mapping[str, str]], Mapping[str, str] | None]
    ) -> Mapping[str, str]:
        """Under the account's lock, call ``change(current)``; store what it returns.

        ``change`` returns ``None`` when nothing needs to change (another process refreshed
        already), or the new values, which are stored before this returns them.
        """
        ...


class MemoryCredentialStore:
    """A :class:`CredentialStore` in memory, for tests and commands without a ledger."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        import threading

        self._values: dict[str, str] = dict(values or {})
        self._lock = threading.Lock()

    def load(self) -> Mapping[str, str]:
        """The stored values."""
        with self._lock:
            return dict(self._values)

    def update(
        self, change: Callable[[Mapping[str, str]], Mapping[str, str] | None]
    ) -> Mapping[str, str]:
        """Call ``change`` under the lock and keep what it returns."""
        with self._lock:
            new = change(dict(self._values))
            if new is not None:
                self._values = dict(new)
            return dict(self._values)


@runtime_checkable
class OAuthConnect(Protocol):
    """An adapter whose first refresh token comes from OAuth's authorization-code flow.

    ``kiki-billing connect <target>`` serves a redirect on 127.0.0.1, sends the user to
    :meth:`authorization_url`, and hands the redirect's query to
    :meth:`complete_authorization`, which exchanges the code and keeps the tokens in
    :attr:`BillingAdapter.credentials`.
    """

    def authorization_url(self, redirect_uri: str, state: str) -> str:
        """Where the user grants access (the provider's consent page)."""
        ...

    def complete_authorization(self, callback: Mapping[str, str], redirect_uri: str) -> str:
        """Exchange the callback's code for tokens and store them.

        Args:
            callback: The redirect's query parameters (``code``, ``state`` checked by the
                caller, provider extras such as QuickBooks' ``realmId``).
            redirect_uri: The redirect URI used in :meth:`authorization_url`.

        Returns:
            What was connected, for the user (``realm 123``, ``tenant Acme Ltd``); no secret.

        Raises:
            ConfigurationError: The provider refused the code, or the callback names another
                account than the settings do.
        """
        ...


# --------------------------------------------------------------------------------------------
# Reading back what the provider holds: payment states, invoices, webhooks
# --------------------------------------------------------------------------------------------


class PaymentState(StrEnum):
    """Where an invoice stands at the provider, in the hub's words."""

    DRAFT = "draft"
    """Created but not issued to the customer yet."""
    OPEN = "open"
    """Issued; nothing paid yet."""
    PARTLY_PAID = "partly_paid"
    PAID = "paid"
    PAYMENT_FAILED = "payment_failed"
    """A collection attempt failed; still open."""
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"


@dataclass(frozen=True)
class RemoteInvoice:
    """One invoice as the provider holds it (read-only), for status sync and reconciliation.

    Attributes:
        refs: The provider's ids (``invoice_id``, ...), as the adapter records them.
        kiki_number: Our invoice number the object carries (metadata, DocNumber, ...).
        kiki_revision: Our revision it carries, when the provider keeps one.
        number: The provider's own invoice number, if any.
        currency: ISO 4217, upper case.
        total: The invoice total in the currency's major unit, as the provider computed it.
        amount_paid: What has been paid of it.
        state: Its payment state.
        due_date: When it is due, if the provider keeps one.
    """

    refs: Mapping[str, str]
    kiki_number: str | None
    kiki_revision: int | None
    number: str | None
    currency: str
    total: Decimal
    amount_paid: Decimal
    state: PaymentState
    due_date: date | None = None


@dataclass(frozen=True)
class WebhookEvent:
    """One event a provider pushed, read from a verified webhook.

    Attributes:
        event_id: The provider's id of the event (stored once: a replay changes nothing).
        event_type: The provider's name for it (``invoice.paid``, ``Invoice.Update``).
        refs: The provider ids it names (``invoice_id``), to find the delivery in the ledger.
        state: The payment state it reports, or ``None`` when it names ids only (QuickBooks,
            Xero): the hub then reads the invoice with :meth:`BillingAdapter.remote_invoices`.
        kiki_number: Our invoice number, when the event carries it.
        kiki_revision: Our revision, when the event carries it.
        occurred_at: When it happened at the provider.
        account: The provider account it belongs to, in :attr:`BillingAdapter.account`'s form,
            when it says (an event of another account is ignored).
        amount_paid: What is paid of the invoice (major units), when the event says.

    An event that is not about an invoice (a customer changed) has empty ``refs``: the hub
    answers it and changes nothing.
    """

    event_id: str
    event_type: str
    refs: Mapping[str, str]
    state: PaymentState | None = None
    kiki_number: str | None = None
    kiki_revision: int | None = None
    occurred_at: datetime | None = None
    account: str | None = None
    amount_paid: Decimal | None = None


class WebhookRejected(Exception):
    """A webhook that fails verification: a wrong signature, a stale timestamp, a bad body.

    Args:
        message: Why, for the log (never a secret).
        status: The HTTP status the provider expects for this rejection (400, or 401 for
            Xero's intent-to-receive check).
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


def hmac_sha256_matches(
    secret: str, message: bytes, presented: str, *, encoding: Literal["base64", "hex"]
) -> bool:
    """Whether ``presented`` is the HMAC-SHA256 of ``message`` under ``secret``.

    Compared in constant time; a malformed ``presented`` (not base64 or hex) never matches.

    Args:
        secret: The signing secret (UTF-8).
        message: The signed bytes (the raw body, or what the provider signs around it).
        presented: The signature as the provider sent it.
        encoding: How the provider encodes the digest.
    """
    import base64
    import binascii
    import hashlib
    import hmac

    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    text = presented.strip()
    try:
        if encoding == "base64":
            given = base64.b64decode(text.encode("ascii"), validate=True)
        else:
            given = bytes.fromhex(text)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(digest, given)


@runtime_checkable
class WebhookSource(Protocol):
    """An adapter that verifies and reads its provider's webhooks.

    ``kiki-billing webhooks serve`` passes the raw body and headers of each request to
    :meth:`webhook_events` with the secret from ``KIKI_<ADAPTER>_WEBHOOK_SECRET``.
    """

    def webhook_events(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: datetime
    ) -> list[WebhookEvent]:
        """Verify the signature on the raw body, then read its events (possibly none).

        Raises:
            WebhookRejected: The signature, timestamp or body does not verify.
        """
        ...


# --------------------------------------------------------------------------------------------
# Corrections: a superseded revision voided or credited before its successor is pushed
# --------------------------------------------------------------------------------------------


class CorrectionAction(StrEnum):
    """What the hub does upstream with a revision that a newer one supersedes."""

    VOID = "void"
    """Nothing was paid: void it (cancel it, delete a draft) so nothing of it is owed."""
    CREDIT = "credit"
    """Something was paid: a credit note for its whole total, set against what is still due;
    what was paid stays with the customer as a credit balance (never a negative invoice)."""
    NONE = "none"
    """Nothing to do: it never reached the provider, is gone, or is void already."""


@dataclass(frozen=True)
class Correction:
    """One superseded revision at one target, and what the hub decided to do with it.

    The hub decides from the provider's own view (:meth:`BillingAdapter.remote_invoices`),
    read again on every run until the correction's steps are done; the steps'
    natural-key look-ups then find what an earlier run did, so a kill at any instant and a
    re-run give exactly one void or credit.

    Attributes:
        action: Void, credit, or nothing.
        invoice: The superseded revision, as the ledger recorded it.
        replacement: The revision that supersedes it (the delivery being pushed).
        remote: The superseded revision as the provider holds it (``None`` for ``NONE``).
        refs: The ids recorded for the superseded revision's delivery at this target, and the
            provider's ids of the object found (``remote.refs``).
    """

    action: CorrectionAction
    invoice: Invoice
    replacement: Invoice
    remote: RemoteInvoice | None
    refs: Mapping[str, str]

    @property
    def credit_total(self) -> Decimal:
        """What a credit note credits: the whole total the provider billed."""
        return self.remote.total if self.remote is not None else self.invoice.total_fee

    @property
    def still_due(self) -> Decimal:
        """What the customer still owes on the superseded revision (total less paid)."""
        if self.remote is None:
            return Decimal(0)
        return max(self.remote.total - self.remote.amount_paid, Decimal(0))


def credit_note_number(invoice: Invoice) -> str:
    """The number of the credit note that corrects ``invoice``: its number and ``-CN``.

    ``KIKI-OaaS-202601-000042-CN`` credits revision 0, ``KIKI-OaaS-202601-000042-R1-CN``
    revision 1. A revision is credited at most once, so the number is the natural key.
    """
    return f"{invoice.document_number}-CN"


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

SettingsT = TypeVar("SettingsT", bound=AdapterSettings)
ClientT = TypeVar("ClientT", bound=ClientSettings)


@dataclass(frozen=True)
class StepRequest:
    """What a step sends: shown by ``--dry-run`` and handed to :attr:`Step.send` as is.

    Ids that earlier steps have not produced yet appear as ``{placeholders}`` (dry run only).
    ``headers`` never carries credentials: the SDK adds them.
    """

    method: str
    path: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


def _no_throttle() -> object:
    return None


@dataclass(frozen=True)
class StepContext(Generic[ClientT]):
    """What a step may use: the invoice, the client's settings, ids so far, its key.

    Attributes:
        throttle: Call it before each request a step makes beyond its first (a second page of
            a list): it takes a rate-limit slot of the account.
    """

    invoice: Invoice
    client: ClientT
    refs: Mapping[str, str]
    idempotency_key: str
    throttle: Callable[[], object] = _no_throttle


@dataclass(frozen=True)
class Step(Generic[ClientT]):
    """One write to the provider.

    Attributes:
        name: Stable name within the delivery (``customer``, ``draft``, ``line-1``, ...); part of
            the idempotency key, so renaming a step re-sends it.
        request: Builds the request from the context (pure; no I/O).
        send: Sends the request ``request`` built, with ``ctx.idempotency_key``, and returns the
            provider ids to record.
        lookup: Finds the step's object by its natural key (one request); returns its ids, or
            ``None`` when it does not exist and the step must be sent. The hub runs it before
            the first send (unless :attr:`new_under` proves it cannot exist) and after every
            unknown outcome.
        new_under: The earlier step whose object holds this one (the invoice of a line, the
            customer of an invoice). When this very delivery created that object, this one
            cannot exist yet, and the hub sends without a look-up. ``None``: always look up.
        skip: Returns ids when the step has nothing to send (a customer id is configured).
    """

    name: str
    request: Callable[[StepContext[ClientT]], StepRequest]
    send: Callable[[StepContext[ClientT], StepRequest], Mapping[str, str]]
    lookup: Callable[[StepContext[ClientT]], Mapping[str, str] | None] | None = None
    new_under: str | None = None
    skip: Callable[[StepContext[ClientT]], Mapping[str, str] | None] | None = None


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def _model_args(cls: type) -> tuple[type[AdapterSettings], type[ClientSettings]] | None:
    """The ``(settings, client settings)`` models a subclass names in its generic base."""
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, BillingAdapter):
            args = get_args(base)
            if len(args) == 2 and all(isinstance(a, type) for a in args):
                return args[0], args[1]
    return None


class BillingAdapter(ABC, Generic[SettingsT, ClientT]):
    """Base class of every billing-system adapter (built-in or third-party).

    A subclass names its settings and per-client settings models as type arguments
    (``BillingAdapter[StripeSettings, StripeClientSettings]``), declares ``name`` and
    optionally ``extra``, ``requires``, ``client_refs`` and ``default_rate_limit``, and
    implements :meth:`steps` and :meth:`classify`. It is found through the
    ``kiki_billing.adapters`` entry-point group. Methods marked ``@final`` belong to the hub.

    Args:
        settings: The adapter's settings, already validated.
        credentials: The hub's store for rotating tokens of this account.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    """The ``pip install 'kiki-billing[extra]'`` that installs the adapter's SDK."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules the adapter imports (its SDK); checked before use."""
    settings_model: ClassVar[type[AdapterSettings]] = AdapterSettings
    client_settings_model: ClassVar[type[ClientSettings]] = NoClientSettings
    defaults_tables: ClassVar[tuple[str, ...]] = ()
    """Tables of the contracts file (``exports.xero``) that give every client's defaults, in
    addition to ``[targets.<name>]``; only keys of the client settings model are taken."""
    key_carrier: ClassVar[str] = "Idempotency-Key"
    """How the hub's key travels to the provider, as ``--dry-run`` names it (``requestid``, a
    unique name); the mechanism itself is the adapter's."""
    client_refs: ClassVar[tuple[str, ...]] = ()
    """Ids that belong to the client, not the invoice (``customer_id``): reused next period."""
    default_rate_limit: ClassVar[RateLimit] = RateLimit((RateWindow(10, 1.0),), concurrency=4)
    tracks_payments: ClassVar[bool] = True
    """The billing system records payments, so the states it reads back are payment states
    (``sync-status``); a file target's read-back only says whether the file is there."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        models = _model_args(cls)
        if models is not None:
            cls.settings_model, cls.client_settings_model = models

    def __init__(self, settings: SettingsT, *, credentials: CredentialStore | None = None) -> None:
        self.settings: SettingsT = settings
        self.credentials: CredentialStore = credentials or MemoryCredentialStore()

    # What an adapter may override ------------------------------------------------------------

    @property
    def account(self) -> str:
        """The provider account the settings point at (mode and account, realm, tenant).

        Part of every delivery's identity in the ledger, and the scope of rate limits,
        breakers and credentials: the same invoice pushed to another account is another
        delivery. Never a secret (hash a key if the key is all there is).
        """
        return "default"

    def published_rate_limit(self) -> RateLimit:
        """The provider's published limit for :attr:`account` (default: the class's)."""
        return self.default_rate_limit

    def check_ready(self) -> None:
        """Refuse to start when the account cannot work at all, before anything is sent.

        Called once per run after :attr:`credentials` is bound, e.g. to find that no OAuth
        refresh token is set or stored.

        Raises:
            ConfigurationError: Naming the variable (never its value) or the command to run.
        """

    def validate(self, invoice: Invoice, client: ClientT) -> None:
        """Refuse an invoice the provider cannot take, before any call.

        Raises:
            TerminalError: E.g. an amount over the provider's limit.
        """

    @abstractmethod
    def steps(self, invoice: Invoice, client: ClientT) -> Sequence[Step[ClientT]]:
        """The writes that deliver ``invoice``, in order."""

    @abstractmethod
    def classify(self, error: Exception) -> DeliveryError:
        """Map an SDK exception to a transient or terminal :class:`DeliveryError`."""

    def close(self) -> None:
        """Release SDK resources (sessions); called once after a push."""

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Read-only: every object the provider holds for this invoice number and revision.

        One is expected; none means it is gone upstream; more than one is a duplicate. Used
        to sync payment states, to decide a correction and to reconcile. Makes as few requests
        as it can (``refs`` are the ids the ledger recorded for the delivery).

        Raises:
            NotImplementedError: The adapter cannot read its provider back.
        """
        raise NotImplementedError(f"adapter {self.name!r} cannot read invoices back")

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Read-only: every object the provider holds that carries one of our numbers of a period.

        What ``kiki-billing reconcile`` uses to find objects the ledger does not know (made
        outside kiki-billing, or by a run whose ledger was lost). Each carries
        ``kiki_number`` and ``kiki_revision`` where the provider keeps them.

        Args:
            period: ``YYYY-MM``.

        Raises:
            NotImplementedError: The adapter cannot list its provider's invoices.
        """
        raise NotImplementedError(f"adapter {self.name!r} cannot list invoices by period")

    def recorded_payment_state(self, refs: Mapping[str, str]) -> PaymentState | None:
        """The payment state the ids recorded at delivery show, or ``None`` when they show none.

        E.g. Stripe's ``paid`` after collecting at once. ``reconcile`` compares the provider's
        state with this (and with what payment syncs recorded).
        """
        return None

    def correction_steps(self, correction: Correction, client: ClientT) -> Sequence[Step[ClientT]]:
        """The writes that void or credit a superseded revision (:class:`Correction`).

        Called for ``VOID`` and ``CREDIT`` only. The hub runs them before the new revision's
        own steps, each with its own deterministic key, its look-up and the ledger, exactly
        like :meth:`steps`; step names need only be unique among the correction's steps (the
        hub prefixes them with the revision). ``ctx.invoice`` is the superseded revision and
        ``ctx.refs`` starts from ``correction.refs``. Each step's look-up must find the void or
        the credit by what it carries (the credit note's number, metadata or memo), whatever
        run made it.

        Raises:
            NotImplementedError: The adapter cannot correct a revision it delivered.
        """
        raise NotImplementedError(f"adapter {self.name!r} cannot void or credit an invoice")

    def settlement_steps(self, correction: Correction, client: ClientT) -> Sequence[Step[ClientT]]:
        """Writes that set a credited revision's payment against the new revision, if any.

        Run after the new revision's own steps, for ``CREDIT`` corrections only, like
        :meth:`correction_steps` (keys, look-ups, the ledger; names prefixed by the hub), with
        ``ctx.invoice`` the new revision and ``ctx.refs`` its ids. For a provider that keeps a
        customer credit balance and applies it by itself (Stripe), or leaves it to the
        bookkeeper (a credit note's remaining credit), there is nothing to do (the default).
        """
        return ()

    # What the hub owns -----------------------------------------------------------------------

    @final
    def rate_limit(self) -> RateLimit:
        """The account's limit: ``KIKI_<ADAPTER>_RATE_LIMIT``/``_CONCURRENCY``, else published."""
        published = self.published_rate_limit()
        windows = published.windows
        if self.settings.rate_limit is not None:
            windows = parse_rate_limit(self.settings.rate_limit)
        return RateLimit(windows, self.settings.concurrency or published.concurrency)

    @final
    def secrets(self) -> list[str]:
        """The values of every secret setting, for scrubbing."""
        found = []
        for name in type(self.settings).model_fields:
            value = getattr(self.settings, name, None)
            if isinstance(value, SecretStr) and value.get_secret_value():
                found.append(value.get_secret_value())
        found.extend(v for k, v in self.credentials.load().items() if "token" in k and v)
        return found

    @final
    def classify_error(self, error: Exception) -> DeliveryError:
        """:meth:`classify`, with every secret scrubbed from the message."""
        try:
            classified = self.classify(error)
        except Exception as exc:  # a bug in classify must not lose the original error
            classified = TerminalError(f"{type(error).__name__}: {error} ({exc!r} classifying)")
        return classified.scrubbed(self.secrets())

    @final
    @classmethod
    def client_settings(
        cls, defaults: Mapping[str, Any], table: Mapping[str, Any]
    ) -> ClientSettings:
        """Validate one client's ``[clients.<name>]`` table over the contracts-file defaults.

        Args:
            defaults: Keys from :attr:`defaults_tables` and ``[targets.<name>]``; keys the
                model does not know are dropped (a defaults table may serve several targets).
            table: The client's own table: every key must be known.

        Raises:
            pydantic.ValidationError: A value is invalid or a key of ``table`` is unknown.
        """
        known = cls.client_settings_model.model_fields
        merged = {k: v for k, v in defaults.items() if k in known}
        merged.update(table)
        return cls.client_settings_model.model_validate(merged)

    @final
    @classmethod
    def read_settings(cls) -> AdapterSettings:
        """The adapter's settings from the environment.

        Raises:
            ConfigurationError: A required variable is missing or malformed; names the
                variable, never its value.
        """
        try:
            return cls.settings_model()
        except ValidationError as exc:
            prefix = str(cls.settings_model.model_config.get("env_prefix", ""))
            first = exc.errors()[0]
            variable = (prefix + "_".join(str(p) for p in first["loc"])).upper()
            if first["type"] == "missing":
                raise ConfigurationError(f"adapter {cls.name!r}: {variable} is not set") from None
            reason = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigurationError(
                f"adapter {cls.name!r}: {variable} is invalid: {reason}"
            ) from None


# --------------------------------------------------------------------------------------------
# Setting validators every adapter needs
# --------------------------------------------------------------------------------------------

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def check_api_base(value: str) -> str:
    """An API base URL: ``https://``, or ``http://`` only for this machine (a local fake).

    Raises:
        ValueError: Not an absolute http(s) URL, or plain HTTP to another host (credentials
            would cross the network in clear text). The message never repeats the value.
    """
    from urllib.parse import urlsplit

    text = value.strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        raise ValueError("is not a URL") from None
    if parts.scheme not in ("http", "https") or not host or text != value or " " in text:
        raise ValueError("is not an absolute http(s) URL")
    if parts.scheme == "http" and host not in _LOCAL_HOSTS:
        raise ValueError("uses plain http to a remote host; use https")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; use the adapter's secret settings")
    return text.rstrip("/")


def check_secret(value: SecretStr) -> SecretStr:
    """A credential: not empty, no whitespace or control characters anywhere.

    Raises:
        ValueError: The message never repeats the value.
    """
    secret = value.get_secret_value()
    if not secret:
        raise ValueError("is empty")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in secret):
        raise ValueError("contains whitespace or a control character (a pasted newline?)")
    return value


def check_refresh_token(
    adapter: str, setting: str, configured: object | None, credentials: CredentialStore
) -> None:
    """For an OAuth adapter's ``check_ready``: a refresh token is configured or stored.

    Args:
        adapter: The adapter's name (``kiki-billing connect <adapter>`` stores one).
        setting: The variable that configures one (``KIKI_XERO_REFRESH_TOKEN``).
        configured: Its value, ``None`` when unset.
        credentials: The account's credential store.

    Raises:
        ConfigurationError: Neither is there, so no request could be authorized.
    """
    if configured is None and not credentials.load().get("refresh_token"):
        raise ConfigurationError(
            f"adapter {adapter!r}: {setting} is not set and no token is stored: run "
            f"`kiki-billing connect {adapter}`, or set {setting}"
        )


__all__ += ["check_api_base", "check_refresh_token", "check_secret"]
