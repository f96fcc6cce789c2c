"""``reconcile``: what each billing system holds against the ledger (imported when it runs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

from kiki_billing.cli_compute import parse_period, plain
from kiki_billing.cli_delivery import _credentials_factory, open_ledger
from kiki_billing.cli_support import console, err_console
from kiki_billing.errors import InputError

if TYPE_CHECKING:
    from kiki_billing.hub.reconcile import Finding


def run_reconcile(*, period: str | None, target: str | None, json_output: bool) -> None:
    """``kiki-billing reconcile``: exit 1 on any drift, 0 when everything matches."""
    import structlog

    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.ledger.payments import payment_records
    from kiki_billing.hub.reconcile import reconcile, summary
    from kiki_billing.hub.registry import create_adapter, known_adapter_names
    from kiki_billing.hub.settings import load_hub_settings

    label = parse_period(period).label if period else None
    if target is not None and target not in known_adapter_names():
        raise InputError(
            f"unknown target {target!r} (installed adapters: {', '.join(known_adapter_names())})",
            field="--target",
        )
    settings = load_hub_settings()
    with open_ledger(settings, must_exist=True) as ledger:
        if ledger is None:
            _show([], {"checks": 0, "match": 0, "drift": 0, "skipped": 0}, json_output)
            return
        names = sorted({r.target for r in ledger.deliveries(period=label, target=target)})
        if target is not None and target not in names:
            names.append(target)
        credentials = _credentials_factory(ledger)
        adapters = {name: create_adapter(name, credentials) for name in names}
        logger = structlog.get_logger("kiki_billing.reconcile")
        hub = Hub(ledger, adapters, settings.retry_policy())
        # Payments the ledger heard of (webhooks, sync-status) are known, not drift.
        payments = payment_records(ledger)
        try:
            findings = reconcile(
                ledger,
                adapters,
                lambda adapter, read: hub.runner.call(adapter, read, logger)[0],
                period=label,
                target=target,
                known_state=lambda record, _adapter: (
                    payments[record.id].state if record.id in payments else None
                ),
            )
        finally:
            hub.leases.stop()
            for adapter in adapters.values():
                adapter.close()
    counts = summary(findings)
    _show(findings, counts, json_output)
    if counts["drift"]:
        raise typer.Exit(1)


def _show(findings: Sequence[Finding], counts: dict[str, int], json_output: bool) -> None:
    if json_output:
        data: dict[str, Any] = {
            "summary": counts,
            "findings": [f.as_json() for f in findings],
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(title="Reconciliation")
    for column in (
        "Period",
        "Invoice",
        "Target",
        "Account",
        "Check",
        "Result",
        "Expected",
        "Found",
        "Detail",
    ):
        table.add_column(column)
    for f in findings:
        table.add_row(
            f.period,
            f"{f.invoice} r{f.revision}" if f.revision is not None else f.invoice,
            f.target,
            plain(f.account),
            f.check.value,
            f.result.value,
            plain(f.expected),
            plain(f.found),
            plain(f.detail),
        )
    console().print(table)
    for f in findings:
        if f.drift:
            err_console().print(
                f"drift: {f.invoice or f.period} r{f.revision} {f.target} {f.check.value}: "
                f"{f.detail or f'expected {f.expected}, found {f.found}'}",
                markup=False,
                soft_wrap=True,
            )
    console().print(
        f"{counts['checks']} checks: {counts['match']} match, {counts['drift']} drift, "
        f"{counts['skipped']} skipped",
        markup=False,
    )
