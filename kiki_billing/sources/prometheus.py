"""Read a period's spend and LTV from Prometheus counters, exactly, from the raw samples.

The bill for a counter is the exact difference between its value at the period's start and its
value at the period's end, computed in :class:`~decimal.Decimal` from the raw samples Prometheus
stores and aware of counter resets. PromQL's ``increase()`` is not used: it extrapolates the
first and last sample of the window towards the window's edges and computes in float64, so its
result is an estimate rather than the amount that was actually counted.

Only instant queries of the HTTP API (``GET /api/v1/query``) are used. For each time zone in use
(the period's edges are midnight in the client's contract time zone, UTC by default):

1. **Baseline**: ``last_over_time(METRIC[LOOKBACK])`` at the period's start gives, per series,
   the last sample at or before the start.
2. **Samples of the period**: ``METRIC[Ns]`` at the end of each chunk returns the raw samples
   of that chunk; the chunks tile the period.
3. **Increase** per series: the sum over consecutive samples (baseline first) of
   ``v[i] - v[i-1]`` when ``v[i] >= v[i-1]``, else ``v[i]`` (a counter reset: the counter
   restarted from zero).

Edge rule: a sample stamped exactly at the period's start belongs to the previous period (it is
the baseline) and a sample stamped exactly at the period's end belongs to this period, so the
period is the half-open interval ``(start, end]`` and consecutive periods neither overlap nor
leave a gap. The rule is applied to the returned timestamps, not left to the range selector:
Prometheus 2.x range selectors include both ends (``[t - N, t]``), Prometheus 3 excludes the
left one, and the result must not depend on the server's version.

Further rules:

- A series with no sample in the lookback before the start is a counter that started inside
  the period: its first sample counts from zero.
- A series without a sample inside the period contributes nothing (a campaign appears in the
  result only if one of its series has a sample inside the period).
- Several series with the same client and campaign labels (e.g. different ``instance`` labels)
  are summed after each series' own increase is computed.
- Series without the client or the campaign label are skipped.
- Sample values are parsed from the strings Prometheus returns; NaN, infinite and negative
  counter values are errors. Prometheus stores float64, so a total with more than 12 decimals
  (float noise far below a cent) is rounded half-even to 12 decimals.
- ``record_count`` of a campaign counts the raw samples used: its series' samples inside the
  period plus their baselines.

The evidence lists every PromQL query with its evaluation time and no wall-clock time, so the
same period read from the same data always gives the same evidence (and invoice hash).
"""

from __future__ import annotations

import decimal
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeGuard
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import ValidationError

from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.models import CampaignMetrics, SourceEvidence
from kiki_billing.money import MONEY_CONTEXT
from kiki_billing.sources.base import MetricsSet, PeriodWindow

__all__ = ["read_prometheus"]

_MAX_DECIMALS = Decimal(1).scaleb(-12)
_ACCURACY_QUANTUM = Decimal("0.0001")

SeriesKey = tuple[tuple[str, str], ...]
"""A series' labels without ``__name__``, sorted by name."""


@dataclass
class _Series:
    """One counter series of one tz group: its baseline and its samples inside the period."""

    labels: SeriesKey
    baseline: Decimal | None = None
    samples: dict[int, Decimal] = field(default_factory=dict)  # ms timestamp -> value


@dataclass
class _Campaign:
    """What the series of one (client, campaign) add up to."""

    spend: Decimal = Decimal(0)
    ltv: Decimal = Decimal(0)
    samples: int = 0


