"""``reconcile`` through the QuickBooks adapter and fake: drift made in QuickBooks' own UI."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import structlog

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.reconcile import Check, Result, reconcile
from kiki_billing.hub.retry import RetryPolicy
from tests.adapters.quickbooks.test_hub import Made, Pusher
from tests.adapters.stripe.test_cassettes import acme, saas
from tests.support.fake_quickbooks import FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


@pytest.fixture
def push(tmp_path: Path) -> Pusher:
    return Pusher(tmp_path)


def drift(fake: FakeQuickBooks, make_adapter: Made, push: Pusher) -> set[tuple[str, str, str]]:
    adapter = make_adapter()
    hub = Hub(push.ledger, {"quickbooks": adapter}, RetryPolicy(max_attempts=2))
    start = len(fake.requests)
    findings = reconcile(
        push.ledger,
        {"quickbooks": adapter},
        lambda a, read: hub.runner.call(a, read, structlog.get_logger("t"))[0],
    )
    assert fake.writes_since(start) == []
    return {(f.invoice, f.check.value, f.detail) for f in findings if f.result is Result.DRIFT}


def test_deleted_and_edited_invoices_are_drift(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    first, second = acme(), saas()
    outcomes = push(make_adapter(), [first, second])
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert drift(fake, make_adapter, push) == set()
    fake.mark_invoice(outcomes[0].refs["invoice_id"], "deleted")
    company = fake.app.companies[fake.app.realm]
    edited = company.invoices[outcomes[1].refs["invoice_id"]]
    edited["TotalAmt"] = edited["Balance"] = edited["TotalAmt"] + Decimal("1.00")
    found = drift(fake, make_adapter, push)
    assert (first.number, Check.EXISTS.value, "missing upstream (deleted there?)") in found
    assert (second.number, Check.AMOUNT.value, "total edited upstream?") in found
