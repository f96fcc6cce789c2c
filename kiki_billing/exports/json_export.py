"""Canonical JSON of invoices and of the run."""

from __future__ import annotations

from typing import Any

from kiki_billing.models import Invoice, RunSummary, canonical_json

# Totals repeated at the top of a single-currency summary, for readers that expect one set.
_TOP_LEVEL_TOTALS = (
    "currency",
    "total_spend",
    "total_ltv",
    "total_baseline_value",
    "total_margin_recovered",
    "total_fee",
    "client_keeps",
    "monthly_recurring_revenue",
    "spend_weighted_roas",
    "client_roi_on_fee",
)


def invoice_document(invoice: Invoice) -> str:
    """The canonical JSON file of one invoice (sorted keys, two-space indent, newline)."""
    return invoice.canonical_json(indent=2) + "\n"


def summary_data(summary: RunSummary) -> dict[str, Any]:
    """The run summary as JSON data; one-currency runs also carry their totals at the top."""
    data = summary.model_dump(mode="json")
    if len(summary.by_currency) == 1:
        only = data["by_currency"][0]
        data.update({key: only[key] for key in _TOP_LEVEL_TOTALS})
    return data


def run_data(summary: RunSummary, invoices: tuple[Invoice, ...]) -> dict[str, Any]:
    """``{"summary": ..., "invoices": [...]}`` as printed by ``compute --json``."""
    return {
        "summary": summary_data(summary),
        "invoices": [invoice.model_dump(mode="json") for invoice in invoices],
    }


def summary_document(summary: RunSummary) -> str:
    """The summary file ``summary.json``."""
    return canonical_json(summary_data(summary), indent=2) + "\n"
