"""The metrics CSV file: one row per client campaign (and period).

Required columns ``client_id, campaign_id, spend, ltv``; optional ``campaign_name, platform,
accuracy, period``. Amounts are decimal strings in the currency's major unit. With a ``period``
column (``YYYY-MM``) only the rows of the billed period are read; without it every row is.
Other columns are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pydantic import ValidationError

from kiki_billing.errors import InputError
from kiki_billing.models import CampaignMetrics, SourceEvidence
from kiki_billing.sources.base import (
    MetricsSet,
    PeriodWindow,
    csv_table,
    decode_utf8,
    read_bytes,
    sha256_hex,
)

REQUIRED_COLUMNS = ("client_id", "campaign_id", "spend", "ltv")
OPTIONAL_COLUMNS = ("campaign_name", "platform", "accuracy", "period")


def read_metrics_file(path: Path, window: PeriodWindow) -> MetricsSet:
    """Read the campaign metrics of ``window.period`` from a metrics CSV file.

    Args:
        path: The CSV file.
        window: The billing period (time zones do not apply: rows are already per period).

    Returns:
        The metrics of the period and the evidence (file hash, row count).

    Raises:
        InputError: Unreadable or non-UTF-8 file, a missing column, or a bad value; the
            error names the file, the row (the header is row 1) and the field.
    """
    raw = read_bytes(path)
    text = decode_utf8(raw, path)
    where = str(path)
    reader = csv_table(text, where, REQUIRED_COLUMNS)
    header = reader.fieldnames or []
    label = window.period.label
    metrics: list[CampaignMetrics] = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise InputError("more values than columns", file=where, row=line)
            if all(not (value or "").strip() for value in row.values()):
                continue
            if "period" in header and (row["period"] or "").strip() != label:
                _check_period_label(row["period"] or "", where, line)
                continue
            metrics.append(_parse_row(row, where, line))
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", file=where, row=reader.line_num) from None
    evidence = SourceEvidence(
        kind="metrics_file",
        location=where,
        sha256=sha256_hex(raw),
        record_count=len(metrics),
    )
    return MetricsSet(metrics=tuple(metrics), evidence=evidence, undated="period" not in header)


def _check_period_label(value: str, where: str, line: int) -> None:
    text = value.strip()
    if len(text) != 7 or text[4] != "-" or not (text[:4] + text[5:]).isdigit():
        raise InputError(
            f"period must be YYYY-MM, got {value!r}", file=where, row=line, field="period"
        )


def _parse_row(row: dict[str, str | None], where: str, line: int) -> CampaignMetrics:
    values: dict[str, object] = {}
    for column in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        if column == "period" or column not in row:
            continue
        value = (row[column] or "").strip()
        if value == "" and column in REQUIRED_COLUMNS:
            raise InputError("value is empty", file=where, row=line, field=column)
        if value != "":
            values[column] = value
    try:
        return CampaignMetrics.model_validate({**values, "origin_file": where, "origin_row": line})
    except ValidationError as exc:
        raise validation_to_input_error(exc, file=where, row=line) from None


def validation_to_input_error(
    exc: ValidationError, *, file: str | None, row: int | None, prefix: str = ""
) -> InputError:
    """Turn pydantic's first error into an :class:`InputError` naming the field."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = str(first["msg"])
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, InputError):
        message = cause.message
    message = message.removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return InputError(prefix + message, file=file, row=row, field=field)
