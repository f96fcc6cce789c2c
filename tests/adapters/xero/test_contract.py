"""The shared adapter conformance suite, run on the Xero adapter against the local fake."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import requests
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings, XeroHTTPError

from kiki_billing.models import Invoice
from kiki_billing.plugin import MemoryCredentialStore
from kiki_billing.testing import AdapterContractSuite, SentRequest
from tests.support.fake_xero import PREFIX, FakeXero, FakeXeroApp, error_body

from .conftest import settings_for

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


class TestXeroAdapterContract(AdapterContractSuite):
    @pytest.fixture(autouse=True)
    def _fake(self) -> Iterator[None]:
        with FakeXero(FakeXeroApp(seed=7)) as fake:
            self.fake = fake
            self.seed = fake.app.issue_refresh_token()
            self.store = MemoryCredentialStore()
            yield

    def adapter(self) -> XeroAdapter:
        return XeroAdapter(settings_for(self.fake, self.seed), credentials=self.store)

    def client_settings(self) -> XeroClientSettings:
        return XeroClientSettings(tax_type="NONE")

    def secret_values(self) -> list[str]:
        settings = settings_for(self.fake, self.seed)
        return [settings.client_secret.get_secret_value(), self.seed]

    def sample_errors(self) -> Mapping[str, Exception]:
        def problem(status: int, **headers: str) -> XeroHTTPError:
            return XeroHTTPError(status, headers, error_body(status, "boom"), "PUT /Invoices")

        return {
            "throttled": problem(429, **{"Retry-After": "2", "X-Rate-Limit-Problem": "minute"}),
            "unavailable": problem(503),
            "connection": requests.ConnectionError(f"reset while sending {self.seed}"),
            "invalid": problem(400),
        }

    def upstream_invoices(self, invoice: Invoice) -> int:
        return sum(1 for i in self.fake.invoices() if i["InvoiceNumber"] == invoice.number)

    def inject(self, kind: str, *, after_write: bool) -> None:
        if kind == "unavailable":
            self.fake.inject_error("PUT", f"{PREFIX}/Invoices", status=503, after=after_write)
        else:
            self.fake.inject_drop("PUT", f"{PREFIX}/Invoices", after=after_write)

    def expire_keys(self) -> None:
        self.fake.expire_keys()

    def writes(self) -> int:
        return len(self.fake.writes_since(0))

    def sent(self, key: str) -> SentRequest | None:
        found = [r for r in self.fake.requests if r.idempotency_key == key]
        if not found:
            return None
        last = found[-1]
        path = last.path.removeprefix(PREFIX) + (f"?{last.query}" if last.query else "")
        return SentRequest(last.method, path, {})
