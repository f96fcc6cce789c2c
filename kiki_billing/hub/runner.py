"""One delivery, step by step: the loop that ``push``, ``retry`` and ``--dry-run`` share.

For each step of the adapter the runner decides, from the ledger, what to do:

- a step recorded ``delivered`` is done: its ids are reused;
- a step with nothing to send (``skip``) records its ids;
- otherwise the step's object is looked up by its natural key first, unless the ledger proves
  it cannot exist yet (its parent, :attr:`~kiki_billing.plugin.Step.new_under`, was created by
  this very delivery and the step was never started); a step started before (unknown outcome,
  failed, deferred) is always looked up;
- if nothing was found, the step is recorded ``in_flight``, then sent with its idempotency key
  through the account's limiter and the retry policy, then recorded with the provider's ids.

``--dry-run`` walks the same decisions without sending or recording anything, so what it shows
is what ``push`` does.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeGuard, TypeVar

import structlog

from kiki_billing.hub.corrections import (
    assessment_step,
    decide,
    from_recorded,
    prefixed,
    recorded_refs,
)
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import (
    DeliveryRecord,
    DeliveryState,
    Ledger,
    StepOrigin,
    StepRecord,
    StepWrite,
    owner_is_dead,
)
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.ratelimit import (
    LOCAL_LIMIT,
    AccountLimiter,
    Breaker,
    CircuitBreaker,
    LimitsBackend,
)
from kiki_billing.hub.retry import RetryPolicy, run_with_retry
from kiki_billing.models import Invoice
from kiki_billing.plugin import (
    BillingAdapter,
    Correction,
    CorrectionAction,
    DeliveryError,
    RateLimitedError,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
    TransientError,
)

T = TypeVar("T")
log = structlog.get_logger("kiki_billing.hub")


@dataclass
class _StepRun:
    """One run of a delivery's steps: what is recorded, what it sent, what waits for a commit.

    Step results wait in ``pending`` and are committed with the next step's start (or the end of
    the delivery): one transaction per step instead of two.
    """

    record_id: int
    recorded: Mapping[str, StepRecord]
    created: set[str]
    limiter: AccountLimiter
    logger: Any
    pending: list[StepWrite] = field(default_factory=list)
    keep: dict[str, str] = field(default_factory=dict)
    step_name: str = "validate"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of one delivery in this run."""

    invoice_number: str
    client_id: str
    target: str
    account: str
    state: DeliveryState
    refs: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None
    revision: int = 0

    @property
    def ok(self) -> bool:
        """Delivered, now or before."""
        return self.state is DeliveryState.DELIVERED


class StepAction(StrEnum):
    """What a run does with a step."""

    DONE = "already delivered"
    SKIP = "nothing to send"
    LOOKUP_THEN_SEND = "look up, send if not found"
    SEND = "send"


@dataclass(frozen=True)
class PlannedStep:
    """A step as ``--dry-run`` shows it."""

    name: str
    idempotency_key: str
    action: StepAction
    request: StepRequest | None
    recorded: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Preview:
    """What ``push`` would do with one delivery now."""

    delivery: Delivery
    ledger_state: DeliveryState | None
    verdict: str
    steps: list[PlannedStep]
    conflict: str | None = None


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


def done(prior: StepRecord | None) -> TypeGuard[StepRecord]:
    """A step recorded as delivered from a fact upstream (sent or found), to be reused.

    A step that had nothing to send (a configured customer, say) is not a fact: it is decided
    again from the current settings, so a corrected setting and ``retry`` take effect.
    """
    return (
        prior is not None
        and prior.state is DeliveryState.DELIVERED
        and prior.origin is not StepOrigin.SKIPPED
    )


def should_look_up(step: Step[Any], prior: StepRecord | None, created: set[str]) -> bool:
    """Whether the step's object may already exist upstream, so a look-up must come first."""
    if step.lookup is None:
        return False
    if prior is not None:
        return True
    return step.new_under is None or step.new_under not in created


