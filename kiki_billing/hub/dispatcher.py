"""Pushing invoices to their targets: planning, then delivering with every guarantee.

For each (invoice, target) the dispatcher claims the delivery in the ledger, then runs the
adapter's steps in order. Each step gets its key from :mod:`~kiki_billing.hub.keys`, is
recorded ``in_flight`` before it is sent, is sent through the account's rate limit and
concurrency cap with :func:`~kiki_billing.hub.retry.run_with_retry`, and is recorded with the
provider's ids when it returns. On a re-run, recorded steps are skipped and a step whose
outcome was unknown is first looked up upstream by its natural key.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError

from kiki_billing.config import ContractsFile
from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.hub.adapter import BillingAdapter, ClientSettings, StepContext, StepRequest
from kiki_billing.hub.errors import DeliveryError, RateLimitedError, TerminalError
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import (
    DeliveryRecord,
    DeliveryState,
    InvoiceConflictError,
    Ledger,
    StepRecord,
    process_owner,
)
from kiki_billing.hub.ratelimit import CircuitBreaker, TokenBucket
from kiki_billing.hub.retry import RetryPolicy, run_with_retry
from kiki_billing.models import Invoice

T = TypeVar("T")
log = structlog.get_logger("kiki_billing.hub")


@dataclass(frozen=True)
class Delivery:
    """One invoice to one target, with the client's settings for that target."""

    invoice: Invoice
    target: str
    client: ClientSettings


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of one delivery in this run."""

    invoice_number: str
    client_id: str
    target: str
    state: DeliveryState
    refs: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        """Delivered now or before, or being delivered by another process right now."""
        return self.state in (DeliveryState.DELIVERED, DeliveryState.IN_FLIGHT)


@dataclass(frozen=True)
class PlannedStep:
    """A step as ``--dry-run`` shows it."""

    name: str
    idempotency_key: str
    request: StepRequest | None
    recorded: Mapping[str, str] | None


def plan_deliveries(
    invoices: Sequence[Invoice],
    contracts: ContractsFile,
    create_adapter: Callable[[str], BillingAdapter],
    *,
    target: str | None = None,
    client: str | None = None,
    known_targets: Sequence[str],
) -> tuple[list[Delivery], dict[str, BillingAdapter]]:
    """Work out every delivery of a run and check all configuration before anything is sent.

    Raises:
        ConfigurationError: An unknown target, a missing SDK or credential.
        InputError: A malformed per-client target setting (names the contracts file, the
            client's line and the field).
    """
    where = str(contracts.path)
    by_id = contracts.by_id()
    if target is not None and target not in known_targets:
        raise ConfigurationError(
            f"unknown target {target!r} (installed adapters: {', '.join(known_targets)})"
        )
    if client is not None and client not in by_id:
        raise InputError(
            f"no client {client!r} in the contracts file", file=where, field="--client"
        )
    for contract in contracts.contracts:
        for name in (*contract.targets, *contract.target_settings):
            if name not in known_targets:
                raise ConfigurationError(
                    f"{where}: client {contract.client_id!r}: unknown target {name!r} "
                    f"(installed adapters: {', '.join(known_targets)})"
                )
    wanted = [
        (inv, name)
        for inv in invoices
        for name in by_id[inv.client_id].targets
        if (target is None or name == target) and (client is None or inv.client_id == client)
    ]
    adapters: dict[str, BillingAdapter] = {}
    for name in sorted({name for _, name in wanted}):
        adapters[name] = create_adapter(name)
    deliveries = []
    for inv, name in wanted:
        contract = by_id[inv.client_id]
        raw = {
            **adapters[name].client_defaults(contracts),
            **contract.target_settings.get(name, {}),
        }
        try:
            settings = adapters[name].client_settings_model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field_name = ".".join(str(p) for p in first["loc"])
            raise InputError(
                f"client {contract.client_id!r}: {first['msg']}",
                file=where,
                field=f"clients.{name}.{field_name}",
            ) from None
        deliveries.append(Delivery(invoice=inv, target=name, client=settings))
    return deliveries, adapters


def step_key(invoice: Invoice, target: str, step: str, prior: StepRecord | None) -> str:
    """The key a step is sent with now.

    A first attempt, and any attempt after an unknown outcome or a transient failure, resends
    the key of the earlier attempt. A step that failed terminally (a validation error, or a
    500 the provider said not to retry) is re-driven only after its cause was fixed, and its
    natural-key look-up runs first; it gets a new, still deterministic key, because providers
    keep the failed result under the old one.
    """
    if prior is None:
        return idempotency_key(invoice.number, invoice.revision, target, step)
    if prior.state is DeliveryState.FAILED:
        return idempotency_key(invoice.number, invoice.revision, target, step, prior.attempts)
    return prior.idempotency_key


class Hub:
    """Delivers invoices through adapters with keys, retries, rate limits and the ledger.

    Args:
        ledger: The delivery ledger.
        adapters: Configured adapters by target name.
        policy: The retry policy.
        breaker_threshold: Consecutive failures that open a target account's circuit.
        breaker_cooldown: Seconds before a trial delivery is let through again.
        on_outcome: Called (from worker threads) after each delivery, for progress bars.
        sleep: Injected in tests.
    """

    def __init__(
        self,
        ledger: Ledger,
        adapters: Mapping[str, BillingAdapter],
        policy: RetryPolicy,
        *,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 60.0,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ledger = ledger
        self.adapters = dict(adapters)
        self.policy = policy
        self.on_outcome = on_outcome
        self.sleep = sleep
        self.owner = process_owner()
        self._breaker_threshold = breaker_threshold
        self._breaker_cooldown = breaker_cooldown
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._slots: dict[tuple[str, str], threading.BoundedSemaphore] = {}

    # Per-account machinery ------------------------------------------------------------------

    def _account(self, adapter: BillingAdapter) -> tuple[str, str]:
        return (adapter.name, adapter.account)

    def bucket(self, adapter: BillingAdapter) -> TokenBucket:
        """The token bucket of the adapter's account."""
        key = self._account(adapter)
        with self._lock:
            if key not in self._buckets:
                limit = adapter.rate_limit()
                self._buckets[key] = TokenBucket(limit.per_second, limit.burst, sleep=self.sleep)
                self._slots[key] = threading.BoundedSemaphore(limit.concurrency)
            return self._buckets[key]

    def breaker(self, adapter: BillingAdapter) -> CircuitBreaker:
        """The circuit breaker of the adapter's account."""
        key = self._account(adapter)
        with self._lock:
            if key not in self._breakers:
                self._breakers[key] = CircuitBreaker(
                    threshold=self._breaker_threshold, cooldown=self._breaker_cooldown
                )
            return self._breakers[key]

    def _call(
        self, adapter: BillingAdapter, call: Callable[[], T], logger: Any, requests: int = 1
    ) -> T:
        bucket = self.bucket(adapter)
        slots = self._slots[self._account(adapter)]

        def attempt() -> T:
            with slots:
                return call()

        def before_attempt(number: int) -> None:
            bucket.acquire(requests)
            if number > 1:
                logger.info("step.attempt", attempt=number)

        def on_retry(error: DeliveryError, number: int, wait: float) -> None:
            if isinstance(error, RateLimitedError):
                bucket.pause(wait)
            logger.warning("step.retry", attempt=number, wait=round(wait, 3), error=str(error))

        return run_with_retry(
            attempt,
            adapter.classify,
            self.policy,
            before_attempt=before_attempt,
            on_retry=on_retry,
            sleep=self.sleep,
        )

    # Pushing --------------------------------------------------------------------------------

    def push(
        self, deliveries: Sequence[Delivery], *, redrive_failed: bool = False
    ) -> list[DeliveryOutcome]:
        """Deliver everything; targets in parallel, each within its account's limits.

        Args:
            deliveries: From :func:`plan_deliveries`.
            redrive_failed: Also retry deliveries that failed terminally before.

        Returns:
            One outcome per delivery, in the order given.
        """
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, delivery in enumerate(deliveries):
            groups[self._account(self.adapters[delivery.target])].append(index)
        outcomes: list[DeliveryOutcome | None] = [None] * len(deliveries)

        def prepare_and_deliver(delivery: Delivery) -> DeliveryOutcome:
            # Recording the invoice in the worker overlaps the ledger writes with the
            # provider's latency instead of doing them all before the first request.
            return self._deliver(delivery, self._prepare(delivery), redrive_failed)

        def run_group(key: tuple[str, str], indexes: list[int]) -> None:
            adapter = self.adapters[key[0]]
            workers = max(1, adapter.rate_limit().concurrency)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=key[0]) as pool:
                futures = {
                    index: pool.submit(prepare_and_deliver, deliveries[index]) for index in indexes
                }
                for index, future in futures.items():
                    outcomes[index] = future.result()

        with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
            for future in [pool.submit(run_group, k, v) for k, v in groups.items()]:
                future.result()
        return [outcome for outcome in outcomes if outcome is not None]

    def _prepare(self, delivery: Delivery) -> DeliveryRecord | DeliveryOutcome:
        adapter = self.adapters[delivery.target]
        try:
            self.ledger.record_invoice(delivery.invoice)
        except InvoiceConflictError as exc:
            return self._outcome(delivery, DeliveryState.FAILED, error=str(exc))
        return self.ledger.ensure_delivery(
            delivery.invoice,
            delivery.target,
            adapter.account,
            delivery.client.model_dump(mode="json"),
        )

    def _outcome(
        self,
        delivery: Delivery,
        state: DeliveryState,
        *,
        refs: Mapping[str, str] | None = None,
        error: str | None = None,
        note: str | None = None,
    ) -> DeliveryOutcome:
        outcome = DeliveryOutcome(
            invoice_number=delivery.invoice.number,
            client_id=delivery.invoice.client_id,
            target=delivery.target,
            state=state,
            refs=dict(refs or {}),
            error=error,
            note=note,
        )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _deliver(
        self,
        delivery: Delivery,
        record: DeliveryRecord | DeliveryOutcome,
        redrive_failed: bool,
    ) -> DeliveryOutcome:
        if isinstance(record, DeliveryOutcome):
            if self.on_outcome is not None:
                self.on_outcome(record)
            return record
        adapter = self.adapters[delivery.target]
        if record.state is DeliveryState.DELIVERED:
            return self._outcome(
                delivery, DeliveryState.DELIVERED, refs=record.refs, note="delivered before"
            )
        if record.state is DeliveryState.FAILED and not redrive_failed:
            return self._outcome(
                delivery,
                DeliveryState.FAILED,
                refs=record.refs,
                error=record.last_error,
                note="failed before; fix the cause, then run `kiki-billing retry`",
            )
        breaker = self.breaker(adapter)
        if not breaker.allow():
            reason = f"deferred: {adapter.name} circuit open after repeated failures"
            self.ledger.defer(record.id, reason)
            return self._outcome(delivery, DeliveryState.DEFERRED, error=reason)
        claimable = [DeliveryState.PENDING, DeliveryState.DEFERRED]
        if redrive_failed:
            claimable.append(DeliveryState.FAILED)
        if not self.ledger.claim(record.id, self.owner, claimable, time.time()):
            current = self.ledger.get_delivery(record.id)
            note = (
                "being delivered by another process"
                if current.state is DeliveryState.IN_FLIGHT
                else "delivered by another process"
            )
            return self._outcome(delivery, current.state, refs=current.refs, note=note)
        return self._run_steps(delivery, record, adapter, breaker)

    def _run_steps(
        self,
        delivery: Delivery,
        record: DeliveryRecord,
        adapter: BillingAdapter,
        breaker: CircuitBreaker,
    ) -> DeliveryOutcome:
        invoice = delivery.invoice
        refs: dict[str, str] = self.ledger.client_refs(
            adapter.name, adapter.account, invoice.client_id
        )
        refs.update(record.refs)
        recorded = self.ledger.steps(record.id)
        logger = log.bind(invoice=invoice.number, target=delivery.target, client=invoice.client_id)
        step_name = "validate"
        last_beat = time.time()
        try:
            adapter.validate(invoice, delivery.client)
            for step in adapter.steps(invoice, delivery.client):
                step_name = step.name
                prior = recorded.get(step.name)
                if prior is not None and prior.state is DeliveryState.DELIVERED:
                    refs.update(prior.refs)
                    continue
                key = step_key(invoice, delivery.target, step.name, prior)
                ctx = StepContext(
                    invoice=invoice, client=delivery.client, refs=dict(refs), idempotency_key=key
                )
                step_log = logger.bind(step=step.name, idempotency_key=key)
                found = step.skip(ctx) if step.skip is not None else None
                if found is None and prior is not None and step.lookup is not None:
                    found = self._call(adapter, functools.partial(step.lookup, ctx), step_log)
                    if found is not None:
                        step_log.info("step.found_upstream", refs=dict(found))
                if found is None:
                    self.ledger.step_started(record.id, step.name, key)
                    found = self._call(
                        adapter, functools.partial(step.send, ctx), step_log, step.requests
                    )
                    step_log.info("step.sent", refs=dict(found))
                self.ledger.step_finished(record.id, step.name, key, DeliveryState.DELIVERED, found)
                refs.update(found)
                client_refs = {k: v for k, v in found.items() if k in adapter.client_refs}
                if client_refs:  # kept at once, so a later period reuses them even after a crash
                    self.ledger.remember_client_refs(
                        adapter.name, adapter.account, invoice.client_id, client_refs
                    )
                if time.time() - last_beat > self.ledger.lease_seconds / 4:
                    last_beat = time.time()
                    self.ledger.heartbeat(record.id, self.owner, last_beat)
        except DeliveryError as exc:
            return self._failed(delivery, record, adapter, breaker, step_name, refs, exc, logger)
        except Exception as exc:
            logger.exception("delivery.internal_error", step=step_name)
            error = TerminalError(f"internal error in {step_name}: {type(exc).__name__}: {exc}")
            return self._failed(delivery, record, adapter, breaker, step_name, refs, error, logger)
        self.ledger.finish(record.id, self.owner, DeliveryState.DELIVERED, refs)
        breaker.record_success()
        logger.info("delivery.delivered", refs=refs)
        return self._outcome(delivery, DeliveryState.DELIVERED, refs=refs)

    def _failed(
        self,
        delivery: Delivery,
        record: DeliveryRecord,
        adapter: BillingAdapter,
        breaker: CircuitBreaker,
        step_name: str,
        refs: Mapping[str, str],
        error: DeliveryError,
        logger: Any,
    ) -> DeliveryOutcome:
        state = DeliveryState.DEFERRED if error.retriable else DeliveryState.FAILED
        message = f"{step_name}: {error}"
        key = idempotency_key(
            delivery.invoice.number, delivery.invoice.revision, delivery.target, step_name
        )
        if step_name != "validate":
            self.ledger.step_finished(record.id, step_name, key, state, refs={}, error=str(error))
        self.ledger.finish(record.id, self.owner, state, refs, message)
        if error.retriable or error.status in (401, 403):
            breaker.record_failure()
        logger.warning("delivery.not_delivered", state=state.value, error=message)
        return self._outcome(delivery, state, refs=refs, error=message)

    # Dry run --------------------------------------------------------------------------------

    def preview(self, delivery: Delivery) -> tuple[DeliveryState | None, list[PlannedStep]]:
        """What pushing ``delivery`` would send now, without sending or recording anything."""
        adapter = self.adapters[delivery.target]
        invoice = delivery.invoice
        existing = self.ledger.find_delivery(invoice.number, invoice.revision, delivery.target)
        refs = self.ledger.client_refs(adapter.name, adapter.account, invoice.client_id)
        recorded = self.ledger.steps(existing.id) if existing else {}
        if existing:
            refs.update(existing.refs)
        adapter.validate(invoice, delivery.client)
        planned = []
        for step in adapter.steps(invoice, delivery.client):
            prior = recorded.get(step.name)
            key = step_key(invoice, delivery.target, step.name, prior)
            if prior is not None and prior.state is DeliveryState.DELIVERED:
                refs.update(prior.refs)
                planned.append(PlannedStep(step.name, key, None, prior.refs))
                continue
            ctx = StepContext(
                invoice=invoice, client=delivery.client, refs=dict(refs), idempotency_key=key
            )
            planned.append(PlannedStep(step.name, key, step.request(ctx), None))
        return (existing.state if existing else None), planned
