"""A local, stateful, Stripe-compatible fake server that honours ``Idempotency-Key``.

It speaks the part of Stripe's v1 REST API (API version 2023-08-16) that an invoicing client uses:
customers, draft invoices, invoice items, finalize, pay, send, void, credit notes (pre- and
post-payment, with the customer's credit balance applied to the next invoice finalized).
Responses are shaped like Stripe's (checked against the OpenAPI spec in
``tests/test_support_fake_stripe.py``), errors are ``{"error": {"type", "message", "param",
"code"}}``, and every response has a ``Request-Id``.

The server, faults, rate limits, request record and idempotency store come from
:mod:`tests.support.fake_provider`; this module holds Stripe's semantics. Idempotency works as
Stripe documents it for v1: the first result for a key (per API key) is kept and replayed with
``Idempotent-Replayed: true``; the same key with other parameters or another endpoint is a 400
``idempotency_error``; the same key while the first request is still running is a 409
``idempotency_error``. Results are kept only once the endpoint has started executing:
validation errors (4xx) and 429s are not kept, 2xx, 402 (card errors) and 5xx are.

Rate limits: ``rate_mode="window"`` admits at most ``rate_limit`` (default 100) requests in any
one-second interval, as Stripe documents its live limit, and answers the rest with a 429 and no
``Retry-After``; ``rate_mode="bucket"`` (the default) is a token bucket of ``rate_limit``
requests per second and ``burst`` deep, with no limit when ``rate_limit`` is unset.

Keys are kept 24 hours on the fake's clock; ``fake.advance_clock(86400)`` (or ``POST
/_fake/clock {"advance": 86400}``) expires them without waiting.

Faults can be queued for the next N requests matching a method and path (prefix, or a glob with
``*``): an error status (503, 429 with ``Retry-After``, 500 with ``Stripe-Should-Retry: false``,
402 card error, 400), a dropped connection (TCP reset, no response) or a delay, each either before
the operation runs or after it has run (a lost response). See :class:`Fault`.

Use it in-process::

    with FakeStripe(rate_limit=None, latency=0.0) as fake:
        client = fake.stripe_client()          # or any HTTP client on fake.url
        fake.inject_503("POST", "/v1/invoices", after=True)
        ...
        fake.state()["invoices"]

or as a process (tests wait for the ready file, then stop it by its pid)::

    python -m tests.support.fake_stripe --port 0 --rate-mode window --latency 0.05 \\
        --ready-file /tmp/fake.url

Control endpoints (no auth) live under ``/_fake/``: see :mod:`tests.support.fake_provider`.

Not modelled: Stripe's other endpoints and parameters (a parameter the spec allows but this fake
does not model is rejected with a message saying so), taxes, discounts, webhooks, automatic
collection (an ``auto_advance`` invoice stays ``open`` until ``/pay``), payment failures other
than injected ones, and three-decimal-currency rules. What happens outside the API (a payment,
a failed attempt, a void, a delete, a copy) is a control call: ``fake.mark_invoice(id, state)``,
``fake.duplicate_invoice(id)`` (see :meth:`FakeStripeApp.mark_invoice`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import random
import re
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Self

from .fake_provider import (
    Bucket,
    FakeProvider,
    FakeProviderApp,
    FakeResponse,
    Fingerprint,
    IdempotencyEntry,
    ProviderError,
    ProviderRequest,
    RateLimits,
    RecordedRequest,
    Rejection,
    Route,
    Window,
    common_arguments,
    serve_until_stopped,
    spawn_fake,
)
from .fake_provider import Fault as ProviderFault
from .stripe_spec import (
    FormDecodeError,
    Problem,
    SpecViolation,
    as_list,
    decode_form,
    request_problems,
)

__all__ = [
    "API_VERSION",
    "FakeResponse",
    "FakeStripe",
    "FakeStripeApp",
    "Fault",
    "RecordedRequest",
    "StripeAPIError",
    "main",
    "spawn_fake_stripe",
]

API_VERSION = "2023-08-16"
MAX_INVOICE_ITEMS = 250
MAX_AMOUNT = 99_999_999
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_METADATA_KEYS = 50
# NOTE: Stripe's live-mode limit is 100 operations per second (25 in test mode), and its 429 has
# no Retry-After (stripe.com/docs/rate-limits).
LIVE_RATE_LIMIT = 100
# NOTE: Stripe keeps an idempotency key for at least 24 hours
# (stripe.com/docs/api/idempotent_requests).
KEY_LIFETIME = 24 * 3600.0
# NOTE: Stripe's zero-decimal currencies (stripe.com/docs/currencies), for amounts given to the
# control endpoints in major units.
_ZERO_DECIMAL = "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF"
ZERO_DECIMAL = frozenset(_ZERO_DECIMAL.split())
RateMode = Literal["window", "bucket"]
_ALPHANUM = string.ascii_letters + string.digits

JSON = dict[str, Any]


class StripeAPIError(ProviderError):
    """An error the fake answers with, in Stripe's ``{"error": {...}}`` shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=headers)
        self.type = type
        self.param = param
        self.decline_code = decline_code

    def body(self) -> JSON:
        """The JSON body Stripe would send."""
        error: JSON = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        if self.decline_code:
            error["decline_code"] = self.decline_code
        return {"error": error}

    def response(self) -> FakeResponse:
        """This error as a response."""
        return FakeResponse(self.status, self.body(), dict(self.headers))


RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class Fault(ProviderFault):
    """A :class:`~tests.support.fake_provider.Fault` with Stripe's error fields and presets.

    ``store`` decides whether an ``error`` fault's own response is kept under the idempotency key
    (default: yes for 500 and 402, which Stripe produces after the endpoint started; no for
    503/502/504/429/400, which model a proxy or a throttle in front of it).
    """

    path: str = "/v1/"
    message: str = "The server is temporarily unavailable (injected by the kiki fake)."
    error_type: str = "api_error"
    param: str | None = None
    decline_code: str | None = None

    def stored(self) -> bool:
        """Whether an ``error`` fault's response is kept under the idempotency key."""
        if self.store is not None:
            return self.store
        return self.kind == "error" and self.status in (500, 402)

    @classmethod
    def presets(cls) -> dict[str, Callable[..., Self]]:
        """The base presets plus ``503``, ``429``, ``500``, ``card_error`` and ``400``.

        E.g. ``{"preset": "429", "retry_after": 2}`` or ``{"preset": "500", "should_retry":
        true}``.
        """
        return {
            **super().presets(),
            "503": cls.service_unavailable,
            "429": cls.rate_limited,
            "500": cls.server_error,
            "card_error": cls.card_error,
            "400": cls.invalid_request,
        }

    @classmethod
    def service_unavailable(cls, method: str = "*", path: str = "/v1/", **kw: Any) -> Self:
        """503 ``api_error`` (not stored; with ``after=True`` the operation did happen)."""
        return cls("error", method, path, status=503, **kw)

    @classmethod
    def rate_limited(
        cls, method: str = "*", path: str = "/v1/", *, retry_after: float | None = 1, **kw: Any
    ) -> Self:
        """429 ``rate_limit`` with a ``Retry-After`` header (None: no header, as Stripe)."""
        headers = dict(kw.pop("headers", {}))
        if retry_after is not None:
            headers["Retry-After"] = _format_seconds(retry_after)
        kw.setdefault("message", RATE_LIMIT_MESSAGE)
        return cls(
            "error",
            method,
            path,
            status=429,
            error_type="invalid_request_error",
            code="rate_limit",
            headers=headers,
            **kw,
        )

    @classmethod
    def server_error(
        cls,
        method: str = "*",
        path: str = "/v1/",
        *,
        should_retry: bool | None = False,
        **kw: Any,
    ) -> Self:
        """500 ``api_error`` with ``Stripe-Should-Retry`` (stored under the key, as Stripe)."""
        headers = dict(kw.pop("headers", {}))
        if should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if should_retry else "false"
        kw.setdefault("message", "An unknown error occurred (injected by the kiki fake).")
        return cls("error", method, path, status=500, headers=headers, **kw)

    @classmethod
    def card_error(
        cls,
        method: str = "POST",
        path: str = "/v1/invoices/*/pay",
        *,
        code: str = "card_declined",
        decline_code: str | None = "generic_decline",
        **kw: Any,
    ) -> Self:
        """402 ``card_error`` (stored under the key)."""
        kw.setdefault("message", "Your card was declined.")
        return cls(
            "error",
            method,
            path,
            status=402,
            error_type="card_error",
            code=code,
            decline_code=decline_code,
            **kw,
        )

    @classmethod
    def invalid_request(
        cls, method: str = "*", path: str = "/v1/", *, status: int = 400, **kw: Any
    ) -> Self:
        """400 (or another 4xx) ``invalid_request_error`` (not stored)."""
        kw.setdefault("message", "Invalid request (injected by the kiki fake).")
        return cls("error", method, path, status=status, error_type="invalid_request_error", **kw)


