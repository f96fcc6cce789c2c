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


def credit_note_data(credited: Invoice, replacement: Invoice) -> dict[str, Any]:
    """The credit note that credits a superseded revision in full, as JSON data.

    Its total is the credited revision's total (positive: a credit note, never a negative
    invoice); each line credits one line of it.
    """
    return {
        "type": "credit_note",
        "credit_note_number": f"{credited.document_number}-CN",
        "credits": {
            "number": credited.number,
            "revision": credited.revision,
            "document_number": credited.document_number,
            "content_hash": credited.billing_hash(),
        },
        "replaced_by": {
            "revision": replacement.revision,
            "document_number": replacement.document_number,
            "content_hash": replacement.billing_hash(),
        },
        "client_id": credited.client_id,
        "client_name": credited.client_name,
        "period": credited.period,
        "issue_date": replacement.issue_date.isoformat(),
        "currency": credited.currency,
        "lines": [
            {
                "line_no": line.line_no,
                "description": line.description,
                "credits_line": line.line_no,
                "amount": format(line.fee, "f"),
            }
            for line in credited.lines
        ],
        "total": format(credited.total_fee, "f"),
    }


def credit_note_document(credited: Invoice, replacement: Invoice) -> str:
    """The canonical JSON file of a credit note (sorted keys, two-space indent, newline)."""
    return canonical_json(credit_note_data(credited, replacement), indent=2) + "\n"


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
