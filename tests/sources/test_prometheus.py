"""The Prometheus source against a real Prometheus server, and replayed from cassettes.

The server (module-scoped, started once) serves backfilled history for the PRODUCT.md worked
example: hourly counter samples with cents from 2025-12-20 to 2026-02-05, with counter resets,
samples exactly on the period's edges, a campaign spread over two ``instance`` series, a series
born inside the period, and series entirely outside it.

Every expected amount is checked twice: against the literal numbers of the worked example, and
against a model of the data (the sum of the increments stamped inside ``(start, end]``).

Recording the cassettes (needs the ``prometheus`` binary and a free port 9090)::

    rm -f cassettes/source_prometheus/*.yaml
    python -m pytest tests/test_source_prometheus.py --record-mode=once -k replay

With a record mode other than ``none`` the server listens on the fixed ``127.0.0.1:9090``, so
the cassettes hold exactly the traffic of a real server at ``REPLAY_URL`` and replay without one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests

from kiki_billing.errors import InputError
from kiki_billing.models import BillingPeriod, CampaignMetrics
from kiki_billing.sources.base import MetricsSet, PeriodWindow
from kiki_billing.sources.prometheus import read_prometheus
from tests.support.prometheus import (
    LOCALHOST_ONLY,
    Series,
    openmetrics_text,
    prometheus_server,
)
from tests.support.servers import free_port

CASSETTE_TOPIC = "source_prometheus"

HOUR = 3600
DAY = 24 * HOUR
P_START = 1767225600  # 2026-01-01T00:00:00Z
P_END = 1769904000  # 2026-02-01T00:00:00Z
DATA_FROM = P_START - 12 * DAY  # 2025-12-20
DATA_TO = P_END + 4 * DAY  # 2026-02-05
NY_SHIFT = 5 * HOUR  # midnight in New York is 05:00 UTC in January and February (EST)

JANUARY = PeriodWindow(BillingPeriod.month("2026-01"))
ACME_IN_NEW_YORK = PeriodWindow(BillingPeriod.month("2026-01"), {"acme": "America/New_York"})
SPEND = "syncflow_spend_total"
LTV = "syncvalue_predicted_ltv_total"
ACCURACY = "syncvalue_model_accuracy"
REPLAY_URL = "http://127.0.0.1:9090"
RECORD_PORT = 9090

# The worked example of PRODUCT.md: (client, campaign) -> (spend, ltv) in January 2026 (UTC).
WORKED_EXAMPLE = {
    ("acme", "campaign_001"): (Decimal("36000.00"), Decimal("130090.00")),
    ("techstartup", "campaign_002"): (Decimal("44000.00"), Decimal("164130.00")),
    ("ecommerce", "campaign_003"): (Decimal("40000.00"), Decimal("137530.00")),
    ("saas", "campaign_004"): (Decimal("25000.00"), Decimal("84460.00")),
}
ACCURACY_AT_END = {
    ("acme", "campaign_001"): "0.94",
    ("techstartup", "campaign_002"): "0.91",
    ("ecommerce", "campaign_003"): "0.89",
    ("saas", "campaign_004"): "0.920049",  # read as 0.9200 (4 decimals)
}

# pytest-recording's --block-network blocks Python sockets even to 127.0.0.1 unless allowed.
local_network = pytest.mark.block_network(allowed_hosts=[LOCALHOST_ONLY])


def real_server(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that talks to the real Prometheus server of this module."""
    marked: Callable[..., None] = pytest.mark.server(local_network(test))
    return marked


# --- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counter:
    """A counter series as a list of increments; a reset restarts it from zero first."""

    metric: str
    labels: dict[str, str]
    events: tuple[tuple[int, Decimal, bool], ...]  # (unix seconds, increment, reset before)

    def samples(self) -> list[tuple[int, Decimal]]:
        value, out = Decimal(0), []
        for stamp, increment, reset in self.events:
            value = (Decimal(0) if reset else value) + increment
            out.append((stamp, value))
        return out

    def increase(self, low: int, high: int) -> Decimal:
        """What the counter counted in ``(low, high]``: the truth the source must find."""
        return sum((inc for stamp, inc, _ in self.events if low < stamp <= high), Decimal(0))

    def count(self, low: int, high: int) -> int:
        """Raw samples the source uses for ``(low, high]``: those inside, plus the baseline."""
        inside = sum(1 for stamp, _, _ in self.events if low < stamp <= high)
        baseline = any(stamp <= low for stamp, _, _ in self.events)
        return inside + baseline if inside else 0


