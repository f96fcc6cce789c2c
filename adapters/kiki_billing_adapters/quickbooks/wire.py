"""Pure payload mappers: our invoice to QuickBooks Online's v3 JSON, tested without a server.

QBO's JSON uses the element names of Intuit's v3 XSD (``Finance.xsd``): every payload built here
holds only elements that schema defines, which the tests check against the XSD itself. Nothing
here does I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

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
    currency_exponent,
    revision_number,
)

from .settings import QuickBooksClientSettings

CUSTOMER_ID = "customer_id"
CUSTOMER_CURRENCY = "customer_currency"
ITEM_ID = "item_id"
ITEM_NAME = "item_name"
INCOME_ACCOUNT_ID = "income_account_id"
INVOICE_ID = "invoice_id"
INVOICE_EMAIL_STATUS = "invoice_email_status"
SYNC_TOKEN = "sync_token"  # noqa: S105 - the name of a ref, not a secret
CREDIT_MEMO_ID = "credit_memo_id"
EMAIL_SENT = "EmailSent"

# NOTE: DocNumber holds at most 21 characters in QBO (Finance.xsd, Transaction/DocNumber:
# "ValidRange: QBO: max=21"). The QuickBooks CSV export drops the "KIKI-" prefix of
# "KIKI-OaaS-YYYYMM-NNNNNN" for the same reason; this is the same rule, so a CSV import and an
# API delivery of one invoice carry the same number.
DOC_NUMBER_MAX = 21
DOC_NUMBER_PREFIX = "KIKI-"
# NOTE: Customer.DisplayName: "max 500 chars" in Intuit's API reference (Customer entity); the
# XSD gives no length. It must be unique across customers, vendors and employees (error 6240)
# and must not contain ':' (IntuitNamesTypes.xsd, Customer business rules).
MAX_DISPLAY_NAME = 500
# NOTE: Line/Description and Transaction/PrivateNote: 4000 characters (Finance.xsd Line
# documentation; Intuit's API reference for PrivateNote). EmailAddress/Address: 100 characters
# in QBO (IntuitBaseTypes.xsd).
MAX_LINE_DESCRIPTION = 4000
MAX_PRIVATE_NOTE = 4000
MAX_EMAIL = 100
# NOTE: QBO keeps line amounts to 2 decimals and checks Amount == round(Qty * UnitPrice, 2)
# (error 6070, "Amount is not equal to UnitPrice * Qty"); quantities and unit prices take up
# to 7 (PROVIDERS.md).
AMOUNT_DECIMALS = 2
AMOUNT_QUANTUM = Decimal(1).scaleb(-AMOUNT_DECIMALS)
QUANTITY = Decimal(1)
# NOTE: Intuit's published limits per realm: 500 requests/min, 10/s, 10 in flight
# (blogs.intuit.com 2016-08-08 "QuickBooks Online API throttling changes"; PROVIDERS.md).
REQUESTS_PER_SECOND = 10
REQUESTS_PER_MINUTE = 500
CONCURRENCY = 10


def doc_number(invoice_number: str, revision: int = 0) -> str:
    """The invoice number as a QuickBooks DocNumber (the CSV export's 21-character form).

    ``OaaS-202601-000042`` for revision 0, ``OaaS-202601-000042-R1`` from revision 1: a
    superseded revision keeps its DocNumber (voided or credited), so each revision needs its own.

    Raises:
        TerminalError: It does not fit in 21 characters even without ``KIKI-`` (revisions above
            9 do not).
    """
    short = invoice_number.removeprefix(DOC_NUMBER_PREFIX)
    if revision:
        short = f"{short}-R{revision}"
    if len(short) > DOC_NUMBER_MAX:
        raise TerminalError(
            f"invoice number {revision_number(invoice_number, revision)!r} does not fit "
            f"QuickBooks' {DOC_NUMBER_MAX}-character DocNumber",
            code="DocNumber",
        )
    return short


def credit_memo_number(invoice: Invoice) -> str:
    """The DocNumber of the credit memo that credits a revision: ``OaaS-...-C<revision>``.

    (``-CN`` after a revision's ``-R1`` would not fit QBO's 21 characters.)

    Raises:
        TerminalError: It does not fit in 21 characters.
    """
    short = f"{invoice.number.removeprefix(DOC_NUMBER_PREFIX)}-C{invoice.revision}"
    if len(short) > DOC_NUMBER_MAX:
        raise TerminalError(
            f"credit memo number {short!r} does not fit QuickBooks' {DOC_NUMBER_MAX}-character "
            "DocNumber",
            code="DocNumber",
        )
    return short


def credit_marker(invoice: Invoice) -> str:
    """What identifies the credit memo of a revision in its PrivateNote."""
    return f"kiki-billing credit note for invoice {invoice.number} revision {invoice.revision},"


def applied_marker(invoice: Invoice) -> str:
    """What identifies the payment that applies that credit memo, in its PrivateNote."""
    return (
        f"kiki-billing applies the credit note of invoice {invoice.number} revision "
        f"{invoice.revision}"
    )


def display_name(invoice: Invoice) -> str:
    """The customer's DisplayName: the client's name (QBO trims surrounding blanks itself)."""
    return invoice.client_name.strip()


def note_marker(invoice: Invoice) -> str:
    """What identifies our invoice (number and revision) in its PrivateNote."""
    return f"kiki-billing invoice {invoice.number} revision {invoice.revision},"


def private_note(invoice: Invoice) -> str:
    """The invoice's PrivateNote: the full invoice number, its revision and the period."""
    return f"{note_marker(invoice)} profit share {invoice.period}"


InvoiceOwner = Literal["ours", "other-revision", "foreign"]


def invoice_owner(found: Mapping[str, Any], invoice: Invoice) -> InvoiceOwner:
    """Whether a QBO invoice with our DocNumber is this invoice, another revision, or not ours."""
    note = str(found.get("PrivateNote") or "")
    if note_marker(invoice) in note:
        return "ours"
    if f"kiki-billing invoice {invoice.number} revision " in note:
        return "other-revision"
    return "foreign"


_NOTE_MARKER = re.compile(r"kiki-billing invoice (?P<number>\S+) revision (?P<revision>\d+),")
# NOTE: voiding zeroes every amount and puts "Voided" in front of PrivateNote ("prepended to
# existing text if present": Intuit's Invoice API reference, void operation; "Voiding Invoice
# Objects", blogs.intuit.com 2016-04-06). The invoice stays, so queries still return it.
VOIDED_NOTE = "Voided"


def note_identity(note: str | None) -> tuple[str | None, int | None]:
    """The invoice number and revision our PrivateNote names, if it names them."""
    found = _NOTE_MARKER.search(note or "")
    if found is None:
        return None, None
    return found["number"], int(found["revision"])


def qbo_payment_state(found: Mapping[str, Any]) -> PaymentState:
    """A QBO invoice's :class:`PaymentState`, from its amounts (QBO keeps no status field).

    Voided: ``TotalAmt`` 0 and "Voided" in front of ``PrivateNote``. Otherwise ``Balance`` (what
    is still due after payments and credits applied) against ``TotalAmt``: all of it open, part
    of it partly paid, none of it paid (an invoice totalling 0 included). QBO has no draft
    invoice, no failed collection and no uncollectible state (a bad debt is written off with a
    credit memo: it reads as paid).
    """
    total = _decimal(found.get("TotalAmt"))
    balance = _decimal(found.get("Balance"))
    note = str(found.get("PrivateNote") or "")
    if total == 0 and note.startswith(VOIDED_NOTE):
        return PaymentState.VOID
    if balance <= 0:
        return PaymentState.PAID
    if balance < total:
        return PaymentState.PARTLY_PAID
    return PaymentState.OPEN


def to_remote_invoice(found: Mapping[str, Any], currency: str) -> RemoteInvoice:
    """A QBO invoice (as queried) as the hub reads it back.

    Args:
        found: The invoice.
        currency: The currency to assume when the answer carries no ``CurrencyRef``.
    """
    number, revision = note_identity(found.get("PrivateNote"))
    total = _decimal(found.get("TotalAmt"))
    held = str((found.get("CurrencyRef") or {}).get("value") or currency).upper()
    refs = {INVOICE_ID: str(found["Id"])}
    if found.get("SyncToken") is not None:
        # NOTE: an update (a void) must name the SyncToken the object has now (5010 otherwise).
        refs[SYNC_TOKEN] = str(found["SyncToken"])
    customer = (found.get("CustomerRef") or {}).get("value")
    if customer:
        refs[CUSTOMER_ID] = str(customer)
    if found.get("EmailStatus"):
        refs[INVOICE_EMAIL_STATUS] = str(found["EmailStatus"])
    due = found.get("DueDate")
    return RemoteInvoice(
        refs=refs,
        kiki_number=number,
        kiki_revision=revision,
        number=str(found["DocNumber"]) if found.get("DocNumber") else None,
        currency=held,
        total=total,
        # NOTE: QBO's invoice does not split what lowered its Balance into payments and
        # credits applied (LinkedTxn names them, without amounts): both count as paid here.
        amount_paid=total - _decimal(found.get("Balance")),
        state=qbo_payment_state(found),
        due_date=date.fromisoformat(str(due)[:10]) if due else None,
    )


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)


