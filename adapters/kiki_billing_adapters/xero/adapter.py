"""The Xero adapter: find or create the contact, then create the ACCREC invoice.

It speaks Xero's Accounting API over plain HTTP (``requests``), not through ``xero-python``:
the SDK writes ``Decimal`` amounts as floats and dates as ``/Date(ms)/``, refreshes an expired
token by itself before a call (outside the hub's credential lock, spending the single-use
refresh token where another process may spend it too), and lets urllib3 re-send a PUT whose
answer was lost. Here every attempt is exactly one request, amounts go out as exact decimal
text, and the tokens are refreshed only through the hub's credential store.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlencode

from kiki_billing.plugin import (
    AmountLimitError,
    BillingAdapter,
    ConfigurationError,
    Correction,
    CorrectionAction,
    DeliveryError,
    Invoice,
    PaymentState,
    RateLimit,
    RateWindow,
    RemoteInvoice,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
    TransientError,
    WebhookEvent,
    check_refresh_token,
    credit_note_number,
)

from .errors import CORRELATION_HEADER, XeroHTTPError, classify_xero_error
from .settings import AUTHORIZE_URL, XeroClientSettings, XeroSettings
from .tokens import TIMEOUT, XeroTokens
from .webhooks import read_xero_events, verify_xero_signature
from .wire import (
    CANCELLED_STATUSES,
    CONCURRENT_LIMIT,
    CONTACT_ID,
    DAY_LIMIT,
    GONE_STATUSES,
    INVOICE_ID,
    INVOICE_NUMBER,
    INVOICE_STATUS,
    MAX_CONTACT_NAME,
    MAX_CONTACT_NUMBER,
    MAX_EMAIL,
    MAX_INVOICE_NUMBER,
    MAX_LINE_DESCRIPTION,
    MINUTE_LIMIT,
    allocations_path,
    contact_lookup_path,
    contacts_create_path,
    credit_note_lookup_path,
    credit_note_path,
    credit_notes_create_path,
    decode_json,
    element_errors,
    encode_json,
    invoice_lookup_path,
    invoice_path,
    invoices_create_path,
    number_revision,
    only_element,
    period_invoices_path,
    still_due,
    to_remote_invoice,
    to_xero_allocation,
    to_xero_contact,
    to_xero_credit_note,
    to_xero_invoice,
    to_xero_status_change,
    xero_amount,
    xero_invoice_number,
    xero_total,
)

XeroStep = Step[XeroClientSettings]
XeroContext = StepContext[XeroClientSettings]

# NOTE: offline_access yields the refresh token; accounting.transactions covers invoices and
# accounting.contacts contacts (developer.xero.com "Scopes"). No OpenID scope is asked for:
# the adapter needs no identity token, and /connections names the organisation.
SCOPES = ("offline_access", "accounting.transactions", "accounting.contacts")


class XeroAdapter(BillingAdapter[XeroSettings, XeroClientSettings]):
    """Xero sales invoices (ACCREC) for a contact found by ContactNumber or created."""

    name = "xero"
    description = "Xero Accounting API (ACCREC invoices; OAuth 2.0 with rotating tokens)"
    extra = "xero"
    requires = ()
    client_refs = (CONTACT_ID,)
    defaults_tables = ("exports.xero",)
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        (RateWindow(MINUTE_LIMIT, 60.0), RateWindow(DAY_LIMIT, 86400.0)),
        concurrency=CONCURRENT_LIMIT,
    )

    def __init__(self, settings: XeroSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._lock = threading.Lock()
        self._session: Any = None
        self.tokens = XeroTokens(settings, lambda: self.credentials, self._http)

    # -- account and limits -----------------------------------------------------------------

    @property
    def account(self) -> str:
        """The organisation's tenant id (rate limits and the ledger are per organisation)."""
        return self.settings.tenant_id

    def published_rate_limit(self) -> RateLimit:
        """60 calls a minute, 5,000 a day, 5 in flight per organisation (Xero's limits)."""
        return self.default_rate_limit

    # -- HTTP -------------------------------------------------------------------------------

    def _http(self) -> Any:
        with self._lock:
            if self._session is None:
                import requests
                from requests.adapters import HTTPAdapter

                session = requests.Session()
                # NOTE: max_retries=0 (urllib3 never re-sends, not even a PUT whose answer
                # was lost): retries live in the hub, with the same Idempotency-Key.
                pooled = HTTPAdapter(pool_connections=2, pool_maxsize=16, max_retries=0)
                session.mount("https://", pooled)
                session.mount("http://", pooled)
                self._session = session
            return self._session

    def close(self) -> None:
        """Close the HTTP session."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def _call(self, method: str, path: str, body: Any = None, key: str | None = None) -> _Answer:
        """One Accounting API request; a non-2xx answer raises :class:`XeroHTTPError`."""
        token = self.tokens.access_token()
        headers = {
            "Authorization": f"Bearer {token}",
            "xero-tenant-id": self.settings.tenant_id,
            "Accept": "application/json",
        }
        data = None
        if body is not None:
            data = encode_json(body)
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        response = self._http().request(
            method,
            self.settings.api_base + path,
            data=data,
            headers=headers,
            timeout=TIMEOUT,
            allow_redirects=False,
        )
        what = f"{method} {path.partition('?')[0]}"
        if response.status_code == 401:
            self.tokens.refused(token)
        try:
            parsed = decode_json(response.content) if response.content else None
        except ValueError:
            parsed = response.text
        if not 200 <= response.status_code < 300:
            raise XeroHTTPError(response.status_code, response.headers, parsed, what)
        if not isinstance(parsed, Mapping):
            # A 2xx whose body is lost or mangled (a proxy's page): the outcome is unknown, so
            # the hub retries with the same key and looks the object up if the key expired.
            raise TransientError(
                f"{what}: Xero answered {response.status_code} without a JSON object",
                request_id=response.headers.get(CORRELATION_HEADER),
                status=response.status_code,
            )
        return _Answer(parsed, response.headers.get(CORRELATION_HEADER))

    # -- validation -------------------------------------------------------------------------

    def check_ready(self) -> None:
        """A refresh token must be set or stored, or no request can be authorized.

        Raises:
            ConfigurationError: Neither ``KIKI_XERO_REFRESH_TOKEN`` nor a stored token.
        """
        check_refresh_token(
            self.name, "KIKI_XERO_REFRESH_TOKEN", self.settings.refresh_token, self.credentials
        )

    def validate(self, invoice: Invoice, client: XeroClientSettings) -> None:
        """Refuse what Xero would refuse or round, before any call.

        Raises:
            AmountLimitError: An amount Xero would round (three-decimal currencies), or a
                negative total (Xero takes that as a credit note, not an invoice).
            TerminalError: A text over Xero's length limits.
        """
        for line in invoice.lines:
            xero_amount(line.fee, invoice.currency)
            if len(line.description) > MAX_LINE_DESCRIPTION:
                raise TerminalError(
                    f"invoice {invoice.number} line {line.line_no}: Xero takes at most "
                    f"{MAX_LINE_DESCRIPTION} characters in a line description"
                )
        if xero_total(invoice) < 0:
            raise AmountLimitError(
                f"invoice {invoice.number} totals {invoice.total_fee} {invoice.currency}: a "
                "Xero invoice cannot total less than zero (that is a credit note)"
            )
        if len(xero_invoice_number(invoice)) > MAX_INVOICE_NUMBER:
            raise TerminalError(f"invoice number longer than Xero's {MAX_INVOICE_NUMBER}")
        if client.contact_id is None:
            limits = (
                ("client name", invoice.client_name, MAX_CONTACT_NAME),
                ("client id (the contact's ContactNumber)", invoice.client_id, MAX_CONTACT_NUMBER),
                ("client email", invoice.client_email or "", MAX_EMAIL),
            )
            for label, value, limit in limits:
                if len(value) > limit:
                    raise TerminalError(
                        f"{label} is {len(value)} characters long; Xero takes at most {limit} "
                        "for a contact (or set contact_id in [clients.xero])"
                    )

    # -- steps ------------------------------------------------------------------------------

    def steps(self, invoice: Invoice, client: XeroClientSettings) -> Sequence[XeroStep]:
        """``contact`` (found by ContactNumber, else created), then ``invoice``."""
        return [
            Step(
                "contact",
                request=lambda ctx: StepRequest(
                    "PUT", contacts_create_path(), to_xero_contact(ctx.invoice)
                ),
                send=self._send_contact,
                lookup=self._lookup_contact,
                skip=_skip_contact,
            ),
            Step(
                "invoice",
                request=lambda ctx: StepRequest(
                    "PUT",
                    invoices_create_path(),
                    to_xero_invoice(
                        ctx.invoice, ctx.client, ctx.refs.get(CONTACT_ID, "{contact_id}")
                    ),
                ),
                send=self._send_invoice,
                lookup=self._lookup_invoice,
                # NOTE: a contact this delivery created holds no invoice yet; and should an
                # invoice with our number exist elsewhere, Xero refuses the duplicate number.
                new_under="contact",
            ),
        ]

    # contact

    def _lookup_contact(self, ctx: XeroContext) -> Mapping[str, str] | None:
        answer = self._call("GET", contact_lookup_path(ctx.invoice.client_id))
        found = [
            c
            for c in answer.body.get("Contacts") or []
            if c.get("ContactNumber") == ctx.invoice.client_id
            and c.get("ContactStatus", "ACTIVE") == "ACTIVE"
        ]
        if len(found) > 1:
            raise TerminalError(
                f"{len(found)} active Xero contacts carry ContactNumber "
                f"{ctx.invoice.client_id!r}; set contact_id in [clients.xero] to choose one",
                request_id=answer.request_id,
            )
        return {CONTACT_ID: str(found[0]["ContactID"])} if found else None

    def _send_contact(self, ctx: XeroContext, request: StepRequest) -> Mapping[str, str]:
        answer = self._call(request.method, request.path, request.payload, ctx.idempotency_key)
        contact = only_element(answer.body, "Contacts")
        problems = element_errors(contact)
        if problems:
            hint = ""
            if any("already assigned" in p for p in problems):
                hint = (
                    f"; to bill that contact, set contact_id in [clients.xero] or give it "
                    f"ContactNumber {ctx.invoice.client_id!r} in Xero"
                )
            raise TerminalError(
                f"Xero refused the contact: {'; '.join(problems)}{hint}",
                request_id=answer.request_id,
                code="ValidationException",
            )
        return {CONTACT_ID: str(contact["ContactID"])}

    # invoice

    def _lookup_invoice(self, ctx: XeroContext) -> Mapping[str, str] | None:
        number = xero_invoice_number(ctx.invoice)
        answer = self._call("GET", invoice_lookup_path(number))
        found = [
            inv
            for inv in answer.body.get("Invoices") or []
            if inv.get("Type") == "ACCREC"
            and str(inv.get("InvoiceNumber", "")).casefold() == number.casefold()
        ]
        if not found:
            return None
        invoice = found[0]
        invoice_id, status = str(invoice.get("InvoiceID")), str(invoice.get("Status"))
        if status in CANCELLED_STATUSES:
            # NOTE: never twice: a voided or deleted invoice with our number means it was
            # corrected or cancelled in Xero; Xero would refuse the number anyway.
            raise TerminalError(
                f"Xero holds invoice {number} (InvoiceID {invoice_id}) as {status}: it was "
                "cancelled in Xero and is not created again; issue a new revision to bill again",
                request_id=answer.request_id,
                code=status,
            )
        self._check_same_invoice(ctx, invoice, answer.request_id)
        return {INVOICE_ID: invoice_id, INVOICE_NUMBER: number, INVOICE_STATUS: status}

    def _check_same_invoice(
        self, ctx: XeroContext, found: Mapping[str, Any], request_id: str | None
    ) -> None:
        """Refuse to adopt an invoice with our number but another currency or amount."""
        invoice = ctx.invoice
        expected = xero_total(invoice)
        # NOTE: SubTotal excludes tax, Total includes it; the line amounts we send are net of
        # tax with Exclusive and NoTax, gross with Inclusive.
        field = "Total" if ctx.client.line_amount_types == "Inclusive" else "SubTotal"
        held = found.get(field)
        currency = str(found.get("CurrencyCode", "")).upper()
        same_amount = held is not None and Decimal(str(held)) == expected
        if currency != invoice.currency.upper() or not same_amount:
            raise TerminalError(
                f"Xero already holds invoice {found.get('InvoiceNumber')} (InvoiceID "
                f"{found.get('InvoiceID')}) with {field} {held} {currency}, not {expected} "
                f"{invoice.currency.upper()}: it is not ours to adopt; check it in Xero",
                request_id=request_id,
            )

    def _send_invoice(self, ctx: XeroContext, request: StepRequest) -> Mapping[str, str]:
        if CONTACT_ID not in ctx.refs:
            raise TerminalError("the invoice step needs contact_id, which no step recorded")
        answer = self._call(request.method, request.path, request.payload, ctx.idempotency_key)
        created = only_element(answer.body, "Invoices")
        problems = element_errors(created)
        number = xero_invoice_number(ctx.invoice)
        if problems:
            raise TerminalError(
                f"Xero refused invoice {number}: {'; '.join(problems)}",
                request_id=answer.request_id,
                code="ValidationException",
            )
        return {
            INVOICE_ID: str(created["InvoiceID"]),
            INVOICE_NUMBER: str(created.get("InvoiceNumber") or number),
            INVOICE_STATUS: str(created.get("Status") or ctx.client.status),
        }

    # -- reading back -----------------------------------------------------------------------

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Every ACCREC invoice Xero holds under this revision's InvoiceNumber (read-only).

        One ``GET /Invoices?InvoiceNumbers=``: it returns the recorded invoice with any other
        carrying the number, so ``refs`` are not needed. Deleted invoices count as gone.
        """
        number = xero_invoice_number(invoice)
        answer = self._call("GET", invoice_lookup_path(number))
        return [
            to_remote_invoice(found, invoice.number)
            for found in answer.body.get("Invoices") or []
            if found.get("Type") == "ACCREC"
            and number_revision(str(found.get("InvoiceNumber", "")), invoice.number)
            == invoice.revision
            and found.get("Status") not in GONE_STATUSES
        ]

    # -- webhooks (WebhookSource) -----------------------------------------------------------

    def webhook_events(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: datetime
    ) -> list[WebhookEvent]:
        """Verify ``x-xero-signature`` on the raw body (401 if wrong), then read its events.

        An intent-to-receive request is a signed payload without events: it gets a 200.
        """
        verify_xero_signature(headers, body, secret)
        return read_xero_events(body, self.account)

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every ACCREC invoice whose number starts with the period's prefix (one read)."""
        prefix = f"KIKI-OaaS-{period.replace('-', '')}-"
        answer = self._call("GET", period_invoices_path(prefix))
        found = []
        for item in answer.body.get("Invoices") or []:
            number = str(item.get("InvoiceNumber") or "")
            if item.get("Status") in GONE_STATUSES or not number.startswith(prefix):
                continue
            found.append(to_remote_invoice(item, number.partition("-R")[0]))
        return found

    def recorded_payment_state(self, refs: Mapping[str, str]) -> PaymentState | None:
        """The invoice's Xero status the delivery recorded."""
        return {
            "DRAFT": PaymentState.DRAFT,
            "SUBMITTED": PaymentState.DRAFT,
            "AUTHORISED": PaymentState.OPEN,
            "PAID": PaymentState.PAID,
            "VOIDED": PaymentState.VOID,
        }.get(refs.get(INVOICE_STATUS, ""))

    # -- corrections --------------------------------------------------------------------------

    def correction_steps(
        self, correction: Correction, client: XeroClientSettings
    ) -> Sequence[XeroStep]:
        """Void (a draft: delete), or an ACCRECCREDIT credit note allocated to the invoice.

        NOTE: an unpaid AUTHORISED invoice can only be VOIDED, a DRAFT or SUBMITTED one DELETED
        (PROVIDERS.md); a paid or part-paid one is credited with a credit note (``PUT
        /CreditNotes``) allocated against what it still owes (``PUT
        /CreditNotes/{CreditNoteID}/Allocations``, xero_accounting.yaml 16.1.0).
        """
        invoice_id = correction.refs.get(INVOICE_ID, "{invoice_id}")
        if correction.action is CorrectionAction.VOID:
            remote = correction.remote
            draft = remote is not None and remote.state is PaymentState.DRAFT
            status = "DELETED" if draft else "VOIDED"
            return [
                Step(
                    "delete" if draft else "void",
                    request=lambda ctx: StepRequest(
                        "POST", invoices_create_path(), to_xero_status_change(invoice_id, status)
                    ),
                    send=partial(self._send_status, status=status),
                    lookup=partial(self._lookup_status, invoice_id=invoice_id),
                )
            ]
        steps = [
            Step(
                "credit-note",
                request=lambda ctx: StepRequest(
                    "PUT",
                    credit_notes_create_path(),
                    to_xero_credit_note(
                        correction, ctx.client, ctx.refs.get(CONTACT_ID, "{contact_id}")
                    ),
                ),
                send=self._send_credit_note,
                lookup=partial(self._lookup_credit_note, correction=correction),
            )
        ]
        due = still_due(correction)
        if due > 0:
            steps.append(
                Step(
                    "allocate",
                    request=lambda ctx: StepRequest(
                        "PUT",
                        allocations_path(ctx.refs.get(CREDIT_NOTE_ID, "{credit_note_id}")),
                        to_xero_allocation(invoice_id, due, correction.replacement.issue_date),
                    ),
                    send=self._send_allocation,
                    lookup=partial(self._lookup_allocation, invoice_id=invoice_id),
                    new_under="credit-note",
                )
            )
        return steps

    def _send_status(
        self, ctx: XeroContext, request: StepRequest, *, status: str
    ) -> Mapping[str, str]:
        answer = self._call(request.method, request.path, request.payload, ctx.idempotency_key)
        changed = only_element(answer.body, "Invoices")
        problems = element_errors(changed)
        if problems:
            raise TerminalError(
                f"Xero refused to set invoice {changed.get('InvoiceID')} {status}: "
                f"{'; '.join(problems)}",
                request_id=answer.request_id,
                code="ValidationException",
            )
        return {"voided_invoice_id": str(changed["InvoiceID"]), INVOICE_STATUS: status}

    def _lookup_status(self, ctx: XeroContext, *, invoice_id: str) -> Mapping[str, str] | None:
        answer = self._call("GET", invoice_path(invoice_id))
        found = only_element(answer.body, "Invoices")
        status = str(found.get("Status") or "")
        if status in CANCELLED_STATUSES:
            return {"voided_invoice_id": invoice_id, INVOICE_STATUS: status}
        return None

    def _send_credit_note(self, ctx: XeroContext, request: StepRequest) -> Mapping[str, str]:
        if CONTACT_ID not in ctx.refs:
            raise TerminalError("the credit note needs contact_id, which no step recorded")
        answer = self._call(request.method, request.path, request.payload, ctx.idempotency_key)
        created = only_element(answer.body, "CreditNotes")
        problems = element_errors(created)
        if problems:
            raise TerminalError(
                f"Xero refused credit note {created.get('CreditNoteNumber')}: "
                f"{'; '.join(problems)}",
                request_id=answer.request_id,
                code="ValidationException",
            )
        return _credit_note_refs(created)

    def _lookup_credit_note(
        self, ctx: XeroContext, *, correction: Correction
    ) -> Mapping[str, str] | None:
        number = credit_note_number(correction.invoice)
        answer = self._call("GET", credit_note_lookup_path(number))
        for note in answer.body.get("CreditNotes") or []:
            if (
                str(note.get("CreditNoteNumber", "")).casefold() == number.casefold()
                and note.get("Status") not in CANCELLED_STATUSES
            ):
                return _credit_note_refs(note)
        return None

    def _send_allocation(self, ctx: XeroContext, request: StepRequest) -> Mapping[str, str]:
        answer = self._call(request.method, request.path, request.payload, ctx.idempotency_key)
        allocation = only_element(answer.body, "Allocations")
        problems = element_errors(allocation)
        if problems:
            raise TerminalError(
                f"Xero refused the allocation: {'; '.join(problems)}",
                request_id=answer.request_id,
                code="ValidationException",
            )
        return {"allocation_id": str(allocation.get("AllocationID") or ""), "allocated": "true"}

    def _lookup_allocation(self, ctx: XeroContext, *, invoice_id: str) -> Mapping[str, str] | None:
        note_id = ctx.refs.get(CREDIT_NOTE_ID)
        if not note_id:
            return None
        answer = self._call("GET", credit_note_path(note_id))
        note = only_element(answer.body, "CreditNotes")
        for allocation in note.get("Allocations") or []:
            if str((allocation.get("Invoice") or {}).get("InvoiceID", "")).lower() == (
                invoice_id.lower()
            ):
                return {
                    "allocation_id": str(allocation.get("AllocationID") or ""),
                    "allocated": "true",
                }
        return None

    # -- errors -----------------------------------------------------------------------------

    def classify(self, error: Exception) -> DeliveryError:
        """Xero's rate-limit problem first, then the common HTTP rules."""
        return classify_xero_error(error)

    # -- first connection (OAuthConnect) ----------------------------------------------------

    def authorization_url(self, redirect_uri: str, state: str) -> str:
        """Xero's consent page for this app, asking for invoices, contacts and offline use."""
        query = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(SCOPES),
            "state": state,
        }
        return f"{AUTHORIZE_URL}?{urlencode(query)}"

    def complete_authorization(self, callback: Mapping[str, str], redirect_uri: str) -> str:
        """Exchange the code, check the organisation against the settings, store the tokens.

        Raises:
            ConfigurationError: Xero refused the consent or the code, or the connection does
                not reach ``KIKI_XERO_TENANT_ID`` (the organisations it reaches are named).
        """
        if callback.get("error"):
            raise ConfigurationError(f"Xero did not grant access: {callback['error']}")
        code = callback.get("code")
        if not code:
            raise ConfigurationError("Xero's redirect carried no authorization code")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        try:
            granted = self.tokens.request_tokens(form)
            values = self.tokens.stored_values(granted)
            connections = self._connections(values["access_token"])
        except DeliveryError as exc:
            raise ConfigurationError(
                f"connecting to Xero failed: {exc.scrubbed(self.secrets())}"
            ) from None
        tenant = self.settings.tenant_id
        names = {
            str(c.get("tenantId", "")).lower(): str(c.get("tenantName", "")) for c in connections
        }
        if tenant not in names:
            reached = ", ".join(f"{n!r} (tenant id {t})" for t, n in names.items()) or "none"
            raise ConfigurationError(
                f"the connection does not reach KIKI_XERO_TENANT_ID; it reaches: {reached}. "
                "Set KIKI_XERO_TENANT_ID to one of them and connect again"
            )
        self.credentials.update(lambda current: values)
        self.tokens.forget()
        return f"tenant {names[tenant]} ({tenant})"

    def _connections(self, access_token: str) -> list[Mapping[str, Any]]:
        import requests

        try:
            response = self._http().get(
                self.settings.connections_url,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                timeout=TIMEOUT,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise classify_xero_error(exc) from None
        try:
            body = decode_json(response.content)
        except ValueError:
            body = response.text
        if response.status_code != 200:
            raise classify_xero_error(
                XeroHTTPError(response.status_code, response.headers, body, "GET /connections")
            )
        if not isinstance(body, list):
            raise TerminalError("GET /connections: Xero answered without a list")
        return [c for c in body if isinstance(c, Mapping)]


class _Answer:
    """A parsed 2xx answer and Xero's correlation id."""

    __slots__ = ("body", "request_id")

    def __init__(self, body: Mapping[str, Any], request_id: str | None) -> None:
        self.body = body
        self.request_id = request_id


CREDIT_NOTE_ID = "credit_note_id"


def _credit_note_refs(note: Mapping[str, Any]) -> dict[str, str]:
    return {
        CREDIT_NOTE_ID: str(note["CreditNoteID"]),
        "credit_note_number": str(note.get("CreditNoteNumber") or ""),
    }


def _skip_contact(ctx: XeroContext) -> Mapping[str, str] | None:
    configured = ctx.client.contact_id
    if configured:
        return {CONTACT_ID: configured}
    known = ctx.refs.get(CONTACT_ID)
    return {CONTACT_ID: known} if known else None
