"""The QuickBooks Online adapter: income account, service item, customer, invoice, email.

Requests go through python-quickbooks' client (URLs, ``minorversion``, ``requestid``, Intuit's
fault codes) with its JSON built here, so what is sent is exactly what ``--dry-run`` shows; the
SDK's object models are not used: their ``to_json`` adds defaults the XSD refuses (``TotalAmt:
""``, ``DueDate: ""``) and others we do not mean to set (``PrintStatus``, ``AllowIPNPayment``).
Tokens come from intuit-oauth (see ``oauth.py``). Both are imported only when a request is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache, partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from kiki_billing.plugin import (
    BillingAdapter,
    ConfigurationError,
    Correction,
    CorrectionAction,
    DeliveryError,
    Invoice,
    RateLimit,
    RateWindow,
    RemoteInvoice,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
    WebhookEvent,
    check_refresh_token,
)

from .errors import classify_quickbooks_error, parse_fault
from .oauth import TokenKeeper, auth_client
from .sdk import load_sdks
from .settings import MINOR_VERSION, QuickBooksClientSettings, QuickBooksSettings
from .webhooks import read_quickbooks_events, verify_quickbooks_signature
from .wire import (
    CONCURRENCY,
    CREDIT_MEMO_ID,
    CUSTOMER_CURRENCY,
    CUSTOMER_ID,
    EMAIL_SENT,
    INCOME_ACCOUNT_ID,
    INVOICE_EMAIL_STATUS,
    INVOICE_ID,
    ITEM_ID,
    ITEM_NAME,
    MAX_DISPLAY_NAME,
    MAX_EMAIL,
    MAX_LINE_DESCRIPTION,
    REQUESTS_PER_MINUTE,
    REQUESTS_PER_SECOND,
    SYNC_TOKEN,
    VOIDED_NOTE,
    account_query,
    applied_marker,
    credit_marker,
    credit_memo_number,
    credit_memo_query,
    customer_query,
    display_name,
    doc_number,
    invoice_owner,
    invoice_query,
    item_query,
    payments_query,
    period_invoices_query,
    qbo_amount,
    still_due,
    to_json_text,
    to_qbo_credit_application,
    to_qbo_credit_memo,
    to_qbo_customer,
    to_qbo_invoice,
    to_qbo_item,
    to_qbo_void,
    to_remote_invoice,
)

if TYPE_CHECKING:
    import requests
    from quickbooks import QuickBooks  # type: ignore[import-untyped]

QuickBooksStep = Step[QuickBooksClientSettings]
QuickBooksContext = StepContext[QuickBooksClientSettings]
T = TypeVar("T")

# NOTE: connect and read timeouts per request: python-quickbooks passes none, and a request
# that never returns would hold one of the realm's 10 concurrent slots for ever.
HTTP_TIMEOUT = (10.0, 60.0)
DUPLICATE_NAME = "6240"
INCOME_TYPES = frozenset({"Income", "Other Income"})


class _LastCall(threading.local):
    """The HTTP response and token of this thread's last QuickBooks request."""

    response: requests.Response | None = None
    token: str | None = None


@cache
def _client_class() -> type[QuickBooks]:
    load_sdks()
    from quickbooks import QuickBooks

    class KikiQuickBooks(QuickBooks):  # type: ignore[misc]
        """python-quickbooks' client, sending each request with the adapter's current token.

        NOTE: the SDK puts the token in the OAuth2Session it builds at construction and never
        updates it after a refresh (PROVIDERS.md); this reads it per request instead, adds
        timeouts, sends text as UTF-8, and keeps the response for error classification.
        """

        kiki_token: Callable[[], str]
        kiki_last: _LastCall

        def process_request(
            self, request_type: Any, url: Any, headers: Any = "", params: Any = "", data: Any = ""
        ) -> Any:
            token = self.kiki_token()
            sent = dict(headers or {})
            sent["Authorization"] = "Bearer " + token
            body = data.encode("utf-8") if isinstance(data, str) else data
            self.kiki_last.token = token
            response = self.session.request(
                request_type, url, headers=sent, params=params, data=body, timeout=HTTP_TIMEOUT
            )
            self.kiki_last.response = response
            return response

    return KikiQuickBooks


