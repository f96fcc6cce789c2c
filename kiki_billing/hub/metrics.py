"""Prometheus metrics computed from the ledger, the one source of truth.

:class:`LedgerCollector` reads the ledger on every scrape (a few queries; each invoice document
is parsed once per process, as issued invoices never change) and yields the families named in
:mod:`kiki_billing.metrics`. ``kiki-billing metrics serve`` and ``metrics write`` expose the
same registry, so a scrape and a textfile agree.

How each value is computed:

- An invoice is *issued* when at least one delivery of its latest revision was delivered.
  Only the latest revision of an invoice number counts (a correction replaces its original).
- Its status is the most advanced payment state of its deliveries: ``paid`` if any target
  reports it paid, else ``void``, else ``uncollectible``; otherwise ``overdue`` when past its
  due date in the client's time zone, else ``payment_failed`` after a failed collection, else
  ``issued``.
- Revenue and margin recovered sum the issued invoices that are not void, x 1,000,000.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from kiki_billing import metrics as names
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import (
    DEFAULT_TIMEZONE,
    account_health,
    delivery_payments_table,
    invoice_terms,
    is_overdue,
    webhook_event_counts,
)
from kiki_billing.hub.ledger.schema import deliveries_table, invoices_table
from kiki_billing.plugin import PaymentState

MICROS = Decimal(1_000_000)
UNDELIVERED = (
    DeliveryState.PENDING,
    DeliveryState.IN_FLIGHT,
    DeliveryState.FAILED,
    DeliveryState.DEFERRED,
)


@dataclass(frozen=True)
class _Document:
    """What the metrics need of one issued invoice document."""

    client_id: str
    period: str
    currency: str
    total: Decimal
    due_date: date
    share_rate: Decimal | None
    margins: tuple[tuple[str, Decimal], ...]


def _read_document(text: str) -> _Document:
    data = json.loads(text)
    campaign_lines = [line for line in data["lines"] if line.get("kind") == "campaign"]
    margins: dict[str, Decimal] = defaultdict(Decimal)
    for line in campaign_lines:
        if line.get("campaign_id"):
            margins[line["campaign_id"]] += Decimal(line["margin_recovered"])
    rates = {Decimal(line["share_rate"]) for line in campaign_lines}
    return _Document(
        client_id=data["client_id"],
        period=data["period"],
        currency=data["currency"],
        total=Decimal(data["total_fee"]),
        due_date=date.fromisoformat(data["due_date"]),
        share_rate=rates.pop() if len(rates) == 1 else None,
        margins=tuple(sorted(margins.items())),
    )


def _micros(amount: Decimal) -> int:
    return int((amount * MICROS).to_integral_value())


_STATUS_ORDER = (PaymentState.PAID, PaymentState.VOID, PaymentState.UNCOLLECTIBLE)


def invoice_status(
    states: list[PaymentState | None], due: date, timezone: str, now: datetime
) -> str:
    """An issued invoice's status from the payment states of its deliveries (see module)."""
    for final in _STATUS_ORDER:
        if final in states:
            return final.value
    if is_overdue(due, timezone, None, now):
        return "overdue"
    if PaymentState.PAYMENT_FAILED in states:
        return "payment_failed"
    return "issued"


