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
    Correction,
    CorrectionAction,
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
    credit_note_number,
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
    credit_notes: dict[str, dict[str, Any]] = field(default_factory=dict)
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
            due = sum(invoice["lines"].values()) - invoice["paid"] - invoice["applied"]
            paid = due if state == "paid" else (amount_minor or due // 2)
            invoice["paid"] += paid
            if invoice["paid"] + invoice["applied"] >= sum(invoice["lines"].values()):
                invoice["status"] = "paid"

    def void_invoice(self, invoice_id: str) -> str:
        """Void a draft or open invoice with nothing paid (as the providers allow).

        Raises:
            MemoryProviderError: 400 for any other invoice (paid, partly paid, void).
        """
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            raise MemoryProviderError(404, f"no invoice {invoice_id}")
        if invoice["status"] not in ("draft", "open") or invoice["paid"] or invoice["credited"]:
            raise MemoryProviderError(
                400, f"invoice {invoice_id} is {invoice['status']} with payments: not voidable"
            )
        invoice["status"] = "void"
        return "void"

    def credit(self, invoice_id: str, number: str, amount_minor: int) -> str:
        """A credit note against an issued invoice: set against what is due, the rest credit.

        Raises:
            MemoryProviderError: 400 for a draft or void invoice, a non-positive amount, more
                than the invoice total not yet credited, or a credit note number in use.
        """
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            raise MemoryProviderError(404, f"no invoice {invoice_id}")
        total = sum(invoice["lines"].values())
        if invoice["status"] not in ("open", "paid"):
            raise MemoryProviderError(400, f"cannot credit a {invoice['status']} invoice")
        if amount_minor <= 0 or amount_minor > total - invoice["credited"]:
            raise MemoryProviderError(400, f"credit {amount_minor} exceeds what is creditable")
        if any(note["number"] == number for note in self.credit_notes.values()):
            raise MemoryProviderError(400, f"credit note number {number} is in use")
        due = max(total - invoice["paid"] - invoice["applied"], 0)
        applied = min(amount_minor, due)
        invoice["credited"] += amount_minor
        invoice["applied"] += applied
        if invoice["paid"] + invoice["applied"] >= total:
            invoice["status"] = "paid"
        customer = self.customers.setdefault(invoice["customer"], {"client_id": None})
        customer["balance"] = customer.get("balance", 0) + amount_minor - applied
        note_id = self.new_id("cn")
        self.credit_notes[note_id] = {
            "invoice": invoice_id,
            "number": number,
            "amount": amount_minor,
            "applied": applied,
        }
        return note_id

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
                    "credited": 0,
                    "applied": 0,
                    "period": invoice.period,
                }
                return iid

            return {"invoice_id": p.call("create_invoice", ctx.idempotency_key, write)}

        def find_draft(ctx: MemoryContext) -> Mapping[str, str] | None:
            p.calls.append(("find_invoice", None))
            for iid, inv in p.invoices.items():
                if inv["number"] == invoice.number and inv["revision"] == invoice.revision:
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
        return [_remote(iid, inv) for iid, inv in held]

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every invoice the system holds for the period (one read)."""
        p = self.provider
        p.calls.append(("list_period", None))
        with p._lock:
            held = [(iid, dict(inv)) for iid, inv in p.invoices.items() if inv["period"] == period]
        return [_remote(iid, inv) for iid, inv in held]

    def recorded_payment_state(self, refs: Mapping[str, str]) -> PaymentState | None:
        """Finalized invoices are open."""
        return PaymentState.OPEN if refs.get("status") == "open" else None

    def correction_steps(
        self, correction: Correction, client: MemoryClientSettings
    ) -> Sequence[MemoryStep]:
        """``void`` (looked up by status) or ``credit-note`` (looked up by its number)."""
        p = self.provider
        invoice_id = correction.refs.get("invoice_id", "{invoice_id}")
        if correction.action is CorrectionAction.VOID:

            def void(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
                target = str(request.payload["invoice"])
                voided = p.call("void", ctx.idempotency_key, lambda: p.void_invoice(target))
                return {"voided": voided}

            def find_void(ctx: MemoryContext) -> Mapping[str, str] | None:
                p.calls.append(("find_void", None))
                held = p.invoices.get(invoice_id)
                return {"voided": "void"} if held is None or held["status"] == "void" else None

            return [
                Step(
                    "void",
                    request=lambda ctx: StepRequest(
                        "POST", f"/invoices/{invoice_id}/void", {"invoice": invoice_id}
                    ),
                    send=void,
                    lookup=find_void,
                )
            ]
        number = credit_note_number(correction.invoice)
        amount = to_minor_units(correction.credit_total, correction.invoice.currency)

        def credit(ctx: MemoryContext, request: StepRequest) -> Mapping[str, str]:
            payload = request.payload

            def write() -> str:
                return p.credit(str(payload["invoice"]), str(payload["number"]), amount)

            return {"credit_note_id": p.call("credit", ctx.idempotency_key, write)}

        def find_credit(ctx: MemoryContext) -> Mapping[str, str] | None:
            p.calls.append(("find_credit", None))
            for note_id, note in p.credit_notes.items():
                if note["number"] == number:
                    return {"credit_note_id": note_id}
            return None

        return [
            Step(
                "credit-note",
                request=lambda ctx: StepRequest(
                    "POST",
                    "/credit_notes",
                    {"invoice": invoice_id, "number": number, "amount": amount},
                ),
                send=credit,
                lookup=find_credit,
            )
        ]

    def classify(self, error: Exception) -> DeliveryError:
        """429 -> rate limited, 5xx and dropped connections -> transient, other -> terminal."""
        if isinstance(error, MemoryProviderError):
            if error.status == 429:
                return RateLimitedError(str(error), status=429, retry_after=error.retry_after)
            if error.status is None or error.status >= 500:
                return TransientError(str(error), status=error.status)
            return TerminalError(str(error), status=error.status)
        return TerminalError(f"{type(error).__name__}: {error}")


def _remote(iid: str, inv: Mapping[str, Any]) -> RemoteInvoice:
    exponent = currency_exponent(inv["currency"])
    total = sum(inv["lines"].values())
    state = {
        "draft": PaymentState.DRAFT,
        "paid": PaymentState.PAID,
        "void": PaymentState.VOID,
    }.get(inv["status"], PaymentState.PARTLY_PAID if inv["paid"] else PaymentState.OPEN)
    return RemoteInvoice(
        refs={"invoice_id": iid, "customer_id": inv["customer"]},
        kiki_number=inv["number"],
        kiki_revision=inv["revision"],
        number=iid,
        currency=inv["currency"],
        total=Decimal(total).scaleb(-exponent),
        amount_paid=Decimal(inv["paid"]).scaleb(-exponent),
        state=state,
    )
