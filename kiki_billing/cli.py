"""The ``kiki-billing`` command line."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import date
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import sqlalchemy
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiki_billing.audit_cli import audit_app
from kiki_billing.cli_support import console, err_console, reports_errors
from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.exports.files import write_files_atomically
from kiki_billing.exports.json_export import run_data
from kiki_billing.models import BillingPeriod
from kiki_billing.money import format_money
from kiki_billing.pipeline import ComputedPeriod, MetricsSource, compute_period, render_run_files
from kiki_billing.profit_share import BillingRun

if TYPE_CHECKING:
    from kiki_billing.hub.adapter import BillingAdapter
    from kiki_billing.hub.dispatcher import Delivery, DeliveryOutcome, Hub
    from kiki_billing.hub.ledger import Ledger


app = typer.Typer(
    name="kiki-billing",
    help="Compute outcome-based profit-share invoices and deliver them to billing systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_period(value: str) -> BillingPeriod:
    """``--period YYYY-MM``."""
    try:
        return BillingPeriod.month(value)
    except ValueError as exc:
        raise InputError(str(exc), field="--period") from None


def choose_source(
    metrics: Path | None, audit: Path | None, prometheus: str | None, timeout: float
) -> MetricsSource:
    """Exactly one of ``--metrics``, ``--audit``, ``--prometheus``."""
    given = [
        source
        for source, value in (
            (MetricsSource("metrics_file", str(metrics)), metrics),
            (MetricsSource("audit_trail", str(audit)), audit),
            (MetricsSource("prometheus", str(prometheus), prometheus_timeout=timeout), prometheus),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise InputError("give exactly one of --metrics FILE, --audit FILE, --prometheus URL")
    return given[0]


PeriodOption = Annotated[str, typer.Option("--period", help="Billing month, YYYY-MM.")]
ContractsOption = Annotated[
    Path, typer.Option("--contracts", help="Contracts file (TOML).", dir_okay=False)
]
MetricsOption = Annotated[
    Path | None, typer.Option("--metrics", help="Metrics CSV file.", dir_okay=False)
]
AuditOption = Annotated[
    Path | None, typer.Option("--audit", help="Hash-chained audit trail.", dir_okay=False)
]
PrometheusOption = Annotated[str | None, typer.Option("--prometheus", help="Prometheus base URL.")]
TimeoutOption = Annotated[
    float, typer.Option("--prometheus-timeout", help="Seconds per Prometheus query.")
]


@app.command()
@reports_errors
def compute(
    period: PeriodOption,
    contracts: ContractsOption,
    metrics: MetricsOption = None,
    audit: AuditOption = None,
    prometheus: PrometheusOption = None,
    prometheus_timeout: TimeoutOption = 30.0,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("kiki-out"),
    json_output: Annotated[
        bool, typer.Option("--json", help="Print summary and invoices as JSON.")
    ] = False,
    issue_date: Annotated[
        str | None, typer.Option("--issue-date", help="YYYY-MM-DD; default: day after period.")
    ] = None,
) -> None:
    """Compute one invoice per client for a period and write JSON and CSV files."""
    billing_period = parse_period(period)
    source = choose_source(metrics, audit, prometheus, prometheus_timeout)
    issued = _parse_issue_date(issue_date)
    computed = compute_period(contracts, source, billing_period, issue_date=issued)
    _write_and_show(computed, out, json_output)


@app.command()
@reports_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("kiki-out"),
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Compute the worked example (January 2026, four clients) from the bundled sample data."""
    data = resources.files("kiki_billing") / "data"
    with (
        resources.as_file(data / "sample_contracts.toml") as contracts,
        resources.as_file(data / "sample_metrics.csv") as metrics,
    ):
        computed = compute_period(
            contracts, MetricsSource("metrics_file", str(metrics)), BillingPeriod.month("2026-01")
        )
    _write_and_show(computed, out, json_output)


def _parse_issue_date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InputError(f"not a date (YYYY-MM-DD): {value!r}", field="--issue-date") from None


def _write_and_show(computed: ComputedPeriod, out: Path, json_output: bool) -> None:
    run = computed.run
    written = write_files_atomically(out, render_run_files(run, computed.contracts.exports))
    if json_output:
        typer.echo(json.dumps(run_data(run.summary, run.invoices), indent=2, ensure_ascii=False))
        return
    show_run(run)
    console.print(f"Wrote {len(written)} files to {out}/", markup=False)


