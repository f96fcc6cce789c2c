"""One billing run end to end, without the CLI: read the source, compute, render the files."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

from kiki_billing.config import ContractsFile, ExportSettings, load_contracts
from kiki_billing.exports.csv_formats import render_quickbooks_csv, render_xero_csv
from kiki_billing.exports.json_export import invoice_document, summary_document
from kiki_billing.models import BillingPeriod, Invoice
from kiki_billing.profit_share import BillingRun, compute_run
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
    """A contracts file and the billing run computed from it."""

    contracts: ContractsFile
    run: BillingRun


def compute_period(
    contracts_path: Path,
    source: MetricsSource,
    period: BillingPeriod,
    *,
    issue_date: date | None = None,
) -> ComputedPeriod:
    """Load the contracts, read the source for ``period`` and compute every invoice.

    Raises:
        InputError: Any bad input, naming the file, row and field.
    """
    contracts = load_contracts(contracts_path)
    window = PeriodWindow(period=period, timezones=contracts.timezones())
    metrics = source.read(window)
    run = compute_run(
        contracts.contracts,
        metrics.metrics,
        period,
        [metrics.evidence],
        contracts_file=str(contracts_path),
        issue_date=issue_date,
    )
    return ComputedPeriod(contracts=contracts, run=run)


def invoice_file_name(invoice: Invoice) -> str:
    """Where an invoice's canonical JSON goes under the output folder."""
    return f"invoices/{invoice.number}.json"


def render_run_files(run: BillingRun, exports: ExportSettings) -> dict[str, str]:
    """Every output file of a run: relative path -> content."""
    files = {invoice_file_name(inv): invoice_document(inv) for inv in run.invoices}
    files["summary.json"] = summary_document(run.summary)
    files["quickbooks-invoices.csv"] = render_quickbooks_csv(run.invoices, exports.quickbooks)
    for index, text in enumerate(render_xero_csv(run.invoices, exports.xero), start=1):
        files["xero-invoices.csv" if index == 1 else f"xero-invoices-{index}.csv"] = text
    return files
