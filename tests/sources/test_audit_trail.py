"""The hash-chained audit trail: format, verification, period sums, appending and the CLI."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kiki_billing.audit_cli import audit_app
from kiki_billing.errors import InputError
from kiki_billing.models import BillingPeriod, Contract
from kiki_billing.profit_share import compute_run
from kiki_billing.sources import audit_trail
from kiki_billing.sources.audit_trail import (
    HEADER,
    ZERO_HASH,
    AuditEvent,
    append_audit_events,
    format_timestamp,
    read_audit_trail,
    verify_audit_trail,
)
from kiki_billing.sources.base import PeriodWindow

JANUARY = PeriodWindow(BillingPeriod.month("2026-01"))
runner = CliRunner()


def event(
    when: str,
    client: str,
    campaign: str,
    metric: str,
    amount: str,
    name: str = "",
    platform: str = "",
) -> AuditEvent:
    return AuditEvent(
        timestamp=datetime.fromisoformat(when),
        client_id=client,
        campaign_id=campaign,
        metric=metric,
        amount=Decimal(amount),
        campaign_name=name,
        platform=platform,
    )


def make_trail(path: Path, count: int = 6) -> list[AuditEvent]:
    """``count`` events over January for two clients, appended in three batches."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events = [
        AuditEvent(
            timestamp=start + timedelta(hours=7 * n, microseconds=n),
            client_id=f"client-{n % 2}",
            campaign_id=f"campaign.{n % 3}",
            metric="spend" if n % 2 else "ltv",
            amount=Decimal(f"{n + 1}.{n % 100:02d}"),
            campaign_name=f"Campaign {n % 3}",
            platform="Meta Ads",
        )
        for n in range(count)
    ]
    third = max(count // 3, 1)
    for batch in (events[:third], events[third : 2 * third], events[2 * third :]):
        append_audit_events(path, batch)
    return events


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def rehash(line: bytes) -> bytes:
    """Recompute a line's own record_hash (as a forger would)."""
    body = line[:-64]
    return body + hashlib.sha256(body).hexdigest().encode()


def broken(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        verify_audit_trail(path)
    return info.value


# --- the format --------------------------------------------------------------------------


def test_append_writes_the_documented_format(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    head = append_audit_events(
        trail,
        [
            event("2026-01-15T10:30:00+01:00", "acme", "campaign_001", "spend", "36000.00"),
            event("2026-01-15T12:00:00Z", "acme", "campaign_001", "ltv", "130090.00", "Q1", "Meta"),
        ],
    )
    lines = trail.read_text(encoding="utf-8").split("\n")
    assert lines[0] == HEADER
    assert lines[-1] == ""
    first = lines[1].split(",")
    assert first[:8] == [
        "1",
        "2026-01-15T09:30:00.000000Z",
        "acme",
        "campaign_001",
        "spend",
        "36000.00",
        "",
        "",
    ]
    assert first[8] == ZERO_HASH
    body = lines[1][:-64].encode()
    assert first[9] == hashlib.sha256(body).hexdigest()
    second = lines[2].split(",")
    assert second[0] == "2" and second[8] == first[9]
    assert second[6:8] == ["Q1", "Meta"]
    assert head == second[9]


def test_timestamps_are_fixed_width_utc() -> None:
    moment = datetime(2026, 3, 1, 0, 30, tzinfo=UTC) + timedelta(hours=-1)
    assert format_timestamp(moment) == "2026-02-28T23:30:00.000000Z"
    assert len(format_timestamp(datetime(1, 1, 1, tzinfo=UTC))) == 27


# --- round trip and the period window -----------------------------------------------------


def test_round_trip_append_verify_read_gives_exact_totals(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    events = make_trail(trail, 30)
    summary = verify_audit_trail(trail)
    assert summary.records == 30
    assert summary.sha256 == hashlib.sha256(trail.read_bytes()).hexdigest()
    assert summary.head == lines_of(trail)[-1][-64:].decode()

    result = read_audit_trail(trail, JANUARY)
    expected: dict[tuple[str, str], list[Decimal]] = {}
    for item in events:
        totals = expected.setdefault((item.client_id, item.campaign_id), [Decimal(0)] * 3)
        totals[0 if item.metric == "spend" else 1] += item.amount
        totals[2] += 1
    got = {(m.client_id, m.campaign_id): [m.spend, m.ltv, m.record_count] for m in result.metrics}
    assert got == {key: [s, ltv, int(n)] for key, (s, ltv, n) in expected.items()}
    assert [(m.client_id, m.campaign_id) for m in result.metrics] == sorted(got)
    evidence = result.evidence
    assert evidence.kind == "audit_trail"
    assert evidence.location == str(trail)
    assert evidence.record_count == 30
    assert evidence.chain_head == summary.head
    assert evidence.sha256 == summary.sha256
    assert evidence.window_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert evidence.window_end == datetime(2026, 2, 1, tzinfo=UTC)


def test_window_includes_its_start_and_excludes_its_end(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    append_audit_events(
        trail,
        [
            event("2025-12-31T23:59:59.999999Z", "acme", "c1", "spend", "1000.00"),
            event("2026-01-01T00:00:00Z", "acme", "c1", "spend", "1.00", "Launch", "Meta"),
            event("2026-01-31T23:59:59.999999Z", "acme", "c1", "ltv", "5.00"),
            event("2026-02-01T00:00:00Z", "acme", "c1", "ltv", "2000.00"),
        ],
    )
    (metrics,) = read_audit_trail(trail, JANUARY).metrics
    assert (metrics.spend, metrics.ltv, metrics.record_count) == (
        Decimal("1.00"),
        Decimal("5.00"),
        2,
    )
    assert metrics.origin_row == 3  # the campaign's first record in the period
    assert (metrics.campaign_name, metrics.platform) == ("Launch", "Meta")


def test_window_of_a_client_in_another_time_zone(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    # January in New York is [2026-01-01T05:00Z, 2026-02-01T05:00Z).
    append_audit_events(
        trail,
        [
            event("2026-01-01T04:59:59.999999Z", "nyc", "c1", "spend", "1000.00"),
            event("2026-01-01T00:00:00-05:00", "nyc", "c1", "spend", "10.00"),
            event("2026-02-01T04:59:59Z", "nyc", "c1", "ltv", "40.00"),
            event("2026-02-01T05:00:00Z", "nyc", "c1", "ltv", "2000.00"),
            event("2026-01-01T04:00:00Z", "utc-client", "c9", "spend", "7.00"),
            event("2026-02-01T04:00:00Z", "utc-client", "c9", "spend", "9.00"),
        ],
    )
    window = PeriodWindow(BillingPeriod.month("2026-01"), {"nyc": "America/New_York"})
    metrics = read_audit_trail(trail, window).metrics
    got = {m.client_id: (m.spend, m.ltv, m.record_count) for m in metrics}
    assert got == {
        "nyc": (Decimal("10.00"), Decimal("40.00"), 2),
        "utc-client": (Decimal("7.00"), Decimal("0"), 1),
    }


def test_window_filter_across_many_blocks(tmp_path: Path) -> None:
    """Thousands of records spanning three months: blocks inside, outside and across edges."""
    trail = tmp_path / "trail.csv"
    start = datetime(2025, 12, 20, tzinfo=UTC)
    events = [
        AuditEvent(
            timestamp=start + timedelta(minutes=37 * n),
            client_id=f"c{n % 7}",
            campaign_id=f"k{n % 5}",
            metric="spend" if n % 3 else "ltv",
            amount=Decimal(n % 1000) / 100 + 1,
            campaign_name=f"name-{n // 1500}",  # renamed twice
        )
        for n in range(4000)
    ]
    append_audit_events(trail, events)
    window = PeriodWindow(BillingPeriod.month("2026-01"), {"c3": "Asia/Tokyo"})
    expected: dict[tuple[str, str], list[object]] = {}
    for number, item in enumerate(events, start=1):
        lo, hi = window.bounds(item.client_id)
        if lo <= item.timestamp < hi:
            totals = expected.setdefault(
                (item.client_id, item.campaign_id), [Decimal(0), Decimal(0), 0, number, ""]
            )
            totals[0 if item.metric == "spend" else 1] += item.amount  # type: ignore[operator]
            totals[2] += 1  # type: ignore[operator]
            totals[4] = item.campaign_name
    result = read_audit_trail(trail, window)
    got: dict[tuple[str, str], list[object]] = {}
    for m in result.metrics:
        first = (m.origin_row or 0) - 1
        got[(m.client_id, m.campaign_id)] = [m.spend, m.ltv, m.record_count, first, m.campaign_name]
    assert got == expected


def test_unusual_amounts_take_the_reference_path_and_stay_exact(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    amounts = ["0.0000001", "123456789012345.123456789012", "-0", "0.000000000001", "-12.5", "7"]
    append_audit_events(
        trail,
        [event("2026-01-02T00:00:00Z", "acme", "c1", "ltv", amount) for amount in amounts],
    )
    (metrics,) = read_audit_trail(trail, JANUARY).metrics
    assert metrics.ltv == sum(Decimal(a) for a in amounts)
    assert metrics.ltv == Decimal("123456789012339.623456889013")


def test_last_non_empty_name_and_platform_win(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    append_audit_events(
        trail,
        [
            event("2026-01-02T00:00:00Z", "acme", "c1", "spend", "1", "Old", "Meta"),
            event("2026-01-03T00:00:00Z", "acme", "c1", "ltv", "1", "New", ""),
            event("2026-01-04T00:00:00Z", "acme", "c1", "spend", "1", "", ""),
            event("2026-02-04T00:00:00Z", "acme", "c1", "spend", "1", "Next month", "X"),
        ],
    )
    (metrics,) = read_audit_trail(trail, JANUARY).metrics
    assert (metrics.campaign_name, metrics.platform) == ("New", "Meta")


def test_negative_period_total_is_an_error(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    append_audit_events(
        trail,
        [
            event("2026-01-02T00:00:00Z", "acme", "c1", "spend", "10.00"),
            event("2026-01-03T00:00:00Z", "acme", "c1", "spend", "-12.00"),
            event("2026-01-04T00:00:00Z", "acme", "c1", "ltv", "-1.00"),
            event("2026-02-04T00:00:00Z", "acme", "c1", "ltv", "5.00"),
        ],
    )
    with pytest.raises(InputError) as info:
        read_audit_trail(trail, JANUARY)
    error = info.value
    assert (error.file, error.row, error.field) == (str(trail), 2, "amount")
    assert "spend" in error.message and "-2.00" in error.message


def test_worked_example_from_an_audit_trail(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    splits = {
        ("acme", "campaign_001", "Meta Ads"): (
            ["12000.00", "20000.00", "4000.00"],
            ["100000.00", "30090.00"],
        ),
        ("techstartup", "campaign_002", "Google Ads"): (
            ["44000.00"],
            ["64130.00", "60000.00", "40000.00"],
        ),
        ("ecommerce", "campaign_003", "TikTok Ads"): (
            ["25000.00", "15500.00", "-500.00"],
            ["137530.00"],
        ),
        ("saas", "campaign_004", "LinkedIn Ads"): (["5000.00"] * 5, ["84460.00", "0.00"]),
    }
    events = []
    day = 1
    for (client, campaign, platform), (spends, ltvs) in splits.items():
        for metric, amounts in (("spend", spends), ("ltv", ltvs)):
            for amount in amounts:
                when = f"2026-01-{day:02d}T12:00:00Z"
                events.append(event(when, client, campaign, metric, amount, "", platform))
                day = day % 28 + 1
    events.append(event("2026-02-01T00:00:00Z", "acme", "campaign_001", "ltv", "99999.00"))
    for start in range(0, len(events), 4):
        append_audit_events(trail, events[start : start + 4])
    contracts = [
        Contract(client_id="acme", name="Acme Corp"),
        Contract(client_id="techstartup", name="TechStartup Inc"),
        Contract(client_id="ecommerce", name="E-commerce Co"),
        Contract(client_id="saas", name="SaaS Platform"),
    ]
    result = read_audit_trail(trail, JANUARY)
    run = compute_run(contracts, result.metrics, JANUARY.period, [result.evidence])
    (totals,) = run.summary.by_currency
    assert totals.total_fee == Decimal("8121.00")
    assert totals.total_spend == Decimal("145000.00")
    assert totals.total_ltv == Decimal("516210.00")
    assert totals.total_margin_recovered == Decimal("81210.00")
    assert totals.client_keeps == Decimal("73089.00")
    fees = {inv.client_id: inv.total_fee for inv in run.invoices}
    assert fees == {
        "acme": Decimal("2209.00"),
        "techstartup": Decimal("3213.00"),
        "ecommerce": Decimal("1753.00"),
        "saas": Decimal("946.00"),
    }
    proof = run.invoices[0].proof
    assert proof.sources[0].chain_head == verify_audit_trail(trail).head
    assert proof.sources[0].record_count == len(events)


def test_canonical_blocks_never_need_the_reference_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = tmp_path / "trail.csv"
    events = make_trail(trail, 3000)
    in_january = sum(1 for e in events if e.timestamp < datetime(2026, 2, 1, tzinfo=UTC))

    def refuse(self: object, text: str) -> None:
        raise AssertionError("the fast check refused a canonical block")

    monkeypatch.setattr(audit_trail._Scanner, "_slow_block", refuse)
    assert verify_audit_trail(trail).records == 3000
    metrics = read_audit_trail(trail, JANUARY).metrics
    assert sum(m.record_count for m in metrics) == in_january == 107


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.deferred(lambda: EVENTS), min_size=1, max_size=12))
def test_fast_and_reference_paths_agree(events: list[AuditEvent]) -> None:
    window = PeriodWindow(BillingPeriod.month("2050-06"), {"b": "Asia/Kolkata"})
    with tempfile.TemporaryDirectory() as scratch:
        trail = Path(scratch) / "trail.csv"
        append_audit_events(trail, events)
        outcomes = []
        for fast in (audit_trail._Scanner._fast_block, lambda *args: False):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(audit_trail._Scanner, "_fast_block", fast)
                try:
                    result = read_audit_trail(trail, window)
                    outcomes.append(
                        [(m.model_dump(), m.origin_row) for m in result.metrics] + [result.evidence]
                    )
                except InputError as exc:
                    outcomes.append([str(exc)])
    assert outcomes[0] == outcomes[1]


# --- breaks: the first bad record is named ------------------------------------------------


def test_tampered_amount(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[3] = lines[3].replace(b",3.02,", b",9.02,")
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.file, error.row, error.field) == (str(trail), 4, "record_hash")
    assert error.message.startswith("record 3: ")
    assert "altered" in error.message


def test_tampered_amount_with_its_hash_recomputed(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[3] = rehash(lines[3].replace(b",3.02,", b",9.02,"))
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (5, "prev_hash")  # the next record no longer links
    assert error.message.startswith("record 4: ")


def test_non_canonical_amount_names_the_field(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[2] = rehash(lines[2].replace(b",2.01,", b",2.010e0,"))
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (3, "amount")


def test_reordered_lines(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (3, "seq")
    assert "seq is 3, expected 2" in error.message


def test_deleted_middle_line(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    del lines[3]
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (4, "seq")
    assert "record 3: seq is 4, expected 3" in error.message


def test_bad_header(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    trail.write_bytes(trail.read_bytes().replace(b"campaign_name", b"campaign", 1))
    error = broken(trail)
    assert (error.row, error.field) == (1, "header")


def test_byte_order_mark_is_a_bad_header(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    trail.write_bytes(b"\xef\xbb\xbf" + trail.read_bytes())
    error = broken(trail)
    assert (error.row, error.field) == (1, "header")
    assert "byte-order mark" in error.message


def test_non_utf8_byte(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[4] = lines[4].replace(b"Campaign", b"Camp\xffign")
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (5, "campaign_name")
    assert "not UTF-8 (byte 0xff)" in error.message


def test_bad_prev_hash(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    fields = lines[4].split(b",")
    fields[8] = b"f" * 64
    lines[4] = rehash(b",".join(fields))
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (5, "prev_hash")
    assert "record 4: prev_hash is not the record_hash of record 3" in error.message


def test_first_bad_record_wins(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[5] = lines[5].replace(b"Meta", b"Mexa")
    lines[2] = lines[2].replace(b"Meta", b"Mexa")
    write_lines(trail, lines)
    assert broken(trail).row == 3


def test_truncated_last_line(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    trail.write_bytes(trail.read_bytes()[:-10])
    error = broken(trail)
    assert error.row == 7
    assert "incomplete" in error.message


def test_truncation_at_a_record_boundary_is_not_detectable(tmp_path: Path) -> None:
    """Documented limit: compare the record count and head with the invoice's evidence."""
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    full = verify_audit_trail(trail)
    write_lines(trail, lines_of(trail)[:-2])
    cut = verify_audit_trail(trail)
    assert (cut.records, full.records) == (4, 6)
    assert cut.head != full.head


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    trail.write_bytes(b"")
    assert (broken(trail).row, broken(trail).field) == (1, "header")
    trail.write_text(HEADER + "\n")
    assert verify_audit_trail(trail).records == 0
    assert verify_audit_trail(trail).head == ZERO_HASH
    assert read_audit_trail(trail, JANUARY).metrics == ()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        verify_audit_trail(tmp_path / "nope.csv")


def test_break_deep_in_a_large_trail(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail, 3000)  # several read blocks
    lines = lines_of(trail)
    lines[2500] = lines[2500].replace(b"Meta Ads", b"Meta Adz")
    lines[2900] = lines[2900].replace(b"Meta Ads", b"Meta Adz")
    write_lines(trail, lines)
    error = broken(trail)
    assert (error.row, error.field) == (2501, "record_hash")
    with pytest.raises(InputError) as info:
        read_audit_trail(trail, JANUARY)
    assert info.value.row == 2501


# --- any single flipped byte is detected, at the line that holds it ------------------------

NAME_TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=',"'),
    max_size=6,
)
IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,6}", fullmatch=True)
EVENTS = st.builds(
    AuditEvent,
    timestamp=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    client_id=IDS,
    campaign_id=IDS,
    metric=st.sampled_from(["spend", "ltv"]),
    amount=st.decimals(
        min_value=-(10**14), max_value=10**14, places=2, allow_nan=False, allow_infinity=False
    ),
    campaign_name=NAME_TEXT,
    platform=NAME_TEXT,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(EVENTS, min_size=1, max_size=4), data=st.data())
def test_any_flipped_byte_is_detected(events: list[AuditEvent], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        trail = Path(scratch) / "trail.csv"
        append_audit_events(trail, events)
        raw = trail.read_bytes()
        position = data.draw(st.integers(0, len(raw) - 1), label="position")
        value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="value")
        trail.write_bytes(raw[:position] + bytes([value]) + raw[position + 1 :])
        with pytest.raises(InputError) as info:
            verify_audit_trail(trail)
        assert info.value.row == raw[:position].count(b"\n") + 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(EVENTS, min_size=1, max_size=12))
def test_sums_match_an_independent_computation(events: list[AuditEvent]) -> None:
    window = PeriodWindow(BillingPeriod.month("2050-06"), {"a": "Pacific/Kiritimati"})
    expected: dict[tuple[str, str], list[Decimal]] = {}
    for item in events:
        lo, hi = window.bounds(item.client_id)
        if lo <= item.timestamp < hi:
            totals = expected.setdefault((item.client_id, item.campaign_id), [Decimal(0)] * 2)
            totals[0 if item.metric == "spend" else 1] += item.amount
    with tempfile.TemporaryDirectory() as scratch:
        trail = Path(scratch) / "trail.csv"
        append_audit_events(trail, events)
        if any(min(t) < 0 for t in expected.values()):
            with pytest.raises(InputError):
                read_audit_trail(trail, window)
            return
        result = read_audit_trail(trail, window)
    assert {(m.client_id, m.campaign_id): [m.spend, m.ltv] for m in result.metrics} == expected


# --- appending -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"timestamp": datetime(2026, 1, 1)}, "timestamp"),
        ({"client_id": "has space"}, "client_id"),
        ({"campaign_id": ""}, "campaign_id"),
        ({"metric": "revenue"}, "metric"),
        ({"amount": Decimal("NaN")}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": Decimal("1e20")}, "amount"),
        ({"campaign_name": "a,b"}, "campaign_name"),
        ({"platform": 'say "hi"'}, "platform"),
        ({"platform": "two\nlines"}, "platform"),
    ],
)
def test_events_are_validated(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {
        "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
        "client_id": "acme",
        "campaign_id": "c1",
        "metric": "spend",
        "amount": Decimal("1.00"),
        **changes,
    }
    with pytest.raises(InputError) as info:
        AuditEvent(**values)  # type: ignore[arg-type]
    assert info.value.field == field


def test_append_continues_the_chain_across_calls(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    heads = [
        append_audit_events(trail, [event(f"2026-01-0{n}T00:00:00Z", "acme", "c1", "ltv", "1")])
        for n in range(1, 5)
    ]
    summary = verify_audit_trail(trail)
    assert summary.records == 4 and summary.head == heads[-1]
    assert len(set(heads)) == 4
    assert append_audit_events(trail, []) == heads[-1]


def test_append_refuses_a_broken_tail(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    good = trail.read_bytes()
    lines = lines_of(trail)
    lines[-1] = lines[-1].replace(b"Meta", b"Mexa")
    write_lines(trail, lines)
    with pytest.raises(InputError, match="cannot append") as info:
        append_audit_events(trail, [event("2026-01-09T00:00:00Z", "acme", "c1", "ltv", "1")])
    assert (info.value.row, info.value.field) == (7, "record_hash")
    trail.write_bytes(good[:-1])
    with pytest.raises(InputError, match="incomplete"):
        append_audit_events(trail, [event("2026-01-09T00:00:00Z", "acme", "c1", "ltv", "1")])
    trail.write_bytes(b"not,an,audit,trail\n")
    with pytest.raises(InputError, match="not an audit trail"):
        append_audit_events(trail, [event("2026-01-09T00:00:00Z", "acme", "c1", "ltv", "1")])


def test_append_finds_the_last_record_behind_a_long_tail(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    long_name = "x" * 70_000  # longer than the first tail read
    append_audit_events(trail, [event("2026-01-01T00:00:00Z", "a", "c", "ltv", "1", long_name)])
    append_audit_events(trail, [event("2026-01-02T00:00:00Z", "a", "c", "ltv", "2", long_name)])
    append_audit_events(trail, [event("2026-01-03T00:00:00Z", "a", "c", "ltv", "3")])
    assert verify_audit_trail(trail).records == 3


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"

    def writer(client: str) -> None:
        for n in range(25):
            append_audit_events(trail, [event("2026-01-05T00:00:00Z", client, "c", "ltv", str(n))])

    threads = [threading.Thread(target=writer, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify_audit_trail(trail).records == 100


# --- the CLI -------------------------------------------------------------------------------


def test_cli_verify_ok(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    result = runner.invoke(audit_app, ["verify", str(trail)])
    assert result.exit_code == 0, result.output
    head = verify_audit_trail(trail).head
    assert result.stdout.strip() == f"{trail}: 6 records, chain intact, head {head}"


def test_cli_verify_tampered(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    lines = lines_of(trail)
    lines[3] = lines[3].replace(b",3.02,", b",9.02,")
    write_lines(trail, lines)
    result = runner.invoke(audit_app, ["verify", str(trail)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {trail}, row 4, field 'record_hash': record 3: ")
    assert "Traceback" not in result.stderr


def test_cli_append_one_event(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    args = ["append", str(trail), "--client", "acme", "--campaign", "c1", "--metric", "spend"]
    result = runner.invoke(
        audit_app,
        [*args, "--amount", "123.45", "--timestamp", "2026-01-15T10:00:00+02:00",
         "--campaign-name", "Spring sale", "--platform", "Meta Ads"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == verify_audit_trail(trail).head
    record = lines_of(trail)[1].decode()
    assert record.startswith("1,2026-01-15T08:00:00.000000Z,acme,c1,spend,123.45,Spring sale,")
    result = runner.invoke(audit_app, [*args, "--amount", "5"])  # timestamp: now
    assert result.exit_code == 0, result.output
    assert verify_audit_trail(trail).records == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--amount", "12,5"], "field 'amount'"),
        (["--amount", "1", "--timestamp", "2026-01-15T10:00:00"], "no time zone"),
        (["--amount", "1", "--metric", "revenue"], "field 'metric'"),
        ([], "--amount required"),
    ],
)
def test_cli_append_bad_values(tmp_path: Path, extra: list[str], message: str) -> None:
    trail = tmp_path / "trail.csv"
    args = ["append", str(trail), "--client", "acme", "--campaign", "c1", "--metric", "spend"]
    result = runner.invoke(audit_app, [*args, *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not trail.exists()


def test_cli_append_from_csv(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    events = tmp_path / "events.csv"
    events.write_text(
        "timestamp,client_id,campaign_id,metric,amount,campaign_name,platform\n"
        "2026-01-02T00:00:00Z,acme,c1,spend,100.00,Sale,Meta Ads\n"
        "2026-01-03T00:00:00+01:00,acme,c1,ltv,400.00,,\n"
    )
    result = runner.invoke(audit_app, ["append", str(trail), "--from-csv", str(events)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == verify_audit_trail(trail).head
    (metrics,) = read_audit_trail(trail, JANUARY).metrics
    assert (metrics.spend, metrics.ltv, metrics.campaign_name) == (
        Decimal("100.00"),
        Decimal("400.00"),
        "Sale",
    )


def test_cli_append_from_csv_with_a_bad_row_appends_nothing(tmp_path: Path) -> None:
    trail = tmp_path / "trail.csv"
    make_trail(trail)
    before = trail.read_bytes()
    events = tmp_path / "events.csv"
    events.write_text(
        "timestamp,client_id,campaign_id,metric,amount\n"
        "2026-01-02T00:00:00Z,acme,c1,spend,100.00\n"
        "2026-01-03T00:00:00Z,acme,c1,ltv,4OO.00\n"
    )
    result = runner.invoke(audit_app, ["append", str(trail), "--from-csv", str(events)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {events}, row 3, field 'amount': ")
    assert result.stderr.count("\n") == 1
    assert trail.read_bytes() == before


def test_cli_append_from_csv_refuses_single_event_options(tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_text("timestamp,client_id,campaign_id,metric,amount\n")
    result = runner.invoke(
        audit_app,
        ["append", str(tmp_path / "t.csv"), "--from-csv", str(events), "--client", "acme"],
    )
    assert result.exit_code == 2
    assert "cannot be combined with --client" in result.stderr


def test_cli_from_csv_unknown_column(tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_text("timestamp,client_id,campaign_id,metric,amount,campain_name\n")
    result = runner.invoke(
        audit_app, ["append", str(tmp_path / "t.csv"), "--from-csv", str(events)]
    )
    assert result.exit_code == 2
    assert "row 1, field 'campain_name': unknown column" in result.stderr
