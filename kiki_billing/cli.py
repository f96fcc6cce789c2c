"""The ``kiki-billing`` command line."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kiki_billing.errors import InputError, KikiError
from kiki_billing.exports.files import write_files_atomically
from kiki_billing.exports.json_export import run_data
from kiki_billing.logging import configure_logging
from kiki_billing.models import BillingPeriod
from kiki_billing.money import format_money
from kiki_billing.pipeline import ComputedPeriod, MetricsSource, compute_period, render_run_files
from kiki_billing.profit_share import BillingRun

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="kiki-billing",
    help="Compute outcome-based profit-share invoices and deliver them to billing systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Not on a terminal (a pipe, a CI log) rich would wrap tables at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Report a :class:`KikiError` as one line on stderr and exit with its code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        configure_logging()
        try:
            return command(*args, **kwargs)
        except KikiError as exc:
            err_console.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


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


def _money(amount: object, currency: str) -> str:
    from decimal import Decimal

    assert isinstance(amount, Decimal)
    text = format_money(amount, currency)
    whole, _, fraction = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    grouped = f"{int(whole.lstrip('-')):,}"
    return f"{sign}{grouped}.{fraction}" if fraction else f"{sign}{grouped}"


def _mount_subcommands() -> None:
    from kiki_billing.audit_cli import audit_app

    app.add_typer(audit_app, name="audit")


try:
    _mount_subcommands()
except ImportError:  # pragma: no cover - during development of the audit module
    pass


def main() -> None:
    """Console-script entry point."""
    app()