def show_run(run: BillingRun) -> None:
    """Print the invoices of a run and its summary as tables."""
    table = Table(title=f"Profit-share invoices, {run.period.label}")
    for column in ("Client", "Invoice", "Lines", "Spend", "LTV", "Margin recovered", "Fee"):
        table.add_column(column, justify="left" if column in ("Client", "Invoice") else "right")
    for inv in run.invoices:
        cur = inv.currency
        table.add_row(
            inv.client_name,
            inv.number,
            str(len(inv.lines)),
            _money(inv.total_spend, cur),
            _money(inv.total_ltv, cur),
            _money(inv.total_margin_recovered, cur),
            _money(inv.total_fee, cur),
        )
    for nb in run.not_billed:
        table.add_row(nb.client_id, f"not billed ({nb.reason})", "0", "", "", "", "")
    for totals in run.summary.by_currency:
        cur = totals.currency
        table.add_section()
        table.add_row(
            f"Total {cur}",
            f"{totals.invoices} invoices",
            "",
            _money(totals.total_spend, cur),
            _money(totals.total_ltv, cur),
            _money(totals.total_margin_recovered, cur),
            _money(totals.total_fee, cur),
        )
    console.print(table)
    for totals in run.summary.by_currency:
        cur = totals.currency
        roas = totals.spend_weighted_roas
        roi = totals.client_roi_on_fee
        console.print(
            f"{cur}: baseline value {_money(totals.total_baseline_value, cur)}, "
            f"client keeps {_money(totals.client_keeps, cur)}, "
            f"monthly recurring revenue {_money(totals.monthly_recurring_revenue, cur)}, "
            f"spend-weighted ROAS {'n/a' if roas is None else f'{roas:.2f}x'}, "
            f"client ROI on fee {'n/a' if roi is None else f'{roi * 100:.0f}%'}",
            markup=False,
        )


def _money(amount: Decimal, currency: str) -> str:
    text = format_money(amount, currency)
    whole, _, fraction = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    grouped = f"{int(whole.lstrip('-')):,}"
    return f"{sign}{grouped}.{fraction}" if fraction else f"{sign}{grouped}"


@app.command()
@reports_errors
def push(
    period: PeriodOption,
    contracts: ContractsOption,
    metrics: MetricsOption = None,
    audit: AuditOption = None,
    prometheus: PrometheusOption = None,
    prometheus_timeout: TimeoutOption = 30.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")
    ] = False,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="Only this client id.")] = None,
) -> None:
    """Compute the period's invoices and deliver each to its client's targets."""
    billing_period = parse_period(period)
    source = choose_source(metrics, audit, prometheus, prometheus_timeout)
    computed = compute_period(contracts, source, billing_period)
    from kiki_billing.hub.dispatcher import plan_deliveries
    from kiki_billing.hub.registry import create_adapter, known_adapter_names

    deliveries, adapters = plan_deliveries(
        computed.run.invoices,
        computed.contracts,
        create_adapter,
        target=target,
        client=client,
        known_targets=known_adapter_names(),
    )
    for nb in computed.run.not_billed:
        err_console.print(
            f"{nb.client_id}: not billed ({nb.reason}); nothing to push", markup=False
        )
    _drive(deliveries, adapters, dry_run=dry_run, redrive_failed=False)


@app.command()
@reports_errors
def retry(
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="Only this client id.")] = None,
) -> None:
    """Re-drive failed and deferred deliveries from the ledger (after fixing their cause)."""
    from kiki_billing.hub.dispatcher import Delivery
    from kiki_billing.hub.ledger import DeliveryState
    from kiki_billing.hub.registry import create_adapter

    label = parse_period(period).label if period else None
    with _ledger() as ledger:
        records = ledger.deliveries(
            period=label,
            states=[DeliveryState.FAILED, DeliveryState.DEFERRED],
            target=target,
            client_id=client,
        )
        adapters = {name: create_adapter(name) for name in sorted({r.target for r in records})}
        deliveries = [
            Delivery(
                invoice=ledger.load_invoice(r.invoice_number, r.revision),
                target=r.target,
                client=adapters[r.target].client_settings_model.model_validate(r.client_settings),
            )
            for r in records
        ]
    if not deliveries:
        console.print("Nothing to retry.")
        return
    _drive(deliveries, adapters, dry_run=False, redrive_failed=True)


