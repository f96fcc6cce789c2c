"""Pure payload mappers: our invoice to Zuora's zObjects and ZOQL, tested without a server.

Each function returns the fields of one SOAP object (or a ZOQL statement) exactly as the adapter
sends them; ``soap.py`` turns them into envelopes. None does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from kiki_billing.plugin import (
    MONEY_CONTEXT,
    AmountLimitError,
    Correction,
    InputError,
    Invoice,
    PaymentState,
    credit_note_number,
    currency_exponent,
)

from .settings import ZuoraClientSettings

# NOTE: at most 50 objects per create/update/subscribe call (PROVIDERS.md); each line is one
# RatePlanData of the single SubscribeRequest, so an invoice has at most 50 lines.
MAX_LINES = 50
# NOTE: field lengths of Zuora's objects (Zuora's object reference; UNVERIFIED for every API
# version): Account.Name 255, Contact.FirstName/LastName 100, Contact.WorkEmail 80,
# RatePlanCharge.Description and Subscription.Notes 500.
MAX_ACCOUNT_NAME = 255
MAX_CONTACT_NAME = 100
MAX_EMAIL = 80
MAX_DESCRIPTION = 500
MAX_NOTES = 500
# NOTE: Zuora's published limits (PROVIDERS.md): 50,000 API requests per minute per tenant;
# about 20 concurrent invoice-creating calls (40 subscribe/amend, 200 in all, older docs).
REQUESTS_PER_MINUTE = 50_000
SUBSCRIPTION_KEY_CHARS = 19
"""``k1-`` and 16 hex digits of the hub's key go into a subscription's name."""
CONCURRENCY = 20

ACCOUNT_ID = "account_id"
ACCOUNT_NUMBER = "account_number"
ACCOUNT_CURRENCY = "account_currency"
ACCOUNT_STATUS = "account_status"
CONTACT_ID = "bill_to_contact_id"
SUBSCRIPTION_ID = "subscription_id"
SUBSCRIPTION_NAME = "subscription_name"
INVOICE_ID = "invoice_id"
INVOICE_NUMBER = "invoice_number"
INVOICE_AMOUNT = "invoice_amount"
INVOICE_STATUS = "invoice_status"
PAYMENT_ID = "payment_id"

ACTIVE = "Active"
DRAFT = "Draft"


def zuora_amount(amount: Decimal, currency: str) -> str:
    """The exact decimal text Zuora gets for ``amount``: the currency's minor unit, no float.

    Raises:
        AmountLimitError: An unknown currency, or an amount finer than its minor unit.
    """
    code = currency.upper()
    try:
        exponent = currency_exponent(code)
    except InputError as exc:
        raise AmountLimitError(exc.message) from None
    scaled = amount.scaleb(exponent, context=MONEY_CONTEXT)
    if scaled != scaled.to_integral_value():
        raise AmountLimitError(f"{amount} {code} is not a whole number of {code} minor units")
    return format(amount.quantize(Decimal(1).scaleb(-exponent), context=MONEY_CONTEXT), "f")


def account_number(invoice: Invoice, client: ZuoraClientSettings) -> str:
    """The client's Zuora AccountNumber: configured, or the client id."""
    return client.account_number or invoice.client_id


def subscription_name(invoice: Invoice, key: str) -> str:
    """The unique Subscription.Name of one delivery: the invoice number and the hub's key.

    The key is derived from (invoice number, revision, target, step), so a replay of the same
    delivery sends the same name and Zuora refuses it as a duplicate instead of billing twice.
    The invoice number in front lets an operator find it in Zuora; of the key, its version and
    16 hex digits (64 bits) are kept, so the name stays short (43 characters).
    """
    return f"{invoice.number}-{key[:SUBSCRIPTION_KEY_CHARS]}"


