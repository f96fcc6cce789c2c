"""The Zuora adapter: account, bill-to contact, activation, subscribe with invoice, verify.

SOAP has no idempotency key and no call that creates an invoice with lines, so an invoice is
delivered as a subscription of one-time charges (one per line, price overridden) whose
subscribe() generates the invoice. Replays are made safe by unique natural keys: the
AccountNumber, and a Subscription.Name derived from the hub's key, which Zuora refuses a second
time (``DUPLICATE_VALUE``); the look-ups find both with query().

``zeep`` is imported when the WSDL is loaded (at construction), so ``kiki-billing`` works
without it as long as no Zuora target is configured.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlsplit

from kiki_billing.plugin import (
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
)

from .errors import DUPLICATE_VALUE, INVALID_SESSION, ZuoraApiError, classify_zuora_error
from .settings import ZuoraClientSettings, ZuoraSettings
from .soap import Envelope, ZuoraWsdl, endpoint_path, make_transport
from .wire import (
    ACCOUNT_CURRENCY,
    ACCOUNT_ID,
    ACCOUNT_NUMBER,
    ACCOUNT_STATUS,
    ACTIVE,
    CONCURRENCY,
    CONTACT_ID,
    DRAFT,
    INVOICE_AMOUNT,
    INVOICE_ID,
    INVOICE_NUMBER,
    INVOICE_STATUS,
    MAX_ACCOUNT_NAME,
    MAX_DESCRIPTION,
    MAX_EMAIL,
    MAX_LINES,
    PAYMENT_ID,
    REQUESTS_PER_MINUTE,
    SUBSCRIPTION_ID,
    SUBSCRIPTION_NAME,
    account_number,
    account_query,
    account_status_query,
    accounts_currency_query,
    adjustment_query,
    allocate,
    contact_query,
    invoice_items_amounts_query,
    invoice_items_of_query,
    invoice_items_query,
    invoice_query,
    invoices_query,
    item_refs,
    notes_revision,
    period_subscriptions_query,
    subscription_name,
    subscription_number,
    subscription_query,
    subscriptions_of_query,
    to_zuora_account,
    to_zuora_activation,
    to_zuora_contact,
    to_zuora_credit_adjustment,
    to_zuora_invoice_status,
    to_zuora_subscribe,
    zuora_amount,
    zuora_payment_state,
)

ZuoraStep = Step[ZuoraClientSettings]
ZuoraContext = StepContext[ZuoraClientSettings]
# Log in again this long before the session's lifetime runs out (a call in flight must not
# outlive it).
SESSION_MARGIN = 60.0
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class _Session:
    id: str
    address: str
    renew_at: float


class ZuoraAdapter(BillingAdapter[ZuoraSettings, ZuoraClientSettings]):
    """Zuora invoices through SOAP subscribe() with one-time charges (zeep)."""

    name = "zuora"
    description = "Zuora Billing (SOAP: a subscription of one-time charges with its invoice)"
    extra = "zuora"
    requires = ("zeep", "lxml")
    client_refs = (ACCOUNT_ID, ACCOUNT_NUMBER, ACCOUNT_CURRENCY, ACCOUNT_STATUS, CONTACT_ID)
    defaults_tables = ()
    # NOTE: SOAP has no idempotency header: the key rides in the unique Subscription.Name.
    key_carrier = "key (in Subscription.Name)"
    # Zuora's published limits per tenant: 50,000 requests a minute, 20 invoice-creating calls
    # at once (see wire.py).
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        (RateWindow(REQUESTS_PER_MINUTE, 60.0),), concurrency=CONCURRENCY
    )

    def __init__(
        self,
        settings: ZuoraSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(settings, **kwargs)
        # The WSDL is parsed here, once per process: a bad KIKI_ZUORA_WSDL stops the run
        # before anything is sent (ConfigurationError, exit code 2).
        self.wsdl = ZuoraWsdl.load(settings.wsdl)
        endpoint = settings.api_base or self.wsdl.address
        if not endpoint:
            raise ConfigurationError(
                "adapter 'zuora': the WSDL has no soap:address; set KIKI_ZUORA_API_BASE"
            )
        self.endpoint: str = endpoint
        self._clock = clock
        self._lock = threading.Lock()
        self._login_lock = threading.Lock()
        self._transport: Any | None = None
        self._session: _Session | None = None
        self._login_refused: DeliveryError | None = None
        self.logins = 0
        """Logins made (tests and logs)."""

    # -- account and limits -----------------------------------------------------------------

    @property
    def account(self) -> str:
        """The endpoint's host and a fingerprint of the user name (never the name itself)."""
        host = urlsplit(self.endpoint).netloc
        user = self.settings.username.get_secret_value()
        return f"{host}:user-{hashlib.sha256(user.encode()).hexdigest()[:12]}"

    # -- validation -------------------------------------------------------------------------

    def validate(self, invoice: Invoice, client: ZuoraClientSettings) -> None:
        """Refuse what Zuora would refuse, before any call.

        Raises:
            AmountLimitError: A fee finer than the currency's minor unit.
            TerminalError: No line or more than 50, or a text over Zuora's field lengths.
        """
        if not invoice.lines:
            raise TerminalError(f"invoice {invoice.number} has no lines")
        if len(invoice.lines) > MAX_LINES:
            raise TerminalError(
                f"invoice {invoice.number} has {len(invoice.lines)} lines; a Zuora subscribe() "
                f"takes at most {MAX_LINES} rate plans (one per line)",
                code="too_many_lines",
            )
        for line in invoice.lines:
            zuora_amount(line.fee, invoice.currency)
            if len(line.description) > MAX_DESCRIPTION:
                raise TerminalError(
                    f"invoice {invoice.number} line {line.line_no}: description longer than "
                    f"Zuora's {MAX_DESCRIPTION} characters"
                )
        if len(invoice.client_name) > MAX_ACCOUNT_NAME:
            raise TerminalError(
                f"client name longer than Zuora's {MAX_ACCOUNT_NAME} characters (Account.Name)"
            )
        if invoice.client_email and len(invoice.client_email) > MAX_EMAIL:
            raise TerminalError(
                f"client email longer than Zuora's {MAX_EMAIL} characters (Contact.WorkEmail)"
            )
        number = account_number(invoice, client)
        if len(number) > 70:
            raise TerminalError(
                f"client id {invoice.client_id!r} is longer than Zuora's 70-character "
                "AccountNumber; set account_number in [clients.zuora]"
            )

    # -- steps ------------------------------------------------------------------------------

    def steps(self, invoice: Invoice, client: ZuoraClientSettings) -> Sequence[ZuoraStep]:
        """account, contact, activate, subscribe (with its invoice), verify."""
        return [
            Step(
                "account",
                request=lambda ctx: self._request(
                    self.wsdl.create("Account", to_zuora_account(ctx.invoice, ctx.client))
                ),
                send=self._send_account,
                lookup=self._lookup_account,
                skip=_skip_account,
            ),
            Step(
                "contact",
                request=lambda ctx: self._request(
                    self.wsdl.create(
                        "Contact", to_zuora_contact(ctx.invoice, _ref(ctx, ACCOUNT_ID))
                    )
                ),
                send=self._send_contact,
                lookup=self._lookup_contact,
                new_under="account",
                skip=_skip_contact,
            ),
            Step(
                "activate",
                request=lambda ctx: self._request(
                    self.wsdl.update(
                        "Account",
                        to_zuora_activation(_ref(ctx, ACCOUNT_ID), _ref(ctx, CONTACT_ID)),
                    )
                ),
                send=self._send_activate,
                lookup=self._lookup_activate,
                new_under="contact",
                skip=_skip_activate,
            ),
            Step(
                "subscribe",
                request=lambda ctx: self._request(
                    self.wsdl.subscribe(
                        to_zuora_subscribe(
                            ctx.invoice,
                            ctx.client,
                            _ref(ctx, ACCOUNT_ID),
                            subscription_name(ctx.invoice, ctx.idempotency_key),
                        ),
                        single_transaction=True,
                    )
                ),
                send=self._send_subscribe,
                lookup=self._lookup_subscribe,
                new_under="account",
            ),
            Step(
                "verify",
                request=lambda ctx: self._request(
                    self.wsdl.query(invoice_query(_ref(ctx, INVOICE_ID)))
                ),
                send=self._send_verify,
            ),
        ]

    def _request(self, envelope: Envelope) -> StepRequest:
        # NOTE: the session is masked in what a step builds (and --dry-run shows); send puts
        # it in just before posting, every other byte as built.
        return StepRequest(
            "POST",
            endpoint_path(self.endpoint),
            {"operation": envelope.operation, "envelope": envelope.xml},
            headers=dict(envelope.headers),
        )

    # account

    def _lookup_account(self, ctx: ZuoraContext) -> Mapping[str, str] | None:
        return self._find_account(ctx, first=True)

    def _find_account(self, ctx: ZuoraContext, *, first: bool) -> Mapping[str, str] | None:
        """The client's account by its AccountNumber (unique in a tenant)."""
        number = account_number(ctx.invoice, ctx.client)
        records = self._query(ctx, account_query(number), first=first)
        return _account_refs(ctx.invoice, records[0]) if records else None

    def _send_account(self, ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
        try:
            created = self._save(ctx, request, first=True)
        except ZuoraApiError as exc:
            # NOTE: AccountNumber is unique: a duplicate proves the account exists (made by an
            # earlier attempt whose answer was lost, or by someone else); take it as found.
            if exc.code != DUPLICATE_VALUE:
                raise
            found = self._find_account(ctx, first=False)
            if found is None:
                raise
            return found
        return {
            ACCOUNT_ID: created,
            ACCOUNT_NUMBER: account_number(ctx.invoice, ctx.client),
            ACCOUNT_CURRENCY: ctx.invoice.currency.upper(),
            ACCOUNT_STATUS: DRAFT,
        }

    # contact

    def _lookup_contact(self, ctx: ZuoraContext) -> Mapping[str, str] | None:
        records = self._query(ctx, contact_query(_ref(ctx, ACCOUNT_ID)), first=True)
        if not records:
            return None
        return {CONTACT_ID: str(records[0].Id)}

    def _send_contact(self, ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
        return {CONTACT_ID: self._save(ctx, request, first=True)}

    # activate

    def _lookup_activate(self, ctx: ZuoraContext) -> Mapping[str, str] | None:
        records = self._query(ctx, account_status_query(_ref(ctx, ACCOUNT_ID)), first=True)
        if not records:
            raise TerminalError(f"Zuora account {_ref(ctx, ACCOUNT_ID)} no longer exists")
        status = str(records[0].Status or "")
        if status == ACTIVE:
            return {ACCOUNT_STATUS: ACTIVE}
        if status != DRAFT:
            raise TerminalError(
                f"Zuora account {_ref(ctx, ACCOUNT_ID)} is {status or 'without a status'}; "
                "only Draft and Active accounts are billed (reactivate it in Zuora, then retry)"
            )
        return None

    def _send_activate(self, ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
        self._save(ctx, request, first=True)
        return {ACCOUNT_STATUS: ACTIVE}

    # subscribe

    def _lookup_subscribe(self, ctx: ZuoraContext) -> Mapping[str, str] | None:
        return self._find_subscription(ctx, first=True)

    def _send_subscribe(self, ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
        currency = ctx.refs.get(ACCOUNT_CURRENCY)
        if currency and currency != ctx.invoice.currency.upper():
            raise _currency_error(ctx.invoice, _ref(ctx, ACCOUNT_ID), currency)
        try:
            results = self._call(ctx, request, first=True)
            result = _first_result(results, "subscribe")
            _raise_errors(result, "subscribe")
        except ZuoraApiError as exc:
            # NOTE: the subscription name is unique per tenant and derived from this step's
            # key, so DUPLICATE_VALUE proves an earlier attempt (whose answer was lost) made
            # it: find it and its invoice instead of failing or making a second one.
            if exc.code != DUPLICATE_VALUE:
                raise
            found = self._find_subscription(ctx, first=False)
            if found is None:
                raise
            return found
        # NOTE: from here on the subscription exists: whatever is odd about it is reported by
        # the verify step, so that `retry` never sends this step again under a new key (a new
        # subscription name) and bills twice.
        refs = {
            SUBSCRIPTION_ID: str(result.SubscriptionId),
            SUBSCRIPTION_NAME: subscription_name(ctx.invoice, ctx.idempotency_key),
        }
        if result.InvoiceId:
            refs[INVOICE_ID] = str(result.InvoiceId)
        if result.InvoiceNumber:
            refs[INVOICE_NUMBER] = str(result.InvoiceNumber)
        if result.PaymentId:
            refs[PAYMENT_ID] = str(result.PaymentId)
        return refs

    def _find_subscription(self, ctx: ZuoraContext, *, first: bool) -> Mapping[str, str] | None:
        """The subscription of this delivery by its unique name, and the invoice it made.

        Found without exactly one invoice, it is returned without one: the verify step then
        fails and says so (this step is never sent again, see :meth:`_send_subscribe`).
        """
        name = subscription_name(ctx.invoice, ctx.idempotency_key)
        found = self._query(ctx, subscription_query(name), first=first)
        if not found:
            return None
        subscription = found[0]
        account_id = ctx.refs.get(ACCOUNT_ID)
        if account_id and str(subscription.AccountId) != account_id:
            raise TerminalError(
                f"Zuora subscription {name} belongs to account {subscription.AccountId}, "
                f"not {account_id}; was the client's account_number changed?"
            )
        refs = {SUBSCRIPTION_ID: str(subscription.Id), SUBSCRIPTION_NAME: name}
        items = self._query(ctx, invoice_items_query(str(subscription.Id)), first=False)
        invoices = {str(item.InvoiceId) for item in items if item.InvoiceId}
        if len(invoices) == 1:
            refs[INVOICE_ID] = invoices.pop()
        return refs

    # verify

    def _send_verify(self, ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
        if not ctx.refs.get(INVOICE_ID):
            raise TerminalError(
                f"Zuora subscription {ctx.refs.get(SUBSCRIPTION_NAME)} "
                f"({ctx.refs.get(SUBSCRIPTION_ID)}) has no single invoice of its own: check it "
                "in Zuora (is invoice generation allowed for the API user?)",
                code="no_invoice",
            )
        results = self._call(ctx, request, first=True)
        records = list(getattr(results, "records", None) or [])
        if not records:
            raise TerminalError(f"Zuora invoice {_ref(ctx, INVOICE_ID)} was not found")
        invoice = records[0]
        expected = ctx.invoice.total_fee
        amount = _decimal(invoice.Amount)
        refs = {
            INVOICE_ID: str(invoice.Id),
            INVOICE_NUMBER: str(invoice.InvoiceNumber or ""),
            INVOICE_STATUS: str(invoice.Status or ""),
            INVOICE_AMOUNT: "" if amount is None else format(amount, "f"),
        }
        if amount is None or amount != expected:
            # NOTE: Zuora prices the charges itself (tax, other charges of the rate plan,
            # rounding); an invoice that does not total ours must not be left unnoticed.
            raise TerminalError(
                f"Zuora invoice {refs[INVOICE_NUMBER] or refs[INVOICE_ID]} totals "
                f"{invoice.Amount} {ctx.invoice.currency}, but invoice {ctx.invoice.number} "
                f"totals {zuora_amount(expected, ctx.invoice.currency)} {ctx.invoice.currency}: "
                "check the catalogue charge (tax, other charges in its rate plan) and correct "
                "the Zuora invoice; `kiki-billing retry` then checks it again",
                code="amount_mismatch",
            )
        return refs

    # -- reading back -----------------------------------------------------------------------

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Every Zuora invoice of a subscription made for this invoice number and revision.

        Read-only (``login`` and ``query`` only), three queries whatever ``refs`` say: the
        subscriptions named after the invoice number (each delivery's unique name starts with
        it; the revision is in their Notes), their invoice items, then those invoices. The
        account's currency comes from ``refs`` when the invoice is on the recorded account, else
        one more query.
        """
        subscriptions = {
            str(s.Id): s
            for s in self._read(subscriptions_of_query(invoice), first=True)
            if str(s.Name or "").startswith(invoice.number + "-")
            and notes_revision(s.Notes, invoice) == invoice.revision
        }
        if not subscriptions:
            return []
        items = self._read(invoice_items_of_query(subscriptions))
        ours: dict[str, str] = {}
        for item in items:
            if item.InvoiceId and str(item.SubscriptionId) in subscriptions:
                ours.setdefault(str(item.InvoiceId), str(item.SubscriptionId))
        if not ours:
            return []  # the invoices were deleted (or never generated)
        invoices = self._read(invoices_query(ours))
        currencies: dict[str, str] = {}
        if refs.get(ACCOUNT_ID) and refs.get(ACCOUNT_CURRENCY):
            currencies[refs[ACCOUNT_ID]] = refs[ACCOUNT_CURRENCY]
        unknown = {str(i.AccountId) for i in invoices} - set(currencies)
        if unknown:
            for account in self._read(accounts_currency_query(unknown)):
                currencies[str(account.Id)] = str(account.Currency or "").upper()
        found = []
        for record in invoices:
            subscription = subscriptions[ours[str(record.Id)]]
            found.append(
                _remote_invoice(record, subscription, currencies, invoice.number, invoice.revision)
            )
        return found

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every Zuora invoice of a subscription named after a number of the period (read-only).

        Three queries: the subscriptions named ``KIKI-OaaS-YYYYMM-...``, their invoice items, the
        invoices (and one more for the accounts' currencies).
        """
        subscriptions = {
            str(s.Id): s
            for s in self._read(period_subscriptions_query(period), first=True)
            if subscription_number(s.Name)
        }
        if not subscriptions:
            return []
        ours: dict[str, str] = {}
        for item in self._read(invoice_items_of_query(subscriptions)):
            if item.InvoiceId and str(item.SubscriptionId) in subscriptions:
                ours.setdefault(str(item.InvoiceId), str(item.SubscriptionId))
        if not ours:
            return []
        invoices = self._read(invoices_query(ours))
        accounts = {str(i.AccountId) for i in invoices}
        currencies = {
            str(a.Id): str(a.Currency or "").upper()
            for a in self._read(accounts_currency_query(accounts))
        }
        found = []
        for record in invoices:
            subscription = subscriptions[ours[str(record.Id)]]
            number = subscription_number(subscription.Name) or ""
            revision = notes_revision(subscription.Notes, number)
            found.append(_remote_invoice(record, subscription, currencies, number, revision or 0))
        return found

    def recorded_payment_state(self, refs: Mapping[str, str]) -> PaymentState | None:
        """Paid when the delivery collected it (a payment id), else its recorded status."""
        if refs.get(PAYMENT_ID):
            return PaymentState.PAID
        status = refs.get(INVOICE_STATUS)
        return {"Posted": PaymentState.OPEN, "Draft": PaymentState.DRAFT}.get(status or "")

    # -- corrections --------------------------------------------------------------------------

    def correction_steps(
        self, correction: Correction, client: ZuoraClientSettings
    ) -> Sequence[ZuoraStep]:
        """Cancel an unpaid invoice (unpost, then cancel), or credit what a paid one still owes.

        NOTE: Zuora cancels only a Draft invoice, and unposts a Posted one only without payments
        or adjustments (Zuora's "Unpost invoice" rules). SOAP 78.0 has no credit memo: what a
        part-paid invoice still owes is credited by one InvoiceItemAdjustment per item (Type
        Credit; an invoice's balance can only be adjusted toward zero); what was paid is set
        against the new revision afterwards (:meth:`settlement_steps`).
        """
        invoice_id = correction.refs.get(INVOICE_ID, "{invoice_id}")
        if correction.action is CorrectionAction.VOID:
            steps = []
            if correction.remote is None or correction.remote.state is not PaymentState.DRAFT:
                unposted = {"Draft", "Canceled"}
                steps.append(self._status_step("unpost", invoice_id, "Draft", unposted))
            steps.append(self._status_step("cancel", invoice_id, "Canceled", {"Canceled"}))
            return steps
        if correction.still_due <= 0:
            return []
        comment = (
            f"Credits what {correction.invoice.document_number} still owes; replaced by "
            f"{correction.replacement.document_number}"
        )
        return self._adjustment_steps(
            correction, "", invoice_id, len(correction.invoice.lines), comment
        )

    def settlement_steps(
        self, correction: Correction, client: ZuoraClientSettings
    ) -> Sequence[ZuoraStep]:
        """Set what was paid of the credited revision against the new revision's invoice.

        Credit adjustments of the new invoice's items, up to its balance when first read;
        anything paid beyond that stays with the client (refund it, or make it a credit balance,
        in Zuora: SOAP 78.0 cannot) and is named in the step's ids.
        """
        remote = correction.remote
        if remote is None or remote.amount_paid <= 0:
            return []
        comment = (
            f"Paid on {correction.invoice.document_number}, which "
            f"{correction.replacement.document_number} replaces"
        )
        return self._adjustment_steps(
            correction,
            "settle-",
            "{invoice_id}",
            len(correction.replacement.lines),
            comment,
            limit=remote.amount_paid,
        )

    def _status_step(self, name: str, invoice_id: str, status: str, done: set[str]) -> ZuoraStep:
        def lookup(ctx: ZuoraContext) -> Mapping[str, str] | None:
            records = self._query(ctx, invoice_query(invoice_id), first=True)
            if not records:
                raise TerminalError(f"Zuora invoice {invoice_id} no longer exists")
            held = str(records[0].Status or "")
            if held not in done:
                return None
            return {INVOICE_STATUS: held, "corrected_invoice_id": invoice_id}

        def send(ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
            self._save(ctx, request, first=True)
            return {INVOICE_STATUS: status, "corrected_invoice_id": invoice_id}

        return Step(
            name,
            request=lambda ctx: self._request(
                self.wsdl.update("Invoice", to_zuora_invoice_status(invoice_id, status))
            ),
            send=send,
            lookup=lookup,
        )

    def _adjustment_steps(
        self,
        correction: Correction,
        prefix: str,
        invoice_id: str,
        count: int,
        comment: str,
        *,
        limit: Decimal | None = None,
    ) -> list[ZuoraStep]:
        """An ``items`` read (recorded), then one credit adjustment per item.

        What is credited is the invoice's balance when first read (at most ``limit``), spread
        over its items in order; the read is a recorded fact, so a re-run spreads it the same.
        """

        def target(ctx: ZuoraContext) -> str:
            return invoice_id if "{" not in invoice_id else ctx.refs.get(INVOICE_ID, invoice_id)

        def read_items(ctx: ZuoraContext) -> Mapping[str, str] | None:
            held = target(ctx)
            invoices = self._query(ctx, invoice_query(held), first=True)
            if not invoices:
                raise TerminalError(f"Zuora invoice {held} no longer exists")
            ctx.throttle()  # the items are a second query
            items = self._query(ctx, invoice_items_amounts_query(held), first=False)
            if len(items) != count:
                raise TerminalError(
                    f"Zuora invoice {held} has {len(items)} items, not {count}: credit it by hand"
                )
            balance = _decimal(invoices[0].Balance) or Decimal(0)
            return item_refs(prefix, items, balance)

        def no_items(ctx: ZuoraContext, request: StepRequest) -> Mapping[str, str]:
            raise TerminalError("the invoice's items were not found")  # read_items always finds

        def spread(ctx: ZuoraContext) -> list[Decimal]:
            due = Decimal(ctx.refs.get(f"{prefix}balance", "0"))
            if limit is not None:
                due = min(due, limit)
            amounts = [
                Decimal(ctx.refs.get(f"{prefix}item_{n}_amount", "0")) for n in range(1, count + 1)
            ]
            return allocate(due, amounts)

        steps: list[ZuoraStep] = [
            Step(
                f"{prefix}items",
                request=lambda ctx: self._request(
                    self.wsdl.query(invoice_items_amounts_query(target(ctx)))
                ),
                send=no_items,
                lookup=read_items,
            )
        ]
        for n in range(1, count + 1):
            steps.append(
                Step(
                    f"{prefix}credit-{n}",
                    request=partial(
                        self._adjustment_request,
                        correction=correction,
                        target=target,
                        item=f"{prefix}item_{n}",
                        spread=spread,
                        index=n - 1,
                        comment=comment,
                    ),
                    send=partial(self._send_adjustment, item=f"{prefix}item_{n}"),
                    lookup=partial(self._lookup_adjustment, item=f"{prefix}item_{n}"),
                    skip=partial(_nothing_to_credit, spread=spread, index=n - 1),
                )
            )
        return steps

    def _adjustment_request(
        self,
        ctx: ZuoraContext,
        *,
        correction: Correction,
        target: Callable[[ZuoraContext], str],
        item: str,
        spread: Callable[[ZuoraContext], list[Decimal]],
        index: int,
        comment: str,
    ) -> StepRequest:
        fields = to_zuora_credit_adjustment(
            correction,
            target(ctx),
            ctx.refs.get(item, "{" + item + "}"),
            spread(ctx)[index],
            comment=comment,
        )
        return self._request(self.wsdl.create("InvoiceItemAdjustment", fields))

    def _send_adjustment(
        self, ctx: ZuoraContext, request: StepRequest, *, item: str
    ) -> Mapping[str, str]:
        return {f"{item}_adjustment": self._save(ctx, request, first=True)}

    def _lookup_adjustment(self, ctx: ZuoraContext, *, item: str) -> Mapping[str, str] | None:
        item_id = ctx.refs.get(item)
        if not item_id:
            return None
        for record in self._query(ctx, adjustment_query(item_id), first=True):
            if str(record.Type) == "Credit" and str(record.Status or "") != "Canceled":
                return {f"{item}_adjustment": str(record.Id)}
        return None

    def _read(self, zoql: str, *, first: bool = False) -> list[Any]:
        """One query outside any step; every record, or an error when Zuora pages them."""
        result = self._post(_no_throttle, self.wsdl.query(zoql), first=first)
        if getattr(result, "done", True) is False:
            # NOTE: a query answers at most 2,000 records before queryMore (Zuora, "query()");
            # one invoice's subscriptions, items and invoices are a handful.
            raise TerminalError(f"Zuora paged the answer to {zoql[:80]!r}: too many records")
        return list(getattr(result, "records", None) or [])

    # -- calls ------------------------------------------------------------------------------

    def _query(self, ctx: ZuoraContext, zoql: str, *, first: bool) -> list[Any]:
        result = self._post(ctx.throttle, self.wsdl.query(zoql), first=first)
        return list(getattr(result, "records", None) or [])

    def _save(self, ctx: ZuoraContext, request: StepRequest, *, first: bool) -> str:
        """Send a create/update step; the saved object's id."""
        operation = str(request.payload["operation"])
        result = _first_result(self._call(ctx, request, first=first), operation)
        _raise_errors(result, operation)
        return str(result.Id)

    def _call(self, ctx: ZuoraContext, request: StepRequest, *, first: bool) -> Any:
        envelope = Envelope(
            str(request.payload["operation"]), str(request.payload["envelope"]), request.headers
        )
        return self._post(ctx.throttle, envelope, first=first)

    def _post(self, throttle: Callable[[], object], envelope: Envelope, *, first: bool) -> Any:
        """One request with a valid session; a login before it takes its own rate slot.

        ``first``: the first request of the step's attempt (the hub reserved its slot);
        every further request reserves one with ``throttle()`` (the step's ``ctx.throttle``).
        """
        session, logged_in = self._current_session()
        if logged_in or not first:
            throttle()
        try:
            return self.wsdl.post(self.transport, session.address, envelope, session=session.id)
        except ZuoraApiError as exc:
            if exc.code == INVALID_SESSION:
                self._drop_session(session)
            raise

    @property
    def transport(self) -> Any:
        """The zeep requests transport, made on first use."""
        with self._lock:
            if self._transport is None:
                self._transport = make_transport()
            return self._transport

    def _current_session(self) -> tuple[_Session, bool]:
        """The session to use, logging in first when there is none or it is about to expire.

        A refused login is remembered: Zuora locks a user after repeated failed logins, so no
        other delivery of this run tries the same credentials again.
        """
        transport = self.transport
        with self._login_lock:
            if self._login_refused is not None:
                refused = self._login_refused
                raise TerminalError(
                    f"{refused.message} (not tried again in this run)",
                    request_id=refused.request_id,
                    status=refused.status,
                    code=refused.code,
                )
            session = self._session
            if session is not None and self._clock() < session.renew_at:
                return session, False
            try:
                session_id, server_url = self.wsdl.post_login(
                    transport,
                    self.endpoint,
                    self.settings.username.get_secret_value(),
                    self.settings.password.get_secret_value(),
                )
            except ZuoraApiError as exc:
                error = classify_zuora_error(exc)
                if not error.retriable:
                    self._login_refused = error.scrubbed(self.secrets())
                raise
            self.logins += 1
            lifetime = self.settings.session_lifetime
            self._session = _Session(
                session_id,
                self._address(server_url),
                self._clock() + lifetime - min(SESSION_MARGIN, lifetime / 10),
            )
            return self._session, True

    def _drop_session(self, failed: _Session) -> None:
        # NOTE: INVALID_SESSION (expired or revoked): forget the session so the hub's one
        # immediate retry (CredentialsExpired) logs in again; another thread may already have.
        with self._login_lock:
            if self._session is failed:
                self._session = None

    def _address(self, server_url: str | None) -> str:
        """Where calls go after login.

        NOTE: Zuora answers login with the ServerUrl of the tenant's own service (its data
        center), to be used for every later call; we follow it when it is https. A local
        KIKI_ZUORA_API_BASE (a fake, a proxy on this machine) stays authoritative, so tests and
        recordings never leave the machine whatever ServerUrl says.
        """
        if urlsplit(self.endpoint).hostname in _LOCAL_HOSTS or not server_url:
            return self.endpoint
        parts = urlsplit(server_url)
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            return self.endpoint
        return server_url

    def classify(self, error: Exception) -> DeliveryError:
        """Zuora's codes, then HTTP rules; see :func:`classify_zuora_error`."""
        return classify_zuora_error(error)

    def close(self) -> None:
        """Drop the HTTP session and the login session."""
        with self._lock:
            transport, self._transport = self._transport, None
        with self._login_lock:
            self._session = None
        if transport is not None:
            transport.session.close()


def _nothing_to_credit(
    ctx: ZuoraContext, *, spread: Callable[[ZuoraContext], list[Decimal]], index: int
) -> Mapping[str, str] | None:
    """An item the credit does not reach (the amount is spread over the items before it)."""
    return {} if spread(ctx)[index] <= 0 else None


def _ref(ctx: ZuoraContext, name: str) -> str:
    """An id an earlier step recorded, or its ``{placeholder}`` (dry run)."""
    return ctx.refs.get(name) or "{" + name + "}"


def _account_refs(invoice: Invoice, record: Any) -> dict[str, str]:
    currency = str(record.Currency or "")
    if currency and currency.upper() != invoice.currency.upper():
        raise _currency_error(invoice, str(record.Id), currency)
    refs = {
        ACCOUNT_ID: str(record.Id),
        ACCOUNT_NUMBER: str(record.AccountNumber),
        ACCOUNT_CURRENCY: currency.upper(),
        ACCOUNT_STATUS: str(record.Status or ""),
    }
    if record.BillToId:
        refs[CONTACT_ID] = str(record.BillToId)
    return refs


def _currency_error(invoice: Invoice, account_id: str, currency: str) -> TerminalError:
    return TerminalError(
        f"Zuora account {account_id} bills in {currency}, but invoice {invoice.number} is in "
        f"{invoice.currency}; bill this client from an account in {invoice.currency} "
        "(account_number in [clients.zuora])",
        code="currency_mismatch",
    )


def _skip_account(ctx: ZuoraContext) -> Mapping[str, str] | None:
    """The account a previous period found or made, if it is still the configured one."""
    known = ctx.refs.get(ACCOUNT_ID)
    wanted = account_number(ctx.invoice, ctx.client)
    if not known or ctx.refs.get(ACCOUNT_NUMBER) != wanted:
        return None
    if ctx.refs.get(ACCOUNT_CURRENCY) != ctx.invoice.currency.upper():
        return None  # the look-up reads the account's currency again (and refuses a mismatch)
    return {
        ACCOUNT_ID: known,
        ACCOUNT_NUMBER: wanted,
        ACCOUNT_CURRENCY: ctx.refs[ACCOUNT_CURRENCY],
        **({ACCOUNT_STATUS: ctx.refs[ACCOUNT_STATUS]} if ctx.refs.get(ACCOUNT_STATUS) else {}),
    }


def _skip_contact(ctx: ZuoraContext) -> Mapping[str, str] | None:
    known = ctx.refs.get(CONTACT_ID)
    return {CONTACT_ID: known} if known else None


def _skip_activate(ctx: ZuoraContext) -> Mapping[str, str] | None:
    return {ACCOUNT_STATUS: ACTIVE} if ctx.refs.get(ACCOUNT_STATUS) == ACTIVE else None


def _first_result(results: Any, operation: str) -> Any:
    items = list(results or [])
    if len(items) != 1:
        # An answer of another shape leaves the outcome unknown: retrying is safe (unique
        # account numbers and subscription names), failing would make `retry` send anew.
        raise TransientError(f"Zuora {operation} answered {len(items)} results for one request")
    return items[0]


def _raise_errors(result: Any, operation: str) -> None:
    """Raise the errors of a ``Success=false`` create/update/subscribe result."""
    if result.Success:
        return
    errors = list(result.Errors or [])
    codes = [str(e.Code) for e in errors if e.Code]
    messages = [str(e.Message).strip() for e in errors if e.Message]
    fields = [str(e.Field) for e in errors if getattr(e, "Field", None)]
    raise ZuoraApiError(
        "; ".join(messages) or "Success=false without a message",
        operation=operation,
        code=DUPLICATE_VALUE if DUPLICATE_VALUE in codes else (codes[0] if codes else None),
        field=fields[0] if fields else None,
    )


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _no_throttle() -> None:
    """A read back is no step: no step context reserves a rate-limit slot for it."""


def _remote_invoice(
    record: Any,
    subscription: Any,
    currencies: Mapping[str, str],
    number: str,
    revision: int,
) -> RemoteInvoice:
    """A Zuora invoice record as the hub reads it back."""
    amount = _decimal(record.Amount) or Decimal(0)
    balance = _decimal(record.Balance) or Decimal(0)
    status = str(record.Status or "")
    state = zuora_payment_state(status, amount, balance)
    if state is None:
        raise TerminalError(
            f"Zuora invoice {record.InvoiceNumber} ({record.Id}) has status {status!r}, which "
            "kiki-billing does not know (Draft, Posted and Canceled are)",
            code="invoice_status",
        )
    currency = currencies.get(str(record.AccountId), "")
    if not currency:
        raise TerminalError(
            f"Zuora account {record.AccountId} of invoice {record.Id} has no currency"
        )
    refs = {
        INVOICE_ID: str(record.Id),
        INVOICE_NUMBER: str(record.InvoiceNumber or ""),
        INVOICE_STATUS: status,
        ACCOUNT_ID: str(record.AccountId),
        SUBSCRIPTION_ID: str(subscription.Id),
        SUBSCRIPTION_NAME: str(subscription.Name),
    }
    due = record.DueDate
    return RemoteInvoice(
        refs=refs,
        kiki_number=number,
        kiki_revision=revision,
        number=str(record.InvoiceNumber) if record.InvoiceNumber else None,
        currency=currency,
        total=amount,
        # NOTE: "Amount - Payments + Adjustments - Applied Credit Balance = Balance", and a
        # refund of a payment leaves PaymentAmount as it was and adds RefundAmount (SOAP object
        # reference, Invoice, "Additional field details"): paid is payments less refunds.
        amount_paid=(_decimal(record.PaymentAmount) or Decimal(0))
        - (_decimal(record.RefundAmount) or Decimal(0)),
        state=state,
        due_date=due if isinstance(due, date) else None,
    )
