"""``compute`` and ``demo``: compute a period and write its files (imported when they run)."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from kiki_billing.cli_support import console, warn
from kiki_billing.errors import InputError
from kiki_billing.exports.files import RUN_FILE_PATTERNS, write_files_atomically
from kiki_billing.exports.json_export import run_data
from kiki_billing.models import BillingPeriod
from kiki_billing.money import format_money
from kiki_billing.pipeline import ComputedPeriod, MetricsSource, compute_period, render_run_files
from kiki_billing.profit_share import BillingRun

if TYPE_CHECKING:
    from rich.text import Text

MAX_TIMEOUT = 600.0


def parse_period(value: str) -> BillingPeriod:
    """``--period YYYY-MM``."""
    try:
        return BillingPeriod.month(value)
    except ValueError as exc:
        raise InputError(str(exc), field="--period") from None


def parse_issue_date(value: str | None) -> date | None:
    """``--issue-date YYYY-MM-DD``."""
    if value is None:
        return None
    try:
        parsed = date.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"not a date (YYYY-MM-DD): {value!r}", field="--issue-date") from None
    if not 1970 <= parsed.year <= 9998:
        raise InputError("year must be between 1970 and 9998", field="--issue-date")
    return parsed


def choose_source(
    metrics: Path | None, audit: Path | None, prometheus: str | None, timeout: float
) -> MetricsSource:
    """Exactly one of ``--metrics``, ``--audit``, ``--prometheus``."""
    if not 0 < timeout <= MAX_TIMEOUT:
        raise InputError(
            f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout:g}",
            field="--prometheus-timeout",
        )
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


def compute_from_options(
    *,
    period: str,
    contracts: Path,
    metrics: Path | None,
    audit: Path | None,
    prometheus: str | None,
    prometheus_timeout: float,
    issue_date: str | None,
    allow_open_period: bool,
    allow_empty: bool,
) -> ComputedPeriod:
    """Parse the common source options of ``compute`` and ``push`` and compute the period."""
    billing_period = parse_period(period)
    issued = parse_issue_date(issue_date)
    source = choose_source(metrics, audit, prometheus, prometheus_timeout)
    computed = compute_period(
        contracts,
        source,
        billing_period,
        issue_date=issued,
        allow_open_period=allow_open_period,
        allow_empty=allow_empty,
    )
    for message in computed.warnings:
        warn(message)
    return computed


def run_compute(*, out: Path, json_output: bool, **options: object) -> None:
    """``kiki-billing compute``: read against the ledger, if there is one (only read).

    Fees carried forward are billed as ``push`` bills them, and an invoice issued before carries
    the revision it is: the one issued when nothing changed, the next one when it did (what
    ``push --amend`` would issue).
    """
    computed = compute_from_options(**options)  # type: ignore[arg-type]
    write_and_show(with_ledger(computed), out, json_output)


def with_ledger(computed: ComputedPeriod) -> ComputedPeriod:
    """The run with the ledger's carried fees and revisions (the ledger only read)."""
    import dataclasses

    import sqlalchemy

    from kiki_billing.errors import ConfigurationError
    from kiki_billing.hub.ledger import Ledger
    from kiki_billing.hub.revisions import plan_revisions
    from kiki_billing.hub.settings import load_hub_settings

    try:
        settings = load_hub_settings()
        if settings.ledger_url is None and not (settings.data_dir / "ledger.sqlite3").exists():
            return computed
        ledger = Ledger(settings.ledger_location(), lease_seconds=settings.lease_seconds)
    except (ConfigurationError, sqlalchemy.exc.SQLAlchemyError, OSError, RuntimeError) as exc:
        reason = exc if isinstance(exc, ConfigurationError) else type(exc).__name__
        warn(f"the ledger was not read ({reason}): carried fees and revisions are not shown")
        return computed
    try:
        if computed.carries_forward():
            computed = computed.with_carried(ledger.carried_into(computed.run.period.label))
        revisions = plan_revisions(computed.run.invoices, ledger)
    finally:
        ledger.close()
    if not revisions.amendments and all(i.revision == 0 for i in revisions.current):
        return computed
    labelled = {inv.number: inv for inv in revisions.current}
    for amendment in revisions.amendments:
        labelled[amendment.revised.number] = amendment.revised
        warn(
            f"{amendment.revised.number} changed since revision {amendment.issued.revision} "
            f"was issued: this is revision {amendment.revised.revision} "
            f"({amendment.revised.document_number}); `push --amend` issues it"
        )
    invoices = tuple(labelled[inv.number] for inv in computed.run.invoices)
    return dataclasses.replace(computed, run=dataclasses.replace(computed.run, invoices=invoices))


