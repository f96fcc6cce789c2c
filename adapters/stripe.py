"""Stripe: one-off invoices with invoice items, via the ``stripe`` SDK (``kiki-billing[stripe]``).

The payload mappers (:func:`stripe_amount`, :func:`to_stripe_customer`,
:func:`to_stripe_invoice`, :func:`to_stripe_invoice_item`, ...) are pure; :class:`StripeAdapter`
sends what they build. The ``stripe`` package is imported only when a request is sent or an
error classified, so ``kiki-billing`` works without it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from kiki_billing.errors import InputError
from kiki_billing.hub.adapter import (
    AdapterSettings,
    BillingAdapter,
    ClientSettings,
    RateLimit,
    Step,
    StepContext,
    StepRequest,
)
from kiki_billing.hub.errors import (
    AmountLimitError,
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
)
from kiki_billing.models import Invoice, InvoiceLine
from kiki_billing.money import MONEY_CONTEXT, currency_exponent

if TYPE_CHECKING:
    from stripe import StripeClient

API_VERSION = "2023-08-16"
"""The Stripe API version we send and check our requests against (specs/stripe, 2023-08-16)."""

# NOTE: Stripe's currency rules (PROVIDERS.md, stripe.com/docs/currencies): zero-decimal
# currencies are sent in whole units, even where ISO 4217 gives them decimals (MGA, UGX).
_ZERO_DECIMALS = "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF"
ZERO_DECIMAL_CURRENCIES = frozenset(_ZERO_DECIMALS.split())
# NOTE: three-decimal currencies are sent x1000 and the last digit must be 0 (PROVIDERS.md).
_THREE_DECIMALS = "BHD JOD KWD OMR TND"
THREE_DECIMAL_CURRENCIES = frozenset(_THREE_DECIMALS.split())
# NOTE: ISK is zero-decimal in ISO 4217 but Stripe takes it with two decimals, divisible by 100.
TWO_DECIMAL_WHOLE_CURRENCIES = frozenset({"ISK"})
# NOTE: 99,999,999 minor units is Stripe's maximum amount for most currencies (PROVIDERS.md).
MAX_AMOUNT_MINOR = 99_999_999
# NOTE: Stripe caps an invoice at 250 invoice items (PROVIDERS.md).
MAX_INVOICE_ITEMS = 250
# NOTE: maxLength of description in the 2023-08-16 spec: invoice 1500, invoice item 5000;
# customer name 256 and email 512 (fake_stripe models the same limits).
MAX_INVOICE_DESCRIPTION = 1500
MAX_ITEM_DESCRIPTION = 5000
MAX_CUSTOMER_NAME = 256
MAX_CUSTOMER_EMAIL = 512
# NOTE: Stripe's published rate limits: 100 operations/s live, 25/s in test mode (PROVIDERS.md).
LIVE_RATE = 100.0
TEST_RATE = 25.0
DEFAULT_CONCURRENCY = 10
LIST_PAGE_SIZE = 100

CUSTOMER_ID = "customer_id"
INVOICE_ID = "invoice_id"
INVOICE_STATUS = "invoice_status"
INVOICE_NUMBER = "invoice_number"

Collection = Literal["auto", "now", "send_invoice"]


class StripeSettings(AdapterSettings):
    """Stripe credentials and endpoint, from ``KIKI_STRIPE_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KIKI_STRIPE_", extra="ignore", frozen=True)

    api_key: SecretStr
    """A secret or restricted key, ``sk_test_...``/``sk_live_...`` (``KIKI_STRIPE_API_KEY``)."""
    api_base: str = "https://api.stripe.com"
    """``KIKI_STRIPE_API_BASE``; a local fake in tests."""
    api_version: str = API_VERSION
    """Pinned: our requests are checked against the spec of this version."""

    @property
    def test_mode(self) -> bool:
        """Whether the key is a test-mode key (``sk_test_``/``rk_test_``)."""
        return self.api_key.get_secret_value().startswith(("sk_test_", "rk_test_"))