def zoql_literal(value: str) -> str:
    """A ZOQL string literal (backslash and single quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def zoql_select(fields: str, zobject: str, field: str, value: str) -> str:
    """``select <fields> from <zobject> where <field> = '<value>'`` (the value escaped)."""
    return f"select {fields} from {zobject} where {field} = {zoql_literal(value)}"  # noqa: S608


def account_query(number: str) -> str:
    """The account with this AccountNumber (AccountNumber is unique in a tenant)."""
    return zoql_select(
        "Id, AccountNumber, Currency, Status, BillToId", "Account", "AccountNumber", number
    )


def account_status_query(account_id: str) -> str:
    """An account's status and bill-to contact."""
    return zoql_select("Id, Status, BillToId", "Account", "Id", account_id)


def contact_query(account_id: str) -> str:
    """The contacts of an account."""
    return zoql_select("Id, AccountId", "Contact", "AccountId", account_id)


def subscription_query(name: str) -> str:
    """The subscription with this Name (unique in a tenant)."""
    return zoql_select("Id, Name, AccountId, Status", "Subscription", "Name", name)


def invoice_items_query(subscription_id: str) -> str:
    """The invoice items a subscription's charges produced."""
    return zoql_select(
        "Id, InvoiceId, SubscriptionId", "InvoiceItem", "SubscriptionId", subscription_id
    )


def zoql_any(fields: str, zobject: str, field: str, values: Iterable[str]) -> str:
    """``select <fields> from <zobject> where <field> = 'a' or <field> = 'b' ...``."""
    alternatives = " or ".join(f"{field} = {zoql_literal(v)}" for v in sorted(set(values)))
    return f"select {fields} from {zobject} where {alternatives}"  # noqa: S608


def subscriptions_of_query(invoice: Invoice) -> str:
    """Every subscription whose name starts with the invoice number and a dash.

    NOTE: ZOQL's ``like`` takes ``%`` (any characters) and ``_`` (one character) as wildcards
    (Zuora, "Filter Statements"); an ``_`` in the number matches any character, so the caller
    keeps only names that start with the number itself.
    """
    return (
        "select Id, Name, AccountId, Notes, Status from Subscription where Name like "  # noqa: S608
        + zoql_literal(invoice.number + "-%")
    )


def invoice_items_of_query(subscription_ids: Iterable[str]) -> str:
    """The invoice items the charges of these subscriptions produced."""
    return zoql_any(
        "Id, InvoiceId, SubscriptionId", "InvoiceItem", "SubscriptionId", subscription_ids
    )


READ_INVOICE_FIELDS = (
    "Id, AccountId, InvoiceNumber, Amount, Balance, PaymentAmount, RefundAmount, Status, DueDate"
)


def invoices_query(invoice_ids: Iterable[str]) -> str:
    """These invoices, with what is needed to read their payment state."""
    return zoql_any(READ_INVOICE_FIELDS, "Invoice", "Id", invoice_ids)


def accounts_currency_query(account_ids: Iterable[str]) -> str:
    """The currency of these accounts (a Zuora invoice is in its account's currency)."""
    return zoql_any("Id, Currency", "Account", "Id", account_ids)


def notes_revision(notes: str | None, invoice: Invoice | str) -> int | None:
    """The revision of ``invoice`` (or of that number) a subscription's Notes name, if any.

    The Notes are :func:`to_zuora_subscribe`'s: "... invoice <number>[ revision <n>]".
    """
    number = invoice if isinstance(invoice, str) else invoice.number
    found = re.search(rf"invoice {re.escape(number)}(?: revision (?P<revision>\d+))?$", notes or "")
    if found is None:
        return None
    return int(found["revision"]) if found["revision"] else 0