def run_demo(*, out: Path, json_output: bool) -> None:
    """``kiki-billing demo``: the worked example from the bundled sample data."""
    data = resources.files("kiki_billing") / "data"
    with (
        resources.as_file(data / "sample_contracts.toml") as contracts,
        resources.as_file(data / "sample_metrics.csv") as metrics,
    ):
        computed = compute_period(
            contracts, MetricsSource("metrics_file", str(metrics)), BillingPeriod.month("2026-01")
        )
    write_and_show(computed, out, json_output)


def write_and_show(computed: ComputedPeriod, out: Path, json_output: bool) -> None:
    """Write a run's files into ``out`` (replacing an earlier run's) and print it."""
    run = computed.run
    written = write_files_atomically(
        out, render_run_files(run, computed.contracts.exports), replace=RUN_FILE_PATTERNS
    )
    if json_output:
        print(json.dumps(run_data(run.summary, run.invoices), indent=2, ensure_ascii=False))
        return
    show_run(run)
    console().print(f"Wrote {len(written)} files to {out}/", markup=False)


def show_run(run: BillingRun) -> None:
    """Print the invoices of a run and its summary as tables."""
    from rich.table import Table

    table = Table(title=f"Profit-share invoices, {run.period.label}")
    for column in ("Client", "Invoice", "Lines", "Spend", "LTV", "Margin recovered", "Fee"):
        table.add_column(column, justify="left" if column in ("Client", "Invoice") else "right")
    for inv in run.invoices:
        cur = inv.currency
        table.add_row(
            plain(inv.client_name),
            inv.number,
            str(len(inv.lines)),
            money(inv.total_spend, cur),
            money(inv.total_ltv, cur),
            money(inv.total_margin_recovered, cur),
            money(inv.total_fee, cur),
        )
    for nb in run.not_billed:
        shown = f"not billed ({nb.reason})"
        if nb.carried_fee is not None:
            shown = f"carried forward: {money(nb.carried_fee, nb.currency)} {nb.currency}"
        table.add_row(nb.client_id, shown, "0", "", "", "", "")
    for totals in run.summary.by_currency:
        cur = totals.currency
        table.add_section()
        table.add_row(
            f"Total {cur}",
            f"{totals.invoices} invoices",
            "",
            money(totals.total_spend, cur),
            money(totals.total_ltv, cur),
            money(totals.total_margin_recovered, cur),
            money(totals.total_fee, cur),
        )
    console().print(table)
    for totals in run.summary.by_currency:
        cur = totals.currency
        roas = totals.spend_weighted_roas
        roi = totals.client_roi_on_fee
        console().print(
            f"{cur}: baseline value {money(totals.total_baseline_value, cur)}, "
            f"client keeps {money(totals.client_keeps, cur)}, "
            f"monthly recurring revenue {money(totals.monthly_recurring_revenue, cur)}, "
            f"spend-weighted ROAS {'n/a' if roas is None else f'{roas:.2f}x'}, "
            f"client ROI on fee {'n/a' if roi is None else f'{roi * 100:.0f}%'}",
            markup=False,
        )


def plain(text: str) -> Text:
    """A table cell shown exactly as written (text that looks like markup stays text)."""
    from rich.text import Text

    return Text(text)


def money(amount: Decimal, currency: str) -> str:
    """An amount with thousands separators and the currency's decimals."""
    text = format_money(amount, currency)
    whole, _, fraction = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    grouped = f"{int(whole.lstrip('-')):,}"
    return f"{sign}{grouped}.{fraction}" if fraction else f"{sign}{grouped}"
