"""One billing run end to end, without the CLI: read the source, compute, render the files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from kiki_billing.config import ContractsFile, ExportSettings, load_contracts
from kiki_billing.errors import InputError
from kiki_billing.exports.csv_formats import render_quickbooks_csv, render_xero_csv
from kiki_billing.exports.json_export import invoice_document, summary_document
from kiki_billing.models import BillingPeriod, Invoice
from kiki_billing.profit_share import BillingRun, CarriedFee, compute_run
from kiki_billing.sources.base import MetricsSet, PeriodWindow


@dataclass(frozen=True)
class MetricsSource:
    """Which source to read: a metrics file, an audit trail or a Prometheus URL."""

    kind: Literal["metrics_file", "audit_trail", "prometheus"]
    location: str
    prometheus_timeout: float = 30.0

    def read(self, window: PeriodWindow) -> MetricsSet:
        """Read the period's metrics from this source."""
        if self.kind == "metrics_file":
            from kiki_billing.sources.metrics_file import read_metrics_file

            return read_metrics_file(Path(self.location), window)
        if self.kind == "audit_trail":
            from kiki_billing.sources.audit_trail import read_audit_trail

            return read_audit_trail(Path(self.location), window)
        from kiki_billing.sources.prometheus import read_prometheus

        return read_prometheus(self.location, window, timeout=self.prometheus_timeout)


@dataclass(frozen=True)
class ComputedPeriod:
    """A contracts file, the billing run computed from it, and what the operator should know.

    Attributes:
        warnings: Things that are allowed but easy to get wrong (one line each).
        undated_source: The SHA-256 of a metrics file without a ``period`` column (its rows
            were taken as this period's), so ``push`` can refuse to bill it for another month.
    """

    contracts: ContractsFile
    run: BillingRun
    warnings: tuple[str, ...] = ()
    undated_source: str | None = None
    metrics: MetricsSet | None = None
    """What the source read (to price the run again with fees carried forward)."""
    issue_date: date | None = None
    contracts_path: Path | None = None

    def carries_forward(self) -> bool:
        """Whether any contract sets ``carry_forward_below``."""
        return any(c.carry_forward_below is not None for c in self.contracts.contracts)

    def with_carried(self, carried: Mapping[str, Sequence[CarriedFee]]) -> ComputedPeriod:
        """The run priced again with earlier periods' fees carried forward (pure, no I/O)."""
        if not carried or self.metrics is None:
            return self
        run = compute_run(
            self.contracts.contracts,
            self.metrics.metrics,
            self.run.period,
            [self.metrics.evidence],
            contracts_file=str(self.contracts_path or self.contracts.path),
            issue_date=self.issue_date,
            carried=carried,
        )
        return replace(self, run=run)


def check_period(
    period: BillingPeriod, contracts: ContractsFile, *, allow_open: bool, now: datetime
) -> list[str]:
    """Refuse a period that has not started, or not ended unless ``allow_open``.

    Returns:
        Warnings (an open period allowed).

    Raises:
        InputError: The period is in the future, or still open without ``allow_open``.
    """
    zones = {c.timezone for c in contracts.contracts} | {"UTC"}
    starts, ends = zip(*(period.bounds(zone) for zone in zones), strict=True)
    if min(starts) > now:
        raise InputError(f"period {period.label} has not started yet", field="--period")
    if max(ends) > now:
        message = (
            f"period {period.label} has not ended yet (it ends {max(ends):%Y-%m-%d %H:%M} UTC "
            "in the latest client time zone); its numbers may still grow"
        )
        if not allow_open:
            raise InputError(
                message + "; pass --allow-open-period to bill it now", field="--period"
            )
        return [message]
    return []


def check_issue_date(period: BillingPeriod, issue_date: date | None) -> None:
    """An invoice is issued after the period it bills.

    Raises:
        InputError: The issue date is before the period's last day.
    """
    if issue_date is not None and issue_date < period.last_day:
        raise InputError(
            f"issue date {issue_date.isoformat()} is before the end of period {period.label}",
            field="--issue-date",
        )


def compute_period(
    contracts_path: Path,
    source: MetricsSource,
    period: BillingPeriod,
    *,
    issue_date: date | None = None,
    allow_open_period: bool = True,
    allow_empty: bool = True,
    now: datetime | None = None,
) -> ComputedPeriod:
    """Load the contracts, read the source for ``period`` and compute every invoice.

    Args:
        contracts_path: The contracts file.
        source: Where the numbers come from.
        period: The billing period.
        issue_date: Default: the day after the period.
        allow_open_period: Bill a period that has not ended yet (with a warning).
        allow_empty: A source without rows for the period is not an error.
        now: The current time (tests).

    Raises:
        InputError: Any bad input, naming the file, row and field.
    """
    check_issue_date(period, issue_date)
    contracts = load_contracts(contracts_path)
    warnings = check_period(
        period, contracts, allow_open=allow_open_period, now=now or datetime.now(UTC)
    )
    window = PeriodWindow(period=period, timezones=contracts.timezones())
    metrics = source.read(window)
    if not metrics.metrics and not allow_empty:
        raise InputError(
            f"no metrics for period {period.label} in this source; check --period and the "
            "source, or pass --allow-empty",
            file=source.location,
        )
    undated = None
    if metrics.undated:
        undated = metrics.evidence.sha256
        warnings.append(
            f"{source.location} has no period column: every row is billed as {period.label}"
        )
    run = compute_run(
        contracts.contracts,
        metrics.metrics,
        period,
        [metrics.evidence],
        contracts_file=str(contracts_path),
        issue_date=issue_date,
    )
    return ComputedPeriod(
        contracts=contracts,
        run=run,
        warnings=tuple(warnings),
        undated_source=undated,
        metrics=metrics,
        issue_date=issue_date,
        contracts_path=contracts_path,
    )


def invoice_file_name(invoice: Invoice) -> str:
    """Where an invoice's canonical JSON goes under the output folder."""
    return f"invoices/{invoice.document_number}.json"


def render_run_files(run: BillingRun, exports: ExportSettings) -> dict[str, str]:
    """Every output file of a run: relative path -> content."""
    files = {invoice_file_name(inv): invoice_document(inv) for inv in run.invoices}
    files["summary.json"] = summary_document(run.summary)
    files["quickbooks-invoices.csv"] = render_quickbooks_csv(run.invoices, exports.quickbooks)
    for index, text in enumerate(render_xero_csv(run.invoices, exports.xero), start=1):
        files["xero-invoices.csv" if index == 1 else f"xero-invoices-{index}.csv"] = text
    return files
