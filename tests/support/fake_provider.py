"""The provider-independent half of the local fakes of billing APIs (Stripe, QBO, Xero, Zuora).

A provider fake is two subclasses: an application (:class:`FakeProviderApp`) that holds the
provider's objects and answers its routes without any HTTP, and a server (:class:`FakeProvider`)
that runs it on 127.0.0.1, in a thread or as a process. This module owns what they all share:

- the HTTP server, the ``/_fake/`` control endpoints and the subprocess launcher;
- the idempotency store: the first result per (credential scope, key) is kept and replayed, a
  different request under a kept key is refused, a duplicate while the first still runs is
  "in progress", and keys expire after a lifetime measured on the fake's clock, which tests
  advance instead of sleeping;
- scripted faults for the next N requests matching a method and a path prefix or glob;
- rate limits at least as strict as the provider's: sliding windows, a token bucket and a cap
  on requests in flight, each answered through the provider's 429 hook;
- a record of every request and a count of the objects created, per type;
- a latency added to every request, for benchmarks.

A subclass declares its key source, key lifetime and rate limits as class attributes and
overrides the hooks where the provider differs (authentication, body parsing, the error body,
which results a key keeps, the replay marker, the 429). ``tests/test_support_fake_provider.py``
has a provider in a few dozen lines; ``tests/support/fake_stripe.py`` is a full one.

Control endpoints (no auth; not recorded, not rate limited): ``GET health``, ``GET state``,
``POST reset``, ``GET|POST|DELETE faults``, ``GET|POST config``, ``GET requests?since=N``,
``GET|POST clock`` (``{"advance": seconds}``), all under ``/_fake/``. What happens to an invoice
outside the API (a payment, a void or a delete in the provider's own UI, a copy made by hand):
``POST invoices/mark`` (``{"invoice": id, "state": "paid"|"partly_paid"|"void"|"deleted",
"amount": "12.50"}``) and ``POST invoices/duplicate`` (``{"invoice": id}``), for the fakes that
implement :meth:`FakeProviderApp.mark_invoice` and :meth:`FakeProviderApp.duplicate_invoice`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import http.server
import json
import math
import os
import random
import re
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "Bucket",
    "FakeClock",
    "FakeProvider",
    "FakeProviderApp",
    "FakeResponse",
    "Fault",
    "IdempotencyEntry",
    "IdempotencyStore",
    "ProviderError",
    "ProviderRequest",
    "RateLimiter",
    "RateLimits",
    "RecordedRequest",
    "Rejection",
    "Route",
    "Router",
    "Window",
    "common_arguments",
    "serve_until_stopped",
    "spawn_fake",
]

JSON = dict[str, Any]
CONTROL_PREFIX = "/_fake/"
_ALPHANUM = string.ascii_letters + string.digits
_UNRECORDED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass
class FakeResponse:
    """What the HTTP layer sends: a status and a body, or nothing (``drop``).

    ``body`` is sent as JSON, unless it is ``str`` or ``bytes``: those are sent as they are,
    labelled with ``content_type`` (Zuora's SOAP answers in XML).
    """

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    """Close the connection with a TCP reset instead of answering."""
    content_type: str = "application/json"

    @classmethod
    def dropped(cls) -> FakeResponse:
        """A "connection reset" outcome."""
        return cls(0, None, drop=True)

    def copy(self) -> FakeResponse:
        """A deep copy (a result kept under a key must not change afterwards)."""
        return copy.deepcopy(self)

    def payload(self) -> bytes:
        """The body as sent."""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return (json.dumps(self.body, indent=2) + "\n").encode("utf-8")


class ProviderError(Exception):
    """Raised by hooks and route handlers; the fake answers with :meth:`response`.

    A provider subclasses it to render its own error body.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> FakeResponse:
        """This error as a response (a generic JSON body)."""
        body = {"error": {"status": self.status, "message": self.message, "code": self.code}}
        return FakeResponse(self.status, body, dict(self.headers))


@dataclass(frozen=True)
class Route:
    """``method`` + path ``template`` (``/v1/invoices/{invoice}/pay``) -> handler.

    The handler is called as ``handler(app, request)`` under the app's lock and returns a
    JSON-able result (wrapped by :meth:`FakeProviderApp.respond`) or a :class:`FakeResponse`.
    """

    method: str
    template: str
    handler: Callable[[Any, Any], Any]

    @property
    def pattern(self) -> re.Pattern[str]:
        """The compiled template."""
        return _compile_template(self.template)


_TEMPLATE_CACHE: dict[str, re.Pattern[str]] = {}


def _compile_template(template: str) -> re.Pattern[str]:
    pattern = _TEMPLATE_CACHE.get(template)
    if pattern is None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        pattern = _TEMPLATE_CACHE[template] = re.compile(regex)
    return pattern


class Router:
    """A table of routes; literal segments win over ``{placeholders}``."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: r.template.count("{"))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route and its path parameters, or None."""
        for route in self.routes:
            if route.method != method:
                continue
            found = route.pattern.fullmatch(path)
            if found is not None:
                return route, found.groupdict()
        return None


@dataclass
class ProviderRequest:
    """One API request as the hooks and route handlers see it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    request_id: str
    route: Route | None = None
    path_params: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    scope: str = ""
    """The credential idempotency keys are scoped to (an API key, a realm, a tenant), as
    ``authenticate`` returned it."""
    params: Any = None
    """What :meth:`~FakeProviderApp.parse` made of the query and body."""

    def query_value(self, name: str) -> str | None:
        """The first value of a query parameter."""
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None


@dataclass
class RecordedRequest:
    """One API request the fake received (``/_fake/`` control requests are not recorded)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-case names, without credentials (``Authorization``, ``Cookie``)."""
    body: str
    idempotency_key: str | None
    request_id: str
    route: str | None
    """The route template, or None for an unknown URL."""
    time: float
    """Arrival on the fake's clock."""
    status: int | None = None
    """None while running; 0 when the connection was dropped."""
    replayed: bool = False
    fault: str | None = None
    rate_limited: str | None = None
    """Which limit answered 429 (``concurrency``, ``bucket`` or a window's name)."""


class RequestLog:
    """The recorded requests, in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []

    def append(self, record: RecordedRequest) -> None:
        """Record a request."""
        with self._lock:
            self._records.append(record)

    def since(self, start: int = 0) -> list[RecordedRequest]:
        """A copy of the records from index ``start``."""
        with self._lock:
            return self._records[start:]

    def clear(self) -> None:
        """Forget every record."""
        with self._lock:
            self._records.clear()


class FakeClock:
    """The fake's time: a source (the wall clock by default) plus an offset tests advance.

    Key lifetimes, rate-limit windows and the provider's timestamps all read it, so advancing
    it expires keys and empties windows without sleeping.
    """

    def __init__(self, source: Callable[[], float] = time.time) -> None:
        self._source = source
        self._lock = threading.Lock()
        self.offset = 0.0

    def __call__(self) -> float:
        return self._source() + self.offset

    def advance(self, seconds: float) -> float:
        """Move the clock forward; returns the new time."""
        if not seconds >= 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self.offset += seconds
        return self()

    def reset(self) -> None:
        """Drop the offset."""
        with self._lock:
            self.offset = 0.0

    def to_json(self) -> JSON:
        """``{"now", "offset"}``."""
        return {"now": self(), "offset": self.offset}


Fingerprint = tuple[str, ...]
KeyOutcome = Literal["new", "replay", "in_progress", "mismatch"]


@dataclass
class IdempotencyEntry:
    """What a key holds: the first request's fingerprint and, once it finished, its result."""

    fingerprint: Fingerprint
    request_id: str
    created: float
    response: FakeResponse | None = None
    """None while the first request is in flight."""


class IdempotencyStore:
    """The first result per ``(scope, key)``, kept ``lifetime`` seconds of the fake's clock.

    Args:
        clock: the fake's clock.
        lifetime: seconds a finished key is kept (``math.inf``: forever).
    """

    def __init__(self, clock: FakeClock, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], IdempotencyEntry] = {}
        self.expired = 0
        """Keys forgotten because their lifetime ran out."""

    def _is_expired(self, entry: IdempotencyEntry, now: float) -> bool:
        return entry.response is not None and now - entry.created >= self.lifetime

    def begin(
        self, scope: tuple[str, str], fingerprint: Fingerprint, request_id: str
    ) -> tuple[KeyOutcome, IdempotencyEntry]:
        """Take a free (or expired) key, or say why not: replay, in progress or mismatch."""
        with self._lock:
            now = self.clock()
            entry = self._entries.get(scope)
            if entry is not None and self._is_expired(entry, now):
                del self._entries[scope]
                self.expired += 1
                entry = None
            if entry is None:
                entry = self._entries[scope] = IdempotencyEntry(fingerprint, request_id, now)
                return "new", entry
            if entry.response is None:
                return "in_progress", entry
            if entry.fingerprint != fingerprint:
                return "mismatch", entry
            return "replay", entry

    def finish(
        self, scope: tuple[str, str], entry: IdempotencyEntry, result: FakeResponse | None
    ) -> None:
        """Keep ``result`` under the key, or (None) release the key for a retry."""
        with self._lock:
            if result is not None:
                entry.response = result.copy()
            elif self._entries.get(scope) is entry:
                del self._entries[scope]

    def __len__(self) -> int:
        """The keys held now (expired ones are dropped first)."""
        with self._lock:
            now = self.clock()
            for scope, entry in list(self._entries.items()):
                if self._is_expired(entry, now):
                    del self._entries[scope]
                    self.expired += 1
            return len(self._entries)

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            self._entries.clear()
            self.expired = 0


