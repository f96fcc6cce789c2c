"""Pure payload mappers: our invoice to Stripe's wire format, tested without a server.

Every function here builds exactly the parameters the adapter sends (and ``--dry-run`` shows);
none does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from kiki_billing.plugin import (
    MONEY_CONTEXT,
    AmountLimitError,
    Correction,
    InputError,
    Invoice,
    InvoiceLine,
    PaymentState,
    RemoteInvoice,
    credit_note_number,
    currency_exponent,
)

from .settings import StripeClientSettings

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


def stripe_exponent(currency: str) -> int:
    """How many decimals Stripe's integer amounts carry in ``currency``.

    Raises:
        AmountLimitError: An unknown currency.
    """
    code = currency.upper()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    if code in TWO_DECIMAL_WHOLE_CURRENCIES:
        return 2
    try:
        return currency_exponent(code)
    except InputError as exc:
        raise AmountLimitError(exc.message) from None


def from_stripe_amount(amount_minor: int, currency: str) -> Decimal:
    """A Stripe integer amount in the currency's major unit (``1999`` USD -> ``19.99``)."""
    return Decimal(int(amount_minor)).scaleb(-stripe_exponent(currency), context=MONEY_CONTEXT)


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
    exponent = stripe_exponent(code)
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
    """The memo shown on the Stripe invoice: our number, with ``-R<n>`` from revision 1.

    NOTE: Stripe numbers its invoices itself (the customer's prefix and a sequence); ours is in
    the description and the metadata (``kiki_invoice_number`` and ``kiki_revision``).
    """
    text = f"Profit share {invoice.period}, invoice {invoice.document_number}"
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


def invoice_search_query(invoice: Invoice) -> str:
    """The Stripe Search query for every invoice carrying this number and revision."""
    number = invoice.number.replace("\\", "\\\\").replace("'", "\\'")
    return (
        f"metadata['kiki_invoice_number']:'{number}' AND "
        f"metadata['kiki_revision']:'{invoice.revision}'"
    )


def carries(found: Mapping[str, Any], invoice: Invoice) -> bool:
    """Whether a Stripe invoice carries this invoice's number and revision in its metadata."""
    metadata = found.get("metadata") or {}
    return bool(
        metadata.get("kiki_invoice_number") == invoice.number
        and metadata.get("kiki_revision") == str(invoice.revision)
    )


def stripe_payment_state(found: Mapping[str, Any]) -> PaymentState:
    """A Stripe invoice's :class:`PaymentState`.

    ``draft``, ``paid``, ``void`` and ``uncollectible`` are Stripe's own statuses (2023-08-16
    spec: "one of draft, open, paid, uncollectible, or void"). An ``open`` invoice is
    ``partly_paid`` once something is paid of it, else ``payment_failed`` after a failed
    collection attempt, else ``open``.
    """
    status = str(found.get("status") or "")
    if status in ("draft", "paid", "void", "uncollectible"):
        return PaymentState(status)
    if status != "open":
        raise ValueError(f"unknown Stripe invoice status {status!r}")
    if int(found.get("amount_paid") or 0) > 0:
        return PaymentState.PARTLY_PAID
    # NOTE: attempt_count is the "number of payment attempts made for this invoice" (any
    # attempt counts as the first; automatic retries add to it), and `paid` is "whether payment
    # was successfully collected" (2023-08-16 spec, invoice). An open invoice with an attempt and
    # no successful payment had its collection fail; Stripe keeps it open and retries (Smart
    # Retries) until it is paid, voided or marked uncollectible. A payment still processing
    # (a bank debit) looks the same until it settles.
    if int(found.get("attempt_count") or 0) > 0 and not found.get("paid"):
        return PaymentState.PAYMENT_FAILED
    return PaymentState.OPEN


CREDIT_DUE = "due"
"""The part of a credit that lowers what is still due (a pre-payment credit note)."""
CREDIT_PAID = "paid"
"""The part of a credit that returns what was paid to the customer's credit balance."""


def credit_parts(correction: Correction) -> list[tuple[str, int]]:
    """The credit notes that credit a superseded revision in full, in minor units.

    A Stripe credit note on an open invoice may not exceed what remains due and carries no
    customer credit; one on a paid invoice must put its whole total somewhere (2023-08-16 spec,
    ``POST /v1/credit_notes``). So what is unpaid is credited first (the invoice is then paid),
    then what was paid goes to the customer's credit balance, which Stripe applies to the next
    invoice finalized: the new revision. Both amounts come from the invoice's total and what was
    paid of it, which crediting does not change, so a re-run plans the same notes.
    """
    remote = correction.remote
    assert remote is not None
    currency = correction.invoice.currency
    paid = stripe_amount(min(remote.amount_paid, remote.total), currency)
    due = stripe_amount(remote.total, currency) - paid
    return [(part, amount) for part, amount in ((CREDIT_DUE, due), (CREDIT_PAID, paid)) if amount]


