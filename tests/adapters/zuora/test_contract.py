"""The shared adapter conformance suite, run on the Zuora adapter against the SOAP fake.

Once with the public 78.0 WSDL (the default) and once with the 82.0 sandbox WSDL, a tenant's WSDL
with custom fields: the adapter and the fake both read the WSDL they are given.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest
import requests
from kiki_billing_adapters.zuora import ZuoraAdapter, ZuoraApiError, ZuoraClientSettings
from zeep.exceptions import Fault

from kiki_billing.models import Invoice
from kiki_billing.testing import AdapterContractSuite, SentRequest
from tests.adapters.zuora.conftest import client_settings, zuora_settings
from tests.support.fake_zuora import DEFAULT_PASSWORD, DEFAULT_USERNAME, FakeZuora
from tests.support.zuora_wsdl import WSDL_78, WSDL_82

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


class ZuoraContract(AdapterContractSuite):
    wsdl: ClassVar[Path] = WSDL_78

    @pytest.fixture(autouse=True)
    def _fake(self) -> Iterator[None]:
        with FakeZuora(seed=5, wsdl=self.wsdl) as fake:
            self.fake = fake
            self.adapters: list[ZuoraAdapter] = []
            yield
            for adapter in self.adapters:
                adapter.close()
        assert fake.app.rejected == []

    def adapter(self) -> ZuoraAdapter:
        made = ZuoraAdapter(zuora_settings(self.fake))
        self.adapters.append(made)
        return made

    def client_settings(self) -> ZuoraClientSettings:
        return client_settings()

    def secret_values(self) -> list[str]:
        return [DEFAULT_PASSWORD, DEFAULT_USERNAME]

    def sample_errors(self) -> Mapping[str, Exception]:
        message = f"boom for {DEFAULT_PASSWORD}"
        return {
            "throttled": ZuoraApiError(
                message, operation="subscribe", code="REQUEST_EXCEEDED_LIMIT", status=429
            ),
            "unavailable": ZuoraApiError(message, operation="subscribe", status=503),
            "connection": requests.ConnectionError(f"reset talking with {DEFAULT_PASSWORD}"),
            "invalid": Fault(message, code="fns:INVALID_VALUE"),
        }

    def upstream_invoices(self, invoice: Invoice) -> int:
        state = self.fake.state()
        names = {
            s["Id"] for s in state["subscriptions"] if s["Name"].startswith(invoice.number + "-")
        }
        return sum(
            1 for inv in state["invoices"] if {i["SubscriptionId"] for i in inv["items"]} & names
        )

    def inject(self, kind: str, *, after_write: bool) -> None:
        if kind == "unavailable":
            self.fake.inject_http_error("subscribe", 503, after=after_write)
        elif after_write:
            self.fake.inject_lost("subscribe")
        else:
            self.fake.inject(self.fake.app.fault_type(kind="drop", operation="subscribe"))

    def expire_keys(self) -> None:
        # NOTE: SOAP keeps no idempotency keys: the unique subscription name never expires.
        # What does expire is the session; the next push must log in again.
        self.fake.expire_sessions()

    def writes(self) -> int:
        return len(self.fake.writes_since(0))

    def sent(self, key: str) -> SentRequest | None:
        marker = f"-{key[:19]}</"
        found = [r for r in self.fake.requests if marker in r.body and "subscribe" in r.body]
        if not found:
            return None
        return SentRequest(found[-1].method, found[-1].path, {})


class TestZuoraContractWsdl78(ZuoraContract):
    wsdl = WSDL_78


class TestZuoraContractWsdl82(ZuoraContract):
    wsdl = WSDL_82
