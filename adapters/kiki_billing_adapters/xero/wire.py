"""Pure payload mappers: our invoice to Xero's Accounting API JSON, tested without a server.

Every function here builds exactly what the adapter sends (and ``--dry-run`` shows); none does
I/O. Amounts stay :class:`~decimal.Decimal` up to the wire, where :func:`encode_json` writes their
exact decimal text (Xero's JSON takes numbers; a float would not always be exact).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

from kiki_billing.plugin import (
    MONEY_CONTEXT,
    AmountLimitError,
    Correction,
    InputError,
    Invoice,
    InvoiceLine,
    PaymentState,
    RemoteInvoice,
    TerminalError,
    credit_note_number,
    currency_exponent,
)

from .settings import XeroClientSettings

# NOTE: Xero keeps line totals, tax, subtotals and totals at 2 decimal places whatever the
# currency (developer.xero.com "Rounding in Xero"); UnitAmount takes 2, or 4 with unitdp=4.
XERO_AMOUNT_DECIMALS = 2
# NOTE: maxLength in xero_accounting.yaml 16.1.0: Contact.Name 255, Contact.ContactNumber 50,
# Contact.EmailAddress 255, Invoice.InvoiceNumber 255.
MAX_CONTACT_NAME = 255
MAX_CONTACT_NUMBER = 50
MAX_EMAIL = 255
MAX_INVOICE_NUMBER = 255
# NOTE: "Description ... (max length = 4000)" (developer.xero.com, Invoices, LineItems).
MAX_LINE_DESCRIPTION = 4000
# NOTE: Xero's published limits per organisation (tenant): 60 calls a minute, 5 in flight,
# 5,000 a day (developer.xero.com "OAuth 2.0 API limits").
MINUTE_LIMIT = 60
DAY_LIMIT = 5000
CONCURRENT_LIMIT = 5

CONTACT_ID = "contact_id"
INVOICE_ID = "invoice_id"
INVOICE_NUMBER = "invoice_number"
INVOICE_STATUS = "invoice_status"

# Statuses of an invoice that was cancelled in Xero; its number stays taken.
CANCELLED_STATUSES = frozenset({"VOIDED", "DELETED"})


def xero_amount(amount: Decimal, currency: str) -> Decimal:
    """``amount`` as Xero can hold it exactly: at most 2 decimal places.

    Args:
        amount: A fee in the currency's major unit, rounded to its minor unit.
        currency: ISO 4217 code.

    Returns:
        The amount with ``min(exponent, 2)`` decimal places (``2209`` JPY, ``2209.00`` USD).

    Raises:
        AmountLimitError: The currency is unknown, or the amount has a non-zero third decimal
            (a three-decimal currency such as KWD), which Xero would round.
    """
    code = currency.upper()
    try:
        exponent = currency_exponent(code)
    except InputError as exc:
        raise AmountLimitError(exc.message) from None
    places = min(exponent, XERO_AMOUNT_DECIMALS)
    exact = amount.quantize(Decimal(1).scaleb(-places), context=MONEY_CONTEXT)
    if exact != amount:
        raise AmountLimitError(
            f"{amount} {code}: Xero keeps line and invoice totals to {XERO_AMOUNT_DECIMALS} "
            f"decimal places, so this amount would be rounded and the Xero total would differ "
            "from the invoice's"
        )
    return exact


def xero_invoice_number(invoice: Invoice) -> str:
    """The ``InvoiceNumber`` in Xero: ours, plus ``-R<n>`` for a revision after the first.

    ACCREC numbers are unique in an organisation and a voided invoice keeps its number, so a
    correction (void plus reissue) needs a number of its own.
    """
    return invoice.number if invoice.revision == 0 else f"{invoice.number}-R{invoice.revision}"


def number_revision(invoice_number: str, base: str) -> int | None:
    """The revision a Xero ``InvoiceNumber`` stands for, if it is one of number ``base``'s."""
    if invoice_number.casefold() == base.casefold():
        return 0
    found = re.fullmatch(re.escape(base) + r"-R([1-9]\d*)", invoice_number, re.I)
    return int(found[1]) if found else None


def invoice_reference(invoice: Invoice) -> str:
    """The invoice's ``Reference`` (as the Xero CSV export writes it)."""
    return f"Profit share {invoice.period}"