def zuora_payment_state(status: str, amount: Decimal, balance: Decimal) -> PaymentState | None:
    """A Zuora invoice's :class:`PaymentState` (``None`` for a status Zuora did not document).

    Zuora's invoice statuses are Canceled, Draft, Error and Posted (SOAP object reference,
    Invoice.Status). A Posted invoice is open, partly paid or paid by its ``Balance`` ("the
    remaining balance of the invoice after all payments, adjustments, and refunds are
    applied") against its ``Amount``; a Canceled one is void; Error is left to the caller.
    Zuora marks no failed collection or uncollectible invoice (a failed electronic payment is a
    Payment in Error; the invoice stays Posted and open).
    """
    if status == "Draft":
        return PaymentState.DRAFT
    if status == "Canceled":
        return PaymentState.VOID
    if status != "Posted":
        return None
    if balance <= 0:
        return PaymentState.PAID
    if balance < amount:
        return PaymentState.PARTLY_PAID
    return PaymentState.OPEN


def period_subscriptions_query(period: str) -> str:
    """Every subscription named after an invoice number of the period (``KIKI-OaaS-YYYYMM-``)."""
    return (
        "select Id, Name, AccountId, Notes, Status from Subscription where Name like "  # noqa: S608
        + zoql_literal(f"KIKI-OaaS-{period.replace('-', '')}-%")
    )


_NAMED = re.compile(r"(?P<number>KIKI-OaaS-\d{6}-\d{6})-")


def subscription_number(name: str | None) -> str | None:
    """The invoice number a subscription's name starts with (:func:`subscription_name`)."""
    found = _NAMED.match(name or "")
    return found["number"] if found else None


def invoice_items_amounts_query(invoice_id: str) -> str:
    """An invoice's items with their amounts."""
    return zoql_select("Id, ChargeAmount, InvoiceId", "InvoiceItem", "InvoiceId", invoice_id)


def adjustment_query(item_id: str) -> str:
    """The adjustments of one invoice item (at most one is made per item)."""
    fields = "Id, Amount, InvoiceId, SourceId, Status, Type"
    return zoql_select(fields, "InvoiceItemAdjustment", "SourceId", item_id)


def to_zuora_invoice_status(invoice_id: str, status: str) -> dict[str, Any]:
    """The Invoice update that changes its status (``Draft`` to unpost, ``Canceled``)."""
    return {"Id": invoice_id, "Status": status}


def to_zuora_credit_adjustment(
    correction: Correction,
    invoice_id: str,
    item_id: str,
    amount: Decimal,
    *,
    comment: str,
) -> dict[str, Any]:
    """A credit InvoiceItemAdjustment of one invoice item (dated the new revision's issue)."""
    return {
        "AdjustmentDate": correction.replacement.issue_date,
        "Amount": zuora_amount(amount, correction.invoice.currency),
        "Comment": comment[:MAX_NOTES],
        "InvoiceId": invoice_id,
        "ReferenceId": credit_note_number(correction.invoice),
        "SourceId": item_id,
        "SourceType": "InvoiceDetail",
        "Type": "Credit",
    }


def allocate(total: Decimal, amounts: Iterable[Decimal]) -> list[Decimal]:
    """``total`` spread over items in order, none above its own amount (what is left: 0)."""
    spread, left = [], max(total, Decimal(0))
    for amount in amounts:
        part = min(left, max(amount, Decimal(0)))
        spread.append(part)
        left -= part
    return spread


def item_refs(prefix: str, records: Iterable[Any], balance: Decimal) -> dict[str, str]:
    """An invoice's items (sorted by id, numbered from 1) and its balance, as refs."""
    refs = {f"{prefix}balance": format(balance, "f")}
    for n, record in enumerate(sorted(records, key=lambda r: str(r.Id)), start=1):
        refs[f"{prefix}item_{n}"] = str(record.Id)
        refs[f"{prefix}item_{n}_amount"] = format(Decimal(str(record.ChargeAmount)), "f")
    return refs


def invoice_query(invoice_id: str) -> str:
    """An invoice's number, amount, balance and status."""
    return zoql_select(
        "Id, AccountId, InvoiceNumber, Amount, Balance, Status", "Invoice", "Id", invoice_id
    )


def payment_term(invoice: Invoice) -> str:
    """The PaymentTerm of a new account, by the names a Zuora tenant starts with."""
    days = invoice.payment_terms_days
    return "Due Upon Receipt" if days == 0 else f"Net {days}"


