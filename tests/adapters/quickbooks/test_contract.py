"""The shared adapter conformance suite, run on the QuickBooks adapter against the local fake."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from decimal import Decimal

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksAdapter, doc_number

from kiki_billing.models import Invoice
from kiki_billing.plugin import MemoryCredentialStore
from kiki_billing.testing import AdapterContractSuite, SentRequest
from tests.adapters.quickbooks.conftest import settings_for
from tests.support.fake_provider import RateLimits
from tests.support.fake_quickbooks import CLIENT_ID, CLIENT_SECRET, REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

INVOICES = f"/v3/company/{REALM}/invoice"


def raised_by(adapter: QuickBooksAdapter, fake: FakeQuickBooks, **fault: object) -> Exception:
    """What the SDK raises for a query the fake answers with ``fault`` (a real exception)."""
    kind = fault.pop("kind", "error")
    if kind == "drop":
        fake.inject_drop("POST", f"/v3/company/{REALM}/query")
    else:
        fake.inject_error("POST", f"/v3/company/{REALM}/query", **fault)  # type: ignore[arg-type]
    try:
        adapter._call(lambda qb: qb.query("select * from Item"))
    except Exception as exc:
        return exc
    raise AssertionError("the fault did not raise")


class TestQuickBooksAdapterContract(AdapterContractSuite):
    @pytest.fixture(autouse=True)
    def _fake(self) -> Iterator[None]:
        # NOTE: the suite's hub does not sleep, so the fake's 10/s window is off here; the
        # limits are tested in test_hub.py with a hub that paces for real.
        with FakeQuickBooks(seed=7, rate_limits=RateLimits()) as fake:
            self.fake = fake
            self.seed = fake.app.issue_refresh_token()
            self.store = MemoryCredentialStore()
            yield

    def adapter(self) -> QuickBooksAdapter:
        adapter = QuickBooksAdapter(settings_for(self.fake, self.seed))
        adapter.credentials = self.store
        return adapter

    def secret_values(self) -> list[str]:
        return [CLIENT_ID, CLIENT_SECRET, self.seed]

    def sample_errors(self) -> Mapping[str, Exception]:
        adapter = self.adapter()
        return {
            "throttled": raised_by(adapter, self.fake, status=429),
            "unavailable": raised_by(adapter, self.fake, status=503, body="html"),
            "connection": raised_by(adapter, self.fake, kind="drop"),
            "invalid": raised_by(adapter, self.fake, status=400, code="2050"),
        }

    def upstream_invoices(self, invoice: Invoice) -> int:
        number = doc_number(invoice.number)
        return sum(
            1
            for found in self.fake.invoices()
            if found["DocNumber"] == number and invoice.number in found.get("PrivateNote", "")
        )

    def inject(self, kind: str, *, after_write: bool) -> None:
        if kind == "unavailable":
            self.fake.inject_error("POST", INVOICES, status=503, after=after_write)
        else:
            self.fake.inject_drop("POST", INVOICES, after=after_write)

    def expire_keys(self) -> None:
        self.fake.app.idempotency.clear()

    def writes(self) -> int:
        return len(self.fake.writes_since(0))

    def sent(self, key: str) -> SentRequest | None:
        found = [r for r in self.fake.requests if r.idempotency_key == key]
        if not found:
            return None
        last = found[-1]
        payload = json.loads(last.body, parse_float=Decimal) if last.body else {}
        return SentRequest(last.method, last.path, payload)