def where_equals(field: str, value: str) -> str:
    """A Xero ``where`` filter ``Field=="value"``, with quotes and backslashes escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{field}=="{escaped}"'


def query_path(path: str, params: Sequence[tuple[str, str]]) -> str:
    """``path?query`` with each value percent-encoded (spaces as ``%20``)."""
    if not params:
        return path
    return f"{path}?{urlencode(params, quote_via=quote, safe='')}"


def contacts_create_path() -> str:
    """``PUT /Contacts``, per-element errors in a 200."""
    return query_path("/Contacts", [("summarizeErrors", "false")])


def contact_lookup_path(client_id: str) -> str:
    """``GET /Contacts`` filtered on ``ContactNumber`` (archived contacts left out)."""
    return query_path("/Contacts", [("where", where_equals("ContactNumber", client_id))])


def invoices_create_path() -> str:
    """``PUT /Invoices`` (creates only), per-element errors in a 200."""
    return query_path("/Invoices", [("summarizeErrors", "false")])


def invoice_lookup_path(number: str) -> str:
    """``GET /Invoices?InvoiceNumbers=<n>``: every invoice carrying the number."""
    return query_path("/Invoices", [("InvoiceNumbers", number)])


def period_invoices_path(invoice_prefix: str) -> str:
    """``GET /Invoices`` whose number starts with ``KIKI-OaaS-YYYYMM-`` (every revision)."""
    escaped = invoice_prefix.replace("\\", "\\\\").replace('"', '\\"')
    where = f'Type=="ACCREC" AND InvoiceNumber.StartsWith("{escaped}")'
    return query_path("/Invoices", [("where", where)])


def invoice_path(invoice_id: str) -> str:
    """``GET /Invoices/{InvoiceID}``."""
    return f"/Invoices/{quote(invoice_id, safe='{}')}"


def credit_notes_create_path() -> str:
    """``PUT /CreditNotes`` (creates), per-element errors in a 200."""
    return query_path("/CreditNotes", [("summarizeErrors", "false")])


def credit_note_lookup_path(number: str) -> str:
    """``GET /CreditNotes`` filtered on ``CreditNoteNumber``."""
    return query_path("/CreditNotes", [("where", where_equals("CreditNoteNumber", number))])


def credit_note_path(credit_note_id: str) -> str:
    """``GET /CreditNotes/{CreditNoteID}`` (with its allocations)."""
    return f"/CreditNotes/{quote(credit_note_id, safe='{}')}"


def allocations_path(credit_note_id: str) -> str:
    """``PUT /CreditNotes/{CreditNoteID}/Allocations``, per-element errors in a 200."""
    return query_path(
        f"/CreditNotes/{quote(credit_note_id, safe='{}')}/Allocations",
        [("summarizeErrors", "false")],
    )


def to_xero_status_change(invoice_id: str, status: str) -> dict[str, Any]:
    """``POST /Invoices`` body that changes one invoice's status (``VOIDED``, ``DELETED``)."""
    return {"Invoices": [{"InvoiceID": invoice_id, "Status": status}]}


def to_xero_credit_note(
    correction: Correction, client: XeroClientSettings, contact_id: str
) -> dict[str, Any]:
    """``PUT /CreditNotes`` body: an ACCRECCREDIT credit note of the superseded revision's lines.

    The same lines, accounts and tax types as the invoice it credits, so Xero computes the
    same tax and total; numbered :func:`~kiki_billing.plugin.credit_note_number` (its natural
    key) and approved, so it can be allocated.
    """
    credited, replacement = correction.invoice, correction.replacement
    body: dict[str, Any] = {
        "Type": "ACCRECCREDIT",
        "Contact": {"ContactID": contact_id},
        "Date": _iso(replacement.issue_date),
        "Status": "AUTHORISED",
        "LineAmountTypes": client.line_amount_types,
        "CreditNoteNumber": credit_note_number(credited),
        "Reference": f"Credits {xero_invoice_number(credited)}; replaced by "
        f"{xero_invoice_number(replacement)}",
        "CurrencyCode": credited.currency.upper(),
        "LineItems": [to_xero_line_item(credited, line, client) for line in credited.lines],
    }
    if client.branding_theme_id:
        body["BrandingThemeID"] = client.branding_theme_id
    return {"CreditNotes": [body]}


def to_xero_allocation(invoice_id: str, amount: Decimal, on: date) -> dict[str, Any]:
    """``PUT /CreditNotes/{id}/Allocations`` body: set ``amount`` against one invoice."""
    return {
        "Allocations": [{"Invoice": {"InvoiceID": invoice_id}, "Amount": amount, "Date": _iso(on)}]
    }


