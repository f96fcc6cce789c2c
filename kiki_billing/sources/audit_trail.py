"""The hash-chained audit trail: an append-only CSV log of spend and LTV events.

The format is documented in ``docs/audit-trail.md``. In short: a UTF-8 file whose first line is
exactly :data:`HEADER`, then one record per line, every line ending in a newline. A record's
``record_hash`` is the lowercase hex SHA-256 of its line's bytes up to and including the comma
before it; ``prev_hash`` is the previous record's ``record_hash`` (64 zeros for record 1). The
chain head is the last record's ``record_hash``.

Reading is one pass over the file in blocks of complete lines. A block first goes through a
fast check made of C-level operations over the whole block (split, map, join, translate, set
and list comparisons); it is exact (it accepts a block only when every record in it is valid)
but may refuse an unusual valid block. A refused block goes through :func:`_parse_record`, the
reference validator, record by record, which raises an :class:`InputError` naming the line and
the field of the first bad record. Blocks are checked in order, so the error is always about
the first bad record of the file.
"""

from __future__ import annotations

import contextlib
import decimal
import fcntl
import hashlib
import os
import re
import sys
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count as count_from
from itertools import repeat
from operator import add, itemgetter, methodcaller
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydantic import ValidationError

from kiki_billing.errors import InputError
from kiki_billing.models import _IDENTIFIER, CampaignMetrics, SourceEvidence
from kiki_billing.money import parse_amount
from kiki_billing.sources.base import MetricsSet, PeriodWindow
from kiki_billing.sources.metrics_file import validation_to_input_error

HEADER = (
    "seq,timestamp,client_id,campaign_id,metric,amount,campaign_name,platform,prev_hash,record_hash"
)
FIELDS: tuple[str, ...] = tuple(HEADER.split(","))
ZERO_HASH = "0" * 64
METRICS = ("spend", "ltv")

_BLOCK_SIZE = 1 << 16  # bytes read per block (small blocks stay in the CPU caches)
_TAIL_SIZE = 1 << 16  # bytes read from the end of the file to find the last record
_SEQ = re.compile(r"[1-9][0-9]*")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
# parse_amount's rules, ASCII digits only, no surrounding blanks.
_AMOUNT = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,12})?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# campaign_name and platform: no comma, quote, control character (Cc) or line/paragraph
# separator (Zl, Zp).
_NOT_TEXT = ',"\x00-\x1f\x7f-\x9f\u2028\u2029'
_BAD_TEXT_CHAR = re.compile(f"[{_NOT_TEXT}]")
# A key: client_id,campaign_id,metric,campaign_name,platform (see _Scanner).
_KEY = re.compile(
    f"({_IDENTIFIER.pattern}),({_IDENTIFIER.pattern}),(spend|ltv),([^{_NOT_TEXT}]*),([^{_NOT_TEXT}]*)"
)
# Sums are exact: a rounding would raise instead of silently changing a total.
_SUM_CONTEXT = decimal.Context(
    prec=100,
    rounding=decimal.ROUND_HALF_UP,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Rounded, decimal.Overflow],
)


@dataclass(frozen=True)
class AuditSummary:
    """The result of verifying an audit trail.

    Attributes:
        records: Number of records in the file.
        head: The chain head: the last record's ``record_hash`` (64 zeros when empty).
        sha256: SHA-256 of the whole file, as hex.
    """

    records: int
    head: str
    sha256: str