def qbo_amount(amount: Decimal, currency: str) -> Decimal:
    """An amount as QBO stores it: at most 2 decimals.

    Raises:
        AmountLimitError: The amount has more decimals than QBO keeps (three-decimal
            currencies such as KWD), or the currency is unknown.
    """
    try:
        currency_exponent(currency)
    except InputError as exc:
        raise AmountLimitError(exc.message) from None
    exponent = amount.as_tuple().exponent
    if not isinstance(exponent, int):
        raise AmountLimitError(f"{amount} {currency} is not a finite amount")
    if -exponent > AMOUNT_DECIMALS and amount != amount.quantize(AMOUNT_QUANTUM):
        raise AmountLimitError(
            f"{amount} {currency}: QuickBooks Online keeps amounts to {AMOUNT_DECIMALS} decimals"
        )
    return amount


def line_amount(quantity: Decimal, unit_price: Decimal) -> Decimal:
    """``round(Qty x UnitPrice, 2)``, the Amount QBO requires on a sales line."""
    return (quantity * unit_price).quantize(
        AMOUNT_QUANTUM, rounding=ROUND_HALF_UP, context=MONEY_CONTEXT
    )


def to_qbo_customer(invoice: Invoice) -> dict[str, Any]:
    """``POST /customer``: DisplayName, the currency it bills in (fixed at creation), email."""
    customer: dict[str, Any] = {
        "DisplayName": display_name(invoice),
        "CurrencyRef": {"value": invoice.currency},
    }
    if invoice.client_email:
        customer["PrimaryEmailAddr"] = {"Address": invoice.client_email}
    return customer