class LedgerCollector(Collector):
    """Yields every kiki-billing metric from the ledger's current content.

    Args:
        ledger: The ledger.
        default_share_rate: The contracts' default share rate (0.10), for
            ``kiki_ooaS_profit_share_percentage``.
        now: The current time (tests).
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        default_share_rate: Decimal = Decimal("0.10"),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.ledger = ledger
        self.default_share_rate = default_share_rate
        self.now = now
        self._documents: dict[tuple[str, int], _Document] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not collect (read the ledger) on register."""
        return []

    def _load_documents(self, conn: sa.Connection, keys: list[tuple[str, int]]) -> None:
        missing = [key for key in keys if key not in self._documents]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            rows = conn.execute(
                sa.select(
                    invoices_table.c.number, invoices_table.c.revision, invoices_table.c.document
                ).where(sa.tuple_(invoices_table.c.number, invoices_table.c.revision).in_(chunk))
            ).all()
            for row in rows:
                self._documents[(row.number, row.revision)] = _read_document(row.document)

    def collect(self) -> Iterator[Metric]:
        """Read the ledger and yield the families (one consistent read per scrape)."""
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        now = self.now()
        d, p = deliveries_table, delivery_payments_table
        with self.ledger.engine.connect() as conn:
            latest = {
                row.number: row.revision
                for row in conn.execute(
                    sa.select(
                        invoices_table.c.number,
                        sa.func.max(invoices_table.c.revision).label("revision"),
                    ).group_by(invoices_table.c.number)
                )
            }
            rows = conn.execute(
                sa.select(
                    d.c.invoice_number,
                    d.c.revision,
                    d.c.target,
                    d.c.state,
                    d.c.attempts,
                    d.c.created_at,
                    d.c.delivered_at,
                    p.c.state.label("payment_state"),
                ).select_from(d.outerjoin(p, p.c.delivery_id == d.c.id))
            ).all()
            self._load_documents(conn, sorted(latest.items()))
        terms = invoice_terms(self.ledger)

        deliveries: Counter[tuple[str, str]] = Counter()
        attempts: Counter[str] = Counter()
        payments: Counter[tuple[str, str]] = Counter()
        latency: dict[str, list[float]] = defaultdict(list)
        oldest: datetime | None = None
        delivered_invoices: dict[tuple[str, int], list[PaymentState | None]] = {}
        for row in rows:
            state = DeliveryState(row.state)
            deliveries[(row.target, state.value)] += 1
            attempts[row.target] += int(row.attempts)
            created = _aware(row.created_at)
            if state in UNDELIVERED and (oldest is None or created < oldest):
                oldest = created
            if state is not DeliveryState.DELIVERED:
                continue
            payment = PaymentState(row.payment_state) if row.payment_state else None
            payments[(row.target, payment.value if payment else "unknown")] += 1
            if row.delivered_at is not None:
                seconds = (_aware(row.delivered_at) - created).total_seconds()
                latency[row.target].append(max(0.0, seconds))
            key = (row.invoice_number, row.revision)
            if latest.get(row.invoice_number) == row.revision:
                delivered_invoices.setdefault(key, []).append(payment)

        revenue: Counter[tuple[str, str]] = Counter()
        margins: Counter[tuple[str, str]] = Counter()
        statuses: Counter[str] = Counter({status: 0 for status in names.INVOICE_STATUSES})
        client_rates: dict[str, tuple[str, Decimal]] = {}
        for key, states in sorted(delivered_invoices.items()):
            document = self._documents[key]
            due, zone = terms.get(key, (document.due_date, DEFAULT_TIMEZONE))
            status = invoice_status(states, due, zone, now)
            statuses[status] += 1
            if document.share_rate is not None:
                seen = client_rates.get(document.client_id)
                if seen is None or document.period >= seen[0]:
                    client_rates[document.client_id] = (document.period, document.share_rate)
            if status == PaymentState.VOID.value:
                continue
            revenue[(document.period, document.currency)] += _micros(document.total)
            for campaign, margin in document.margins:
                margins[(campaign, document.currency)] += _micros(margin)

        yield _gauge(names.REVENUE, revenue)
        yield _gauge(names.MARGIN_RECOVERED, margins)
        yield _gauge(names.INVOICES, {(status,): n for status, n in statuses.items()})
        yield self._share_rates(client_rates)
        yield _gauge(names.DELIVERIES, deliveries)
        yield _counter(names.DELIVERY_ATTEMPTS, {(t,): n for t, n in attempts.items()})
        health = account_health(self.ledger)
        epoch = now.timestamp()
        yield _counter(names.PROVIDER_REQUESTS, {(h.target, h.account): h.requests for h in health})
        yield _counter(names.RATE_LIMITED, {(h.target, h.account): h.throttled for h in health})
        yield _counter(
            names.RATE_LIMIT_WAIT, {(h.target, h.account): h.waited_seconds for h in health}
        )
        yield _gauge(
            names.CIRCUIT_OPEN,
            {(h.target, h.account): int((h.circuit_open_until or 0) > epoch) for h in health},
        )
        yield _histogram(names.DELIVERY_LATENCY, latency)
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        yield _gauge(names.OLDEST_UNDELIVERED, {(): age})
        yield _counter(names.WEBHOOK_EVENTS, webhook_event_counts(self.ledger))
        yield _gauge(names.PAYMENT_STATES, payments)

    def _share_rates(self, client_rates: dict[str, tuple[str, Decimal]]) -> Metric:
        metric = names.SHARE_PERCENTAGE
        family = GaugeMetricFamily(metric.name, metric.help)
        default = self.default_share_rate * 100
        family.add_metric([], float(default))
        for client_id, (_period, rate) in sorted(client_rates.items()):
            if rate * 100 != default:
                family.samples.append(
                    Sample(metric.name, {"client_id": client_id}, float(rate * 100))
                )
        return family


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _gauge(metric: names.MetricName, values: Any) -> Metric:
    family = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    for labels, value in sorted(values.items()):
        family.add_metric(list(labels), value)
    return family


def _counter(metric: names.MetricName, values: Any) -> Metric:
    family = CounterMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    for labels, value in sorted(values.items()):
        family.add_metric(list(labels), value)
    return family


def _histogram(metric: names.MetricName, observations: dict[str, list[float]]) -> Metric:
    family = HistogramMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    for target, values in sorted(observations.items()):
        buckets = []
        for bound in names.LATENCY_BUCKETS:
            buckets.append((repr(bound), sum(1 for v in values if v <= bound)))
        buckets.append(("+Inf", len(values)))
        family.add_metric([target], buckets, sum_value=sum(values))
    return family


def ledger_registry(
    ledger: Ledger, *, default_share_rate: Decimal = Decimal("0.10")
) -> CollectorRegistry:
    """A registry holding only the ledger's metrics (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, default_share_rate=default_share_rate))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format 0.0.4 (what ``/metrics`` and textfiles hold).

    Whole numbers are written as integers (``8121000000``, not ``8.121e+09``): the micros
    metrics are integers, and a textfile reads better so.
    """
    lines: list[str] = []
    for family in registry.collect():
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        lines.append(f"# HELP {exposed} {_escape_help(family.documentation)}")
        lines.append(f"# TYPE {exposed} {family.type}")
        for sample in family.samples:
            labels = ",".join(
                f'{key}="{_escape_label(value)}"' for key, value in sorted(sample.labels.items())
            )
            selector = f"{sample.name}{{{labels}}}" if labels else sample.name
            lines.append(f"{selector} {_number(sample.value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)
