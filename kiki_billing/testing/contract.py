"""A conformance suite every adapter's tests can subclass (pytest collects the methods).

Subclasses provide :meth:`adapter` and :meth:`client_settings`; the suite checks what the hub
relies on: stable, unique step names; pure request builders; classification of any error into
a transient or terminal :class:`~kiki_billing.hub.errors.DeliveryError`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from kiki_billing.hub.adapter import BillingAdapter, ClientSettings, StepContext
from kiki_billing.hub.errors import DeliveryError
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, Invoice, SourceEvidence
from kiki_billing.profit_share import compute_invoice


def sample_invoice(currency: str = "USD", lines: int = 2) -> Invoice:
    """A small, valid invoice for adapter tests."""
    contract = Contract(
        client_id="acme", name="Acme Corp", email="billing@acme.example", currency=currency
    )
    metrics = [
        CampaignMetrics(
            client_id="acme", campaign_id=f"campaign_{n:03d}", spend="1000.00", ltv=f"{4000 + n}.00"
        )
        for n in range(1, lines + 1)
    ]
    outcome = compute_invoice(
        contract,
        metrics,
        number="KIKI-OaaS-202601-000001",
        period=BillingPeriod.month("2026-01"),
        sources=(SourceEvidence(kind="metrics_file", location="metrics.csv"),),
        issue_date=date(2026, 2, 1),
    )
    assert isinstance(outcome, Invoice)
    return outcome


class AdapterContractSuite:
    """Subclass as ``class TestMyAdapterContract(AdapterContractSuite)``."""

    def adapter(self) -> BillingAdapter:
        """The adapter under test, configured for tests."""
        raise NotImplementedError

    def client_settings(self) -> ClientSettings:
        """Per-client settings for :func:`sample_invoice`."""
        return self.adapter().client_settings_model()

    def test_contract_declares_a_name_and_models(self) -> None:
        """The adapter has a lower-case name and a usable rate limit."""
        adapter = self.adapter()
        assert adapter.name and adapter.name == adapter.name.lower()
        assert adapter.rate_limit().per_second > 0
        assert adapter.rate_limit().concurrency >= 1

    def test_contract_step_names_are_unique_and_stable(self) -> None:
        """Step names are unique and the same for the same invoice."""
        adapter, client = self.adapter(), self.client_settings()
        invoice = sample_invoice()
        first = [step.name for step in adapter.steps(invoice, client)]
        again = [step.name for step in adapter.steps(invoice, client)]
        assert first == again
        assert len(first) == len(set(first))

    def test_contract_requests_build_without_io(self) -> None:
        """Every step's request builds from the invoice alone."""
        adapter, client = self.adapter(), self.client_settings()
        invoice = sample_invoice()
        for step in adapter.steps(invoice, client):
            key = idempotency_key(invoice.number, invoice.revision, adapter.name, step.name)
            request = step.request(StepContext(invoice, client, {}, key))
            assert request.method and request.path

    def test_contract_classifies_any_error(self) -> None:
        """Any exception maps to a DeliveryError."""
        adapter = self.adapter()
        for error in (RuntimeError("boom"), ValueError("bad"), OSError("io")):
            assert isinstance(adapter.classify(error), DeliveryError)

    def test_contract_accepts_a_plain_invoice(self) -> None:
        """A plain invoice passes validation."""
        adapter = self.adapter()
        adapter.validate(sample_invoice(), self.client_settings())
        assert sample_invoice().total_fee > Decimal(0)
