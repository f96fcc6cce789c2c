"""A Zuora-compatible SOAP fake on the shared fake-provider base (tests, crash tests, benches).

It answers ``POST /apps/services/a/<version>`` (and ``POST /``) like Zuora's SOAP API, from the
WSDL it is given (78.0 by default; ``--wsdl`` for another), and is at least as strict:

- every request envelope is checked against the WSDL's embedded schemas (SOAP 1.1 frame, header
  blocks, the body's element, ``xsi:type`` of zObjects, ID patterns, decimals, dates) and
  refused with a SOAP fault; every answer is checked the same way before it is sent;
- ``login`` opens a session that expires after ``session_lifetime`` seconds of the fake's clock
  (``INVALID_SESSION`` afterwards; tests advance the clock instead of sleeping); a wrong
  password is a ``LoginFault``; failed logins are counted;
- ``query`` takes a ZOQL subset (``select f, ... from Object where f = 'v' and g like 'x%' or
  ...``: ``=``, ``!=``, ``like``, ``and`` before ``or``, no parentheses), checks
  every field against the WSDL (``INVALID_FIELD``), answers ``done``/``queryLocator``/
  ``records`` (typed with ``xsi:type``) and pages after ``QueryOptions.batchSize`` (2000);
- ``create`` (Account, Contact, InvoiceItemAdjustment) and ``update`` (Account, Contact, an
  Invoice's Status: unpost Posted -> Draft without payments or adjustments, cancel a Draft) with
  Zuora's rules (an adjustment per item, only toward a zero balance): required
  fields, a unique AccountNumber (``DUPLICATE_VALUE``), the tenant's currencies, payment terms
  and batches, an account activated only with a bill-to and sold-to contact of its own; at most
  50 objects a call; ``CallOptions.useSingleTransaction``: all or nothing;
- ``subscribe`` of an existing active account: a unique ``Subscription.Name``
  (``DUPLICATE_VALUE`` inside ``SubscribeResult`` with ``Success=false``), term rules, rate plans
  and charges of the configured catalogue (unknown ids, a charge of another rate plan or not
  priced in the account's currency: ``INVALID_VALUE``), a price with more decimals than the
  currency has; with ``GenerateInvoice`` an invoice with one item per charge (charges of the
  rate plan that were not overridden come at their list price, taxable charges add tax, the
  ``Account`` processing scope also bills the account's unbilled charges), whose ``Amount`` is
  checked against its items; ``ProcessPayments`` collects it (or fails the whole call when
  payments are declined); one transaction per call with ``useSingleTransaction``;
- limits: 20 requests in flight and 50,000 a minute (a sliding window), answered with HTTP 429
  and a ``REQUEST_EXCEEDED_LIMIT`` fault; faults (``LOCK_COMPETITION``, ``TEMPORARY_ERROR``, a 503
  page, lost responses, delays) can be scripted per SOAP operation.

SOAP has no idempotency key: replays are made safe by the unique subscription name and account
number, which this fake enforces.

What happens in Zuora's own UI is a control call: a payment in full or in part, a cancel, a
delete (``fake.mark_invoice``), or a second subscription with its own invoice for the same
invoice number (``fake.duplicate_invoice``).

Run it as a process (crash tests, benchmarks)::

    python -m tests.support.fake_zuora --port 0 --ready-file F [--seed N] [--wsdl PATH]

The user is ``kiki-fake-api@example.com`` / ``kiki-fake-password`` (``users`` in
``/_fake/config`` to change), and the catalogue holds :data:`ONE_TIME_RATE_PLAN` with its one-time
flat-fee charge :data:`ONE_TIME_CHARGE` priced in every currency of the tenant. Faults for one
operation: ``POST /_fake/faults {"preset": "soap_fault", "operation": "subscribe", "code":
"LOCK_COMPETITION"}`` (or ``{"preset": "lost", "operation": "subscribe"}``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import re
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Self

from lxml import etree

from tests.support.fake_provider import (
    JSON,
    FakeProvider,
    FakeProviderApp,
    FakeResponse,
    Fault,
    ProviderError,
    ProviderRequest,
    RateLimits,
    Rejection,
    Route,
    Window,
    common_arguments,
    serve_until_stopped,
    spawn_fake,
)
from tests.support.zuora_wsdl import (
    API_NS,
    FAULT_NS,
    OBJECT_NS,
    SOAP_ENV,
    WSDL_78,
    XSI,
    EnvelopeProblem,
    ZuoraSchema,
    schema_for,
)

DEFAULT_USERNAME = "kiki-fake-api@example.com"
DEFAULT_PASSWORD = "kiki-fake-password"
SESSION_LIFETIME = 900.0
"""Seconds a session lives on the fake's clock (Zuora's default session timeout)."""
MAX_OBJECTS = 50
QUERY_BATCH = 2000
ZUORA_TZ = timezone(timedelta(hours=-8))
"""Zuora's API answers times in the tenant's zone (Pacific time by default)."""
# The tenant's currencies (with their decimals) and the payment terms and batches it starts with.
CURRENCIES = {"USD": 2, "EUR": 2, "GBP": 2, "CAD": 2, "AUD": 2, "CHF": 2, "JPY": 0}
PAYMENT_TERMS = ("Due Upon Receipt", "Net 15", "Net 30", "Net 45", "Net 60", "Net 90")
BATCHES = tuple(f"Batch{n}" for n in range(1, 51))
LOGIN_FAILED = "Invalid login. User name and password do not match."

ONE_TIME_RATE_PLAN = "2c92c0f95a0f1c3f015a10ce6f2d3b8d"
ONE_TIME_CHARGE = "2c92c0f95a0f1c3f015a10ce6f4a3b91"
"""A one-time flat-fee charge priced in every currency (the usual kiki set-up)."""
USD_ONLY_RATE_PLAN = "2c92c0f95a0f1c3f015a10ce70113c02"
USD_ONLY_CHARGE = "2c92c0f95a0f1c3f015a10ce70243c05"
"""A one-time charge priced in USD only."""
TAXED_RATE_PLAN = "2c92c0f95a0f1c3f015a10ce71a53d10"
TAXED_CHARGE = "2c92c0f95a0f1c3f015a10ce71b83d13"
"""A one-time charge with 10 % tax: the invoice totals more than the prices."""
BUNDLE_RATE_PLAN = "2c92c0f95a0f1c3f015a10ce72c73e20"
BUNDLE_CHARGE = "2c92c0f95a0f1c3f015a10ce72d93e23"
BUNDLE_SETUP_CHARGE = "2c92c0f95a0f1c3f015a10ce72ea3e26"
"""A rate plan with a second one-time charge (a 25.00 set-up fee) besides the one to price."""

_ALNUM = string.ascii_letters + string.digits
_CURRENT = threading.local()
"""The SOAP operation of the request this thread is handling (for per-operation faults)."""


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogCharge:
    """A product rate plan charge: one-time, flat fee, its list price per currency."""

    id: str
    rate_plan_id: str
    name: str
    prices: Mapping[str, Decimal]
    tax_rate: Decimal = Decimal(0)


@dataclass(frozen=True)
class CatalogRatePlan:
    """A product rate plan and its charges."""

    id: str
    name: str
    charges: tuple[str, ...]


def default_catalog() -> tuple[dict[str, CatalogRatePlan], dict[str, CatalogCharge]]:
    """The rate plans and charges of the fake tenant."""
    everywhere = {code: Decimal(0) for code in CURRENCIES}
    charges = [
        CatalogCharge(ONE_TIME_CHARGE, ONE_TIME_RATE_PLAN, "Profit share fee", everywhere),
        CatalogCharge(USD_ONLY_CHARGE, USD_ONLY_RATE_PLAN, "US fee", {"USD": Decimal(0)}),
        CatalogCharge(
            TAXED_CHARGE, TAXED_RATE_PLAN, "Taxed fee", everywhere, tax_rate=Decimal("0.10")
        ),
        CatalogCharge(BUNDLE_CHARGE, BUNDLE_RATE_PLAN, "Bundle fee", everywhere),
        CatalogCharge(
            BUNDLE_SETUP_CHARGE,
            BUNDLE_RATE_PLAN,
            "Set-up fee",
            {code: Decimal(25) for code in CURRENCIES},
        ),
    ]
    plans = [
        CatalogRatePlan(ONE_TIME_RATE_PLAN, "Profit share", (ONE_TIME_CHARGE,)),
        CatalogRatePlan(USD_ONLY_RATE_PLAN, "Profit share (US)", (USD_ONLY_CHARGE,)),
        CatalogRatePlan(TAXED_RATE_PLAN, "Profit share (taxed)", (TAXED_CHARGE,)),
        CatalogRatePlan(
            BUNDLE_RATE_PLAN, "Profit share bundle", (BUNDLE_CHARGE, BUNDLE_SETUP_CHARGE)
        ),
    ]
    return {p.id: p for p in plans}, {c.id: c for c in charges}


# --------------------------------------------------------------------------------------------
# Faults and errors
# --------------------------------------------------------------------------------------------


@dataclass
class ZuoraFault(Fault):
    """A fault for one SOAP operation (``operation``; None: any), rendered as Zuora does.

    Every SOAP call is a POST to the same URL, so the operation is what tells them apart. An
    ``error`` with a ``code`` is a SOAP fault with that Zuora code (HTTP ``status``, 500 by
    default as Zuora answers faults); without a code it is a bare HTTP error page (a load
    balancer's 503).
    """

    operation: str | None = None

    def matches(self, method: str, path: str) -> bool:
        """The method and path, and the operation of the request being handled."""
        if self.operation is not None and getattr(_CURRENT, "operation", None) != self.operation:
            return False
        return super().matches(method, path)

    @classmethod
    def soap_fault(
        cls,
        operation: str | None = None,
        code: str = "LOCK_COMPETITION",
        *,
        message: str | None = None,
        status: int = 500,
        **kw: Any,
    ) -> Self:
        """A SOAP fault with Zuora's ``code`` (``LOCK_COMPETITION``, ``TEMPORARY_ERROR``...)."""
        text = message or _FAULT_MESSAGES.get(code, f"{code} (injected by the kiki fake)")
        return cls(kind="error", operation=operation, code=code, status=status, message=text, **kw)

    @classmethod
    def presets(cls) -> dict[str, Callable[..., Self]]:
        """The base presets plus ``soap_fault``."""
        return {**super().presets(), "soap_fault": cls.soap_fault}


_FAULT_MESSAGES = {
    "LOCK_COMPETITION": "Operation failed due to a lock competition, please retry later.",
    "TEMPORARY_ERROR": "A temporary error occurred. Please retry later.",
    "SERVER_UNAVAILABLE": "The server is temporarily unavailable, please retry later.",
    "TRANSACTION_TIMEOUT": "The transaction timed out. Please retry later.",
    "INVALID_SESSION": "Invalid Session",
}


class SoapFault(ProviderError):
    """A SOAP fault: ``faultcode`` ``fns:<code>`` and the detail element ``detail``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 500,
        detail: str = "UnexpectedErrorFault",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=headers)
        self.detail = detail

    def response(self) -> FakeResponse:
        """The fault envelope."""
        return soap_fault_response(
            self.code or "UNKNOWN_ERROR", self.message, self.status, self.detail, self.headers
        )


class ResultError(Exception):
    """An error reported inside a result (``Success=false``), not as a fault."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def soap_fault_response(
    code: str,
    message: str,
    status: int = 500,
    detail: str = "UnexpectedErrorFault",
    headers: Mapping[str, str] | None = None,
) -> FakeResponse:
    """A SOAP 1.1 fault as Zuora sends it: ``fns:<CODE>``, the message, the typed detail."""
    root = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV, "fns": FAULT_NS})
    body = etree.SubElement(root, f"{{{SOAP_ENV}}}Body")
    fault = etree.SubElement(body, f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"fns:{code}"
    etree.SubElement(fault, "faultstring").text = message
    if code in _ERROR_CODES:
        holder = etree.SubElement(etree.SubElement(fault, "detail"), f"{{{FAULT_NS}}}{detail}")
        etree.SubElement(holder, f"{{{FAULT_NS}}}FaultCode").text = code
        etree.SubElement(holder, f"{{{FAULT_NS}}}FaultMessage").text = message
    return FakeResponse(status, _serialize(root), dict(headers or {}), content_type=_XML)


_XML = "text/xml; charset=utf-8"
_ERROR_CODES = frozenset(
    [
        "API_DISABLED",
        "CANNOT_DELETE",
        "CREDIT_CARD_PROCESSING_FAILURE",
        "DUPLICATE_VALUE",
        "INVALID_FIELD",
        "INVALID_LOGIN",
        "INVALID_SESSION",
        "INVALID_TYPE",
        "INVALID_ID",
        "INVALID_VALUE",
        "INVALID_VERSION",
        "LOCK_COMPETITION",
        "MALFORMED_QUERY",
        "MAX_RECORDS_EXCEEDED",
        "MISSING_REQUIRED_VALUE",
        "NO_PERMISSION",
        "SERVER_UNAVAILABLE",
        "UNKNOWN_ERROR",
        "TRANSACTION_FAILED",
        "INVALID_TEMPLATE",
        "ACCOUNTING_PERIOD_CLOSED",
        "BATCH_FAIL_ERROR",
        "PDF_QUERY_ERROR",
        "REQUEST_EXCEEDED_LIMIT",
        "REQUEST_EXCEEDED_RATE",
        "REQUEST_REJECTED",
        "TEMPORARY_ERROR",
        "TRANSACTION_TERMINATED",
        "TRANSACTION_TIMEOUT",
    ]
)
"""The WSDL's ErrorCode enumeration: only these may appear in a fault's detail."""


def _serialize(root: Any) -> bytes:
    data: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    return data


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass
class SoapCall:
    """A parsed, checked SOAP request."""

    operation: str
    payload: Any
    """The body's element."""
    session: str | None
    single_transaction: bool
    batch_size: int | None
    version: str


@dataclass
class Tenant:
    """Everything the fake tenant holds (copied whole to roll a transaction back)."""

    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_plan_charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoice_items: dict[str, dict[str, Any]] = field(default_factory=dict)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    adjustments: dict[str, dict[str, Any]] = field(default_factory=dict)
    numbers: Counter[str] = field(default_factory=Counter)

    def table(self, zobject: str) -> dict[str, dict[str, Any]] | None:
        """The records of a queryable zObject type."""
        return {
            "Account": self.accounts,
            "Contact": self.contacts,
            "Subscription": self.subscriptions,
            "RatePlan": self.rate_plans,
            "RatePlanCharge": self.rate_plan_charges,
            "Invoice": self.invoices,
            "InvoiceItem": self.invoice_items,
            "Payment": self.payments,
            "InvoiceItemAdjustment": self.adjustments,
        }.get(zobject)


# --------------------------------------------------------------------------------------------
# ZOQL
# --------------------------------------------------------------------------------------------

_ZOQL = re.compile(
    r"^\s*select\s+(?P<fields>.+?)\s+from\s+(?P<object>\w+)(?:\s+where\s+(?P<where>.+?))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_CONDITION = re.compile(
    r"\s*(?P<field>\w+)\s*(?P<op>!=|=|like\b)\s*(?:'(?P<text>(?:[^'\\]|\\.)*)'"
    r"|(?P<number>-?\d+(?:\.\d+)?)|(?P<null>null))\s*",
    re.IGNORECASE,
)
_JOINER = re.compile(r"(and|or)\s+", re.IGNORECASE)
Condition = tuple[str, str, str | None]


@dataclass(frozen=True)
class Zoql:
    """``select fields from zobject where f = v and ... or ...`` (the subset the fake knows).

    Operators ``=``, ``!=`` and ``like`` (``%``: any characters, ``_``: one), joined by ``and``
    and ``or``, ``and`` binding first, no parentheses (Zuora's "Filter Statements").
    """

    fields: tuple[str, ...]
    zobject: str
    conditions: tuple[tuple[Condition, ...], ...]
    """Alternatives (joined by ``or``), each a conjunction of ``(field, op, value)``."""

    @classmethod
    def parse(cls, text: str) -> Zoql:
        """Parse a statement.

        Raises:
            SoapFault: ``MALFORMED_QUERY``, as Zuora answers.
        """
        found = _ZOQL.match(text)
        if not found:
            raise _malformed(text)
        fields = tuple(f.strip() for f in found["fields"].split(","))
        if not all(re.fullmatch(r"\w+", f) for f in fields):
            raise _malformed(text)
        alternatives: list[tuple[Condition, ...]] = []
        current: list[Condition] = []
        where = found["where"] or ""
        position = 0
        while where and position < len(where):
            match = _CONDITION.match(where, position)
            if not match:
                raise _malformed(text)
            value: str | None
            if match["null"] is not None:
                value = None
            elif match["number"] is not None:
                value = match["number"]
            else:
                value = re.sub(r"\\(.)", r"\1", match["text"])
            op = match["op"].lower()
            if op == "like" and match["text"] is None:
                raise _malformed(text)
            current.append((match["field"], op, value))
            position = match.end()
            if position < len(where):
                joiner = _JOINER.match(where, position)
                if not joiner:
                    raise _malformed(text)  # parentheses are beyond the fake
                if joiner[1].lower() == "or":
                    alternatives.append(tuple(current))
                    current = []
                position = joiner.end()
        if current:
            alternatives.append(tuple(current))
        return cls(fields, found["object"], tuple(alternatives))


def like(pattern: str, text: str | None) -> bool:
    """ZOQL ``like``: ``%`` any characters, ``_`` one character, everything else itself."""
    if text is None:
        return False
    regex = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


def soap_operation(body: str) -> str | None:
    """The operation of a SOAP request body (the local name of its Body's element)."""
    try:
        root = etree.fromstring(body.encode("utf-8"))
    except etree.XMLSyntaxError:
        return None
    found = root.find(f"{{{SOAP_ENV}}}Body")
    children = [c for c in found if isinstance(c.tag, str)] if found is not None else []
    return etree.QName(children[0]).localname if children else None


def _malformed(text: str) -> SoapFault:
    return SoapFault(
        "MALFORMED_QUERY",
        f"You have an error in your ZOQL syntax: {text}",
        detail="MalformedQueryFault",
    )


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


def soap_call(app: FakeZuoraApp, request: ProviderRequest) -> FakeResponse:
    """The one route: dispatch on the body's operation."""
    return app.dispatch(request.params)


class FakeZuoraApp(FakeProviderApp):
    """Zuora's SOAP API on the provider-independent base, without any HTTP.

    Args:
        wsdl: The WSDL whose schemas requests and answers must satisfy (78.0 by default).
        seed: Make ids, session ids and numbers deterministic.
        session_lifetime: Seconds a session lives on the fake's clock.
        users: ``{username: password}`` (default: the fake's one user).
        schema_check: Refuse requests the WSDL's schemas reject (and check every answer).
        decline_payments: ``ProcessPayments`` fails (the whole subscribe call) when true.
        rate_limit_retry_after: Send ``Retry-After`` with 429s (seconds; None: none).
        latency, rate_limits, clock: As for every fake.
    """

    name = "zuora"
    routes = (
        Route("POST", "/apps/services/a/{version}", soap_call),
        Route("POST", "/", soap_call),
    )
    key_header = None  # NOTE: Zuora's SOAP API has no idempotency key.
    # NOTE: Zuora's published limits (PROVIDERS.md): 50,000 requests a minute per tenant and
    # about 20 concurrent invoice-creating calls; the fake applies 20 to every call.
    default_rate_limits = RateLimits(windows=(Window(50_000, 60.0, "minute"),), concurrency=20)
    request_id_header = "Zuora-Request-Id"
    fault_type = ZuoraFault
    provider_settings = (
        "session_lifetime",
        "users",
        "schema_check",
        "decline_payments",
        "rate_limit_retry_after",
    )

    def __init__(
        self,
        *,
        wsdl: str | Path = WSDL_78,
        seed: int | None = None,
        session_lifetime: float = SESSION_LIFETIME,
        users: Mapping[str, str] | None = None,
        schema_check: bool = True,
        decline_payments: bool = False,
        rate_limit_retry_after: float | None = None,
        latency: float = 0.0,
        rate_limits: RateLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(latency=latency, rate_limits=rate_limits, clock=clock)
        self.schema: ZuoraSchema = schema_for(wsdl)
        self.seed = seed
        self.rng = random.Random(seed)
        self.session_lifetime = session_lifetime
        self.users = dict(users or {DEFAULT_USERNAME: DEFAULT_PASSWORD})
        self.schema_check = schema_check
        self.decline_payments = decline_payments
        self.rate_limit_retry_after = rate_limit_retry_after
        self.rate_plans, self.charges = default_catalog()
        self.tenant = Tenant()
        self.sessions: dict[str, tuple[str, float]] = {}
        self.locators: dict[str, list[dict[str, Any]]] = {}
        self.failed_logins: Counter[str] = Counter()
        self.rejected: list[str] = []
        """Why requests were refused by the schema check (tests expect none)."""

    # -- the base's hooks -------------------------------------------------------------------

    def parse(self, request: ProviderRequest) -> SoapCall:
        """Check the envelope against the WSDL and find the operation, session and options."""
        _CURRENT.operation = None
        try:
            if self.schema_check:
                root = self.schema.check_envelope(request.body)
            else:
                root = etree.fromstring(request.body, etree.XMLParser(resolve_entities=False))
        except (EnvelopeProblem, etree.XMLSyntaxError) as exc:
            with self.lock:
                self.rejected.append(str(exc))
            raise SoapFault("INVALID_VALUE", f"Invalid request: {exc}") from None
        header = root.find(f"{{{SOAP_ENV}}}Header")
        payload = next(c for c in root.find(f"{{{SOAP_ENV}}}Body") if isinstance(c.tag, str))
        operation = etree.QName(payload).localname
        _CURRENT.operation = operation
        session = single = batch = None
        if header is not None:
            session = header.findtext(f"{{{API_NS}}}SessionHeader/{{{API_NS}}}session")
            single = header.findtext(f"{{{API_NS}}}CallOptions/{{{API_NS}}}useSingleTransaction")
            batch = header.findtext(f"{{{API_NS}}}QueryOptions/{{{API_NS}}}batchSize")
        version = request.path_params.get("version") or self.schema.version
        return SoapCall(
            operation,
            payload,
            session,
            single in ("true", "1"),
            int(batch) if batch else None,
            version,
        )

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        """HTTP 429 with a ``REQUEST_EXCEEDED_LIMIT`` fault (Retry-After only if configured)."""
        if rejection.reason == "concurrency":
            message = (
                "The total number of concurrent requests has exceeded the limit allowed by the "
                "system. Please resubmit your request later."
            )
        else:
            message = (
                f"The number of requests per {rejection.problem} has exceeded the limit allowed "
                "by the system. Please resubmit your request later."
            )
        headers = {}
        if self.rate_limit_retry_after is not None:
            headers["Retry-After"] = str(int(self.rate_limit_retry_after))
        return soap_fault_response("REQUEST_EXCEEDED_LIMIT", message, 429, headers=headers)

    def render_error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FakeResponse:
        """A SOAP fault with a code; otherwise the HTML page a load balancer would send."""
        if code is not None:
            return soap_fault_response(code, message, status, headers=headers)
        page = f"<html><body><h1>{status}</h1><p>{message}</p></body></html>"
        return FakeResponse(status, page, dict(headers or {}), content_type="text/html")

    def new_request_id(self) -> str:
        """A UUID-like request id (Zuora-Request-Id)."""
        hexes = "".join(random.choices("0123456789abcdef", k=32))
        return "-".join((hexes[:8], hexes[8:12], hexes[12:16], hexes[16:20], hexes[20:]))

    def configure_provider(self, settings: Mapping[str, Any]) -> None:
        """Change the session lifetime, users, schema check, payment declines, Retry-After."""
        with self.lock:
            for name, value in settings.items():
                setattr(self, name, dict(value) if name == "users" else value)

    def provider_config(self) -> JSON:
        """Zuora's settings (never the passwords)."""
        return {
            "wsdl": str(self.schema.path),
            "session_lifetime": self.session_lifetime,
            "users": sorted(self.users),
            "schema_check": self.schema_check,
            "decline_payments": self.decline_payments,
            "rate_limit_retry_after": self.rate_limit_retry_after,
        }

    def reset_objects(self) -> None:
        """Forget every object, session and counter (the catalogue and users stay)."""
        self.tenant = Tenant()
        self.sessions.clear()
        self.locators.clear()
        self.failed_logins.clear()
        self.rejected.clear()
        self.rng = random.Random(self.seed)

    def snapshot_objects(self) -> JSON:
        """The tenant's objects, as JSON."""
        t = self.tenant
        return {
            "accounts": _plain(list(t.accounts.values())),
            "contacts": _plain(list(t.contacts.values())),
            "subscriptions": [
                {
                    **_plain(sub),
                    "rate_plan_charges": _plain(
                        [c for c in t.rate_plan_charges.values() if c["_subscription"] == sub["Id"]]
                    ),
                }
                for sub in t.subscriptions.values()
            ],
            "invoices": [
                {
                    **_plain(inv),
                    "items": _plain(
                        [i for i in t.invoice_items.values() if i["InvoiceId"] == inv["Id"]]
                    ),
                }
                for inv in t.invoices.values()
            ],
            "payments": _plain(list(t.payments.values())),
            "adjustments": _plain(list(t.adjustments.values())),
            "sessions": len(self.sessions),
            "failed_logins": dict(self.failed_logins),
            "schema_rejections": list(self.rejected),
        }

    # -- control ------------------------------------------------------------------------------

    def expire_sessions(self) -> None:
        """End every session now (the next call with one gets ``INVALID_SESSION``)."""
        with self.lock:
            self.sessions.clear()

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> JSON:
        """A payment (in full or part), a cancel or a delete, as Zuora's UI makes them.

        Payments apply to Posted invoices and lower ``Balance`` (``PaymentAmount`` adds them
        up). ``void`` cancels an invoice without payments (Posted ones are unposted first) and
        leaves nothing due; ``deleted`` removes it and its items, whose charges can then be
        billed again.
        """
        tenant = self.tenant
        invoice = tenant.invoices[invoice_id]
        account = tenant.accounts[invoice["AccountId"]]
        if state in ("paid", "partly_paid"):
            if invoice["Status"] != "Posted":
                raise ValueError(f"payments apply to posted invoices, not {invoice['Status']}")
            due = invoice["Balance"]
            exponent = CURRENCIES[account["Currency"]]
            half = (due / 2).quantize(Decimal(1).scaleb(-exponent))
            paid = due if state == "paid" else (Decimal(amount) if amount else half)
            if not 0 < paid <= due or (state == "partly_paid" and paid == due):
                raise ValueError(f"a payment of {paid} does not fit a balance of {due}")
            tenant.numbers["payment"] += 1
            payment = self._new_record(
                {},
                AccountId=account["Id"],
                Amount=paid,
                EffectiveDate=self._now().date(),
                PaymentNumber=f"P-{tenant.numbers['payment']:08d}",
                Status="Processed",
                Type="External",
                _invoice=invoice_id,
            )
            tenant.payments[payment["Id"]] = payment
            invoice["Balance"] -= paid
            invoice["PaymentAmount"] += paid
            account["Balance"] -= paid
        elif state in ("void", "deleted"):
            if invoice["PaymentAmount"]:
                raise ValueError("an invoice with payments applied is neither canceled nor deleted")
            account["Balance"] -= invoice["Balance"]
            if state == "void":
                invoice.update(Status="Canceled", Balance=Decimal(0))
            else:
                for item_id in [
                    i for i, it in tenant.invoice_items.items() if it["InvoiceId"] == invoice_id
                ]:
                    item = tenant.invoice_items.pop(item_id)
                    tenant.rate_plan_charges[item["RatePlanChargeId"]]["_invoiced"] = False
                del tenant.invoices[invoice_id]
                return {"Id": invoice_id, "deleted": True}
        else:
            raise ValueError(f"unknown state {state!r}")
        invoice["UpdatedDate"] = self._now()
        return _plain(invoice)

    def duplicate_invoice(self, invoice_id: str) -> str:
        """A second subscription of the invoice's (its name with ``-copy``, same notes, rate
        plans and charges) with an invoice of its own: what a run that lost its ledger, or a
        copy made by hand, leaves. Returns the new invoice's id."""
        tenant = self.tenant
        source = tenant.invoices[invoice_id]
        items = [i for i in tenant.invoice_items.values() if i["InvoiceId"] == invoice_id]
        subscriptions = {i["SubscriptionId"] for i in items}
        copies: dict[str, str] = {}
        for subscription_id in subscriptions:
            original = tenant.subscriptions[subscription_id]
            copied = self._new_record(
                {k: v for k, v in original.items() if k not in ("Id", "CreatedDate")},
                Name=f"{original['Name']}-copy",
            )
            copied["OriginalId"] = copied["Id"]
            tenant.subscriptions[copied["Id"]] = copied
            copies[subscription_id] = copied["Id"]
        tenant.numbers["invoice"] += 1
        invoice = dict(
            source,
            Id=self._new_id(),
            InvoiceNumber=f"INV{tenant.numbers['invoice']:08d}",
            Balance=source["Amount"],
            PaymentAmount=Decimal(0),
            Status="Posted",
            CreatedDate=self._now(),
        )
        tenant.invoices[invoice["Id"]] = invoice
        for item in items:
            charge = dict(
                tenant.rate_plan_charges[item["RatePlanChargeId"]],
                Id=self._new_id(),
                _subscription=copies[item["SubscriptionId"]],
            )
            tenant.rate_plan_charges[charge["Id"]] = charge
            copied_item = dict(
                item,
                Id=self._new_id(),
                InvoiceId=invoice["Id"],
                ChargeId=charge["Id"],
                RatePlanChargeId=charge["Id"],
                SubscriptionId=copies[item["SubscriptionId"]],
                SubscriptionNumber=tenant.subscriptions[copies[item["SubscriptionId"]]]["Name"],
            )
            tenant.invoice_items[copied_item["Id"]] = copied_item
        tenant.accounts[invoice["AccountId"]]["Balance"] += invoice["Amount"]
        self.count_created("invoice")
        return str(invoice["Id"])

    def writes_since(self, start: int = 0) -> list[Any]:
        """Every request but login, query and queryMore (SOAP reads are POSTs too)."""
        reads = ("login", "query", "queryMore")
        return [r for r in self.log.since(start) if soap_operation(r.body) not in reads]

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, call: SoapCall) -> FakeResponse:
        """Answer one checked SOAP call (under the app's lock)."""
        if call.operation == "login":
            return self.login(call)
        self.authorize(call)
        handlers: dict[str, Callable[[SoapCall], FakeResponse]] = {
            "query": self.query,
            "queryMore": self.query_more,
            "create": self.create,
            "update": self.update,
            "subscribe": self.subscribe,
        }
        handler = handlers.get(call.operation)
        if handler is None:
            raise SoapFault("INVALID_VALUE", f"the kiki fake does not implement {call.operation}")
        return handler(call)

    def authorize(self, call: SoapCall) -> None:
        """A session from login that has not expired, or ``INVALID_SESSION``."""
        found = self.sessions.get(call.session or "")
        if found is None or self.clock() - found[1] >= self.session_lifetime:
            self.sessions.pop(call.session or "", None)
            raise SoapFault("INVALID_SESSION", "Invalid Session")

    # -- login ------------------------------------------------------------------------------

    def login(self, call: SoapCall) -> FakeResponse:
        """A new session, or a ``LoginFault``."""
        username = call.payload.findtext(f"{{{API_NS}}}username") or ""
        password = call.payload.findtext(f"{{{API_NS}}}password") or ""
        if self.users.get(username) != password or not username:
            self.failed_logins[username] += 1
            raise SoapFault("INVALID_VALUE", LOGIN_FAILED, detail="LoginFault")
        session = "".join(self.rng.choices(_ALNUM + "-_", k=96))
        self.sessions[session] = (username, self.clock())
        server = f"{self.base_url}/apps/services/a/{call.version}"
        return self.reply(
            "login",
            [
                self.build(
                    "result",
                    API_NS,
                    "LoginResult",
                    {
                        "Session": session,
                        "ServerUrl": server,
                    },
                )
            ],
        )

    # -- query ------------------------------------------------------------------------------

    def query(self, call: SoapCall) -> FakeResponse:
        """A ZOQL query: the matching records, ``batchSize`` at a time."""
        statement = Zoql.parse(call.payload.findtext(f"{{{API_NS}}}queryString") or "")
        table = self.tenant.table(statement.zobject)
        if table is None or not self.schema.has_object(statement.zobject):
            raise SoapFault(
                "INVALID_TYPE",
                f"invalid type for query: {statement.zobject}",
                detail="MalformedQueryFault",
            )
        known = {f.name.lower(): f.name for f in self.schema.object_fields(statement.zobject)}
        known.pop("fieldstonull")

        def field_name(name: str) -> str:
            if name.lower() not in known:
                raise SoapFault(
                    "INVALID_FIELD",
                    f"invalid field for query: {statement.zobject}.{name}",
                    detail="MalformedQueryFault",
                )
            return known[name.lower()]

        selected = [field_name(f) for f in statement.fields]
        alternatives = [
            [(field_name(f), op, value) for f, op, value in conjunction]
            for conjunction in statement.conditions
        ]

        def holds(record: Mapping[str, Any], name: str, op: str, value: str | None) -> bool:
            current = record.get(name)
            text = None if current is None else self._text(statement.zobject, name, current)
            if op == "like":
                return like(value or "", text)
            return (text == value) if op == "=" else (text != value)

        found = []
        for record in table.values():
            if not alternatives or any(
                all(holds(record, *condition) for condition in conjunction)
                for conjunction in alternatives
            ):
                found.append({name: record.get(name) for name in selected})
        records = [(statement.zobject, r) for r in found]
        return self._query_page(records, call.batch_size or QUERY_BATCH)

    def query_more(self, call: SoapCall) -> FakeResponse:
        """The next page of a query."""
        locator = call.payload.findtext(f"{{{API_NS}}}queryLocator") or ""
        records = self.locators.pop(locator, None)
        if records is None:
            raise SoapFault(
                "INVALID_VALUE", "invalid query locator", detail="InvalidQueryLocatorFault"
            )
        return self._query_page(records, call.batch_size or QUERY_BATCH)

    def _query_page(self, records: list[Any], batch: int) -> FakeResponse:
        page, rest = records[:batch], records[batch:]
        locator = None
        if rest:
            locator = "".join(self.rng.choices("0123456789abcdef", k=32)) + f"-{batch}"
            self.locators[locator] = rest
        result = self.build(
            "result",
            API_NS,
            "QueryResult",
            {
                "done": not rest,
                "queryLocator": locator if locator else _NIL,
                "records": [
                    self.build("records", OBJECT_NS, zobject, values, xsi_type=True, tag_ns=API_NS)
                    for zobject, values in page
                ],
                "size": len(records),
            },
        )
        return self.reply("query", [result])

    # -- create and update --------------------------------------------------------------------

    def create(self, call: SoapCall) -> FakeResponse:
        """``create()`` of Accounts, Contacts and InvoiceItemAdjustments."""
        return self._save(
            call,
            "create",
            {
                "Account": self._create_account,
                "Contact": self._create_contact,
                "InvoiceItemAdjustment": self._create_adjustment,
            },
        )

    def update(self, call: SoapCall) -> FakeResponse:
        """``update()`` of Accounts, Contacts and an Invoice's Status."""
        return self._save(
            call,
            "update",
            {
                "Account": self._update_account,
                "Contact": self._update_contact,
                "Invoice": self._update_invoice,
            },
        )

    def _update_invoice(self, values: dict[str, Any]) -> str:
        """An invoice's status: Posted -> Draft (unpost), Draft -> Canceled or Posted.

        NOTE: an invoice is unposted only without payments or adjustments (Zuora's "Unpost
        invoice" rules), and only a Draft one is canceled.
        """
        invoice = self._existing(self.tenant.invoices, values, "Invoice")
        if set(values) - {"Id", "Status"}:
            raise ResultError(
                "INVALID_VALUE", "[kiki fake] only an invoice's Status can be updated.", "Status"
            )
        status, current = values.get("Status"), invoice["Status"]
        allowed = {"Posted": {"Draft"}, "Draft": {"Canceled", "Posted"}}
        if status not in allowed.get(current, set()):
            raise ResultError(
                "INVALID_VALUE",
                f"An invoice in status {current} cannot be changed to {status}.",
                "Status",
            )
        adjusted = any(a["InvoiceId"] == invoice["Id"] for a in self.tenant.adjustments.values())
        if status == "Draft" and (invoice["PaymentAmount"] or adjusted):
            raise ResultError(
                "INVALID_VALUE",
                "An invoice with payments or adjustments applied cannot be unposted.",
                "Status",
            )
        account = self.tenant.accounts[invoice["AccountId"]]
        if status == "Canceled":
            account["Balance"] -= invoice["Balance"]
            invoice["Balance"] = Decimal(0)
        invoice.update(Status=status, UpdatedDate=self._now())
        return str(invoice["Id"])

    def _create_adjustment(self, values: dict[str, Any]) -> str:
        """An InvoiceItemAdjustment, by Zuora's rules.

        NOTE: required AdjustmentDate (not before the invoice's date), Amount (positive), Type
        (Credit or Charge), SourceType and SourceId (an item of the invoice), one adjustment per
        item; the invoice must be Posted, and its balance can only be adjusted toward zero ("You
        cannot create an Adjustment that changes the invoice balance from positive to negative",
        Zuora's community knowledge base).
        """
        _no_id(values)
        for name in ("AdjustmentDate", "Amount", "Type", "SourceType", "SourceId"):
            _required(values, name)
        invoice = self.tenant.invoices.get(values.get("InvoiceId") or "")
        if invoice is None:
            raise ResultError("INVALID_ID", "Invalid invoice id.", "InvoiceId")
        if values["SourceType"] != "InvoiceDetail":
            raise ResultError(
                "INVALID_VALUE", "[kiki fake] SourceType InvoiceDetail only.", "SourceType"
            )
        item = self.tenant.invoice_items.get(values["SourceId"])
        if item is None or item["InvoiceId"] != invoice["Id"]:
            raise ResultError("INVALID_ID", "SourceId is not an item of the invoice.", "SourceId")
        if invoice["Status"] != "Posted":
            raise ResultError("INVALID_VALUE", "Only posted invoices can be adjusted.", "InvoiceId")
        if values["Type"] not in ("Credit", "Charge"):
            raise ResultError("INVALID_VALUE", "Type must be Credit or Charge.", "Type")
        amount = values["Amount"]
        exponent = CURRENCIES[self.tenant.accounts[invoice["AccountId"]]["Currency"]]
        if amount <= 0 or amount != amount.quantize(Decimal(1).scaleb(-exponent)):
            raise ResultError("INVALID_VALUE", "Amount must be positive, in minor units.", "Amount")
        if values["AdjustmentDate"] < invoice["InvoiceDate"]:
            raise ResultError(
                "INVALID_VALUE",
                "The adjustment date must be on or after the invoice date.",
                "AdjustmentDate",
            )
        if any(
            a["SourceId"] == item["Id"] and a["Status"] != "Canceled"
            for a in self.tenant.adjustments.values()
        ):
            raise ResultError(
                "INVALID_VALUE",
                "[kiki fake] The invoice item has an adjustment already (one per item).",
                "SourceId",
            )
        if values["Type"] == "Credit" and amount > min(invoice["Balance"], item["ChargeAmount"]):
            raise ResultError(
                "INVALID_VALUE",
                "You cannot create an Adjustment that changes the invoice balance from positive "
                "to negative (or credits more than the item).",
                "Amount",
            )
        self.tenant.numbers["adjustment"] += 1
        record = self._new_record(
            values,
            AccountId=invoice["AccountId"],
            AdjustmentNumber=f"IIA-{self.tenant.numbers['adjustment']:08d}",
            InvoiceNumber=invoice["InvoiceNumber"],
            Status="Processed",
        )
        self.tenant.adjustments[record["Id"]] = record
        delta = -amount if values["Type"] == "Credit" else amount
        invoice["Balance"] += delta
        invoice["AdjustmentAmount"] = invoice.get("AdjustmentAmount", Decimal(0)) + delta
        self.tenant.accounts[invoice["AccountId"]]["Balance"] += delta
        invoice["UpdatedDate"] = self._now()
        return str(record["Id"])

    def _save(
        self,
        call: SoapCall,
        operation: str,
        kinds: Mapping[str, Callable[[dict[str, Any]], str]],
    ) -> FakeResponse:
        zobjects = call.payload.findall(f"{{{API_NS}}}zObjects")
        if len(zobjects) > MAX_OBJECTS:
            raise SoapFault(
                "MAX_RECORDS_EXCEEDED",
                f"A single {operation} call takes at most {MAX_OBJECTS} objects.",
            )
        parsed = []
        for node in zobjects:
            kind = self._xsi_type(node)
            if kind not in kinds:
                raise SoapFault(
                    "INVALID_TYPE",
                    f"invalid type for {operation}: {kind}",
                    detail="InvalidTypeFault",
                )
            parsed.append((kind, self.values(node, OBJECT_NS, kind)))
        outcomes = self._transaction(
            [lambda kind=kind, values=values: kinds[kind](values) for kind, values in parsed],
            call.single_transaction,
        )
        for (kind, _), outcome in zip(parsed, outcomes, strict=True):
            if operation == "create" and not isinstance(outcome, ResultError):
                self.count_created(kind.lower())
        results = [
            self.build("result", API_NS, "SaveResult", _save_result(outcome))
            for outcome in outcomes
        ]
        return self.reply(operation, results)

    def _transaction(
        self, work: Sequence[Callable[[], Any]], single: bool
    ) -> list[Any | ResultError]:
        """Run each piece; with ``single``, the first error rolls every piece back."""
        before = copy.deepcopy(self.tenant)
        outcomes: list[Any | ResultError] = []
        for piece in work:
            mark = copy.deepcopy(self.tenant) if not single else None
            try:
                outcomes.append(piece())
            except ResultError as error:
                outcomes.append(error)
                if mark is not None:
                    self.tenant = mark
        if single and any(isinstance(o, ResultError) for o in outcomes):
            self.tenant = before
            outcomes = [
                o
                if isinstance(o, ResultError)
                else ResultError("TRANSACTION_FAILED", "The transaction was rolled back.")
                for o in outcomes
            ]
        return outcomes

    def _create_account(self, values: dict[str, Any]) -> str:
        _no_id(values)
        for name in ("Name", "Currency", "BillCycleDay", "Status"):
            _required(values, name)
        if values["Currency"] not in CURRENCIES:
            raise ResultError(
                "INVALID_VALUE", f"The currency {values['Currency']} is not enabled.", "Currency"
            )
        if not 0 <= values["BillCycleDay"] <= 31:
            raise ResultError("INVALID_VALUE", "BillCycleDay must be 0 to 31.", "BillCycleDay")
        self._check_account_choices(values)
        if values["Status"] != "Draft":
            raise ResultError(
                "INVALID_VALUE",
                "A new account is created as Draft; activate it with a bill-to and sold-to "
                "contact.",
                "Status",
            )
        if len(values["Name"]) > 255:
            raise ResultError("INVALID_VALUE", "Name is longer than 255 characters.", "Name")
        number = values.get("AccountNumber")
        if number is None:
            self.tenant.numbers["account"] += 1
            number = f"A{self.tenant.numbers['account']:08d}"
        elif len(number) > 70:
            raise ResultError("INVALID_VALUE", "AccountNumber is longer than 70.", "AccountNumber")
        if any(a["AccountNumber"] == number for a in self.tenant.accounts.values()):
            raise ResultError(
                "DUPLICATE_VALUE",
                f"The account number {number} is invalid: it is already in use.",
                "AccountNumber",
            )
        record = self._new_record(values, AccountNumber=number, Balance=Decimal(0))
        record.setdefault("PaymentTerm", "Net 30")
        record.setdefault("Batch", "Batch1")
        self.tenant.accounts[record["Id"]] = record
        return str(record["Id"])

    def _check_account_choices(self, values: Mapping[str, Any]) -> None:
        if "PaymentTerm" in values and values["PaymentTerm"] not in PAYMENT_TERMS:
            raise ResultError(
                "INVALID_VALUE",
                f"The payment term {values['PaymentTerm']} is not defined in this tenant.",
                "PaymentTerm",
            )
        if "Batch" in values and values["Batch"] not in BATCHES:
            raise ResultError("INVALID_VALUE", f"Invalid batch {values['Batch']}.", "Batch")

    def _update_account(self, values: dict[str, Any]) -> str:
        account = self._existing(self.tenant.accounts, values, "Account")
        if "AccountNumber" in values and values["AccountNumber"] != account["AccountNumber"]:
            raise ResultError("INVALID_VALUE", "AccountNumber cannot be changed.", "AccountNumber")
        self._check_account_choices(values)
        merged = {**account, **values}
        for name in ("BillToId", "SoldToId"):
            contact = self.tenant.contacts.get(merged.get(name) or "")
            if name in values and (contact is None or contact["AccountId"] != account["Id"]):
                raise ResultError(
                    "INVALID_VALUE", f"{name} must be a contact of this account.", name
                )
        status = merged["Status"]
        if status not in ("Draft", "Active", "Canceled"):
            raise ResultError("INVALID_VALUE", f"Invalid status {status}.", "Status")
        if account["Status"] == "Active" and status == "Draft":
            raise ResultError("INVALID_VALUE", "An active account cannot go back to Draft.")
        if status == "Active" and not (merged.get("BillToId") and merged.get("SoldToId")):
            raise ResultError(
                "MISSING_REQUIRED_VALUE",
                "An active account needs a bill-to and a sold-to contact.",
                "BillToId",
            )
        account.update(values, UpdatedDate=self._now())
        return str(account["Id"])

    def _create_contact(self, values: dict[str, Any]) -> str:
        _no_id(values)
        for name in ("AccountId", "FirstName", "LastName"):
            _required(values, name)
        if values["AccountId"] not in self.tenant.accounts:
            raise ResultError(
                "INVALID_ID", f"Invalid account id {values['AccountId']}.", "AccountId"
            )
        _check_contact(values)
        record = self._new_record(values)
        self.tenant.contacts[record["Id"]] = record
        return str(record["Id"])

    def _update_contact(self, values: dict[str, Any]) -> str:
        contact = self._existing(self.tenant.contacts, values, "Contact")
        if "AccountId" in values and values["AccountId"] != contact["AccountId"]:
            raise ResultError("INVALID_VALUE", "A contact cannot move to another account.")
        _check_contact({**contact, **values})
        contact.update(values, UpdatedDate=self._now())
        return str(contact["Id"])

    def _existing(
        self, table: dict[str, dict[str, Any]], values: Mapping[str, Any], kind: str
    ) -> dict[str, Any]:
        record = table.get(values.get("Id") or "")
        if record is None:
            raise ResultError("INVALID_ID", f"Invalid {kind} id {values.get('Id')}.", "Id")
        return record

    # -- subscribe ----------------------------------------------------------------------------

    def subscribe(self, call: SoapCall) -> FakeResponse:
        """``subscribe()`` of existing, active accounts, with invoice and payment."""
        requests = call.payload.findall(f"{{{API_NS}}}subscribes")
        if len(requests) > MAX_OBJECTS:
            raise SoapFault(
                "MAX_RECORDS_EXCEEDED", f"A single subscribe call takes at most {MAX_OBJECTS}."
            )
        parsed = [self.values(node, API_NS, "SubscribeRequest") for node in requests]
        outcomes = self._transaction(
            [lambda values=values: self._subscribe_one(values) for values in parsed],
            call.single_transaction,
        )
        results = []
        for outcome in outcomes:
            if isinstance(outcome, ResultError):
                values: dict[str, Any] = {
                    "Errors": [_error(outcome)],
                    "Success": False,
                }
            else:
                values = {**outcome, "Success": True}
                for kind, ref in (
                    ("subscription", "SubscriptionId"),
                    ("invoice", "InvoiceId"),
                    ("payment", "PaymentId"),
                ):
                    if outcome.get(ref):
                        self.count_created(kind)
            results.append(self.build("result", API_NS, "SubscribeResult", values))
        return self.reply("subscribe", results)

    def _subscribe_one(self, request: Mapping[str, Any]) -> dict[str, Any]:
        account_values = request.get("Account") or {}
        for unsupported in ("PaymentMethod", "BillToContact", "SoldToContact"):
            if request.get(unsupported):
                raise ResultError(
                    "INVALID_VALUE", f"the kiki fake does not take {unsupported} in subscribe"
                )
        if (request.get("PreviewOptions") or {}).get("EnablePreviewMode"):
            raise ResultError("INVALID_VALUE", "the kiki fake does not preview subscriptions")
        account = self.tenant.accounts.get(account_values.get("Id") or "")
        if account is None:
            raise ResultError(
                "INVALID_VALUE",
                "Account.Id must name an existing account (the kiki fake does not create "
                "accounts in subscribe).",
                "AccountId",
            )
        if account["Status"] != "Active":
            raise ResultError(
                "INVALID_VALUE", f"The account {account['AccountNumber']} is not active."
            )
        options = request.get("SubscribeOptions") or {}
        processing = options.get("SubscribeInvoiceProcessingOptions") or {}
        data = request.get("SubscriptionData") or {}
        subscription = dict(data.get("Subscription") or {})
        plans = list(data.get("RatePlanData") or [])
        self._check_subscription(subscription)
        if not plans:
            raise ResultError("MISSING_REQUIRED_VALUE", "At least one RatePlanData is required.")
        name = subscription.get("Name")
        if name is None:
            self.tenant.numbers["subscription"] += 1
            name = f"A-S{self.tenant.numbers['subscription']:08d}"
        if any(s["Name"] == name for s in self.tenant.subscriptions.values()):
            raise ResultError(
                "DUPLICATE_VALUE",
                f"The subscription name {name} already exists.",
                "Name",
            )
        record = self._new_record(
            subscription, Name=name, AccountId=account["Id"], Status="Active", Version=1
        )
        record["OriginalId"] = record["Id"]
        self.tenant.subscriptions[record["Id"]] = record
        charges = []
        for plan_data in plans:
            charges.extend(self._add_rate_plan(record, account, plan_data))
        result: dict[str, Any] = {
            "AccountId": account["Id"],
            "AccountNumber": account["AccountNumber"],
            "SubscriptionId": record["Id"],
            "SubscriptionNumber": name,
            "TotalMrr": Decimal(0),
            "TotalTcv": sum((c["Price"] for c in charges), Decimal(0)),
        }
        if options.get("ProcessPayments") and not options.get("GenerateInvoice"):
            raise ResultError("INVALID_VALUE", "ProcessPayments needs GenerateInvoice.")
        if options.get("GenerateInvoice"):
            scope = processing.get("InvoiceProcessingScope") or "Account"
            if scope not in ("Account", "Subscription"):
                raise ResultError(
                    "INVALID_VALUE",
                    f"Invalid InvoiceProcessingScope {scope}.",
                    "InvoiceProcessingScope",
                )
            alone = scope == "Subscription" or bool(record.get("IsInvoiceSeparate"))
            invoice = self._generate_invoice(account, record, alone, processing)
            result["InvoiceId"] = invoice["Id"]
            result["InvoiceNumber"] = invoice["InvoiceNumber"]
            if options.get("ProcessPayments") and invoice["Amount"] > 0:
                payment = self._collect(account, invoice)
                result["PaymentId"] = payment["Id"]
                result["PaymentTransactionNumber"] = payment["_transaction"]
        return result

    def _check_subscription(self, subscription: Mapping[str, Any]) -> None:
        if subscription.get("Id") or subscription.get("AccountId"):
            raise ResultError("INVALID_VALUE", "Subscription.Id and AccountId are set by Zuora.")
        _required(subscription, "ContractEffectiveDate")
        term = subscription.get("TermType")
        if term not in ("TERMED", "EVERGREEN"):
            raise ResultError("INVALID_VALUE", f"Invalid TermType {term}.", "TermType")
        if term == "TERMED":
            for name in ("InitialTerm", "RenewalTerm"):
                _required(subscription, name)
            if subscription["InitialTerm"] < 1:
                raise ResultError("INVALID_VALUE", "InitialTerm must be at least 1.", "InitialTerm")
        for name in ("InitialTermPeriodType", "RenewalTermPeriodType"):
            if name in subscription and subscription[name] not in ("Month", "Year", "Day", "Week"):
                raise ResultError("INVALID_VALUE", f"Invalid {name}.", name)
        if len(subscription.get("Notes") or "") > 500:
            raise ResultError("INVALID_VALUE", "Notes is longer than 500 characters.", "Notes")
        if len(subscription.get("Name") or "") > 100:
            raise ResultError("INVALID_VALUE", "Name is longer than 100 characters.", "Name")

    def _add_rate_plan(
        self, subscription: dict[str, Any], account: Mapping[str, Any], data: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        plan_id = (data.get("RatePlan") or {}).get("ProductRatePlanId")
        plan = self.rate_plans.get(plan_id or "")
        if plan is None:
            raise ResultError(
                "INVALID_VALUE", f"Invalid product rate plan id {plan_id}.", "ProductRatePlanId"
            )
        currency = account["Currency"]
        overrides: dict[str, dict[str, Any]] = {}
        for charge_data in data.get("RatePlanChargeData") or []:
            charge = dict(charge_data.get("RatePlanCharge") or {})
            charge_id = charge.get("ProductRatePlanChargeId")
            if charge_id not in plan.charges:
                raise ResultError(
                    "INVALID_VALUE",
                    f"The product rate plan charge {charge_id} is not a charge of the product "
                    f"rate plan {plan.id}.",
                    "ProductRatePlanChargeId",
                )
            if charge_id in overrides:
                raise ResultError(
                    "INVALID_VALUE",
                    f"The charge {charge_id} appears twice in one rate plan; use two RatePlanData.",
                )
            overrides[charge_id] = charge
        rate_plan = {
            "Id": self._new_id(),
            "Name": plan.name,
            "ProductRatePlanId": plan.id,
            "SubscriptionId": subscription["Id"],
            "CreatedDate": self._now(),
        }
        self.tenant.rate_plans[rate_plan["Id"]] = rate_plan
        added = []
        for charge_id in plan.charges:
            catalog = self.charges[charge_id]
            if currency not in catalog.prices:
                raise ResultError(
                    "INVALID_VALUE",
                    f"The charge {catalog.name} ({charge_id}) has no price in {currency}, the "
                    "account's currency.",
                    "ProductRatePlanChargeId",
                )
            given = overrides.get(charge_id, {})
            price = given.get("Price", catalog.prices[currency])
            if price != price.quantize(Decimal(1).scaleb(-CURRENCIES[currency])):
                raise ResultError(
                    "INVALID_VALUE",
                    f"The price {price} has more decimals than {currency} allows.",
                    "Price",
                )
            if len(given.get("Description") or "") > 500:
                raise ResultError("INVALID_VALUE", "Description is longer than 500.", "Description")
            self.tenant.numbers["charge"] += 1
            record = {
                "Id": self._new_id(),
                "ChargeNumber": f"C-{self.tenant.numbers['charge']:08d}",
                "ChargeModel": "Flat Fee Pricing",
                "ChargeType": "OneTime",
                "Description": given.get("Description"),
                "Name": catalog.name,
                "Price": price,
                "ProductRatePlanChargeId": charge_id,
                "RatePlanId": rate_plan["Id"],
                "TriggerEvent": "ContractEffective",
                "CreatedDate": self._now(),
                "_subscription": subscription["Id"],
                "_tax_rate": catalog.tax_rate,
                "_invoiced": False,
            }
            self.tenant.rate_plan_charges[record["Id"]] = record
            added.append(record)
        return added

    def _generate_invoice(
        self,
        account: dict[str, Any],
        subscription: dict[str, Any],
        alone: bool,
        processing: Mapping[str, Any],
    ) -> dict[str, Any]:
        """An invoice of the subscription's charges (and, by account scope, the account's
        other unbilled charges)."""
        subscriptions = (
            [subscription]
            if alone
            else [s for s in self.tenant.subscriptions.values() if s["AccountId"] == account["Id"]]
        )
        ids = {s["Id"] for s in subscriptions}
        charges = [
            c
            for c in self.tenant.rate_plan_charges.values()
            if c["_subscription"] in ids and not c["_invoiced"]
        ]
        effective = subscription["ContractEffectiveDate"]
        invoice_date = processing.get("InvoiceDate") or effective
        target = processing.get("InvoiceTargetDate") or invoice_date
        exponent = CURRENCIES[account["Currency"]]
        self.tenant.numbers["invoice"] += 1
        invoice = {
            "Id": self._new_id(),
            "AccountId": account["Id"],
            "InvoiceNumber": f"INV{self.tenant.numbers['invoice']:08d}",
            "InvoiceDate": invoice_date,
            "TargetDate": target,
            "DueDate": invoice_date + timedelta(days=_term_days(account["PaymentTerm"])),
            "IncludesOneTime": True,
            "IncludesRecurring": False,
            "IncludesUsage": False,
            "Status": "Posted",
            "PaymentAmount": Decimal(0),
            "CreatedDate": self._now(),
        }
        items_total = tax = Decimal(0)
        for charge in charges:
            sub = self.tenant.subscriptions[charge["_subscription"]]
            item_tax = (charge["Price"] * charge["_tax_rate"]).quantize(
                Decimal(1).scaleb(-exponent)
            )
            item = {
                "Id": self._new_id(),
                "InvoiceId": invoice["Id"],
                "ChargeAmount": charge["Price"],
                "ChargeDate": self._now(),
                "ChargeDescription": charge["Description"],
                "ChargeId": charge["Id"],
                "ChargeName": charge["Name"],
                "ChargeNumber": charge["ChargeNumber"],
                "ProductRatePlanChargeId": charge["ProductRatePlanChargeId"],
                "Quantity": Decimal(1),
                "RatePlanChargeId": charge["Id"],
                "ServiceStartDate": effective,
                "SubscriptionId": sub["Id"],
                "SubscriptionNumber": sub["Name"],
                "UnitPrice": charge["Price"],
                "CreatedDate": self._now(),
                "_tax": item_tax,
            }
            self.tenant.invoice_items[item["Id"]] = item
            charge["_invoiced"] = True
            items_total += charge["Price"]
            tax += item_tax
        invoice["Amount"] = items_total + tax
        invoice["AmountWithoutTax"] = items_total
        invoice["TaxAmount"] = tax
        invoice["Balance"] = invoice["Amount"]
        listed = [i for i in self.tenant.invoice_items.values() if i["InvoiceId"] == invoice["Id"]]
        # The fake's own books must balance: the invoice totals its items and their tax.
        assert invoice["Amount"] == sum(i["ChargeAmount"] + i["_tax"] for i in listed)
        self.tenant.invoices[invoice["Id"]] = invoice
        account["Balance"] = account["Balance"] + invoice["Amount"]
        account["LastInvoiceDate"] = invoice_date
        return invoice

    def _collect(self, account: dict[str, Any], invoice: dict[str, Any]) -> dict[str, Any]:
        if self.decline_payments:
            raise ResultError(
                "TRANSACTION_FAILED",
                "Transaction declined.402 - [card_declined/generic_decline] Your card was "
                "declined.",
            )
        self.tenant.numbers["payment"] += 1
        payment = {
            "Id": self._new_id(),
            "AccountId": account["Id"],
            "Amount": invoice["Amount"],
            "EffectiveDate": invoice["InvoiceDate"],
            "PaymentNumber": f"P-{self.tenant.numbers['payment']:08d}",
            "Status": "Processed",
            "Type": "Electronic",
            "CreatedDate": self._now(),
            "_invoice": invoice["Id"],
            "_transaction": "".join(self.rng.choices("0123456789", k=16)),
        }
        self.tenant.payments[payment["Id"]] = payment
        invoice["Balance"] = Decimal(0)
        invoice["PaymentAmount"] = invoice["Amount"]
        account["Balance"] = account["Balance"] - invoice["Amount"]
        return payment

    # -- records ------------------------------------------------------------------------------

    def _new_id(self) -> str:
        return "2c92c0f8" + "".join(self.rng.choices("0123456789abcdef", k=24))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC).astimezone(ZUORA_TZ)

    def _new_record(self, values: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        now = self._now()
        record = {k: v for k, v in values.items() if v is not None and k != "fieldsToNull"}
        record.update(extra)
        record["Id"] = self._new_id()
        record["CreatedDate"] = record["UpdatedDate"] = now
        return record

    # -- XML in and out -----------------------------------------------------------------------

    def _xsi_type(self, node: Any) -> str:
        value = node.get(f"{{{XSI}}}type") or ""
        prefix, _, local = value.rpartition(":")
        if not local or node.nsmap.get(prefix or None) != OBJECT_NS:
            raise SoapFault(
                "INVALID_TYPE",
                f"a zObject needs an xsi:type of {OBJECT_NS}",
                detail="InvalidTypeFault",
            )
        return local

    def values(self, node: Any, namespace: str, type_name: str) -> dict[str, Any]:
        """The fields of an element of ``{namespace}type_name``, as Python values."""
        fields = {f.name: f for f in self.schema.fields(namespace, type_name)}
        found: dict[str, Any] = {}
        for child in node:
            if not isinstance(child.tag, str):
                continue
            name = etree.QName(child).localname
            spec = fields.get(name)
            if spec is None:
                raise SoapFault("INVALID_FIELD", f"invalid field for {type_name}: {name}")
            if child.get(f"{{{XSI}}}nil") in ("true", "1"):
                value: Any = None
            elif self.schema.is_complex(spec.type_ns, spec.type):
                value = self.values(child, spec.type_ns, spec.type)
            else:
                value = _parse_simple(child.text or "", spec.type, name)
            if spec.many:
                found.setdefault(name, []).append(value)
            else:
                found[name] = value
        return found

    def _text(self, zobject: str, name: str, value: Any) -> str:
        kind = next(f.type for f in self.schema.object_fields(zobject) if f.name == name)
        return _render_simple(value, kind)

    def build(
        self,
        tag: str,
        namespace: str,
        type_name: str,
        values: Mapping[str, Any],
        *,
        xsi_type: bool = False,
        tag_ns: str | None = None,
    ) -> Any:
        """An element of ``{namespace}type_name``, its fields in the WSDL's order."""
        element = etree.Element(f"{{{tag_ns or namespace}}}{tag}", nsmap=_NSMAP)
        if xsi_type:
            element.set(f"{{{XSI}}}type", f"ns2:{type_name}")
        for spec in self.schema.fields(namespace, type_name):
            if spec.name not in values or values[spec.name] is None:
                continue
            value = values[spec.name]
            for item in value if spec.many and isinstance(value, list) else [value]:
                if item is _NIL:
                    nil = etree.SubElement(element, f"{{{namespace}}}{spec.name}")
                    nil.set(f"{{{XSI}}}nil", "true")
                elif isinstance(item, etree._Element):
                    element.append(item)
                elif isinstance(item, Mapping):
                    nested = self.build(spec.name, spec.type_ns, spec.type, item, tag_ns=namespace)
                    element.append(nested)
                else:
                    child = etree.SubElement(element, f"{{{namespace}}}{spec.name}")
                    child.text = _render_simple(item, spec.type)
        return element

    def reply(self, operation: str, results: Sequence[Any]) -> FakeResponse:
        """``<operation>Response`` holding ``results``, checked against the WSDL."""
        root = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap=_NSMAP)
        body = etree.SubElement(root, f"{{{SOAP_ENV}}}Body")
        holder = etree.SubElement(body, f"{{{API_NS}}}{operation}Response")
        for result in results:
            holder.append(result)
        etree.cleanup_namespaces(root, top_nsmap=_NSMAP)
        data = _serialize(root)
        if self.schema_check:
            self.schema.check_envelope(data, response=True)  # a bug in the fake, not the client
        return FakeResponse(200, data, content_type=_XML)


_NSMAP = {"soapenv": SOAP_ENV, "ns1": API_NS, "ns2": OBJECT_NS, "xsi": XSI}
_NIL = object()


def _save_result(outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, ResultError):
        return {"Errors": [_error(outcome)], "Success": False}
    return {"Id": outcome, "Success": True}


def _error(error: ResultError) -> dict[str, Any]:
    return {"Code": error.code, "Message": error.message, "Field": error.field}


def _required(values: Mapping[str, Any], name: str) -> None:
    if values.get(name) in (None, ""):
        raise ResultError("MISSING_REQUIRED_VALUE", f"Missing required value: {name}", name)


def _no_id(values: Mapping[str, Any]) -> None:
    if values.get("Id"):
        raise ResultError("INVALID_VALUE", "Id is set by Zuora on create.", "Id")


def _check_contact(values: Mapping[str, Any]) -> None:
    for name in ("FirstName", "LastName"):
        if len(values.get(name) or "") > 100:
            raise ResultError("INVALID_VALUE", f"{name} is longer than 100 characters.", name)
    email = values.get("WorkEmail")
    if email is not None and (len(email) > 80 or not re.fullmatch(r"[^@\s]+@[^@\s]+", email)):
        raise ResultError("INVALID_VALUE", f"Invalid email address {email}.", "WorkEmail")


def _term_days(term: str) -> int:
    return int(term.removeprefix("Net ")) if term.startswith("Net ") else 0


def _parse_simple(text: str, kind: str, name: str) -> Any:
    try:
        if kind == "decimal":
            return Decimal(text)
        if kind in ("int", "long"):
            return int(text)
        if kind == "boolean":
            return text.strip() in ("true", "1")
        if kind == "date":
            return date.fromisoformat(text.strip())
        if kind == "dateTime":
            return datetime.fromisoformat(text.strip())
    except (ValueError, InvalidOperation):
        raise ResultError("INVALID_VALUE", f"Invalid value for {name}: {text}", name) from None
    return text


def _render_simple(value: Any, kind: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _plain(value: Any) -> Any:
    """Records as JSON: decimals as text, dates ISO, private fields dropped."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, bool | int | str) or value is None:
        return value
    return _render_simple(value, "")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeZuora(FakeProvider[FakeZuoraApp]):
    """The fake on a background thread, bound to 127.0.0.1 (``port=0``: the OS picks).

    Keyword arguments other than ``port`` and ``verbose`` go to :class:`FakeZuoraApp`.
    """

    def __init__(self, *, port: int = 0, verbose: bool = False, **settings: Any) -> None:
        super().__init__(FakeZuoraApp(**settings), port=port, verbose=verbose)

    @property
    def endpoint(self) -> str:
        """The SOAP endpoint (``KIKI_ZUORA_API_BASE``) for the WSDL's version."""
        return f"{self.url}/apps/services/a/{self.app.schema.version}"

    def inject_soap_fault(
        self, operation: str | None, code: str, *, times: int = 1, after: bool = False, **kw: Any
    ) -> ZuoraFault:
        """A SOAP fault with Zuora's ``code`` for ``operation`` (None: any)."""
        return self.inject(ZuoraFault.soap_fault(operation, code, times=times, after=after, **kw))

    def inject_http_error(
        self, operation: str | None, status: int = 503, *, times: int = 1, after: bool = False
    ) -> ZuoraFault:
        """A bare HTTP error page (no SOAP) for ``operation``."""
        return self.inject(
            ZuoraFault(
                kind="error",
                operation=operation,
                status=status,
                times=times,
                after=after,
                message="Service Unavailable",
            )
        )

    def inject_lost(self, operation: str | None, *, times: int = 1) -> ZuoraFault:
        """Run ``operation``, then reset the connection (a lost response)."""
        return self.inject(ZuoraFault(kind="drop", operation=operation, times=times, after=True))

    def expire_sessions(self) -> None:
        """End every session now."""
        self.app.expire_sessions()


@contextlib.contextmanager
def spawn_fake_zuora(
    *extra_args: str,
    python: str = sys.executable,
    timeout: float = 15.0,
    cwd: str | Path | None = None,
) -> Iterator[tuple[str, Any]]:
    """Run ``python -m tests.support.fake_zuora`` and yield ``(url, process)``."""
    with spawn_fake(
        "tests.support.fake_zuora", *extra_args, python=python, timeout=timeout, cwd=cwd
    ) as spawned:
        yield spawned


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.fake_zuora``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_zuora",
        description="Zuora-compatible SOAP fake on 127.0.0.1 (endpoint /apps/services/a/<v>).",
    )
    common_arguments(parser)
    parser.add_argument("--wsdl", default=str(WSDL_78), help="the WSDL to check requests against")
    parser.add_argument("--seed", type=int, default=None, help="deterministic ids")
    parser.add_argument(
        "--session-lifetime", type=float, default=SESSION_LIFETIME, help="seconds a session lives"
    )
    parser.add_argument("--concurrency", type=int, default=20, help="requests in flight")
    parser.add_argument("--rate-limit", type=int, default=50_000, help="requests per minute")
    parser.add_argument(
        "--retry-after", type=float, default=None, help="send Retry-After with 429s"
    )
    args = parser.parse_args(argv)
    if args.key_lifetime is not None:
        parser.error("Zuora's SOAP API has no idempotency keys (no --key-lifetime)")
    fake = FakeZuora(
        port=args.port,
        verbose=args.verbose,
        wsdl=args.wsdl,
        seed=args.seed,
        session_lifetime=args.session_lifetime,
        latency=args.latency,
        rate_limit_retry_after=args.retry_after,
        rate_limits=RateLimits(
            windows=(Window(args.rate_limit, 60.0, "minute"),), concurrency=args.concurrency
        ),
    )
    return serve_until_stopped(fake, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BUNDLE_RATE_PLAN",
    "DEFAULT_PASSWORD",
    "DEFAULT_USERNAME",
    "ONE_TIME_CHARGE",
    "ONE_TIME_RATE_PLAN",
    "TAXED_CHARGE",
    "TAXED_RATE_PLAN",
    "USD_ONLY_CHARGE",
    "USD_ONLY_RATE_PLAN",
    "FakeZuora",
    "FakeZuoraApp",
    "SoapFault",
    "ZuoraFault",
    "spawn_fake_zuora",
]