def counter(
    metric: str,
    labels: dict[str, str],
    target: str,
    *,
    seed: int,
    offset: int = 0,
    first: int = DATA_FROM,
    last: int = DATA_TO,
    resets: Sequence[int] = (),
) -> Counter:
    """Hourly samples whose increments (with cents) add up to ``target`` inside January (UTC).

    The last increment inside January makes up the difference, so an off-by-one-sample error at
    either edge of the period shows as a large, obvious difference.
    """
    stamps = list(range(first + offset, last + 1, HOUR))
    inside = [s for s in stamps if P_START < s <= P_END] or stamps  # or: a series outside
    mean = int(Decimal(target) * 100) // len(inside)  # cents
    spread = mean * 7 // 10
    cents = {s: mean * 6 // 10 + (i * 3701 + seed * 101) % spread for i, s in enumerate(stamps)}
    cents[inside[-1]] = int(Decimal(target) * 100) - sum(cents[s] for s in inside[:-1])
    assert cents[inside[-1]] > 0
    return Counter(
        metric,
        labels,
        tuple((s, Decimal(cents[s]).scaleb(-2), s in resets) for s in stamps),
    )


def labels(client: str, campaign: str, instance: str = "pod-a") -> dict[str, str]:
    return {"client_id": client, "campaign_id": campaign, "instance": instance}


COUNTERS = (
    # acme: a counter reset in the middle of January; samples on both edges.
    counter(SPEND, labels("acme", "campaign_001"), "36000.00", seed=1,
            resets=[P_START + 14 * DAY + 12 * HOUR]),
    counter(LTV, labels("acme", "campaign_001"), "130090.00", seed=2),
    # techstartup: spend from two instances, one of them sampling at half past the hour.
    counter(SPEND, labels("techstartup", "campaign_002"), "26000.00", seed=3),
    counter(SPEND, labels("techstartup", "campaign_002", "pod-b"), "18000.00", seed=4,
            offset=HOUR // 2),
    counter(LTV, labels("techstartup", "campaign_002"), "164130.00", seed=5),
    # ecommerce: spend sampled off the edges; LTV born inside the period (counts from zero).
    counter(SPEND, labels("ecommerce", "campaign_003"), "40000.00", seed=6, offset=HOUR // 2),
    counter(LTV, labels("ecommerce", "campaign_003"), "137530.00", seed=7,
            first=P_START + 2 * DAY + 7 * HOUR),
    # saas: LTV reset exactly on a chunk boundary (midnight, the end of a 1-day chunk).
    counter(SPEND, labels("saas", "campaign_004"), "25000.00", seed=8),
    counter(LTV, labels("saas", "campaign_004"), "84460.00", seed=9,
            resets=[P_START + 9 * DAY]),
)  # fmt: skip

# Series that must not be billed: entirely before or after January, or without a campaign label.
UNBILLED = (
    counter(SPEND, labels("oldclient", "campaign_009"), "50000.00", seed=10,
            last=P_START - 4 * DAY),
    counter(SPEND, labels("newclient", "campaign_010"), "50000.00", seed=11,
            first=P_END + DAY),
    counter(SPEND, {"client_id": "acme", "instance": "pod-x"}, "99999.99", seed=12),
)  # fmt: skip


def _counter_series(metric: str) -> list[Series]:
    return [Series(c.labels, c.samples()) for c in (*COUNTERS, *UNBILLED) if c.metric == metric]


def _accuracy_series() -> list[Series]:
    out = []
    for (client, campaign), at_end in ACCURACY_AT_END.items():
        samples = [
            (s, "0.5" if s < P_END else at_end if s == P_END else "0.1")
            for s in range(DATA_FROM, DATA_TO + 1, 6 * HOUR)
        ]
        out.append(Series({"client_id": client, "campaign_id": campaign}, samples))
    return out


def _broken_series() -> list[Series]:
    samples = [(s, "NaN" if s == P_START + 9 * DAY else f"{s - DATA_FROM}.5")
               for s in range(DATA_FROM, DATA_TO + 1, HOUR)]  # fmt: skip
    return [Series(labels("acme", "campaign_001"), samples)]


OPENMETRICS = openmetrics_text(
    counters={
        SPEND: _counter_series(SPEND),
        LTV: _counter_series(LTV),
        "broken_spend_total": _broken_series(),
    },
    gauges={ACCURACY: _accuracy_series()},
)


def model(low_shift: dict[str, int] | None = None) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(client, campaign) -> (spend, ltv, samples used), from the increments of the data."""
    shifts = low_shift or {}
    out: dict[tuple[str, str], list[Any]] = {}
    for c in COUNTERS:
        key = (c.labels["client_id"], c.labels["campaign_id"])
        shift = shifts.get(key[0], 0)
        low, high = P_START + shift, P_END + shift
        entry = out.setdefault(key, [Decimal(0), Decimal(0), 0])
        entry[0 if c.metric == SPEND else 1] += c.increase(low, high)
        entry[2] += c.count(low, high)
    return {key: tuple(value) for key, value in out.items()}


def by_campaign(result: MetricsSet) -> dict[tuple[str, str], CampaignMetrics]:
    return {(m.client_id, m.campaign_id): m for m in result.metrics}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_url(record_mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus serving the backfilled history; on port 9090 while recording."""
    port = None if record_mode == "none" else RECORD_PORT
    with prometheus_server(OPENMETRICS, tmp_path_factory.mktemp("prometheus"), port=port) as url:
        yield url


@pytest.fixture(scope="module")
def replay_url(record_mode: str, request: pytest.FixtureRequest) -> str:
    """``REPLAY_URL``: replayed from the cassette, or a real server there while recording.

    Module-scoped so that, while recording, the server starts before the test's cassette is
    inserted and its start-up probes are not recorded.
    """
    if record_mode == "none":
        return REPLAY_URL
    url: str = request.getfixturevalue("prometheus_url")
    assert url == REPLAY_URL
    return url


# --- against a real server -----------------------------------------------------------------


@real_server
def test_worked_example_to_the_cent(prometheus_url: str) -> None:
    result = read_prometheus(prometheus_url, JANUARY, accuracy_metric=ACCURACY)

    got = by_campaign(result)
    assert list(got) == sorted(WORKED_EXAMPLE)
    assert {k: (m.spend, m.ltv) for k, m in got.items()} == WORKED_EXAMPLE
    expected = model()
    for key, metrics in got.items():
        assert (metrics.spend, metrics.ltv, metrics.record_count) == expected[key]
        assert metrics.accuracy == Decimal(ACCURACY_AT_END[key]).quantize(Decimal("0.0001"))
        assert metrics.origin_file == prometheus_url
        assert metrics.origin_row is None
    # Spend: 744 samples + baseline; LTV born at 2026-01-03T07:00Z: no baseline, 54 h missing.
    assert got[("ecommerce", "campaign_003")].record_count == (744 + 1) + (744 - 54)

    evidence = result.evidence
    assert evidence.kind == "prometheus"
    assert evidence.location == prometheus_url
    assert evidence.record_count == sum(m.record_count for m in result.metrics)
    assert evidence.window_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert evidence.window_end == datetime(2026, 2, 1, tzinfo=UTC)
    assert evidence.read_at is None
    assert evidence.queries[:3] == (
        "last_over_time(syncflow_spend_total[3024000s]) @ 2026-01-01T00:00:00Z",
        "syncflow_spend_total[86400s] @ 2026-01-02T00:00:00Z",
        "syncflow_spend_total[86400s] @ 2026-01-03T00:00:00Z",
    )
    assert len(evidence.queries) == 2 * (1 + 31) + 1
    assert evidence.queries[-1] == (
        "last_over_time(syncvalue_model_accuracy[3024000s]) @ 2026-02-01T00:00:00Z"
    )


@real_server
def test_the_same_read_gives_the_same_evidence(prometheus_url: str) -> None:
    first = read_prometheus(prometheus_url, JANUARY)
    second = read_prometheus(prometheus_url, JANUARY)
    assert first == second


@real_server
@pytest.mark.parametrize("chunk", [timedelta(hours=5), timedelta(days=7), timedelta(days=40)])
def test_chunk_size_does_not_change_the_result(prometheus_url: str, chunk: timedelta) -> None:
    # 5 h and 7 d do not divide the month: the last chunk is shorter; 40 d is one chunk.
    reference = read_prometheus(prometheus_url, JANUARY)
    chunked = read_prometheus(prometheus_url, JANUARY, chunk=chunk)
    assert chunked.metrics == reference.metrics
    assert chunked.evidence.record_count == reference.evidence.record_count


@real_server
def test_new_york_client_is_billed_on_new_york_midnights(prometheus_url: str) -> None:
    result = read_prometheus(prometheus_url, ACME_IN_NEW_YORK)

    got = by_campaign(result)
    acme = got[("acme", "campaign_001")]
    # Exactly the increments of 2026-01-01 01:00..05:00 UTC leave, those of 2026-02-01
    # 01:00..05:00 UTC join (both edges of the New York period are 05:00 UTC).
    spend, ltv = (c for c in COUNTERS if c.labels["client_id"] == "acme")
    assert acme.spend == Decimal("36000.00") - spend.increase(P_START, P_START + NY_SHIFT) + (
        spend.increase(P_END, P_END + NY_SHIFT)
    )
    assert acme.ltv == Decimal("130090.00") - ltv.increase(P_START, P_START + NY_SHIFT) + (
        ltv.increase(P_END, P_END + NY_SHIFT)
    )
    assert (acme.spend, acme.ltv) == (Decimal("36002.44"), Decimal("130200.84"))
    assert (acme.spend, acme.ltv, acme.record_count) == model({"acme": NY_SHIFT})[
        ("acme", "campaign_001")
    ]
    # Everyone else is still billed on UTC midnights.
    for key, (spend_total, ltv_total) in WORKED_EXAMPLE.items():
        if key[0] != "acme":
            assert (got[key].spend, got[key].ltv) == (spend_total, ltv_total)

    queries = result.evidence.queries
    assert queries[0] == (
        'last_over_time(syncflow_spend_total{client_id=~"acme"}[3024000s]) @ 2026-01-01T05:00:00Z'
    )
    assert 'syncflow_spend_total{client_id=~"acme"}[86400s] @ 2026-02-01T05:00:00Z' in queries
    assert "last_over_time(syncflow_spend_total[3024000s]) @ 2026-01-01T00:00:00Z" in queries


def _promql_increase(url: str, metric: str) -> dict[tuple[str, str], Decimal]:
    """PromQL's ``increase()`` over January, per campaign, as Prometheus computes it."""
    promql = (
        f'sum by (client_id, campaign_id) (increase({metric}{{campaign_id!=""}}'
        f"[{P_END - P_START}s]))"
    )
    answer = requests.get(
        f"{url}/api/v1/query", params={"query": promql, "time": str(P_END)}, timeout=10
    ).json()
    return {
        (r["metric"]["client_id"], r["metric"]["campaign_id"]): Decimal(r["value"][1])
        for r in answer["data"]["result"]
    }


@real_server
def test_promql_increase_is_not_the_billed_amount(prometheus_url: str) -> None:
    """Why the source does not use ``increase()``: it estimates, it does not count."""
    spend = _promql_increase(prometheus_url, SPEND)
    exact = by_campaign(read_prometheus(prometheus_url, JANUARY))

    # Sampled at half past the hour, the first and last January samples are 30 min inside the
    # month: increase() stretches the 743 h between them over all 744 h (float64 arithmetic).
    ecommerce, techstartup = ("ecommerce", "campaign_003"), ("techstartup", "campaign_002")
    assert exact[ecommerce].spend == Decimal("40000.00")
    assert spend[ecommerce] == Decimal("40005.87133243607")
    assert exact[techstartup].spend == Decimal("44000.00")  # pod-b samples at half past
    assert spend[techstartup] == Decimal("43995.72780619112")
    # Only where samples sit exactly on both edges does Prometheus 2.x's increase() (whose
    # range selector includes the start sample) agree; Prometheus 3 excludes that sample.
    acme = ("acme", "campaign_001")
    assert spend[acme] == exact[acme].spend == Decimal("36000.00")


@real_server
def test_nan_sample_is_an_error_naming_the_series(prometheus_url: str) -> None:
    with pytest.raises(InputError) as caught:
        read_prometheus(prometheus_url, JANUARY, spend_metric="broken_spend_total")
    message = str(caught.value)
    assert message.startswith(f"{prometheus_url}: sample value 'NaN' of series ")
    assert 'broken_spend_total{campaign_id="campaign_001",client_id="acme",instance="pod-a"}' in (
        message
    )
    assert "at 2026-01-10T00:00:00Z is not a finite number" in message


@real_server
def test_prometheus_error_is_quoted(prometheus_url: str) -> None:
    with pytest.raises(InputError) as caught:
        read_prometheus(prometheus_url, JANUARY, spend_metric="syncflow spend")
    assert str(caught.value) == (
        f"{prometheus_url}: Prometheus rejected the query "
        "'last_over_time(syncflow spend[3024000s])' (HTTP 400): bad_data: "
        'invalid parameter "query": 1:25: parse error: unexpected identifier "spend"'
    )


@real_server
def test_credentials_in_the_url_are_never_shown(prometheus_url: str) -> None:
    with_secret = prometheus_url.replace("http://", "http://billing:s3cret@")
    result = read_prometheus(with_secret, JANUARY)
    assert result.evidence.location == prometheus_url
    assert {m.origin_file for m in result.metrics} == {prometheus_url}
    with pytest.raises(InputError) as caught:
        read_prometheus(with_secret, JANUARY, spend_metric="syncflow spend")
    assert "s3cret" not in str(caught.value)
    assert str(caught.value).startswith(f"{prometheus_url}: ")


# --- without a server ----------------------------------------------------------------------


@local_network
def test_unreachable_prometheus_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(InputError) as caught:
        read_prometheus(url.replace("http://", "http://ops:hunter2@"), JANUARY, timeout=5)
    message = str(caught.value)
    assert message.startswith(f"{url}: cannot reach Prometheus at {url}: ")
    assert "Connection refused" in message
    assert "hunter2" not in message


def test_not_an_http_url_is_an_error() -> None:
    with pytest.raises(InputError, match="not an http"):
        read_prometheus("prometheus.internal", JANUARY)


class _Canned(requests.adapters.BaseAdapter):
    """Answers every request with one canned body (for what a real server never sends)."""

    def __init__(self, body: bytes, status: int = 200, content_type: str = "text/html") -> None:
        super().__init__()
        self.body, self.status, self.content_type = body, status, content_type

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        response = requests.Response()
        response.status_code = self.status
        response.reason = "OK" if self.status == 200 else "Not Found"
        response.headers["Content-Type"] = self.content_type
        response._content = self.body
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def _session(body: bytes, status: int = 200, content_type: str = "text/html") -> requests.Session:
    session = requests.Session()
    session.mount("http://", _Canned(body, status, content_type))
    return session


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b"<html>login</html>", 200, "with a body that is not JSON (text/html)"),
        (b"404 page not found", 404, "Prometheus answered HTTP 404 Not Found to the query"),
        (
            json.dumps(
                {"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}}
            ).encode(),
            200,
            "with a 'scalar' result, expected a 'vector'",
        ),
        (b'{"status": "success"}', 200, "with JSON that is not a query result"),
    ],
)
def test_unexpected_answers_are_input_errors(body: bytes, status: int, expected: str) -> None:
    with pytest.raises(InputError) as caught:
        read_prometheus("http://prom.example:9090", JANUARY, session=_session(body, status))
    assert str(caught.value).startswith("http://prom.example:9090: ")
    assert expected in str(caught.value)


# --- replayed from cassettes (no server, no network) ---------------------------------------


@pytest.mark.vcr
def test_replay_worked_example(replay_url: str, vcr: Any, record_mode: str) -> None:
    result = read_prometheus(
        replay_url,
        ACME_IN_NEW_YORK,
        accuracy_metric=ACCURACY,
        chunk=timedelta(days=8),  # 4 chunks, the last one 7 days
    )
    got = {(m.client_id, m.campaign_id): (m.spend, m.ltv) for m in result.metrics}
    assert got == {
        **WORKED_EXAMPLE,
        ("acme", "campaign_001"): (Decimal("36002.44"), Decimal("130200.84")),
    }
    assert [m.accuracy for m in result.metrics] == [
        Decimal("0.94"), Decimal("0.89"), Decimal("0.92"), Decimal("0.91"),
    ]  # fmt: skip
    assert result.evidence.location == REPLAY_URL
    assert len(result.evidence.queries) == 2 * 2 * (1 + 4) + 2
    assert vcr.all_played or record_mode != "none"


@pytest.mark.vcr
def test_replay_prometheus_error(replay_url: str, vcr: Any, record_mode: str) -> None:
    with pytest.raises(InputError) as caught:
        read_prometheus(replay_url, JANUARY, spend_metric="syncflow spend")
    assert str(caught.value).endswith(
        '(HTTP 400): bad_data: invalid parameter "query": 1:25: parse error: '
        'unexpected identifier "spend"'
    )
    assert vcr.all_played or record_mode != "none"