class StripeClientSettings(ClientSettings):
    """``[clients.stripe]``: an existing customer and how the invoice is collected.

    ``collection``: ``auto`` lets Stripe charge and retry by itself after finalizing; ``now``
    charges the customer's default payment method at once; ``send_invoice`` emails the invoice
    (due after the contract's payment terms).
    """

    customer: str | None = Field(default=None, pattern=r"^cus_[A-Za-z0-9]+$")
    collection: Collection = "auto"


# --------------------------------------------------------------------------------------------
# Payload mappers (pure)
# --------------------------------------------------------------------------------------------


def stripe_amount(amount: Decimal, currency: str) -> int:
    """Convert a major-unit amount to the integer Stripe expects for ``currency``.

    Args:
        amount: The amount in the currency's major unit (may be negative).
        currency: ISO 4217 code, any case.

    Returns:
        The amount in Stripe's minor units.

    Raises:
        AmountLimitError: The currency is unknown, the amount cannot be represented under
            Stripe's rules for the currency, or it exceeds 99,999,999 minor units.
    """
    code = currency.upper()
    if code in ZERO_DECIMAL_CURRENCIES:
        exponent = 0
    elif code in THREE_DECIMAL_CURRENCIES:
        exponent = 3
    elif code in TWO_DECIMAL_WHOLE_CURRENCIES:
        exponent = 2
    else:
        try:
            exponent = currency_exponent(code)
        except InputError as exc:
            raise AmountLimitError(exc.message) from None
    scaled = amount.scaleb(exponent, context=MONEY_CONTEXT)
    if scaled != scaled.to_integral_value():
        if code in ZERO_DECIMAL_CURRENCIES:
            raise AmountLimitError(
                f"{amount} {code}: Stripe takes {code} in whole units (zero-decimal currency)"
            )
        raise AmountLimitError(f"{amount} {code} is not a whole number of {code} minor units")
    minor = int(scaled)
    if code in THREE_DECIMAL_CURRENCIES and minor % 10:
        raise AmountLimitError(
            f"{amount} {code}: Stripe requires amounts in three-decimal currencies "
            f"({', '.join(sorted(THREE_DECIMAL_CURRENCIES))}) to end in 0 (got {minor} "
            "minor units)"
        )
    if code in TWO_DECIMAL_WHOLE_CURRENCIES and minor % 100:
        raise AmountLimitError(
            f"{amount} {code}: Stripe takes {code} with two decimals that must be 00 (divisible "
            f"by 100; got {minor})"
        )
    if abs(minor) > MAX_AMOUNT_MINOR:
        raise AmountLimitError(
            f"{amount} {code} is {minor:,} minor units; Stripe accepts at most {MAX_AMOUNT_MINOR:,}"
        )
    return minor


def collection_method(client: StripeClientSettings) -> str:
    """Stripe's ``collection_method`` for the client's collection mode."""
    return "send_invoice" if client.collection == "send_invoice" else "charge_automatically"


def customer_search_query(client_id: str) -> str:
    """The Stripe Search query that finds the client's customer by its metadata."""
    quoted = client_id.replace("\\", "\\\\").replace("'", "\\'")
    return f"metadata['kiki_client_id']:'{quoted}'"


def to_stripe_customer(invoice: Invoice) -> dict[str, Any]:
    """``POST /v1/customers`` params for the invoice's client.

    Args:
        invoice: The invoice whose client is to become a Stripe customer.

    Returns:
        ``name``, ``email`` (when known) and ``metadata[kiki_client_id]``.
    """
    params: dict[str, Any] = {"name": invoice.client_name}
    if invoice.client_email:
        params["email"] = invoice.client_email
    params["metadata"] = {"kiki_client_id": invoice.client_id}
    return params


def invoice_description(invoice: Invoice) -> str:
    """The memo shown on the Stripe invoice."""
    text = f"Profit share {invoice.period}, invoice {invoice.number}"
    return f"{text} (revision {invoice.revision})" if invoice.revision else text


