"""The names of every metric kiki-billing exports, with their labels and help.

Users' dashboards and alerts rely on these names: they are a contract. The ``kiki_ooaS_*``
names are the revenue metrics the product promises (exactly as spelled, capital ``S``
included); the ``kiki_billing_*`` names describe the hub. The values are computed from the
ledger (``kiki_billing.hub.metrics``), so every process and every restart reports the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricName:
    """One exported metric family: its sample name, kind, labels and help text."""

    name: str
    kind: MetricKind
    labels: tuple[str, ...]
    help: str


REVENUE = MetricName(
    "kiki_ooaS_revenue_total_micros",
    "gauge",
    ("month", "currency"),
    "Sum of the totals of issued invoices (latest revision, not void) x 1,000,000, by billing "
    "month and currency.",
)
MARGIN_RECOVERED = MetricName(
    "kiki_ooaS_margin_recovered_micros",
    "gauge",
    ("campaign_id", "currency"),
    "Margin recovered (attributed LTV - baseline value) on the campaign lines of issued "
    "invoices x 1,000,000, by campaign and currency.",
)
INVOICES = MetricName(
    "kiki_ooaS_invoices_generated_total",
    "gauge",
    ("status",),
    "Issued invoices (latest revision) by their current status: issued, paid, overdue, "
    "payment_failed, void, uncollectible (each invoice counted once).",
)
SHARE_PERCENTAGE = MetricName(
    "kiki_ooaS_profit_share_percentage",
    "gauge",
    (),
    "The default profit share rate in percent (10 for 10%); a series with a client_id label "
    "for each client whose latest invoice bills another rate.",
)
INVOICE_STATUSES = ("issued", "paid", "overdue", "payment_failed", "void", "uncollectible")

DELIVERIES = MetricName(
    "kiki_billing_deliveries",
    "gauge",
    ("target", "state"),
    "Deliveries recorded in the ledger by target and state (pending, in_flight, delivered, "
    "failed, deferred).",
)
DELIVERY_ATTEMPTS = MetricName(
    "kiki_billing_delivery_attempts_total",
    "counter",
    ("target",),
    "Runs that took a delivery in hand (first push, resumes and retries), by target.",
)
PROVIDER_REQUESTS = MetricName(
    "kiki_billing_provider_requests_total",
    "counter",
    ("target", "account"),
    "Requests sent to a provider account (every attempt, look-up and page).",
)
RATE_LIMITED = MetricName(
    "kiki_billing_rate_limited_total",
    "counter",
    ("target", "account"),
    "429 (throttled) answers from a provider account.",
)
RATE_LIMIT_WAIT = MetricName(
    "kiki_billing_rate_limit_wait_seconds_total",
    "counter",
    ("target", "account"),
    "Seconds spent waiting for a rate-limit slot of a provider account.",
)
CIRCUIT_OPEN = MetricName(
    "kiki_billing_circuit_open",
    "gauge",
    ("target", "account"),
    "1 while a target account's circuit breaker is open (its deliveries are deferred), else 0.",
)
DELIVERY_LATENCY = MetricName(
    "kiki_billing_delivery_latency_seconds",
    "histogram",
    ("target",),
    "Seconds from a delivery's creation in the ledger to its delivery, by target.",
)
OLDEST_UNDELIVERED = MetricName(
    "kiki_billing_oldest_undelivered_invoice_age_seconds",
    "gauge",
    (),
    "Age of the oldest delivery not delivered yet (pending, in flight, failed or deferred); "
    "0 when everything is delivered.",
)
WEBHOOK_EVENTS = MetricName(
    "kiki_billing_webhook_events_total",
    "counter",
    ("target", "outcome"),
    "Provider webhook events recorded once each, by target and outcome (applied, unchanged).",
)
PAYMENT_STATES = MetricName(
    "kiki_billing_payment_states",
    "gauge",
    ("target", "state"),
    "Delivered deliveries by the payment state their provider reported (unknown: none yet).",
)

ALL = (
    REVENUE,
    MARGIN_RECOVERED,
    INVOICES,
    SHARE_PERCENTAGE,
    DELIVERIES,
    DELIVERY_ATTEMPTS,
    PROVIDER_REQUESTS,
    RATE_LIMITED,
    RATE_LIMIT_WAIT,
    CIRCUIT_OPEN,
    DELIVERY_LATENCY,
    OLDEST_UNDELIVERED,
    WEBHOOK_EVENTS,
    PAYMENT_STATES,
)
"""Every metric family, in the order they are exported."""

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
"""Upper bounds of the delivery latency histogram, in seconds (``+Inf`` follows)."""


def sample_names(metric: MetricName) -> tuple[str, ...]:
    """The sample names a family exposes (``_total`` counters, ``_bucket``/``_sum``/``_count``)."""
    if metric.kind == "histogram":
        return tuple(f"{metric.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return (metric.name,)