class QuickBooksAdapter(BillingAdapter[QuickBooksSettings, QuickBooksClientSettings]):
    """QuickBooks Online invoices: service item, customer, invoice, optionally emailed."""

    name = "quickbooks"
    description = "QuickBooks Online (invoices on a service item, python-quickbooks)"
    extra = "quickbooks"
    requires = ("quickbooks", "intuitlib")
    client_refs = (CUSTOMER_ID, CUSTOMER_CURRENCY, ITEM_ID, ITEM_NAME)
    defaults_tables = ("exports.quickbooks",)
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        (RateWindow(REQUESTS_PER_SECOND, 1.0), RateWindow(REQUESTS_PER_MINUTE, 60.0)),
        concurrency=CONCURRENCY,
    )

    def __init__(self, settings: QuickBooksSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.tokens = TokenKeeper(settings, lambda: self.credentials)
        self._lock = threading.Lock()
        self._client: QuickBooks | None = None
        self._last = _LastCall()
        self._items: dict[str, str] = {}
        self._income_account: str | None = None

    # -- account and limits -----------------------------------------------------------------

    @property
    def account(self) -> str:
        """``sandbox:<realm>`` or ``production:<realm>``."""
        return self.settings.account_id

    # -- SDK --------------------------------------------------------------------------------

    @property
    def client(self) -> QuickBooks:
        """python-quickbooks' client, built on first use (no network: tokens come per request)."""
        load_sdks()
        with self._lock:
            if self._client is None:
                import requests
                from requests.adapters import HTTPAdapter

                session = requests.Session()
                pooled = HTTPAdapter(pool_connections=2, pool_maxsize=CONCURRENCY * 2)
                session.mount("https://", pooled)
                session.mount("http://", pooled)
                client: Any = _client_class()(
                    company_id=self.settings.realm_id, minorversion=MINOR_VERSION
                )
                client.session = session
                # NOTE: the SDK uses sandbox_api_url_v3 only when sandbox is true, which it sets
                # from an auth client we do not give it: one instance attribute serves both.
                client.sandbox = False
                client.api_url_v3 = self.settings.base_url
                client.use_decimal = True  # amounts back as Decimal, never float
                client.kiki_token = self.tokens.access_token
                client.kiki_last = self._last
                self._client = client
            return self._client

    def close(self) -> None:
        """Drop the SDK client and its HTTP session."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None and client.session is not None:
            client.session.close()

    def _call(self, call: Callable[[Any], T]) -> T:
        """One SDK call; an error carries its HTTP response, and a 401 marks the token refused."""
        client = self.client  # imports the SDKs first
        from quickbooks.exceptions import QuickbooksException  # type: ignore[import-untyped]

        self._last.response = self._last.token = None
        try:
            return call(client)
        except QuickbooksException as exc:
            response = self._last.response
            if response is not None:
                exc.kiki_response = response
            status = response.status_code if response is not None else None
            if (status == 401 or getattr(exc, "error_code", None) == 401) and self._last.token:
                self.tokens.refused(self._last.token)
            raise

    def _create(self, entity: str, request: StepRequest, key: str) -> dict[str, Any]:
        body = to_json_text(request.payload)
        result = self._call(lambda qb: qb.create_object(entity, body, request_id=key))
        found: dict[str, Any] = result[entity]
        return found

    def _query(self, select: str, entity: str) -> list[dict[str, Any]]:
        result = self._call(lambda qb: qb.query(select))
        # NOTE: an empty result has no entity key (PROVIDERS.md).
        found: list[dict[str, Any]] = (result.get("QueryResponse") or {}).get(entity) or []
        return found

    def _path(self, tail: str) -> str:
        base = urlsplit(self.settings.base_url).path.rstrip("/")
        return f"{base}/company/{self.settings.realm_id}/{tail}"

    # -- validation -------------------------------------------------------------------------

    def check_ready(self) -> None:
        """A refresh token must be set or stored, or no request can be authorized.

        Raises:
            ConfigurationError: Neither ``KIKI_QUICKBOOKS_REFRESH_TOKEN`` nor a stored token.
        """
        check_refresh_token(
            self.name,
            "KIKI_QUICKBOOKS_REFRESH_TOKEN",
            self.settings.refresh_token,
            self.credentials,
        )

    def validate(self, invoice: Invoice, client: QuickBooksClientSettings) -> None:
        """Refuse what QuickBooks would refuse, before any call.

        Raises:
            AmountLimitError: An amount with more than 2 decimals, or an unknown currency.
            TerminalError: A number too long for DocNumber, a name, description or email over
                QBO's length limits, a ':' in the customer name, or ``send`` without an email.
        """
        doc_number(invoice.number, invoice.revision)
        for line in invoice.lines:
            qbo_amount(line.fee, invoice.currency)
            if len(line.description) > MAX_LINE_DESCRIPTION:
                raise TerminalError(
                    f"invoice {invoice.number} line {line.line_no}: description longer than "
                    f"QuickBooks' {MAX_LINE_DESCRIPTION} characters"
                )
        if client.customer is None:
            name = display_name(invoice)
            if not name:
                raise TerminalError("the client's name is empty: QuickBooks needs a DisplayName")
            if len(name) > MAX_DISPLAY_NAME:
                raise TerminalError(
                    f"client name of {len(name)} characters: QuickBooks' DisplayName takes at "
                    f"most {MAX_DISPLAY_NAME} (set [clients.quickbooks] customer to an "
                    "existing customer's Id instead)"
                )
            if ":" in name:
                raise TerminalError(
                    f"client name {name!r} contains ':', which QuickBooks refuses in a "
                    "customer's DisplayName"
                )
        if invoice.client_email and len(invoice.client_email) > MAX_EMAIL:
            raise TerminalError(f"client email longer than QuickBooks' {MAX_EMAIL} characters")
        if client.send and not invoice.client_email:
            raise TerminalError(
                "[clients.quickbooks] send = true, but the client has no email to send to"
            )

    # -- steps ------------------------------------------------------------------------------

    def steps(self, invoice: Invoice, client: QuickBooksClientSettings) -> Sequence[QuickBooksStep]:
        """income-account, item, customer, invoice, and ``send`` when the client asks for it.

        The realm's service item (and its income account) comes first, so a wrong
        ``KIKI_QUICKBOOKS_INCOME_ACCOUNT`` fails a delivery before anything is created.
        """
        steps: list[QuickBooksStep] = [
            Step(
                "income-account",
                request=lambda ctx: StepRequest(
                    "POST", self._path("query"), {"query": self._account_query()}
                ),
                send=self._send_income_account,
                skip=self._skip_income_account,
            ),
            Step(
                "item",
                request=lambda ctx: StepRequest(
                    "POST",
                    self._path("item"),
                    to_qbo_item(
                        ctx.client.item, ctx.refs.get(INCOME_ACCOUNT_ID, "{income_account_id}")
                    ),
                ),
                send=self._send_item,
                lookup=self._lookup_item,
                skip=self._skip_item,
            ),
            Step(
                "customer",
                request=lambda ctx: StepRequest(
                    "POST", self._path("customer"), to_qbo_customer(ctx.invoice)
                ),
                send=self._send_customer,
                lookup=self._lookup_customer,
                skip=_skip_customer,
            ),
            # NOTE: always looked up first, even under a customer made by this delivery: a
            # customer "created" after a 6240 (duplicate name) already existed.
            Step(
                "invoice",
                request=lambda ctx: StepRequest(
                    "POST", self._path("invoice"), to_qbo_invoice(ctx.invoice, ctx.client, ctx.refs)
                ),
                send=self._send_invoice,
                lookup=self._lookup_invoice,
            ),
        ]
        if client.send:
            steps.append(
                Step(
                    "send",
                    request=lambda ctx: StepRequest(
                        "POST",
                        self._path(f"invoice/{ctx.refs.get(INVOICE_ID, '{invoice_id}')}/send"),
                        {},
                    ),
                    send=self._send_email,
                    lookup=self._lookup_email,
                    new_under="invoice",
                    skip=_skip_email,
                )
            )
        return steps

    # income account

    def _account_query(self, *, by_id: bool | None = None) -> str:
        wanted = self.settings.income_account
        if by_id is None:
            by_id = bool(wanted and wanted.isdigit())
        return account_query(wanted, by_id=by_id)

    def _skip_income_account(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        if _known_item(ctx) or ctx.client.item in self._items:
            return {}  # the item exists: its account is not needed
        if self._income_account is not None:
            return {INCOME_ACCOUNT_ID: self._income_account}
        return None

    def _send_income_account(
        self, ctx: QuickBooksContext, request: StepRequest
    ) -> Mapping[str, str]:
        wanted = self.settings.income_account
        found = self._query(str(request.payload["query"]), "Account")
        if not found and wanted and wanted.isdigit():
            ctx.throttle()  # an account may be named with digits: a second request
            found = self._query(self._account_query(by_id=False), "Account")
        if not found:
            if wanted is None:
                raise TerminalError(
                    "QuickBooks has no active account of type Income for the service item; "
                    "set KIKI_QUICKBOOKS_INCOME_ACCOUNT"
                )
            raise TerminalError(
                f"KIKI_QUICKBOOKS_INCOME_ACCOUNT names no active QuickBooks account ({wanted!r} "
                "is neither an account's Name nor its Id)"
            )
        account = found[0]
        if account.get("AccountType") not in INCOME_TYPES:
            raise TerminalError(
                f"KIKI_QUICKBOOKS_INCOME_ACCOUNT names account {account.get('Name')!r} (Id "
                f"{account.get('Id')}) of type {account.get('AccountType')!r}; the service "
                "item needs an Income account"
            )
        self._income_account = str(account["Id"])
        return {INCOME_ACCOUNT_ID: self._income_account}

    # item

    def _skip_item(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        if _known_item(ctx):
            return {ITEM_ID: ctx.refs[ITEM_ID], ITEM_NAME: ctx.client.item}
        cached = self._items.get(ctx.client.item)
        return {ITEM_ID: cached, ITEM_NAME: ctx.client.item} if cached else None

    def _lookup_item(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        for item in self._query(item_query(ctx.client.item), "Item"):
            return self._item_refs(ctx, item)
        return None

    def _send_item(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        try:
            item = self._create("Item", request, ctx.idempotency_key)
        except Exception as exc:
            # NOTE: another delivery of this realm may have created it meanwhile (6240:
            # names are unique): that one is the item.
            if not _duplicate_name(exc):
                raise
            ctx.throttle()
            found = self._lookup_item(ctx)
            if found is None:
                raise
            return found
        return self._item_refs(ctx, item)

    def _item_refs(self, ctx: QuickBooksContext, item: Mapping[str, Any]) -> Mapping[str, str]:
        self._items[ctx.client.item] = str(item["Id"])
        return {ITEM_ID: str(item["Id"]), ITEM_NAME: ctx.client.item}

    # customer

    def _lookup_customer(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        for customer in self._query(customer_query(display_name(ctx.invoice)), "Customer"):
            return _customer_refs(ctx, customer)
        return None

    def _send_customer(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        try:
            customer = self._create("Customer", request, ctx.idempotency_key)
        except Exception as exc:
            # NOTE: 6240: the DisplayName is taken (customers, vendors and employees share
            # them). A customer with it is this client's; a vendor or employee is not.
            if not _duplicate_name(exc):
                raise
            ctx.throttle()
            found = self._lookup_customer(ctx)
            if found is None:
                raise
            return found
        return _customer_refs(ctx, customer)

    # invoice

    def _lookup_invoice(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        number = doc_number(ctx.invoice.number, ctx.invoice.revision)
        for found in self._query(invoice_query(number), "Invoice"):
            owner = invoice_owner(found, ctx.invoice)
            if owner == "ours":
                return _invoice_refs(found)
            if owner == "foreign":
                raise TerminalError(
                    f"QuickBooks already holds an invoice with DocNumber {number} (Id "
                    f"{found.get('Id')}) that kiki-billing did not create for "
                    f"{ctx.invoice.number} revision {ctx.invoice.revision}: check it before "
                    "pushing again",
                    code="DocNumber",
                )
        return None

    def _send_invoice(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        known = ctx.refs.get(CUSTOMER_CURRENCY)
        if known and known != ctx.invoice.currency:
            raise TerminalError(
                f"QuickBooks customer {ctx.refs.get(CUSTOMER_ID)} bills in {known} (a "
                f"customer's currency is fixed when it is created); invoice "
                f"{ctx.invoice.number} is in {ctx.invoice.currency}",
                code="CurrencyRef",
            )
        return _invoice_refs(self._create("Invoice", request, ctx.idempotency_key))

    # send

    def _lookup_email(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        invoice_id = _invoice_id(ctx)
        result = self._call(lambda qb: qb.get_single_object("Invoice", pk=invoice_id))
        found = _invoice_refs(result["Invoice"])
        return found if found.get(INVOICE_EMAIL_STATUS) == EMAIL_SENT else None

    def _send_email(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        url = urlsplit(self.settings.base_url)._replace(path=request.path).geturl()
        key = ctx.idempotency_key
        # NOTE: POST /invoice/{id}/send takes no body (application/octet-stream) and emails
        # the invoice to its BillEmail; python-quickbooks' Invoice.send() cannot pass the
        # requestid, its client's make_request can.
        result = self._call(
            lambda qb: qb.make_request(
                "POST", url, None, "application/octet-stream", request_id=key
            )
        )
        return _invoice_refs(result["Invoice"])

    # -- reading back -----------------------------------------------------------------------

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Every QBO invoice with our DocNumber and this revision in its PrivateNote (read-only).

        One query, whatever ``refs`` say: the query by DocNumber returns the recorded invoice
        with any duplicate (a company may take duplicate DocNumbers).
        """
        number = doc_number(invoice.number, invoice.revision)
        # NOTE: CurrencyRef comes with every invoice of a multicurrency company; without it an
        # invoice is in the home currency, which the customer's currency (recorded when it
        # was found or made) or else the invoice's own stands for.
        currency = refs.get(CUSTOMER_CURRENCY) or invoice.currency
        return [
            to_remote_invoice(found, currency)
            for found in self._query(invoice_query(number), "Invoice")
            if invoice_owner(found, invoice) == "ours"
        ]

    # -- webhooks (WebhookSource) -----------------------------------------------------------

    def webhook_events(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: datetime
    ) -> list[WebhookEvent]:
        """Verify ``intuit-signature`` on the raw body, then read its invoice changes."""
        verify_quickbooks_signature(headers, body, secret)
        return read_quickbooks_events(body, {self.settings.realm_id: self.account})

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every QBO invoice whose DocNumber starts with the period's prefix (one query)."""
        prefix = doc_number(f"KIKI-OaaS-{period.replace('-', '')}-")
        # NOTE: a multicurrency company answers CurrencyRef on every invoice; without it the
        # currency is the company's home one, which reconcile reads from the ledger instead.
        return [
            to_remote_invoice(found, "")
            for found in self._query(period_invoices_query(prefix), "Invoice")
        ]

    # -- corrections --------------------------------------------------------------------------

    def correction_steps(
        self, correction: Correction, client: QuickBooksClientSettings
    ) -> Sequence[QuickBooksStep]:
        """Void, or a credit memo of the revision's lines applied to what it still owes.

        NOTE: ``POST /invoice?operation=void`` with the invoice's Id and SyncToken zeroes its
        amounts and puts "Voided" in its PrivateNote (Intuit's Invoice API reference, void); QBO
        refuses it for an invoice with payments linked. A paid or part-paid one gets a
        ``CreditMemo`` (Finance.xsd), applied to its balance by a Payment of 0 linking both.
        """
        if correction.action is CorrectionAction.VOID:
            return [
                Step(
                    "void",
                    request=lambda ctx: StepRequest(
                        "POST",
                        self._path("invoice?operation=void"),
                        to_qbo_void(
                            ctx.refs.get(INVOICE_ID, "{invoice_id}"),
                            ctx.refs.get(SYNC_TOKEN, "{sync_token}"),
                        ),
                    ),
                    send=self._send_void,
                    lookup=self._lookup_void,
                )
            ]
        steps = [
            Step(
                "credit-memo",
                request=lambda ctx: StepRequest(
                    "POST",
                    self._path("creditmemo"),
                    to_qbo_credit_memo(correction, ctx.client, ctx.refs),
                ),
                send=self._send_credit_memo,
                lookup=partial(self._lookup_credit_memo, correction=correction),
            )
        ]
        due = still_due(correction)
        if due > 0:
            steps.append(
                Step(
                    "apply-credit",
                    request=lambda ctx: StepRequest(
                        "POST",
                        self._path("payment"),
                        to_qbo_credit_application(correction, due, ctx.refs),
                    ),
                    send=self._send_application,
                    lookup=partial(self._lookup_application, correction=correction),
                    new_under="credit-memo",
                )
            )
        return steps

    def _send_void(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        body = to_json_text(request.payload)
        result = self._call(
            lambda qb: qb.create_object(
                "Invoice", body, request_id=ctx.idempotency_key, params={"operation": "void"}
            )
        )
        return {"voided_invoice_id": str(result["Invoice"]["Id"])}

    def _lookup_void(self, ctx: QuickBooksContext) -> Mapping[str, str] | None:
        invoice_id = _invoice_id(ctx)
        result = self._call(lambda qb: qb.get_single_object("Invoice", pk=invoice_id))
        found = result["Invoice"]
        if str(found.get("PrivateNote") or "").startswith(VOIDED_NOTE):
            return {"voided_invoice_id": invoice_id}
        return None

    def _send_credit_memo(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        created = self._create("CreditMemo", request, ctx.idempotency_key)
        return {CREDIT_MEMO_ID: str(created["Id"]), "credit_memo_number": str(created["DocNumber"])}

    def _lookup_credit_memo(
        self, ctx: QuickBooksContext, *, correction: Correction
    ) -> Mapping[str, str] | None:
        number = credit_memo_number(correction.invoice)
        marker = credit_marker(correction.invoice)
        for found in self._query(credit_memo_query(number), "CreditMemo"):
            if marker in str(found.get("PrivateNote") or ""):
                return {CREDIT_MEMO_ID: str(found["Id"]), "credit_memo_number": number}
        return None

    def _send_application(self, ctx: QuickBooksContext, request: StepRequest) -> Mapping[str, str]:
        created = self._create("Payment", request, ctx.idempotency_key)
        return {"credit_applied_by": str(created["Id"])}

    def _lookup_application(
        self, ctx: QuickBooksContext, *, correction: Correction
    ) -> Mapping[str, str] | None:
        invoice_id = _invoice_id(ctx)
        result = self._call(lambda qb: qb.get_single_object("Invoice", pk=invoice_id))
        linked = [
            str(txn["TxnId"])
            for txn in result["Invoice"].get("LinkedTxn") or []
            if txn.get("TxnType") == "Payment"
        ]
        if not linked:
            return None
        ctx.throttle()  # the payments are a second request
        marker = applied_marker(correction.invoice)
        for payment in self._query(payments_query(linked), "Payment"):
            if marker in str(payment.get("PrivateNote") or ""):
                return {"credit_applied_by": str(payment["Id"])}
        return None

    # -- errors -----------------------------------------------------------------------------

    def classify(self, error: Exception) -> DeliveryError:
        """Intuit's fault codes and throttle signals, then the common HTTP rules."""
        return classify_quickbooks_error(error, self.tokens.seen())

    # -- OAuthConnect ---------------------------------------------------------------------------

    def authorization_url(self, redirect_uri: str, state: str) -> str:
        """Intuit's consent page for the accounting scope."""
        load_sdks()
        from intuitlib.enums import Scopes  # type: ignore[import-untyped]

        url: str = auth_client(self.settings, redirect_uri).get_authorization_url(
            [Scopes.ACCOUNTING], state_token=state
        )
        return url

    def complete_authorization(self, callback: Mapping[str, str], redirect_uri: str) -> str:
        """Exchange the redirect's code for tokens, check the realm, store the tokens.

        Raises:
            ConfigurationError: Access was not granted, the redirect names another company
                than ``KIKI_QUICKBOOKS_REALM_ID``, or Intuit refused the code.
        """
        load_sdks()
        import requests
        from intuitlib.exceptions import AuthClientError  # type: ignore[import-untyped]

        if callback.get("error"):
            raise ConfigurationError(
                f"QuickBooks did not grant access: {_printable(callback['error'])}"
            )
        code, realm = callback.get("code"), callback.get("realmId")
        if not code or not realm:
            raise ConfigurationError("QuickBooks' redirect carries no code or no realmId")
        if realm != self.settings.realm_id:
            shown = realm if realm.isdigit() and len(realm) <= 32 else "another company"
            raise ConfigurationError(
                f"QuickBooks connected company (realm) {shown}, but KIKI_QUICKBOOKS_REALM_ID is "
                f"{self.settings.realm_id}: choose that company on the consent page, or fix the "
                "setting"
            )
        client = auth_client(self.settings, redirect_uri)
        try:
            client.get_bearer_token(code, realm_id=realm)
        except AuthClientError as exc:
            reason = parse_fault(exc.content)
            raise ConfigurationError(
                "QuickBooks refused the authorization code "
                f"({reason.message if reason else 'no reason given'}, HTTP {exc.status_code}, "
                f"intuit_tid {exc.intuit_tid})"
            ) from None
        except requests.RequestException as exc:
            raise ConfigurationError(
                f"cannot reach QuickBooks' token endpoint: {type(exc).__name__}"
            ) from None
        self.tokens.store_grant(client)
        return f"realm {realm} ({self.settings.environment})"


def _printable(value: str) -> str:
    return "".join(ch for ch in value[:100] if ch.isprintable())


def _duplicate_name(error: Exception) -> bool:
    if str(getattr(error, "error_code", "")) == DUPLICATE_NAME:
        return True
    response = getattr(error, "kiki_response", None)
    fault = parse_fault(getattr(response, "text", None)) if response is not None else None
    return fault is not None and fault.code == DUPLICATE_NAME


def _known_item(ctx: QuickBooksContext) -> bool:
    return bool(ctx.refs.get(ITEM_ID)) and ctx.refs.get(ITEM_NAME) == ctx.client.item


def _skip_customer(ctx: QuickBooksContext) -> Mapping[str, str] | None:
    configured = ctx.client.customer
    known = ctx.refs.get(CUSTOMER_ID)
    if configured and configured != known:
        return {CUSTOMER_ID: configured, CUSTOMER_CURRENCY: ""}  # its currency is unknown
    if known:
        return {CUSTOMER_ID: known, CUSTOMER_CURRENCY: ctx.refs.get(CUSTOMER_CURRENCY, "")}
    return None


def _customer_refs(ctx: QuickBooksContext, customer: Mapping[str, Any]) -> Mapping[str, str]:
    currency = str((customer.get("CurrencyRef") or {}).get("value") or "")
    if currency and currency != ctx.invoice.currency:
        raise TerminalError(
            f"QuickBooks customer {customer.get('DisplayName')!r} (Id {customer.get('Id')}) "
            f"bills in {currency}, and a customer's currency is fixed when it is created; "
            f"invoice {ctx.invoice.number} is in {ctx.invoice.currency}",
            code="CurrencyRef",
        )
    return {CUSTOMER_ID: str(customer["Id"]), CUSTOMER_CURRENCY: currency}


def _invoice_refs(invoice: Mapping[str, Any]) -> dict[str, str]:
    refs = {INVOICE_ID: str(invoice["Id"])}
    if invoice.get("EmailStatus"):
        refs[INVOICE_EMAIL_STATUS] = str(invoice["EmailStatus"])
    return refs


def _invoice_id(ctx: QuickBooksContext) -> str:
    value = ctx.refs.get(INVOICE_ID)
    if not value:
        raise TerminalError("the send step needs invoice_id, which no earlier step recorded")
    return value


def _skip_email(ctx: QuickBooksContext) -> Mapping[str, str] | None:
    if ctx.refs.get(INVOICE_EMAIL_STATUS) == EMAIL_SENT:
        return {INVOICE_EMAIL_STATUS: EMAIL_SENT}
    return None