def still_due(correction: Correction) -> Decimal:
    """What the credit note is allocated against the credited invoice: its total less payments.

    NOTE: AmountPaid counts payments only (xero_accounting.yaml 16.1.0), so this does not change
    when the credit note is allocated; what was paid stays on the credit note as the client's
    credit (its RemainingCredit).
    """
    remote = correction.remote
    assert remote is not None
    return max(remote.total - remote.amount_paid, Decimal(0))


def to_xero_contact(invoice: Invoice) -> dict[str, Any]:
    """``PUT /Contacts`` body for the invoice's client (``ContactNumber`` = client id)."""
    contact: dict[str, Any] = {"Name": invoice.client_name, "ContactNumber": invoice.client_id}
    if invoice.client_email:
        contact["EmailAddress"] = invoice.client_email
    return {"Contacts": [contact]}


def to_xero_line_item(
    invoice: Invoice, line: InvoiceLine, client: XeroClientSettings
) -> dict[str, Any]:
    """One ``LineItem``: quantity 1 at the line's fee, its total stated so Xero checks it."""
    amount = xero_amount(line.fee, invoice.currency)
    item: dict[str, Any] = {
        "Description": line.description,
        "Quantity": Decimal(1),
        "UnitAmount": amount,
        "LineAmount": amount,
        "AccountCode": client.account_code,
    }
    if client.tax_type:
        item["TaxType"] = client.tax_type
    return item


def to_xero_invoice(
    invoice: Invoice, client: XeroClientSettings, contact_id: str = "{contact_id}"
) -> dict[str, Any]:
    """``PUT /Invoices`` body: one ACCREC invoice for the contact, by ``ContactID`` only.

    Args:
        invoice: The invoice.
        client: The client's Xero settings.
        contact_id: The Xero contact, or the ``{contact_id}`` placeholder (dry run).

    Returns:
        The body, exactly as sent.

    Raises:
        AmountLimitError: A fee Xero cannot hold exactly.
    """
    # NOTE: a Contact given by Name alone that Xero does not know is created silently, so the
    # invoice names its contact by ContactID and nothing else (PROVIDERS.md).
    body: dict[str, Any] = {
        "Type": "ACCREC",
        "Contact": {"ContactID": contact_id},
        "Date": _iso(invoice.issue_date),
        "DueDate": _iso(invoice.due_date),
        "LineAmountTypes": client.line_amount_types,
        "InvoiceNumber": xero_invoice_number(invoice),
        "Reference": invoice_reference(invoice),
        "CurrencyCode": invoice.currency.upper(),
        "Status": client.status,
        "LineItems": [to_xero_line_item(invoice, line, client) for line in invoice.lines],
    }
    if client.branding_theme_id:
        body["BrandingThemeID"] = client.branding_theme_id
    return {"Invoices": [body]}


def _iso(value: date) -> str:
    # NOTE: Xero's JSON takes "YYYY-MM-DD" dates in requests (the spec's examples do); only
    # responses use the "/Date(ms+0000)/" form.
    return value.isoformat()


def xero_total(invoice: Invoice) -> Decimal:
    """The sum of the line amounts as Xero will hold them (equal to ``total_fee``)."""
    return sum(
        (xero_amount(line.fee, invoice.currency) for line in invoice.lines), start=Decimal(0)
    )


# --------------------------------------------------------------------------------------------
# The wire: exact JSON out, decimals in
# --------------------------------------------------------------------------------------------


def encode_json(value: Any) -> bytes:
    """JSON with every :class:`Decimal` written as its exact decimal text (never a float).

    Raises:
        TypeError: A value JSON cannot carry, or a non-finite decimal.
    """
    return _encode(value).encode("utf-8")


def _encode(value: Any) -> str:
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}: {_encode(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_encode(v) for v in value) + "]"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"{value} cannot be sent as a JSON number")
        return format(value, "f")
    if value is None or isinstance(value, bool | int | str):
        return json.dumps(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def decode_json(text: bytes | str) -> Any:
    """Parse a Xero response, numbers with a fraction as :class:`Decimal` (exact)."""
    return json.loads(text, parse_float=Decimal)


# --------------------------------------------------------------------------------------------
# Reading Xero's answers
# --------------------------------------------------------------------------------------------


def element_errors(element: Mapping[str, Any]) -> list[str]:
    """The validation messages of one element of a ``summarizeErrors=false`` answer."""
    errors = element.get("ValidationErrors") or []
    messages = [str(e.get("Message", "")).strip() for e in errors if isinstance(e, Mapping)]
    messages = [m for m in messages if m]
    flagged = element.get("HasErrors") or element.get("HasValidationErrors")
    if flagged and not messages:
        messages = ["Xero reported a validation error without a message"]
    return messages


def only_element(body: Any, collection: str) -> Mapping[str, Any]:
    """The one element of ``body[collection]`` a single-element write returns.

    Raises:
        TerminalError: The answer does not hold exactly one element.
    """
    items = body.get(collection) if isinstance(body, Mapping) else None
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], Mapping):
        raise TerminalError(f"Xero answered without exactly one element in {collection}")
    return items[0]