def to_stripe_credit_note(
    correction: Correction, part: str, amount_minor: int, invoice_id: str
) -> dict[str, Any]:
    """``POST /v1/credit_notes`` params: one part of the credit of a superseded revision.

    One custom line for the part's amount, a memo naming what it credits and what replaces it,
    and metadata by which the look-up finds it (``kiki_credits`` and ``kiki_part``).
    """
    credited, replacement = correction.invoice, correction.replacement
    what = "paid" if part == CREDIT_PAID else "due"
    params: dict[str, Any] = {
        "invoice": invoice_id,
        "lines": [
            {
                "type": "custom_line_item",
                "description": f"Credit ({what}) for invoice {credited.document_number}, "
                f"replaced by {replacement.document_number}",
                "quantity": 1,
                "unit_amount": amount_minor,
            }
        ],
        "memo": f"Credits invoice {credited.document_number} (profit share {credited.period}) in "
        f"full; replaced by {replacement.document_number}",
        # NOTE: 2023-08-16 enum: duplicate, fraudulent, order_change, product_unsatisfactory;
        # a corrected profit share changes what was ordered.
        "reason": "order_change",
        "metadata": {
            "kiki_invoice_number": credited.number,
            "kiki_credited_revision": str(credited.revision),
            "kiki_credits": credit_note_number(credited),
            "kiki_part": part,
            "kiki_replaced_by": replacement.document_number,
        },
    }
    if part == CREDIT_PAID:
        params["credit_amount"] = amount_minor
    return params


def is_credit_part(found: Mapping[str, Any], correction: Correction, part: str) -> bool:
    """Whether a Stripe credit note is this part of this correction (by its metadata)."""
    metadata = found.get("metadata") or {}
    return bool(
        metadata.get("kiki_credits") == credit_note_number(correction.invoice)
        and metadata.get("kiki_part") == part
        and found.get("status") != "void"
    )


def to_remote_invoice(found: Mapping[str, Any]) -> RemoteInvoice:
    """A Stripe invoice (as listed or searched) as the hub reads it back."""
    currency = str(found["currency"]).upper()
    metadata = found.get("metadata") or {}
    revision = str(metadata.get("kiki_revision") or "")
    customer = found.get("customer")
    if isinstance(customer, Mapping):
        customer = customer.get("id")
    refs = {INVOICE_ID: str(found["id"]), INVOICE_STATUS: str(found.get("status") or "")}
    if customer:
        refs[CUSTOMER_ID] = str(customer)
    if found.get("number"):
        refs[INVOICE_NUMBER] = str(found["number"])
    due = found.get("due_date")
    return RemoteInvoice(
        refs=refs,
        kiki_number=metadata.get("kiki_invoice_number"),
        kiki_revision=int(revision) if revision.isdigit() else None,
        number=str(found["number"]) if found.get("number") else None,
        currency=currency,
        total=from_stripe_amount(int(found.get("total") or 0), currency),
        amount_paid=from_stripe_amount(paid_minor(found), currency),
        state=stripe_payment_state(found),
        due_date=_epoch_date(due) if due else None,
    )


def paid_minor(found: Mapping[str, Any]) -> int:
    """What has been paid of a Stripe invoice: payments and the customer credit applied to it.

    NOTE: the customer's credit balance lowers ``amount_due`` when the invoice is finalized
    (``starting_balance`` before, ``ending_balance`` after) and is not counted in
    ``amount_paid``; an invoice settled by credit is paid all the same.
    """
    applied = 0
    if found.get("ending_balance") is not None:
        applied = int(found.get("ending_balance") or 0) - int(found.get("starting_balance") or 0)
    return int(found.get("amount_paid") or 0) + max(applied, 0)


def period_search_query(period: str) -> str:
    """The Stripe Search query for every invoice of ours for a period (``YYYY-MM``)."""
    return f"metadata['kiki_period']:'{period}'"


def _epoch_date(seconds: int) -> date:
    # NOTE: Stripe's timestamps are Unix seconds; the due day is taken in UTC.
    return datetime.fromtimestamp(int(seconds), UTC).date()
