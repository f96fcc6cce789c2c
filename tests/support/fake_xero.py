"""A local fake of Xero: the Accounting API, the identity token endpoint and ``/connections``.

Built on :mod:`tests.support.fake_provider` (HTTP server, idempotency store, faults, limits,
clock). What it models, at least as strictly as Xero:

- **OAuth 2.0**: the token endpoint (``POST /connect/token``, HTTP Basic client id and secret)
  grants ``authorization_code`` and ``refresh_token``. Access tokens expire after 30 minutes of
  the fake's clock. Refresh tokens are single-use and rotate: a spent one works again only
  within a grace period (30 minutes, configurable: 0 makes a double spend fail), after which it
  is ``invalid_grant``. ``GET /connections`` lists the organisations a token reaches.
- **Every Accounting request** needs a live Bearer token and a ``xero-tenant-id`` the token
  reaches (401 / 403 with Xero's problem-details bodies otherwise), and is checked against
  Xero's OpenAPI spec read strictly (``tests/support/xero_spec.py``): an undeclared query
  parameter, an unknown or read-only field, a wrong type or a bad enum is a 400
  ``PostDataInvalidException``.
- **Contacts**: ``GET`` with ``where`` (``Field=="value"``, joined by ``AND``; string equality
  ignores case as Xero's does), ``IDs``, ``includeArchived``; ``PUT`` creates, ``POST`` creates or
  updates. Names are unique among active contacts.
- **Invoices**: ``PUT`` creates only; ``POST`` creates or updates (status changes: void,
  delete). ``summarizeErrors=false`` answers 200 with ``HasErrors``/``ValidationErrors`` per
  element, otherwise 400 ``ValidationException`` with ``Elements`` and nothing saved. Checked:
  the contact (by ``ContactID``; a ``Name`` Xero does not know silently creates a contact, as
  Xero does), the organisation's currencies, ``AccountCode`` (must exist and be active),
  ``TaxType`` (must exist and apply to revenue), ACCREC ``InvoiceNumber`` unique ("Invoice # must
  be unique."), ``UnitAmount`` decimals (2, or 4 with ``unitdp=4``), ``LineAmount`` = quantity x
  unit amount rounded to 2 decimals, a total below zero, lengths. Totals and tax are computed at
  2 decimal places as Xero does. ``GET`` by ``InvoiceNumbers``, ``IDs``, ``Statuses``,
  ``ContactIDs`` or ``where``; line items only when paging or fetching one by id.
- **Credit notes**: ``PUT /CreditNotes`` creates ACCRECCREDIT/ACCPAYCREDIT notes checked like
  invoices (contact, currency, accounts, tax, a total above zero, a unique CreditNoteNumber);
  ``PUT /CreditNotes/{id}/Allocations`` sets one against an AUTHORISED invoice of the same contact
  and currency, never more than the credit left or the invoice's amount due (an invoice left
  owing nothing is PAID; a note left with no credit is PAID). A part-paid or credited invoice
  cannot be voided.
- **Idempotency-Key** on PUT and POST, per organisation, kept a SHORT time (300 s of the fake's
  clock by default, configurable): the first answer is replayed, 200s with element errors
  included.
- **Limits per organisation**: 60 calls in any sliding minute, 5,000 in any sliding day, 5 in
  flight; a 429 carries ``Retry-After`` and ``X-Rate-Limit-Problem: minute|day|concurrent``, and
  every answer ``X-MinLimit-Remaining``, ``X-DayLimit-Remaining`` and ``X-AppMinLimit-Remaining``.

What happens in Xero's own UI is a control call: a payment in full or in part, a void, a
delete (``fake.mark_invoice``), or an invoice typed in by hand with a number already used
(``fake.duplicate_invoice``).

Messages marked ``[kiki fake]`` are stricter than anything Xero documents (it would round or
ignore instead); the others follow Xero's wording where known.

Run it as a process: ``python -m tests.support.fake_xero --port 0 --ready-file F
--refresh-token SEED`` (the seed is registered as a refresh token for the default organisation).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import math
import random
import re
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from .fake_provider import (
    FakeProvider,
    FakeProviderApp,
    FakeResponse,
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
from .xero_spec import request_problems

JSON = dict[str, Any]
PREFIX = "/api.xro/2.0"
DEFAULT_TENANT = "6f1c2a9e-4b7d-4c1e-9a3f-2d5e8b0c7a14"
DEFAULT_ORGANISATION = "Kiki Demo Company (US)"
DEFAULT_CLIENT_ID = "KIKIFAKECLIENT000000000000000001"
DEFAULT_CLIENT_SECRET = "kiki-fake-client-secret-0123456789"
BRANDING_THEME_ID = "5d4dd402-c851-497e-aae1-9ff265c0d15a"
# NOTE: Xero's published limits per organisation (developer.xero.com "OAuth 2.0 API limits").
XERO_RATE_LIMITS = RateLimits(
    windows=(Window(60, 60.0, "minute"), Window(5000, 86400.0, "day")), concurrency=5
)
APP_MINUTE_LIMIT = 10_000
# NOTE: access tokens live 30 minutes; a spent refresh token works for a 30-minute grace
# period (developer.xero.com OAuth 2.0 FAQ; PROVIDERS.md).
ACCESS_TOKEN_LIFETIME = 1800.0
REFRESH_GRACE = 1800.0
_TWO = Decimal("0.01")
_current = threading.local()


# --------------------------------------------------------------------------------------------
# Errors and bodies in Xero's shapes
# --------------------------------------------------------------------------------------------


class XeroError(ProviderError):
    """An error with a body in one of Xero's shapes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        body: Any = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=headers)
        self.body = body

    def response(self) -> FakeResponse:
        """The error as Xero renders it."""
        body = (
            self.body if self.body is not None else error_body(self.status, self.message, self.code)
        )
        if isinstance(body, str):
            return FakeResponse(self.status, body, dict(self.headers), content_type="text/plain")
        return FakeResponse(self.status, body, dict(self.headers))


_ERROR_NUMBERS = {"ValidationException": 10, "PostDataInvalidException": 14}
_ERROR_NUMBERS |= {"QueryParseException": 16, "ObjectNotFoundException": 17}
_TITLES = {401: "Unauthorized", 403: "Forbidden", 409: "Conflict", 429: "Too Many Requests"}
_TITLES |= {500: "Internal Server Error", 503: "Service Unavailable"}


def error_body(status: int, message: str, code: str | None = None) -> Any:
    """Xero's error body for a status: API exceptions for 400, problem details otherwise."""
    if status == 400:
        kind = code or "PostDataInvalidException"
        return {"ErrorNumber": _ERROR_NUMBERS.get(kind, 14), "Type": kind, "Message": message}
    if status == 404:
        return "The resource you're looking for cannot be found"
    return {
        "Type": None,
        "Title": _TITLES.get(status, "Error"),
        "Status": status,
        "Detail": message,
        "Instance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"kiki-fake/{status}/{message}")),
        "Extensions": {},
    }


