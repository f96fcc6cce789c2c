"""An in-memory billing system that honours idempotency keys, and an adapter for it.

Like a mock transport, it makes hub tests exact: faults are scripted per call, every call is
recorded with its key, and duplicates are visible in :attr:`MemoryBillingSystem.invoices`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic_settings import SettingsConfigDict

from kiki_billing.plugin import (
    AdapterSettings,
    BillingAdapter,
    ClientSettings,
    DeliveryError,
    Invoice,
    PaymentState,
    RateLimit,
    RateLimitedError,
    RateWindow,
    RemoteInvoice,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
    TransientError,
    currency_exponent,
    to_minor_units,
)


@dataclass(frozen=True)
class Fault:
    """A scripted failure of the next matching call.

    Attributes:
        kind: ``unavailable`` (503), ``throttled`` (429), ``reset`` (connection dropped),
            ``invalid`` (400), ``auth`` (401).
        after_write: The write happens before the failure (a lost response).
        retry_after: Seconds for a throttle.
        operation: Only calls of this operation (``create_invoice``, ``add_line``, ...).
    """

    kind: Literal["unavailable", "throttled", "reset", "invalid", "auth"]
    after_write: bool = False
    retry_after: float | None = None
    operation: str | None = None


class MemoryProviderError(Exception):
    """What the in-memory provider raises; the adapter classifies it."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


