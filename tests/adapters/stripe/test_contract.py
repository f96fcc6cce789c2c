"""The shared adapter conformance suite, run on the Stripe adapter against the local fake."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import stripe
from kiki_billing_adapters.stripe import StripeAdapter, StripeSettings

from kiki_billing.models import Invoice
from kiki_billing.testing import AdapterContractSuite, SentRequest
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

TEST_KEY = "sk_test_kiki_contract_0123456789abcdef"


class TestStripeAdapterContract(AdapterContractSuite):
    @pytest.fixture(autouse=True)
    def _fake(self) -> Iterator[None]:
        with FakeStripe(seed=7) as fake:
            self.fake = fake
            yield

    def adapter(self) -> StripeAdapter:
        return StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=self.fake.url))

    def secret_values(self) -> list[str]:
        return [TEST_KEY]

    def sample_errors(self) -> Mapping[str, Exception]:
        body = {"error": {"type": "api_error", "message": f"boom for {TEST_KEY}"}}
        return {
            "throttled": stripe.RateLimitError("slow down", None, 429, body, {}),
            "unavailable": stripe.APIError("unavailable", None, 503, body, {}),
            "connection": stripe.APIConnectionError(f"reset talking with {TEST_KEY}"),
            "invalid": stripe.InvalidRequestError("bad param", "amount", None, None, 400, body),
        }

    def upstream_invoices(self, invoice: Invoice) -> int:
        return sum(
            1
            for found in self.fake.state()["invoices"]
            if found["metadata"].get("kiki_invoice_number") == invoice.number
        )

    def upstream_customers(self, invoice: Invoice) -> int:
        return sum(
            1
            for found in self.fake.state()["customers"]
            if (found.get("metadata") or {}).get("kiki_client_id") == invoice.client_id
        )

    def inject(self, kind: str, *, after_write: bool) -> None:
        if kind == "unavailable":
            self.fake.inject_503("POST", "/v1/invoices", after=after_write)
        else:
            self.fake.inject_drop("POST", "/v1/invoices", after=after_write)

    def expire_keys(self) -> None:
        self.fake.advance_clock(24 * 3600 + 1)  # Stripe keeps a key at least 24 h

    def writes(self) -> int:
        return len(self.fake.writes_since(0))

    def sent(self, key: str) -> SentRequest | None:
        found = [r for r in self.fake.requests if r.idempotency_key == key]
        if not found:
            return None
        return SentRequest(found[-1].method, found[-1].path, {})