@app.command()
@reports_errors
def status(
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show every recorded delivery and its state."""
    label = parse_period(period).label if period else None
    with _ledger() as ledger:
        records = ledger.deliveries(period=label)
    if json_output:
        typer.echo(
            json.dumps(
                [
                    {
                        "invoice": r.invoice_number,
                        "revision": r.revision,
                        "client_id": r.client_id,
                        "period": r.period,
                        "target": r.target,
                        "state": r.state.value,
                        "attempts": r.attempts,
                        "refs": r.refs,
                        "last_error": r.last_error,
                        "updated_at": r.updated_at.isoformat(),
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return
    table = Table(title="Deliveries" + (f", {label}" if label else ""))
    for column in (
        "Period",
        "Invoice",
        "Client",
        "Target",
        "State",
        "Attempts",
        "Provider ids",
        "Last error",
    ):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.period,
            r.invoice_number,
            r.client_id,
            r.target,
            r.state.value,
            str(r.attempts),
            _refs(r.refs),
            r.last_error or "",
        )
    console.print(table)


@app.command("adapters")
@reports_errors
def list_adapters() -> None:
    """List installed adapters and whether each one's SDK is present."""
    from kiki_billing.hub.registry import describe_adapters

    table = Table(title="Adapters (entry-point group kiki_billing.adapters)")
    for column in ("Name", "Provided by", "SDK", "Install", "Description"):
        table.add_column(column)
    for info in describe_adapters():
        install = f"pip install 'kiki-billing[{info.extra}]'" if info.extra else ""
        table.add_row(
            info.name,
            f"{info.distribution or '?'} ({info.value})",
            "present" if info.sdk_present else "missing",
            "" if info.sdk_present else install,
            info.load_error or info.description,
        )
    console.print(table)


@contextlib.contextmanager
def _ledger() -> Iterator[Ledger]:
    from kiki_billing.hub.settings import HubSettings

    settings = HubSettings()
    try:
        ledger = settings.open_ledger()
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        url = settings.ledger_url or str(settings.data_dir)
        safe = (
            sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
            if "://" in url
            else url
        )
        raise ConfigurationError(f"cannot open the ledger {safe}: {type(exc).__name__}") from None
    try:
        yield ledger
    finally:
        ledger.close()


def _drive(
    deliveries: list[Delivery],
    adapters: dict[str, BillingAdapter],
    *,
    dry_run: bool,
    redrive_failed: bool,
) -> None:
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.settings import HubSettings

    settings = HubSettings()
    with _ledger() as ledger:
        counts = Counter(d.target for d in deliveries)
        progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            disable=dry_run,
        )
        tasks = {
            name: progress.add_task(name, total=count) for name, count in sorted(counts.items())
        }
        hub = Hub(
            ledger,
            adapters,
            settings.retry_policy(),
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
            on_outcome=lambda outcome: progress.advance(tasks[outcome.target]),
        )
        try:
            if dry_run:
                show_dry_run(hub, deliveries)
                return
            with progress:
                outcomes = hub.push(deliveries, redrive_failed=redrive_failed)
        finally:
            for adapter in adapters.values():
                adapter.close()
    show_outcomes(outcomes)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)


def show_dry_run(hub: Hub, deliveries: list[Delivery]) -> None:
    """Print, per target, exactly what would be sent and what is already delivered."""
    by_target: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        by_target.setdefault(delivery.target, []).append(delivery)
    for target, items in sorted(by_target.items()):
        console.rule(f"{target}: {len(items)} invoices")
        for delivery in items:
            state, steps = hub.preview(delivery)
            inv = delivery.invoice
            fee = format_money(inv.total_fee, inv.currency)
            head = f"{inv.number} {inv.client_id} {fee} {inv.currency}"
            console.print(f"{head} [ledger: {state.value if state else 'new'}]", markup=False)
            for step in steps:
                if step.request is None:
                    console.print(
                        f"  {step.name}: already delivered {_refs(step.recorded or {})}",
                        markup=False,
                    )
                    continue
                payload = json.dumps(dict(step.request.payload), sort_keys=True, default=str)
                console.print(
                    f"  {step.name}: {step.request.method} {step.request.path} "
                    f"Idempotency-Key {step.idempotency_key} {payload}",
                    markup=False,
                    soft_wrap=True,
                )


def show_outcomes(outcomes: list[DeliveryOutcome]) -> None:
    """Print what went where."""
    table = Table(title="Deliveries")
    for column in ("Client", "Invoice", "Target", "State", "Provider ids", "Note"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(
            outcome.client_id,
            outcome.invoice_number,
            outcome.target,
            outcome.state.value,
            _refs(outcome.refs),
            outcome.error or outcome.note or "",
        )
    console.print(table)
    tally = Counter(outcome.state.value for outcome in outcomes)
    console.print(
        ", ".join(f"{count} {state}" for state, count in sorted(tally.items()))
        or "nothing to deliver"
    )


def _refs(refs: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(refs.items()) if key != "sha256")


app.add_typer(audit_app, name="audit")


def main() -> None:
    """Console-script entry point."""
    app()