def encode(value: Any) -> str:
    """JSON with decimals as their exact text (Xero writes ``40.00``, not ``40.0``)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f'"{k}": {encode(v)}' for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return format(value, "f")
    import json

    return json.dumps(value)


def ms_date(moment: float) -> str:
    """``/Date(1552326816230+0000)/`` for a Unix time."""
    return f"/Date({round(moment * 1000)}+0000)/"


def day_date(day: date) -> str:
    """``/Date(ms+0000)/`` of a day's midnight UTC."""
    return ms_date(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def money(value: Decimal) -> Decimal:
    """Round half away from zero to 2 decimals (Xero's line and total rounding)."""
    return value.quantize(_TWO, rounding=ROUND_HALF_UP)


def _places(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


# --------------------------------------------------------------------------------------------
# Organisations and tokens
# --------------------------------------------------------------------------------------------


@dataclass
class Organisation:
    """One Xero organisation (tenant) and what it holds."""

    tenant_id: str
    name: str
    base_currency: str = "USD"
    currencies: set[str] = field(default_factory=lambda: {"USD"})
    accounts: dict[str, JSON] = field(default_factory=dict)
    tax_rates: dict[str, JSON] = field(default_factory=dict)
    contacts: dict[str, JSON] = field(default_factory=dict)
    invoices: dict[str, JSON] = field(default_factory=dict)
    credit_notes: dict[str, JSON] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.currencies.add(self.base_currency)
        if not self.tax_rates:
            for tax_type, name, rate, revenue in (
                ("NONE", "Tax Exempt", "0", True),
                ("OUTPUT", "Tax on Sales", "8.875", True),
                ("EXEMPTOUTPUT", "Exempt Sales", "0", True),
                ("INPUT", "Tax on Purchases", "8.875", False),
            ):
                self.tax_rates[tax_type] = {
                    "Name": name,
                    "TaxType": tax_type,
                    "Status": "ACTIVE",
                    "EffectiveRate": Decimal(rate),
                    "DisplayTaxRate": Decimal(rate),
                    "CanApplyToRevenue": revenue,
                    "CanApplyToExpenses": not revenue or tax_type == "NONE",
                }
        if not self.accounts:
            for code, name, kind, tax in (
                ("200", "Sales", "REVENUE", "OUTPUT"),
                ("260", "Other Revenue", "REVENUE", "OUTPUT"),
                ("400", "Advertising", "EXPENSE", "INPUT"),
                ("470", "Old Revenue (archived)", "REVENUE", "NONE"),
            ):
                self.accounts[code] = {
                    "AccountID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/{code}")),
                    "Code": code,
                    "Name": name,
                    "Type": kind,
                    "TaxType": tax,
                    "Status": "ARCHIVED" if code == "470" else "ACTIVE",
                    "Class": "REVENUE" if kind == "REVENUE" else "EXPENSE",
                }


@dataclass
class RefreshGrant:
    """A refresh token: the organisations it reaches and when it was spent."""

    tenants: tuple[str, ...]
    spent_at: float | None = None


@dataclass
class AccessGrant:
    """An access token: the organisations it reaches and when it expires."""

    tenants: tuple[str, ...]
    expires_at: float
    revoked: bool = False


@dataclass
class CodeGrant:
    """An authorization code from the consent page."""

    redirect_uri: str
    tenants: tuple[str, ...]
    used: bool = False


# --------------------------------------------------------------------------------------------
# Limits per organisation
# --------------------------------------------------------------------------------------------


class TenantLimiter(RateLimiter):
    """One organisation's limiter, which can say what is left in a window."""

    def remaining(self, name: str) -> int | None:
        """Requests left in the named window now (None: no such window)."""
        with self._lock:
            now = self.clock()
            for log in self._logs:
                if log.window.name == name:
                    log.prune(now)
                    return max(0, log.window.limit - len(log.entries))
        return None


class TenantLimiters:
    """A :class:`RateLimiter` per organisation, picked by the request's ``xero-tenant-id``.

    Xero counts its limits per organisation, so one organisation throttled never slows
    another. Requests without a tenant (identity endpoints) are not limited.
    """

    def __init__(self, limits: RateLimits, clock: Any) -> None:
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._by_tenant: dict[str, TenantLimiter] = {}
        self._unlimited = RateLimiter(RateLimits(), clock)

    def for_tenant(self, tenant: str | None) -> RateLimiter:
        """The limiter of ``tenant`` (made on first use)."""
        if not tenant:
            return self._unlimited
        with self._lock:
            found = self._by_tenant.get(tenant)
            if found is None:
                found = self._by_tenant[tenant] = TenantLimiter(self.limits, self.clock)
            return found

    def current(self) -> RateLimiter:
        """The limiter of the request this thread is answering."""
        return self.for_tenant(getattr(_current, "tenant", None))

    def admit(self) -> Any:
        """Admit the current request against its organisation's limits."""
        return self.current().admit()

    def release(self) -> None:
        """The current request was answered."""
        self.current().release()

    def set_limits(self, limits: RateLimits) -> None:
        """New limits for every organisation (counters start afresh)."""
        with self._lock:
            self.limits = limits
            limiters = list(self._by_tenant.values())
        for limiter in limiters:
            limiter.set_limits(limits)

    def reset(self) -> None:
        """Forget every organisation's windows and counters."""
        with self._lock:
            self._by_tenant.clear()

    def stats(self) -> JSON:
        """Totals over the organisations, and each organisation's own counters."""
        with self._lock:
            tenants = {t: limiter.stats() for t, limiter in self._by_tenant.items()}
        rejected_by: dict[str, int] = {}
        for stats in tenants.values():
            for reason, count in stats["rejected_by"].items():
                rejected_by[reason] = rejected_by.get(reason, 0) + count
        return {
            "limits": self.limits.to_json(),
            "received": sum(s["received"] for s in tenants.values()),
            "admitted": sum(s["admitted"] for s in tenants.values()),
            "rejected": sum(s["rejected"] for s in tenants.values()),
            "rejected_by": rejected_by,
            "in_flight": sum(s["in_flight"] for s in tenants.values()),
            "max_in_flight": max((s["max_in_flight"] for s in tenants.values()), default=0),
            "tenants": tenants,
        }


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