def to_stripe_invoice(
    invoice: Invoice, client: StripeClientSettings, customer_id: str = "{customer_id}"
) -> dict[str, Any]:
    """``POST /v1/invoices`` params: an empty draft the hub fills and finalizes step by step.

    Args:
        invoice: The invoice.
        client: The client's Stripe settings (collection mode).
        customer_id: The Stripe customer, or the ``{customer_id}`` placeholder (dry run).

    Returns:
        The params, exactly as sent.
    """
    params: dict[str, Any] = {
        "customer": customer_id,
        "currency": invoice.currency.lower(),
        "collection_method": collection_method(client),
    }
    # NOTE: days_until_due/due_date are refused unless collection_method=send_invoice
    # (PROVIDERS.md; the 2023-08-16 spec says "Valid only for ... send_invoice").
    if client.collection == "send_invoice":
        params["days_until_due"] = invoice.payment_terms_days
    # NOTE: auto_advance=false while the hub drives the steps; otherwise Stripe finalizes the
    # draft by itself about an hour after creation, possibly before every line is on it.
    params["auto_advance"] = False
    # NOTE: "exclude" (2023-08-16 enum: exclude, include, include_and_require) keeps the
    # customer's stray pending invoice items off our invoice; we attach ours with invoice=.
    params["pending_invoice_items_behavior"] = "exclude"
    params["description"] = invoice_description(invoice)
    metadata = {
        "kiki_invoice_number": invoice.number,
        "kiki_revision": str(invoice.revision),
        "kiki_client_id": invoice.client_id,
        "kiki_content_hash": invoice.content_hash,
        "kiki_period": invoice.period,
    }
    # NOTE: an empty metadata value means "unset this key" to Stripe, so none is sent.
    params["metadata"] = {key: value for key, value in metadata.items() if value}
    return params


def to_stripe_invoice_item(
    invoice: Invoice, line: InvoiceLine, refs: Mapping[str, str]
) -> dict[str, Any]:
    """``POST /v1/invoiceitems`` params: one invoice line, attached to the draft.

    Args:
        invoice: The invoice.
        line: The line; its fee may be negative (a fee-cap adjustment).
        refs: Ids so far; ``{customer_id}``/``{invoice_id}`` placeholders stand in for missing
            ones.

    Returns:
        The params, exactly as sent.

    Raises:
        AmountLimitError: The fee cannot be sent to Stripe.
    """
    return {
        "customer": refs.get(CUSTOMER_ID, "{customer_id}"),
        "invoice": refs.get(INVOICE_ID, "{invoice_id}"),
        "amount": stripe_amount(line.fee, invoice.currency),
        "currency": invoice.currency.lower(),
        "description": line.description,
        "metadata": {"kiki_invoice_number": invoice.number, "kiki_line_no": str(line.line_no)},
    }


def to_stripe_finalize(client: StripeClientSettings) -> dict[str, Any]:
    """``POST /v1/invoices/{invoice}/finalize`` params.

    ``auto_advance=true`` (collection ``auto``) hands the open invoice to Stripe, which charges
    and retries by itself; otherwise the ``collect`` step pays or sends it.
    """
    return {"auto_advance": client.collection == "auto"}


def line_item_ref(line_no: int) -> str:
    """The ref under which a line's invoice item id is recorded."""
    return f"invoice_item_{line_no}"


def invoice_total_minor(invoice: Invoice) -> int:
    """The invoice total as Stripe will compute it: the sum of the lines in minor units.

    Raises:
        AmountLimitError: A line cannot be sent to Stripe.
    """
    return sum(stripe_amount(line.fee, invoice.currency) for line in invoice.lines)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


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