FaultKind = Literal["error", "drop", "delay"]


@dataclass
class Fault:
    """A fault applied to the next ``times`` requests whose method and path match.

    ``path`` is a prefix (``/v1/invoices`` also matches ``/v1/invoices/in_1/pay``), or an
    ``fnmatch`` glob if it contains ``*`` (``/v1/invoices/*/pay``). ``method`` ``*`` matches all.

    ``after=False`` fails the request before the operation runs; ``after=True`` runs the
    operation (and keeps its result under the idempotency key), then fails the response. A
    ``drop`` after the operation is a lost response: the work is done, the client sees a reset.

    An ``error`` is rendered by the provider's :meth:`~FakeProviderApp.render_fault`. ``store``
    decides whether it is kept under the idempotency key; by default it is not (it models a
    proxy or a throttle in front of the provider); a provider may say otherwise in
    :meth:`stored`.
    """

    kind: FaultKind = "error"
    method: str = "*"
    path: str = "/"
    times: int = 1
    after: bool = False
    status: int = 503
    message: str = "Service unavailable (injected by the kiki fake)."
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    store: bool | None = None
    seconds: float = 0.0
    """For ``delay``: how long to hold the request (its idempotency key stays in flight)."""
    id: int = 0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        if self.method != "*" and self.method.upper() != method.upper():
            return False
        if "*" in self.path:
            return fnmatch.fnmatchcase(path, self.path)
        return path.startswith(self.path)

    def stored(self) -> bool:
        """Whether an ``error`` fault's response is kept under the idempotency key."""
        return bool(self.store)

    @property
    def label(self) -> str:
        """``503``, ``drop:after``, ``delay``: how the request record names it."""
        name = str(self.status) if self.kind == "error" else self.kind
        return name + (":after" if self.after else "")

    def to_json(self) -> JSON:
        """A JSON-friendly description."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Build a fault from ``/_fake/faults`` JSON: field names, or a ``preset`` plus its
        arguments (``{"preset": "lost", "path": "/v1/invoices"}``).
        """
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is None:
            settable = {f.name for f in dataclasses.fields(cls)} - {"id", "hits"}
            unknown = set(data) - settable
            if unknown:
                raise ValueError(f"unknown fault fields: {sorted(unknown)}")
            return cls(**data)
        builders = cls.presets()
        if str(preset) not in builders:
            raise ValueError(f"unknown preset {preset!r}; one of {list(builders)}")
        if {"id", "hits", "kind"} & set(data):
            raise ValueError("a preset sets its own kind; id and hits are the fake's")
        return builders[str(preset)](**data)

    @classmethod
    def presets(cls) -> dict[str, Callable[..., Self]]:
        """The named builders ``from_json`` accepts (a provider adds its own)."""
        return {
            "error": cls.error,
            "drop": cls.connection_drop,
            "lost": cls.lost_response,
            "delay": cls.delay,
        }

    @classmethod
    def _build(cls, kind: FaultKind, method: str, path: str | None, **kw: Any) -> Self:
        if path is not None:
            kw["path"] = path
        return cls(kind=kind, method=method, **kw)

    @classmethod
    def error(
        cls, method: str = "*", path: str | None = None, *, status: int = 503, **kw: Any
    ) -> Self:
        """An error status, rendered by the provider (not kept unless ``store=True``)."""
        return cls._build("error", method, path, status=status, **kw)

    @classmethod
    def connection_drop(cls, method: str = "*", path: str | None = None, **kw: Any) -> Self:
        """Reset the connection without a response (``after=True``: once the work is done)."""
        return cls._build("drop", method, path, **kw)

    @classmethod
    def lost_response(cls, method: str = "*", path: str | None = None, **kw: Any) -> Self:
        """Run the operation, keep its result under the key, then reset the connection."""
        return cls._build("drop", method, path, after=True, **kw)

    @classmethod
    def delay(
        cls, method: str = "*", path: str | None = None, *, seconds: float = 1.0, **kw: Any
    ) -> Self:
        """Hold the request ``seconds`` (``after=True``: after the work, before responding)."""
        return cls._build("delay", method, path, seconds=seconds, **kw)


