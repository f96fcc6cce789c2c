"""The conformance suite every adapter's tests subclass (pytest collects the methods).

A subclass says how to build the adapter against a provider double and, where the double
allows, how to count invoices upstream, script a fault, expire idempotency keys and read back
what was sent. The suite then drives the real hub (ledger, keys, retries, look-ups) and checks
what the hub relies on and what users are promised:

- the adapter's name is its entry point, its settings never show a secret;
- sample provider errors classify as the hub expects (429 rate limited, 5xx and lost
  connections transient, 4xx terminal);
- every step's ``send`` sends exactly the request its builder made, and ``--dry-run`` shows
  those requests;
- a retry resends the same key; a lost response is replayed, never duplicated;
- the look-ups find what a push made; a new ledger with expired keys creates nothing twice;
- a pushed invoice is read back once, with its total and currency, by reads only.

Tests whose hook a subclass does not provide are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, Invoice, SourceEvidence
from kiki_billing.plugin import (
    BillingAdapter,
    ClientSettings,
    DeliveryError,
    PaymentState,
    RateLimitedError,
    StepContext,
    StepRequest,
    TerminalError,
    TransientError,
)
from kiki_billing.profit_share import compute_invoice

ERROR_KINDS = {
    "throttled": RateLimitedError,
    "unavailable": TransientError,
    "connection": TransientError,
    "invalid": TerminalError,
}
"""What each sample error must classify as (``RateLimitedError`` is also transient)."""


def sample_invoice(
    currency: str = "USD", lines: int = 2, *, client_id: str = "acme", number: int = 1
) -> Invoice:
    """A small, valid invoice for adapter tests."""
    contract = Contract(
        client_id=client_id,
        name="Acme Corp",
        email="billing@acme.example",
        currency=currency,
    )
    metrics = [
        CampaignMetrics(
            client_id=client_id,
            campaign_id=f"campaign_{n:03d}",
            spend="1000.00",
            ltv=f"{4000 + n}.00",
        )
        for n in range(1, lines + 1)
    ]
    outcome = compute_invoice(
        contract,
        metrics,
        number=f"KIKI-OaaS-202601-{number:06d}",
        period=BillingPeriod.month("2026-01"),
        sources=(SourceEvidence(kind="metrics_file", location="metrics.csv"),),
        issue_date=date(2026, 2, 1),
    )
    assert isinstance(outcome, Invoice)
    return outcome


@dataclass(frozen=True)
class SentRequest:
    """A request as the provider double recorded it, in the adapter's request terms."""

    method: str
    path: str
    payload: Mapping[str, Any]


_PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\}")