class Params:
    """Typed access to decoded form parameters, raising Stripe-like 400s.

    Args:
        data: decoded parameters.
        modelled: the parameter names the endpoint implements; others are rejected.
    """

    def __init__(self, data: Mapping[str, Any], modelled: set[str]) -> None:
        self.data = data
        unknown = sorted(set(data) - modelled - {"expand"})
        if unknown:
            raise StripeAPIError(
                400,
                f"Received unknown parameter: {unknown[0]} (the kiki fake models only: "
                f"{', '.join(sorted(modelled))})",
                code="parameter_unknown",
                param=unknown[0],
            )

    def _scalar(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise StripeAPIError(
                400, f"Invalid {name}: must be a string", param=name, code="parameter_invalid"
            )
        return value

    def text(self, name: str, *, required: bool = False, max_length: int = 5000) -> str | None:
        """A string parameter (empty means unset)."""
        value = self._scalar(name)
        if value is None:
            if required:
                raise _missing(name)
            return None
        if len(value) > max_length:
            raise StripeAPIError(
                400,
                f"Invalid {name}: must be at most {max_length} characters",
                param=name,
                code="parameter_invalid_string_too_long",
            )
        return value

    def integer(
        self,
        name: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        """An integer parameter; ``"10.5"`` or ``"abc"`` is an error."""
        value = self._scalar(name)
        if value is None:
            if required:
                raise _missing(name)
            return None
        if not re.fullmatch(r"[+-]?\d+", value):
            raise StripeAPIError(
                400, f"Invalid integer: {value}", param=name, code="parameter_invalid_integer"
            )
        number = int(value)
        if minimum is not None and number < minimum:
            raise StripeAPIError(400, f"Invalid {name}: must be at least {minimum}", param=name)
        if maximum is not None and number > maximum:
            raise StripeAPIError(400, f"Invalid {name}: must be at most {maximum}", param=name)
        return number

    def decimal(self, name: str) -> Decimal | None:
        """A decimal-string parameter (``unit_amount_decimal``)."""
        value = self._scalar(name)
        if value is None:
            return None
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise StripeAPIError(400, f"Invalid decimal: {value}", param=name) from None
        if not number.is_finite():
            raise StripeAPIError(400, f"Invalid decimal: {value}", param=name)
        return number

    def boolean(self, name: str) -> bool | None:
        """A boolean parameter, ``true`` or ``false``."""
        value = self._scalar(name)
        if value is None:
            return None
        if value not in ("true", "false"):
            raise StripeAPIError(400, f"Invalid boolean: {value}", param=name)
        return value == "true"

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        """One of ``choices``."""
        value = self._scalar(name)
        if value is not None and value not in choices:
            raise StripeAPIError(
                400,
                f"Invalid {name}: must be one of {', '.join(choices[:-1])} or {choices[-1]}",
                param=name,
            )
        return value

    def metadata(self) -> dict[str, str]:
        """``metadata[key]=value`` pairs; empty values mean "not set"."""
        value = self.data.get("metadata")
        if value is None or value == "":
            return {}
        if not isinstance(value, dict):
            raise StripeAPIError(400, "Invalid metadata: must be an object", param="metadata")
        out: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(item, str):
                raise StripeAPIError(
                    400, f"Invalid metadata[{key}]: must be a string", param=f"metadata[{key}]"
                )
            if len(key) > 40:
                raise StripeAPIError(
                    400, "Metadata keys can have up to 40 characters", param=f"metadata[{key}]"
                )
            if len(item) > 500:
                raise StripeAPIError(
                    400, "Metadata values can have up to 500 characters", param=f"metadata[{key}]"
                )
            if item != "":
                out[key] = item
        if len(out) > MAX_METADATA_KEYS:
            raise StripeAPIError(
                400, "Invalid metadata: metadata can have up to 50 keys", param="metadata"
            )
        return out

    def expand(self) -> list[str]:
        """The ``expand[]`` list."""
        value = self.data.get("expand")
        if value is None:
            return []
        items = as_list(value) if not isinstance(value, str) else [value]
        if items is None or not all(isinstance(i, str) for i in items):
            raise StripeAPIError(400, "Invalid expand: must be a list of strings", param="expand")
        return items


def _missing(name: str) -> StripeAPIError:
    return StripeAPIError(
        400, f"Missing required param: {name}.", code="parameter_missing", param=name
    )


def _no_such(kind: str, object_id: str, param: str = "id", status: int = 404) -> StripeAPIError:
    return StripeAPIError(
        status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def _problem_error(problem: Problem) -> StripeAPIError:
    """A spec problem as the 400 Stripe would send."""
    param = problem.param or None
    if problem.kind == "unknown":
        return StripeAPIError(
            400,
            f"Received unknown parameter: {problem.param}",
            code="parameter_unknown",
            param=param,
        )
    if problem.kind == "missing":
        return _missing(problem.param)
    if problem.kind == "type" and problem.expected == "integer":
        return StripeAPIError(
            400, f"Invalid integer: {problem.value}", code="parameter_invalid_integer", param=param
        )
    if problem.kind == "enum" and isinstance(problem.expected, list) and problem.expected:
        choices = [str(c) for c in problem.expected]
        listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
        return StripeAPIError(400, f"Invalid {problem.param}: must be one of {listed}", param=param)
    return StripeAPIError(
        400, f"Invalid {problem.param or 'request'}: {problem.message}", param=param
    )


class FakeStripeState:
    """Stripe's objects. Callers hold :attr:`lock` (the app's) around any access."""

    def __init__(self, lock: threading.RLock, seed: int | None = None) -> None:
        self.lock = lock
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget every object."""
        with self.lock:
            self.rng = random.Random(self._seed)
            self.customers: dict[str, JSON] = {}
            self.invoices: dict[str, JSON] = {}
            """Invoice JSON without ``lines`` (rendered from :attr:`invoice_lines`)."""
            self.invoice_items: dict[str, JSON] = {}
            self.invoice_lines: dict[str, list[JSON]] = {}
            self.sequence: dict[str, int] = {}
            """Object id -> creation order (tie-break for "newest first")."""
            self.created_at: dict[str, float] = {}
            """Object id -> exact creation time (for the simulated search lag)."""
            self.sent: Counter[str] = Counter()
            """Invoice id -> number of ``/send`` calls."""
            self.days_until_due: dict[str, int] = {}
            """Invoice id -> ``days_until_due`` (not a field of Stripe's invoice object)."""
            self.credit_notes: dict[str, JSON] = {}
            self._counter = 0

    def new_id(self, prefix: str, length: int = 24) -> str:
        """A Stripe-looking id, unique in this state (deterministic under a seed)."""
        while True:
            candidate = prefix + "".join(self.rng.choice(_ALPHANUM) for _ in range(length))
            if candidate not in self.sequence:
                return candidate

    def register(self, object_id: str, now: float) -> None:
        """Record the creation order and time of a new object."""
        self._counter += 1
        self.sequence[object_id] = self._counter
        self.created_at[object_id] = now


def _authenticate(headers: Mapping[str, str]) -> str:
    """Return the API key from ``Authorization`` (Bearer, or Basic ``key:``), or raise 401."""
    value = headers.get("authorization", "").strip()
    key = ""
    if value.lower().startswith("bearer "):
        key = value[7:].strip()
    elif value.lower().startswith("basic "):
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            key = base64.b64decode(value[6:].strip()).decode("utf-8").split(":", 1)[0]
    if not key:
        raise StripeAPIError(
            401,
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
            "or we can help at https://support.stripe.com/.",
            headers={"WWW-Authenticate": 'Bearer realm="Stripe"'},
        )
    if not key.startswith(("sk_test_", "rk_test_")):
        masked = key[:8] + "*" * max(0, len(key) - 12) + key[-4:]
        raise StripeAPIError(
            401,
            f"Invalid API Key provided: {masked} (the kiki fake accepts "
            "test-mode keys only: sk_test_... or rk_test_...)",
            headers={"WWW-Authenticate": 'Bearer realm="Stripe"'},
        )
    return key


def _newest_first(state: FakeStripeState, objects: Mapping[str, JSON]) -> list[str]:
    return sorted(
        objects, key=lambda i: (objects[i].get("created", 0), state.sequence[i]), reverse=True
    )


def _check_expand(requested: list[str], allowed: set[str]) -> tuple[str, ...]:
    for item in requested:
        if item not in allowed:
            raise StripeAPIError(400, f"This property cannot be expanded ({item}).", param="expand")
    return tuple(requested)


def _paginate(
    app: FakeStripeApp,
    ids: list[str],
    p: Params,
    url: str,
    render: Callable[[str], JSON],
    kind: str,
) -> JSON:
    """A Stripe list object over ``ids`` (already newest first)."""
    limit = p.integer("limit", minimum=1, maximum=100) or 10
    after, before = p.text("starting_after"), p.text("ending_before")
    if after and before:
        raise StripeAPIError(
            400,
            "You may only specify one of these parameters: ending_before, starting_after.",
            param="ending_before",
        )
    if after is not None:
        if after not in ids:
            raise _no_such(kind, after, "starting_after", 400)
        start = ids.index(after) + 1
        page, has_more = ids[start : start + limit], start + limit < len(ids)
    elif before is not None:
        if before not in ids:
            raise _no_such(kind, before, "ending_before", 400)
        end = ids.index(before)
        page, has_more = ids[max(0, end - limit) : end], end - limit > 0
    else:
        page, has_more = ids[:limit], limit < len(ids)
    return {"object": "list", "data": [render(i) for i in page], "has_more": has_more, "url": url}


def _get_customer(
    app: FakeStripeApp, customer_id: str | None, param: str = "customer", status: int = 400
) -> JSON:
    if customer_id is None:
        raise _missing(param)
    customer = app.state.customers.get(customer_id)
    if customer is None:
        raise _no_such("customer", customer_id, param, status)
    return customer


def _get_invoice(
    app: FakeStripeApp, invoice_id: str, param: str = "invoice", status: int = 404
) -> JSON:
    invoice = app.state.invoices.get(invoice_id)
    if invoice is None:
        raise _no_such("invoice", invoice_id, param, status)
    return invoice


def _currency(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[A-Za-z]{3}", value):
        raise StripeAPIError(
            400, f"Invalid currency: {value}. Use a three-letter ISO code.", param="currency"
        )
    return value.lower()


# -- customers -------------------------------------------------------------------------------


def create_customer(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/customers``."""
    p = Params(req.params, {"name", "email", "description", "metadata", "phone"})
    _check_expand(p.expand(), set())
    st, now = app.state, int(app.clock())
    customer_id = st.new_id("cus_", 14)
    customer: JSON = {
        "id": customer_id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": now,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": p.text("description"),
        "discount": None,
        "email": p.text("email", max_length=512),
        "invoice_prefix": "".join(
            st.rng.choice(string.ascii_uppercase + string.digits) for _ in range(8)
        ),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": p.metadata(),
        "name": p.text("name", max_length=256),
        "next_invoice_sequence": 1,
        "phone": p.text("phone", max_length=20),
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    st.customers[customer_id] = customer
    st.register(customer_id, app.clock())
    app.count_created("customer")
    return dict(customer)


def retrieve_customer(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/customers/{customer}``."""
    p = Params(req.params, set())
    _check_expand(p.expand(), set())
    return dict(_get_customer(app, req.path_params["customer"], "id", 404))


def list_customers(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/customers`` (``email`` filter, cursor pagination)."""
    p = Params(req.params, {"limit", "starting_after", "ending_before", "email"})
    _check_expand(p.expand(), set())
    st = app.state
    email = p.text("email", max_length=512)
    ids = [
        i
        for i in _newest_first(st, st.customers)
        if email is None or st.customers[i]["email"] == email
    ]
    return _paginate(app, ids, p, "/v1/customers", lambda i: dict(st.customers[i]), "customer")


_CLAUSE_RE = re.compile(
    r"""\s*(?:metadata\[(?P<q1>['"])(?P<key>.+?)(?P=q1)\]|(?P<field>[a-z_]+))\s*:\s*"""
    r"""(?P<q2>['"])(?P<value>.*?)(?P=q2)\s*"""
)


def _search(
    app: FakeStripeApp,
    req: ProviderRequest,
    objects: Mapping[str, JSON],
    url: str,
    render: Callable[[str], JSON],
) -> JSON:
    """Stripe Search over ``objects`` for ``field:'v'`` / ``metadata['k']:'v'`` joined by AND.

    Objects younger than ``search_lag`` seconds are not found yet.
    """
    p = Params(req.params, {"query", "limit", "page"})
    _check_expand(p.expand(), set())
    query = p.text("query", required=True) or ""
    clauses: list[tuple[str | None, str | None, str]] = []
    for part in re.split(r"\s+AND\s+", query.strip()):
        found = _CLAUSE_RE.fullmatch(part)
        if found is None:
            raise StripeAPIError(
                400,
                f"Unsupported search query {query!r}: the kiki fake understands only "
                "field:'value' and metadata['key']:'value' clauses joined by AND.",
                param="query",
            )
        clauses.append((found.group("key"), found.group("field"), found.group("value")))
    limit = p.integer("limit", minimum=1, maximum=100) or 10
    page = p.text("page")
    offset = int(page[5:]) if page and page.startswith("page_") and page[5:].isdigit() else 0
    visible_before = app.clock() - app.search_lag
    st = app.state

    def hit(obj: JSON) -> bool:
        for key, name, value in clauses:
            if key is not None and obj.get("metadata", {}).get(key) != value:
                return False
            if name is not None and str(obj.get(name)) != value:
                return False
        return True

    ids = [
        i
        for i in _newest_first(st, objects)
        if st.created_at[i] <= visible_before and hit(objects[i])
    ]
    chunk = ids[offset : offset + limit]
    more = offset + limit < len(ids)
    return {
        "object": "search_result",
        "data": [render(i) for i in chunk],
        "has_more": more,
        "next_page": f"page_{offset + limit}" if more else None,
        "url": url,
    }


def search_customers(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/customers/search?query=metadata['k']:'v'``."""
    st = app.state
    return _search(app, req, st.customers, "/v1/customers/search", lambda i: dict(st.customers[i]))


# -- invoices --------------------------------------------------------------------------------

COLLECTION_METHODS = ("charge_automatically", "send_invoice")
INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")


def create_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoices``: a draft invoice."""
    p = Params(
        req.params,
        {
            "customer",
            "currency",
            "collection_method",
            "auto_advance",
            "days_until_due",
            "due_date",
            "description",
            "metadata",
            "pending_invoice_items_behavior",
        },
    )
    expand = _check_expand(p.expand(), {"customer"})
    st, now = app.state, int(app.clock())
    customer = _get_customer(app, p.text("customer", required=True))
    method = p.choice("collection_method", COLLECTION_METHODS) or "charge_automatically"
    days = p.integer("days_until_due", minimum=0, maximum=730)
    due_date = p.integer("due_date", minimum=0)
    if method != "send_invoice":
        for name, value in (("days_until_due", days), ("due_date", due_date)):
            if value is not None:
                raise StripeAPIError(
                    400,
                    f"You can only set `{name}` on invoices with `collection_method=send_invoice`.",
                    param=name,
                )
    elif days is None and due_date is None:
        raise StripeAPIError(
            400,
            "Invoices with `collection_method=send_invoice` require "
            "`days_until_due` or `due_date`.",
            param="days_until_due",
            code="parameter_missing",
        )
    elif days is not None and due_date is not None:
        raise StripeAPIError(
            400,
            "You may only specify one of these parameters: days_until_due, due_date.",
            param="due_date",
        )
    behavior = p.choice("pending_invoice_items_behavior", ("exclude", "include")) or "exclude"
    currency = _currency(p.text("currency")) or customer["currency"] or "usd"
    invoice_id = st.new_id("in_")
    invoice: JSON = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "kiki fake account",
        "account_tax_ids": None,
        "amount_due": 0,
        "amount_paid": 0,
        "amount_remaining": 0,
        "amount_shipping": 0,
        "application": None,
        "application_fee_amount": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": bool(p.boolean("auto_advance")),
        "automatic_tax": {"enabled": False, "status": None},
        "billing_reason": "manual",
        "charge": None,
        "collection_method": method,
        "created": now,
        "currency": currency,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_address": None,
        "customer_email": customer["email"],
        "customer_name": customer["name"],
        "customer_phone": customer["phone"],
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": p.text("description", max_length=1500),
        "discount": None,
        "discounts": [],
        "due_date": due_date,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "last_finalization_error": None,
        "latest_revision": None,
        "livemode": False,
        "metadata": p.metadata(),
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "paid": False,
        "paid_out_of_band": False,
        "payment_intent": None,
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": now,
        "period_start": now,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "quote": None,
        "receipt_number": None,
        "rendering_options": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subscription": None,
        "subscription_details": {"metadata": None},
        "subtotal": 0,
        "subtotal_excluding_tax": 0,
        "tax": None,
        "test_clock": None,
        "total": 0,
        "total_discount_amounts": [],
        "total_excluding_tax": 0,
        "total_tax_amounts": [],
        "transfer_data": None,
        "webhooks_delivered_at": None,
    }
    st.invoices[invoice_id] = invoice
    st.invoice_lines[invoice_id] = []
    if days is not None:
        st.days_until_due[invoice_id] = days
    st.register(invoice_id, app.clock())
    app.count_created("invoice")
    if behavior == "include":
        pending = [
            i
            for i in reversed(_newest_first(st, st.invoice_items))
            if st.invoice_items[i]["invoice"] is None
            and st.invoice_items[i]["customer"] == customer["id"]
            and st.invoice_items[i]["currency"] == currency
        ]
        for item_id in pending[:MAX_INVOICE_ITEMS]:
            _attach_item(app, invoice, st.invoice_items[item_id])
    return app.render_invoice(invoice, expand=expand)


def retrieve_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/invoices/{invoice}``."""
    p = Params(req.params, set())
    expand = _check_expand(p.expand(), {"customer"})
    return app.render_invoice(_get_invoice(app, req.path_params["invoice"], "id"), expand=expand)


def list_invoices(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/invoices`` newest first (``customer``, ``status``, ``collection_method``,
    ``created[gte|gt|lte|lt]``)."""
    p = Params(
        req.params,
        {
            "customer",
            "status",
            "collection_method",
            "created",
            "limit",
            "starting_after",
            "ending_before",
        },
    )
    created = req.params.get("created") or {}
    if not isinstance(created, dict):
        created = {"eq": created}
    try:
        bounds = {op: int(str(value)) for op, value in created.items()}
    except ValueError:
        raise StripeAPIError(400, "Invalid integer: created", param="created") from None
    compare = {
        "gte": lambda t, b: t >= b,
        "gt": lambda t, b: t > b,
        "lte": lambda t, b: t <= b,
        "lt": lambda t, b: t < b,
        "eq": lambda t, b: t == b,
    }
    if set(bounds) - set(compare):
        raise StripeAPIError(400, "Received unknown parameter: created", param="created")
    expand = tuple(e.removeprefix("data.") for e in _check_expand(p.expand(), {"data.customer"}))
    st = app.state
    customer = p.text("customer")
    status = p.choice("status", INVOICE_STATUSES)
    method = p.choice("collection_method", COLLECTION_METHODS)

    def keep(invoice: JSON) -> bool:
        return (
            (customer is None or invoice["customer"] == customer)
            and (status is None or invoice["status"] == status)
            and (method is None or invoice["collection_method"] == method)
            and all(compare[op](invoice["created"], b) for op, b in bounds.items())
        )

    ids = [i for i in _newest_first(st, st.invoices) if keep(st.invoices[i])]
    return _paginate(
        app,
        ids,
        p,
        "/v1/invoices",
        lambda i: app.render_invoice(st.invoices[i], expand=expand),
        "invoice",
    )


def search_invoices(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/invoices/search`` (same query forms as customers)."""
    st = app.state
    return _search(
        app, req, st.invoices, "/v1/invoices/search", lambda i: app.render_invoice(st.invoices[i])
    )


def list_invoice_lines(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/invoices/{invoice}/lines`` in invoice order."""
    p = Params(req.params, {"limit", "starting_after", "ending_before"})
    _check_expand(p.expand(), set())
    invoice = _get_invoice(app, req.path_params["invoice"])
    lines = {line["id"]: line for line in app.state.invoice_lines[invoice["id"]]}
    return _paginate(
        app,
        list(lines),
        p,
        f"/v1/invoices/{invoice['id']}/lines",
        lambda i: dict(lines[i]),
        "line item",
    )


def delete_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``DELETE /v1/invoices/{invoice}``: drafts only; their invoice items go too."""
    Params(req.params, set())
    st = app.state
    invoice = _get_invoice(app, req.path_params["invoice"], "id")
    if invoice["status"] != "draft":
        raise StripeAPIError(
            400,
            "You can only delete draft invoices. Try voiding the invoice instead.",
            param="invoice",
        )
    for line in st.invoice_lines.pop(invoice["id"]):
        st.invoice_items.pop(line["invoice_item"], None)
    del st.invoices[invoice["id"]]
    return {"id": invoice["id"], "object": "invoice", "deleted": True}


def _finalize(app: FakeStripeApp, invoice: JSON, auto_advance: bool | None) -> None:
    """Move a draft to ``open`` (or straight to ``paid`` when nothing is due)."""
    st, now = app.state, int(app.clock())
    customer = st.customers[invoice["customer"]]
    invoice["number"] = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
    customer["next_invoice_sequence"] += 1
    if auto_advance is not None:
        invoice["auto_advance"] = auto_advance
    invoice["status"] = "open"
    invoice["status_transitions"]["finalized_at"] = now
    invoice["effective_at"] = now
    # NOTE: a customer's credit balance (negative) "will be automatically applied to their next
    # invoice when it's finalized" (2023-08-16 spec, credit_amount of POST /v1/credit_notes):
    # starting_balance is the balance before, ending_balance after, amount_due what is left.
    starting = customer["balance"]
    applied = min(max(-starting, 0), invoice["amount_due"])
    customer["balance"] = starting + applied
    invoice["starting_balance"] = starting
    invoice["ending_balance"] = customer["balance"]
    invoice["amount_due"] -= applied
    invoice["amount_remaining"] -= applied
    invoice["hosted_invoice_url"] = f"https://invoice.stripe.com/i/kiki_fake/{invoice['id']}"
    invoice["invoice_pdf"] = f"https://pay.stripe.com/invoice/kiki_fake/{invoice['id']}/pdf"
    if invoice["collection_method"] == "send_invoice":
        if invoice["due_date"] is None:  # "days from when the invoice is created"
            days = st.days_until_due.get(invoice["id"], 0)
            invoice["due_date"] = invoice["created"] + 86400 * days
    elif invoice["auto_advance"]:
        invoice["next_payment_attempt"] = now + 3600
    if invoice["amount_due"] == 0:
        _mark_paid(app, invoice, out_of_band=False, charge=False)


def _minor_units(amount: str, invoice: JSON) -> int:
    """``amount`` (major units, as text) in the invoice currency's minor units."""
    exponent = 0 if invoice["currency"].upper() in ZERO_DECIMAL else 2
    scaled = Decimal(amount).scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of minor units")
    return int(scaled)


def _mark_paid(app: FakeStripeApp, invoice: JSON, *, out_of_band: bool, charge: bool) -> None:
    now = int(app.clock())
    invoice.update(
        status="paid",
        paid=True,
        amount_paid=invoice["amount_due"],
        amount_remaining=0,
        next_payment_attempt=None,
        paid_out_of_band=out_of_band,
    )
    invoice["status_transitions"]["paid_at"] = now
    if charge:
        invoice["attempted"] = True
        invoice["attempt_count"] += 1
        invoice["charge"] = app.state.new_id("ch_")


def finalize_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoices/{invoice}/finalize``: draft -> open (or paid if 0 is due)."""
    p = Params(req.params, {"auto_advance"})
    expand = _check_expand(p.expand(), {"customer"})
    invoice = _get_invoice(app, req.path_params["invoice"])
    if invoice["status"] != "draft":
        raise StripeAPIError(
            400,
            "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
            param="invoice",
        )
    _finalize(app, invoice, p.boolean("auto_advance"))
    return app.render_invoice(invoice, expand=expand)


def pay_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoices/{invoice}/pay``: finalizes a draft first, then marks it paid."""
    p = Params(req.params, {"paid_out_of_band"})
    expand = _check_expand(p.expand(), {"customer"})
    invoice = _get_invoice(app, req.path_params["invoice"])
    if invoice["status"] == "paid":
        raise StripeAPIError(
            400, "Invoice is already paid", param="invoice", code="invoice_already_paid"
        )
    if invoice["status"] == "void":
        raise StripeAPIError(
            400, "This invoice can no longer be paid because it is void.", param="invoice"
        )
    if invoice["status"] == "draft":
        _finalize(app, invoice, None)
    if invoice["status"] == "open":
        out_of_band = bool(p.boolean("paid_out_of_band"))
        _mark_paid(app, invoice, out_of_band=out_of_band, charge=not out_of_band)
    return app.render_invoice(invoice, expand=expand)


def send_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoices/{invoice}/send``: ``send_invoice`` invoices only."""
    p = Params(req.params, set())
    expand = _check_expand(p.expand(), {"customer"})
    invoice = _get_invoice(app, req.path_params["invoice"])
    if invoice["collection_method"] != "send_invoice":
        raise StripeAPIError(
            400,
            "You can only manually send an invoice if its collection method is 'send_invoice'.",
            param="invoice",
        )
    if invoice["status"] in ("paid", "void"):
        raise StripeAPIError(
            400, f"You can't send an invoice that is {invoice['status']}.", param="invoice"
        )
    if invoice["status"] == "draft":
        _finalize(app, invoice, None)
    app.state.sent[invoice["id"]] += 1
    return app.render_invoice(invoice, expand=expand)


def void_invoice(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoices/{invoice}/void``: open (or uncollectible) invoices only."""
    p = Params(req.params, set())
    expand = _check_expand(p.expand(), {"customer"})
    invoice = _get_invoice(app, req.path_params["invoice"])
    if invoice["status"] not in ("open", "uncollectible"):
        raise StripeAPIError(
            400,
            f"You can only void open or uncollectible invoices; this one is {invoice['status']}.",
            param="invoice",
        )
    invoice.update(status="void", amount_remaining=0, next_payment_attempt=None)
    invoice["status_transitions"]["voided_at"] = int(app.clock())
    return app.render_invoice(invoice, expand=expand)


# -- invoice items ---------------------------------------------------------------------------


def _attach_item(app: FakeStripeApp, invoice: JSON, item: JSON) -> None:
    """Put an invoice item on a draft invoice as a line and update the totals."""
    lines = app.state.invoice_lines[invoice["id"]]
    item["invoice"] = invoice["id"]
    lines.append(
        {
            "id": app.state.new_id("il_"),
            "object": "line_item",
            "amount": item["amount"],
            "amount_excluding_tax": item["amount"],
            "currency": item["currency"],
            "description": item["description"],
            "discount_amounts": [],
            "discountable": item["discountable"],
            "discounts": [],
            "invoice_item": item["id"],
            "livemode": False,
            "metadata": dict(item["metadata"]),
            "period": dict(item["period"]),
            "price": None,
            "proration": False,
            "proration_details": {"credited_items": None},
            "quantity": item["quantity"],
            "subscription": None,
            "tax_amounts": [],
            "tax_rates": [],
            "type": "invoiceitem",
            "unit_amount_excluding_tax": item["unit_amount_decimal"],
        }
    )
    subtotal = sum(line["amount"] for line in lines)
    invoice.update(
        subtotal=subtotal,
        subtotal_excluding_tax=subtotal,
        total=subtotal,
        total_excluding_tax=subtotal,
        amount_due=max(subtotal, 0),
        amount_remaining=max(subtotal, 0),
    )


def create_invoice_item(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/invoiceitems``: onto a draft ``invoice``, or pending for the customer.

    ``amount`` is the total in minor units; or ``unit_amount``/``unit_amount_decimal`` times
    ``quantity`` (rounded half up).
    """
    p = Params(
        req.params,
        {
            "customer",
            "invoice",
            "amount",
            "currency",
            "description",
            "metadata",
            "quantity",
            "unit_amount",
            "unit_amount_decimal",
            "discountable",
        },
    )
    expand = _check_expand(p.expand(), {"customer", "invoice"})
    st, now = app.state, int(app.clock())
    customer = _get_customer(app, p.text("customer", required=True))
    invoice: JSON | None = None
    invoice_id = p.text("invoice")
    if invoice_id is not None:
        invoice = _get_invoice(app, invoice_id, status=400)
        if invoice["customer"] != customer["id"]:
            raise StripeAPIError(
                400,
                f"The invoice {invoice_id} belongs to customer "
                f"{invoice['customer']}, not {customer['id']}.",
                param="invoice",
            )
        if invoice["status"] != "draft":
            raise StripeAPIError(
                400,
                "You can only add invoice items to draft invoices; "
                f"{invoice_id} is {invoice['status']}.",
                param="invoice",
                code="invoice_not_editable",
            )
        if len(st.invoice_lines[invoice_id]) >= MAX_INVOICE_ITEMS:
            raise StripeAPIError(
                400,
                f"An invoice cannot have more than {MAX_INVOICE_ITEMS} invoice items.",
                param="invoice",
            )
    amount = p.integer("amount")
    quantity = p.integer("quantity", minimum=0)
    unit_amount = p.integer("unit_amount")
    unit_decimal = p.decimal("unit_amount_decimal")
    if amount is not None and (unit_amount is not None or unit_decimal is not None):
        raise StripeAPIError(
            400,
            "You may only specify one of these parameters: amount, "
            "unit_amount, unit_amount_decimal.",
            param="amount",
        )
    if unit_amount is not None and unit_decimal is not None:
        raise StripeAPIError(
            400,
            "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
            param="unit_amount",
        )
    if amount is None and unit_amount is None and unit_decimal is None:
        raise StripeAPIError(
            400,
            "You must specify either `amount`, `unit_amount` or "
            "`unit_amount_decimal` (`price` is not modelled).",
            param="amount",
            code="parameter_missing",
        )
    qty = 1 if quantity is None else quantity
    if amount is not None:
        unit = Decimal(amount) / qty if qty else Decimal(amount)
    else:
        unit = Decimal(unit_amount) if unit_amount is not None else unit_decimal  # type: ignore[assignment]
        amount = int((unit * qty).to_integral_value(rounding=ROUND_HALF_UP))
    if abs(amount) > MAX_AMOUNT:
        raise StripeAPIError(
            400,
            f"Amount must be no more than {MAX_AMOUNT:,}",
            param="amount",
            code="amount_too_large",
        )
    currency = (
        _currency(p.text("currency")) or (invoice or {}).get("currency") or customer["currency"]
    )
    if currency is None:
        raise _missing("currency")
    if invoice is not None and currency != invoice["currency"]:
        raise StripeAPIError(
            400,
            f"The currency of the invoice item ({currency}) must match "
            f"the currency of the invoice ({invoice['currency']}).",
            param="currency",
        )
    unit_text = format(unit.normalize(), "f")
    item_id = st.new_id("ii_")
    discountable = p.boolean("discountable")
    item: JSON = {
        "id": item_id,
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency,
        "customer": customer["id"],
        "date": now,
        "description": p.text("description"),
        "discountable": True if discountable is None else discountable,
        "discounts": [],
        "invoice": None,
        "livemode": False,
        "metadata": p.metadata(),
        "period": {"end": now, "start": now},
        "price": None,
        "proration": False,
        "quantity": qty,
        "subscription": None,
        "tax_rates": [],
        "test_clock": None,
        "unit_amount": int(unit) if unit == unit.to_integral_value() else None,
        "unit_amount_decimal": unit_text,
    }
    if customer["currency"] is None:
        customer["currency"] = currency
    st.invoice_items[item_id] = item
    st.register(item_id, app.clock())
    app.count_created("invoiceitem")
    if invoice is not None:
        _attach_item(app, invoice, item)
    return app.render_item(item, expand)


def retrieve_invoice_item(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/invoiceitems/{invoiceitem}``."""
    p = Params(req.params, set())
    expand = _check_expand(p.expand(), {"customer", "invoice"})
    item_id = req.path_params["invoiceitem"]
    item = app.state.invoice_items.get(item_id)
    if item is None:
        raise _no_such("invoiceitem", item_id)
    return app.render_item(item, expand)


# -- credit notes ----------------------------------------------------------------------------

CREDIT_NOTE_REASONS = ("duplicate", "fraudulent", "order_change", "product_unsatisfactory")


def _credit_note_lines(app: FakeStripeApp, invoice: JSON, p: Params) -> list[JSON]:
    """The ``lines`` of a credit note request, each with its amount in minor units."""
    raw = p.data.get("lines")
    if raw is None or raw == "":
        return []
    items = as_list(raw) if not isinstance(raw, list) else raw
    if items is None:
        raise StripeAPIError(400, "Invalid lines: must be a list", param="lines")
    lines = []
    invoice_lines = {line["id"]: line for line in app.state.invoice_lines[invoice["id"]]}
    for index, item in enumerate(items):
        param = f"lines[{index}]"
        if not isinstance(item, Mapping):
            raise StripeAPIError(400, f"Invalid {param}: must be an object", param=param)
        line = Params(
            item,
            {
                "type",
                "amount",
                "description",
                "invoice_line_item",
                "quantity",
                "unit_amount",
                "unit_amount_decimal",
                "tax_rates",
            },
        )
        kind = line.choice("type", ("custom_line_item", "invoice_line_item"))
        if kind is None:
            raise _missing(f"{param}[type]")
        if kind == "invoice_line_item":
            ref = line.text("invoice_line_item")
            if ref is None or ref not in invoice_lines:
                raise StripeAPIError(
                    400, f"No such invoice line item on {invoice['id']}: {ref}", param=param
                )
            amount = line.integer("amount")
            amount = invoice_lines[ref]["amount"] if amount is None else amount
            description = invoice_lines[ref]["description"]
        else:
            quantity = line.integer("quantity", minimum=1)
            unit = line.integer("unit_amount")
            if unit is None:
                raise StripeAPIError(
                    400,
                    "A custom_line_item needs unit_amount (unit_amount_decimal is not modelled).",
                    param=f"{param}[unit_amount]",
                    code="parameter_missing",
                )
            description = line.text("description")
            if not description:
                raise _missing(f"{param}[description]")
            amount = unit * (quantity or 1)
        if amount <= 0:
            raise StripeAPIError(400, f"Invalid {param}: amount must be positive", param=param)
        lines.append({"type": kind, "amount": amount, "description": description})
    return lines


def create_credit_note(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``POST /v1/credit_notes``: credit a finalized invoice, as the 2023-08-16 API does.

    Open invoice (pre-payment): the total lowers ``amount_due``/``amount_remaining`` (no more
    than is remaining; the invoice is paid once nothing is); refund, credit and out-of-band
    amounts are refused. Paid invoice (post-payment): the total is at most what was paid and not
    credited yet, and ``credit_amount`` (to the customer's balance, applied to their next
    invoice) plus ``out_of_band_amount`` must equal it (refunds are not modelled).
    """
    p = Params(
        req.params,
        {
            "invoice",
            "lines",
            "amount",
            "credit_amount",
            "refund_amount",
            "refund",
            "out_of_band_amount",
            "memo",
            "metadata",
            "reason",
            "effective_at",
        },
    )
    _check_expand(p.expand(), set())
    st, now = app.state, int(app.clock())
    invoice_id = p.text("invoice", required=True) or ""
    invoice = _get_invoice(app, invoice_id, status=400)
    if invoice["status"] not in ("open", "paid"):
        raise StripeAPIError(
            400,
            f"You can only create credit notes for open or paid invoices; {invoice_id} is "
            f"{invoice['status']}.",
            param="invoice",
        )
    lines = _credit_note_lines(app, invoice, p)
    amount = p.integer("amount", minimum=1)
    total = sum(line["amount"] for line in lines) if lines else amount
    if total is None:
        raise StripeAPIError(
            400,
            "You must pass either `lines` or `amount`.",
            param="lines",
            code="parameter_missing",
        )
    if lines and amount is not None and amount != total:
        raise StripeAPIError(
            400, f"amount {amount} does not equal the sum of the lines ({total}).", param="amount"
        )
    credit = p.integer("credit_amount", minimum=0) or 0
    out_of_band = p.integer("out_of_band_amount", minimum=0) or 0
    if p.integer("refund_amount") or p.text("refund"):
        raise StripeAPIError(400, "Refunds are not modelled by the kiki fake.", param="refund")
    customer = st.customers[invoice["customer"]]
    if invoice["status"] == "open":
        kind = "pre_payment"
        if credit or out_of_band:
            raise StripeAPIError(
                400,
                "credit_amount and out_of_band_amount apply to paid invoices only; a credit note "
                "on an open invoice lowers its amount due.",
                param="credit_amount" if credit else "out_of_band_amount",
            )
        if total > invoice["amount_remaining"]:
            raise StripeAPIError(
                400,
                f"The credit note total ({total}) exceeds the invoice's amount remaining "
                f"({invoice['amount_remaining']}).",
                param="amount",
            )
        invoice["amount_due"] -= total
        invoice["amount_remaining"] -= total
        invoice["pre_payment_credit_notes_amount"] += total
        if invoice["amount_remaining"] == 0:
            invoice.update(status="paid", paid=True, next_payment_attempt=None)
            invoice["status_transitions"]["paid_at"] = now
    else:
        kind = "post_payment"
        # A paid invoice may be credited up to its total, less what credit notes took already.
        creditable = (
            invoice["total"]
            - invoice["pre_payment_credit_notes_amount"]
            - invoice["post_payment_credit_notes_amount"]
        )
        if total > creditable:
            raise StripeAPIError(
                400,
                f"The credit note total ({total}) exceeds what is left to credit on the invoice "
                f"({creditable}).",
                param="amount",
            )
        if credit + out_of_band != total:
            raise StripeAPIError(
                400,
                "The sum of refund_amount, credit_amount and out_of_band_amount "
                f"({credit + out_of_band}) must equal the credit note total ({total}).",
                param="credit_amount",
            )
        invoice["post_payment_credit_notes_amount"] += total
        customer["balance"] -= credit
    note_id = st.new_id("cn_")
    count = sum(1 for n in st.credit_notes.values() if n["invoice"] == invoice_id) + 1
    balance_txn = st.new_id("cbtxn_") if credit else None
    note: JSON = {
        "id": note_id,
        "object": "credit_note",
        "amount": total,
        "amount_shipping": 0,
        "created": now,
        "currency": invoice["currency"],
        "customer": invoice["customer"],
        "customer_balance_transaction": balance_txn,
        "discount_amount": 0,
        "discount_amounts": [],
        "effective_at": p.integer("effective_at") or now,
        "invoice": invoice_id,
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": st.new_id("cnli_"),
                    "object": "credit_note_line_item",
                    "amount": line["amount"],
                    "amount_excluding_tax": line["amount"],
                    "description": line["description"],
                    "discount_amount": 0,
                    "discount_amounts": [],
                    "livemode": False,
                    "quantity": 1,
                    "tax_amounts": [],
                    "tax_rates": [],
                    "type": line["type"],
                    "unit_amount": line["amount"],
                    "unit_amount_decimal": str(line["amount"]),
                    "unit_amount_excluding_tax": str(line["amount"]),
                }
                for line in lines
            ],
            "has_more": False,
            "url": f"/v1/credit_notes/{note_id}/lines",
        },
        "livemode": False,
        "memo": p.text("memo"),
        "metadata": p.metadata(),
        "number": f"{invoice['number']}-CN-{count:02d}",
        "out_of_band_amount": out_of_band or None,
        "pdf": f"https://pay.stripe.com/credit_notes/kiki_fake/{note_id}/pdf",
        "reason": p.choice("reason", CREDIT_NOTE_REASONS),
        "refund": None,
        "shipping_cost": None,
        "status": "issued",
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "tax_amounts": [],
        "total": total,
        "total_excluding_tax": total,
        "type": kind,
        "voided_at": None,
    }
    st.credit_notes[note_id] = note
    st.register(note_id, app.clock())
    app.count_created("credit_note")
    return dict(note)


def list_credit_notes(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/credit_notes`` newest first (``invoice``, ``customer`` filters)."""
    p = Params(req.params, {"invoice", "customer", "limit", "starting_after", "ending_before"})
    _check_expand(p.expand(), set())
    st = app.state
    invoice, customer = p.text("invoice"), p.text("customer")
    ids = [
        i
        for i in _newest_first(st, st.credit_notes)
        if (invoice is None or st.credit_notes[i]["invoice"] == invoice)
        and (customer is None or st.credit_notes[i]["customer"] == customer)
    ]
    return _paginate(
        app, ids, p, "/v1/credit_notes", lambda i: dict(st.credit_notes[i]), "credit note"
    )


def retrieve_credit_note(app: FakeStripeApp, req: ProviderRequest) -> JSON:
    """``GET /v1/credit_notes/{id}``."""
    p = Params(req.params, set())
    _check_expand(p.expand(), set())
    note = app.state.credit_notes.get(req.path_params["id"])
    if note is None:
        raise _no_such("credit_note", req.path_params["id"])
    return dict(note)


ROUTES: list[Route] = [
    Route("POST", "/v1/customers", create_customer),
    Route("GET", "/v1/customers", list_customers),
    Route("GET", "/v1/customers/search", search_customers),
    Route("GET", "/v1/customers/{customer}", retrieve_customer),
    Route("POST", "/v1/invoices", create_invoice),
    Route("GET", "/v1/invoices", list_invoices),
    Route("GET", "/v1/invoices/search", search_invoices),
    Route("GET", "/v1/invoices/{invoice}", retrieve_invoice),
    Route("DELETE", "/v1/invoices/{invoice}", delete_invoice),
    Route("GET", "/v1/invoices/{invoice}/lines", list_invoice_lines),
    Route("POST", "/v1/invoices/{invoice}/finalize", finalize_invoice),
    Route("POST", "/v1/invoices/{invoice}/pay", pay_invoice),
    Route("POST", "/v1/invoices/{invoice}/send", send_invoice),
    Route("POST", "/v1/invoices/{invoice}/void", void_invoice),
    Route("POST", "/v1/invoiceitems", create_invoice_item),
    Route("GET", "/v1/invoiceitems/{invoiceitem}", retrieve_invoice_item),
    Route("POST", "/v1/credit_notes", create_credit_note),
    Route("GET", "/v1/credit_notes", list_credit_notes),
    Route("GET", "/v1/credit_notes/{id}", retrieve_credit_note),
]
"""The endpoints the fake implements."""


class FakeStripeApp(FakeProviderApp):
    """Stripe's routes, objects and rules on the provider-independent base, without any HTTP.

    Args:
        rate_limit: requests per second over all ``/v1`` traffic (None: unlimited in bucket
            mode, 100 in window mode).
        burst: token-bucket size (default: ``rate_limit``).
        rate_mode: ``window`` (at most ``rate_limit`` in any sliding second, as Stripe's live
            limit) or ``bucket`` (a token bucket).
        rate_limit_retry_after: send ``Retry-After`` with rate-limit 429s (Stripe does not).
        latency: seconds added to every ``/v1`` request (outside any lock).
        search_lag: objects younger than this are invisible to ``/search`` (Stripe's search is
            not read-after-write).
        spec_check: reject requests that Stripe's OpenAPI spec rejects, with Stripe's messages.
        seed: make ids deterministic.
        key_lifetime: seconds an idempotency key is kept on the fake's clock (default: 24 h).
        clock: wall-clock source for ``created`` and the other timestamps.
    """

    name = "stripe"
    routes = ROUTES
    # NOTE: Stripe reads Idempotency-Key on POST only; on GET and DELETE it is ignored.
    key_methods = frozenset({"POST"})
    default_key_lifetime = KEY_LIFETIME
    fault_type = Fault
    provider_settings = (
        "rate_limit",
        "burst",
        "rate_mode",
        "rate_limit_retry_after",
        "search_lag",
        "spec_check",
    )

    def __init__(
        self,
        *,
        rate_limit: float | None = None,
        burst: float | None = None,
        rate_mode: RateMode = "bucket",
        rate_limit_retry_after: float | None = None,
        latency: float = 0.0,
        search_lag: float = 0.0,
        spec_check: bool = True,
        seed: int | None = None,
        key_lifetime: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(latency=latency, key_lifetime=key_lifetime, clock=clock)
        self.state = FakeStripeState(self.lock, seed)
        self.search_lag = search_lag
        self.spec_check = spec_check
        self.rate_limit_retry_after = rate_limit_retry_after
        self.rate_limit = rate_limit
        self.burst = burst
        self.rate_mode = rate_mode
        self.limiter.set_limits(self._rate_limits())

    def _rate_limits(self) -> RateLimits:
        if self.rate_mode == "window":
            limit = LIVE_RATE_LIMIT if self.rate_limit is None else self.rate_limit
            if limit < 1 or not float(limit).is_integer():
                raise ValueError(f"window mode needs whole requests per second, not {limit}")
            return RateLimits(windows=(Window(int(limit), 1.0, "second"),))
        if self.rate_mode != "bucket":
            raise ValueError(f"rate_mode is window or bucket, not {self.rate_mode!r}")
        if not self.rate_limit:
            return RateLimits()
        return RateLimits(bucket=Bucket(self.rate_limit, self.burst))

    def configure_provider(self, settings: Mapping[str, Any]) -> None:
        """Change ``rate_limit``/``burst``/``rate_mode``/``rate_limit_retry_after``/
        ``search_lag``/``spec_check``.
        """
        for name in ("rate_limit_retry_after", "search_lag", "spec_check"):
            if name in settings:
                setattr(self, name, settings[name])
        if {"rate_limit", "burst", "rate_mode"} & set(settings):
            self.rate_limit = settings.get("rate_limit", self.rate_limit)
            self.burst = settings.get("burst", self.burst)
            self.rate_mode = settings.get("rate_mode", self.rate_mode)
            self.limiter.set_limits(self._rate_limits())

    def provider_config(self) -> JSON:
        """Stripe's settings."""
        limits = self.limiter.limits
        return {
            "rate_mode": self.rate_mode,
            "rate_limit": limits.windows[0].limit if limits.windows else self.rate_limit,
            "burst": limits.bucket.capacity if limits.bucket else None,
            "rate_limit_retry_after": self.rate_limit_retry_after,
            "search_lag": self.search_lag,
            "spec_check": self.spec_check,
        }

    def authenticate(self, request: ProviderRequest) -> str:
        """The API key (idempotency keys are scoped to it)."""
        return _authenticate(request.headers)

    def parse(self, request: ProviderRequest) -> JSON:
        """Check the key's length, decode (and optionally spec-check) query and form body."""
        key = request.idempotency_key
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
            raise StripeAPIError(
                400,
                "Invalid Idempotency-Key: it must be 1 to "
                f"{MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
            )
        method, path, query = request.method, request.path, request.query
        body = request.body
        try:
            params = decode_form(query)
            if method == "POST":
                for name, value in decode_form(body).items():
                    params[name] = value
        except FormDecodeError as exc:
            raise StripeAPIError(400, f"Invalid request: {exc}") from None
        if self.spec_check:
            url = f"{path}?{query}" if query else path
            try:
                _, problems = request_problems(method, url, body if method == "POST" else None)
            except SpecViolation as exc:
                raise StripeAPIError(400, f"Invalid request: {exc}") from None
            if problems:
                raise _problem_error(problems[0])
        return params

    def fingerprint(self, request: ProviderRequest) -> Fingerprint:
        """Method, path and the decoded parameters (their order does not matter)."""
        return (request.method, request.path, json.dumps(request.params, sort_keys=True))

    def stores(self, response: FakeResponse) -> bool:
        """Whether Stripe keeps this result under the idempotency key.

        Kept: successes, card errors (402, raised after the endpoint started) and server errors.
        Not kept: validation errors and other 4xx, and 429 (the client may fix and retry).
        """
        return not response.drop and (
            response.status < 400 or response.status in (402,) or response.status >= 500
        )

    def mark_replay(self, response: FakeResponse, entry: IdempotencyEntry) -> FakeResponse:
        """``Idempotent-Replayed: true`` and the first request's id."""
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Original-Request"] = entry.request_id
        return response

    def idempotency_in_progress(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        """409 ``idempotency_key_in_use``."""
        return StripeAPIError(
            409,
            "There is currently another in-progress request using this Idempotency-Key (that "
            "probably means you submitted twice, and the other request is still going "
            f"through): {request.idempotency_key}. Please try again later.",
            type="idempotency_error",
            code="idempotency_key_in_use",
        ).response()

    def idempotency_mismatch(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        """400 ``idempotency_error``: another endpoint, or other parameters."""
        key = request.idempotency_key
        if entry.fingerprint[:2] != (request.method, request.path):
            message = (
                "Keys for idempotent requests can only be used for the same endpoint they were "
                f"first used for ('{request.path}' vs '{entry.fingerprint[1]}'). Try using a "
                f"key other than '{key}' if you meant to execute a different request."
            )
        else:
            message = (
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request."
            )
        return StripeAPIError(400, message, type="idempotency_error").response()

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        """429 ``rate_limit``, with ``Retry-After`` only if configured (Stripe sends none)."""
        retry_after = self.rate_limit_retry_after
        return StripeAPIError(
            429,
            RATE_LIMIT_MESSAGE,
            code="rate_limit",
            headers=(
                {"Retry-After": _format_seconds(retry_after)} if retry_after is not None else None
            ),
        ).response()

    def render_error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FakeResponse:
        """``api_error`` for 5xx, ``invalid_request_error`` otherwise."""
        kind = "api_error" if status >= 500 else "invalid_request_error"
        return StripeAPIError(status, message, type=kind, code=code, headers=headers).response()

    def render_fault(self, fault: ProviderFault) -> FakeResponse:
        """A fault in Stripe's error shape, with its type, param and decline code."""
        if not isinstance(fault, Fault):
            return super().render_fault(fault)
        return StripeAPIError(
            fault.status,
            fault.message,
            type=fault.error_type,
            code=fault.code,
            param=fault.param,
            decline_code=fault.decline_code,
            headers=fault.headers,
        ).response()

    def unknown_route(self, request: ProviderRequest) -> FakeResponse:
        """Stripe's 404 for an unknown URL."""
        return StripeAPIError(
            404,
            f"Unrecognized request URL ({request.method}: {request.path}). Please see "
            "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        ).response()

    def finish_response(self, request: ProviderRequest, response: FakeResponse) -> None:
        """``Stripe-Version`` on every response; the key echoed on POSTs."""
        version = request.headers.get("stripe-version") or API_VERSION
        response.headers.setdefault("Stripe-Version", version)
        if request.method == "POST" and "idempotency-key" in request.headers:
            response.headers.setdefault("Idempotency-Key", request.headers["idempotency-key"])

    def reset_objects(self) -> None:
        """Forget every Stripe object."""
        self.state.reset()

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> JSON:
        """What the Dashboard (or a customer) does to an invoice, by Stripe's rules.

        ``paid`` (out of band, in full), ``partly_paid`` (``amount`` in major units, or
        half; the invoice stays open), ``payment_failed`` (a failed automatic attempt: open,
        ``attempted``, ``attempt_count`` up), ``uncollectible``, ``void``, ``deleted`` (drafts
        only, as ``DELETE /v1/invoices/{id}``).
        """
        st = self.state
        invoice = st.invoices[invoice_id]
        status, now = invoice["status"], int(self.clock())
        if state == "deleted":
            if status != "draft":
                raise ValueError("Stripe deletes draft invoices only; void this one instead")
            for line in st.invoice_lines.pop(invoice_id):
                st.invoice_items.pop(line["invoice_item"], None)
            del st.invoices[invoice_id]
            return {"id": invoice_id, "object": "invoice", "deleted": True}
        allowed = {
            "paid": ("open", "uncollectible"),
            "partly_paid": ("open",),
            "payment_failed": ("open",),
            "uncollectible": ("open",),
            "void": ("open", "uncollectible"),
        }
        if state not in allowed:
            raise ValueError(f"unknown state {state!r}")
        if status not in allowed[state]:
            raise ValueError(f"a {status} invoice cannot become {state}")
        if state == "paid":
            _mark_paid(self, invoice, out_of_band=True, charge=False)
        elif state == "partly_paid":
            minor = _minor_units(amount, invoice) if amount else invoice["amount_due"] // 2
            if not 0 < minor < invoice["amount_remaining"]:
                raise ValueError("a partial payment is more than nothing and less than the rest")
            invoice["amount_paid"] += minor
            invoice["amount_remaining"] -= minor
        elif state == "payment_failed":
            invoice.update(attempted=True, next_payment_attempt=now + 3 * 86400)
            invoice["attempt_count"] += 1
        elif state == "uncollectible":
            invoice.update(status="uncollectible", next_payment_attempt=None)
            invoice["status_transitions"]["marked_uncollectible_at"] = now
        else:
            invoice.update(status="void", amount_remaining=0, next_payment_attempt=None)
            invoice["status_transitions"]["voided_at"] = now
        return self.render_invoice(invoice, all_lines=True)

    def duplicate_invoice(self, invoice_id: str) -> str:
        """A copy of the invoice (same customer, metadata and lines, its own number)."""
        st = self.state
        source = st.invoices[invoice_id]
        copy_id = st.new_id("in_")
        copied = json.loads(json.dumps(source))
        copied.update(id=copy_id, created=int(self.clock()))
        if source["number"]:
            customer = st.customers[source["customer"]]
            copied["number"] = (
                f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
            )
            customer["next_invoice_sequence"] += 1
        st.invoices[copy_id] = copied
        st.invoice_lines[copy_id] = []
        for line in st.invoice_lines[invoice_id]:
            item = json.loads(json.dumps(st.invoice_items[line["invoice_item"]]))
            item.update(id=st.new_id("ii_"), invoice=copy_id)
            st.invoice_items[item["id"]] = item
            st.register(item["id"], self.clock())
            line_copy = dict(line, id=st.new_id("il_"), invoice_item=item["id"])
            st.invoice_lines[copy_id].append(line_copy)
        st.register(copy_id, self.clock())
        self.count_created("invoice")
        return copy_id

    def snapshot_objects(self) -> JSON:
        """Customers, invoices (with all their lines), invoice items, ``/send`` counts."""
        st = self.state
        return {
            "customers": [st.customers[i] for i in _newest_first(st, st.customers)],
            "invoices": [
                self.render_invoice(st.invoices[i], all_lines=True)
                for i in _newest_first(st, st.invoices)
            ],
            "invoice_items": [st.invoice_items[i] for i in _newest_first(st, st.invoice_items)],
            "credit_notes": [st.credit_notes[i] for i in _newest_first(st, st.credit_notes)],
            "sent": dict(st.sent),
        }

    def render_invoice(
        self, invoice: JSON, *, expand: tuple[str, ...] = (), all_lines: bool = False
    ) -> JSON:
        """An invoice as Stripe returns it: ``lines`` is a list object (first 10 lines)."""
        out = dict(invoice)
        lines = self.state.invoice_lines[invoice["id"]]
        shown = lines if all_lines else lines[:10]
        out["lines"] = {
            "object": "list",
            "data": [dict(line) for line in shown],
            "has_more": len(shown) < len(lines),
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice['id']}/lines",
        }
        if "customer" in expand:
            out["customer"] = self.state.customers[invoice["customer"]]
        return out

    def render_item(self, item: JSON, expand: tuple[str, ...] = ()) -> JSON:
        """An invoice item, optionally with ``customer``/``invoice`` expanded."""
        out = dict(item)
        if "customer" in expand:
            out["customer"] = self.state.customers[item["customer"]]
        if "invoice" in expand and item["invoice"]:
            out["invoice"] = self.render_invoice(self.state.invoices[item["invoice"]])
        return out


class FakeStripe(FakeProvider[FakeStripeApp]):
    """The fake on a background thread, bound to 127.0.0.1 (``port=0``: the OS picks).

    Keyword arguments other than ``port`` and ``verbose`` go to :class:`FakeStripeApp`.
    """

    def __init__(self, *, port: int = 0, verbose: bool = False, **settings: Any) -> None:
        super().__init__(FakeStripeApp(**settings), port=port, verbose=verbose)

    def stripe_client(self, api_key: str = "sk_test_kiki_fake", **kwargs: Any) -> Any:
        """A ``stripe.StripeClient`` aimed at the fake (API 2023-08-16, no retries)."""
        import stripe

        kwargs.setdefault("max_network_retries", 0)
        kwargs.setdefault("stripe_version", API_VERSION)
        return stripe.StripeClient(api_key, base_addresses={"api": self.url}, **kwargs)

    def inject_503(
        self, method: str = "*", path: str = "/v1/", *, times: int = 1, after: bool = False
    ) -> Fault:
        """503; ``after=True``: the operation happened but the response was lost."""
        return self.inject(Fault.service_unavailable(method, path, times=times, after=after))

    def inject_429(
        self,
        method: str = "*",
        path: str = "/v1/",
        *,
        times: int = 1,
        retry_after: float | None = 1,
    ) -> Fault:
        """429 ``rate_limit`` with ``Retry-After`` (None: without)."""
        return self.inject(Fault.rate_limited(method, path, times=times, retry_after=retry_after))

    def inject_500(
        self,
        method: str = "*",
        path: str = "/v1/",
        *,
        times: int = 1,
        should_retry: bool | None = False,
        after: bool = False,
    ) -> Fault:
        """500 with ``Stripe-Should-Retry`` (kept under the idempotency key and replayed)."""
        return self.inject(
            Fault.server_error(method, path, times=times, should_retry=should_retry, after=after)
        )

    def inject_card_error(
        self,
        method: str = "POST",
        path: str = "/v1/invoices/*/pay",
        *,
        times: int = 1,
        code: str = "card_declined",
        decline_code: str | None = "generic_decline",
        message: str = "Your card was declined.",
    ) -> Fault:
        """402 ``card_error`` (kept under the idempotency key)."""
        return self.inject(
            Fault.card_error(
                method, path, times=times, code=code, decline_code=decline_code, message=message
            )
        )

    def inject_invalid_request(
        self,
        method: str = "*",
        path: str = "/v1/",
        *,
        times: int = 1,
        status: int = 400,
        message: str = "Invalid request (injected).",
        code: str | None = None,
        param: str | None = None,
    ) -> Fault:
        """A 4xx ``invalid_request_error`` (not kept)."""
        return self.inject(
            Fault.invalid_request(
                method, path, times=times, status=status, message=message, code=code, param=param
            )
        )


@contextlib.contextmanager
def spawn_fake_stripe(
    *extra_args: str,
    python: str = sys.executable,
    timeout: float = 15.0,
    cwd: str | Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``python -m tests.support.fake_stripe`` and yield ``(url, process)``.

    ``extra_args`` are CLI options (``"--rate-limit", "100"``). The process is stopped by its
    pid (SIGTERM, then SIGKILL) on exit.
    """
    with spawn_fake(
        "tests.support.fake_stripe", *extra_args, python=python, timeout=timeout, cwd=cwd
    ) as spawned:
        yield spawned


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.fake_stripe``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_stripe",
        description="Stripe-compatible fake on 127.0.0.1.",
    )
    common_arguments(parser)
    parser.add_argument(
        "--rate-mode",
        choices=("window", "bucket"),
        default="bucket",
        help="window: at most --rate-limit (default 100) in any sliding second, as Stripe's "
        "live limit; bucket: a token bucket (default)",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="requests per second (default: 100 in window mode, unlimited in bucket mode)",
    )
    parser.add_argument("--burst", type=float, default=None, help="token bucket size")
    parser.add_argument(
        "--retry-after",
        type=float,
        default=None,
        help="send Retry-After on rate-limit 429s (Stripe does not)",
    )
    parser.add_argument(
        "--search-lag", type=float, default=0.0, help="seconds before new objects appear in /search"
    )
    parser.add_argument(
        "--no-spec-check",
        action="store_true",
        help="do not check requests against Stripe's OpenAPI spec",
    )
    parser.add_argument("--seed", type=int, default=None, help="deterministic ids")
    args = parser.parse_args(argv)

    fake = FakeStripe(
        port=args.port,
        verbose=args.verbose,
        rate_limit=args.rate_limit,
        burst=args.burst,
        rate_mode=args.rate_mode,
        rate_limit_retry_after=args.retry_after,
        latency=args.latency,
        key_lifetime=args.key_lifetime,
        search_lag=args.search_lag,
        spec_check=not args.no_spec_check,
        seed=args.seed,
    )
    return serve_until_stopped(fake, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