class FakeXeroApp(FakeProviderApp):
    """Xero's Accounting API, token endpoint and connections, without HTTP."""

    name = "xero"
    key_header = "Idempotency-Key"
    key_methods = frozenset({"PUT", "POST"})
    default_key_lifetime = 300.0
    default_rate_limits = XERO_RATE_LIMITS
    request_id_header = "Xero-Correlation-Id"
    provider_settings = (
        "currencies",
        "refresh_grace",
        "access_token_lifetime",
        "client_id",
        "client_secret",
    )

    def __init__(self, *, seed: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.limiter = TenantLimiters(self.limiter.limits, self.clock)  # type: ignore[assignment]
        self.rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.client_id = DEFAULT_CLIENT_ID
        self.client_secret = DEFAULT_CLIENT_SECRET
        self.refresh_grace = REFRESH_GRACE
        self.access_token_lifetime = ACCESS_TOKEN_LIFETIME
        self.organisations: dict[str, Organisation] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        self.access_tokens: dict[str, AccessGrant] = {}
        self.codes: dict[str, CodeGrant] = {}
        self.token_requests: list[str] = []
        """The grant type of every token request, in order (no token is kept here)."""
        self.grants: list[str] = []
        """The grant type of every token request that was granted."""
        self._app_minute: deque[float] = deque()
        self.reset_objects()

    # -- ids, clock, organisations --------------------------------------------------------

    def new_uuid(self) -> str:
        """A random UUID from the seeded generator (stable ids in recordings)."""
        with self._rng_lock:
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def new_request_id(self) -> str:
        """Xero's correlation ids are UUIDs."""
        return self.new_uuid()

    def now(self) -> float:
        """The fake's clock."""
        return self.clock()

    def add_organisation(
        self,
        tenant_id: str = DEFAULT_TENANT,
        name: str = DEFAULT_ORGANISATION,
        *,
        base_currency: str = "USD",
        currencies: Iterable[str] = (),
    ) -> Organisation:
        """Add (or replace) an organisation."""
        org = Organisation(tenant_id.lower(), name, base_currency, set(currencies))
        with self.lock:
            self.organisations[org.tenant_id] = org
        return org

    def organisation(self, tenant_id: str = DEFAULT_TENANT) -> Organisation:
        """An organisation by tenant id."""
        return self.organisations[tenant_id.lower()]

    def reset_objects(self) -> None:
        """One organisation, no contacts, invoices or tokens."""
        self.organisations = {}
        self.refresh_tokens.clear()
        self.access_tokens.clear()
        self.codes.clear()
        self.token_requests.clear()
        self.grants.clear()
        self.add_organisation()

    def snapshot_objects(self) -> JSON:
        """Organisations with their contacts and invoices (never a token); amounts as floats."""
        import json

        state = {
            "organisations": {
                t: {
                    "name": org.name,
                    "currencies": sorted(org.currencies),
                    "contacts": list(org.contacts.values()),
                    "invoices": list(org.invoices.values()),
                    "credit_notes": list(org.credit_notes.values()),
                }
                for t, org in self.organisations.items()
            },
            "token_requests": list(self.token_requests),
            "grants": list(self.grants),
        }
        decoded: JSON = json.loads(encode(state))
        return decoded

    def provider_config(self) -> JSON:
        """The fake's Xero settings (not the client secret)."""
        return {
            "refresh_grace": self.refresh_grace,
            "access_token_lifetime": self.access_token_lifetime,
            "client_id": self.client_id,
            "currencies": {t: sorted(o.currencies) for t, o in self.organisations.items()},
        }

    def configure_provider(self, settings: Mapping[str, Any]) -> None:
        """``currencies`` (list, for the default organisation, or {tenant: list})."""
        with self.lock:
            for name, value in settings.items():
                if name == "currencies":
                    chosen = value if isinstance(value, Mapping) else {DEFAULT_TENANT: value}
                    for tenant, codes in chosen.items():
                        org = self.organisation(tenant)
                        org.currencies = {str(c).upper() for c in codes} | {org.base_currency}
                elif name in ("refresh_grace", "access_token_lifetime"):
                    setattr(self, name, float(value))
                else:
                    setattr(self, name, str(value))

    # -- what happens in Xero's own UI (control calls) ----------------------------------

    def _invoice(self, invoice_id: str, tenant: str | None) -> tuple[Organisation, JSON]:
        org = self.organisation(tenant or DEFAULT_TENANT)
        return org, org.invoices[invoice_id.lower()]

    def mark_invoice(
        self, invoice_id: str, state: str, amount: str | None = None, tenant: str | None = None
    ) -> JSON:
        """A payment (in full or part), a void or a delete, by Xero's rules.

        Payments apply to AUTHORISED invoices only, and one that leaves nothing due makes the
        invoice PAID; an AUTHORISED invoice without payments can be VOIDED, a DRAFT or
        SUBMITTED one DELETED (PROVIDERS.md; the fake's own status rules). A deleted invoice
        stays, with status DELETED.
        """
        _, invoice = self._invoice(invoice_id, tenant)
        status = invoice["Status"]
        now = ms_date(self.now())
        if state in ("paid", "partly_paid"):
            if status != "AUTHORISED":
                raise ValueError(
                    f"Payments can only be made against AUTHORISED invoices ({status})"
                )
            due = invoice["AmountDue"]
            paid = due if state == "paid" else (Decimal(amount) if amount else money(due / 2))
            if not 0 < paid <= due or (state == "partly_paid" and paid == due):
                raise ValueError(f"a payment of {paid} does not fit {due} due")
            invoice["Payments"].append(
                {"PaymentID": self.new_uuid(), "Date": now, "Amount": paid, "Reference": ""}
            )
            invoice["AmountPaid"] += paid
            invoice["AmountDue"] -= paid
            if invoice["AmountDue"] == 0:
                invoice["Status"] = "PAID"
                invoice["FullyPaidOnDate"] = now
        elif state in ("void", "deleted"):
            wanted = "VOIDED" if state == "void" else "DELETED"
            if wanted not in _TRANSITIONS.get(status, set()) or invoice["Payments"]:
                raise ValueError(f"Invoice not of valid status for modification ({status})")
            invoice["Status"] = wanted
            invoice["AmountDue"] = Decimal("0.00")
        else:
            raise ValueError(f"unknown state {state!r}")
        invoice["UpdatedDateUTC"] = now
        return invoice

    def duplicate_invoice(self, invoice_id: str, tenant: str | None = None) -> str:
        """A copy with the same InvoiceNumber [kiki fake: Xero's API refuses one; this stands
        for an invoice made outside it, e.g. imported or typed in by hand]."""
        org, source = self._invoice(invoice_id, tenant)
        copied = copy.deepcopy(source)
        copied["InvoiceID"] = self.new_uuid()
        for line in copied.get("LineItems") or []:
            line["LineItemID"] = self.new_uuid()
        copied["UpdatedDateUTC"] = ms_date(self.now())
        org.invoices[copied["InvoiceID"]] = copied
        self.count_created("invoice")
        return str(copied["InvoiceID"])

    # -- tokens (test helpers) ------------------------------------------------------------

    def _tenants(self, tenants: Iterable[str] | None) -> tuple[str, ...]:
        return (
            tuple(t.lower() for t in tenants) if tenants is not None else tuple(self.organisations)
        )

    def issue_refresh_token(
        self, tenants: Iterable[str] | None = None, token: str | None = None
    ) -> str:
        """A refresh token as a completed consent would give (for the given organisations)."""
        value = token or secrets.token_hex(32)
        with self.lock:
            self.refresh_tokens[value] = RefreshGrant(self._tenants(tenants))
        return value

    def authorize(self, redirect_uri: str, tenants: Iterable[str] | None = None) -> str:
        """An authorization code, as Xero's consent page redirects with."""
        code = secrets.token_hex(16)
        with self.lock:
            self.codes[code] = CodeGrant(redirect_uri, self._tenants(tenants))
        return code

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        with self.lock:
            for grant in self.access_tokens.values():
                grant.revoked = True

    def _grant(self, grant_type: str, tenants: tuple[str, ...]) -> JSON:
        access = "kiki-fake-access-" + secrets.token_urlsafe(48)
        refresh = secrets.token_hex(32)
        self.access_tokens[access] = AccessGrant(tenants, self.now() + self.access_token_lifetime)
        self.refresh_tokens[refresh] = RefreshGrant(tenants)
        self.grants.append(grant_type)
        return {
            "access_token": access,
            "expires_in": int(self.access_token_lifetime),
            "token_type": "Bearer",
            "refresh_token": refresh,
            "scope": "offline_access accounting.transactions accounting.contacts",
        }

    # -- hooks ----------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        """Pick the organisation's limiter from ``xero-tenant-id`` for this request."""
        tenant = next((v for k, v in headers.items() if k.lower() == "xero-tenant-id"), None)
        accounting = target.startswith(PREFIX + "/")
        _current.tenant = tenant.strip().lower() if tenant and accounting else None
        try:
            return super().handle(method, target, headers, body)
        finally:
            _current.tenant = None

    def authenticate(self, request: ProviderRequest) -> str:
        """Basic auth at the token endpoint; a live Bearer token and its tenant elsewhere."""
        auth = request.headers.get("authorization", "")
        if request.path == "/connect/token":
            self._check_client(auth)
            return ""
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        with self.lock:
            grant = self.access_tokens.get(token)
        if grant is None or grant.revoked:
            raise self._unauthorized("AuthenticationUnsuccessful")
        if grant.expires_at <= self.now():
            when = datetime.fromtimestamp(grant.expires_at, UTC).strftime("%m/%d/%Y %H:%M:%S")
            raise self._unauthorized(f"TokenExpired: token expired at {when}")
        if not request.path.startswith(PREFIX + "/"):
            return ""
        tenant = request.headers.get("xero-tenant-id", "").strip().lower()
        if not tenant or tenant not in grant.tenants or tenant not in self.organisations:
            raise XeroError(403, "AuthenticationUnsuccessful")
        return tenant

    def _unauthorized(self, detail: str) -> XeroError:
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return XeroError(401, detail, headers=headers)

    def _check_client(self, auth: str) -> None:
        invalid = XeroError(400, "invalid_client", body={"error": "invalid_client"})
        if not auth.startswith("Basic "):
            raise invalid
        try:
            decoded = base64.b64decode(auth.removeprefix("Basic "), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise invalid from None
        client_id, _, secret = decoded.partition(":")
        if client_id != self.client_id or secret != self.client_secret:
            raise invalid

    def parse(self, request: ProviderRequest) -> Any:
        """The token form, or the JSON body checked against Xero's spec."""
        if request.path == "/connect/token":
            return dict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
        target = f"{request.path}?{request.query}" if request.query else request.path
        problems = request_problems(
            request.method, target, request.body, request.headers, skip=frozenset({"maxLength"})
        )
        if problems:
            if any(p.startswith("query") for p in problems) and request.method == "GET":
                raise XeroError(400, "; ".join(problems), code="QueryParseException")
            raise XeroError(400, "JSON for post data was invalid, " + "; ".join(problems))
        if not request.body.strip():
            return {}
        import json

        return json.loads(request.body, parse_float=Decimal)

    def respond(self, request: ProviderRequest, result: Any) -> FakeResponse:
        """A handler's JSON, with decimals written exactly."""
        if isinstance(result, FakeResponse):
            return result
        return FakeResponse(200, encode(result), content_type="application/json; charset=utf-8")

    def render_error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FakeResponse:
        """Xero's error bodies."""
        body = error_body(status, message, code)
        if isinstance(body, str):
            return FakeResponse(status, body, dict(headers or {}), content_type="text/plain")
        return FakeResponse(status, body, dict(headers or {}))

    def idempotency_mismatch(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        """A kept key sent with another request ([kiki fake]: Xero does not document it)."""
        return self.render_error(
            400, "[kiki fake] This Idempotency-Key was used with a different request."
        )

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        """Xero's 429: ``Retry-After`` and which limit (``minute``, ``day``, ``concurrent``)."""
        problem = {"concurrency": "concurrent"}.get(rejection.problem, rejection.problem)
        headers = {
            "Retry-After": str(max(1, math.ceil(rejection.retry_after))),
            "X-Rate-Limit-Problem": problem,
        }
        return self.render_error(429, f"Rate limit exceeded: {problem}", headers=headers)

    def finish_response(self, request: ProviderRequest, response: FakeResponse) -> None:
        """The remaining-calls headers on every Accounting answer."""
        if not request.path.startswith(PREFIX + "/"):
            return
        now = self.now()
        with self.lock:
            self._app_minute.append(now)
            while self._app_minute and self._app_minute[0] < now - 60:
                self._app_minute.popleft()
            app_left = max(0, APP_MINUTE_LIMIT - len(self._app_minute))
        limiter = self.limiter.current()  # type: ignore[attr-defined]
        if isinstance(limiter, TenantLimiter):
            for name, header in (
                ("minute", "X-MinLimit-Remaining"),
                ("day", "X-DayLimit-Remaining"),
            ):
                left = limiter.remaining(name)
                if left is not None:
                    response.headers.setdefault(header, str(left))
        response.headers.setdefault("X-AppMinLimit-Remaining", str(app_left))

    def envelope(self, collection: str, items: list[JSON], **extra: Any) -> JSON:
        """Xero's answer envelope."""
        return {
            "Id": self.new_uuid(),
            "Status": "OK",
            "ProviderName": "kiki-billing",
            "DateTimeUTC": ms_date(self.now()),
            **extra,
            collection: items,
        }

    routes: ClassVar[tuple[Route, ...]] = ()  # filled below


# --------------------------------------------------------------------------------------------
# Identity: token endpoint and connections
# --------------------------------------------------------------------------------------------


def _oauth_error(code: str, status: int = 400) -> XeroError:
    return XeroError(status, code, body={"error": code})


def token_endpoint(app: FakeXeroApp, req: ProviderRequest) -> Any:
    form: Mapping[str, str] = req.params
    grant_type = form.get("grant_type", "")
    app.token_requests.append(grant_type)
    now = app.now()
    if grant_type == "refresh_token":
        grant = app.refresh_tokens.get(form.get("refresh_token", ""))
        if grant is None:
            raise _oauth_error("invalid_grant")
        if grant.spent_at is not None and now - grant.spent_at >= app.refresh_grace:
            raise _oauth_error("invalid_grant")
        if grant.spent_at is None:
            grant.spent_at = now
        return FakeResponse(200, app._grant(grant_type, grant.tenants))
    if grant_type == "authorization_code":
        code = app.codes.get(form.get("code", ""))
        if code is None or code.used or code.redirect_uri != form.get("redirect_uri"):
            raise _oauth_error("invalid_grant")
        code.used = True
        return FakeResponse(200, app._grant(grant_type, code.tenants))
    raise _oauth_error("unsupported_grant_type")


def connections(app: FakeXeroApp, req: ProviderRequest) -> Any:
    token = req.headers.get("authorization", "").removeprefix("Bearer ")
    grant = app.access_tokens[token]
    listed = []
    for tenant in grant.tenants:
        org = app.organisations.get(tenant)
        if org is None:
            continue
        listed.append(
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"connection/{tenant}")),
                "authEventId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"auth/{tenant}")),
                "tenantId": tenant,
                "tenantType": "ORGANISATION",
                "tenantName": org.name,
                "createdDateUtc": "2026-01-05T09:00:00.0000000",
                "updatedDateUtc": "2026-01-05T09:00:00.0000000",
            }
        )
    import json

    return FakeResponse(200, json.dumps(listed))