@dataclass(frozen=True)
class AuditEvent:
    """One spend or LTV event to append to an audit trail; validated when created.

    Attributes:
        timestamp: When it happened; must be time-zone aware, stored in UTC.
        client_id: The client's id (letters, digits and ``_ . : @ -``).
        campaign_id: The campaign's id (same rules).
        metric: ``"spend"`` or ``"ltv"``.
        amount: The amount in the currency's major unit (``parse_amount`` rules; a string is
            accepted too). May be negative, for a correction.
        campaign_name: Optional; no comma, quote, control character or newline.
        platform: Optional; same rules as ``campaign_name``.

    Raises:
        InputError: A value is invalid; the error names the field.
    """

    timestamp: datetime
    client_id: str
    campaign_id: str
    metric: str
    amount: Decimal
    campaign_name: str = ""
    platform: str = ""

    def __post_init__(self) -> None:
        stamp = self.timestamp
        if not isinstance(stamp, datetime):
            raise InputError(f"timestamp must be a datetime, got {stamp!r}", field="timestamp")
        if stamp.tzinfo is None or stamp.utcoffset() is None:
            raise InputError(
                f"timestamp {stamp.isoformat()} has no time zone (add Z or +HH:MM)",
                field="timestamp",
            )
        object.__setattr__(self, "timestamp", stamp.astimezone(UTC))
        for name in ("client_id", "campaign_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
                raise InputError(
                    f"{value!r} is not a valid id (letters, digits and _ . : @ -, "
                    "at most 128 chars)",
                    field=name,
                )
        if self.metric not in METRICS:
            raise InputError(
                f"metric must be 'spend' or 'ltv', got {self.metric!r}", field="metric"
            )
        amount = parse_amount(self.amount, field="amount")
        if not _AMOUNT.fullmatch(format(amount, "f")):
            raise InputError(f"not a decimal amount: {self.amount!r}", field="amount")
        object.__setattr__(self, "amount", amount)
        for name in ("campaign_name", "platform"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, "")
                continue
            if not isinstance(value, str):
                raise InputError(f"must be text, got {value!r}", field=name)
            problem = _text_problem(value)
            if problem:
                raise InputError(problem, field=name)

    def body(self, seq: int, prev_hash: str) -> str:
        """The record line for this event up to and including the comma before its hash."""
        return (
            f"{seq},{format_timestamp(self.timestamp)},{self.client_id},{self.campaign_id},"
            f"{self.metric},{format(self.amount, 'f')},{self.campaign_name},{self.platform},"
            f"{prev_hash},"
        )


class _Record(NamedTuple):
    """A validated record, as the reference validator returns it."""

    timestamp: str
    client_id: str
    campaign_id: str
    metric: str
    amount: str
    campaign_name: str
    platform: str
    record_hash: str


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as the trail's fixed-width UTC timestamp.

    Args:
        moment: A time-zone aware datetime.

    Returns:
        ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (27 characters).
    """
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def record_hash(body: bytes) -> str:
    """The ``record_hash`` of a record whose line, up to its last comma, is ``body``."""
    return hashlib.sha256(body).hexdigest()


def verify_audit_trail(path: Path) -> AuditSummary:
    """Verify the whole hash chain of an audit trail.

    Args:
        path: The audit trail file.

    Returns:
        The number of records, the chain head and the file's SHA-256.

    Raises:
        InputError: The file cannot be read, or a record is broken: the error names the file,
            the line of the first bad record (the header is line 1) and the field at fault.
    """
    return _scan(path, None).summary


def read_audit_trail(path: Path, window: PeriodWindow) -> MetricsSet:
    """Verify an audit trail and sum each campaign's spend and LTV over the billing period.

    A record counts for a period when its timestamp is in ``[start, end)`` of its client's
    window (midnight in the client's time zone). The whole chain is verified, including the
    records outside the period, in the same single pass.

    Args:
        path: The audit trail file.
        window: The billing period and each client's time zone.

    Returns:
        One :class:`CampaignMetrics` per client campaign with records in the period (sorted by
        client and campaign), and the evidence: file hash, record count and chain head.

    Raises:
        InputError: The chain is broken (see :func:`verify_audit_trail`), or a campaign's
            spend or LTV for the period totals less than zero.
    """
    scanner = _scan(path, window)
    summary = scanner.summary
    start, end = window.period.bounds("UTC")
    evidence = SourceEvidence(
        kind="audit_trail",
        location=str(path),
        sha256=summary.sha256,
        record_count=summary.records,
        chain_head=summary.head,
        window_start=start,
        window_end=end,
    )
    return MetricsSet(metrics=scanner.campaign_metrics(window), evidence=evidence)


def _scan(path: Path, window: PeriodWindow | None) -> _Scanner:
    where = str(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError("file not found", file=where) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", file=where) from None
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror}", file=where) from None
    scanner = _Scanner(where, window)
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)  # an append in progress finishes first
            with decimal.localcontext(_SUM_CONTEXT):
                scanner.read(handle)
        except OSError as exc:
            raise InputError(f"cannot read file: {exc.strerror}", file=where) from None
        except ArithmeticError as exc:  # pragma: no cover - needs a total of ~1e100
            raise InputError(f"a total is too large to sum exactly: {exc!r}", file=where) from None
    return scanner


# The fast check works on whole blocks of lines with C-level operations (split, map, join,
# translate, set and list comparisons), so that the Python-level work per record is tiny.
_BODY = itemgetter(slice(None, -64))  # a line's bytes up to the comma before record_hash
_SHA256 = hashlib.sha256()
_COPY = methodcaller("copy")
_UPDATE = type(_SHA256).update
_HEXDIGEST = type(_SHA256).hexdigest
_JOINT = "%s\n%d".__mod__  # "<record_hash>\n<next seq>"
_HOUR = itemgetter(slice(0, 13))  # "YYYY-MM-DDTHH" of a timestamp
_TS_SHAPE = b"0000-00-00T00:00:00.000000Z"
_TS_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_AMOUNT_CHARS = b"-.0123456789"
# A canonical amount of at most 14 characters has at most 14 integer and 12 fractional digits.
_FAST_AMOUNT_LENGTH = 14
_JOIN_KEY = ",".join
# Each record adds amount + _COUNT_UNIT to its key's sum, so that one exact Decimal carries
# both the record count (multiples of 1e40) and the total (|total| < 1e15 per record).
_COUNT_UNIT = Decimal("1e40")


def _unpack(packed: Decimal) -> tuple[int, Decimal]:
    """Split a key's packed sum into (records, total)."""
    records = int((packed + _COUNT_UNIT / 2) // _COUNT_UNIT)
    return records, packed - records * _COUNT_UNIT


class _Scanner:
    """One pass over an audit trail: verifies the chain and, given a window, sums the period.

    Aggregation is by *key*, the record's ``client_id,campaign_id,metric,campaign_name,
    platform`` (validated once per distinct key). Keys are folded into campaigns at the end.
    Which name is the last one of a campaign is only tracked once a campaign has shown two
    different (name, platform) pairs: before that, all its records carry the same pair.
    """

    def __init__(self, where: str, window: PeriodWindow | None) -> None:
        self.where = where
        self.window = window
        self.seq = 0
        self.prev = ZERO_HASH
        self.summary = AuditSummary(records=0, head=ZERO_HASH, sha256="")
        self.hours: set[str] = set()  # "YYYY-MM-DDTHH" prefixes already validated
        self.keys: set[str] = set()  # keys already validated
        self.parts: dict[str, tuple[str, str, str, str, str]] = {}
        self.key_bounds: dict[str, tuple[str, str]] = {}
        self.client_bounds: dict[str, tuple[str, str]] = {}
        # key -> sum of (amount + _COUNT_UNIT) over the key's records in the window
        self.sums: defaultdict[str, Decimal] = defaultdict(Decimal)
        self.first: dict[str, int] = {}  # seq of a key's first record in the window
        self.last: dict[str, int] = {}  # seq of a tracked key's last record in the window
        self.tracked: set[str] = set()
        self.variants: dict[tuple[str, str], list[str]] = {}
        self.ambiguous: set[tuple[str, str]] = set()
        self.tainted = False  # the fast path gave up after changing the sums
        # Blocks entirely inside every client's window, or outside all of them, skip the
        # per-record window test.
        if window is None:
            self.inside_all = self.outside_all = ("", "~")
        else:
            edges = [window.period.bounds(zone) for zone in window.distinct_timezones()]
            starts = [format_timestamp(start) for start, _ in edges]
            ends = [format_timestamp(end) for _, end in edges]
            self.inside_all = (max(starts), min(ends))
            self.outside_all = (min(starts), max(ends))

    def read(self, handle: BinaryIO) -> None:
        """Read and check the whole file, in blocks of complete lines."""
        file_hash = hashlib.sha256()
        pending: list[bytes] = []  # the start of a line longer than what was read so far
        header_seen = False
        while True:
            chunk = handle.read(_BLOCK_SIZE)
            if not chunk:
                break
            file_hash.update(chunk)
            cut = chunk.rfind(b"\n") + 1
            if not cut:
                pending.append(chunk)
                continue
            data = b"".join([*pending, chunk[:cut]]) if pending else chunk[:cut]
            pending = [chunk[cut:]] if cut < len(chunk) else []
            if not header_seen:
                end = data.index(b"\n")
                self._check_header(data[:end])
                header_seen = True
                data = data[end + 1 :]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                good = data.rfind(b"\n", 0, exc.start) + 1
                if good:
                    self._block(data[:good], data[:good].decode("utf-8"))
                raise _utf8_error(data, exc.start, self.seq, self.where) from None
            if text:
                self._block(data, text)
        if not header_seen:
            raise InputError(
                "no header line: expected the audit trail header followed by a newline",
                file=self.where,
                row=1,
                field="header",
            )
        if pending:
            raise _record_error(
                self.where,
                self.seq + 1,
                None,
                "the last line is incomplete (no newline at the end of the file): the file "
                "was truncated or a write did not finish",
            )
        self.summary = AuditSummary(records=self.seq, head=self.prev, sha256=file_hash.hexdigest())

    def _check_header(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"not UTF-8 (byte 0x{raw[exc.start]:02x})", file=self.where, row=1, field="header"
            ) from None
        if line == HEADER:
            return
        hint = " (it starts with a byte-order mark)" if line.startswith("\ufeff") else ""
        raise InputError(
            f"header is not the audit trail header{hint}: expected {HEADER!r}, got {line[:200]!r}",
            file=self.where,
            row=1,
            field="header",
        )

    def _block(self, data: bytes, text: str) -> None:
        if not self._fast_block(data, text):
            self._slow_block(text)

    def _fast_block(self, data: bytes, text: str) -> bool:
        """Check and sum a block of canonical records; ``False``: check it record by record.

        Exact: it accepts a block only if every record in it is valid. It may refuse a valid
        block it cannot check quickly (an amount like ``0.0000001``); it changes nothing
        before refusing, except when a key is invalid, and then the block is invalid anyway.
        """
        lines = data.split(b"\n")
        lines.pop()
        count = len(lines)
        fields = text.split(",")
        # Splitting the block on commas alone keeps each line's record_hash and the next
        # line's seq in one piece, "<record_hash>\n<seq>": comparing those pieces with the
        # computed hashes checks every hash, every seq and that every line has 10 fields.
        if len(fields) != 9 * count + 1:
            return False
        seq = self.seq
        # Copying a ready SHA-256 object is cheaper than creating one (OpenSSL 3 looks the
        # algorithm up on every creation).
        hashers = list(map(_COPY, repeat(_SHA256, count)))
        deque(map(_UPDATE, hashers, map(_BODY, lines)), 0)
        hashes = list(map(_HEXDIGEST, hashers))
        joints = list(map(_JOINT, zip(hashes, range(seq + 2, seq + count + 2), strict=True)))
        joints[-1] = hashes[-1] + "\n"  # the last line has no next seq
        if (
            fields[0] != str(seq + 1)
            or joints != fields[9::9]
            or fields[8] != self.prev
            or fields[17::9] != hashes[:-1]  # the prev_hash of every other record
        ):
            return False
        stamps = fields[1::9]
        joined = "".join(stamps)
        if not (
            joined.isascii()
            and joined.encode().translate(_TS_DIGITS) == _TS_SHAPE * count
            and max(joined[14::27]) <= "5"  # minutes
            and max(joined[17::27]) <= "5"  # seconds
        ):
            return False
        earliest, latest = min(stamps), max(stamps)
        # Equal-length strings between two that share a prefix share it too: usually the
        # whole block is within one hour and only that hour needs to be a valid one.
        hour = earliest[:13]
        hours = {hour} if latest[:13] == hour else set(map(_HOUR, stamps))
        if not hours <= self.hours and not self._learn_hours(hours):
            return False
        amounts = fields[5::9]
        if (
            "".join(amounts).encode().translate(None, _AMOUNT_CHARS)
            or max(map(len, amounts)) > _FAST_AMOUNT_LENGTH
        ):
            return False
        try:
            values = list(map(Decimal, amounts))
        except ArithmeticError:
            return False
        if list(map(str, values)) != amounts:  # no leading zeros, "5.", ".5", "-"...
            return False
        columns = (fields[2::9], fields[3::9], fields[4::9], fields[6::9], fields[7::9])
        keys = list(map(_JOIN_KEY, zip(*columns, strict=True)))
        if (
            self.window is not None
            and self.inside_all[0] <= earliest <= latest < self.inside_all[1]
        ):
            if not self._sum_inside(seq, keys, values):
                return False
        else:
            distinct = set(keys)
            if not distinct <= self.keys and not self._learn_keys(distinct):
                return False
            if self.window is not None and not (
                latest < self.outside_all[0] or earliest >= self.outside_all[1]
            ):
                bounds = self.key_bounds
                for number, key, stamp, value in zip(count_from(seq + 1), keys, stamps, values):
                    start, end = bounds[key]
                    if start <= stamp < end:
                        self._add(key, value, number)
        self.seq = seq + count
        self.prev = hashes[-1]
        return True

    def _learn_hours(self, hours: set[str]) -> bool:
        for hour in hours - self.hours:
            try:
                datetime(int(hour[:4]), int(hour[5:7]), int(hour[8:10]), int(hour[11:13]))
            except ValueError:
                return False
            self.hours.add(hour)
        return True

    def _learn_keys(self, keys: set[str]) -> bool:
        for key in keys - self.keys:
            match = _KEY.fullmatch(key)
            if match is None:
                return False
            client, campaign, metric, name, platform = match.groups()
            self._register(key, (client, campaign, metric, name, platform))
        return True

    def _register(self, key: str, parts: tuple[str, str, str, str, str]) -> None:
        self.keys.add(key)
        if self.window is None:
            return
        client, campaign, _, name, platform = parts
        self.parts[key] = parts
        bounds = self.client_bounds.get(client)
        if bounds is None:
            start, end = self.window.bounds(client)
            bounds = self.client_bounds[client] = (format_timestamp(start), format_timestamp(end))
        self.key_bounds[key] = bounds
        both = (client, campaign)
        variants = self.variants.setdefault(both, [])
        variants.append(key)
        if both in self.ambiguous:
            self.tracked.add(key)
        elif self.parts[variants[0]][3:] != (name, platform):
            # From now on, remember where each of this campaign's keys was last seen; the
            # records before this block all carry the campaign's one earlier pair.
            self.ambiguous.add(both)
            self.tracked.update(variants)

    def _sum_inside(self, seq: int, keys: list[str], values: list[Decimal]) -> bool:
        """Sum a block whose records are all inside their window; ``False`` if a key is bad.

        The keys are only looked up once, by the summing itself: a key the sums have not seen
        (its first record in the window, or a key never validated) makes them grow, and only
        then are the new keys checked. The hot path touches each key's entry once.
        """
        sums = self.sums
        before = len(sums)
        packed = map(add, values, repeat(_COUNT_UNIT))
        deque(map(sums.__setitem__, keys, map(add, map(sums.__getitem__, keys), packed)), 0)
        distinct: set[str] | None = None
        if len(sums) != before:
            distinct = set(keys)
            new = distinct.difference(self.first)
            if not self._learn_keys(new):
                # A bad key: the block is invalid and the reference path will raise at its
                # first bad record; the sums no longer matter.
                self.tainted = True
                return False
            count = len(keys)
            first_at = dict(zip(reversed(keys), range(seq + count, seq, -1), strict=True))
            for key in new:
                self.first[key] = first_at[key]
        if self.tracked:
            seen = (distinct or set(keys)) & self.tracked
            if seen:
                last_at = dict(zip(keys, count_from(seq + 1)))
                for key in seen:
                    self.last[key] = last_at[key]
        return True

    def _add(self, key: str, value: Decimal, number: int) -> None:
        self.sums[key] += value + _COUNT_UNIT
        self.first.setdefault(key, number)
        if key in self.tracked:
            self.last[key] = number

    def _slow_block(self, text: str) -> None:
        """The reference path: validate record by record; raise at the first bad one."""
        lines = text.split("\n")
        lines.pop()
        for line in lines:
            number = self.seq + 1
            record = _parse_record(line, number, self.prev, self.where)
            self.seq = number
            self.prev = record.record_hash
            parts = (
                record.client_id,
                record.campaign_id,
                record.metric,
                record.campaign_name,
                record.platform,
            )
            key = _JOIN_KEY(parts)
            if key not in self.keys:
                self._register(key, parts)
            if self.window is not None:
                start, end = self.key_bounds[key]
                if start <= record.timestamp < end:
                    self._add(key, Decimal(record.amount), number)
        if self.tainted:  # pragma: no cover - the fast path refuses only invalid keys
            raise RuntimeError("audit trail reader: fast and reference checks disagree")

    def campaign_metrics(self, window: PeriodWindow) -> tuple[CampaignMetrics, ...]:
        """Fold the keys into one :class:`CampaignMetrics` per campaign with records."""
        with decimal.localcontext(_SUM_CONTEXT):
            return self._campaign_metrics(window)

    def _campaign_metrics(self, window: PeriodWindow) -> tuple[CampaignMetrics, ...]:
        metrics: list[CampaignMetrics] = []
        sums, first, last, parts = self.sums, self.first, self.last, self.parts
        for (client, campaign), keys in sorted(self.variants.items()):
            spend = ltv = Decimal(0)
            records, first_seq = 0, sys.maxsize
            name = platform = ""
            name_at = platform_at = -1
            for key in keys:
                packed = sums.get(key)
                if packed is None:  # no record of this key in the window
                    continue
                count, total = _unpack(packed)
                _, _, metric, key_name, key_platform = parts[key]
                if metric == "spend":
                    spend += total
                else:
                    ltv += total
                records += count
                first_seq = min(first_seq, first[key])
                # Untracked keys are 0: their campaign had a single (name, platform) pair.
                at = last.get(key, 0)
                if key_name and at >= name_at:
                    name, name_at = key_name, at
                if key_platform and at >= platform_at:
                    platform, platform_at = key_platform, at
            if not records:
                continue
            row = first_seq + 1
            for what, amount in (("spend", spend), ("ltv", ltv)):
                if amount < 0:
                    raise InputError(
                        f"client {client!r} campaign {campaign!r}: {what} for "
                        f"{window.period.label} totals {amount}, below zero (corrections exceed "
                        "the amounts recorded)",
                        file=self.where,
                        row=row,
                        field="amount",
                    )
            try:
                metrics.append(
                    CampaignMetrics(
                        client_id=client,
                        campaign_id=campaign,
                        spend=spend or spend.copy_abs(),  # never "-0"
                        ltv=ltv or ltv.copy_abs(),
                        campaign_name=name or None,
                        platform=platform or None,
                        record_count=records,
                        origin_file=self.where,
                        origin_row=row,
                    )
                )
            except ValidationError as exc:
                prefix = f"client {client!r} campaign {campaign!r}: "
                raise validation_to_input_error(
                    exc, file=self.where, row=row, prefix=prefix
                ) from None
        return tuple(metrics)


def _record_error(where: str, record_no: int, field: str | None, message: str) -> InputError:
    return InputError(f"record {record_no}: {message}", file=where, row=record_no + 1, field=field)


def _utf8_error(data: bytes, offset: int, seq: int, where: str) -> InputError:
    line_start = data.rfind(b"\n", 0, offset) + 1
    message = f"not UTF-8 (byte 0x{data[offset]:02x})"
    index = data.count(b",", line_start, offset)
    field = FIELDS[index] if index < len(FIELDS) else None
    return _record_error(where, seq + 1, field, message)


def _text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a ``campaign_name`` or ``platform``, or ``None``."""
    bad = _BAD_TEXT_CHAR.search(value)
    if bad is None:
        return None
    return f"must not contain {bad.group()!r} (no comma, quote, control character or newline)"


def _parse_record(line: str, record_no: int, prev: str, where: str) -> _Record:
    """Validate one record line completely: the reference for the fast check.

    Args:
        line: The line, without its newline.
        record_no: Its position in the file (1 for the line after the header).
        prev: The ``record_hash`` of the record before it (64 zeros for the first).
        where: The file, for errors.

    Returns:
        The record's fields.

    Raises:
        InputError: The first problem found, naming the record's line and the field.
    """

    def fail(field: str | None, message: str) -> InputError:
        return _record_error(where, record_no, field, message)

    fields = line.split(",")
    if len(fields) != len(FIELDS):
        if line == "":
            raise fail(None, "empty line")
        raise fail(
            None,
            f"has {len(fields)} comma-separated fields, expected {len(FIELDS)} "
            "(a comma or newline was added or removed)",
        )
    seq, ts, client, campaign, metric, amount, name, platform, prev_hash, own_hash = fields
    if not _SEQ.fullmatch(seq):
        raise fail("seq", f"seq must be a whole number without leading zeros, got {seq!r}")
    if not _TIMESTAMP.fullmatch(ts):
        raise fail("timestamp", f"timestamp must be YYYY-MM-DDTHH:MM:SS.ffffffZ, got {ts!r}")
    try:
        datetime.fromisoformat(ts[:-1])
    except ValueError:
        raise fail("timestamp", f"timestamp is not a valid date and time: {ts!r}") from None
    for field, value in (("client_id", client), ("campaign_id", campaign)):
        if not _IDENTIFIER.fullmatch(value):
            raise fail(
                field,
                f"{value!r} is not a valid id (letters, digits and _ . : @ -, at most 128 chars)",
            )
    if metric not in METRICS:
        raise fail("metric", f"metric must be 'spend' or 'ltv', got {metric!r}")
    if not _AMOUNT.fullmatch(amount):
        raise fail(
            "amount",
            f"not a canonical decimal amount: {amount!r} (digits, an optional '-' and '.', "
            "at most 15 integer and 12 fractional digits)",
        )
    for field, value in (("campaign_name", name), ("platform", platform)):
        problem = _text_problem(value)
        if problem:
            raise fail(field, problem)
    for field, value in (("prev_hash", prev_hash), ("record_hash", own_hash)):
        if not _HEX64.fullmatch(value):
            raise fail(field, f"{field} must be 64 lowercase hex digits, got {value[:80]!r}")
    if record_hash(line[:-64].encode()) != own_hash:
        raise fail(
            "record_hash",
            "record_hash does not match the record's content: the record was altered",
        )
    if int(seq) != record_no:
        raise fail(
            "seq",
            f"seq is {seq}, expected {record_no}: a record is missing, repeated or out of order",
        )
    if prev_hash != prev:
        expected = (
            "64 zeros (it is the first record)"
            if record_no == 1
            else f"the record_hash of record {record_no - 1}"
        )
        raise fail(
            "prev_hash",
            f"prev_hash is not {expected}: a record before it was removed, replaced or reordered",
        )
    return _Record(ts, client, campaign, metric, amount, name, platform, own_hash)


def append_audit_events(path: Path, events: Iterable[AuditEvent]) -> str:
    """Append events to an audit trail, creating it (with its header) if absent.

    The file is locked (``flock``, exclusive) for the whole append; only its tail is read, to
    find the last record, whose own hash and seq are checked (and its link to the record
    before it). All lines are written at once, then flushed and ``fsync``-ed. When anything
    fails, nothing is appended.

    Args:
        path: The audit trail file.
        events: The events, in the order to record them.

    Returns:
        The new chain head.

    Raises:
        InputError: An event is invalid, the file is not an audit trail or its last record is
            broken, or the file cannot be written.
    """
    items = list(events)
    for number, event in enumerate(items, start=1):
        if not isinstance(event, AuditEvent):
            raise InputError(f"event {number} is a {type(event).__name__}, not an AuditEvent")
    where = str(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InputError(f"cannot open file for appending: {exc.strerror}", file=where) from None
    created = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size == 0:
            created = True
            seq, prev, parts = 0, ZERO_HASH, [HEADER + "\n"]
        else:
            seq, prev = _read_tail(fd, size, where)
            parts = []
        for event in items:
            seq += 1
            body = event.body(seq, prev)
            own = record_hash(body.encode())
            # Never write a line the reader would refuse.
            _parse_record(body + own, seq, prev, where)
            parts.append(body + own + "\n")
            prev = own
        if parts:
            _write_all(fd, "".join(parts).encode(), size, where)
    finally:
        os.close(fd)  # also releases the lock
    if created:
        _fsync_directory(path.parent)
    return prev


def _write_all(fd: int, data: bytes, size: int, where: str) -> None:
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):  # leave the file as it was, not half a record
            os.ftruncate(fd, size)
        raise InputError(f"cannot write: {exc.strerror}", file=where) from None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - e.g. no permission to open the directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _read_tail(fd: int, size: int, where: str) -> tuple[int, str]:
    """The seq and hash of the last record (0 and 64 zeros when there is none).

    Reads the header and as much of the end of the file as it takes to see the last two
    lines; checks the own hash of both, the last one's seq and its link to the one before.
    """
    head = os.pread(fd, len(HEADER) + 1, 0)
    if head != (HEADER + "\n").encode():
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        raise InputError(
            f"not an audit trail: expected the header {HEADER!r}, got {first!r}",
            file=where,
            row=1,
            field="header",
        )
    length = min(size, _TAIL_SIZE)
    while True:
        tail = os.pread(fd, length, size - length)
        if not tail.endswith(b"\n"):
            raise InputError(
                "cannot append: the last line is incomplete (no newline at the end of the "
                "file); run 'kiki-billing audit verify' on it",
                file=where,
            )
        lines = tail[:-1].split(b"\n")
        # Unless the tail is the whole file, its first piece may be part of a line.
        if length == size or len(lines) >= 3:
            break
        length = min(size, length * 4)
    if length == size and len(lines) == 1:
        return 0, ZERO_HASH  # only the header
    try:
        last, before = lines[-1].decode("utf-8"), lines[-2].decode("utf-8")
        if length == size and len(lines) == 2:
            expected_seq, expected_prev = 1, ZERO_HASH
        else:
            claimed = _claimed_seq(before)
            fields = before.split(",")
            own_prev = fields[8] if len(fields) == len(FIELDS) else ""
            expected_prev = _parse_record(before, claimed, own_prev, where).record_hash
            expected_seq = claimed + 1
        return expected_seq, _parse_record(last, expected_seq, expected_prev, where).record_hash
    except UnicodeDecodeError:
        raise InputError(
            "cannot append: the last records are not UTF-8; run 'kiki-billing audit verify'",
            file=where,
        ) from None
    except InputError as exc:
        raise InputError(
            f"cannot append: {exc.message}; run 'kiki-billing audit verify'",
            file=where,
            row=exc.row,
            field=exc.field,
        ) from None


def _claimed_seq(line: str) -> int:
    text = line.split(",", 1)[0]
    return int(text) if _SEQ.fullmatch(text) else 1