class AccountMachinery:
    """The limiters and circuit breakers of every provider account of a run.

    With a ``backend`` (the Celery executor's), each account's limiter counts and its breaker
    opens in a store that every worker shares; without, in this process.
    """

    def __init__(
        self,
        *,
        breaker_threshold: int,
        breaker_cooldown: float,
        max_wait: float,
        sleep: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
        backend: LimitsBackend | None = None,
    ) -> None:
        import threading

        self._lock = threading.Lock()
        self._limiters: dict[tuple[str, str], AccountLimiter] = {}
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._backend = backend
        self._threshold = breaker_threshold
        self._cooldown = breaker_cooldown
        self._max_wait = max_wait
        self._sleep = sleep
        self._clock = clock

    def limiter(self, adapter: BillingAdapter[Any, Any]) -> AccountLimiter:
        """The limiter of the adapter's account."""
        key = (adapter.name, adapter.account)
        with self._lock:
            found = self._limiters.get(key)
            if found is None:
                limit = adapter.rate_limit()
                state = (
                    None
                    if self._backend is None
                    else self._backend.limiter_state(adapter.name, adapter.account, limit)
                )
                found = self._limiters[key] = AccountLimiter(
                    limit,
                    clock=self._clock,
                    sleep=self._sleep,
                    max_wait=self._max_wait,
                    state=state,
                )
            return found

    def breaker(self, adapter: BillingAdapter[Any, Any]) -> Breaker:
        """The circuit breaker of the adapter's account."""
        key = (adapter.name, adapter.account)
        with self._lock:
            found = self._breakers.get(key)
            if found is None:
                if self._backend is None:
                    found = CircuitBreaker(
                        threshold=self._threshold, cooldown=self._cooldown, clock=self._clock
                    )
                else:
                    found = self._backend.breaker(
                        adapter.name,
                        adapter.account,
                        threshold=self._threshold,
                        cooldown=self._cooldown,
                    )
                self._breakers[key] = found
            return found

    def limiters(self) -> dict[tuple[str, str], AccountLimiter]:
        """Every limiter made so far (for counters)."""
        with self._lock:
            return dict(self._limiters)

    def breakers(self) -> dict[tuple[str, str], Breaker]:
        """Every circuit breaker made so far (for the account health in the ledger)."""
        with self._lock:
            return dict(self._breakers)


