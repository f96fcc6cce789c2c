"""A local QuickBooks Online: the v3 REST JSON API of one or more companies, and Intuit's OAuth.

Routes (``{realm}`` is a company id): ``POST /v3/company/{realm}/customer|item|invoice``
(create), ``GET /v3/company/{realm}/customer|item|account|invoice/{id}``, ``POST
/v3/company/{realm}/invoice/{id}/send``, ``POST|GET /v3/company/{realm}/query`` (``select * from
Invoice where DocNumber = '...'``: equality and ``in`` joined by ``and``, ``orderby``,
``startposition``, ``maxresults``), and the token endpoint ``POST /oauth2/v1/tokens/bearer``
(``refresh_token`` and ``authorization_code`` grants, HTTP Basic client credentials).

At least as strict as QBO:

- every create body is checked against Intuit's XSD (element names, JSON types, enumerations,
  dates: ``tests/support/quickbooks_schema.py``) and every answer is shaped to pass it too;
- QBO's own rules: DisplayName unique across customers, vendors and employees, case-insensitively
  (6240), item names unique (6240), string lengths (2050: DocNumber 21, DisplayName 500, Item
  Name 100, descriptions and PrivateNote 4000, email 100), references that exist (2500), an
  ``Amount`` equal to ``round(Qty x UnitPrice, 2)`` on every sales line (6070), a ``TotalAmt``
  (when sent) equal to the sum of the lines, an invoice currency equal to the customer's, a
  customer currency the company has, duplicate DocNumbers refused (6140; configurable);
- OAuth: access tokens expire after an hour on the fake's clock (401 with the gateway's body),
  a token works only for its company (403, 3100), refresh tokens rotate: the old one stops
  working once a new one is issued (``invalid_grant``);
- ``requestid`` (at most 50 characters) on POSTs: the first result per company and id is kept
  for ``key_lifetime`` (a day by default; Intuit documents no window) and replayed;
- Intuit's published limits per company (its API calls; the token endpoint is another host):
  10 requests/s and 500/min as sliding windows, 10 in flight; a 429 carries the
  ThrottleExceeded fault (3001) as JSON or, as QBO sometimes does, as XML (``throttle_format``:
  ``json``, ``xml`` or ``alternate``);
- every answer carries an ``intuit_tid`` header; faults are ``{"Fault": {"Error": [{"Message",
  "Detail", "code", "element"}], "type"}, "time"}``; injected 5xx can be JSON, XML or HTML.

Payments, voids, deletes and copies made outside the API are control calls
(``fake.mark_invoice(id, "paid"|"partly_paid"|"void"|"deleted")``, ``fake.duplicate_invoice``).

Voids (``POST /invoice?operation=void``), credit memos (``POST /creditmemo``) and payments that
apply them (``POST /payment``) follow QBO's rules (a stale SyncToken is 5010; no void of an
invoice with a payment or credit applied; no amount above an open balance).

Not modelled: other updates, deletes through the API, taxes (no tax is computed;
``TaxCodeRef`` must name a known code), discounts, multiple pages of query results beyond
``maxresults``, batch, CDC, webhooks, reports, minor-version differences.

In-process: ``with FakeQuickBooks() as fake:``; as a process: ``python -m
tests.support.fake_quickbooks --port 0 --ready-file F`` (control under ``/_fake/``, plus ``POST
/_fake/quickbooks/tokens`` which answers a fresh refresh and access token).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import random
import re
import string
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, ClassVar
from urllib.parse import parse_qs

from .fake_provider import (
    Admission,
    FakeProvider,
    FakeProviderApp,
    FakeResponse,
    Fault,
    IdempotencyEntry,
    ProviderError,
    ProviderRequest,
    RateLimiter,
    RateLimits,
    Rejection,
    Route,
    Window,
    common_arguments,
    serve_until_stopped,
)
from .quickbooks_schema import SchemaError, quickbooks_schema

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "REALM",
    "FakeQuickBooks",
    "FakeQuickBooksApp",
    "QuickBooksFault",
    "QuickBooksFaultSpec",
    "json_text",
    "main",
]

JSON = dict[str, Any]
REALM = "9341453172471531"
CLIENT_ID = "ABkikiFakeClientId0123456789"
CLIENT_SECRET = "kikiFakeClientSecret0123456789"
TOKEN_PATH = "/oauth2/v1/tokens/bearer"
API = "/v3/company/{realm}"
ACCESS_TOKEN_LIFETIME = 3600.0
REFRESH_TOKEN_LIFETIME = 8_726_400.0  # 101 days, as Intuit's x_refresh_token_expires_in
MAX_REQUEST_ID = 50
MAX_RESULTS = 1000
# NOTE: lengths from Finance.xsd / IntuitBaseTypes.xsd documentation (DocNumber, Item Name,
# Line Description, EmailAddress) and Intuit's API reference (DisplayName, PrivateNote).
LENGTHS = {
    "DocNumber": 21,
    "DisplayName": 500,
    "Name": 100,
    "Description": 4000,
    "PrivateNote": 4000,
    "Address": 100,
}
PACIFIC = timezone(timedelta(hours=-8))
_CENT = Decimal("0.01")
CURRENCY_NAMES = {
    "USD": "United States Dollar",
    "EUR": "Euro",
    "GBP": "British Pound Sterling",
    "CAD": "Canadian Dollar",
    "AUD": "Australian Dollar",
    "JPY": "Japanese Yen",
    "CHF": "Swiss Franc",
}
NAME_LISTS = ("Customer", "Item", "Account", "Vendor", "Employee")
"""Entities whose queries return active objects only, unless ``Active`` is filtered on."""


# ============================================================================================
# Bodies
# ============================================================================================


def json_text(value: Any) -> str:
    """Compact JSON with :class:`Decimal` written as exact numbers (as QBO's Java encoder does)."""
    if isinstance(value, Mapping):
        return (
            "{" + ",".join(f"{json.dumps(str(k))}:{json_text(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value)


def intuit_time(epoch: float) -> str:
    """``2026-01-31T16:00:00.000-08:00``: QBO's timestamps are in Pacific time."""
    moment = datetime.fromtimestamp(epoch, UTC).astimezone(PACIFIC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}-08:00"


def _meta_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).astimezone(PACIFIC).isoformat(timespec="seconds")


class QuickBooksFault(ProviderError):
    """An error in Intuit's ``Fault`` shape (the ``time`` is added when the answer leaves)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        detail: str = "",
        code: str = "6000",
        element: str | None = None,
        fault_type: str = "ValidationFault",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=headers)
        self.detail = detail
        self.element = element
        self.fault_type = fault_type

    def response(self) -> FakeResponse:
        error: JSON = {"Message": self.message, "Detail": self.detail, "code": self.code}
        if self.element is not None:
            error["element"] = self.element
        body = {"Fault": {"Error": [error], "type": self.fault_type}}
        return FakeResponse(self.status, body, dict(self.headers))


def validation(code: str, message: str, detail: str, element: str | None = None) -> QuickBooksFault:
    """A 400 ValidationFault."""
    return QuickBooksFault(400, message, detail=detail, code=code, element=element)


def business(detail: str, code: str = "6000") -> QuickBooksFault:
    """A 400 business-rule fault (codes 6000-6999)."""
    return validation(
        code,
        "A business validation error has occurred while processing your request",
        f"Business Validation Error: {detail}",
    )


def string_length(element: str, value: str) -> QuickBooksFault:
    """2050, with the message QBO gives (consolibyte/quickbooks-php#79)."""
    return validation(
        "2050",
        "String length is either shorter or longer than supported by specification",
        "String length specified does not match the supported length. "
        f"Min:0 Max:{LENGTHS[element]} supported. Supplied length:{len(value)}",
        element,
    )


def invalid_reference(what: str, value: str) -> QuickBooksFault:
    return validation(
        "2500",
        "Invalid Reference Id",
        "Invalid Reference Id : Something you're trying to use has been made inactive. Check the "
        f"fields with accounts, customers, items, vendors or employees. ({what} {value})",
    )


def missing(element: str) -> QuickBooksFault:
    return validation(
        "2020",
        "Required param missing, need to supply the required value for the API",
        f"Required parameter {element} is missing in the request",
        element,
    )


def not_found(entity: str, object_id: str) -> QuickBooksFault:
    return validation(
        "610",
        "Object Not Found",
        "Object Not Found : Something you're trying to use has been made inactive. Check the "
        f"fields with accounts, customers, items, vendors or employees. ({entity} {object_id})",
    )


def duplicate_name(kind: str) -> QuickBooksFault:
    # NOTE: the message and detail of QBO's 6240 (quickbooks-ruby
    # spec/fixtures/customer_duplicate_error.xml).
    return validation(
        "6240",
        "Duplicate Name Exists Error",
        f"The name supplied already exists. : Another {kind} is already using this name. "
        "Please use a different name.",
    )


def authentication_failed(reason: str) -> ProviderError:
    """The API gateway's 401: lower-case keys, nulls, the code inside the message."""

    class _Unauthorized(ProviderError):
        def response(self) -> FakeResponse:
            body = {
                "warnings": None,
                "intuitObject": None,
                "fault": {
                    "error": [
                        {
                            "message": "message=AuthenticationFailed; errorCode=003200; "
                            "statusCode=401",
                            "detail": reason,
                            "code": "3200",
                            "element": None,
                        }
                    ],
                    "type": "AUTHENTICATION",
                },
                "report": None,
                "queryResponse": None,
                "batchItemResponse": [],
                "attachableResponse": [],
                "syncErrorResponse": None,
                "requestId": None,
                "time": None,
                "status": None,
                "cdcresponse": [],
            }
            return FakeResponse(401, body, {"WWW-Authenticate": 'Bearer realm="Intuit"'})

    return _Unauthorized(401, reason, code="3200")


class OAuthError(ProviderError):
    """The token endpoint's ``{"error": "invalid_grant"}``."""

    def response(self) -> FakeResponse:
        return FakeResponse(self.status, {"error": self.code}, dict(self.headers))


THROTTLE_MESSAGE = "message=ThrottleExceeded; errorCode=003001; statusCode=429"
THROTTLE_DETAIL = "The request limit was reached.  Try again later"


def throttle_xml(time_text: str) -> str:
    """Intuit's XML ThrottleExceeded (quickbooks-ruby spec/fixtures/too_many_requests_error.xml)."""
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f'<IntuitResponse time="{time_text}" xmlns="http://schema.intuit.com/finance/v3">\n'
        '  <Fault type="SERVICE">\n'
        '    <Error code="3001">\n'
        f"      <Message>{THROTTLE_MESSAGE}</Message>\n"
        f"      <Detail>{THROTTLE_DETAIL}</Detail>\n"
        "    </Error>\n"
        "  </Fault>\n"
        "</IntuitResponse>\n"
    )


@dataclass
class QuickBooksFaultSpec(Fault):
    """A queued fault; ``body`` picks the error body: ``json`` (default), ``xml`` or ``html``."""

    body: str = "json"

    @classmethod
    def presets(cls) -> dict[str, Callable[..., QuickBooksFaultSpec]]:
        presets = super().presets()
        presets["throttle"] = lambda method="*", path=None, **kw: cls.error(
            method, path, status=429, **kw
        )
        return presets  # type: ignore[return-value]


# ============================================================================================
# The company
# ============================================================================================


@dataclass
class Company:
    """One realm's objects."""

    realm: str
    home_currency: str = "USD"
    currencies: set[str] = field(default_factory=lambda: set(CURRENCY_NAMES))
    multicurrency: bool = True
    tax_codes: set[str] = field(default_factory=lambda: {"NON", "TAX"})
    customers: dict[str, JSON] = field(default_factory=dict)
    items: dict[str, JSON] = field(default_factory=dict)
    accounts: dict[str, JSON] = field(default_factory=dict)
    invoices: dict[str, JSON] = field(default_factory=dict)
    vendors: dict[str, JSON] = field(default_factory=dict)
    credit_memos: dict[str, JSON] = field(default_factory=dict)
    payments: dict[str, JSON] = field(default_factory=dict)
    emails: list[JSON] = field(default_factory=list)
    next_id: int = 100

    def new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)

    def table(self, entity: str) -> dict[str, JSON]:
        tables = {
            "Customer": self.customers,
            "Item": self.items,
            "Account": self.accounts,
            "Invoice": self.invoices,
            "Vendor": self.vendors,
            "CreditMemo": self.credit_memos,
            "Payment": self.payments,
        }
        if entity not in tables:
            raise validation(
                "4000",
                "Error parsing query",
                f"QueryParserError: Invalid entity name: {entity}",
            )
        return tables[entity]


def _seed_accounts(company: Company, now: float) -> None:
    for account_id, name, account_type, sub_type, classification in (
        ("1", "Services", "Income", "ServiceFeeIncome", "Revenue"),
        ("4", "Checking", "Bank", "Checking", "Asset"),
        ("79", "Sales of Product Income", "Income", "SalesOfProductIncome", "Revenue"),
        ("84", "Accounts Receivable (A/R)", "Accounts Receivable", "AccountsReceivable", "Asset"),
        ("85", "Other Income", "Other Income", "OtherMiscellaneousIncome", "Revenue"),
    ):
        company.accounts[account_id] = {
            "Name": name,
            "SubAccount": False,
            "FullyQualifiedName": name,
            "Active": True,
            "Classification": classification,
            "AccountType": account_type,
            "AccountSubType": sub_type,
            "CurrentBalance": Decimal(0),
            "CurrentBalanceWithSubAccounts": Decimal(0),
            "CurrencyRef": {"value": company.home_currency, "name": CURRENCY_NAMES["USD"]},
            **_entity(account_id, now),
        }


def _entity(object_id: str, now: float) -> JSON:
    stamp = _meta_time(now)
    return {
        "domain": "QBO",
        "sparse": False,
        "Id": object_id,
        "SyncToken": "0",
        "MetaData": {"CreateTime": stamp, "LastUpdatedTime": stamp},
    }


# ============================================================================================
# Handlers
# ============================================================================================


def _schema(entity: str, payload: Any) -> JSON:
    if not isinstance(payload, dict):
        raise validation(
            "2010", "Request has invalid or unsupported property", "The body is not an object"
        )
    try:
        quickbooks_schema().validate(entity, payload)
    except SchemaError as exc:
        raise validation(
            "2010",
            "Request has invalid or unsupported property",
            f"Property Name:{entity} specified is unsupported or invalid: {exc}",
        ) from None
    if payload.get("Id") or payload.get("SyncToken"):
        raise validation(
            "2010",
            "Request has invalid or unsupported property",
            "updates are not modelled by the kiki fake (Id or SyncToken given)",
        )
    return payload


def _check_length(element: str, value: Any) -> None:
    if isinstance(value, str) and len(value) > LENGTHS[element]:
        raise string_length(element, value)


def _ref(payload: Mapping[str, Any], name: str) -> str | None:
    ref = payload.get(name)
    return str(ref.get("value")) if isinstance(ref, Mapping) and ref.get("value") else None


def _taken(app: FakeQuickBooksApp, company: Company, name: str) -> str | None:
    wanted = name.strip().casefold()
    for kind, table in (("customer", company.customers), ("vendor", company.vendors)):
        for existing in table.values():
            if str(existing.get("DisplayName", "")).casefold() == wanted:
                return kind
    return None


def create_customer(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    company = app.company(req)
    payload = _schema("Customer", req.params)
    name = str(payload.get("DisplayName") or "").strip()
    if not name:
        raise missing("DisplayName")
    _check_length("DisplayName", name)
    if ":" in name:
        raise business("The name can't contain a colon (:).")
    email = (payload.get("PrimaryEmailAddr") or {}).get("Address")
    _check_length("Address", email)
    kind = _taken(app, company, name)
    if kind is not None:
        raise duplicate_name(kind)
    currency = _ref(payload, "CurrencyRef") or company.home_currency
    if currency not in company.currencies:
        raise invalid_reference("Currency", currency)
    if currency != company.home_currency and not company.multicurrency:
        raise business("Multicurrency is not turned on in this company.")
    customer_id = company.new_id()
    customer = {
        **_entity(customer_id, app.clock()),
        "FullyQualifiedName": name,
        "DisplayName": name,
        "PrintOnCheckName": name,
        "Active": True,
        "PrimaryEmailAddr": {"Address": email} if email else None,
        "Taxable": False,
        "Job": False,
        "BillWithParent": False,
        "Balance": Decimal(0),
        "BalanceWithJobs": Decimal(0),
        "CurrencyRef": {"value": currency, "name": CURRENCY_NAMES.get(currency, currency)},
        "PreferredDeliveryMethod": "Print",
    }
    company.customers[customer_id] = {k: v for k, v in customer.items() if v is not None}
    app.count_created("customer")
    return {"Customer": company.customers[customer_id]}


def create_item(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    company = app.company(req)
    payload = _schema("Item", req.params)
    name = str(payload.get("Name") or "").strip()
    if not name:
        raise missing("Name")
    _check_length("Name", name)
    if ":" in name:
        raise business("The name can't contain a colon (:).")
    if any(str(i["Name"]).casefold() == name.casefold() for i in company.items.values()):
        raise duplicate_name("product or service")
    item_type = payload.get("Type") or "Inventory"
    if item_type != "Service":
        raise business(f"The kiki fake models Service items only, not {item_type}.")
    account_id = _ref(payload, "IncomeAccountRef")
    if account_id is None:
        raise missing("IncomeAccountRef")
    account = company.accounts.get(account_id)
    if account is None or not account["Active"]:
        raise invalid_reference("Account", account_id)
    if account["AccountType"] not in ("Income", "Other Income"):
        raise business("An item's income account must be an income account.")
    item_id = company.new_id()
    company.items[item_id] = {
        **_entity(item_id, app.clock()),
        "Name": name,
        "Active": True,
        "FullyQualifiedName": name,
        "Taxable": False,
        "UnitPrice": Decimal(0),
        "Type": "Service",
        "IncomeAccountRef": {"value": account_id, "name": account["Name"]},
        "PurchaseCost": Decimal(0),
        "TrackQtyOnHand": False,
    }
    app.count_created("item")
    return {"Item": company.items[item_id]}


def _sales_line(company: Company, line: Mapping[str, Any], where: str) -> tuple[JSON, Decimal]:
    detail_type = line.get("DetailType")
    if detail_type == "DescriptionOnly":
        _check_length("Description", line.get("Description"))
        return dict(line), Decimal(0)
    if detail_type != "SalesItemLineDetail":
        raise validation(
            "2010",
            "Request has invalid or unsupported property",
            f"{where}: DetailType {detail_type} is not accepted on an invoice by the kiki fake",
        )
    detail = line.get("SalesItemLineDetail")
    if not isinstance(detail, Mapping):
        raise missing(f"{where}.SalesItemLineDetail")
    if "Amount" not in line:
        raise missing(f"{where}.Amount")
    amount = Decimal(line["Amount"])
    _check_length("Description", line.get("Description"))
    item_id = _ref(detail, "ItemRef")
    item = company.items.get(item_id or "")
    if item is None or not item["Active"]:
        raise invalid_reference("Item", str(item_id))
    tax_code = _ref(detail, "TaxCodeRef")
    if tax_code is not None and tax_code not in company.tax_codes:
        raise invalid_reference("TaxCode", tax_code)
    qty, price = detail.get("Qty"), detail.get("UnitPrice")
    if qty is not None and price is not None:
        # NOTE: QBO's 6070 (PROVIDERS.md): Amount must be round(Qty x UnitPrice, 2).
        expected = (Decimal(qty) * Decimal(price)).quantize(Decimal("0.01"), ROUND_HALF_UP)
        if amount != expected or -int(amount.as_tuple().exponent) > 2:
            raise validation(
                "6070",
                "Amount calculation incorrect in the request",
                f"Amount is not equal to UnitPrice * Qty. Supplied value:{amount}",
            )
    stored = copy.deepcopy(dict(line))
    stored["SalesItemLineDetail"] = {
        **copy.deepcopy(dict(detail)),
        "ItemRef": {"value": item_id, "name": item["Name"]},
        "TaxCodeRef": {"value": tax_code or "NON"},
    }
    return stored, amount


@dataclass
class _SalesDocument:
    """What an invoice and a credit memo have in common, checked alike."""

    customer_id: str
    customer: JSON
    currency: str
    number: Any
    lines: list[JSON]
    total: Decimal


def _sales_document(
    app: FakeQuickBooksApp, company: Company, payload: JSON, kind: str, table: Mapping[str, JSON]
) -> _SalesDocument:
    """The customer, currency, DocNumber and sales lines of an invoice or credit memo.

    QBO's rules: an active customer, lengths, the customer's currency, a DocNumber not used by
    another document of the kind (6140, unless configured), at least one line, each line's
    amount checked (:func:`_sales_line`).
    """
    customer_id = _ref(payload, "CustomerRef")
    if customer_id is None:
        raise missing("CustomerRef")
    customer = company.customers.get(customer_id)
    if customer is None or not customer["Active"]:
        raise invalid_reference("Customer", customer_id)
    for element in ("DocNumber", "PrivateNote"):
        _check_length(element, payload.get(element))
    currency = _ref(payload, "CurrencyRef") or customer["CurrencyRef"]["value"]
    if currency != customer["CurrencyRef"]["value"]:
        raise business(
            f"The transaction currency ({currency}) must match the customer's currency "
            f"({customer['CurrencyRef']['value']})."
        )
    number = payload.get("DocNumber")
    if number and not app.duplicate_doc_numbers:
        for other in table.values():
            if other.get("DocNumber") == number:
                raise validation(
                    "6140",
                    "Duplicate Document Number Error",
                    "Duplicate Document Number Error : You must specify a different number. "
                    f"This number has already been used. DocNumber={number} is assigned to "
                    f"TxnType={kind} with TxnId={other['Id']}",
                )
    lines = payload.get("Line") or []
    if not lines:
        raise missing("Line")
    stored_lines, total = [], Decimal(0)
    for n, line in enumerate(lines, start=1):
        stored, amount = _sales_line(company, line, f"Line[{n}]")
        stored.setdefault("Id", str(n))
        stored.setdefault("LineNum", n)
        stored_lines.append(stored)
        total += amount
    return _SalesDocument(customer_id, customer, currency, number, stored_lines, total)


def void_invoice(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    """``POST /invoice?operation=void`` with ``{"Id", "SyncToken"}``.

    NOTE: a void zeroes every amount and puts "Voided" in front of PrivateNote (Intuit's Invoice
    API reference, void; "Voiding Invoice Objects", blogs.intuit.com 2016-04-06); the SyncToken
    must be the invoice's current one (5010 otherwise). [kiki fake] An invoice with a payment or
    a credit applied is refused, as is one voided already.
    """
    company = app.company(req)
    payload = req.params
    if not isinstance(payload, dict) or set(payload) - {"Id", "SyncToken", "sparse"}:
        raise validation(
            "2010",
            "Request has invalid or unsupported property",
            "a void takes the invoice's Id and SyncToken only",
        )
    invoice_id = str(payload.get("Id") or "")
    invoice = company.invoices.get(invoice_id)
    if invoice is None:
        raise not_found("Invoice", invoice_id)
    if str(payload.get("SyncToken")) != invoice["SyncToken"]:
        raise QuickBooksFault(
            400,
            "Stale Object Error",
            detail=f"Stale Object Error : You and {invoice['SyncToken']} were working on this at "
            "the same time. (SyncToken mismatch)",
            code="5010",
        )
    if str(invoice.get("PrivateNote") or "").startswith("Voided"):
        raise business("[kiki fake] This invoice is voided already.")
    if invoice["Balance"] != invoice["TotalAmt"] or invoice["LinkedTxn"]:
        raise business(
            "[kiki fake] This invoice has payments or credits applied and cannot be voided; "
            "unapply them first."
        )
    for line in invoice["Line"]:
        line["Amount"] = Decimal(0)
        detail = line.get("SalesItemLineDetail")
        if detail is not None:
            detail["Qty"] = Decimal(0)
    note = invoice.get("PrivateNote")
    invoice["PrivateNote"] = f"Voided - {note}" if note else "Voided"
    invoice.update(TotalAmt=Decimal(0), Balance=Decimal(0))
    invoice["SyncToken"] = str(int(invoice["SyncToken"]) + 1)
    invoice["MetaData"]["LastUpdatedTime"] = _meta_time(app.clock())
    return {"Invoice": invoice}


def create_credit_memo(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    """``POST /creditmemo``: sales lines as an invoice's, checked the same way."""
    company = app.company(req)
    payload = _schema("CreditMemo", req.params)
    doc = _sales_document(app, company, payload, "CreditMemo", company.credit_memos)
    customer_id, customer, currency, number, total = (
        doc.customer_id,
        doc.customer,
        doc.currency,
        doc.number,
        doc.total,
    )
    if total <= 0:
        raise business("[kiki fake] A credit memo must total more than zero.")
    stored_lines = [
        *doc.lines,
        {"Amount": total, "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}},
    ]
    memo_id = company.new_id()
    today = datetime.fromtimestamp(app.clock(), UTC).astimezone(PACIFIC).date().isoformat()
    memo: JSON = {
        **_entity(memo_id, app.clock()),
        "CustomField": [],
        "DocNumber": number or str(1000 + len(company.credit_memos) + 1),
        "TxnDate": payload.get("TxnDate") or today,
        "CurrencyRef": {"value": currency, "name": CURRENCY_NAMES.get(currency, currency)},
        "PrivateNote": payload.get("PrivateNote"),
        "Line": stored_lines,
        "TxnTaxDetail": {"TotalTax": Decimal(0)},
        "CustomerRef": {"value": customer_id, "name": customer["DisplayName"]},
        "TotalAmt": total,
        "ApplyTaxAfterDiscount": False,
        "PrintStatus": "NeedToPrint",
        "EmailStatus": "NotSet",
        "Balance": total,
        "RemainingCredit": total,
    }
    company.credit_memos[memo_id] = {k: v for k, v in memo.items() if v is not None}
    app.count_created("creditmemo")
    return {"CreditMemo": company.credit_memos[memo_id]}


def create_payment(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    """``POST /payment``: what the customer paid, applied to invoices (and credit memos).

    Each line links one invoice or credit memo of the customer with an amount no more than its
    balance; invoices less credit memos must equal ``TotalAmt`` (a Payment of 0 applies a
    credit memo to an invoice). [kiki fake] Unapplied amounts are not modelled.
    """
    company = app.company(req)
    payload = _schema("Payment", req.params)
    customer_id = _ref(payload, "CustomerRef")
    if customer_id is None:
        raise missing("CustomerRef")
    customer = company.customers.get(customer_id)
    if customer is None:
        raise invalid_reference("Customer", customer_id)
    _check_length("PrivateNote", payload.get("PrivateNote"))
    if "TotalAmt" not in payload:
        raise missing("TotalAmt")
    total = Decimal(payload["TotalAmt"])
    applied: list[tuple[JSON, str, Decimal]] = []
    net = Decimal(0)
    for n, line in enumerate(payload.get("Line") or [], start=1):
        links = line.get("LinkedTxn") or []
        if len(links) != 1 or "Amount" not in line:
            raise validation(
                "2010",
                "Request has invalid or unsupported property",
                f"Line[{n}]: [kiki fake] one LinkedTxn and an Amount per line",
            )
        amount = Decimal(line["Amount"])
        kind, txn_id = links[0].get("TxnType"), str(links[0].get("TxnId"))
        table = {"Invoice": company.invoices, "CreditMemo": company.credit_memos}.get(kind)
        target = table.get(txn_id) if table is not None else None
        if target is None:
            raise invalid_reference(str(kind), txn_id)
        if target["CustomerRef"]["value"] != customer_id:
            raise business(f"Line[{n}]: {kind} {txn_id} belongs to another customer.")
        if amount <= 0 or amount > target["Balance"]:
            raise business(
                f"Line[{n}]: the amount {amount} is more than the open balance of {kind} "
                f"{txn_id} ({target['Balance']})."
            )
        applied.append((target, kind, amount))
        net += amount if kind == "Invoice" else -amount
    if not applied:
        raise missing("Line")
    if net != total:
        raise business(
            f"[kiki fake] TotalAmt {total} is not what the lines apply ({net}: invoices less "
            "credit memos)."
        )
    payment_id = company.new_id()
    for target, kind, amount in applied:
        target["Balance"] -= amount
        if kind == "CreditMemo":
            target["RemainingCredit"] -= amount
        target.setdefault("LinkedTxn", []).append({"TxnId": payment_id, "TxnType": "Payment"})
        target["SyncToken"] = str(int(target["SyncToken"]) + 1)
    payment: JSON = {
        **_entity(payment_id, app.clock()),
        "CustomerRef": {"value": customer_id, "name": customer["DisplayName"]},
        "TxnDate": payload.get("TxnDate")
        or datetime.fromtimestamp(app.clock(), UTC).astimezone(PACIFIC).date().isoformat(),
        "CurrencyRef": payload.get("CurrencyRef") or customer["CurrencyRef"],
        "TotalAmt": total,
        "UnappliedAmt": Decimal(0),
        "PrivateNote": payload.get("PrivateNote"),
        "Line": payload.get("Line"),
    }
    company.payments[payment_id] = {k: v for k, v in payment.items() if v is not None}
    app.count_created("payment")
    return {"Payment": company.payments[payment_id]}


def create_invoice(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    if req.query_value("operation") == "void":
        return void_invoice(app, req)
    company = app.company(req)
    payload = _schema("Invoice", req.params)
    doc = _sales_document(app, company, payload, "Invoice", company.invoices)
    customer_id, customer, currency, number, total = (
        doc.customer_id,
        doc.customer,
        doc.currency,
        doc.number,
        doc.total,
    )
    stored_lines = list(doc.lines)
    if "TotalAmt" in payload and Decimal(payload["TotalAmt"]) != total:
        raise business(f"TotalAmt {payload['TotalAmt']} is not the sum of the lines ({total}).")
    stored_lines.append(
        {"Amount": total, "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}}
    )
    invoice_id = company.new_id()
    today = datetime.fromtimestamp(app.clock(), UTC).astimezone(PACIFIC).date().isoformat()
    invoice: JSON = {
        **_entity(invoice_id, app.clock()),
        "CustomField": [],
        "DocNumber": number or str(1000 + len(company.invoices) + 1),
        "TxnDate": payload.get("TxnDate") or today,
        "CurrencyRef": {"value": currency, "name": CURRENCY_NAMES.get(currency, currency)},
        "PrivateNote": payload.get("PrivateNote"),
        "LinkedTxn": [],
        "Line": stored_lines,
        "TxnTaxDetail": {"TotalTax": Decimal(0)},
        "CustomerRef": {"value": customer_id, "name": customer["DisplayName"]},
        "DueDate": payload.get("DueDate") or payload.get("TxnDate") or today,
        "TotalAmt": total,
        "ApplyTaxAfterDiscount": False,
        "PrintStatus": "NeedToPrint",
        "EmailStatus": "NotSet",
        "BillEmail": payload.get("BillEmail"),
        "Balance": total,
        "AllowIPNPayment": False,
        "AllowOnlinePayment": False,
        "AllowOnlineCreditCardPayment": False,
        "AllowOnlineACHPayment": False,
    }
    if currency != company.home_currency:
        invoice["ExchangeRate"] = Decimal(1)
    company.invoices[invoice_id] = {k: v for k, v in invoice.items() if v is not None}
    app.count_created("invoice")
    return {"Invoice": company.invoices[invoice_id]}


def _read(entity: str) -> Callable[[FakeQuickBooksApp, ProviderRequest], JSON]:
    def read(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
        object_id = req.path_params["id"]
        found = app.company(req).table(entity).get(object_id)
        if found is None:
            raise not_found(entity, object_id)
        return {entity: found}

    return read


def send_invoice(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    company = app.company(req)
    invoice = company.invoices.get(req.path_params["id"])
    if invoice is None:
        raise not_found("Invoice", req.path_params["id"])
    to = req.query_value("sendTo") or (invoice.get("BillEmail") or {}).get("Address")
    if not to:
        raise business("An email address is required to send this invoice (BillEmail).")
    _check_length("Address", to)
    invoice["BillEmail"] = {"Address": to}
    invoice["EmailStatus"] = "EmailSent"
    invoice["DeliveryInfo"] = {"DeliveryType": "Email", "DeliveryTime": _meta_time(app.clock())}
    invoice["SyncToken"] = str(int(invoice["SyncToken"]) + 1)
    company.emails.append({"invoice": invoice["Id"], "to": to})
    return {"Invoice": invoice}


_QUERY = re.compile(
    r"^\s*select\s+\*\s+from\s+(?P<entity>\w+)"
    r"(?:\s+where\s+(?P<where>.+?))?"
    r"(?:\s+orderby\s+(?P<order>\w+)(?:\s+(?P<direction>asc|desc))?)?"
    r"(?:\s+startposition\s+(?P<start>\d+))?"
    r"(?:\s+maxresults\s+(?P<max>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_LITERAL = r"'(?:[^'\\]|\\.)*'|true|false|\d+"
_CONDITION = re.compile(
    rf"\s*(?P<field>\w+)\s*(?:(?P<eq>=)\s*(?P<value>{_LITERAL})"
    rf"|(?P<like>like)\s*(?P<pattern>'(?:[^'\\]|\\.)*')"
    rf"|(?P<in>in)\s*\((?P<values>\s*(?:{_LITERAL})(?:\s*,\s*(?:{_LITERAL}))*)\s*\))\s*",
    re.IGNORECASE,
)


def _literal(text: str) -> str | bool:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith("'"):
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_and(where: str) -> list[str]:
    parts, current, quoted, i = [], "", False, 0
    while i < len(where):
        ch = where[i]
        if ch == "\\" and quoted:
            current += where[i : i + 2]
            i += 2
            continue
        if ch == "'":
            quoted = not quoted
        if not quoted and re.match(r"\s+and\s+", where[i:], re.IGNORECASE):
            parts.append(current)
            i += len(re.match(r"\s+and\s+", where[i:], re.IGNORECASE).group(0))
            current = ""
            continue
        current += ch
        i += 1
    parts.append(current)
    return parts


def _matches(obj: Mapping[str, Any], field_name: str, wanted: list[str | bool]) -> bool:
    value = obj.get(field_name)
    if isinstance(value, Mapping):
        value = value.get("value")
    for candidate in wanted:
        if isinstance(candidate, bool):
            if value is candidate:
                return True
        elif value is not None and str(value).casefold() == candidate.casefold():
            return True
    return False


def query(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    company = app.company(req)
    text = str(req.params.get("query") or "")
    parsed = _QUERY.match(text)
    if parsed is None:
        raise validation(
            "4000", "Error parsing query", f"QueryParserError: Encountered an error in {text!r}"
        )
    entity = parsed.group("entity")
    entity = next(
        (
            e
            for e in (*NAME_LISTS, "Invoice", "CreditMemo", "Payment")
            if e.lower() == entity.lower()
        ),
        entity,
    )
    rows = list(company.table(entity).values())
    filters_active = False
    for condition in _split_and(parsed.group("where") or "") if parsed.group("where") else []:
        found = _CONDITION.fullmatch(condition)
        if found is None:
            raise validation(
                "4000",
                "Error parsing query",
                f"QueryParserError: Encountered an error near {condition.strip()!r}",
            )
        field_name = found.group("field")
        if found.group("like"):
            # NOTE: QBO's LIKE takes % as its only wildcard.
            pattern = str(_literal(found.group("pattern")))
            regex = re.compile(
                "".join(".*" if ch == "%" else re.escape(ch) for ch in pattern), re.IGNORECASE
            )
            rows = [row for row in rows if regex.fullmatch(str(row.get(field_name) or ""))]
            continue
        if found.group("eq"):
            wanted = [_literal(found.group("value"))]
        else:
            wanted = [_literal(v) for v in re.findall(_LITERAL, found.group("values"))]
        filters_active |= field_name == "Active"
        rows = [row for row in rows if _matches(row, field_name, wanted)]
    if entity in NAME_LISTS and not filters_active:
        rows = [row for row in rows if row.get("Active", True)]
    if parsed.group("order"):
        rows.sort(
            key=lambda r: str(r.get(parsed.group("order"), "")),
            reverse=(parsed.group("direction") or "").lower() == "desc",
        )
    start = int(parsed.group("start") or 1)
    limit = min(int(parsed.group("max") or 100), MAX_RESULTS)
    page = rows[start - 1 : start - 1 + limit]
    result: JSON = {}
    if page:
        result = {entity: page, "startPosition": start, "maxResults": len(page)}
    return {"QueryResponse": result}


def token(app: FakeQuickBooksApp, req: ProviderRequest) -> JSON:
    expected = base64.b64encode(f"{app.client_id}:{app.client_secret}".encode()).decode()
    if req.headers.get("authorization") != f"Basic {expected}":
        raise OAuthError(401, "invalid_client", code="invalid_client")
    form: Mapping[str, str] = req.params
    grant = form.get("grant_type")
    now = app.clock()
    if grant == "refresh_token":
        held = app.refresh_tokens.pop(form.get("refresh_token", ""), None)
        if held is None or held[1] <= now:
            raise OAuthError(400, "invalid_grant", code="invalid_grant")
        realm = held[0]
    elif grant == "authorization_code":
        code = app.authorization_codes.pop(form.get("code", ""), None)
        if code is None or code[1] != form.get("redirect_uri"):
            raise OAuthError(400, "invalid_grant", code="invalid_grant")
        realm = code[0]
    else:
        raise OAuthError(400, "unsupported_grant_type", code="unsupported_grant_type")
    app.token_grants += 1
    refresh = app.issue_refresh_token(realm)
    access = app.issue_access_token(realm)
    return {
        "x_refresh_token_expires_in": int(REFRESH_TOKEN_LIFETIME),
        "refresh_token": refresh,
        "access_token": access,
        "token_type": "bearer",
        "expires_in": int(app.access_token_lifetime),
    }


# ============================================================================================
# The app
# ============================================================================================


class RealmLimiter(RateLimiter):
    """Intuit's limits count a company's API calls; the OAuth server is another host."""

    def __init__(self, limits: RateLimits, clock: Any) -> None:
        super().__init__(limits, clock)
        self.exempt = threading.local()

    def admit(self) -> Admission:
        if getattr(self.exempt, "on", False):
            return Admission(self.clock())
        return super().admit()

    def release(self) -> None:
        if not getattr(self.exempt, "on", False):
            super().release()


class FakeQuickBooksApp(FakeProviderApp):
    """QuickBooks Online's v3 JSON API and Intuit's token endpoint, without HTTP."""

    name = "quickbooks"
    routes = (
        Route("POST", TOKEN_PATH, token),
        Route("POST", f"{API}/customer", create_customer),
        Route("GET", f"{API}/customer/{{id}}", _read("Customer")),
        Route("POST", f"{API}/item", create_item),
        Route("GET", f"{API}/item/{{id}}", _read("Item")),
        Route("GET", f"{API}/account/{{id}}", _read("Account")),
        Route("POST", f"{API}/invoice", create_invoice),
        Route("GET", f"{API}/invoice/{{id}}", _read("Invoice")),
        Route("POST", f"{API}/invoice/{{id}}/send", send_invoice),
        Route("POST", f"{API}/creditmemo", create_credit_memo),
        Route("GET", f"{API}/creditmemo/{{id}}", _read("CreditMemo")),
        Route("POST", f"{API}/payment", create_payment),
        Route("GET", f"{API}/payment/{{id}}", _read("Payment")),
        Route("POST", f"{API}/query", query),
        Route("GET", f"{API}/query", query),
    )
    key_header = None
    key_query_param = "requestid"
    # NOTE: Intuit documents no requestid window; a day is assumed (configurable).
    default_key_lifetime = 86_400.0
    default_rate_limits = RateLimits(
        windows=(Window(10, 1.0, "second"), Window(500, 60.0, "minute")), concurrency=10
    )
    request_id_header = "intuit_tid"
    fault_type = QuickBooksFaultSpec
    provider_settings = (
        "throttle_format",
        "duplicate_doc_numbers",
        "access_token_lifetime",
    )
    _JSON_ROUTES: ClassVar[frozenset[str]] = frozenset(
        {
            f"{API}/customer",
            f"{API}/item",
            f"{API}/invoice",
            f"{API}/creditmemo",
            f"{API}/payment",
        }
    )

    def __init__(
        self,
        *,
        realm: str = REALM,
        seed: int | None = None,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        self.limiter = RealmLimiter(self.limiter.limits, self.clock)
        self.realm = realm
        self.client_id = client_id
        self.client_secret = client_secret
        self.rng = random.Random(seed)
        self.throttle_format = "alternate"
        self.duplicate_doc_numbers = False
        self.access_token_lifetime = ACCESS_TOKEN_LIFETIME
        self._throttles = 0
        self.companies: dict[str, Company] = {}
        self.access_tokens: dict[str, tuple[str, float]] = {}
        self.refresh_tokens: dict[str, tuple[str, float]] = {}
        self.authorization_codes: dict[str, tuple[str, str]] = {}
        self.token_grants = 0
        self.reset_objects()

    # Objects and tokens -----------------------------------------------------------------------

    def reset_objects(self) -> None:
        with self.lock:
            company = Company(self.realm)
            _seed_accounts(company, self.clock())
            self.companies = {self.realm: company}
            self.access_tokens.clear()
            self.refresh_tokens.clear()
            self.authorization_codes.clear()
            self.token_grants = 0

    def company(self, req: ProviderRequest) -> Company:
        realm = req.path_params.get("realm", "")
        found = self.companies.get(realm)
        if found is None:
            raise QuickBooksFault(
                403,
                "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                detail=f"no company {realm}",
                code="3100",
                fault_type="AUTHORIZATION",
            )
        return found

    def _secret(self, prefix: str, length: int) -> str:
        alphabet = string.ascii_letters + string.digits
        return prefix + "".join(self.rng.choices(alphabet, k=length))

    def issue_refresh_token(self, realm: str | None = None) -> str:
        """A new valid refresh token for the company (tests seed settings with it)."""
        with self.lock:
            value = self._secret("AB11", 46)
            self.refresh_tokens[value] = (
                realm or self.realm,
                self.clock() + REFRESH_TOKEN_LIFETIME,
            )
            return value

    def issue_access_token(self, realm: str | None = None, lifetime: float | None = None) -> str:
        """A new access token for the company, valid ``lifetime`` seconds (default 1 h)."""
        with self.lock:
            value = self._secret("eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0..", 64)
            span = self.access_token_lifetime if lifetime is None else lifetime
            self.access_tokens[value] = (realm or self.realm, self.clock() + span)
            return value

    def authorization_code(self, redirect_uri: str, realm: str | None = None) -> str:
        """The code Intuit's consent page would put in the redirect."""
        with self.lock:
            code = self._secret("AB11", 32)
            self.authorization_codes[code] = (realm or self.realm, redirect_uri)
            return code

    def add_vendor(self, name: str) -> None:
        """A vendor holding ``name`` (DisplayNames are unique across customers and vendors)."""
        with self.lock:
            company = self.companies[self.realm]
            vendor_id = company.new_id()
            company.vendors[vendor_id] = {
                **_entity(vendor_id, self.clock()),
                "DisplayName": name,
                "Active": True,
            }

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> JSON:
        """A payment received, a void or a delete, as QuickBooks' UI (or API) makes them.

        A payment lowers ``Balance`` and links a Payment in ``LinkedTxn``; a void zeroes every
        amount and puts "Voided" in front of ``PrivateNote`` (Intuit: "Voiding Invoice
        Objects", blogs.intuit.com 2016-04-06, and the Invoice API reference); a delete removes
        the invoice (queries no longer return it).
        """
        company = self.companies[self.realm]
        invoice = company.invoices[invoice_id]
        if state == "deleted":
            del company.invoices[invoice_id]
            return {"Id": invoice_id, "status": "Deleted"}
        if str(invoice.get("PrivateNote") or "").startswith("Voided"):
            raise ValueError("the invoice is voided")
        if state == "void":
            if invoice["Balance"] != invoice["TotalAmt"]:
                raise ValueError("[kiki fake] an invoice with payments linked is not voided")
            for line in invoice["Line"]:
                line["Amount"] = Decimal(0)
                detail = line.get("SalesItemLineDetail")
                if detail is not None:
                    detail["Qty"] = Decimal(0)
            note = invoice.get("PrivateNote")
            invoice["PrivateNote"] = f"Voided - {note}" if note else "Voided"
            invoice.update(TotalAmt=Decimal(0), Balance=Decimal(0))
        elif state in ("paid", "partly_paid"):
            if state == "paid":
                paid = invoice["Balance"]
            else:
                paid = Decimal(amount) if amount else (invoice["Balance"] / 2).quantize(_CENT)
            if not 0 < paid <= invoice["Balance"] or (
                state == "partly_paid" and paid == invoice["Balance"]
            ):
                raise ValueError(
                    f"a payment of {paid} does not fit a balance of {invoice['Balance']}"
                )
            payment_id = company.new_id()
            invoice["Balance"] -= paid
            invoice["LinkedTxn"].append({"TxnId": payment_id, "TxnType": "Payment"})
        else:
            raise ValueError(f"unknown state {state!r}")
        invoice["SyncToken"] = str(int(invoice["SyncToken"]) + 1)
        invoice["MetaData"]["LastUpdatedTime"] = _meta_time(self.clock())
        return json.loads(json_text(invoice))

    def duplicate_invoice(self, invoice_id: str) -> str:
        """A copy with the same DocNumber, note and lines (QBO takes duplicate DocNumbers when
        the company does not refuse them, or from its UI after a warning)."""
        company = self.companies[self.realm]
        copied = copy.deepcopy(company.invoices[invoice_id])
        new_id = company.new_id()
        copied.update(_entity(new_id, self.clock()))
        company.invoices[new_id] = copied
        self.count_created("invoice")
        return new_id

    def writes_since(self, start: int = 0) -> list[Any]:
        """Every request but GETs and queries (a query is a POST that reads)."""
        return [
            r
            for r in self.log.since(start)
            if r.method != "GET" and not (r.route or "").endswith("/query")
        ]

    def snapshot_objects(self) -> JSON:
        company = self.companies[self.realm]
        return json.loads(
            json_text(
                {
                    "customers": list(company.customers.values()),
                    "items": list(company.items.values()),
                    "accounts": list(company.accounts.values()),
                    "invoices": list(company.invoices.values()),
                    "credit_memos": list(company.credit_memos.values()),
                    "payments": list(company.payments.values()),
                    "emails": company.emails,
                    "token_grants": self.token_grants,
                }
            )
        )

    def provider_config(self) -> JSON:
        return {
            "throttle_format": self.throttle_format,
            "duplicate_doc_numbers": self.duplicate_doc_numbers,
            "access_token_lifetime": self.access_token_lifetime,
        }

    def configure_provider(self, settings: Mapping[str, Any]) -> None:
        if "throttle_format" in settings:
            if settings["throttle_format"] not in ("json", "xml", "alternate"):
                raise ValueError("throttle_format is json, xml or alternate")
            self.throttle_format = settings["throttle_format"]
        if "duplicate_doc_numbers" in settings:
            self.duplicate_doc_numbers = bool(settings["duplicate_doc_numbers"])
        if "access_token_lifetime" in settings:
            self.access_token_lifetime = float(settings["access_token_lifetime"])

    # Hooks ------------------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return (
            "1-"
            + "".join(self.rng.choices("0123456789abcdef", k=8))
            + "-"
            + "".join(self.rng.choices("0123456789abcdef", k=24))
        )

    def authenticate(self, request: ProviderRequest) -> str:
        if request.path == TOKEN_PATH:
            return "oauth"
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise authentication_failed("Token invalid: no bearer token")
        with self.lock:
            held = self.access_tokens.get(header.removeprefix("Bearer "))
        if held is None:
            raise authentication_failed("Token invalid")
        if held[1] <= self.clock():
            raise authentication_failed("Token expired")
        realm = request.path_params.get("realm")
        if realm is not None and realm != held[0]:
            raise QuickBooksFault(
                403,
                "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                code="3100",
                fault_type="AUTHORIZATION",
            )
        return held[0]

    def parse(self, request: ProviderRequest) -> Any:
        if request.idempotency_key is not None and len(request.idempotency_key) > MAX_REQUEST_ID:
            raise validation(
                "2010",
                "Request has invalid or unsupported property",
                f"requestid is longer than {MAX_REQUEST_ID} characters",
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        template = request.route.template if request.route else ""
        if template == TOKEN_PATH:
            if content_type != "application/x-www-form-urlencoded":
                raise OAuthError(400, "invalid_request", code="invalid_request")
            form = parse_qs(request.body.decode("utf-8"), keep_blank_values=True)
            return {k: v[0] for k, v in form.items()}
        if template.endswith("/query"):
            if request.method == "GET":
                return {"query": request.query_value("query")}
            if content_type not in ("application/text", "text/plain"):
                raise validation(
                    "2010",
                    "Request has invalid or unsupported property",
                    f"a query is sent as application/text, not {content_type or 'nothing'}",
                )
            return {"query": request.body.decode("utf-8")}
        if template.endswith("/send"):
            if request.body.strip():
                raise validation(
                    "2010", "Request has invalid or unsupported property", "send takes no body"
                )
            return {}
        if template in self._JSON_ROUTES:
            if content_type != "application/json":
                raise validation(
                    "2010",
                    "Request has invalid or unsupported property",
                    f"Content-Type must be application/json, not {content_type or 'nothing'}",
                )
            try:
                return json.loads(request.body.decode("utf-8"), parse_float=Decimal)
            except (ValueError, UnicodeDecodeError, InvalidOperation):
                raise validation(
                    "2010", "Request has invalid or unsupported property", "The body is not JSON"
                ) from None
        return {}

    def respond(self, request: ProviderRequest, result: Any) -> FakeResponse:
        if isinstance(result, FakeResponse):
            return result
        if request.path != TOKEN_PATH:
            result = {**copy.deepcopy(result), "time": intuit_time(self.clock())}
        return FakeResponse(200, result)

    def idempotency_mismatch(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        return validation(
            "6000",
            "A business validation error has occurred while processing your request",
            "kiki fake: this requestid was used for another request",
        ).response()

    def idempotency_in_progress(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        return QuickBooksFault(
            409,
            "A request with this requestid is in progress",
            code="6000",
            fault_type="SystemFault",
        ).response()

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        return self._throttle_response(None)

    def _throttle_response(
        self, body: str | None, headers: Mapping[str, str] | None = None
    ) -> FakeResponse:
        form = body or self.throttle_format
        if form == "alternate":
            with self.lock:
                self._throttles += 1
                form = "xml" if self._throttles % 2 == 0 else "json"
        if form == "xml":
            return FakeResponse(
                429,
                throttle_xml(intuit_time(self.clock())),
                dict(headers or {}),
                content_type="application/xml",
            )
        return QuickBooksFault(
            429,
            THROTTLE_MESSAGE,
            detail=THROTTLE_DETAIL,
            code="3001",
            fault_type="SERVICE",
            headers=headers,
        ).response()

    def render_error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FakeResponse:
        if status == 429:
            return self._throttle_response(None, headers)
        if status == 401:
            return authentication_failed(message).response()
        fault_type = "SystemFault" if status >= 500 else "ValidationFault"
        return QuickBooksFault(
            status,
            message,
            detail=message,
            code=code or ("10000" if status >= 500 else "6000"),
            fault_type=fault_type,
            headers=headers,
        ).response()

    def render_fault(self, fault: Fault) -> FakeResponse:
        body = getattr(fault, "body", "json")
        if fault.status == 429:
            return self._throttle_response(None if body == "json" else body, fault.headers)
        if fault.status >= 500 and body == "html":
            page = (
                "<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title>"
                "</head><body><h1>Service Temporarily Unavailable</h1></body></html>"
            )
            return FakeResponse(fault.status, page, dict(fault.headers), content_type="text/html")
        if body == "xml":
            code = fault.code or ("10000" if fault.status >= 500 else "6000")
            xml = (
                '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
                f'<IntuitResponse time="{intuit_time(self.clock())}" '
                'xmlns="http://schema.intuit.com/finance/v3">'
                f'<Fault type="SystemFault"><Error code="{code}"><Message>{fault.message}'
                "</Message></Error></Fault></IntuitResponse>"
            )
            return FakeResponse(
                fault.status, xml, dict(fault.headers), content_type="application/xml"
            )
        return self.render_error(
            fault.status, fault.message, code=fault.code, headers=fault.headers
        )

    def finish_response(self, request: ProviderRequest, response: FakeResponse) -> None:
        if isinstance(response.body, dict):
            body = response.body
            if "Fault" in body and "time" not in body:
                body = {**body, "time": intuit_time(self.clock())}
            response.body = json_text(body)
            response.content_type = "application/json;charset=UTF-8"

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        if target.split("?")[0] == "/_fake/quickbooks/tokens" and method.upper() == "POST":
            tokens = {
                "refresh_token": self.issue_refresh_token(),
                "access_token": self.issue_access_token(),
                "realm": self.realm,
                "client_id": self.client_id,
                "client_secret": self.client_secret,
            }
            return FakeResponse(200, tokens)
        self.limiter.exempt.on = target.split("?")[0] == TOKEN_PATH
        try:
            return super().handle(method, target, headers, body)
        finally:
            self.limiter.exempt.on = False


class FakeQuickBooks(FakeProvider[FakeQuickBooksApp]):
    """The fake served on 127.0.0.1 (``api_base`` and ``token_url`` point the adapter at it)."""

    def __init__(
        self, app: FakeQuickBooksApp | None = None, *, port: int = 0, **settings: Any
    ) -> None:
        super().__init__(app or FakeQuickBooksApp(**settings), port=port)

    @property
    def api_base(self) -> str:
        """``KIKI_QUICKBOOKS_API_BASE`` for this fake."""
        return f"{self.url}/v3"

    @property
    def token_url(self) -> str:
        """``KIKI_QUICKBOOKS_TOKEN_URL`` for this fake."""
        return f"{self.url}{TOKEN_PATH}"

    def invoices(self) -> list[JSON]:
        """The company's invoices, as stored."""
        return list(self.state()["invoices"])


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.fake_quickbooks``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_quickbooks",
        description="QuickBooks Online fake on 127.0.0.1.",
    )
    common_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="deterministic ids and tokens")
    parser.add_argument("--realm", default=REALM)
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="admit everything (benchmarks)"
    )
    args = parser.parse_args(argv)
    app = FakeQuickBooksApp(
        realm=args.realm,
        seed=args.seed,
        latency=args.latency,
        key_lifetime=args.key_lifetime,
        rate_limits=RateLimits() if args.no_rate_limits else None,
    )
    return serve_until_stopped(FakeQuickBooks(app, port=args.port), args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