@dataclass
class _Reader:
    """Sends the instant queries and records them for the evidence."""

    base_url: str
    location: str
    session: requests.Session
    timeout: float
    queries: list[str] = field(default_factory=list)

    def query(self, promql: str, at: datetime, result_type: str) -> list[dict[str, Any]]:
        """Run one instant query at ``at`` and return its ``data.result`` list.

        Raises:
            InputError: Prometheus cannot be reached, answers with an error, answers something
                that is not the JSON of a successful query, or of another result type.
        """
        when = _rfc3339(at)
        self.queries.append(f"{promql} @ {when}")
        try:
            response = self.session.get(
                f"{self.base_url}/api/v1/query",
                params={"query": promql, "time": when},
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.Timeout:
            raise self.error(
                f"cannot reach Prometheus at {self.location}: no answer within {self.timeout:g} s"
            ) from None
        except requests.ConnectionError as exc:
            raise self.error(
                f"cannot reach Prometheus at {self.location}: {_connection_reason(exc)}"
            ) from None
        except requests.RequestException as exc:
            raise self.error(
                f"cannot query Prometheus at {self.location}: {type(exc).__name__}"
            ) from None
        body = self._decode(response, promql)
        return self._result(body, promql, result_type)

    def _decode(self, response: requests.Response, promql: str) -> Any:
        try:
            body = json.loads(response.content, parse_float=Decimal, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            raise self.error(
                f"Prometheus rejected the query {promql!r} (HTTP {response.status_code}): "
                f"{body.get('errorType', 'error')}: {body.get('error', 'no message')}"
            )
        if not 200 <= response.status_code < 300:
            raise self.error(
                f"Prometheus answered HTTP {response.status_code} {response.reason} "
                f"to the query {promql!r}"
            )
        if body is None:
            content_type = response.headers.get("Content-Type", "no content type")
            raise self.error(
                f"Prometheus answered the query {promql!r} with a body that is not JSON "
                f"({content_type}); is {self.location} the Prometheus base URL?"
            )
        return body

    def _result(self, body: Any, promql: str, result_type: str) -> list[dict[str, Any]]:
        data = body.get("data") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or body.get("status") != "success"
            or not isinstance(data, dict)
        ):
            raise self.error(
                f"Prometheus answered the query {promql!r} with JSON that is not a query result"
            )
        if data.get("resultType") != result_type:
            raise self.error(
                f"Prometheus answered the query {promql!r} with a {data.get('resultType')!r} "
                f"result, expected a {result_type!r}"
            )
        result = data.get("result")
        if not isinstance(result, list) or not all(
            isinstance(item, dict) and isinstance(item.get("metric"), dict) for item in result
        ):
            raise self.error(f"Prometheus answered the query {promql!r} with a malformed result")
        return result

    def error(self, message: str) -> InputError:
        return InputError(message, file=self.location)


def read_prometheus(
    base_url: str,
    window: PeriodWindow,
    *,
    spend_metric: str = "syncflow_spend_total",
    ltv_metric: str = "syncvalue_predicted_ltv_total",
    client_label: str = "client_id",
    campaign_label: str = "campaign_id",
    accuracy_metric: str | None = None,
    lookback: timedelta = timedelta(days=35),
    chunk: timedelta = timedelta(days=1),
    timeout: float = 30.0,
    session: requests.Session | None = None,
) -> MetricsSet:
    """Read each campaign's exact spend and LTV increase over the period from Prometheus.

    See the module docstring for the algorithm and the edge rule (the period is
    ``(start, end]``; a sample exactly at the start is the previous period's).

    Args:
        base_url: Prometheus's base URL, e.g. ``http://prometheus:9090`` (a path prefix is kept;
            credentials in the URL are used but never shown).
        window: The billing period and each client's time zone (UTC when not listed).
        spend_metric: The spend counter's metric name.
        ltv_metric: The predicted-LTV counter's metric name.
        client_label: The label that holds the client id.
        campaign_label: The label that holds the campaign id.
        accuracy_metric: An optional gauge whose last value at the period's end becomes each
            campaign's ``accuracy`` (rounded half-even to 4 decimals).
        lookback: How far before the period's start to look for a series' last sample.
        chunk: The span of raw samples fetched per query; the last chunk may be shorter.
        timeout: Seconds to wait for each HTTP request.
        session: The ``requests`` session to use (a new one is made and closed if omitted).

    Returns:
        One :class:`CampaignMetrics` per (client, campaign), sorted, and the evidence of the read.

    Raises:
        InputError: Prometheus cannot be reached or answers with an error or an unexpected body;
            a sample value is NaN, infinite or negative; the labels are not valid ids; several
            accuracy series of one campaign disagree.
        ConfigurationError: ``lookback`` or ``chunk`` is not a positive whole number of seconds.
    """
    location = _redact(base_url)
    lookback_s = _whole_seconds(lookback, "lookback")
    chunk_s = _whole_seconds(chunk, "chunk")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("not an http(s) URL of a Prometheus server", file=location)

    own_session = session is None
    reader = _Reader(
        base_url=base_url.rstrip("/"),
        location=location,
        session=session if session is not None else requests.Session(),
        timeout=timeout,
    )
    campaigns: dict[tuple[str, str], _Campaign] = defaultdict(_Campaign)
    accuracies: dict[tuple[str, str], Decimal] = {}
    try:
        for zone in sorted(window.distinct_timezones()):
            start, end = window.period.bounds(zone)
            members = sorted(c for c, tz in window.timezones.items() if tz == zone)
            if zone != "UTC" and not members:
                continue
            others = {c for c, tz in window.timezones.items() if tz != zone}
            selector = "" if zone == "UTC" else _regex_matcher(client_label, members)
            group = _Group(reader, client_label, campaign_label, selector, others)
            for metric, attribute in ((spend_metric, "spend"), (ltv_metric, "ltv")):
                for key, amount, used in group.increases(metric, start, end, lookback_s, chunk_s):
                    campaign = campaigns[key]
                    if attribute == "spend":
                        campaign.spend += amount
                    else:
                        campaign.ltv += amount
                    campaign.samples += used
            if accuracy_metric is not None:
                accuracies.update(group.accuracy(accuracy_metric, end, lookback_s))
    finally:
        if own_session:
            reader.session.close()

    metrics = tuple(
        _campaign_metrics(key, campaigns[key], accuracies.get(key), location)
        for key in sorted(campaigns)
    )
    utc_start, utc_end = window.period.bounds("UTC")
    evidence = SourceEvidence(
        kind="prometheus",
        location=location,
        record_count=sum(c.samples for c in campaigns.values()),
        queries=tuple(reader.queries),
        window_start=utc_start,
        window_end=utc_end,
        read_at=None,
    )
    return MetricsSet(metrics=metrics, evidence=evidence)


@dataclass
class _Group:
    """The queries of the clients that share one time zone."""

    reader: _Reader
    client_label: str
    campaign_label: str
    selector: str  # "" or '{client_id=~"a|b"}'
    others: set[str]  # clients billed in another time zone

    def increases(
        self, metric: str, start: datetime, end: datetime, lookback_s: int, chunk_s: int
    ) -> Iterable[tuple[tuple[str, str], Decimal, int]]:
        """Yield ``((client, campaign), increase, samples used)`` per series of ``metric``."""
        series: dict[SeriesKey, _Series] = {}
        baseline_query = f"last_over_time({metric}{self.selector}[{lookback_s}s])"
        for item in self.reader.query(baseline_query, start, "vector"):
            labels = self._labels(item)
            if labels is None:
                continue
            value = item.get("value")
            if not _is_sample(value):
                raise self.reader.error(f"malformed sample in the answer to {baseline_query!r}")
            _, raw = value
            entry = series.setdefault(labels, _Series(labels))
            entry.baseline = _counter_value(raw, metric, labels, start, self.reader.location)

        start_ms, end_ms = _epoch_ms(start), _epoch_ms(end)
        for chunk_start, chunk_end in _chunks(start, end, chunk_s):
            seconds = int((chunk_end - chunk_start).total_seconds())
            low_ms, high_ms = _epoch_ms(chunk_start), _epoch_ms(chunk_end)
            chunk_query = f"{metric}{self.selector}[{seconds}s]"
            for item in self.reader.query(chunk_query, chunk_end, "matrix"):
                labels = self._labels(item)
                if labels is None:
                    continue
                values = item.get("values")
                if not isinstance(values, list) or not all(_is_sample(v) for v in values):
                    raise self.reader.error(f"malformed samples in the answer to {chunk_query!r}")
                entry = series.setdefault(labels, _Series(labels))
                for stamp, raw in values:
                    ms = _stamp_ms(stamp)
                    # The edge rule (start, end], whatever the server's range semantics.
                    if low_ms < ms <= high_ms and start_ms < ms <= end_ms:
                        at = datetime.fromtimestamp(ms / 1000, UTC)
                        entry.samples.setdefault(
                            ms, _counter_value(raw, metric, labels, at, self.reader.location)
                        )

        for labels in sorted(series):
            entry = series[labels]
            if not entry.samples:
                continue
            used = len(entry.samples) + (entry.baseline is not None)
            yield _campaign_key(labels, self), _increase(entry), used

    def accuracy(
        self, metric: str, end: datetime, lookback_s: int
    ) -> dict[tuple[str, str], Decimal]:
        """Return the accuracy gauge's last value at ``end`` per (client, campaign)."""
        promql = f"last_over_time({metric}{self.selector}[{lookback_s}s])"
        found: dict[tuple[str, str], Decimal] = {}
        for item in self.reader.query(promql, end, "vector"):
            labels = self._labels(item)
            value = item.get("value")
            if labels is None:
                continue
            if not _is_sample(value):
                raise self.reader.error(f"malformed sample in the answer to {promql!r}")
            key = _campaign_key(labels, self)
            number = _finite(value[1], metric, labels, end, self.reader.location)
            if _decimals(number) > 4:
                number = number.quantize(_ACCURACY_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)
            if key in found and found[key] != number:
                raise self.reader.error(
                    f"series of {metric} disagree on the accuracy of client {key[0]!r} campaign "
                    f"{key[1]!r}: {found[key]} and {number}"
                )
            found[key] = number
        return found

    def _labels(self, item: Mapping[str, Any]) -> SeriesKey | None:
        """The series' labels, or None when it is not billed in this group."""
        metric = item["metric"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metric.items()):
            raise self.reader.error("Prometheus answered with non-string labels")
        client = metric.get(self.client_label)
        if not client or not metric.get(self.campaign_label) or client in self.others:
            return None
        return tuple(sorted((k, v) for k, v in metric.items() if k != "__name__"))


def _campaign_key(labels: SeriesKey, group: _Group) -> tuple[str, str]:
    values = dict(labels)
    return values[group.client_label], values[group.campaign_label]


def _increase(series: _Series) -> Decimal:
    """The counter's exact increase: baseline first (zero for a new series), resets counted."""
    with decimal.localcontext(MONEY_CONTEXT):
        previous = series.baseline if series.baseline is not None else Decimal(0)
        total = Decimal(0)
        for ms in sorted(series.samples):
            value = series.samples[ms]
            total += value - previous if value >= previous else value
            previous = value
    return total


def _campaign_metrics(
    key: tuple[str, str], campaign: _Campaign, accuracy: Decimal | None, location: str
) -> CampaignMetrics:
    client_id, campaign_id = key
    try:
        return CampaignMetrics(
            client_id=client_id,
            campaign_id=campaign_id,
            spend=_trim(campaign.spend),
            ltv=_trim(campaign.ltv),
            accuracy=accuracy,
            record_count=campaign.samples,
            origin_file=location,
            origin_row=None,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InputError(
            f"client {client_id!r} campaign {campaign_id!r}: {problems}", file=location
        ) from None


def _trim(amount: Decimal) -> Decimal:
    """Round float noise beyond 12 decimals (half-even); keep every other amount as it is."""
    if _decimals(amount) > 12:
        return amount.quantize(_MAX_DECIMALS, rounding=decimal.ROUND_HALF_EVEN)
    return amount


def _decimals(number: Decimal) -> int:
    exponent = number.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _is_sample(value: object) -> TypeGuard[list[Any]]:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int | Decimal)
        and isinstance(value[1], str)
    )