FaultT = TypeVar("FaultT", bound=Fault)


class FaultQueue:
    """Queued faults, matched in the order they were added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ids = 0

    def add(self, fault: FaultT) -> FaultT:
        """Queue a fault; returns it (``hits``/``times`` show its use)."""
        if fault.kind not in ("error", "drop", "delay"):
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._ids += 1
            fault.id = self._ids
            self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """Consume one use of the first fault that matches, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def queued(self) -> list[Fault]:
        """The faults still queued."""
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()


@dataclass(frozen=True)
class Window:
    """At most ``limit`` requests in any interval of ``seconds`` (both ends included)."""

    limit: int
    seconds: float
    name: str = ""
    """What the 429 calls it (Xero's ``X-Rate-Limit-Problem``: ``minute``, ``day``)."""

    def __post_init__(self) -> None:
        if self.limit < 1 or not self.seconds > 0:
            raise ValueError(f"a window needs limit >= 1 and seconds > 0, not {self}")


@dataclass(frozen=True)
class Bucket:
    """A token bucket: ``rate`` requests per second, bursts up to ``burst`` (default: rate)."""

    rate: float
    burst: float | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("rate must be positive")

    @property
    def capacity(self) -> float:
        """The bucket size."""
        return float(self.burst if self.burst is not None else max(1.0, self.rate))


@dataclass(frozen=True)
class RateLimits:
    """What a fake admits; every limit applies at once, and an empty one admits everything.

    ``count_rejected``: a rejected request still takes its place in the windows, so a client
    that keeps knocking stays throttled (False: only admitted requests count).
    """

    windows: tuple[Window, ...] = ()
    bucket: Bucket | None = None
    concurrency: int | None = None
    """Requests in flight at once."""
    count_rejected: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")

    def to_json(self) -> JSON:
        """``{"windows": [{"limit", "seconds", "name"}], "bucket", "concurrency", ...}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RateLimits:
        """The inverse of :meth:`to_json` (windows also as ``[limit, seconds, name?]``)."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown rate limit fields: {sorted(unknown)}")
        windows = tuple(
            Window(**w) if isinstance(w, Mapping) else Window(*w) for w in data.get("windows", ())
        )
        bucket = data.get("bucket")
        return cls(
            windows=windows,
            bucket=Bucket(**bucket) if isinstance(bucket, Mapping) else None,
            concurrency=data.get("concurrency"),
            count_rejected=bool(data.get("count_rejected", True)),
        )


