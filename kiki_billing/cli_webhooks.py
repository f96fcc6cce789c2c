"""``webhooks serve`` and ``sync-status``: payment states back from the providers.

Imported when they run; Starlette and uvicorn only by ``webhooks serve``.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog
import typer

from kiki_billing.cli_compute import parse_period, plain
from kiki_billing.cli_delivery import _credentials_factory, open_ledger
from kiki_billing.cli_metrics import require, serve_until_stopped
from kiki_billing.cli_support import console, err_console
from kiki_billing.errors import ConfigurationError

if TYPE_CHECKING:
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.payments import Call
    from kiki_billing.plugin import BillingAdapter

log = structlog.get_logger("kiki_billing.payments")


def secret_variable(target: str) -> str:
    """``KIKI_<TARGET>_WEBHOOK_SECRET``."""
    return f"KIKI_{target.upper()}_WEBHOOK_SECRET"


def webhook_secret(target: str) -> str | None:
    """The target's webhook secret from the environment, checked (never echoed).

    Raises:
        ConfigurationError: Set but empty or holding whitespace (a pasted newline).
    """
    variable = secret_variable(target)
    value = os.environ.get(variable)
    if value is None:
        return None
    if not value or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ConfigurationError(
            f"{variable} is invalid: empty, or contains whitespace or a control character"
        )
    return value


def hub_call(hub: Hub) -> Call[Any]:
    """Provider reads through the hub's limiter and retry policy, recording account health."""

    def call(adapter: BillingAdapter[Any, Any], read: Any) -> Any:
        try:
            result, _attempt = hub.runner.call(adapter, read, log.bind(target=adapter.name))
            return result
        finally:
            hub.health.flush()

    return call


def run_webhooks_serve(*, host: str, port: int, max_body: int) -> None:
    """``kiki-billing webhooks serve``.

    Raises:
        ConfigurationError: No webhook secret set, an adapter that takes no webhooks, a
            missing extra, or an address that cannot be listened on.
    """
    require("starlette", "webhooks")
    require("uvicorn", "webhooks")
    import uvicorn

    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.registry import create_adapter, known_adapter_names, load_adapter_class
    from kiki_billing.hub.retry import RetryPolicy
    from kiki_billing.hub.settings import load_hub_settings
    from kiki_billing.hub.webhooks import Receiver, build_app
    from kiki_billing.logging import register_secrets
    from kiki_billing.plugin import WebhookSource

    secrets = {name: webhook_secret(name) for name in known_adapter_names()}
    wanted = {name: secret for name, secret in secrets.items() if secret}
    if not wanted:
        raise ConfigurationError(
            "no webhook secret is set: set KIKI_STRIPE_WEBHOOK_SECRET, "
            "KIKI_QUICKBOOKS_WEBHOOK_SECRET and/or KIKI_XERO_WEBHOOK_SECRET"
        )
    register_secrets(wanted.values())
    settings = load_hub_settings()
    with open_ledger(settings, must_exist=True) as ledger:
        if ledger is None:
            raise ConfigurationError(
                "no ledger yet: push first, or set KIKI_LEDGER_URL / KIKI_DATA_DIR to the ledger"
            )
        receivers = {}
        for name in sorted(wanted):
            if not callable(getattr(load_adapter_class(name), "webhook_events", None)):
                raise ConfigurationError(
                    f"adapter {name!r} receives no webhooks; unset {secret_variable(name)}"
                )
        for name, secret in sorted(wanted.items()):
            adapter = create_adapter(name, _credentials_factory(ledger))
            assert isinstance(adapter, WebhookSource)
            receivers[name] = Receiver(adapter, secret)
        # NOTE: providers wait seconds, not minutes, for an answer (Xero 5 s): a read back is
        # retried once, briefly; when it fails the provider is answered 503 and sends again.
        policy = RetryPolicy(
            max_attempts=2, max_seconds=3, initial_wait=0.2, max_wait=1, max_retry_after=2
        )
        hub = Hub(ledger, {n: r.adapter for n, r in receivers.items()}, policy)
        app = build_app(ledger, receivers, max_body_bytes=max_body, call=hub_call(hub))
        try:
            listener = socket.create_server((host, port))
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None
        bound = listener.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        paths = ", ".join(f"/webhooks/{name}" for name in receivers)

        def stop() -> None:
            server.should_exit = True

        try:
            serve_until_stopped(
                lambda: server.run(sockets=[listener]),
                stop,
                f"receiving webhooks on http://{host}:{bound} at {paths} (Ctrl-C stops)",
            )
        finally:
            listener.close()
            for receiver in receivers.values():
                receiver.adapter.close()


