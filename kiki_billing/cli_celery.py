"""``push --executor celery`` and ``worker`` (imported when they run)."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import typer

from kiki_billing.cli_delivery import Display, open_ledger, show_outcomes, target_progress
from kiki_billing.cli_support import console, err_console
from kiki_billing.errors import ConfigurationError, InputError

if TYPE_CHECKING:
    from kiki_billing.hub.ledger import Ledger
    from kiki_billing.hub.plan import Plan
    from kiki_billing.hub.settings import HubSettings

POLL_SECONDS = 0.5
PING_SECONDS = 2.0
POOLS = ("threads", "prefork", "solo")


def push_with_celery(
    ledger: Ledger,
    plan: Plan,
    settings: HubSettings,
    display: Display,
    *,
    wait: bool,
    redrive: bool = False,
) -> None:
    """Record and queue the plan's deliveries; show progress until every one is settled.

    ``redrive`` (``retry``): failed deliveries are queued again too.
    """
    from kiki_billing.hub.celery_executor import TASK_NAME, Watch, enqueue, make_app

    app = make_app(settings)
    sent = 0

    def send(payload: dict[str, Any], producer: Any = None) -> None:
        app.send_task(
            TASK_NAME, kwargs={"payload": payload}, queue=settings.celery_queue, producer=producer
        )

    with app.producer_or_acquire() as producer:

        def send_first(payload: dict[str, Any]) -> None:
            nonlocal sent
            send(payload, producer)
            sent += 1

        queued = enqueue(ledger, plan.deliveries, send_first, redrive=redrive)
    if not wait:
        console().print(
            f"{sent} deliveries queued for the workers ({len(queued) - sent} settled before); "
            "follow them with `kiki-billing status`",
            markup=False,
        )
        return
    if sent and not app.control.ping(timeout=PING_SECONDS, limit=1):
        err_console().print(
            "warning: no worker answered: the deliveries wait in the queue until a "
            "`kiki-billing worker` runs (Ctrl-C leaves them queued)",
            markup=False,
        )
    progress, bars = target_progress(Counter(item.delivery.target for item in queued), display)
    watch = Watch(ledger, queued, send, resend_after=settings.celery_resend_after, redrive=redrive)
    with progress:
        while True:
            left = watch.poll()
            done = Counter(item.delivery.target for item in queued if item.outcome is not None)
            for name, bar in bars.items():
                progress.update(bar, completed=done[name])
            if not left:
                break
            time.sleep(POLL_SECONDS)
    outcomes = [item.outcome for item in queued if item.outcome is not None]
    show_outcomes(outcomes, quiet=display.quiet)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)


def run_worker(
    *, concurrency: int, pool: str, name: str, loglevel: str, ping: bool = False
) -> None:
    """``kiki-billing worker``: check the settings and the ledger, then run Celery's worker."""
    from kiki_billing.hub.celery_executor import make_app
    from kiki_billing.hub.settings import load_hub_settings

    if not 1 <= concurrency <= 256:
        raise InputError("must be between 1 and 256", field="--concurrency")
    if pool not in POOLS:
        raise InputError(f"unknown pool (one of {', '.join(POOLS)})", field="--pool")
    settings = load_hub_settings()
    app = make_app(settings)
    if ping:
        from celery.utils.nodenames import host_format

        node = host_format(name)
        if not app.control.ping(destination=[node], timeout=5.0):
            err_console().print(f"worker {node} did not answer", markup=False)
            raise typer.Exit(1)
        console().print(f"worker {node} answered", markup=False)
        return
    # Fail here, not in the first task, when the ledger cannot be reached; this also creates
    # or migrates its tables once.
    with open_ledger(settings) as ledger:
        if ledger is None:  # pragma: no cover - a PostgreSQL ledger always opens or raises
            raise ConfigurationError("the ledger cannot be opened")
    app.worker_main(
        argv=[
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--hostname={name}",
            f"--loglevel={loglevel}",
            f"--queues={settings.celery_queue}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
