"""The metrics computed from the ledger: every value traced to what was pushed and reported."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiki_billing import metrics as names
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.ledger.payments import apply_payment_state, record_invoice_terms
from kiki_billing.hub.metrics import LedgerCollector, ledger_registry, render
from kiki_billing.models import Invoice
from kiki_billing.plugin import PaymentState
from kiki_billing.testing.contract import sample_invoice
from kiki_billing.testing.memory import Fault, MemoryBillingSystem
from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401

from .conftest import deliveries

BEFORE_DUE = datetime(2026, 2, 15, tzinfo=UTC)
AFTER_DUE = datetime(2026, 3, 20, tzinfo=UTC)


def samples(ledger: Ledger, now: datetime = BEFORE_DUE, **options) -> dict:
    """``{(sample name, frozenset(labels)): value}`` as Prometheus would parse a scrape."""
    collector = LedgerCollector(ledger, now=lambda: now, **options)
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = render(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def with_rate(invoice: Invoice, rate: str) -> Invoice:
    lines = tuple(line.model_copy(update={"share_rate": Decimal(rate)}) for line in invoice.lines)
    return invoice.model_copy(update={"lines": lines})


def test_revenue_margin_and_statuses_follow_the_ledger(make_hub, ledger, system) -> None:
    first, second = sample_invoice(number=1), sample_invoice(client_id="beta", number=2)
    outcomes = make_hub().push(deliveries(first, second))
    assert all(o.state is DeliveryState.DELIVERED for o in outcomes)
    found = samples(ledger)
    total = first.total_fee + second.total_fee
    assert value(found, names.REVENUE.name, month="2026-01", currency="USD") == int(total * 10**6)
    margin = (
        sum(line.margin_recovered for line in first.lines if line.campaign_id == "campaign_001") * 2
    )
    assert value(
        found, names.MARGIN_RECOVERED.name, campaign_id="campaign_001", currency="USD"
    ) == int(margin * 10**6)
    assert value(found, names.INVOICES.name, status="issued") == 2
    assert value(found, names.INVOICES.name, status="paid") == 0
    record = ledger.find_delivery(first.number, 0, "memory", "default")
    apply_payment_state(ledger, record.id, PaymentState.PAID, amount_paid=None,
                        event_id="e", source="webhook")  # fmt: skip
    after = samples(ledger)
    assert value(after, names.INVOICES.name, status="paid") == 1
    assert value(after, names.INVOICES.name, status="issued") == 1
    assert value(after, names.PAYMENT_STATES.name, target="memory", state="paid") == 1
    assert value(after, names.PAYMENT_STATES.name, target="memory", state="unknown") == 1


def test_overdue_void_and_failed_payments(make_hub, ledger) -> None:
    paid, void, failed, open_ = (sample_invoice(client_id=c, number=n) for n, c in
                                 enumerate(("a", "b", "c", "d"), start=1))  # fmt: skip
    make_hub().push(deliveries(paid, void, failed, open_))
    for invoice, state in ((paid, "paid"), (void, "void"), (failed, "payment_failed")):
        record = ledger.find_delivery(invoice.number, 0, "memory", "default")
        apply_payment_state(ledger, record.id, PaymentState(state), amount_paid=None,
                            event_id=state, source="sync")  # fmt: skip
    before = samples(ledger, BEFORE_DUE)
    assert value(before, names.INVOICES.name, status="payment_failed") == 1
    assert value(before, names.INVOICES.name, status="issued") == 1
    assert value(before, names.INVOICES.name, status="void") == 1
    # A void invoice is no revenue.
    assert value(before, names.REVENUE.name, month="2026-01", currency="USD") == int(
        3 * paid.total_fee * 10**6
    )
    after = samples(ledger, AFTER_DUE)
    assert value(after, names.INVOICES.name, status="overdue") == 2
    assert value(after, names.INVOICES.name, status="paid") == 1
    assert value(after, names.INVOICES.name, status="void") == 1


def test_overdue_waits_for_the_end_of_the_due_day_in_the_clients_zone(make_hub, ledger) -> None:
    tokyo, utc = sample_invoice(client_id="tokyo", number=1), sample_invoice(number=2)
    make_hub().push(deliveries(tokyo, utc))
    record_invoice_terms(
        ledger,
        [(tokyo.number, 0, tokyo.due_date, "Asia/Tokyo"), (utc.number, 0, utc.due_date, "UTC")],
    )
    late_evening = datetime(2026, 3, 3, 20, 0, tzinfo=UTC)  # 4 March 05:00 in Tokyo
    found = samples(ledger, late_evening)
    assert value(found, names.INVOICES.name, status="overdue") == 1
    assert value(found, names.INVOICES.name, status="issued") == 1


def test_only_the_latest_revision_counts(make_hub, ledger) -> None:
    original = sample_invoice()
    corrected = sample_invoice(lines=1).model_copy(update={"revision": 1})
    make_hub().push(deliveries(original))
    make_hub().push(deliveries(corrected))
    found = samples(ledger)
    assert value(found, names.REVENUE.name, month="2026-01", currency="USD") == int(
        corrected.total_fee * 10**6
    )
    assert sum(v for (n, _), v in found.items() if n == names.INVOICES.name) == 1


def test_the_share_rate_is_the_default_and_each_client_billed_otherwise(make_hub, ledger) -> None:
    make_hub().push(
        deliveries(sample_invoice(), with_rate(sample_invoice(client_id="vip", number=2), "0.125"))
    )
    found = samples(ledger)
    assert value(found, names.SHARE_PERCENTAGE.name) == 10
    assert value(found, names.SHARE_PERCENTAGE.name, client_id="vip") == 12.5
    assert (names.SHARE_PERCENTAGE.name, frozenset({("client_id", "acme")})) not in found
    other = samples(ledger, default_share_rate=Decimal("0.125"))
    assert value(other, names.SHARE_PERCENTAGE.name) == 12.5
    assert value(other, names.SHARE_PERCENTAGE.name, client_id="acme") == 10


def test_the_hubs_health_429s_waits_circuit_and_oldest_undelivered(
    make_hub, ledger, system: MemoryBillingSystem
) -> None:
    system.faults.append(Fault("throttled", retry_after=7.0, operation="add_line"))
    hub = make_hub(breaker_threshold=1, breaker_cooldown=600.0)
    [ok] = hub.push(deliveries(sample_invoice(number=1)))
    assert ok.state is DeliveryState.DELIVERED
    system.faults.append(Fault("invalid", operation="create_invoice"))
    failed = hub.push(deliveries(sample_invoice(client_id="b", number=2)))
    assert failed[0].state is DeliveryState.FAILED
    found = samples(ledger)
    labels = {"target": "memory", "account": "default"}
    assert value(found, names.RATE_LIMITED.name, **labels) == 1
    assert value(found, names.PROVIDER_REQUESTS.name, **labels) >= len(system.calls) - 1
    assert value(found, names.DELIVERIES.name, target="memory", state="delivered") == 1
    assert value(found, names.DELIVERIES.name, target="memory", state="failed") == 1
    assert value(found, names.DELIVERY_ATTEMPTS.name, target="memory") == 2
    assert (
        value(samples(ledger, datetime(2100, 1, 1, tzinfo=UTC)), names.OLDEST_UNDELIVERED.name) > 0
    )
    assert value(found, names.DELIVERY_LATENCY.name + "_count", target="memory") == 1
    # A 400 does not open the circuit; a provider that keeps failing does.
    assert value(found, names.CIRCUIT_OPEN.name, **labels) == 0
    system.faults.extend(Fault("auth", operation="create_invoice") for _ in range(3))
    hub.push(deliveries(sample_invoice(client_id="c", number=3)))
    assert value(samples(ledger), names.CIRCUIT_OPEN.name, **labels) == 1


def test_counts_add_up_across_runs_and_processes(make_hub, ledger, system) -> None:
    make_hub().push(deliveries(sample_invoice(number=1)))
    first = value(samples(ledger), names.PROVIDER_REQUESTS.name, target="memory", account="default")
    make_hub().push(deliveries(sample_invoice(client_id="b", number=2)))
    second = value(
        samples(ledger), names.PROVIDER_REQUESTS.name, target="memory", account="default"
    )
    assert second == 2 * first


def test_the_text_format_parses_and_writes_whole_numbers_as_integers(make_hub, ledger) -> None:
    make_hub().push(deliveries(sample_invoice()))
    text = render(ledger_registry(ledger)).decode()
    line = next(x for x in text.splitlines() if x.startswith(names.REVENUE.name + "{"))
    assert line.endswith(f" {int(sample_invoice().total_fee * 10**6)}")
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for metric in names.ALL:
        if metric is not names.WEBHOOK_EVENTS:  # no event received yet
            assert set(names.sample_names(metric)) <= exposed, metric.name


@pytest.mark.parametrize("metric", names.ALL, ids=lambda m: m.name)
def test_every_metric_has_help_and_its_declared_labels(make_hub, ledger, metric) -> None:
    make_hub().push(deliveries(sample_invoice()))
    text = render(ledger_registry(ledger)).decode()
    for family in text_string_to_metric_families(text):
        if not any(s.name in names.sample_names(metric) for s in family.samples):
            continue
        assert family.documentation and family.type == metric.kind
        for sample in family.samples:
            extra = {"le"} if metric.kind == "histogram" else set()
            if metric is names.SHARE_PERCENTAGE:
                extra = {"client_id"}
            assert set(sample.labels) <= set(metric.labels) | extra


@pytest.mark.server
def test_the_metrics_read_a_postgresql_ledger(postgres_db_url: str) -> None:  # noqa: F811
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.hub.retry import RetryPolicy
    from kiki_billing.testing.memory import MemoryAdapter

    ledger = Ledger(postgres_db_url)
    try:
        system = MemoryBillingSystem()
        system.faults.append(Fault("throttled", retry_after=0.0, operation="add_line"))
        hub = Hub(ledger, {"memory": MemoryAdapter(system=system)}, RetryPolicy(max_attempts=3),
                  sleep=lambda _: None, pace=lambda _: None)  # fmt: skip
        invoices = [sample_invoice(number=1), sample_invoice(client_id="b", number=2)]
        hub.push(deliveries(*invoices))
        hub.push(deliveries(sample_invoice(client_id="c", number=3)))
        record = ledger.find_delivery(invoices[0].number, 0, "memory", "default")
        apply_payment_state(
            ledger, record.id, PaymentState.PAID, amount_paid=None, event_id="e",
            source="webhook", event=("memory", "default", "x"),
        )  # fmt: skip
        found = samples(ledger)
        assert value(found, names.INVOICES.name, status="paid") == 1
        assert value(found, names.INVOICES.name, status="issued") == 2
        assert value(found, names.RATE_LIMITED.name, target="memory", account="default") == 1
        assert value(found, names.WEBHOOK_EVENTS.name, target="memory", outcome="applied") == 1
        assert value(found, names.REVENUE.name, month="2026-01", currency="USD") == int(
            3 * invoices[0].total_fee * 10**6
        )
    finally:
        ledger.close()