class DeliveryRunner:
    """Runs (or previews) one delivery's steps with every guarantee of the hub.

    Args:
        ledger: The delivery ledger.
        policy: The retry policy.
        machinery: Limiters and breakers per account.
        owner: This process's owner name in the ledger.
        hold: Registers a claimed delivery for lease heartbeats; returns the release.
        sleep: Injected in tests.
    """

    def __init__(
        self,
        ledger: Ledger,
        policy: RetryPolicy,
        machinery: AccountMachinery,
        owner: str,
        hold: Callable[[int], Callable[[], None]],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.machinery = machinery
        self.owner = owner
        self.hold = hold
        self.sleep = sleep

    # Calls through the limiter and the retry policy -----------------------------------------

    def call(
        self, adapter: BillingAdapter[Any, Any], call: Callable[[], T], logger: Any
    ) -> tuple[T, int]:
        """One provider request: a concurrency and a rate slot per attempt, retried as due.

        Returns:
            What the call returned, and the attempt it took (1 when the first one worked).
        """
        limiter = self.machinery.limiter(adapter)
        attempts = [0]

        def attempt() -> T:
            with limiter.request():
                return call()

        def before_attempt(number: int) -> None:
            attempts[0] = number
            if number > 1:
                logger.info("step.attempt", attempt=number)

        def throttled(error: DeliveryError) -> float:
            assert isinstance(error, RateLimitedError)
            if error.code == LOCAL_LIMIT:
                return error.retry_after or 0.0
            return limiter.throttled_by_provider(error.retry_after, error.window)

        def on_retry(error: DeliveryError, number: int, wait: float) -> None:
            logger.warning("step.retry", attempt=number, wait=round(wait, 3), error=str(error))

        result = run_with_retry(
            attempt,
            adapter.classify_error,
            self.policy,
            before_attempt=before_attempt,
            on_retry=on_retry,
            throttled=throttled,
            sleep=self.sleep,
        )
        return result, attempts[0]

    # Push -----------------------------------------------------------------------------------

    def deliver(
        self, delivery: Delivery, adapter: BillingAdapter[Any, Any], *, redrive_failed: bool
    ) -> DeliveryOutcome:
        """Record the invoice and its delivery, claim it, and run its steps."""
        claimable = [DeliveryState.PENDING, DeliveryState.DEFERRED]
        if redrive_failed:
            claimable.append(DeliveryState.FAILED)
        breaker = self.machinery.breaker(adapter)
        opened = self.ledger.open_delivery(
            delivery.invoice,
            delivery.target,
            delivery.account,
            delivery.client.model_dump(mode="json"),
            self.owner,
            claimable,
            breaker.allow,
            time.time(),
        )
        if opened.conflict is not None or opened.record is None:
            return outcome(delivery, DeliveryState.FAILED, error=opened.conflict)
        record = opened.record
        if opened.attempts is not None:
            release = self.hold(record.id)
            try:
                return self._run(
                    delivery, record, adapter, breaker, first_claim=opened.attempts == 1
                )
            finally:
                release()
        if record.state is DeliveryState.DELIVERED:
            return outcome(
                delivery, DeliveryState.DELIVERED, refs=record.refs, note="delivered before"
            )
        if record.state is DeliveryState.FAILED and not redrive_failed:
            return outcome(
                delivery,
                DeliveryState.FAILED,
                refs=record.refs,
                error=record.last_error,
                note="failed before; fix the cause, then run `kiki-billing retry`",
            )
        if opened.breaker_open:
            reason = f"deferred: {adapter.name} circuit open after repeated failures"
            self.ledger.defer(record.id, reason)
            return outcome(delivery, DeliveryState.DEFERRED, error=reason)
        current = self.ledger.get_delivery(record.id)
        if current.state is DeliveryState.IN_FLIGHT:
            note = f"being delivered by another process ({current.owner})"
        else:
            note = f"{current.state.value} by another process"
        return outcome(
            delivery, current.state, refs=current.refs, error=current.last_error, note=note
        )

    def _run(
        self,
        delivery: Delivery,
        record: DeliveryRecord,
        adapter: BillingAdapter[Any, Any],
        breaker: Breaker,
        *,
        first_claim: bool,
    ) -> DeliveryOutcome:
        invoice = delivery.invoice
        refs = self.ledger.client_refs(adapter.name, delivery.account, invoice.client_id)
        # Ids come from facts: the client's kept ids, then each step recorded as sent or found.
        # A step skipped for a setting is decided again with today's settings.
        # The first claim of a delivery has no steps recorded: no need to read them.
        recorded = {} if first_claim else self.ledger.steps(record.id)
        logger = log.bind(
            invoice=invoice.number,
            revision=invoice.revision,
            target=delivery.target,
            account=delivery.account,
            client=invoice.client_id,
            delivery_attempt=record.attempts + 1,
        )
        run = _StepRun(
            record_id=record.id,
            recorded=recorded,
            created={name for name, r in recorded.items() if r.origin is StepOrigin.SENT},
            limiter=self.machinery.limiter(adapter),
            logger=logger,
        )
        try:
            adapter.validate(invoice, delivery.client)
            corrections: list[Correction] = []
            if invoice.revision > 0:
                corrections = self._correct_superseded(delivery, adapter, run)
                refs.update(
                    {f"corrected_r{c.invoice.revision}": c.action.value for c in corrections}
                )
            for step in adapter.steps(invoice, delivery.client):
                self._step(delivery, adapter, run, step, invoice, refs, client_refs=True)
            for correction in corrections:
                if correction.action is not CorrectionAction.CREDIT:
                    continue
                settlement = adapter.settlement_steps(correction, delivery.client)
                for step in prefixed(settlement, correction.invoice.revision):
                    self._step(delivery, adapter, run, step, invoice, refs, client_refs=False)
        except DeliveryError as exc:
            return self._failed(
                delivery, record, adapter, breaker, run.step_name, refs, exc, logger, run
            )
        except Exception as exc:
            logger.exception("delivery.internal_error", step=run.step_name)
            error = adapter.classify_error(exc)
            error = TerminalError(f"internal error in {run.step_name}: {error.message}")
            return self._failed(
                delivery, record, adapter, breaker, run.step_name, refs, error, logger, run
            )
        self._flush(
            delivery,
            adapter,
            run,
            finish=(self.owner, DeliveryState.DELIVERED, refs, None),
        )
        breaker.record_success()
        logger.info("delivery.delivered", refs=refs)
        return outcome(delivery, DeliveryState.DELIVERED, refs=refs)

    def _step(
        self,
        delivery: Delivery,
        adapter: BillingAdapter[Any, Any],
        run: _StepRun,
        step: Step[Any],
        subject: Invoice,
        refs: dict[str, str],
        *,
        client_refs: bool,
    ) -> None:
        """Run one step: reuse what is recorded, else look up, else send; ``refs`` grows.

        ``subject`` is the invoice the step acts on (a superseded revision for a correction);
        ``client_refs`` keeps the step's client ids (``adapter.client_refs``) for later periods.
        """
        run.step_name = step.name
        prior = run.recorded.get(step.name)
        if done(prior):
            refs.update(prior.refs)
            return
        key = step_key(delivery.invoice, delivery.target, step.name, prior)
        ctx = StepContext(
            invoice=subject,
            client=delivery.client,
            refs=dict(refs),
            idempotency_key=key,
            throttle=run.limiter.acquire,
        )
        request = step.request(ctx)
        step_log = run.logger.bind(step=step.name, idempotency_key=key)
        found = step.skip(ctx) if step.skip is not None else None
        origin = StepOrigin.SKIPPED
        has_row = prior is not None
        if found is None and should_look_up(step, prior, run.created):
            lookup = step.lookup
            assert lookup is not None
            found, tries = self.call(adapter, functools.partial(lookup, ctx), step_log)
            origin = StepOrigin.FOUND
            if found is not None:
                step_log.info("step.found_upstream", attempt=tries, refs=dict(found))
        if found is None:
            _check_resolved(step.name, request)
            run.pending.append(StepWrite.started(step.name, key, new=not has_row))
            self._flush(delivery, adapter, run)
            has_row = True
            send = step.send
            sent, tries = self.call(adapter, functools.partial(send, ctx, request), step_log)
            found = sent
            origin = StepOrigin.SENT
            run.created.add(step.name)
            step_log.info("step.sent", attempt=tries, refs=dict(found))
        run.pending.append(
            StepWrite(
                step.name,
                key,
                DeliveryState.DELIVERED,
                dict(found),
                origin=origin,
                new=not has_row,
            )
        )
        refs.update(found)
        if client_refs and origin is not StepOrigin.SKIPPED:
            # Kept with the step, so a later period reuses them even after a crash.
            run.keep.update({k: v for k, v in found.items() if k in adapter.client_refs})

    def _correct_superseded(
        self, delivery: Delivery, adapter: BillingAdapter[Any, Any], run: _StepRun
    ) -> list[Correction]:
        """Void or credit each older revision delivered to this target account.

        See :mod:`kiki_billing.hub.corrections`. Returns what was decided per revision.

        Raises:
            TransientError: An older revision is being delivered by another live process.
            TerminalError: The provider holds an older revision twice, or the adapter cannot
                correct (no ``remote_invoices`` or ``correction_steps``).
        """
        invoice = delivery.invoice
        decided: list[Correction] = []
        for old in self.ledger.superseded(
            invoice.number, invoice.revision, delivery.target, delivery.account
        ):
            name = assessment_step(old.revision)
            run.step_name = name
            if _held_elsewhere(old, self.owner):
                raise TransientError(
                    f"revision {old.revision} of {invoice.number} is being delivered to "
                    f"{delivery.target} by another process ({old.owner}); it is corrected once "
                    "that one is done",
                    code="superseded_in_flight",
                )
            previous = self.ledger.load_invoice(invoice.number, old.revision)
            base = self.ledger.known_refs(old)
            prior = run.recorded.get(name)
            earlier = None
            if prior is not None and prior.state is DeliveryState.DELIVERED:
                earlier = from_recorded(prior.refs, previous, invoice, base)
            if earlier is not None and self._correction_done(delivery, adapter, run, earlier):
                decided.append(earlier)
                continue
            step_log = run.logger.bind(step=name)
            try:
                found, _ = self.call(
                    adapter, functools.partial(adapter.remote_invoices, previous, base), step_log
                )
            except NotImplementedError:
                raise TerminalError(
                    f"adapter {adapter.name!r} cannot read invoices back, so revision "
                    f"{old.revision} of {invoice.number} cannot be corrected there"
                ) from None
            correction = decide(
                found, previous, invoice, base, target=delivery.target, earlier=earlier
            )
            step_log.info("correction.decided", action=correction.action.value)
            key = step_key(invoice, delivery.target, name, prior)
            run.pending.append(
                StepWrite(
                    name,
                    key,
                    DeliveryState.DELIVERED,
                    recorded_refs(correction),
                    origin=StepOrigin.SKIPPED,
                    new=prior is None,
                )
            )
            refs = dict(correction.refs)
            for step in self._correction_steps(delivery, adapter, correction):
                self._step(delivery, adapter, run, step, previous, refs, client_refs=False)
            decided.append(correction)
        return decided

    def _correction_steps(
        self, delivery: Delivery, adapter: BillingAdapter[Any, Any], correction: Correction
    ) -> list[Step[Any]]:
        if correction.action is CorrectionAction.NONE:
            return []
        try:
            steps = adapter.correction_steps(correction, delivery.client)
        except NotImplementedError:
            raise TerminalError(
                f"adapter {adapter.name!r} cannot void or credit an invoice, so revision "
                f"{correction.invoice.revision} of {correction.invoice.number} cannot be "
                "corrected there"
            ) from None
        return prefixed(steps, correction.invoice.revision)

    def _correction_done(
        self,
        delivery: Delivery,
        adapter: BillingAdapter[Any, Any],
        run: _StepRun,
        correction: Correction,
    ) -> bool:
        """Every step of an earlier run's decision is recorded done (no need to read again)."""
        steps = self._correction_steps(delivery, adapter, correction)
        return all(done(run.recorded.get(step.name)) for step in steps)

    def _flush(
        self,
        delivery: Delivery,
        adapter: BillingAdapter[Any, Any],
        run: _StepRun,
        *,
        finish: tuple[str, DeliveryState, Mapping[str, str], str | None] | None = None,
    ) -> None:
        client_refs = (
            (adapter.name, delivery.account, delivery.invoice.client_id, dict(run.keep))
            if run.keep
            else None
        )
        self.ledger.record_steps(run.record_id, run.pending, client_refs=client_refs, finish=finish)
        run.pending.clear()
        run.keep.clear()

    def _failed(
        self,
        delivery: Delivery,
        record: DeliveryRecord,
        adapter: BillingAdapter[Any, Any],
        breaker: Breaker,
        step_name: str,
        refs: Mapping[str, str],
        error: DeliveryError,
        logger: Any,
        run: _StepRun,
    ) -> DeliveryOutcome:
        state = DeliveryState.DEFERRED if error.retriable else DeliveryState.FAILED
        error = error.scrubbed(adapter.secrets())
        message = f"{step_name}: {error}"
        if step_name != "validate":
            key = idempotency_key(
                delivery.invoice.number, delivery.invoice.revision, delivery.target, step_name
            )
            run.pending.append(StepWrite(step_name, key, state, {}, str(error)))
        self._flush(delivery, adapter, run, finish=(self.owner, state, refs, message))
        if (error.retriable and error.code != LOCAL_LIMIT) or error.status in (401, 403):
            breaker.record_failure()
        logger.warning("delivery.not_delivered", state=state.value, error=message)
        return outcome(delivery, state, refs=refs, error=message)

    # Dry run --------------------------------------------------------------------------------

    def preview(self, delivery: Delivery, adapter: BillingAdapter[Any, Any]) -> Preview:
        """What pushing ``delivery`` would do now, without sending or recording anything."""
        invoice = delivery.invoice
        existing = self.ledger.find_delivery(
            invoice.number, invoice.revision, delivery.target, delivery.account
        )
        state = existing.state if existing else None
        conflict = self.ledger.invoice_conflict(invoice)
        if conflict is not None:
            return Preview(delivery, state, "would fail: " + conflict, [], conflict=conflict)
        refs = self.ledger.client_refs(adapter.name, delivery.account, invoice.client_id)
        recorded = self.ledger.steps(existing.id) if existing else {}
        verdict = {
            None: "new: would send",
            DeliveryState.PENDING: "pending: would send",
            DeliveryState.DEFERRED: "deferred before: would resume",
            DeliveryState.IN_FLIGHT: "in flight: would resume if its holder is gone",
            DeliveryState.DELIVERED: "delivered before: nothing to send",
            DeliveryState.FAILED: "failed before: push skips it; `kiki-billing retry` resumes",
        }[state]
        adapter.validate(invoice, delivery.client)
        created = {name for name, r in recorded.items() if r.origin is StepOrigin.SENT}
        planned = []
        for old in self.ledger.superseded(
            invoice.number, invoice.revision, delivery.target, delivery.account
        ):
            name = assessment_step(old.revision)
            prior = recorded.get(name)
            key = step_key(invoice, delivery.target, name, prior)
            # NOTE: a dry run reads nothing upstream: which correction applies is decided from
            # the provider's view when the push runs.
            request = StepRequest(
                "CORRECT",
                f"revision {old.revision} ({old.state.value} here)",
                {"if_unpaid": "void", "if_paid": "credit note for the whole, then reissue"},
            )
            planned.append(PlannedStep(name, key, StepAction.LOOKUP_THEN_SEND, request))
        for step in adapter.steps(invoice, delivery.client):
            prior = recorded.get(step.name)
            key = step_key(invoice, delivery.target, step.name, prior)
            if done(prior):
                refs.update(prior.refs)
                planned.append(PlannedStep(step.name, key, StepAction.DONE, None, prior.refs))
                continue
            ctx = StepContext(
                invoice=invoice, client=delivery.client, refs=dict(refs), idempotency_key=key
            )
            request = step.request(ctx)
            skipped = step.skip(ctx) if step.skip is not None else None
            if skipped is not None:
                refs.update(skipped)
                planned.append(PlannedStep(step.name, key, StepAction.SKIP, request, skipped))
                continue
            looks = should_look_up(step, prior, created)
            action = StepAction.LOOKUP_THEN_SEND if looks else StepAction.SEND
            planned.append(PlannedStep(step.name, key, action, request))
            created.add(step.name)
        return Preview(delivery, state, verdict, planned)


_PLACEHOLDER = re.compile(r"\{[a-z][a-z0-9_]*\}")


def _check_resolved(step: str, request: StepRequest) -> None:
    """Refuse to send a request that still holds an id placeholder (an earlier step is missing).

    A placeholder is a whole value or path segment such as ``{invoice_id}``, as the adapters'
    request builders write them when an id is not known yet.

    Raises:
        TerminalError: Naming the placeholder.
    """
    texts = request.path.split("/")
    stack: list[Any] = [request.payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    for text in texts:
        if _PLACEHOLDER.fullmatch(text):
            raise TerminalError(f"{step} needs {text}, which no earlier step recorded")


def _held_elsewhere(record: DeliveryRecord, owner: str) -> bool:
    """The delivery is in flight under a live claim of another process."""
    return (
        record.state is DeliveryState.IN_FLIGHT
        and record.owner is not None
        and record.owner != owner
        and (record.lease_until or 0) >= time.time()
        and not owner_is_dead(record.owner)
    )


def outcome(
    delivery: Delivery,
    state: DeliveryState,
    *,
    refs: Mapping[str, str] | None = None,
    error: str | None = None,
    note: str | None = None,
) -> DeliveryOutcome:
    """The outcome of ``delivery``."""
    return DeliveryOutcome(
        invoice_number=delivery.invoice.number,
        client_id=delivery.invoice.client_id,
        target=delivery.target,
        account=delivery.account,
        state=state,
        refs=dict(refs or {}),
        error=error,
        note=note,
        revision=delivery.invoice.revision,
    )