# --------------------------------------------------------------------------------------------
# Accounting: reading
# --------------------------------------------------------------------------------------------

_CLAUSE = re.compile(
    r'\s*([A-Za-z][A-Za-z.]*?)\s*(==|\.StartsWith\()\s*"((?:[^"\\]|\\.)*)"\s*(?:\))?\s*'
)
_JOINER = re.compile(r"\s*(?:AND|&&)\s*", re.IGNORECASE)


def parse_where(text: str) -> list[tuple[str, str]]:
    """``Field=="value" AND Other.StartsWith("x")`` as pairs (a ``StartsWith`` one's field ends
    in ``*``); anything else is Xero's query error."""
    clauses, position = [], 0
    while True:
        match = _CLAUSE.match(text, position)
        if match is None:
            raise XeroError(
                400, f"The where clause could not be parsed: {text!r}", code="QueryParseException"
            )
        value = re.sub(r"\\(.)", r"\1", match.group(3))
        prefix = match.group(2) != "=="
        clauses.append((match.group(1) + ("*" if prefix else ""), value))
        position = match.end()
        if position == len(text):
            return clauses
        joiner = _JOINER.match(text, position)
        if joiner is None or joiner.end() == position:
            raise XeroError(
                400, f"The where clause could not be parsed: {text!r}", code="QueryParseException"
            )
        position = joiner.end()