@dataclass
class MemoryBillingSystem:
    """The provider: customers and invoices, an idempotency store and a fault script."""

    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _replies: dict[str, Any] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, operation: str, key: str | None, write: Any) -> Any:
        """Run ``write()`` once per key, with any scripted fault for this call."""
        with self._lock:
            self.calls.append((operation, key))
            fault = next((f for f in self.faults if f.operation in (None, operation)), None)
            if fault is not None:
                self.faults.remove(fault)
            if fault is not None and not fault.after_write:
                raise self._error(fault)
            if key is not None and key in self._replies:
                reply = self._replies[key]
            else:
                reply = write()
                if key is not None:
                    self._replies[key] = reply
            if fault is not None:
                raise self._error(fault)
            return reply

    def new_id(self, prefix: str) -> str:
        """A fresh provider id."""
        return f"{prefix}_{next(self._ids)}"

    @staticmethod
    def _error(fault: Fault) -> MemoryProviderError:
        status = {"unavailable": 503, "throttled": 429, "reset": None, "invalid": 400, "auth": 401}
        return MemoryProviderError(status[fault.kind], f"scripted {fault.kind}", fault.retry_after)

    def invoices_numbered(self, number: str) -> list[dict[str, Any]]:
        """Every invoice upstream that carries ``number`` (more than one is a duplicate)."""
        return [inv for inv in self.invoices.values() if inv["number"] == number]

    def mark_invoice(self, invoice_id: str, state: str, amount_minor: int | None = None) -> None:
        """Change an invoice as happens outside the API.

        ``paid``, ``partly_paid`` (``amount_minor``, default half of what is due), ``void`` or
        ``deleted``.

        Raises:
            KeyError: No such invoice.
            ValueError: An unknown state, or a payment on an invoice that is not open.
        """
        with self._lock:
            invoice = self.invoices[invoice_id]
            if state == "deleted":
                del self.invoices[invoice_id]
                return
            if state == "void":
                invoice["status"] = "void"
                return
            if state not in ("paid", "partly_paid") or invoice["status"] != "open":
                raise ValueError(f"cannot mark a {invoice['status']} invoice {state}")
            due = sum(invoice["lines"].values()) - invoice["paid"]
            paid = due if state == "paid" else (amount_minor or due // 2)
            invoice["paid"] += paid
            if invoice["paid"] >= sum(invoice["lines"].values()):
                invoice["status"] = "paid"

    def duplicate_invoice(self, invoice_id: str) -> str:
        """A copy of an invoice under a new id (made outside the ledger); returns the id."""
        with self._lock:
            copy_id = self.new_id("inv")
            source = self.invoices[invoice_id]
            self.invoices[copy_id] = {**source, "lines": dict(source["lines"])}
            return copy_id


class MemorySettings(AdapterSettings):
    """``KIKI_MEMORY_*``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_MEMORY_", extra="ignore", frozen=True)


class MemoryClientSettings(ClientSettings):
    """``[clients.memory]``."""

    customer: str | None = None


MemoryStep = Step[MemoryClientSettings]
MemoryContext = StepContext[MemoryClientSettings]


class MemoryAdapter(BillingAdapter[MemorySettings, MemoryClientSettings]):
    """Delivers to a :class:`MemoryBillingSystem` (tests and adapter authors).

    Steps: customer (looked up by client id), draft (looked up by invoice number), one step
    per line (looked up on the draft), finalize (looked up by status).
    """

    name = "memory"
    client_refs = ("customer_id",)
    default_rate_limit: ClassVar[RateLimit] = RateLimit((RateWindow(1000, 1.0),), concurrency=4)
    system: ClassVar[MemoryBillingSystem] = MemoryBillingSystem()

    def __init__(
        self,
        settings: MemorySettings | None = None,
        system: MemoryBillingSystem | None = None,
        account: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(settings or MemorySettings(), **kwargs)
        self.provider = system or type(self).system
        self._account = account

    @property
    def account(self) -> str:
        """The account given at construction (tests push to several)."""
        return self._account

    def steps(self, invoice: Invoice, client: MemoryClientSettings) -> Sequence[MemoryStep]:
        """customer, draft, one step per line, finalize."""
        p = self.provider

        def send_customer(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
            def write() -> str:
                cid = p.new_id("cus")
                p.customers[cid] = {"client_id": request.payload["client"]}
                return cid

            return {"customer_id": p.call("create_customer", ctx.idempotency_key, write)}

        def find_customer(ctx: MemoryContext) -> Mapping[str, str] | None:
            p.calls.append(("find_customer", None))
            for cid, customer in p.customers.items():
                if customer["client_id"] == invoice.client_id:
                    return {"customer_id": cid}
            return None

        def skip_customer(ctx: MemoryContext) -> Mapping[str, str] | None:
            known = ctx.client.customer or ctx.refs.get("customer_id")
            return {"customer_id": known} if known else None

        def send_draft(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
            def write() -> str:
                iid = p.new_id("inv")
                p.invoices[iid] = {
                    "number": request.payload["number"],
                    "revision": request.payload["revision"],
                    "currency": request.payload["currency"],
                    "customer": request.payload["customer"],
                    "lines": {},
                    "status": "draft",
                    "paid": 0,
                }
                return iid

            return {"invoice_id": p.call("create_invoice", ctx.idempotency_key, write)}

        def find_draft(ctx: MemoryContext) -> Mapping[str, str] | None:
            p.calls.append(("find_invoice", None))
            for iid, inv in p.invoices.items():
                if inv["number"] == invoice.number:
                    return {"invoice_id": iid}
            return None

        def line_step(line_no: int, amount_minor: int) -> MemoryStep:
            def send(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
                def write() -> str:
                    p.invoices[request.payload["invoice"]]["lines"][line_no] = amount_minor
                    return f"line_{line_no}"

                return {f"line_{line_no}": p.call("add_line", ctx.idempotency_key, write)}

            def find(ctx: MemoryContext) -> Mapping[str, str] | None:
                p.calls.append(("find_line", None))
                lines = p.invoices.get(ctx.refs.get("invoice_id", ""), {}).get("lines", {})
                return {f"line_{line_no}": f"line_{line_no}"} if line_no in lines else None

            return Step(
                f"line-{line_no}",
                request=lambda ctx: StepRequest(
                    "POST",
                    "/lines",
                    {"invoice": ctx.refs.get("invoice_id", "{invoice_id}"), "amount": amount_minor},
                ),
                send=send,
                lookup=find,
                new_under="draft",
            )

        def finalize(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
            def write() -> str:
                p.invoices[ctx.refs["invoice_id"]]["status"] = "open"
                return "open"

            return {"status": p.call("finalize", ctx.idempotency_key, write)}

        def find_finalized(ctx: MemoryContext) -> Mapping[str, str] | None:
            p.calls.append(("find_status", None))
            status = p.invoices.get(ctx.refs.get("invoice_id", ""), {}).get("status")
            return {"status": status} if status == "open" else None

        return [
            Step(
                "customer",
                request=lambda ctx: StepRequest(
                    "POST", "/customers", {"client": invoice.client_id}
                ),
                send=send_customer,
                lookup=find_customer,
                skip=skip_customer,
            ),
            Step(
                "draft",
                request=lambda ctx: StepRequest(
                    "POST",
                    "/invoices",
                    {
                        "number": invoice.number,
                        "revision": invoice.revision,
                        "currency": invoice.currency,
                        "customer": ctx.refs.get("customer_id", "{customer_id}"),
                    },
                ),
                send=send_draft,
                lookup=find_draft,
                new_under="customer",
            ),
            *(
                line_step(line.line_no, to_minor_units(line.fee, invoice.currency))
                for line in invoice.lines
            ),
            Step(
                "finalize",
                request=lambda ctx: StepRequest(
                    "POST", f"/invoices/{ctx.refs.get('invoice_id', '{invoice_id}')}/finalize"
                ),
                send=finalize,
                lookup=find_finalized,
                new_under="draft",
            ),
        ]

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """Every invoice the system holds with this number and revision (one read)."""
        p = self.provider
        p.calls.append(("list_invoices", None))
        with p._lock:
            held = [
                (iid, dict(inv))
                for iid, inv in p.invoices.items()
                if inv["number"] == invoice.number and inv.get("revision") == invoice.revision
            ]
        found = []
        for iid, inv in held:
            exponent = currency_exponent(inv["currency"])
            total = sum(inv["lines"].values())
            state = {
                "draft": PaymentState.DRAFT,
                "paid": PaymentState.PAID,
                "void": PaymentState.VOID,
            }.get(inv["status"], PaymentState.PARTLY_PAID if inv["paid"] else PaymentState.OPEN)
            found.append(
                RemoteInvoice(
                    refs={"invoice_id": iid, "customer_id": inv["customer"]},
                    kiki_number=inv["number"],
                    kiki_revision=inv["revision"],
                    number=iid,
                    currency=inv["currency"],
                    total=Decimal(total).scaleb(-exponent),
                    amount_paid=Decimal(inv["paid"]).scaleb(-exponent),
                    state=state,
                )
            )
        return found

    def classify(self, error: Exception) -> DeliveryError:
        """429 -> rate limited, 5xx and dropped connections -> transient, other -> terminal."""
        if isinstance(error, MemoryProviderError):
            if error.status == 429:
                return RateLimitedError(str(error), status=429, retry_after=error.retry_after)
            if error.status is None or error.status >= 500:
                return TransientError(str(error), status=error.status)
            return TerminalError(str(error), status=error.status)
        return TerminalError(f"{type(error).__name__}: {error}")
