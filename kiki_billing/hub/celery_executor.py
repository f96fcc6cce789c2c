"""Deliveries as Celery tasks over a shared PostgreSQL ledger (``push --executor celery``).

``push`` records every invoice and delivery in the ledger, then sends one task per (invoice,
target account). A worker's task runs :meth:`~kiki_billing.hub.runner.DeliveryRunner.deliver`,
the very code the local executor runs: it claims the delivery in the ledger, and the keys,
retries, look-ups and the ledger's claim and lease do the exactly-once work. Celery only
carries the work to a process and hands it to another one when a worker dies:

- ``acks_late`` with ``reject_on_worker_lost``: a task is acknowledged once it has run, so the
  task of a killed worker is delivered again (at once when a pool process dies, after the
  broker's visibility timeout when the whole worker does);
- the redelivered task finds the dead worker's claim; while its lease runs the task is retried
  after the lease, then claims the delivery and resumes it from its recorded steps;
- a task delivered twice (visibility timeout, a retry published before its ack) finds the
  delivery held, or delivered, and does nothing twice;
- a task the broker lost (Redis: a worker killed between taking a message and recording it)
  is sent again by the waiting push once its deliveries stop moving (:class:`Watch`).

Each worker process keeps one ledger connection pool, one lease keeper, and limiters and
breakers whose state is in Redis (:mod:`kiki_billing.hub.shared_limits`), so the processes of
every machine together keep each provider account's limits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from kiki_billing.errors import ConfigurationError, KikiError
from kiki_billing.hub.dispatcher import LeaseKeeper
from kiki_billing.hub.ledger import (
    DeliveryRecord,
    DeliveryState,
    InvoiceConflictError,
    Ledger,
    worker_owner,
)
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.runner import AccountMachinery, DeliveryOutcome, DeliveryRunner, outcome
from kiki_billing.hub.settings import HubSettings
from kiki_billing.plugin import BillingAdapter

TASK_NAME = "kiki_billing.deliver"
SETTLED = frozenset({DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.DEFERRED})
"""States in which a queued delivery is done with for this run (as a local push ends)."""
INSTALL = "pip install 'kiki-billing[celery,postgres]'"

log = structlog.get_logger("kiki_billing.celery")


@dataclass(frozen=True)
class Distributed:
    """The checked settings of the Celery executor."""

    ledger_url: str
    broker_url: str
    limits_url: str
    queue: str


def check_distributed(settings: HubSettings) -> Distributed:
    """The Celery executor's settings, or why they cannot work.

    Raises:
        ConfigurationError: No PostgreSQL ledger (SQLite is one machine's file), no broker, no
            Redis for the shared limits, or a visibility timeout shorter than a step with its
            retries may take.
    """
    ledger_url = settings.ledger_url or ""
    scheme = ledger_url.partition("://")[0].partition("+")[0]
    if scheme not in ("postgresql", "postgres"):
        shown = "the default SQLite file" if not ledger_url else f"a {scheme or '?'} database"
        raise ConfigurationError(
            f"the Celery executor needs a ledger that every worker can reach, and the ledger "
            f"is {shown}: SQLite cannot be shared between machines. Set KIKI_LEDGER_URL to a "
            "PostgreSQL URL (postgresql+psycopg://USER:PASSWORD@HOST/DB)"
        )
    broker = settings.broker_url
    if not broker:
        raise ConfigurationError(
            "the Celery executor needs a broker: set KIKI_BROKER_URL (redis://HOST:6379/0, or "
            "amqp://USER:PASSWORD@HOST// for RabbitMQ)"
        )
    limits = settings.limits_url
    if not limits:
        if not broker.startswith(("redis://", "rediss://")):
            raise ConfigurationError(
                "the shared rate limits need Redis: set KIKI_LIMITS_URL (redis://HOST:6379/1) "
                "when the broker is not Redis"
            )
        limits = broker
    if not limits.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError("KIKI_LIMITS_URL must be a redis:// or rediss:// URL")
    # A step may retry for retry_max_seconds and wait a Retry-After of up to
    # retry_max_retry_after; a broker that re-sends a task sooner only makes the second copy
    # wait for the lease, but a timeout shorter than that is surely a mistake.
    longest_step = settings.retry_max_seconds + settings.retry_max_retry_after
    if settings.celery_visibility_timeout <= longest_step:
        raise ConfigurationError(
            f"KIKI_CELERY_VISIBILITY_TIMEOUT ({settings.celery_visibility_timeout:g} s) must be "
            f"longer than a step with its retries (KIKI_RETRY_MAX_SECONDS + "
            f"KIKI_RETRY_MAX_RETRY_AFTER = {longest_step:g} s)"
        )
    return Distributed(ledger_url, broker, limits, settings.celery_queue)


def make_app(settings: HubSettings) -> Any:
    """The Celery application of the executor, with the delivery task registered.

    Raises:
        ConfigurationError: Celery is not installed, or the settings cannot work.
    """
    distributed = check_distributed(settings)
    try:
        from celery import Celery
    except ModuleNotFoundError:
        raise ConfigurationError(f"the Celery executor needs Celery and redis: {INSTALL}") from None
    app = Celery("kiki_billing", broker=distributed.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=distributed.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledged after the task ran: a killed worker's task goes to another worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per free pool slot, so a dying worker strands few of them.
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings.celery_visibility_timeout),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )(deliver_task)
    return app


def transport_options(visibility_timeout: float) -> dict[str, Any]:
    """The Redis transport's options: how soon a dead worker's tasks go to another one."""
    # NOTE: kombu sweeps for tasks whose visibility timeout ran out every interval x throttle
    # seconds (100 s by default); sweep every tenth of the timeout (at most 10 s) instead. A
    # worker killed during a sweep holds the sweep's mutex until it expires: keep that short.
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": max(1, min(10, round(visibility_timeout / 10))),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 30,
    }


# --------------------------------------------------------------------------------------------
# The worker side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """What a task did, and when to run it again if the delivery is held by someone else."""

    state: str
    note: str | None = None
    retry_in: float | None = None


class WorkerRuntime:
    """What one worker process keeps between tasks: ledger, leases, limits, adapters.

    Args:
        settings: The hub's settings (the worker's environment).
        owner: The process's owner name in the ledger (:func:`worker_owner`).
        create_adapter: Loads and configures an adapter by target name.
        limits: The shared limits backend (default: Redis at the settings' URL).
    """

    def __init__(
        self,
        settings: HubSettings,
        owner: str,
        create_adapter: Callable[[str, Ledger], BillingAdapter[Any, Any]] | None = None,
        limits: Any = None,
    ) -> None:
        distributed = check_distributed(settings)
        self.settings = settings
        self.ledger = Ledger(distributed.ledger_url, lease_seconds=settings.lease_seconds)
        if limits is None:
            from kiki_billing.hub.shared_limits import RedisLimits

            limits = RedisLimits(
                distributed.limits_url,
                slot_lease=settings.slot_lease,
                trial_lease=settings.lease_seconds,
            )
        policy = settings.retry_policy()
        self.machinery = AccountMachinery(
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
            max_wait=policy.max_retry_after,
            sleep=time.sleep,
            backend=limits,
        )
        self.leases = LeaseKeeper(self.ledger, owner)
        self.runner = DeliveryRunner(self.ledger, policy, self.machinery, owner, self.leases.hold)
        self._create_adapter = create_adapter or _registry_adapter
        self._adapters: dict[str, BillingAdapter[Any, Any]] = {}
        self._lock = threading.Lock()

    def adapter(self, target: str) -> BillingAdapter[Any, Any]:
        """The configured adapter of ``target`` (made once per process)."""
        with self._lock:
            found = self._adapters.get(target)
            if found is None:
                found = self._adapters[target] = self._create_adapter(target, self.ledger)
            return found

    def deliver(self, payload: Mapping[str, Any]) -> TaskResult:
        """Run one queued delivery through the hub's runner."""
        number, revision = str(payload["invoice"]), int(payload["revision"])
        target, account = str(payload["target"]), str(payload["account"])
        record = self.ledger.find_delivery(number, revision, target, account)
        if record is None:
            log.error("task.unknown_delivery", invoice=number, target=target, account=account)
            return TaskResult("missing", "no such delivery in the ledger (another ledger?)")
        try:
            adapter = self.adapter(target)
            if adapter.account != account:
                raise ConfigurationError(
                    f"this worker's {target} account is {adapter.account!r}, the delivery is "
                    f"for {account!r}: workers need the settings the push used"
                )
            client = type(adapter).client_settings_model.model_validate(payload["client"])
        except (KikiError, ValidationError) as exc:
            reason = f"worker cannot deliver: {exc}"
            self.ledger.defer(record.id, reason)
            log.error("task.misconfigured", invoice=number, target=target, error=str(exc))
            return TaskResult(DeliveryState.DEFERRED.value, reason)
        invoice = self.ledger.load_invoice(number, revision)
        delivery = Delivery(invoice=invoice, target=target, client=client, account=account)
        result = self.runner.deliver(delivery, adapter, redrive_failed=bool(payload["redrive"]))
        if result.state in SETTLED:
            return TaskResult(result.state.value, result.note or result.error)
        # Held by another process (alive, or dead with its lease still running): come back
        # when the lease would have run out; then the claim succeeds or it is still held.
        current = self.ledger.get_delivery(record.id)
        left = (current.lease_until or time.time()) - time.time()
        retry_in = min(self.settings.lease_seconds, max(1.0, left + 1.0))
        return TaskResult(current.state.value, result.note, retry_in=retry_in)


def _registry_adapter(target: str, ledger: Ledger) -> BillingAdapter[Any, Any]:
    from kiki_billing.hub.credentials import LedgerCredentialStore
    from kiki_billing.hub.registry import create_adapter

    return create_adapter(
        target, lambda name, account: LedgerCredentialStore(ledger, name, account)
    )


_runtimes: dict[int, WorkerRuntime] = {}
_runtimes_lock = threading.Lock()


def runtime_for(node: str) -> WorkerRuntime:
    """This process's runtime (made by its first task, after any fork)."""
    from kiki_billing.hub.settings import load_hub_settings

    with _runtimes_lock:
        found = _runtimes.get(os.getpid())
        if found is None:
            found = _runtimes[os.getpid()] = WorkerRuntime(load_hub_settings(), worker_owner(node))
        return found


def deliver_task(task: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The Celery task: one delivery, run by the hub's runner in this worker process."""
    try:
        result = runtime_for(str(task.request.hostname or "celery@unknown")).deliver(payload)
    except Exception as exc:
        # The ledger or Redis unreachable, or a bug: nothing was settled. Try again later;
        # the delivery's lease (if it was claimed) makes the next run resume it safely.
        wait = min(60.0, 2.0 ** min(task.request.retries, 6))
        log.warning("task.retry", invoice=payload.get("invoice"), error=repr(exc), wait=wait)
        raise task.retry(exc=exc, countdown=wait) from exc
    if result.retry_in is not None:
        raise task.retry(countdown=result.retry_in)
    return {"state": result.state, "note": result.note}


# --------------------------------------------------------------------------------------------
# The push side
# --------------------------------------------------------------------------------------------


@dataclass
class Queued:
    """One delivery of a push: its ledger row, and its outcome once settled."""

    delivery: Delivery
    record_id: int | None
    outcome: DeliveryOutcome | None = None


def task_payload(delivery: Delivery, *, redrive: bool) -> dict[str, Any]:
    """What a task carries: the delivery's identity and the client's current settings."""
    return {
        "invoice": delivery.invoice.number,
        "revision": delivery.invoice.revision,
        "target": delivery.target,
        "account": delivery.account,
        "client": delivery.client.model_dump(mode="json"),
        "redrive": redrive,
    }


def enqueue(
    ledger: Ledger,
    deliveries: Sequence[Delivery],
    send: Callable[[dict[str, Any]], None],
    *,
    redrive: bool = False,
) -> list[Queued]:
    """Record every invoice and delivery, then send a task for each one not settled before.

    A delivery delivered before, or failed before (unless ``redrive``), is not sent again;
    a deferred one is marked ``pending`` (queued) first, so its state tells when this run's
    task has dealt with it. A conflicting invoice fails without a task.
    """
    queued: list[Queued] = []
    requeue: list[int] = []
    for delivery in deliveries:
        invoice = delivery.invoice
        try:
            ledger.record_invoice(invoice)
        except InvoiceConflictError as exc:
            queued.append(
                Queued(delivery, None, outcome(delivery, DeliveryState.FAILED, error=str(exc)))
            )
            continue
        record = ledger.ensure_delivery(
            invoice, delivery.target, delivery.account, delivery.client.model_dump(mode="json")
        )
        item = Queued(delivery, record.id)
        if record.state is DeliveryState.DELIVERED:
            item.outcome = outcome(
                delivery, record.state, refs=record.refs, note="delivered before"
            )
        elif record.state is DeliveryState.FAILED and not redrive:
            item.outcome = outcome(
                delivery,
                record.state,
                refs=record.refs,
                error=record.last_error,
                note="failed before; fix the cause, then run `kiki-billing retry`",
            )
        elif record.state in (DeliveryState.DEFERRED, DeliveryState.FAILED):
            requeue.append(record.id)
        queued.append(item)
    ledger.requeue(requeue)
    for item in queued:
        if item.outcome is None:
            send(task_payload(item.delivery, redrive=redrive))
    return queued


def settle(ledger: Ledger, queued: Iterable[Queued]) -> int:
    """Fill in the outcomes of queued deliveries that are settled now; how many are left."""
    return len(_settle(ledger, queued))


def _settle(ledger: Ledger, queued: Iterable[Queued]) -> list[DeliveryRecord]:
    waiting = {item.record_id: item for item in queued if item.outcome is None}
    left: list[DeliveryRecord] = []
    for record in ledger.deliveries_by_id([rid for rid in waiting if rid is not None]):
        if record.state in SETTLED:
            item = waiting[record.id]
            item.outcome = outcome(
                item.delivery, record.state, refs=record.refs, error=record.last_error
            )
        else:
            left.append(record)
    return left


class Watch:
    """Settles a push's queued deliveries, and queues again the tasks the broker lost.

    Celery with a Redis broker loses a task now and then: ``BRPOP`` takes the message off the
    queue before the worker records it as unacknowledged, so a worker killed in between
    takes it to its grave, and no visibility timeout brings it back. The ledger knows better
    than the broker: when none of the push's unsettled deliveries has moved (state, claim,
    lease, attempts) for ``resend_after`` seconds, the tasks of those that no live lease
    holds are sent again. A task sent twice is harmless (the runner's claim lets one copy
    work and the other find the delivery held or done); each further re-send without
    progress waits twice as long, so stopped workers do not fill the queue with copies.

    Args:
        ledger: The shared ledger.
        queued: What :func:`enqueue` returned.
        send: Sends one task payload.
        resend_after: Seconds without progress before the first re-send.
        redrive: Whether the push re-drives failed deliveries (carried by the tasks).
        clock: Monotonic seconds; ``wall``: the lease clock (epoch seconds).
    """

    def __init__(
        self,
        ledger: Ledger,
        queued: Sequence[Queued],
        send: Callable[[dict[str, Any]], None],
        *,
        resend_after: float,
        redrive: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._ledger, self._queued, self._send = ledger, queued, send
        self._by_id = {item.record_id: item for item in queued if item.record_id is not None}
        self._base = self._wait = resend_after
        self._redrive, self._clock, self._wall = redrive, clock, wall
        self._seen: frozenset[tuple[Any, ...]] | None = None
        self._since = clock()
        self.resent = 0

    def poll(self) -> int:
        """Settle what is settled, re-send what is lost; how many deliveries are left."""
        waiting = _settle(self._ledger, self._queued)
        now = self._clock()
        seen = frozenset(
            (r.id, r.state, r.attempts, r.owner, r.lease_until, r.updated_at) for r in waiting
        )
        if seen != self._seen:
            self._seen, self._since, self._wait = seen, now, self._base
        elif waiting and now - self._since >= self._wait:
            wall = self._wall()
            lost = [
                r
                for r in waiting
                if r.state is DeliveryState.PENDING or (r.lease_until or 0.0) <= wall
            ]
            for record in lost:
                self._send(task_payload(self._by_id[record.id].delivery, redrive=self._redrive))
            self.resent += len(lost)
            if lost:
                log.warning(
                    "push.resent",
                    deliveries=len(lost),
                    stalled_seconds=round(now - self._since, 1),
                    reason="no progress: tasks lost by the broker are queued again",
                )
            self._since, self._wait = now, self._wait * 2
        return len(waiting)
