"""The QuickBooks Online and Xero invoice-import CSV formats (headers as the providers publish).

One CSV row per invoice line; rows of one invoice share its number. Amounts are the rounded
line fees, so each imported invoice totals exactly the invoice's fee.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Literal

from kiki_billing.models import Frozen, Invoice, revision_number
from kiki_billing.money import format_money


class XeroCsvSettings(Frozen):
    """Options of the Xero sales-invoice import CSV."""

    date_format: Literal["DD/MM/YYYY", "MM/DD/YYYY"] = "DD/MM/YYYY"
    account_code: str = "200"
    tax_type: str = "Tax Exempt"
    branding_theme: str | None = None


class QuickBooksCsvSettings(Frozen):
    """Options of the QuickBooks Online invoice import CSV."""

    date_format: Literal["MM/DD/YYYY", "DD/MM/YYYY"] = "MM/DD/YYYY"
    item: str = "Profit share"
    location: str | None = None
    home_currency: str = "USD"


XERO_HEADER = [
    "*ContactName",
    "EmailAddress",
    "POAddressLine1",
    "POAddressLine2",
    "POAddressLine3",
    "POAddressLine4",
    "POCity",
    "PORegion",
    "POPostalCode",
    "POCountry",
    "*InvoiceNumber",
    "Reference",
    "*InvoiceDate",
    "*DueDate",
    "InventoryItemCode",
    "*Description",
    "*Quantity",
    "*UnitAmount",
    "Discount",
    "*AccountCode",
    "*TaxType",
    "TrackingName1",
    "TrackingOption1",
    "TrackingName2",
    "TrackingOption2",
    "Currency",
    "BrandingTheme",
]
QUICKBOOKS_HEADER = [
    "*InvoiceNo",
    "*Customer",
    "*InvoiceDate",
    "*DueDate",
    "Terms",
    "Location",
    "Memo",
    "Item(Product/Service)",
    "ItemDescription",
    "ItemQuantity",
    "ItemRate",
    "*ItemAmount",
    "Service Date",
]
# NOTE: Xero's import takes at most 500 invoices per file.
XERO_INVOICES_PER_FILE = 500
# NOTE: QuickBooks Online caps DocNumber (the import's InvoiceNo) at 21 characters
# (Finance.xsd, Invoice/DocNumber); "KIKI-OaaS-YYYYMM-NNNNNN" is 23, so the "KIKI-" prefix is
# dropped there and the full number goes into the memo.
QUICKBOOKS_DOC_NUMBER_MAX = 21


def quickbooks_doc_number(invoice_number: str, revision: int = 0) -> str:
    """The invoice number as QuickBooks Online can store it (<= 21 characters).

    ``OaaS-202601-000042`` for revision 0, ``OaaS-202601-000042-R1`` from revision 1 (the
    revision suffix fits up to revision 9).
    """
    short = invoice_number.removeprefix("KIKI-")
    if revision:
        short = f"{short}-R{revision}"
    if len(short) > QUICKBOOKS_DOC_NUMBER_MAX:
        raise ValueError(
            f"{revision_number(invoice_number, revision)!r} does not fit QuickBooks' "
            "21-character DocNumber"
        )
    return short


def quickbooks_credit_memo_number(invoice_number: str, revision: int) -> str:
    """The DocNumber of the credit memo that credits a revision: ``...-C<revision>``.

    ``OaaS-202601-000042-C0`` credits revision 0 (``-CN`` after ``-R1`` would not fit 21).
    """
    short = f"{invoice_number.removeprefix('KIKI-')}-C{revision}"
    if len(short) > QUICKBOOKS_DOC_NUMBER_MAX:
        raise ValueError(f"credit memo {short!r} does not fit QuickBooks' 21-character DocNumber")
    return short


def _date(value: date, fmt: str) -> str:
    return value.strftime("%d/%m/%Y" if fmt == "DD/MM/YYYY" else "%m/%d/%Y")


# NOTE: a spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV
# injection"); a leading apostrophe makes it text, shown as written.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def text_cell(value: str) -> str:
    """A text cell that a spreadsheet can never take for a formula.

    Amount cells are not passed through here: they stay numbers (a negative fee-cap adjustment
    keeps its minus sign).
    """
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


def _csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def xero_rows(invoice: Invoice, settings: XeroCsvSettings) -> list[list[str]]:
    """The Xero import rows of one invoice."""
    rows = []
    for line in invoice.lines:
        row = dict.fromkeys(XERO_HEADER, "")
        row.update(
            {
                "*ContactName": text_cell(invoice.client_name),
                "EmailAddress": text_cell(invoice.client_email or ""),
                "*InvoiceNumber": invoice.document_number,
                "Reference": f"Profit share {invoice.period}",
                "*InvoiceDate": _date(invoice.issue_date, settings.date_format),
                "*DueDate": _date(invoice.due_date, settings.date_format),
                "*Description": text_cell(line.description),
                "*Quantity": "1",
                "*UnitAmount": format_money(line.fee, invoice.currency),
                "*AccountCode": text_cell(settings.account_code),
                "*TaxType": text_cell(settings.tax_type),
                "Currency": invoice.currency,
                "BrandingTheme": text_cell(settings.branding_theme or ""),
            }
        )
        rows.append([row[name] for name in XERO_HEADER])
    return rows


def render_xero_csv(invoices: Sequence[Invoice], settings: XeroCsvSettings) -> list[str]:
    """Xero sales-invoice import files: one per 500 invoices."""
    files = []
    for start in range(0, max(len(invoices), 1), XERO_INVOICES_PER_FILE):
        chunk = invoices[start : start + XERO_INVOICES_PER_FILE]
        files.append(_csv(XERO_HEADER, (row for inv in chunk for row in xero_rows(inv, settings))))
    return files


def quickbooks_header(invoices: Sequence[Invoice], settings: QuickBooksCsvSettings) -> list[str]:
    """The QuickBooks header; ``Currency`` is added when an invoice is not in home currency."""
    if any(inv.currency != settings.home_currency for inv in invoices):
        return [*QUICKBOOKS_HEADER, "Currency"]
    return list(QUICKBOOKS_HEADER)


def quickbooks_rows(
    invoice: Invoice, settings: QuickBooksCsvSettings, header: Sequence[str]
) -> list[list[str]]:
    """The QuickBooks import rows of one invoice."""
    rows = []
    for line in invoice.lines:
        amount = format_money(line.fee, invoice.currency)
        row = {
            "*InvoiceNo": quickbooks_doc_number(invoice.number, invoice.revision),
            "*Customer": text_cell(invoice.client_name),
            "*InvoiceDate": _date(invoice.issue_date, settings.date_format),
            "*DueDate": _date(invoice.due_date, settings.date_format),
            "Terms": f"Net {invoice.payment_terms_days}",
            "Location": text_cell(settings.location or ""),
            "Memo": f"{invoice.document_number} profit share {invoice.period}",
            "Item(Product/Service)": text_cell(settings.item),
            "ItemDescription": text_cell(line.description),
            "ItemQuantity": "1",
            "ItemRate": amount,
            "*ItemAmount": amount,
            "Service Date": _date(invoice.period_end, settings.date_format),
            "Currency": invoice.currency,
        }
        rows.append([row[name] for name in header])
    return rows


def render_quickbooks_csv(invoices: Sequence[Invoice], settings: QuickBooksCsvSettings) -> str:
    """The QuickBooks Online invoice import file."""
    header = quickbooks_header(invoices, settings)
    return _csv(header, (row for inv in invoices for row in quickbooks_rows(inv, settings, header)))


# --------------------------------------------------------------------------------------------
# Credit notes: what corrects a superseded revision in the files an accountant imports
# --------------------------------------------------------------------------------------------

# NOTE: Xero imports sales credit notes from Credit notes > Import with the invoice template's
# columns, CreditNoteNumber and CreditNoteDate in place of InvoiceNumber and InvoiceDate, no due
# date, amounts positive (Xero's credit note import template; UNVERIFIED against a Xero file).
XERO_CREDIT_NOTE_HEADER = [
    "*CreditNoteNumber"
    if name == "*InvoiceNumber"
    else "*CreditNoteDate"
    if name == "*InvoiceDate"
    else name
    for name in XERO_HEADER
    if name != "*DueDate"
]
# NOTE: QuickBooks Online's import tool takes invoices, not credit memos; this file lists the
# credit memo's lines (positive amounts, as QuickBooks enters them) for entry by hand or by an
# import app.
QUICKBOOKS_CREDIT_MEMO_HEADER = [
    "*CreditMemoNo",
    "*Customer",
    "*CreditMemoDate",
    "Location",
    "Memo",
    "Item(Product/Service)",
    "ItemDescription",
    "ItemQuantity",
    "ItemRate",
    "*ItemAmount",
    "Service Date",
]


def credit_note_reference(credited: Invoice, replacement: Invoice) -> str:
    """Why the credit note exists, in the words every format carries."""
    return (
        f"Credits {credited.document_number} (revision {credited.revision}); "
        f"replaced by {replacement.document_number}"
    )


def render_xero_credit_note_csv(
    credited: Invoice, replacement: Invoice, settings: XeroCsvSettings
) -> str:
    """The Xero credit-note import rows that credit ``credited`` in full."""
    rows = []
    for line in credited.lines:
        row = dict.fromkeys(XERO_CREDIT_NOTE_HEADER, "")
        row.update(
            {
                "*ContactName": text_cell(credited.client_name),
                "EmailAddress": text_cell(credited.client_email or ""),
                "*CreditNoteNumber": f"{credited.document_number}-CN",
                "Reference": text_cell(credit_note_reference(credited, replacement)),
                "*CreditNoteDate": _date(replacement.issue_date, settings.date_format),
                "*Description": text_cell(line.description),
                "*Quantity": "1",
                "*UnitAmount": format_money(line.fee, credited.currency),
                "*AccountCode": text_cell(settings.account_code),
                "*TaxType": text_cell(settings.tax_type),
                "Currency": credited.currency,
                "BrandingTheme": text_cell(settings.branding_theme or ""),
            }
        )
        rows.append([row[name] for name in XERO_CREDIT_NOTE_HEADER])
    return _csv(XERO_CREDIT_NOTE_HEADER, rows)


def render_quickbooks_credit_memo_csv(
    credited: Invoice, replacement: Invoice, settings: QuickBooksCsvSettings
) -> str:
    """The lines of the QuickBooks credit memo that credits ``credited`` in full."""
    header = list(QUICKBOOKS_CREDIT_MEMO_HEADER)
    if credited.currency != settings.home_currency:
        header.append("Currency")
    rows = []
    for line in credited.lines:
        amount = format_money(line.fee, credited.currency)
        row = {
            "*CreditMemoNo": quickbooks_credit_memo_number(credited.number, credited.revision),
            "*Customer": text_cell(credited.client_name),
            "*CreditMemoDate": _date(replacement.issue_date, settings.date_format),
            "Location": text_cell(settings.location or ""),
            "Memo": text_cell(credit_note_reference(credited, replacement)),
            "Item(Product/Service)": text_cell(settings.item),
            "ItemDescription": text_cell(line.description),
            "ItemQuantity": "1",
            "ItemRate": amount,
            "*ItemAmount": amount,
            "Service Date": _date(credited.period_end, settings.date_format),
            "Currency": credited.currency,
        }
        rows.append([row[name] for name in header])
    return _csv(header, rows)