@dataclass(frozen=True)
class Rejection:
    """Why the limiter answered 429, and when a retry could first be admitted."""

    reason: Literal["window", "bucket", "concurrency"]
    retry_after: float
    window: Window | None = None

    @property
    def problem(self) -> str:
        """The window's name, or the reason."""
        return (self.window.name if self.window else "") or self.reason


@dataclass(frozen=True)
class Admission:
    """The limiter's answer, at the time of arrival on the fake's clock."""

    time: float
    rejection: Rejection | None = None


class _WindowLog:
    def __init__(self, window: Window) -> None:
        self.window = window
        self.entries: deque[tuple[float, bool]] = deque()
        """(arrival, admitted), oldest first."""
        self.admitted = 0
        self.max_admitted = 0
        """The most admitted requests seen in one window."""

    def prune(self, now: float) -> None:
        horizon = now - self.window.seconds
        while self.entries and self.entries[0][0] < horizon:
            _, admitted = self.entries.popleft()
            self.admitted -= admitted

    def retry_after(self, now: float) -> float:
        excess = len(self.entries) - self.window.limit
        return max(0.0, self.entries[excess][0] + self.window.seconds - now)

    def add(self, now: float, admitted: bool) -> None:
        self.entries.append((now, admitted))
        if admitted:
            self.admitted += 1
            self.max_admitted = max(self.max_admitted, self.admitted)