def _finite(raw: str, metric: str, labels: SeriesKey, at: datetime, location: str) -> Decimal:
    try:
        number = Decimal(raw)
    except decimal.InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise InputError(
            f"sample value {raw!r} of series {_series_name(metric, labels)} at {_rfc3339(at)} "
            "is not a finite number",
            file=location,
        )
    return number


def _counter_value(
    raw: str, metric: str, labels: SeriesKey, at: datetime, location: str
) -> Decimal:
    number = _finite(raw, metric, labels, at, location)
    if number < 0:
        raise InputError(
            f"counter value {raw} of series {_series_name(metric, labels)} at {_rfc3339(at)} "
            "is negative",
            file=location,
        )
    return number


def _series_name(metric: str, labels: SeriesKey) -> str:
    inner = ",".join(f"{k}={_promql_string(v)}" for k, v in labels)
    return f"{metric}{{{inner}}}"


def _promql_string(value: str) -> str:
    """Quote ``value`` as a PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _regex_matcher(label: str, values: Sequence[str]) -> str:
    """``{label=~"a|b"}``: a fully anchored RE2 alternation of the literal ``values``."""
    return f"{{{label}=~{_promql_string('|'.join(re.escape(v) for v in values))}}}"


def _chunks(start: datetime, end: datetime, chunk_s: int) -> Iterable[tuple[datetime, datetime]]:
    """Tile ``(start, end]`` with spans of ``chunk_s`` seconds; the last one may be shorter."""
    step = timedelta(seconds=chunk_s)
    low = start
    while low < end:
        high = min(low + step, end)
        yield low, high
        low = high


def _whole_seconds(span: timedelta, name: str) -> int:
    if span <= timedelta(0) or span % timedelta(seconds=1):
        raise ConfigurationError(f"Prometheus {name} must be a positive whole number of seconds")
    return int(span.total_seconds())


def _epoch_ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _stamp_ms(stamp: int | Decimal) -> int:
    """Prometheus's timestamps are seconds with up to 3 decimals."""
    return int(Decimal(stamp).scaleb(3).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def _rfc3339(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _redact(url: str) -> str:
    """``url`` without user, password, query or fragment, and without a trailing slash."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid Prometheus URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _connection_reason(exc: requests.ConnectionError) -> str:
    """The socket-level reason of a failed connection (never the URL, which may hold secrets)."""
    inner: object = exc.args[0] if exc.args else exc
    inner = getattr(inner, "reason", inner)
    # urllib3 prefixes the connection object: "<...HTTPConnection object at 0x...>: " (1.x)
    # or "HTTPConnection(host='h', port=1): " (2.x).
    text = re.sub(r"^(?:<[^>]*>|\w+\(host=[^)]*\)): ", "", str(inner))
    return text or type(exc).__name__


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