def to_qbo_item(name: str, income_account_id: str) -> dict[str, Any]:
    """``POST /item``: the service item every line refers to."""
    return {"Name": name, "Type": "Service", "IncomeAccountRef": {"value": income_account_id}}


def to_qbo_line(
    invoice: Invoice, line: InvoiceLine, item_id: str, client: QuickBooksClientSettings
) -> dict[str, Any]:
    """One ``SalesItemLine``: Qty 1 at the line's fee, ``Amount = round(Qty x UnitPrice, 2)``."""
    unit_price = qbo_amount(line.fee, invoice.currency)
    detail: dict[str, Any] = {
        "ItemRef": {"value": item_id},
        "Qty": QUANTITY,
        "UnitPrice": unit_price,
    }
    if client.tax_code:
        detail["TaxCodeRef"] = {"value": client.tax_code}
    return {
        "LineNum": line.line_no,
        "Description": line.description,
        "Amount": line_amount(QUANTITY, unit_price),
        "DetailType": "SalesItemLineDetail",
        "SalesItemLineDetail": detail,
    }


def to_qbo_invoice(
    invoice: Invoice, client: QuickBooksClientSettings, refs: Mapping[str, str]
) -> dict[str, Any]:
    """``POST /invoice``: the whole invoice with its lines, as sent.

    Args:
        invoice: The invoice.
        client: The client's QuickBooks settings (tax code, whether it is emailed).
        refs: Ids so far; ``{customer_id}``/``{item_id}`` placeholders stand in for missing ones.

    Returns:
        DocNumber (21-character form), the full number in PrivateNote, TxnDate, DueDate,
        CurrencyRef, CustomerRef, BillEmail when known, one SalesItemLine per line.
    """
    item_id = refs.get(ITEM_ID, "{item_id}")
    payload: dict[str, Any] = {
        "DocNumber": doc_number(invoice.number, invoice.revision),
        "TxnDate": invoice.issue_date.isoformat(),
        "DueDate": invoice.due_date.isoformat(),
        "PrivateNote": private_note(invoice),
        "CustomerRef": {"value": refs.get(CUSTOMER_ID, "{customer_id}")},
        "CurrencyRef": {"value": invoice.currency},
        "Line": [to_qbo_line(invoice, line, item_id, client) for line in invoice.lines],
    }
    if invoice.client_email:
        payload["BillEmail"] = {"Address": invoice.client_email}
    return payload


def to_qbo_void(invoice_id: str, sync_token: str) -> dict[str, Any]:
    """``POST /invoice?operation=void``: the invoice's Id and current SyncToken."""
    return {"Id": invoice_id, "SyncToken": sync_token}