def _field(obj: Mapping[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _matches_where(obj: Mapping[str, Any], clauses: list[tuple[str, str]]) -> bool:
    # NOTE: Xero's where equality on strings ignores case.
    def holds(name: str, value: str) -> bool:
        held = str(_field(obj, name.rstrip("*")) or "").casefold()
        return held.startswith(value.casefold()) if name.endswith("*") else held == value.casefold()

    return all(holds(name, value) for name, value in clauses)


def _org(app: FakeXeroApp, req: ProviderRequest) -> Organisation:
    return app.organisation(req.scope)


def _list(req: ProviderRequest, name: str) -> list[str] | None:
    value = req.query_value(name)
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def get_organisation(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    org = _org(app, req)
    return app.envelope(
        "Organisations",
        [
            {
                "OrganisationID": org.tenant_id,
                "Name": org.name,
                "LegalName": org.name,
                "BaseCurrency": org.base_currency,
                "CountryCode": "US",
                "IsDemoCompany": True,
                "OrganisationStatus": "ACTIVE",
                "Version": "US",
                "OrganisationType": "COMPANY",
            }
        ],
    )


def get_accounts(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    return app.envelope("Accounts", list(_org(app, req).accounts.values()))


def get_tax_rates(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    return app.envelope("TaxRates", list(_org(app, req).tax_rates.values()))


def get_currencies(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    codes = sorted(_org(app, req).currencies)
    return app.envelope("Currencies", [{"Code": c, "Description": c} for c in codes])


def get_contacts(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    org = _org(app, req)
    found = list(org.contacts.values())
    if req.query_value("includeArchived") != "true":
        found = [c for c in found if c["ContactStatus"] != "ARCHIVED"]
    ids = _list(req, "IDs")
    if ids is not None:
        found = [c for c in found if c["ContactID"] in {i.lower() for i in ids}]
    where = req.query_value("where")
    if where:
        clauses = parse_where(where)
        found = [c for c in found if _matches_where(c, clauses)]
    return app.envelope("Contacts", found)


def get_contact(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    contact = _org(app, req).contacts.get(req.path_params["ContactID"].lower())
    if contact is None:
        raise XeroError(404, "not found")
    return app.envelope("Contacts", [contact])


def _summary(invoice: JSON) -> JSON:
    return {k: v for k, v in invoice.items() if k != "LineItems"}


def get_invoices(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    org = _org(app, req)
    found = list(org.invoices.values())
    numbers = _list(req, "InvoiceNumbers")
    if numbers is not None:
        wanted = {n.casefold() for n in numbers}
        found = [i for i in found if str(i.get("InvoiceNumber", "")).casefold() in wanted]
    for name, key, fold in (
        ("IDs", "InvoiceID", str.lower),
        ("Statuses", "Status", str.upper),
        ("ContactIDs", "Contact.ContactID", str.lower),
    ):
        values = _list(req, name)
        if values is not None:
            allowed = {fold(v) for v in values}
            found = [i for i in found if str(_field(i, key)) in allowed]
    where = req.query_value("where")
    if where:
        clauses = parse_where(where)
        found = [i for i in found if _matches_where(i, clauses)]
    page = req.query_value("page")
    if page is None:
        # NOTE: without paging Xero lists invoices without their line items.
        return app.envelope("Invoices", [_summary(i) for i in found])
    size = int(req.query_value("pageSize") or 100)
    number = max(1, int(page))
    chunk = found[(number - 1) * size : number * size]
    pagination = {
        "page": number,
        "pageSize": size,
        "pageCount": max(1, math.ceil(len(found) / size)),
        "itemCount": len(found),
    }
    return app.envelope("Invoices", chunk, pagination=pagination)


def get_invoice(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    invoice = _org(app, req).invoices.get(req.path_params["InvoiceID"].lower())
    if invoice is None:
        raise XeroError(404, "not found")
    return app.envelope("Invoices", [invoice])


# --------------------------------------------------------------------------------------------
# Accounting: writing, element by element
# --------------------------------------------------------------------------------------------

Builder = Callable[..., Callable[[], JSON] | None]


def _write(app: FakeXeroApp, req: ProviderRequest, collection: str, build: Builder) -> Any:
    """Validate every element, then commit the valid ones (all or nothing when summarized)."""
    org = _org(app, req)
    elements = req.params.get(collection)
    if not isinstance(elements, list) or not elements:
        raise XeroError(
            400, f"JSON for post data was invalid, {collection} must be a non-empty list"
        )
    summarize = req.query_value("summarizeErrors") != "false"
    checked = []
    for element in elements:
        errors: list[str] = []
        commit = build(app, org, element, errors, req)
        checked.append((element, errors, commit))
    failed = [(el, errs) for el, errs, _ in checked if errs]
    if failed and summarize:
        elements_body = [
            {**el, "ValidationErrors": [{"Message": m} for m in errs]} for el, errs in failed
        ]
        body = {
            "ErrorNumber": 10,
            "Type": "ValidationException",
            "Message": "A validation exception occurred",
            "Elements": elements_body,
        }
        return FakeResponse(400, encode(body), content_type="application/json; charset=utf-8")
    results = []
    for element, errors, commit in checked:
        if errors or commit is None:
            flag = "HasErrors" if collection == "Invoices" else "HasValidationErrors"
            results.append(
                {
                    **element,
                    flag: True,
                    "StatusAttributeString": "ERROR",
                    "ValidationErrors": [{"Message": m} for m in errors],
                }
            )
        else:
            results.append(commit())
    return app.envelope(collection, results)


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _contact_problems(org: Organisation, element: JSON, errors: list[str], own: str | None) -> None:
    name = str(element.get("Name") or "").strip()
    if not name and own is None:
        errors.append("The contact name must be specified.")
    if len(name) > 255:
        errors.append("The contact name must not be more than 255 characters long.")
    number = element.get("ContactNumber")
    if number is not None and len(str(number)) > 50:
        errors.append("The ContactNumber must not be more than 50 characters long.")
    email = element.get("EmailAddress")
    if email and (len(str(email)) > 255 or not _EMAIL.match(str(email))):
        errors.append("Email address must be valid.")
    if name:
        for other in org.contacts.values():
            if (
                other["ContactID"] != own
                and other["ContactStatus"] == "ACTIVE"
                and other["Name"].casefold() == name.casefold()
            ):
                errors.append(
                    f"The contact name {name} is already assigned to another contact. The "
                    "contact name must be unique across all active contacts."
                )
                break


def new_contact(app: FakeXeroApp, org: Organisation, element: Mapping[str, Any]) -> JSON:
    contact_id = app.new_uuid()
    contact = {
        "ContactID": contact_id,
        "ContactStatus": "ACTIVE",
        "Name": str(element["Name"]).strip(),
        "EmailAddress": element.get("EmailAddress") or "",
        "BankAccountDetails": "",
        "Addresses": [{"AddressType": "STREET"}, {"AddressType": "POBOX"}],
        "Phones": [{"PhoneType": t} for t in ("DEFAULT", "DDI", "FAX", "MOBILE")],
        "UpdatedDateUTC": ms_date(app.now()),
        "ContactGroups": [],
        "IsSupplier": False,
        "IsCustomer": False,
        "SalesTrackingCategories": [],
        "PurchasesTrackingCategories": [],
        "ContactPersons": [],
        "HasValidationErrors": False,
    }
    if element.get("ContactNumber") is not None:
        contact["ContactNumber"] = str(element["ContactNumber"])
    org.contacts[contact_id] = contact
    app.count_created("contact")
    return contact


def build_contact(
    app: FakeXeroApp, org: Organisation, element: JSON, errors: list[str], req: ProviderRequest
) -> Callable[[], JSON] | None:
    contact_id = str(element.get("ContactID") or "").lower() or None
    if contact_id is not None:
        if req.method == "PUT":
            errors.append("[kiki fake] PUT /Contacts creates contacts; use POST to update one.")
            return None
        if contact_id not in org.contacts:
            errors.append(f"Contact with ID {contact_id} could not be found.")
            return None
    _contact_problems(org, element, errors, contact_id)
    if errors:
        return None

    def commit() -> JSON:
        if contact_id is None:
            return new_contact(app, org, element)
        contact = org.contacts[contact_id]
        for key in ("Name", "EmailAddress", "ContactNumber", "ContactStatus"):
            if key in element:
                contact[key] = element[key]
        contact["UpdatedDateUTC"] = ms_date(app.now())
        return contact

    return commit


def _parse_day(value: Any) -> date | None:
    text = str(value)
    found = re.fullmatch(r"/Date\((-?\d+)([+-]\d{4})?\)/", text)
    if found:
        return datetime.fromtimestamp(int(found.group(1)) / 1000, UTC).date()
    try:
        return (
            date.fromisoformat(text[:10])
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}(T[\d:.]+)?", text)
            else None
        )
    except ValueError:
        return None


def _line(
    org: Organisation,
    item: Mapping[str, Any],
    errors: list[str],
    *,
    kind: str,
    status: str,
    amount_types: str,
    unit_places: int,
) -> JSON:
    out: JSON = {"LineItemID": None}
    description = str(item.get("Description") or "")
    if not description and not item.get("ItemCode"):
        errors.append("Description must be specified.")
    if len(description) > 4000:
        errors.append("Description must not be more than 4000 characters long.")
    quantity = Decimal(str(item.get("Quantity", 1)))
    unit = Decimal(str(item.get("UnitAmount", 0)))
    if _places(quantity) > 4:
        errors.append("[kiki fake] Quantity has more than 4 decimal places; Xero would round it.")
    if _places(unit) > unit_places:
        errors.append(
            f"[kiki fake] UnitAmount {unit} has more than {unit_places} decimal places; Xero "
            "would round it (unitdp=4 allows 4)."
        )
    line_amount = money(quantity * unit)
    if "LineAmount" in item and Decimal(str(item["LineAmount"])) != line_amount:
        errors.append(
            f"[kiki fake] LineAmount {item['LineAmount']} is not Quantity x UnitAmount rounded "
            f"to 2 decimal places ({line_amount})."
        )
    code = item.get("AccountCode")
    account = org.accounts.get(str(code)) if code is not None else None
    if code is not None and (account is None or account["Status"] != "ACTIVE"):
        errors.append(f"Account code '{code}' is not a valid code for this document.")
    if code is None and status == "AUTHORISED":
        errors.append(
            "[kiki fake] An AccountCode is required on every line of an approved invoice."
        )
    tax_type = item.get("TaxType") or (account or {}).get("TaxType") or "NONE"
    if amount_types == "NoTax":
        tax_type = "NONE"
    rate = org.tax_rates.get(str(tax_type))
    usable = rate is not None and rate["Status"] == "ACTIVE"
    if usable and kind == "ACCREC" and not rate["CanApplyToRevenue"]:  # type: ignore[index]
        usable = False
    if not usable:
        errors.append(
            f"The TaxType code '{tax_type}' does not exist or cannot be used for this type of "
            "transaction."
        )
    percent = rate["EffectiveRate"] if rate else Decimal(0)
    if amount_types == "Inclusive":
        tax = money(line_amount - line_amount / (1 + percent / 100))
    elif amount_types == "Exclusive":
        tax = money(line_amount * percent / 100)
    else:
        tax = Decimal("0.00")
    out.update(
        {
            "Description": description,
            "UnitAmount": unit.quantize(
                Decimal(1).scaleb(-max(2, min(unit_places, _places(unit))))
            ),
            "TaxType": tax_type,
            "TaxAmount": tax,
            "LineAmount": line_amount,
            "AccountCode": str(code) if code is not None else None,
            "Tracking": [],
            "Quantity": quantity.quantize(Decimal("0.0001")),
        }
    )
    if out["AccountCode"] is None:
        del out["AccountCode"]
    return out


def build_invoice(
    app: FakeXeroApp, org: Organisation, element: JSON, errors: list[str], req: ProviderRequest
) -> Callable[[], JSON] | None:
    invoice_id = str(element.get("InvoiceID") or "").lower() or None
    if invoice_id is not None:
        if req.method == "PUT":
            errors.append("[kiki fake] PUT /Invoices creates invoices; use POST to update one.")
            return None
        return _update_invoice(app, org, invoice_id, element, errors)
    kind = element.get("Type")
    if kind not in ("ACCREC", "ACCPAY"):
        errors.append(f"[kiki fake] Invoice Type {kind!r}: the fake models ACCREC and ACCPAY.")
        return None
    status = element.get("Status", "DRAFT")
    if status not in ("DRAFT", "SUBMITTED", "AUTHORISED"):
        errors.append(f"Invoice cannot be created with status {status}.")
    contact_ref = element.get("Contact") or {}
    contact_id = str(contact_ref.get("ContactID") or "").lower() or None
    contact_name = str(contact_ref.get("Name") or "").strip()
    contact: JSON | None = None
    if contact_id is not None:
        contact = org.contacts.get(contact_id)
        if contact is None:
            errors.append(f"Contact with ID {contact_id} could not be found.")
        elif contact["ContactStatus"] == "ARCHIVED":
            errors.append(f"The contact {contact['Name']} has been archived and cannot be used.")
    elif contact_name:
        contact = next(
            (c for c in org.contacts.values() if c["Name"].casefold() == contact_name.casefold()),
            None,
        )
    else:
        errors.append("A Contact must be specified for this type of transaction.")
    currency = str(element.get("CurrencyCode") or org.base_currency).upper()
    if currency not in org.currencies:
        errors.append(f"Organisation is not subscribed to currency {currency}")
    today = datetime.fromtimestamp(app.now(), UTC).date()
    issued = _parse_day(element["Date"]) if "Date" in element else today
    if issued is None:
        errors.append("[kiki fake] Date is not a date (YYYY-MM-DD or /Date(ms)/).")
    due = _parse_day(element["DueDate"]) if "DueDate" in element else None
    if "DueDate" in element and due is None:
        errors.append("[kiki fake] DueDate is not a date (YYYY-MM-DD or /Date(ms)/).")
    if due is None and status == "AUTHORISED" and kind == "ACCREC":
        errors.append("Due Date must be specified.")
    number = element.get("InvoiceNumber")
    if number is None and kind == "ACCREC":
        number = f"INV-{sum(1 for i in org.invoices.values() if i['Type'] == 'ACCREC') + 1:04d}"
    if number is not None and len(str(number)) > 255:
        errors.append("Invoice Number must not be more than 255 characters long.")
    if kind == "ACCREC" and number is not None:
        taken = any(
            i["Type"] == "ACCREC"
            and str(i.get("InvoiceNumber", "")).casefold() == str(number).casefold()
            for i in org.invoices.values()
        )
        if taken:
            errors.append("Invoice # must be unique.")
    if (
        element.get("BrandingThemeID")
        and str(element["BrandingThemeID"]).lower() != BRANDING_THEME_ID
    ):
        errors.append("[kiki fake] BrandingThemeID is not a branding theme of the organisation.")
    amount_types = element.get("LineAmountTypes", "Exclusive")
    unit_places = 4 if req.query_value("unitdp") == "4" else 2
    items = element.get("LineItems") or []
    if not items and status == "AUTHORISED":
        errors.append("[kiki fake] An approved invoice needs at least one line item.")
    lines = [
        _line(
            org,
            item,
            errors,
            kind=kind,
            status=status,
            amount_types=amount_types,
            unit_places=unit_places,
        )
        for item in items
    ]
    line_total = sum((line["LineAmount"] for line in lines), start=Decimal("0.00"))
    total_tax = sum((line["TaxAmount"] for line in lines), start=Decimal("0.00"))
    if amount_types == "Inclusive":
        sub_total, total = line_total - total_tax, line_total
    else:
        sub_total, total = line_total, line_total + total_tax
    if total < 0:
        errors.append("[kiki fake] An invoice cannot total less than zero; use a credit note.")
    if errors:
        return None

    def commit() -> JSON:
        nonlocal contact
        if contact is None:
            # NOTE: Xero creates a contact it does not know by name, silently (PROVIDERS.md).
            contact = new_contact(app, org, {"Name": contact_name})
        if kind == "ACCREC":
            contact["IsCustomer"] = True
        new_id = app.new_uuid()
        for line in lines:
            line["LineItemID"] = app.new_uuid()
        assert issued is not None
        invoice: JSON = {
            "Type": kind,
            "InvoiceID": new_id,
            "InvoiceNumber": number or "",
            "Reference": element.get("Reference", ""),
            "Payments": [],
            "CreditNotes": [],
            "Prepayments": [],
            "Overpayments": [],
            "AmountDue": total,
            "AmountPaid": Decimal("0.00"),
            "AmountCredited": Decimal("0.00"),
            "CurrencyRate": Decimal("1.0000000000"),
            "IsDiscounted": False,
            "HasAttachments": False,
            "HasErrors": False,
            "Contact": {
                k: contact[k] for k in ("ContactID", "ContactNumber", "Name") if k in contact
            },
            "DateString": f"{issued.isoformat()}T00:00:00",
            "Date": day_date(issued),
            "Status": status,
            "LineAmountTypes": amount_types,
            "LineItems": lines,
            "SubTotal": sub_total,
            "TotalTax": total_tax,
            "Total": total,
            "UpdatedDateUTC": ms_date(app.now()),
            "CurrencyCode": currency,
        }
        if due is not None:
            invoice["DueDateString"] = f"{due.isoformat()}T00:00:00"
            invoice["DueDate"] = day_date(due)
        if element.get("BrandingThemeID"):
            invoice["BrandingThemeID"] = BRANDING_THEME_ID
        org.invoices[new_id] = invoice
        app.count_created("invoice")
        return invoice

    return commit


# NOTE: an unpaid AUTHORISED invoice can only be voided; DRAFT and SUBMITTED ones deleted
# (PROVIDERS.md).
_TRANSITIONS = {
    "DRAFT": {"SUBMITTED", "AUTHORISED", "DELETED"},
    "SUBMITTED": {"AUTHORISED", "DELETED", "DRAFT"},
    "AUTHORISED": {"VOIDED"},
}


def _update_invoice(
    app: FakeXeroApp, org: Organisation, invoice_id: str, element: JSON, errors: list[str]
) -> Callable[[], JSON] | None:
    invoice = org.invoices.get(invoice_id)
    if invoice is None:
        errors.append(f"Invoice with ID {invoice_id} could not be found.")
        return None
    changed = set(element) - {"InvoiceID", "Status"}
    if changed:
        errors.append(f"[kiki fake] only Status can be updated, not {sorted(changed)}.")
    status = element.get("Status", invoice["Status"])
    if status != invoice["Status"] and status not in _TRANSITIONS.get(invoice["Status"], set()):
        errors.append(
            f"Invoice not of valid status for modification ({invoice['Status']} to {status})."
        )
    elif status == "VOIDED" and (invoice["Payments"] or invoice["CreditNotes"]):
        # NOTE: a part-paid invoice (or one with a credit note allocated) cannot be voided until
        # the payments and allocations are removed (Xero's Invoices and Payments docs).
        errors.append(
            "[kiki fake] This invoice has payments or credit notes allocated and cannot be voided."
        )
    if errors:
        return None

    def commit() -> JSON:
        invoice["Status"] = status
        if status in ("VOIDED", "DELETED"):
            invoice["AmountDue"] = Decimal("0.00")
        invoice["UpdatedDateUTC"] = ms_date(app.now())
        return invoice

    return commit


# --------------------------------------------------------------------------------------------
# Credit notes and their allocations
# --------------------------------------------------------------------------------------------


def build_credit_note(
    app: FakeXeroApp, org: Organisation, element: JSON, errors: list[str], req: ProviderRequest
) -> Callable[[], JSON] | None:
    """An ACCRECCREDIT (or ACCPAYCREDIT) credit note, checked as Xero checks an invoice."""
    if element.get("CreditNoteID"):
        errors.append("[kiki fake] the fake creates credit notes; it does not update them.")
        return None
    kind = element.get("Type")
    if kind not in ("ACCRECCREDIT", "ACCPAYCREDIT"):
        errors.append("Credit note Type must be ACCRECCREDIT or ACCPAYCREDIT.")
        return None
    status = element.get("Status", "DRAFT")
    if status not in ("DRAFT", "SUBMITTED", "AUTHORISED"):
        errors.append(f"Credit note cannot be created with status {status}.")
    contact_id = str((element.get("Contact") or {}).get("ContactID") or "").lower()
    contact = org.contacts.get(contact_id) if contact_id else None
    if contact is None:
        errors.append("A valid Contact must be specified for a credit note.")
    currency = str(element.get("CurrencyCode") or org.base_currency).upper()
    if currency not in org.currencies:
        errors.append(f"Organisation is not subscribed to currency {currency}")
    today = datetime.fromtimestamp(app.now(), UTC).date()
    issued = _parse_day(element["Date"]) if "Date" in element else today
    if issued is None:
        errors.append("[kiki fake] Date is not a date (YYYY-MM-DD or /Date(ms)/).")
    number = element.get("CreditNoteNumber")
    if number is None:
        number = f"CN-{sum(1 for n in org.credit_notes.values() if n['Type'] == kind) + 1:04d}"
    if len(str(number)) > 255:
        errors.append("Credit Note Number must not be more than 255 characters long.")
    if any(
        n["Type"] == kind and str(n["CreditNoteNumber"]).casefold() == str(number).casefold()
        for n in org.credit_notes.values()
    ):
        errors.append("[kiki fake] Credit Note # must be unique.")
    amount_types = element.get("LineAmountTypes", "Exclusive")
    items = element.get("LineItems") or []
    if not items and status == "AUTHORISED":
        errors.append("[kiki fake] An approved credit note needs at least one line item.")
    lines = [
        _line(
            org,
            item,
            errors,
            kind="ACCREC" if kind == "ACCRECCREDIT" else "ACCPAY",
            status=status,
            amount_types=amount_types,
            unit_places=4 if req.query_value("unitdp") == "4" else 2,
        )
        for item in items
    ]
    line_total = sum((line["LineAmount"] for line in lines), start=Decimal("0.00"))
    total_tax = sum((line["TaxAmount"] for line in lines), start=Decimal("0.00"))
    if amount_types == "Inclusive":
        sub_total, total = line_total - total_tax, line_total
    else:
        sub_total, total = line_total, line_total + total_tax
    if total <= 0:
        errors.append("[kiki fake] A credit note must total more than zero.")
    if errors:
        return None

    def commit() -> JSON:
        assert contact is not None and issued is not None
        note_id = app.new_uuid()
        for line in lines:
            line["LineItemID"] = app.new_uuid()
        note: JSON = {
            "Type": kind,
            "CreditNoteID": note_id,
            "CreditNoteNumber": str(number),
            "Reference": element.get("Reference", ""),
            "Contact": {
                k: contact[k] for k in ("ContactID", "ContactNumber", "Name") if k in contact
            },
            "DateString": f"{issued.isoformat()}T00:00:00",
            "Date": day_date(issued),
            "Status": status,
            "LineAmountTypes": amount_types,
            "LineItems": lines,
            "SubTotal": sub_total,
            "TotalTax": total_tax,
            "Total": total,
            "RemainingCredit": total,
            "Allocations": [],
            "Payments": [],
            "CurrencyCode": currency,
            "CurrencyRate": Decimal("1.0000000000"),
            "HasAttachments": False,
            "HasErrors": False,
            "UpdatedDateUTC": ms_date(app.now()),
        }
        org.credit_notes[note_id] = note
        app.count_created("credit_note")
        return note

    return commit


def put_credit_notes(app: FakeXeroApp, req: ProviderRequest) -> Any:
    return _write(app, req, "CreditNotes", build_credit_note)


def get_credit_notes(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    found = list(_org(app, req).credit_notes.values())
    where = req.query_value("where")
    if where:
        clauses = parse_where(where)
        found = [n for n in found if _matches_where(n, clauses)]
    return app.envelope("CreditNotes", found)


def get_credit_note(app: FakeXeroApp, req: ProviderRequest) -> JSON:
    note = _org(app, req).credit_notes.get(req.path_params["CreditNoteID"].lower())
    if note is None:
        raise XeroError(404, "not found")
    return app.envelope("CreditNotes", [note])


def put_allocations(app: FakeXeroApp, req: ProviderRequest) -> Any:
    """Allocate a credit note against invoices, as Xero checks it: approved documents of the
    same contact and currency, an amount no more than the credit left or the invoice's due."""
    org = _org(app, req)
    note = org.credit_notes.get(req.path_params["CreditNoteID"].lower())
    if note is None:
        raise XeroError(404, "not found")

    def build(
        app: FakeXeroApp, org: Organisation, element: JSON, errors: list[str], req: Any
    ) -> Callable[[], JSON] | None:
        invoice_id = str((element.get("Invoice") or {}).get("InvoiceID") or "").lower()
        invoice = org.invoices.get(invoice_id)
        amount = Decimal(str(element.get("Amount", "0")))
        on = _parse_day(element.get("Date", ""))
        if invoice is None:
            errors.append(f"Invoice with ID {invoice_id} could not be found.")
            return None
        if note["Status"] != "AUTHORISED":
            errors.append("Only AUTHORISED credit notes can be allocated.")
        if invoice["Status"] != "AUTHORISED":
            errors.append(f"Invoice is {invoice['Status']}: only AUTHORISED invoices take credit.")
        if invoice["Contact"]["ContactID"] != note["Contact"]["ContactID"]:
            errors.append("The credit note and the invoice must be for the same contact.")
        if invoice["CurrencyCode"] != note["CurrencyCode"]:
            errors.append("The credit note and the invoice must be in the same currency.")
        if (invoice["Type"], note["Type"]) not in (
            ("ACCREC", "ACCRECCREDIT"),
            ("ACCPAY", "ACCPAYCREDIT"),
        ):
            errors.append("[kiki fake] A credit note is allocated to an invoice of its own kind.")
        if on is None:
            errors.append("Allocation Date must be a date.")
        if amount <= 0 or _places(amount) > 2:
            errors.append("Allocation Amount must be more than zero, at most 2 decimal places.")
        if amount > note["RemainingCredit"]:
            errors.append(
                f"The amount {amount} exceeds the credit note's remaining credit "
                f"({note['RemainingCredit']})."
            )
        if amount > invoice["AmountDue"]:
            errors.append(
                f"The amount {amount} exceeds the invoice's amount due ({invoice['AmountDue']})."
            )
        if errors:
            return None

        def commit() -> JSON:
            assert invoice is not None and on is not None
            allocation = {
                "AllocationID": app.new_uuid(),
                "Amount": amount,
                "Date": day_date(on),
                "Invoice": {
                    "InvoiceID": invoice["InvoiceID"],
                    "InvoiceNumber": invoice["InvoiceNumber"],
                },
                "CreditNote": {
                    "CreditNoteID": note["CreditNoteID"],
                    "CreditNoteNumber": note["CreditNoteNumber"],
                },
            }
            note["Allocations"].append(allocation)
            note["RemainingCredit"] -= amount
            if note["RemainingCredit"] == 0:
                note["Status"] = "PAID"
            invoice["CreditNotes"].append(
                {
                    "CreditNoteID": note["CreditNoteID"],
                    "CreditNoteNumber": note["CreditNoteNumber"],
                    "AppliedAmount": amount,
                }
            )
            invoice["AmountCredited"] += amount
            invoice["AmountDue"] -= amount
            if invoice["AmountDue"] == 0:
                invoice["Status"] = "PAID"
                invoice["FullyPaidOnDate"] = day_date(on)
            now = ms_date(app.now())
            note["UpdatedDateUTC"] = invoice["UpdatedDateUTC"] = now
            return allocation

        return commit

    return _write(app, req, "Allocations", build)


def put_contacts(app: FakeXeroApp, req: ProviderRequest) -> Any:
    return _write(app, req, "Contacts", build_contact)


def put_invoices(app: FakeXeroApp, req: ProviderRequest) -> Any:
    return _write(app, req, "Invoices", build_invoice)


FakeXeroApp.routes = (
    Route("POST", "/connect/token", token_endpoint),
    Route("GET", "/connections", connections),
    Route("GET", f"{PREFIX}/Organisation", get_organisation),
    Route("GET", f"{PREFIX}/Accounts", get_accounts),
    Route("GET", f"{PREFIX}/TaxRates", get_tax_rates),
    Route("GET", f"{PREFIX}/Currencies", get_currencies),
    Route("GET", f"{PREFIX}/Contacts", get_contacts),
    Route("PUT", f"{PREFIX}/Contacts", put_contacts),
    Route("POST", f"{PREFIX}/Contacts", put_contacts),
    Route("GET", f"{PREFIX}/Contacts/{{ContactID}}", get_contact),
    Route("GET", f"{PREFIX}/Invoices", get_invoices),
    Route("PUT", f"{PREFIX}/Invoices", put_invoices),
    Route("POST", f"{PREFIX}/Invoices", put_invoices),
    Route("GET", f"{PREFIX}/Invoices/{{InvoiceID}}", get_invoice),
    Route("GET", f"{PREFIX}/CreditNotes", get_credit_notes),
    Route("PUT", f"{PREFIX}/CreditNotes", put_credit_notes),
    Route("GET", f"{PREFIX}/CreditNotes/{{CreditNoteID}}", get_credit_note),
    Route("PUT", f"{PREFIX}/CreditNotes/{{CreditNoteID}}/Allocations", put_allocations),
)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeXero(FakeProvider[FakeXeroApp]):
    """The fake served on 127.0.0.1, with helpers for the adapter's settings and state."""

    def __init__(
        self,
        app: FakeXeroApp | None = None,
        *,
        port: int = 0,
        verbose: bool = False,
        **settings: Any,
    ) -> None:
        super().__init__(app or FakeXeroApp(**settings), port=port, verbose=verbose)

    @property
    def api_base(self) -> str:
        """``KIKI_XERO_API_BASE`` for this fake."""
        return self.url + PREFIX

    @property
    def token_url(self) -> str:
        """``KIKI_XERO_TOKEN_URL`` for this fake."""
        return self.url + "/connect/token"

    def settings_env(
        self, refresh_token: str | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, str]:
        """``KIKI_XERO_*`` variables pointing at this fake (a new seed unless one is given)."""
        return {
            "KIKI_XERO_CLIENT_ID": self.app.client_id,
            "KIKI_XERO_CLIENT_SECRET": self.app.client_secret,
            "KIKI_XERO_REFRESH_TOKEN": refresh_token or self.app.issue_refresh_token(),
            "KIKI_XERO_TENANT_ID": tenant,
            "KIKI_XERO_API_BASE": self.api_base,
            "KIKI_XERO_TOKEN_URL": self.token_url,
        }

    def invoices(self, tenant: str = DEFAULT_TENANT) -> list[JSON]:
        """The organisation's invoices."""
        with self.app.lock:
            return list(self.app.organisation(tenant).invoices.values())

    def contacts(self, tenant: str = DEFAULT_TENANT) -> list[JSON]:
        """The organisation's contacts."""
        with self.app.lock:
            return list(self.app.organisation(tenant).contacts.values())

    def add_contact(
        self, name: str, number: str | None = None, tenant: str = DEFAULT_TENANT
    ) -> JSON:
        """A contact made in Xero by someone else (``ContactNumber`` optional)."""
        element = {"Name": name} if number is None else {"Name": name, "ContactNumber": number}
        with self.app.lock:
            return new_contact(self.app, self.app.organisation(tenant), element)

    def expire_keys(self) -> None:
        """Forget every idempotency key, as when the key window has passed (tokens stay)."""
        self.app.idempotency.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="seed for ids")
    parser.add_argument(
        "--refresh-token", action="append", default=[], help="register a refresh token"
    )
    parser.add_argument("--refresh-grace", type=float, default=None)
    args = parser.parse_args(argv)
    app = FakeXeroApp(seed=args.seed, latency=args.latency, key_lifetime=args.key_lifetime)
    if args.refresh_grace is not None:
        app.refresh_grace = args.refresh_grace
    for token in args.refresh_token:
        app.issue_refresh_token(token=token)
    return serve_until_stopped(FakeXero(app, port=args.port, verbose=args.verbose), args.ready_file)


if __name__ == "__main__":
    raise SystemExit(main())