def error_message(body: Any, fallback: str) -> tuple[str, str | None]:
    """The message and code of a Xero error body (API error, problem details, OAuth error).

    Returns:
        ``(message, code)``; every validation message of every element is joined.
    """
    if isinstance(body, Mapping):
        if "Elements" in body or "ErrorNumber" in body:
            details = [m for el in body.get("Elements") or [] for m in element_errors(el)]
            message = str(body.get("Message") or fallback)
            if details:
                message = f"{message}: " + "; ".join(details)
            return message, (str(body["Type"]) if body.get("Type") else None)
        if "Title" in body or "Detail" in body:
            parts = [str(body[k]) for k in ("Title", "Detail") if body.get(k)]
            return ": ".join(parts) or fallback, None
        if "error" in body:
            code = str(body["error"])
            detail = body.get("error_description")
            return (f"{code}: {detail}" if detail else code), code
    return fallback, None


# --------------------------------------------------------------------------------------------
# Reading invoices back
# --------------------------------------------------------------------------------------------

# NOTE: a DELETED invoice (only DRAFT and SUBMITTED ones can be deleted) is gone for billing
# purposes, though Xero may still list it; the hub reads it as no invoice at all.
GONE_STATUSES = frozenset({"DELETED"})


def xero_payment_state(found: Mapping[str, Any]) -> PaymentState:
    """A Xero invoice's :class:`PaymentState`.

    Xero's statuses (xero_accounting.yaml 16.1.0, Invoice.Status): DRAFT and SUBMITTED (awaiting
    approval, not yet issued) read as draft; AUTHORISED is open, or partly paid once a payment
    or credit note lowered what is due (AmountPaid, AmountCredited); PAID is paid and VOIDED
    void. Xero has no failed collection and no uncollectible status.
    """
    status = str(found.get("Status") or "")
    if status in ("DRAFT", "SUBMITTED"):
        return PaymentState.DRAFT
    if status == "PAID":
        return PaymentState.PAID
    if status == "VOIDED":
        return PaymentState.VOID
    if status != "AUTHORISED":
        raise ValueError(f"unknown Xero invoice status {status!r}")
    if _money(found.get("AmountDue")) <= 0 < _money(found.get("Total")):
        return PaymentState.PAID
    if _money(found.get("AmountPaid")) > 0 or _money(found.get("AmountCredited")) > 0:
        return PaymentState.PARTLY_PAID
    return PaymentState.OPEN


def to_remote_invoice(found: Mapping[str, Any], base: str) -> RemoteInvoice:
    """A Xero invoice (as listed) as the hub reads it back."""
    number = str(found.get("InvoiceNumber") or "")
    refs = {
        INVOICE_ID: str(found["InvoiceID"]),
        INVOICE_NUMBER: number,
        INVOICE_STATUS: str(found.get("Status") or ""),
    }
    contact = (found.get("Contact") or {}).get("ContactID")
    if contact:
        refs[CONTACT_ID] = str(contact)
    revision = number_revision(number, base)
    return RemoteInvoice(
        refs=refs,
        kiki_number=base if revision is not None else None,
        kiki_revision=revision,
        number=number or None,
        currency=str(found.get("CurrencyCode") or "").upper(),
        total=_money(found.get("Total")),
        # NOTE: AmountPaid is the "Sum of payments received for invoice"; credit notes, over-
        # and prepayments applied are AmountCredited (xero_accounting.yaml 16.1.0), not paid.
        amount_paid=_money(found.get("AmountPaid")),
        state=xero_payment_state(found),
        due_date=xero_date(found.get("DueDateString") or found.get("DueDate")),
    )


_MS_DATE = re.compile(r"/Date\((-?\d+)(?:[+-]\d{4})?\)/")


def xero_date(value: Any) -> date | None:
    """A date Xero answered: ``2026-03-03T00:00:00`` (``...String`` fields) or ``/Date(ms)/``."""
    if not value:
        return None
    text = str(value)
    found = _MS_DATE.fullmatch(text)
    if found:
        # NOTE: the milliseconds of a /Date(ms+0000)/ are the day's midnight in UTC.
        return datetime.fromtimestamp(int(found[1]) / 1000, UTC).date()
    return date.fromisoformat(text[:10])


def _money(value: Any) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)