def fill_placeholders(value: Any, refs: Mapping[str, str]) -> Any:
    """``value`` with every ``{name}`` that ``refs`` knows replaced by its id."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: refs.get(m.group(1), m.group(0)), value)
    if isinstance(value, Mapping):
        return {k: fill_placeholders(v, refs) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fill_placeholders(v, refs) for v in value]
    return value


class AdapterContractSuite:
    """Subclass as ``class TestMyAdapterContract(AdapterContractSuite)``."""

    # What a subclass provides -----------------------------------------------------------------

    registered: ClassVar[bool] = True
    """False for an adapter that is not installed through an entry point (a test double)."""

    def adapter(self) -> BillingAdapter[Any, Any]:
        """The adapter under test, configured against the provider double."""
        raise NotImplementedError

    def client_settings(self) -> ClientSettings:
        """Per-client settings for :func:`sample_invoice`."""
        return type(self.adapter()).client_settings_model()

    def invoice(self) -> Invoice:
        """The invoice the suite pushes (override for a currency the double bills in)."""
        return sample_invoice()

    def sample_errors(self) -> Mapping[str, Exception]:
        """What the SDK raises for each kind of error (any subset).

        Kinds: ``throttled`` (429), ``unavailable`` (503), ``invalid`` (400) and
        ``connection`` (no response).
        """
        raise NotImplementedError

    def secret_values(self) -> list[str]:
        """The secrets the test settings hold (never to be shown)."""
        return []

    def upstream_invoices(self, invoice: Invoice) -> int:
        """How many invoices the double holds that carry ``invoice``'s number."""
        raise NotImplementedError

    def upstream_customers(self, invoice: Invoice) -> int:
        """How many customers (contacts, accounts) the double holds for ``invoice``'s client."""
        raise NotImplementedError

    def inject(self, kind: str, *, after_write: bool) -> None:
        """Make the double's next write fail: ``unavailable`` (503) or ``connection``.

        With ``after_write`` the write happens, then the response is lost.
        """
        raise NotImplementedError

    def expire_keys(self) -> None:
        """Make the double forget every idempotency key (its key window has passed)."""
        raise NotImplementedError

    def sent(self, key: str) -> SentRequest | None:
        """The last write the double received under ``key``."""
        raise NotImplementedError

    def writes(self) -> int:
        """How many writes (requests that may change something) the double received so far."""
        raise NotImplementedError

    # Machinery --------------------------------------------------------------------------------

    def _hook(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except NotImplementedError:
            pytest.skip("the provider double of this adapter does not offer this hook")

    def _sent(self, key: str) -> SentRequest | None:
        try:
            return self.sent(key)
        except NotImplementedError:
            return None

    def _hub(self, ledger: Ledger, adapter: BillingAdapter[Any, Any], attempts: int = 4) -> Hub:
        policy = RetryPolicy(max_attempts=attempts, initial_wait=0.0, max_wait=0.0)
        return Hub(ledger, {adapter.name: adapter}, policy, sleep=lambda _: None)

    def _delivery(self, adapter: BillingAdapter[Any, Any], invoice: Invoice) -> Delivery:
        return Delivery(invoice, adapter.name, self.client_settings(), adapter.account)

    def _ledger(self, path: Path, name: str = "ledger") -> Ledger:
        return Ledger(f"sqlite:///{path / (name + '.sqlite3')}")

    # The suite ------------------------------------------------------------------------------

    def test_contract_name_is_its_entry_point(self) -> None:
        """The adapter is registered under its own lower-case name."""
        adapter = self.adapter()
        assert adapter.name == adapter.name.lower()
        if not self.registered:
            pytest.skip("not installed through an entry point")
        points = {ep.name: ep.value for ep in entry_points(group="kiki_billing.adapters")}
        assert adapter.name in points, f"no entry point named {adapter.name!r}"
        module, _, attr = points[adapter.name].partition(":")
        assert attr == type(adapter).__name__
        assert type(adapter).__module__.startswith(module)

    def test_contract_settings_never_show_a_secret(self) -> None:
        """Neither the settings' repr nor the account name shows a secret value."""
        adapter = self.adapter()
        shown = f"{adapter.settings!r} {adapter.settings} {adapter.account}"
        for secret in self.secret_values():
            assert secret not in shown

    def test_contract_rate_limit_is_usable(self) -> None:
        """Every window admits a request and at least one may be in flight."""
        limit = self.adapter().rate_limit()
        assert limit.windows and limit.concurrency >= 1

    def test_contract_classifies_sample_errors(self) -> None:
        """429 is rate limited, 503 and lost connections transient, 400 terminal."""
        adapter = self.adapter()
        samples = self._hook(self.sample_errors)
        for kind, error in samples.items():
            classified = adapter.classify_error(error)
            assert isinstance(classified, ERROR_KINDS[kind]), (kind, classified)
            for secret in self.secret_values():
                assert secret not in str(classified)
        for error in (RuntimeError("boom"), ValueError("bad")):
            assert isinstance(adapter.classify_error(error), DeliveryError)

    def test_contract_accepts_a_plain_invoice(self) -> None:
        """A plain invoice passes validation and every request builds without I/O."""
        adapter, client, invoice = self.adapter(), self.client_settings(), self.invoice()
        adapter.validate(invoice, client)
        names = [step.name for step in adapter.steps(invoice, client)]
        assert len(names) == len(set(names))
        for step in adapter.steps(invoice, client):
            key = idempotency_key(invoice.number, invoice.revision, adapter.name, step.name)
            request = step.request(StepContext(invoice, client, {}, key))
            assert request.method and request.path

    def test_contract_sends_exactly_what_dry_run_shows(self, tmp_path: Path) -> None:
        """Each send gets the very request its builder made, and dry run showed it."""
        adapter, invoice = self.adapter(), self.invoice()
        ledger = self._ledger(tmp_path)
        hub = self._hub(ledger, adapter)
        delivery = self._delivery(adapter, invoice)
        preview = {step.name: step for step in hub.preview(delivery).steps}
        built: dict[str, list[StepRequest]] = {}
        received: dict[str, list[StepRequest]] = {}
        real_steps = adapter.steps

        def spied_steps(inv: Invoice, client: Any) -> Any:
            spied = []
            for step in real_steps(inv, client):

                def request(ctx: Any, step: Any = step) -> StepRequest:
                    made: StepRequest = step.request(ctx)
                    built.setdefault(step.name, []).append(made)
                    return made

                def send(ctx: Any, req: StepRequest, step: Any = step) -> Mapping[str, str]:
                    received.setdefault(step.name, []).append(req)
                    refs: Mapping[str, str] = step.send(ctx, req)
                    return refs

                spied.append(type(step)(**{**step.__dict__, "request": request, "send": send}))
            return spied

        adapter.steps = spied_steps  # type: ignore[method-assign,assignment]
        [outcome] = hub.push([delivery])
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        assert received, "no step was sent"
        for name, requests in received.items():
            assert all(any(r is b for b in built[name]) for r in requests), name
            shown = preview[name].request
            assert shown is not None
            sent = requests[-1]
            assert (sent.method, fill_placeholders(shown.path, outcome.refs)) == (
                sent.method,
                sent.path,
            ), name
            assert fill_placeholders(dict(shown.payload), outcome.refs) == dict(sent.payload), name
        recorded = ledger.steps(ledger.deliveries()[0].id)
        for name, requests in received.items():
            wire = self._sent(recorded[name].idempotency_key)
            if wire is not None:
                assert (wire.method, wire.path) == (requests[-1].method, requests[-1].path), name

    def test_contract_retry_resends_the_same_key(self, tmp_path: Path) -> None:
        """A 503 on a write is retried under the same key and bills once."""
        adapter, invoice = self.adapter(), self.invoice()
        self._hook(lambda: self.inject("unavailable", after_write=False))
        hub = self._hub(self._ledger(tmp_path), adapter)
        [outcome] = hub.push([self._delivery(adapter, invoice)])
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        assert self._hook(lambda: self.upstream_invoices(invoice)) == 1

    def test_contract_lost_response_is_not_duplicated(self, tmp_path: Path) -> None:
        """A write whose response is lost is resent under its key: one invoice upstream."""
        adapter, invoice = self.adapter(), self.invoice()
        self._hook(lambda: self.inject("connection", after_write=True))
        hub = self._hub(self._ledger(tmp_path), adapter)
        [outcome] = hub.push([self._delivery(adapter, invoice)])
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        assert self._hook(lambda: self.upstream_invoices(invoice)) == 1

    def test_contract_unknown_outcome_is_looked_up(self, tmp_path: Path) -> None:
        """A write lost for good (retries spent, keys expired) is found, not made twice."""
        adapter, invoice = self.adapter(), self.invoice()
        self._hook(lambda: self.inject("connection", after_write=True))
        ledger = self._ledger(tmp_path)
        [first] = self._hub(ledger, adapter, attempts=1).push([self._delivery(adapter, invoice)])
        assert first.state is DeliveryState.DEFERRED, first
        self._hook(self.expire_keys)
        [second] = self._hub(ledger, adapter).push([self._delivery(adapter, invoice)])
        assert second.state is DeliveryState.DELIVERED, second.error
        assert self._hook(lambda: self.upstream_invoices(invoice)) == 1

    def test_contract_new_ledger_and_expired_keys_bill_once(self, tmp_path: Path) -> None:
        """A lost ledger plus expired provider keys: the look-ups find what exists."""
        adapter, invoice = self.adapter(), self.invoice()
        [first] = self._hub(self._ledger(tmp_path, "a"), adapter).push(
            [self._delivery(adapter, invoice)]
        )
        assert first.state is DeliveryState.DELIVERED, first.error
        self._hook(self.expire_keys)
        [second] = self._hub(self._ledger(tmp_path, "b"), adapter).push(
            [self._delivery(adapter, invoice)]
        )
        assert second.state is DeliveryState.DELIVERED, second.error
        assert self._hook(lambda: self.upstream_invoices(invoice)) == 1
        with contextlib.suppress(NotImplementedError):
            assert self.upstream_customers(invoice) == 1
        for name in first.refs:
            if name in second.refs and not name.endswith("status"):
                assert first.refs[name] == second.refs[name], name

    def test_contract_lookups_find_what_a_push_made(self, tmp_path: Path) -> None:
        """Every step's look-up finds the object the push created."""
        adapter, invoice, client = self.adapter(), self.invoice(), self.client_settings()
        [outcome] = self._hub(self._ledger(tmp_path), adapter).push(
            [self._delivery(adapter, invoice)]
        )
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        for step in adapter.steps(invoice, client):
            if step.lookup is None:
                continue
            key = idempotency_key(invoice.number, invoice.revision, adapter.name, step.name)
            found = step.lookup(StepContext(invoice, client, dict(outcome.refs), key))
            assert found is not None, step.name

    def test_contract_pushed_invoice_is_read_back_once(self, tmp_path: Path) -> None:
        """``remote_invoices`` finds the pushed invoice once, with its total, by reads only.

        Skipped for an adapter that cannot read its provider back (``NotImplementedError``).
        """
        adapter, invoice = self.adapter(), self.invoice()
        [outcome] = self._hub(self._ledger(tmp_path), adapter).push(
            [self._delivery(adapter, invoice)]
        )
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        try:
            writes = self.writes()
        except NotImplementedError:
            writes = None
        try:
            found = adapter.remote_invoices(invoice, dict(outcome.refs))
        except NotImplementedError:
            pytest.skip(f"adapter {adapter.name!r} cannot read invoices back")
        assert len(found) == 1, found
        [remote] = found
        assert (remote.total, remote.currency) == (invoice.total_fee, invoice.currency.upper())
        assert Decimal(0) <= remote.amount_paid <= remote.total
        assert remote.state not in (PaymentState.VOID, PaymentState.UNCOLLECTIBLE)
        assert remote.kiki_number in (None, invoice.number)
        assert remote.kiki_revision in (None, invoice.revision)
        assert all(isinstance(v, str) for v in remote.refs.values())
        if writes is not None:
            assert self.writes() == writes, "reading back sent a write"