def classify_stripe_error(error: Exception, secret: str | None = None) -> DeliveryError:
    """Map a ``stripe`` SDK exception to a transient or terminal :class:`DeliveryError`.

    ``Stripe-Should-Retry`` outranks the status; then connection errors, ``lock_timeout``, 429,
    409 and 5xx are transient; every other 4xx is terminal.

    Args:
        error: What the SDK raised (or anything else a step raised).
        secret: The API key, scrubbed from the message should it appear in it.

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
        if secret:
            message = message.replace(secret, "sk_***")
        if isinstance(error, OSError):
            return TransientError(message)
        return TerminalError(message)

    raw_headers = error.headers or {}
    headers = {str(k).lower(): str(v) for k, v in dict(raw_headers).items()}
    status = error.http_status
    code = _error_code(error)
    message = error.user_message or f"Stripe {type(error).__name__}"
    if secret:
        message = message.replace(secret, "sk_***")
    details: dict[str, Any] = {
        "request_id": headers.get("request-id") or error.request_id,
        "status": status,
        "code": code,
    }
    throttled = status == 429 or isinstance(error, stripe.RateLimitError)
    retry_after = _retry_after(headers.get("retry-after"))

    # NOTE: Stripe-Should-Retry outranks the status code (stripe-python _http_client.py
    # _should_retry; PROVIDERS.md).
    should_retry = headers.get("stripe-should-retry")
    if should_retry == "false":
        return TerminalError(message, **details)
    if should_retry == "true":
        kind = RateLimitedError if throttled and code != "lock_timeout" else TransientError
        return kind(message, retry_after=retry_after, **details)
    if isinstance(error, stripe.APIConnectionError):
        return TransientError(message, **details)
    # NOTE: lock_timeout is a lock on one object (arrives as a 429), not an account-wide
    # throttle: retry it with the same key without slowing the whole account down.
    if code == "lock_timeout":
        return TransientError(message, retry_after=retry_after, **details)
    if throttled:
        return RateLimitedError(message, retry_after=retry_after, **details)
    # NOTE: 409 is "another request with this Idempotency-Key is in progress"; stripe-python
    # retries it too. The SDK raises it as a plain APIError.
    if status == 409:
        return TransientError(message, retry_after=retry_after, **details)
    # NOTE: an APIError without a status is an unreadable response (stripe-python
    # _api_requestor.py); other errors without one were raised locally by the SDK.
    if (status is not None and status >= 500) or (
        status is None and isinstance(error, stripe.APIError)
    ):
        return TransientError(message, retry_after=retry_after, **details)
    return TerminalError(message, **details)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def _plain(obj: Any) -> dict[str, Any]:
    """A Stripe object as a plain dict (a StripeObject is not a dict)."""
    if isinstance(obj, dict):
        return obj
    return cast(dict[str, Any], obj.to_dict())


def _fill(template: str, refs: Mapping[str, str]) -> str:
    """Put the known ids into a path template; unknown ones stay ``{placeholders}``."""
    for name in (CUSTOMER_ID, INVOICE_ID):
        if name in refs:
            template = template.replace("{" + name + "}", refs[name])
    return template


def _require(ctx: StepContext, name: str) -> str:
    value = ctx.refs.get(name)
    if not value:
        raise TerminalError(f"the Stripe step needs {name}, which no earlier step recorded")
    return value


class StripeAdapter(BillingAdapter):
    """Stripe invoices: customer, draft, one invoice item per line, finalize, collect."""

    name = "stripe"
    description = "Stripe Invoicing (one-off invoices with invoice items)"
    extra = "stripe"
    requires = ("stripe",)
    settings_model = StripeSettings
    client_settings_model = StripeClientSettings
    client_refs = (CUSTOMER_ID,)
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        per_second=LIVE_RATE, concurrency=DEFAULT_CONCURRENCY
    )

    def __init__(self, settings: AdapterSettings) -> None:
        if not isinstance(settings, StripeSettings):
            raise TypeError(f"StripeAdapter needs StripeSettings, got {type(settings).__name__}")
        super().__init__(settings)
        self.stripe_settings = settings
        self._client: StripeClient | None = None
        self._lock = threading.Lock()

    # -- account and limits -----------------------------------------------------------------

    @property
    def account(self) -> str:
        """``test:`` or ``live:`` plus a SHA-256 prefix of the key (never the key)."""
        key = self.stripe_settings.api_key.get_secret_value()
        mode = "test" if self.stripe_settings.test_mode else "live"
        return f"{mode}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def rate_limit(self) -> RateLimit:
        """25 req/s for test keys, 100 for live, 10 in flight; the settings override both."""
        settings = self.stripe_settings
        default = TEST_RATE if settings.test_mode else LIVE_RATE
        return RateLimit(
            per_second=settings.rate_limit or default,
            burst=self.default_rate_limit.burst,
            concurrency=settings.concurrency or DEFAULT_CONCURRENCY,
        )

    # -- SDK --------------------------------------------------------------------------------

    @property
    def client(self) -> StripeClient:
        """The SDK client, built on first use (the ``stripe`` import happens here)."""
        with self._lock:
            if self._client is None:
                import stripe

                # NOTE: telemetry headers describe earlier requests; keep them off the wire
                # and out of cassettes (PROVIDERS.md).
                stripe.enable_telemetry = False
                settings = self.stripe_settings
                # NOTE: max_network_retries=0: retries live in the hub, with the same key.
                self._client = stripe.StripeClient(
                    settings.api_key.get_secret_value(),
                    base_addresses={"api": settings.api_base.rstrip("/")},
                    max_network_retries=0,
                    stripe_version=settings.api_version,
                )
            return self._client

    def close(self) -> None:
        """Drop the SDK client (it shares stripe-python's default HTTP client)."""
        with self._lock:
            self._client = None

    # -- validation -------------------------------------------------------------------------

    def validate(self, invoice: Invoice, client: ClientSettings) -> None:
        """Refuse what Stripe would refuse, before any call.

        Raises:
            AmountLimitError: An amount or the total Stripe cannot represent.
            TerminalError: More than 250 lines, or a text over Stripe's length limits.
        """
        _client_settings(client)
        if len(invoice.lines) > MAX_INVOICE_ITEMS:
            raise TerminalError(
                f"invoice {invoice.number} has {len(invoice.lines)} lines; a Stripe invoice "
                f"takes at most {MAX_INVOICE_ITEMS} invoice items",
                code="too_many_invoice_items",
            )
        total = invoice_total_minor(invoice)
        if abs(total) > MAX_AMOUNT_MINOR:
            raise AmountLimitError(
                f"invoice {invoice.number} totals {total:,} {invoice.currency} minor units; "
                f"Stripe accepts at most {MAX_AMOUNT_MINOR:,}"
            )
        stripe_amount(invoice.total_fee, invoice.currency)
        if len(invoice_description(invoice)) > MAX_INVOICE_DESCRIPTION:
            raise TerminalError(f"invoice {invoice.number}: description too long for Stripe")
        for line in invoice.lines:
            if len(line.description) > MAX_ITEM_DESCRIPTION:
                raise TerminalError(
                    f"invoice {invoice.number} line {line.line_no}: description longer than "
                    f"Stripe's {MAX_ITEM_DESCRIPTION} characters"
                )
        if len(invoice.client_name) > MAX_CUSTOMER_NAME:
            raise TerminalError(f"client name longer than Stripe's {MAX_CUSTOMER_NAME} characters")
        if invoice.client_email and len(invoice.client_email) > MAX_CUSTOMER_EMAIL:
            raise TerminalError(
                f"client email longer than Stripe's {MAX_CUSTOMER_EMAIL} characters"
            )

    # -- steps ------------------------------------------------------------------------------

    def steps(self, invoice: Invoice, client: ClientSettings) -> Sequence[Step]:
        """customer, draft, ``line-<n>`` per line, finalize, and collect unless ``auto``."""
        settings = _client_settings(client)
        steps = [
            Step(
                "customer",
                request=lambda ctx: StepRequest(
                    "POST", "/v1/customers", to_stripe_customer(ctx.invoice)
                ),
                send=self._send_customer,
                lookup=self._lookup_customer,
                skip=self._skip_customer,
                # NOTE: _send_customer searches before it creates: two requests, two slots.
                requests=2,
            ),
            Step(
                "draft",
                request=lambda ctx: StepRequest(
                    "POST",
                    "/v1/invoices",
                    to_stripe_invoice(
                        ctx.invoice,
                        _client_settings(ctx.client),
                        ctx.refs.get(CUSTOMER_ID, "{customer_id}"),
                    ),
                ),
                send=self._send_draft,
                lookup=self._lookup_draft,
            ),
        ]
        for line in invoice.lines:
            steps.append(
                Step(
                    f"line-{line.line_no}",
                    request=partial(_line_request, line=line),
                    send=partial(self._send_line, line=line),
                    lookup=partial(self._lookup_line, line=line),
                )
            )
        steps.append(
            Step(
                "finalize",
                request=lambda ctx: StepRequest(
                    "POST",
                    _fill("/v1/invoices/{invoice_id}/finalize", ctx.refs),
                    to_stripe_finalize(_client_settings(ctx.client)),
                ),
                send=self._send_finalize,
                lookup=self._lookup_finalize,
            )
        )
        # NOTE: with collection "auto", finalize sets auto_advance=true and Stripe charges and
        # retries by itself (its Smart Retries), so there is nothing for the hub to collect.
        if settings.collection != "auto":
            action = "pay" if settings.collection == "now" else "send"
            steps.append(
                Step(
                    "collect",
                    request=lambda ctx: StepRequest(
                        "POST", _fill(f"/v1/invoices/{{invoice_id}}/{action}", ctx.refs), {}
                    ),
                    send=self._send_collect,
                    lookup=self._lookup_collect,
                    skip=_skip_collect,
                )
            )
        return steps

    # customer

    def _skip_customer(self, ctx: StepContext) -> Mapping[str, str] | None:
        configured = _client_settings(ctx.client).customer
        if configured:
            return {CUSTOMER_ID: configured}
        known = ctx.refs.get(CUSTOMER_ID)
        return {CUSTOMER_ID: known} if known else None

    def _lookup_customer(self, ctx: StepContext) -> Mapping[str, str] | None:
        # NOTE: Search is not read-after-write (a customer can take up to a minute to show);
        # a customer created moments ago is caught by the idempotency key instead.
        found = self.client.v1.customers.search(
            params={"query": customer_search_query(ctx.invoice.client_id), "limit": 1}
        )
        for customer in found.data:
            return {CUSTOMER_ID: str(customer.id)}
        return None

    def _send_customer(self, ctx: StepContext) -> Mapping[str, str]:
        found = self._lookup_customer(ctx)
        if found is not None:
            return found
        customer = self.client.v1.customers.create(
            params=cast(Any, to_stripe_customer(ctx.invoice)),
            options={"idempotency_key": ctx.idempotency_key},
        )
        return {CUSTOMER_ID: str(customer.id)}

    # draft

    def _send_draft(self, ctx: StepContext) -> Mapping[str, str]:
        params = to_stripe_invoice(
            ctx.invoice, _client_settings(ctx.client), _require(ctx, CUSTOMER_ID)
        )
        created = self.client.v1.invoices.create(
            params=cast(Any, params), options={"idempotency_key": ctx.idempotency_key}
        )
        return {INVOICE_ID: str(created.id)}

    def _lookup_draft(self, ctx: StepContext) -> Mapping[str, str] | None:
        customer_id = ctx.refs.get(CUSTOMER_ID)
        if not customer_id:
            return None
        number, revision = ctx.invoice.number, str(ctx.invoice.revision)
        # NOTE: Search is not read-after-write (PROVIDERS.md), so a draft created just before a
        # crash may not be found by /v1/invoices/search yet: list the customer's invoices.
        pages = _paginate(
            lambda params: self.client.v1.invoices.list(
                params=cast(Any, {"customer": customer_id, **params})
            )
        )
        for invoice in pages:
            metadata = invoice.get("metadata") or {}
            if (
                metadata.get("kiki_invoice_number") == number
                and metadata.get("kiki_revision") == revision
            ):
                return {INVOICE_ID: str(invoice["id"])}
        return None

    # lines

    def _send_line(self, ctx: StepContext, *, line: InvoiceLine) -> Mapping[str, str]:
        refs = {CUSTOMER_ID: _require(ctx, CUSTOMER_ID), INVOICE_ID: _require(ctx, INVOICE_ID)}
        item = self.client.v1.invoice_items.create(
            params=cast(Any, to_stripe_invoice_item(ctx.invoice, line, refs)),
            options={"idempotency_key": ctx.idempotency_key},
        )
        return {line_item_ref(line.line_no): str(item.id)}

    def _lookup_line(self, ctx: StepContext, *, line: InvoiceLine) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        wanted = str(line.line_no)
        # NOTE: in API 2023-08-16 an invoice line of type=invoiceitem carries the invoice
        # item's metadata and its id in `invoice_item` (spec: line_item.metadata/invoice_item).
        pages = _paginate(
            lambda params: self.client.v1.invoices.line_items.list(
                invoice_id, params=cast(Any, params)
            )
        )
        for item in pages:
            metadata = item.get("metadata") or {}
            if (
                metadata.get("kiki_line_no") == wanted
                and metadata.get("kiki_invoice_number") == ctx.invoice.number
            ):
                item_id = item.get("invoice_item") or item["id"]
                if isinstance(item_id, dict):
                    item_id = item_id["id"]
                return {line_item_ref(line.line_no): str(item_id)}
        return None

    # finalize

    def _send_finalize(self, ctx: StepContext) -> Mapping[str, str]:
        invoice = self.client.v1.invoices.finalize_invoice(
            _require(ctx, INVOICE_ID),
            params=cast(Any, to_stripe_finalize(_client_settings(ctx.client))),
            options={"idempotency_key": ctx.idempotency_key},
        )
        return _status_refs(_plain(invoice))

    def _lookup_finalize(self, ctx: StepContext) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        invoice = _plain(self.client.v1.invoices.retrieve(invoice_id))
        return None if invoice.get("status") == "draft" else _status_refs(invoice)

    # collect

    def _send_collect(self, ctx: StepContext) -> Mapping[str, str]:
        invoice_id = _require(ctx, INVOICE_ID)
        options: Any = {"idempotency_key": ctx.idempotency_key}
        if _client_settings(ctx.client).collection == "now":
            invoice = self.client.v1.invoices.pay(invoice_id, params={}, options=options)
        else:
            invoice = self.client.v1.invoices.send_invoice(invoice_id, params={}, options=options)
        return _status_refs(_plain(invoice))

    def _lookup_collect(self, ctx: StepContext) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        invoice = _plain(self.client.v1.invoices.retrieve(invoice_id))
        status = invoice.get("status")
        if _client_settings(ctx.client).collection == "now":
            return _status_refs(invoice) if status == "paid" else None
        # NOTE: Stripe records no "sent" state on an invoice (2023-08-16 status_transitions has
        # finalized/paid/voided/uncollectible only; sending shows as an invoice.sent event).
        # An open invoice is sent (again): at worst a second email, never a second invoice.
        return _status_refs(invoice) if status in ("paid", "void", "uncollectible") else None

    # -- errors -----------------------------------------------------------------------------

    def classify(self, error: Exception) -> DeliveryError:
        """Map a ``stripe`` exception to a transient or terminal error (see module notes)."""
        return classify_stripe_error(error, self.stripe_settings.api_key.get_secret_value())


def _client_settings(client: ClientSettings) -> StripeClientSettings:
    if isinstance(client, StripeClientSettings):
        return client
    return StripeClientSettings.model_validate(client.model_dump())


def _line_request(ctx: StepContext, *, line: InvoiceLine) -> StepRequest:
    return StepRequest(
        "POST", "/v1/invoiceitems", to_stripe_invoice_item(ctx.invoice, line, ctx.refs)
    )


def _skip_collect(ctx: StepContext) -> Mapping[str, str] | None:
    # NOTE: an invoice with nothing due is marked paid when finalized; /pay and /send would
    # then fail with a 400, so there is nothing left to collect.
    if ctx.refs.get(INVOICE_STATUS) == "paid":
        return {INVOICE_STATUS: "paid"}
    return None


def _status_refs(invoice: Mapping[str, Any]) -> dict[str, str]:
    refs = {INVOICE_ID: str(invoice["id"])}
    for ref, key in ((INVOICE_STATUS, "status"), (INVOICE_NUMBER, "number")):
        if invoice.get(key):
            refs[ref] = str(invoice[key])
    return refs


def _paginate(fetch: Callable[[dict[str, Any]], Any]) -> Iterator[dict[str, Any]]:
    """Every object of a Stripe list, following ``starting_after`` cursors."""
    params: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
    while True:
        page = _plain(fetch(dict(params)))
        data = page.get("data") or []
        yield from data
        if not page.get("has_more") or not data:
            return
        params["starting_after"] = data[-1]["id"]