class RateLimiter:
    """Applies :class:`RateLimits` at the arrival of each request; thread-safe.

    Counters: requests received, admitted and rejected (by reason), in flight now and at most,
    and per window the most requests admitted within it.
    """

    def __init__(self, limits: RateLimits, clock: FakeClock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.in_flight = 0
        self.set_limits(limits)

    def set_limits(self, limits: RateLimits) -> None:
        """Replace the limits (windows and counters start afresh; in-flight requests stay)."""
        with self._lock:
            self.limits = limits
            self._logs = [_WindowLog(w) for w in limits.windows]
            self._tokens = limits.bucket.capacity if limits.bucket else 0.0
            self._refilled = self.clock()
            self.received = self.admitted = self.max_in_flight = 0
            self.rejected: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget every window entry and counter."""
        self.set_limits(self.limits)

    def admit(self) -> Admission:
        """Decide on a request arriving now; an admitted one must be :meth:`release`d."""
        with self._lock:
            now = self.clock()
            self.received += 1
            for log in self._logs:
                log.prune(now)
            rejection = self._check(now)
            counted = rejection is None or self.limits.count_rejected
            for log in self._logs if counted else ():
                log.add(now, admitted=rejection is None)
            if rejection is not None:
                self.rejected[rejection.problem] += 1
                return Admission(now, rejection)
            self.admitted += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return Admission(now)

    def _check(self, now: float) -> Rejection | None:
        cap = self.limits.concurrency
        if cap is not None and self.in_flight >= cap:
            return Rejection("concurrency", 1.0)
        for log in self._logs:
            if len(log.entries) >= log.window.limit:
                return Rejection("window", log.retry_after(now), log.window)
        bucket = self.limits.bucket
        if bucket is not None:
            self._tokens = min(
                bucket.capacity, self._tokens + max(0.0, now - self._refilled) * bucket.rate
            )
            self._refilled = now
            if self._tokens < 1.0:
                return Rejection("bucket", (1.0 - self._tokens) / bucket.rate)
            self._tokens -= 1.0
        return None

    def release(self) -> None:
        """An admitted request has been answered."""
        with self._lock:
            self.in_flight -= 1

    def stats(self) -> JSON:
        """The limits and the counters."""
        with self._lock:
            return {
                "limits": self.limits.to_json(),
                "received": self.received,
                "admitted": self.admitted,
                "rejected": sum(self.rejected.values()),
                "rejected_by": dict(self.rejected),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "windows": [
                    {**dataclasses.asdict(log.window), "max_in_window": log.max_admitted}
                    for log in self._logs
                ],
            }


class FakeProviderApp:
    """Request handling common to every provider fake, without any HTTP.

    A subclass declares ``routes`` and the class attributes below and overrides the hooks it
    needs. Handlers and snapshot hooks run under :attr:`lock`; sleeps (latency, delay faults)
    never hold it.

    Args:
        latency: seconds added to every API request (before it runs, holding no lock).
        key_lifetime: seconds an idempotency key is kept (None: ``default_key_lifetime``;
            ``math.inf``: forever).
        rate_limits: what the fake admits (None: ``default_rate_limits``).
        clock: the time source under the fake's clock (wall clock by default).
    """

    name: ClassVar[str] = "provider"
    routes: ClassVar[Sequence[Route]] = ()
    key_header: ClassVar[str | None] = "Idempotency-Key"
    """The request header that carries the idempotency key (None: no header)."""
    key_query_param: ClassVar[str | None] = None
    """Or the query parameter that does (QuickBooks: ``requestid``)."""
    key_methods: ClassVar[frozenset[str]] = frozenset({"POST", "PUT", "PATCH"})
    """Methods whose key is honoured; on others it is ignored."""
    default_key_lifetime: ClassVar[float] = math.inf
    default_rate_limits: ClassVar[RateLimits] = RateLimits()
    request_id_header: ClassVar[str] = "Request-Id"
    fault_type: ClassVar[type[Fault]] = Fault
    """What ``/_fake/faults`` builds (a provider's subclass adds presets)."""
    provider_settings: ClassVar[tuple[str, ...]] = ()
    """The provider's names accepted by :meth:`configure`."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        key_lifetime: float | None = None,
        rate_limits: RateLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = FakeClock(clock)
        self.latency = latency
        self.router = Router(self.routes)
        self.idempotency = IdempotencyStore(
            self.clock, self.default_key_lifetime if key_lifetime is None else key_lifetime
        )
        self.limiter = RateLimiter(
            self.default_rate_limits if rate_limits is None else rate_limits, self.clock
        )
        self.faults = FaultQueue()
        self.log = RequestLog()
        self.objects_created: Counter[str] = Counter()
        self.base_url = "http://127.0.0.1"

    def authenticate(self, request: ProviderRequest) -> str:
        """Check the credentials; return the scope idempotency keys live in, or raise 401."""
        return ""

    def parse(self, request: ProviderRequest) -> Any:
        """Decode and check the query and body (raise :class:`ProviderError` for a 400)."""
        if not request.body.strip():
            return {}
        try:
            return json.loads(request.body)
        except ValueError:
            raise ProviderError(400, "The body is not JSON.") from None

    def idempotency_key(self, request: ProviderRequest) -> str | None:
        """The request's key from ``key_header`` or ``key_query_param`` (None: no key)."""
        if request.method not in self.key_methods:
            return None
        if self.key_header is not None:
            value = request.headers.get(self.key_header.lower())
            if value is not None:
                return value
        if self.key_query_param is not None:
            return request.query_value(self.key_query_param)
        return None

    def fingerprint(self, request: ProviderRequest) -> Fingerprint:
        """What must be equal for a key to be replayed (default: method, path, body digest)."""
        return (request.method, request.path, hashlib.sha256(request.body).hexdigest())

    def stores(self, response: FakeResponse) -> bool:
        """Whether a result is kept under its key (default: all but drops and 4xx)."""
        return not response.drop and not 400 <= response.status < 500

    def mark_replay(self, response: FakeResponse, entry: IdempotencyEntry) -> FakeResponse:
        """Mark a replayed result (Stripe: ``Idempotent-Replayed: true``)."""
        return response

    def idempotency_mismatch(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        """The answer to a kept key sent with another request."""
        return self.render_error(
            422, "This idempotency key was used with a different request.", code="idempotency"
        )

    def idempotency_in_progress(
        self, request: ProviderRequest, entry: IdempotencyEntry
    ) -> FakeResponse:
        """The answer to a key whose first request is still running."""
        return self.render_error(
            409, "A request with this idempotency key is in progress.", code="idempotency"
        )

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        """The 429 for a request the limits reject."""
        return self.render_error(
            429,
            f"Rate limit exceeded ({rejection.problem}).",
            code="rate_limit",
            headers={"Retry-After": str(max(1, math.ceil(rejection.retry_after)))},
        )

    def render_error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FakeResponse:
        """The provider's error body for an error the fake itself produces."""
        return ProviderError(status, message, code=code, headers=headers).response()

    def render_fault(self, fault: Fault) -> FakeResponse:
        """The response of an ``error`` fault."""
        return self.render_error(
            fault.status, fault.message, code=fault.code, headers=fault.headers
        )

    def unknown_route(self, request: ProviderRequest) -> FakeResponse:
        """The answer to a method and path no route matches."""
        return self.render_error(
            404, f"Unrecognized request URL ({request.method}: {request.path})"
        )

    def respond(self, request: ProviderRequest, result: Any) -> FakeResponse:
        """Wrap a handler's result (default: 200 JSON)."""
        return result if isinstance(result, FakeResponse) else FakeResponse(200, result)

    def finish_response(self, request: ProviderRequest, response: FakeResponse) -> None:
        """Add the provider's headers to every API response."""

    def new_request_id(self) -> str:
        """An id for the request-id header."""
        return "req_" + "".join(random.choices(_ALPHANUM, k=14))

    def snapshot_objects(self) -> JSON:
        """The provider's objects for ``/_fake/state`` (called under :attr:`lock`)."""
        return {}

    def reset_objects(self) -> None:
        """Forget the provider's objects (called under :attr:`lock`)."""

    def provider_config(self) -> JSON:
        """The provider's settings for ``/_fake/config``."""
        return {}

    def configure_provider(self, settings: Mapping[str, Any]) -> None:
        """Apply the provider's settings (names from ``provider_settings``)."""

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> JSON:
        """Change an invoice as the provider's UI would (called under :attr:`lock`).

        ``state``: ``paid`` (in full), ``partly_paid`` (``amount``, in the currency's major
        unit; default: half the total), ``void`` or ``deleted``. Returns the invoice as stored
        (``{"deleted": true}`` once deleted).

        Raises:
            KeyError: No such invoice.
            ValueError: A state the provider does not allow from the invoice's current one.
        """
        raise NotImplementedError(f"the {self.name} fake cannot mark invoices")

    def duplicate_invoice(self, invoice_id: str) -> str:
        """Copy an invoice, number, metadata and lines included, as someone outside the API
        would (by hand, or a run whose ledger was lost); returns the copy's id.

        Raises:
            KeyError: No such invoice.
        """
        raise NotImplementedError(f"the {self.name} fake cannot copy invoices")

    def writes_since(self, start: int = 0) -> list[RecordedRequest]:
        """The recorded requests from index ``start`` that may change something upstream.

        Default: every method but GET and HEAD; a provider whose reads are POSTs (a query
        endpoint, SOAP) says which requests are reads.
        """
        return [r for r in self.log.since(start) if r.method not in ("GET", "HEAD")]

    def count_created(self, kind: str) -> None:
        """Count a new object of ``kind`` (shown as ``objects_created`` in the state)."""
        with self.lock:
            self.objects_created[kind] += 1

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        """Answer one HTTP request (``headers`` keys are matched case-insensitively)."""
        parts = urlsplit(target)
        request = ProviderRequest(
            method.upper(),
            parts.path,
            parts.query,
            {k.lower(): v for k, v in headers.items()},
            body,
            self.new_request_id(),
        )
        if parts.path.startswith(CONTROL_PREFIX):
            response = self._control(request)
        else:
            response = self._serve(request)
            self.finish_response(request, response)
        response.headers.setdefault(self.request_id_header, request.request_id)
        return response

    def _serve(self, request: ProviderRequest) -> FakeResponse:
        """Admit, record, wait out the latency, then run the request."""
        matched = self.router.match(request.method, request.path)
        if matched is not None:
            request.route, request.path_params = matched
        request.idempotency_key = self.idempotency_key(request)
        admission = self.limiter.admit()
        record = RecordedRequest(
            request.method,
            request.path,
            request.query,
            {k: v for k, v in request.headers.items() if k not in _UNRECORDED_HEADERS},
            request.body.decode("utf-8", errors="replace"),
            request.idempotency_key,
            request.request_id,
            request.route.template if request.route else None,
            admission.time,
        )
        self.log.append(record)
        try:
            if self.latency > 0:
                time.sleep(self.latency)
            if admission.rejection is not None:
                record.rate_limited = admission.rejection.problem
                response = self.rate_limited(request, admission.rejection)
            else:
                response = self._run(request, record)
        except ProviderError as exc:
            response = exc.response()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            response = self._internal_error()
        finally:
            if admission.rejection is None:
                self.limiter.release()
        record.status = 0 if response.drop else response.status
        return response

    def _run(self, request: ProviderRequest, record: RecordedRequest) -> FakeResponse:
        """Auth, route, parse, faults, idempotency, then the operation."""
        request.scope = self.authenticate(request)
        if request.route is None:
            return self.unknown_route(request)
        request.params = self.parse(request)

        fault = self.faults.take(request.method, request.path)
        if fault is not None:
            record.fault = fault.label
            if not fault.after and fault.kind == "drop":
                return FakeResponse.dropped()
            if not fault.after and fault.kind == "error" and not fault.stored():
                return self.render_fault(fault)

        key = request.idempotency_key
        scope = (request.scope, key) if key is not None else None
        entry: IdempotencyEntry | None = None
        if scope is not None:
            outcome, entry = self.idempotency.begin(
                scope, self.fingerprint(request), request.request_id
            )
            if outcome == "in_progress":
                return self.idempotency_in_progress(request, entry)
            if outcome == "mismatch":
                return self.idempotency_mismatch(request, entry)
            if outcome == "replay" and entry.response is not None:
                record.replayed = True
                if fault is not None and fault.after and fault.kind == "drop":
                    return FakeResponse.dropped()
                if fault is not None and fault.after and fault.kind == "error":
                    return self.render_fault(fault)
                return self.mark_replay(entry.response.copy(), entry)

        kept: FakeResponse | None = None
        try:
            if fault is not None and fault.kind == "delay" and not fault.after:
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "error" and not fault.after:
                result = self.render_fault(fault)  # a kept fault: the operation started, failed
            else:
                result = self.execute(request)
            sent = result
            if fault is not None and fault.after:
                if fault.kind == "drop":
                    sent = FakeResponse.dropped()
                elif fault.kind == "error":
                    sent = self.render_fault(fault)
                    if fault.stored():
                        result = sent
            kept = result if self.stores(result) else None
        finally:
            if scope is not None and entry is not None:
                self.idempotency.finish(scope, entry, kept)
        if fault is not None and fault.kind == "delay" and fault.after:
            time.sleep(fault.seconds)
        return sent

    def execute(self, request: ProviderRequest) -> FakeResponse:
        """Run the route's handler under the lock; an unexpected exception becomes a 500."""
        if request.route is None:
            return self.unknown_route(request)
        try:
            with self.lock:
                result = request.route.handler(self, request)
            return self.respond(request, result)
        except ProviderError as exc:
            return exc.response()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            return self._internal_error()

    def _internal_error(self) -> FakeResponse:
        return self.render_error(
            500, "An unknown error occurred in the kiki fake (see its stderr)."
        )

    def configure(self, **settings: Any) -> None:
        """Change ``latency``, ``key_lifetime``, ``rate_limits`` or a provider setting."""
        unknown = set(settings) - {"latency", "key_lifetime", "rate_limits"}
        unknown -= set(self.provider_settings)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if "latency" in settings:
            self.latency = float(settings["latency"])
        if "key_lifetime" in settings:
            lifetime = settings["key_lifetime"]
            self.idempotency.lifetime = (
                self.default_key_lifetime if lifetime is None else float(lifetime)
            )
        if "rate_limits" in settings:
            limits = settings["rate_limits"]
            if not isinstance(limits, RateLimits):
                limits = RateLimits.from_json(limits or {})
            self.limiter.set_limits(limits)
        self.configure_provider({k: v for k, v in settings.items() if k in self.provider_settings})

    def config(self) -> JSON:
        """The current settings (``key_lifetime`` null: keys never expire)."""
        lifetime = self.idempotency.lifetime
        return {
            "latency": self.latency,
            "key_lifetime": lifetime if math.isfinite(lifetime) else None,
            "rate_limits": self.limiter.limits.to_json(),
            **self.provider_config(),
        }

    def reset(self) -> None:
        """Forget objects, keys, requests, faults, counters and the clock offset."""
        with self.lock:
            self.faults.clear()
            self.log.clear()
            self.idempotency.clear()
            self.clock.reset()
            self.limiter.reset()
            self.objects_created.clear()
            self.reset_objects()

    def snapshot(self) -> JSON:
        """Everything, as JSON: the provider's objects, requests, keys, faults, counters."""
        records = self.log.since(0)
        with self.lock:
            objects = self.snapshot_objects()
            created = dict(self.objects_created)
        state = {
            **objects,
            "objects_created": created,
            "requests": [dataclasses.asdict(r) for r in records],
            "request_log": [[r.method, r.path, r.idempotency_key] for r in records],
            "requests_by_path": dict(Counter(f"{r.method} {r.path}" for r in records)),
            "requests_by_route": dict(Counter(f"{r.method} {r.route or r.path}" for r in records)),
            "idempotency_keys": len(self.idempotency),
            "faults": [f.to_json() for f in self.faults.queued()],
            "rate_limits": self.limiter.stats(),
            "clock": self.clock.to_json(),
            "config": self.config(),
        }
        copied: JSON = json.loads(json.dumps(state))
        return copied

    def _control(self, request: ProviderRequest) -> FakeResponse:
        try:
            payload: Any = json.loads(request.body) if request.body.strip() else {}
        except ValueError:
            return FakeResponse(400, {"error": "body must be JSON"})
        method, name = request.method, request.path.removeprefix(CONTROL_PREFIX)
        try:
            if (method, name) == ("GET", "health"):
                return FakeResponse(200, {"ok": True, "url": self.base_url})
            if (method, name) == ("GET", "state"):
                return FakeResponse(200, self.snapshot())
            if (method, name) == ("POST", "reset"):
                self.reset()
                return FakeResponse(200, {"ok": True})
            if name == "faults" and method in ("GET", "POST", "DELETE"):
                if method == "POST":
                    items = payload if isinstance(payload, list) else [payload]
                    added = [self.faults.add(self.fault_type.from_json(i)) for i in items]
                    return FakeResponse(200, {"faults": [f.to_json() for f in added]})
                if method == "DELETE":
                    self.faults.clear()
                return FakeResponse(200, {"faults": [f.to_json() for f in self.faults.queued()]})
            if name == "config" and method in ("GET", "POST"):
                if method == "POST":
                    self.configure(**payload)
                return FakeResponse(200, self.config())
            if (method, name) == ("GET", "requests"):
                start = int(request.query_value("since") or 0)
                records = [dataclasses.asdict(r) for r in self.log.since(start)]
                return FakeResponse(200, {"requests": records})
            if name == "clock" and method in ("GET", "POST"):
                if method == "POST":
                    self.clock.advance(float(payload.get("advance", 0)))
                return FakeResponse(200, self.clock.to_json())
            if (method, name) == ("POST", "invoices/mark"):
                with self.lock:
                    marked = self.mark_invoice(
                        str(payload["invoice"]), str(payload["state"]), payload.get("amount")
                    )
                    return FakeResponse(200, json.loads(json.dumps(marked, default=str)))
            if (method, name) == ("POST", "invoices/duplicate"):
                with self.lock:
                    copied = self.duplicate_invoice(str(payload["invoice"]))
                return FakeResponse(200, {"id": copied})
        except NotImplementedError as exc:
            return FakeResponse(404, {"error": str(exc)})
        except KeyError as exc:
            return FakeResponse(404, {"error": f"no such invoice or field: {exc}"})
        except (TypeError, ValueError) as exc:
            return FakeResponse(400, {"error": str(exc)})
        return FakeResponse(404, {"error": f"no control endpoint {method} {request.path}"})


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: FakeProviderApp, verbose: bool) -> None:
        self.app = app
        self.verbose = verbose
        super().__init__(address, _RequestHandler)


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    """Headers and body go out in separate writes; with Nagle on, delayed ACKs add ~40 ms."""
    server: _HTTPServer

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_GET

    def _handle(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send(self.server.app.render_error(400, "Send a Content-Length."))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            # The client went away mid-request (killed while sending its body). A real server
            # never runs a truncated request; running it would keep its cut-short parameters
            # under the idempotency key and refuse the complete request sent again later.
            self.close_connection = True
            return
        response = self.server.app.handle(self.command, self.path, dict(self.headers.items()), body)
        try:
            if response.drop:
                self._reset_connection()
            else:
                self._send(response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client is gone; nothing to answer

    def _send(self, response: FakeResponse) -> None:
        payload = response.payload()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-cache, no-store")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0 so the client sees a TCP reset and no response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


AppT = TypeVar("AppT", bound=FakeProviderApp)


class FakeProvider(Generic[AppT]):
    """A fake's app served on a background thread, bound to 127.0.0.1 (``port=0``: any port)."""

    def __init__(self, app: AppT, *, port: int = 0, verbose: bool = False) -> None:
        self.app = app
        self._port = port
        self._verbose = verbose
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = _HTTPServer(("127.0.0.1", self._port), self.app, self._verbose)
        self.app.base_url = self.url
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"fake-{self.app.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> JSON:
        """Same as ``GET /_fake/state``."""
        return self.app.snapshot()

    def reset(self) -> None:
        """Forget objects, keys, requests, faults and counters (settings stay)."""
        self.app.reset()

    def configure(self, **settings: Any) -> None:
        """Same as ``POST /_fake/config``."""
        self.app.configure(**settings)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded API requests."""
        return self.app.log.since(0)

    def advance_clock(self, seconds: float) -> float:
        """Move the fake's clock forward (keys expire, windows empty); returns the new time."""
        return self.app.clock.advance(seconds)

    def rate_limit_stats(self) -> JSON:
        """The limiter's counters (as ``state()["rate_limits"]``)."""
        return self.app.limiter.stats()

    def inject(self, fault: FaultT) -> FaultT:
        """Queue any :class:`Fault`; returns it (``hits``/``times`` show its use)."""
        return self.app.faults.add(fault)

    def inject_error(
        self,
        method: str = "*",
        path: str | None = None,
        *,
        status: int = 503,
        times: int = 1,
        after: bool = False,
        **kw: Any,
    ) -> Fault:
        """An error status in the provider's error body."""
        fault = self.app.fault_type.error(
            method, path, status=status, times=times, after=after, **kw
        )
        return self.inject(fault)

    def inject_drop(
        self, method: str = "*", path: str | None = None, *, times: int = 1, after: bool = False
    ) -> Fault:
        """Reset the connection; ``after=True``: after the operation ran."""
        return self.inject(
            self.app.fault_type.connection_drop(method, path, times=times, after=after)
        )

    def inject_lost_response(
        self, method: str = "*", path: str | None = None, *, times: int = 1
    ) -> Fault:
        """Run the operation, keep its result under the key, reset the connection."""
        return self.inject(self.app.fault_type.lost_response(method, path, times=times))

    def inject_delay(
        self,
        method: str = "*",
        path: str | None = None,
        *,
        seconds: float,
        times: int = 1,
        after: bool = False,
    ) -> Fault:
        """Hold the request ``seconds``.

        ``after=False``: before the operation, with its idempotency key in flight (a second
        request with the key is "in progress"). ``after=True``: after the result is kept (a
        retry with the key gets the replay), e.g. to make a client time out on a done operation.
        """
        fault = self.app.fault_type.delay(method, path, seconds=seconds, times=times, after=after)
        return self.inject(fault)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self.app.faults.clear()

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> JSON:
        """Same as ``POST /_fake/invoices/mark`` (see :meth:`FakeProviderApp.mark_invoice`)."""
        with self.app.lock:
            return self.app.mark_invoice(invoice_id, state, amount)

    def duplicate_invoice(self, invoice_id: str) -> str:
        """Same as ``POST /_fake/invoices/duplicate``; the copy's id."""
        with self.app.lock:
            return self.app.duplicate_invoice(invoice_id)

    def writes_since(self, start: int = 0) -> list[RecordedRequest]:
        """The requests from index ``start`` that may change something upstream."""
        return self.app.writes_since(start)

    @property
    def faults(self) -> list[Fault]:
        """The queued faults."""
        return self.app.faults.queued()


@contextlib.contextmanager
def spawn_fake(
    module: str,
    *extra_args: str,
    python: str = sys.executable,
    timeout: float = 15.0,
    cwd: str | Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``python -m <module> --port 0 --ready-file F ...`` and yield ``(url, process)``.

    Waits for the ready file; on exit stops the process by its pid (SIGTERM, then SIGKILL).
    """
    root = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="kiki-fake-") as tmp:
        ready = Path(tmp) / "url"
        command = [python, "-m", module, "--port", "0", "--ready-file", str(ready), *extra_args]
        process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"{module} exited with {process.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{module} did not become ready")
                time.sleep(0.02)
            yield ready.read_text(encoding="utf-8").strip(), process
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every fake's ``main`` takes."""
    parser.add_argument("--port", type=int, default=0, help="0: let the OS choose")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--key-lifetime",
        type=float,
        default=None,
        help="seconds an idempotency key is kept (default: the provider's)",
    )
    parser.add_argument(
        "--ready-file", default=None, help="write the URL here once listening (removed on exit)"
    )
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")


def serve_until_stopped(fake: FakeProvider[Any], ready_file: str | None) -> int:
    """Serve until SIGTERM/SIGINT, announcing the URL on stdout and in ``ready_file``."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    fake.start()
    ready = Path(ready_file) if ready_file else None
    try:
        if ready is not None:
            partial = ready.with_name(ready.name + ".tmp")
            partial.write_text(fake.url + "\n", encoding="utf-8")
            os.replace(partial, ready)
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        fake.stop()
        if ready is not None:
            with contextlib.suppress(FileNotFoundError):
                ready.unlink()
    return 0