def to_qbo_credit_memo(
    correction: Correction, client: QuickBooksClientSettings, refs: Mapping[str, str]
) -> dict[str, Any]:
    """``POST /creditmemo``: the superseded revision's lines, on the same customer and item.

    Numbered :func:`credit_memo_number`, its PrivateNote names the revision it credits
    (:func:`credit_marker`): together the natural key its look-up uses.
    """
    credited, replacement = correction.invoice, correction.replacement
    item_id = refs.get(ITEM_ID, "{item_id}")
    return {
        "DocNumber": credit_memo_number(credited),
        "TxnDate": replacement.issue_date.isoformat(),
        "PrivateNote": f"{credit_marker(credited)} replaced by {replacement.document_number}",
        "CustomerRef": {"value": refs.get(CUSTOMER_ID, "{customer_id}")},
        "CurrencyRef": {"value": credited.currency},
        "Line": [to_qbo_line(credited, line, item_id, client) for line in credited.lines],
    }


def to_qbo_credit_application(
    correction: Correction, amount: Decimal, refs: Mapping[str, str]
) -> dict[str, Any]:
    """``POST /payment`` of nothing that applies the credit memo to the credited invoice.

    NOTE: QBO applies a credit memo to an invoice through a Payment whose TotalAmt is 0 and
    whose lines link the invoice and the credit memo with the same amount (Intuit's Payment
    entity: Line.LinkedTxn of TxnType Invoice and CreditMemo).
    """
    credited = correction.invoice
    return {
        "CustomerRef": {"value": refs.get(CUSTOMER_ID, "{customer_id}")},
        "TotalAmt": Decimal("0.00"),
        "CurrencyRef": {"value": credited.currency},
        "TxnDate": correction.replacement.issue_date.isoformat(),
        "PrivateNote": applied_marker(credited),
        "Line": [
            {
                "Amount": amount,
                "LinkedTxn": [
                    {"TxnId": refs.get(INVOICE_ID, "{invoice_id}"), "TxnType": "Invoice"}
                ],
            },
            {
                "Amount": amount,
                "LinkedTxn": [
                    {"TxnId": refs.get(CREDIT_MEMO_ID, "{credit_memo_id}"), "TxnType": "CreditMemo"}
                ],
            },
        ],
    }


def still_due(correction: Correction) -> Decimal:
    """What the credit memo is applied against: the credited invoice's balance when decided."""
    return correction.still_due.quantize(AMOUNT_QUANTUM)


def credit_memo_query(number: str) -> str:
    """Finds credit memos by DocNumber."""
    return f"select * from CreditMemo where DocNumber = {quote(number)}"  # noqa: S608


def payments_query(payment_ids: list[str]) -> str:
    """Finds payments by Id."""
    listed = ", ".join(quote(i) for i in payment_ids)
    return f"select * from Payment where Id in ({listed})"  # noqa: S608


def period_invoices_query(prefix: str) -> str:
    """Every invoice whose DocNumber starts with a period's prefix (``OaaS-202601-``).

    NOTE: LIKE takes ``%`` as the only wildcard in QBO's query language (UNVERIFIED for
    DocNumber on every company).
    """
    return f"select * from Invoice where DocNumber like {quote(prefix + '%')} maxresults 1000"  # noqa: S608


def quote(value: str) -> str:
    r"""A value quoted for QBO's query language (``\\'`` escapes a quote)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def customer_query(name: str) -> str:
    """Finds the customer by DisplayName."""
    return f"select * from Customer where DisplayName = {quote(name)}"  # noqa: S608


def item_query(name: str) -> str:
    """Finds the item by Name."""
    return f"select * from Item where Name = {quote(name)}"  # noqa: S608


def invoice_query(number: str) -> str:
    """Finds invoices by DocNumber."""
    return f"select * from Invoice where DocNumber = {quote(number)}"  # noqa: S608


def account_query(income_account: str | None, *, by_id: bool = False) -> str:
    """Finds the income account: by Id or Name, or the first active one of type Income."""
    if income_account is None:
        # NOTE: name-list queries return active objects only unless Active is filtered on.
        return "select * from Account where AccountType = 'Income' maxresults 1"
    field = "Id" if by_id else "Name"
    return f"select * from Account where {field} = {quote(income_account)}"  # noqa: S608


def to_json_text(value: Any) -> str:
    """JSON with every :class:`~decimal.Decimal` written as its exact number (never a float).

    Non-ASCII text is escaped, so the body is the same bytes whatever the transport encodes.
    """
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}: {to_json_text(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(to_json_text(v) for v in value) + "]"
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a JSON number")
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not sent to QuickBooks")