def run_sync_status(*, period: str | None, target: str | None, json_output: bool) -> None:
    """``kiki-billing sync-status``: read each delivered invoice's payment state back.

    Exits 1 when a provider could not be read for some delivery.
    """
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.ledger import DeliveryState
    from kiki_billing.hub.payments import SyncOutcome, sync_delivery
    from kiki_billing.hub.registry import create_adapter, known_adapter_names, load_adapter_class
    from kiki_billing.hub.settings import load_hub_settings
    from kiki_billing.plugin import BillingAdapter, DeliveryError

    label = parse_period(period).label if period else None
    known = known_adapter_names()
    if target is not None and target not in known:
        raise ConfigurationError(
            f"unknown target {target!r} (installed adapters: {', '.join(known)})"
        )
    settings = load_hub_settings()
    outcomes: list[SyncOutcome] = []
    unreadable: list[str] = []
    with open_ledger(settings, must_exist=True) as ledger:
        records = (
            []
            if ledger is None
            else ledger.deliveries(period=label, states=[DeliveryState.DELIVERED], target=target)
        )
        names = sorted({r.target for r in records})
        readable = [
            n
            for n in names
            if load_adapter_class(n).tracks_payments
            and load_adapter_class(n).remote_invoices is not BillingAdapter.remote_invoices
        ]
        unreadable = [n for n in names if n not in readable]
        if ledger is not None and readable:
            adapters = {n: create_adapter(n, _credentials_factory(ledger)) for n in readable}
            hub = Hub(ledger, adapters, settings.retry_policy())
            call = hub_call(hub)
            try:
                for record in records:
                    adapter = adapters.get(record.target)
                    if adapter is None:
                        continue
                    try:
                        outcomes.append(sync_delivery(ledger, adapter, record, call))
                    except DeliveryError as exc:
                        error = str(exc.scrubbed(adapter.secrets()))
                        outcomes.append(SyncOutcome(record, None, None, "error", error))
            finally:
                for adapter in adapters.values():
                    adapter.close()
    for name in unreadable:
        err_console().print(f"{name}: cannot read payment states back; skipped", markup=False)
    _show_sync(outcomes, json_output)
    if any(o.outcome == "error" for o in outcomes):
        raise typer.Exit(1)


def _show_sync(outcomes: list[Any], json_output: bool) -> None:
    if json_output:
        print(
            json.dumps(
                [
                    {
                        "invoice": o.delivery.invoice_number,
                        "revision": o.delivery.revision,
                        "period": o.delivery.period,
                        "target": o.delivery.target,
                        "account": o.delivery.account,
                        "before": o.before.value if o.before else None,
                        "after": o.after.value if o.after else None,
                        "outcome": o.outcome,
                        "note": o.note,
                    }
                    for o in outcomes
                ],
                indent=2,
            )
        )
        return
    from rich.table import Table

    table = Table(title="Payment states read back")
    for column in ("Invoice", "Target", "Account", "Before", "Now", "Outcome", "Note"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(
            f"{o.delivery.invoice_number} r{o.delivery.revision}",
            o.delivery.target,
            plain(o.delivery.account),
            o.before.value if o.before else "-",
            o.after.value if o.after else "-",
            o.outcome,
            plain(o.note or ""),
        )
    console().print(table)
    tally = Counter(o.outcome for o in outcomes)
    console().print(
        ", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "nothing to read back",
        markup=False,
    )
    for o in outcomes:
        if o.outcome == "error":
            err_console().print(
                f"{o.delivery.invoice_number} {o.delivery.target}: {o.note}", markup=False
            )
