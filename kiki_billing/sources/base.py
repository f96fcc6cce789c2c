"""What every source returns, and the period window it reads."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kiki_billing.errors import InputError
from kiki_billing.models import BillingPeriod, CampaignMetrics, SourceEvidence


@dataclass(frozen=True)
class MetricsSet:
    """Campaign metrics of one period from one source, with the evidence of the read."""

    metrics: tuple[CampaignMetrics, ...]
    evidence: SourceEvidence
    undated: bool = False
    """The rows carry no period: they are taken as the billed period's (a metrics file
    without a ``period`` column)."""


@dataclass(frozen=True)
class PeriodWindow:
    """The billing period and each client's time zone (midnight edges; UTC by default)."""

    period: BillingPeriod
    timezones: Mapping[str, str] = field(default_factory=dict)

    def bounds(self, client_id: str) -> tuple[datetime, datetime]:
        """The UTC instants ``[start, end)`` of the period for ``client_id``."""
        return self.period.bounds(self.timezones.get(client_id, "UTC"))

    def distinct_timezones(self) -> set[str]:
        """Every time zone in use, UTC always included."""
        return {"UTC", *self.timezones.values()}


def read_bytes(path: Path) -> bytes:
    """Read a whole input file, turning OS errors into an :class:`InputError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError("file not found", file=str(path)) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", file=str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror}", file=str(path)) from None


def decode_utf8(data: bytes, path: Path) -> str:
    """Decode ``data`` as UTF-8 (a BOM is allowed), naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            file=str(path),
            row=line,
        ) from None


def csv_table(
    text: str,
    where: str,
    required: Sequence[str],
    allowed: Sequence[str] | None = None,
) -> csv.DictReader[str]:
    """A CSV reader over ``text`` whose header has been checked.

    Args:
        text: The decoded file.
        where: The file name, for errors.
        required: Columns that must be present.
        allowed: When given, every column must be one of these (else other columns are kept
            and ignored by the caller).

    Raises:
        InputError: An empty file, a missing, unknown or repeated column (row 1).
    """
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    header = [name.strip() for name in (reader.fieldnames or [])]
    if not header:
        raise InputError("empty file, expected a header row", file=where, row=1)
    reader.fieldnames = header
    for column in required:
        if column not in header:
            raise InputError("missing required column", file=where, row=1, field=column)
    for column in header:
        if allowed is not None and column not in allowed:
            raise InputError("unknown column", file=where, row=1, field=column)
        if header.count(column) > 1:
            raise InputError("column appears twice", file=where, row=1, field=column)
    return reader


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()