def to_zuora_account(invoice: Invoice, client: ZuoraClientSettings) -> dict[str, Any]:
    """The Account zObject a new client gets: Draft until its bill-to contact is set."""
    return {
        "AccountNumber": account_number(invoice, client),
        "Batch": "Batch1",
        "BillCycleDay": 1,
        "Currency": invoice.currency.upper(),
        "Name": invoice.client_name,
        "Notes": f"kiki-billing client {invoice.client_id}",
        "PaymentTerm": payment_term(invoice),
        "Status": DRAFT,
    }


def to_zuora_contact(invoice: Invoice, account_id: str) -> dict[str, Any]:
    """The bill-to Contact zObject of a new account."""
    # NOTE: Zuora requires FirstName and LastName (100 characters each); the client is a
    # company, so its name goes into LastName, cut to fit (the account keeps it whole).
    contact: dict[str, Any] = {
        "AccountId": account_id,
        "FirstName": "Billing",
        "LastName": invoice.client_name[:MAX_CONTACT_NAME],
    }
    if invoice.client_email:
        contact["WorkEmail"] = invoice.client_email
    return contact


def to_zuora_activation(account_id: str, contact_id: str) -> dict[str, Any]:
    """The Account update that sets the bill-to and sold-to contact and activates it."""
    return {"Id": account_id, "BillToId": contact_id, "SoldToId": contact_id, "Status": ACTIVE}


def to_zuora_subscribe(
    invoice: Invoice, client: ZuoraClientSettings, account_id: str, name: str
) -> dict[str, Any]:
    """The SubscribeRequest: one rate plan per line, the one-time charge at the line's fee.

    Args:
        invoice: The invoice.
        client: The client's Zuora settings (catalogue charge, payments).
        account_id: The Zuora account, or the ``{account_id}`` placeholder (dry run).
        name: The subscription's unique name (:func:`subscription_name`).

    Returns:
        The request as nested mappings, exactly as sent.

    Raises:
        AmountLimitError: A fee Zuora cannot take in the invoice's currency.
    """
    issued = invoice.issue_date.isoformat()
    revision = f" revision {invoice.revision}" if invoice.revision else ""
    # NOTE: two instances of one charge need two RatePlanData entries (PROVIDERS.md): each
    # line is its own rate plan with the one-time charge, its price overridden.
    rate_plans = [
        {
            "RatePlan": {"ProductRatePlanId": client.product_rate_plan_id},
            "RatePlanChargeData": [
                {
                    "RatePlanCharge": {
                        "Description": line.description,
                        "Price": zuora_amount(line.fee, invoice.currency),
                        "ProductRatePlanChargeId": client.product_rate_plan_charge_id,
                    }
                }
            ],
        }
        for line in invoice.lines
    ]
    return {
        "Account": {"Id": account_id},
        "SubscribeOptions": {
            "GenerateInvoice": True,
            "ProcessPayments": client.process_payments,
            # NOTE: "Subscription" scope bills this subscription alone, not the account's
            # other pending charges, so the Zuora invoice is exactly ours.
            "SubscribeInvoiceProcessingOptions": {
                "InvoiceDate": issued,
                "InvoiceProcessingScope": "Subscription",
                "InvoiceTargetDate": issued,
            },
        },
        "SubscriptionData": {
            "Subscription": {
                "AutoRenew": False,
                "ContractAcceptanceDate": issued,
                "ContractEffectiveDate": issued,
                "InitialTerm": 1,
                "InitialTermPeriodType": "Month",
                "IsInvoiceSeparate": True,
                "Name": name,
                "Notes": f"Profit share {invoice.period}, invoice {invoice.number}{revision}",
                "RenewalTerm": 1,
                "RenewalTermPeriodType": "Month",
                "ServiceActivationDate": issued,
                "TermType": "TERMED",
            },
            "RatePlanData": rate_plans,
        },
    }
