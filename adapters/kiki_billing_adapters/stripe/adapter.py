"""The Stripe adapter: customer, draft, one invoice item per line, finalize, collect.

The ``stripe`` package is imported only when a request is sent or an error classified, so
``kiki-billing`` works without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, cast

from kiki_billing.plugin import (
    AmountLimitError,
    BillingAdapter,
    Correction,
    CorrectionAction,
    DeliveryError,
    Invoice,
    InvoiceLine,
    PaymentState,
    RateLimit,
    RateWindow,
    RemoteInvoice,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
    WebhookEvent,
)

from .errors import classify_stripe_error
from .http import make_http_client
from .settings import StripeClientSettings, StripeSettings
from .webhooks import read_stripe_event, verify_stripe_signature
from .wire import (
    CUSTOMER_ID,
    DEFAULT_CONCURRENCY,
    INVOICE_ID,
    INVOICE_NUMBER,
    INVOICE_STATUS,
    LIST_PAGE_SIZE,
    LIVE_RATE,
    MAX_AMOUNT_MINOR,
    MAX_CUSTOMER_EMAIL,
    MAX_CUSTOMER_NAME,
    MAX_INVOICE_DESCRIPTION,
    MAX_INVOICE_ITEMS,
    MAX_ITEM_DESCRIPTION,
    TEST_RATE,
    carries,
    credit_parts,
    customer_search_query,
    invoice_description,
    invoice_search_query,
    invoice_total_minor,
    is_credit_part,
    line_item_ref,
    period_search_query,
    stripe_amount,
    to_remote_invoice,
    to_stripe_credit_note,
    to_stripe_customer,
    to_stripe_finalize,
    to_stripe_invoice,
    to_stripe_invoice_item,
)

if TYPE_CHECKING:
    from stripe import StripeClient

StripeStep = Step[StripeClientSettings]
StripeContext = StepContext[StripeClientSettings]


class StripeAdapter(BillingAdapter[StripeSettings, StripeClientSettings]):
    """Stripe invoices: customer, draft, one invoice item per line, finalize, collect."""

    name = "stripe"
    description = "Stripe Invoicing (one-off invoices with invoice items)"
    extra = "stripe"
    requires = ("stripe",)
    client_refs = (CUSTOMER_ID,)
    defaults_tables = ()
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        (RateWindow(int(LIVE_RATE), 1.0),), concurrency=DEFAULT_CONCURRENCY
    )

    def __init__(self, settings: StripeSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._account = settings.account_id
        self._client: StripeClient | None = None
        self._lock = threading.Lock()

    # -- account and limits -----------------------------------------------------------------

    @property
    def account(self) -> str:
        """``test:``/``live:`` plus ``KIKI_STRIPE_ACCOUNT`` or a fingerprint of the key."""
        return self._account

    def published_rate_limit(self) -> RateLimit:
        """25 req/s for test keys, 100 for live (Stripe's published limits), 10 in flight."""
        rate = TEST_RATE if self.settings.test_mode else LIVE_RATE
        return RateLimit((RateWindow(int(rate), 1.0),), concurrency=DEFAULT_CONCURRENCY)

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
                settings = self.settings
                # NOTE: max_network_retries=0: retries live in the hub, with the same key.
                self._client = stripe.StripeClient(
                    settings.api_key.get_secret_value(),
                    base_addresses={"api": settings.api_base},
                    max_network_retries=0,
                    stripe_version=settings.api_version,
                    http_client=make_http_client(stripe, settings.api_base),
                )
            return self._client

    def close(self) -> None:
        """Drop the SDK client and its HTTP session."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            requestor = getattr(client, "_requestor", None)
            http = getattr(requestor, "_client", None)
            close = getattr(http, "close", None)
            if callable(close):
                close()

    # -- validation -------------------------------------------------------------------------

    def validate(self, invoice: Invoice, client: StripeClientSettings) -> None:
        """Refuse what Stripe would refuse, before any call.

        Raises:
            AmountLimitError: An amount or the total Stripe cannot represent.
            TerminalError: More than 250 lines, or a text over Stripe's length limits.
        """
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

    def steps(self, invoice: Invoice, client: StripeClientSettings) -> Sequence[StripeStep]:
        """customer, draft, ``line-<n>`` per line, finalize, and collect unless ``auto``."""
        steps: list[StripeStep] = [
            Step(
                "customer",
                request=lambda ctx: StepRequest(
                    "POST", "/v1/customers", to_stripe_customer(ctx.invoice)
                ),
                send=self._send_customer,
                lookup=self._lookup_customer,
                skip=_skip_customer,
            ),
            Step(
                "draft",
                request=lambda ctx: StepRequest(
                    "POST",
                    "/v1/invoices",
                    to_stripe_invoice(
                        ctx.invoice, ctx.client, ctx.refs.get(CUSTOMER_ID, "{customer_id}")
                    ),
                ),
                send=self._send_draft,
                lookup=self._lookup_draft,
                new_under="customer",
            ),
        ]
        for line in invoice.lines:
            steps.append(
                Step(
                    f"line-{line.line_no}",
                    request=partial(_line_request, line=line),
                    send=partial(self._send_line, line=line),
                    lookup=partial(self._lookup_line, line=line),
                    new_under="draft",
                )
            )
        steps.append(
            Step(
                "finalize",
                request=lambda ctx: StepRequest(
                    "POST",
                    _fill("/v1/invoices/{invoice_id}/finalize", ctx.refs),
                    to_stripe_finalize(ctx.client),
                ),
                send=self._send_finalize,
                lookup=self._lookup_finalize,
                new_under="draft",
            )
        )
        # NOTE: with collection "auto", finalize sets auto_advance=true and Stripe charges and
        # retries by itself (its Smart Retries), so there is nothing for the hub to collect.
        if client.collection != "auto":
            action = "pay" if client.collection == "now" else "send"
            steps.append(
                Step(
                    "collect",
                    request=lambda ctx: StepRequest(
                        "POST", _fill(f"/v1/invoices/{{invoice_id}}/{action}", ctx.refs), {}
                    ),
                    send=self._send_collect,
                    lookup=self._lookup_collect,
                    new_under="draft",
                    skip=_skip_collect,
                )
            )
        return steps

    def _send(self, ctx: StripeContext, request: StepRequest) -> dict[str, Any]:
        """Send the step's request as built, under its key; Stripe's answer as plain JSON.

        The SDK encodes, signs and classifies as for its typed services (the same bytes on the
        wire), without building a StripeObject tree from every answer (profiled: a fifth of
        the hub's CPU per invoice went there).
        """
        if "{" in request.path:
            raise TerminalError(f"{request.path}: an id of an earlier step is missing")
        clash = RAW_REQUEST_OPTIONS.intersection(request.payload)
        if clash:  # raw_request would take these as its own options, not Stripe parameters
            raise TerminalError(f"{request.path}: parameters {sorted(clash)} cannot be sent")
        response = self.client.raw_request(
            request.method.lower(),
            request.path,
            idempotency_key=ctx.idempotency_key,
            **dict(request.payload),
        )
        return cast(dict[str, Any], response.data)

    # customer

    def _lookup_customer(self, ctx: StripeContext) -> Mapping[str, str] | None:
        # NOTE: Search is not read-after-write (a customer can take up to a minute to show);
        # a customer created moments ago is caught by the idempotency key instead.
        found = self.client.raw_request(
            "get",
            "/v1/customers/search",
            query=customer_search_query(ctx.invoice.client_id),
            limit=1,
        ).data
        for customer in found["data"]:
            return {CUSTOMER_ID: str(customer["id"])}
        return None

    def _send_customer(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        return {CUSTOMER_ID: str(self._send(ctx, request)["id"])}

    # draft

    def _send_draft(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        return {INVOICE_ID: str(self._send(ctx, request)["id"])}

    def _lookup_draft(self, ctx: StripeContext) -> Mapping[str, str] | None:
        customer_id = ctx.refs.get(CUSTOMER_ID)
        if not customer_id:
            return None
        number, revision = ctx.invoice.number, str(ctx.invoice.revision)
        # NOTE: Search is not read-after-write (PROVIDERS.md), so a draft created just before a
        # crash may not be found by /v1/invoices/search yet: list the customer's invoices. An
        # invoice for a period is never created before the period starts, so the list starts
        # there (a long-standing customer's earlier invoices are not paged through).
        since = created_since(ctx.invoice)
        pages = _paginate(
            lambda params: self.client.v1.invoices.list(
                params=cast(Any, {"customer": customer_id, "created": {"gte": since}, **params})
            ),
            ctx.throttle,
        )
        for invoice in pages:
            metadata = invoice.get("metadata") or {}
            if (
                metadata.get("kiki_invoice_number") == number
                and metadata.get("kiki_revision") == revision
            ):
                return _status_refs(invoice) | {INVOICE_ID: str(invoice["id"])}
        return None

    # lines

    def _send_line(
        self, ctx: StripeContext, request: StepRequest, *, line: InvoiceLine
    ) -> Mapping[str, str]:
        return {line_item_ref(line.line_no): str(self._send(ctx, request)["id"])}

    def _lookup_line(self, ctx: StripeContext, *, line: InvoiceLine) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        wanted = str(line.line_no)
        # NOTE: in API 2023-08-16 an invoice line of type=invoiceitem carries the invoice
        # item's metadata and its id in `invoice_item` (spec: line_item.metadata/invoice_item).
        pages = _paginate(
            lambda params: self.client.v1.invoices.line_items.list(
                invoice_id, params=cast(Any, params)
            ),
            ctx.throttle,
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

    def _send_finalize(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        return _status_refs(self._send(ctx, request))

    def _lookup_finalize(self, ctx: StripeContext) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        status = ctx.refs.get(INVOICE_STATUS)
        if status and status != "draft":  # the draft's look-up already saw it finalized
            return {INVOICE_STATUS: status}
        invoice = _plain(self.client.v1.invoices.retrieve(invoice_id))
        return None if invoice.get("status") == "draft" else _status_refs(invoice)

    # collect

    def _send_collect(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        return _status_refs(self._send(ctx, request))

    def _lookup_collect(self, ctx: StripeContext) -> Mapping[str, str] | None:
        invoice_id = ctx.refs.get(INVOICE_ID)
        if not invoice_id:
            return None
        invoice = _plain(self.client.v1.invoices.retrieve(invoice_id))
        status = invoice.get("status")
        if ctx.client.collection == "now":
            return _status_refs(invoice) if status == "paid" else None
        # NOTE: Stripe records no "sent" state on an invoice (2023-08-16 status_transitions has
        # finalized/paid/voided/uncollectible only; sending shows as an invoice.sent event).
        # An open invoice is sent (again): at worst a second email, never a second invoice.
        return _status_refs(invoice) if status in ("paid", "void", "uncollectible") else None

    # -- reading back -----------------------------------------------------------------------

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Every Stripe invoice carrying this number and revision in its metadata (read-only).

        Two reads: the recorded customer's invoices created since the period started (a list is
        read-after-write, so a just-made invoice is there), and a Search over every customer
        (a duplicate made under another customer, e.g. by a run that did not find the
        customer yet). Each page beyond the first is one more request.
        """
        found: dict[str, RemoteInvoice] = {}
        customer_id = refs.get(CUSTOMER_ID)
        if customer_id:
            since = created_since(invoice)
            listed = _paginate(
                lambda params: self.client.v1.invoices.list(
                    params=cast(Any, {"customer": customer_id, "created": {"gte": since}, **params})
                ),
                _no_throttle,
            )
            for item in listed:
                if carries(item, invoice):
                    found[str(item["id"])] = to_remote_invoice(item)
        # NOTE: Search "is not suitable for read-after-write flows": an object shows up to a
        # minute after it changed (stripe.com/docs/search). What the list above did not cover
        # (another customer) is found once Search has it; a state read here may lag that much.
        searched = _search_pages(
            lambda params: self.client.v1.invoices.search(
                params=cast(Any, {"query": invoice_search_query(invoice), **params})
            )
        )
        for item in searched:
            if carries(item, invoice) and str(item["id"]) not in found:
                found[str(item["id"])] = to_remote_invoice(item)
        return list(found.values())

    # -- webhooks (WebhookSource) -----------------------------------------------------------

    def webhook_events(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: datetime
    ) -> list[WebhookEvent]:
        """Verify ``Stripe-Signature`` on the raw body, then read the event (see webhooks.py)."""
        verify_stripe_signature(headers, body, secret, now)
        return [read_stripe_event(body)]

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every Stripe invoice whose metadata names the period (a Search, read-only).

        NOTE: Search shows an object up to a minute after it changed (stripe.com/docs/search):
        an invoice made in the last minute may be missing here.
        """
        searched = _search_pages(
            lambda params: self.client.v1.invoices.search(
                params=cast(Any, {"query": period_search_query(period), **params})
            )
        )
        return [
            to_remote_invoice(item)
            for item in searched
            if (item.get("metadata") or {}).get("kiki_invoice_number")
        ]

    def recorded_payment_state(self, refs: Mapping[str, str]) -> PaymentState | None:
        """The Stripe status the last step recorded (``paid`` after collecting at once)."""
        status = refs.get(INVOICE_STATUS)
        if status in ("draft", "open", "paid", "void", "uncollectible"):
            return PaymentState(status)
        return None

    # -- corrections --------------------------------------------------------------------------

    def correction_steps(
        self, correction: Correction, client: StripeClientSettings
    ) -> Sequence[StripeStep]:
        """Void (a draft: delete), or credit notes for what was due and what was paid.

        NOTE: Stripe voids open or uncollectible invoices only and deletes drafts ("You can only
        delete draft invoices"); a paid invoice takes credit notes (2023-08-16 spec,
        ``POST /v1/invoices/{invoice}/void``, ``DELETE /v1/invoices/{invoice}``,
        ``POST /v1/credit_notes``).
        """
        invoice_id = correction.refs.get(INVOICE_ID, "{invoice_id}")
        remote = correction.remote
        if correction.action is CorrectionAction.VOID:
            if remote is not None and remote.state is PaymentState.DRAFT:
                return [
                    Step(
                        "delete-draft",
                        request=lambda ctx: StepRequest("DELETE", f"/v1/invoices/{invoice_id}"),
                        send=self._send_delete,
                        lookup=self._lookup_deleted,
                    )
                ]
            return [
                Step(
                    "void",
                    request=lambda ctx: StepRequest("POST", f"/v1/invoices/{invoice_id}/void"),
                    send=self._send_void,
                    lookup=self._lookup_void,
                )
            ]
        return [
            Step(
                f"credit-{part}",
                request=partial(_credit_request, correction=correction, part=part, amount=amount),
                send=self._send_credit,
                lookup=partial(self._lookup_credit, correction=correction, part=part),
            )
            for part, amount in credit_parts(correction)
        ]

    def _send_void(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        voided = self.client.v1.invoices.void_invoice(
            _invoice_id(ctx), options={"idempotency_key": ctx.idempotency_key}
        )
        return {"voided_invoice_id": str(voided.id), INVOICE_STATUS: str(voided.status)}

    def _lookup_void(self, ctx: StripeContext) -> Mapping[str, str] | None:
        invoice = _plain(self.client.v1.invoices.retrieve(_invoice_id(ctx)))
        if invoice.get("status") != "void":
            return None
        return {"voided_invoice_id": str(invoice["id"]), INVOICE_STATUS: "void"}

    def _send_delete(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        import stripe

        invoice_id = _invoice_id(ctx)
        try:
            self.client.v1.invoices.delete(invoice_id)
        except stripe.InvalidRequestError as exc:
            # NOTE: DELETE takes no Idempotency-Key (Stripe reads it on POST only): a retry after
            # a lost answer finds the draft gone (404 resource_missing), which is what was asked.
            if exc.http_status != 404:
                raise
        return {"deleted_invoice_id": invoice_id}

    def _lookup_deleted(self, ctx: StripeContext) -> Mapping[str, str] | None:
        import stripe

        invoice_id = _invoice_id(ctx)
        try:
            self.client.v1.invoices.retrieve(invoice_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return {"deleted_invoice_id": invoice_id}
            raise
        # Still there: a draft is deleted now; one finalized meanwhile refuses the delete, and
        # the next run reads it open and voids it instead.
        return None

    def _send_credit(self, ctx: StripeContext, request: StepRequest) -> Mapping[str, str]:
        note = self.client.v1.credit_notes.create(
            params=cast(Any, dict(request.payload)),
            options={"idempotency_key": ctx.idempotency_key},
        )
        return {"credit_note_id": str(note.id), "credit_note_number": str(note.number or "")}

    def _lookup_credit(
        self, ctx: StripeContext, *, correction: Correction, part: str
    ) -> Mapping[str, str] | None:
        # NOTE: the list is read-after-write (Search is not), filtered on the invoice.
        pages = _paginate(
            lambda params: self.client.v1.credit_notes.list(
                params=cast(Any, {"invoice": _invoice_id(ctx), **params})
            ),
            ctx.throttle,
        )
        for note in pages:
            if is_credit_part(note, correction, part):
                return {"credit_note_id": str(note["id"]), "credit_note_number": note["number"]}
        return None

    # -- errors -----------------------------------------------------------------------------

    def classify(self, error: Exception) -> DeliveryError:
        """Map a ``stripe`` exception to a transient or terminal error (see ``errors.py``)."""
        return classify_stripe_error(error)


def created_since(invoice: Invoice) -> int:
    """Epoch seconds before which no Stripe invoice of ``invoice`` can have been created.

    The start of the period, a day early for time zones east of UTC.
    """
    start = datetime.combine(invoice.period_start, datetime.min.time(), UTC)
    return int(start.timestamp()) - 86400


def _skip_customer(ctx: StripeContext) -> Mapping[str, str] | None:
    configured = ctx.client.customer
    if configured:
        return {CUSTOMER_ID: configured}
    known = ctx.refs.get(CUSTOMER_ID)
    return {CUSTOMER_ID: known} if known else None


def _line_request(ctx: StripeContext, *, line: InvoiceLine) -> StepRequest:
    return StepRequest(
        "POST", "/v1/invoiceitems", to_stripe_invoice_item(ctx.invoice, line, ctx.refs)
    )


def _credit_request(
    ctx: StripeContext, *, correction: Correction, part: str, amount: int
) -> StepRequest:
    params = to_stripe_credit_note(
        correction, part, amount, ctx.refs.get(INVOICE_ID, "{invoice_id}")
    )
    return StepRequest("POST", "/v1/credit_notes", params)


def _skip_collect(ctx: StripeContext) -> Mapping[str, str] | None:
    # NOTE: an invoice with nothing due is marked paid when finalized; /pay and /send would
    # then fail with a 400, so there is nothing left to collect.
    if ctx.refs.get(INVOICE_STATUS) == "paid":
        return {INVOICE_STATUS: "paid"}
    return None


RAW_REQUEST_OPTIONS = frozenset(
    {
        "api_key",
        "stripe_version",
        "stripe_account",
        "stripe_context",
        "max_network_retries",
        "idempotency_key",
        "content_type",
        "headers",
        "base",
        "usage",
    }
)
"""Keyword arguments ``StripeClient.raw_request`` keeps for itself (stripe-python 16)."""


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


def _invoice_id(ctx: StripeContext) -> str:
    value = ctx.refs.get(INVOICE_ID)
    if not value:
        raise TerminalError("the Stripe step needs invoice_id, which no earlier step recorded")
    return value


def _status_refs(invoice: Mapping[str, Any]) -> dict[str, str]:
    refs = {INVOICE_ID: str(invoice["id"])}
    for ref, key in ((INVOICE_STATUS, "status"), (INVOICE_NUMBER, "number")):
        if invoice.get(key):
            refs[ref] = str(invoice[key])
    return refs


def _paginate(
    fetch: Callable[[dict[str, Any]], Any], throttle: Callable[[], object]
) -> Iterator[dict[str, Any]]:
    """Every object of a Stripe list, following ``starting_after`` cursors."""
    params: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
    while True:
        page = _plain(fetch(dict(params)))
        data = page.get("data") or []
        yield from data
        if not page.get("has_more") or not data:
            return
        throttle()  # the next page is another request of the account
        params["starting_after"] = data[-1]["id"]


def _search_pages(fetch: Callable[[dict[str, Any]], Any]) -> Iterator[dict[str, Any]]:
    """Every object of a Stripe Search, following ``next_page``."""
    params: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
    while True:
        page = _plain(fetch(dict(params)))
        yield from page.get("data") or []
        if not page.get("has_more") or not page.get("next_page"):
            return
        params["page"] = page["next_page"]


def _no_throttle() -> None:
    """A read back is no step: no step context reserves a rate-limit slot for its pages."""
