"""The Xero adapter through the real Hub against the local fake: throttling, bad input, exact
amounts, look-ups and never-twice.

Time is virtual: the hub's retry waits, its rate-limit pacing and the fake's clock are one
clock that only moves when the hub would sleep, so waits are exact and nothing sleeps.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.files import JsonFileAdapter, JsonSettings
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, Invoice, SourceEvidence
from kiki_billing.plugin import BillingAdapter, ClientSettings, MemoryCredentialStore
from kiki_billing.profit_share import compute_invoice
from tests.support.fake_provider import RateLimits, Window
from tests.support.fake_xero import (
    DEFAULT_TENANT,
    PREFIX,
    XERO_RATE_LIMITS,
    FakeXero,
    FakeXeroApp,
)

from .conftest import settings_for

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

T0 = 1_769_904_000.0  # 2026-02-01T00:00:00Z
TAX_FREE = XeroClientSettings(tax_type="NONE")


@dataclass
class VirtualTime:
    """The hub's sleeps and the fake's clock: one clock that moves only when someone waits."""

    now: float = 0.0
    waits: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.waits.append(seconds)
            self.now += seconds


@pytest.fixture
def time_() -> VirtualTime:
    return VirtualTime()


@pytest.fixture
def fake(time_: VirtualTime) -> Iterator[FakeXero]:
    with FakeXero(FakeXeroApp(seed=9, clock=lambda: T0 + time_.now)) as server:
        yield server


@dataclass
class Pusher:
    fake: FakeXero
    time: VirtualTime
    tmp_path: Path
    seed: str
    store: MemoryCredentialStore = field(default_factory=MemoryCredentialStore)

    def adapter(self, **overrides: Any) -> XeroAdapter:
        return XeroAdapter(settings_for(self.fake, self.seed, **overrides), credentials=self.store)

    def ledger(self, name: str = "ledger") -> Ledger:
        return Ledger(f"sqlite:///{self.tmp_path / (name + '.sqlite3')}")

    def push(
        self,
        invoices: Sequence[Invoice],
        client: XeroClientSettings = TAX_FREE,
        *,
        adapter: XeroAdapter | None = None,
        ledger: str = "ledger",
        others: dict[str, tuple[BillingAdapter[Any, Any], ClientSettings]] | None = None,
        redrive: bool = False,
    ) -> list[DeliveryOutcome]:
        adapter = adapter or self.adapter()
        adapters: dict[str, BillingAdapter[Any, Any]] = {"xero": adapter}
        deliveries = [Delivery(i, "xero", client, adapter.account) for i in invoices]
        for name, (other, other_client) in (others or {}).items():
            adapters[name] = other
            deliveries += [Delivery(i, name, other_client, other.account) for i in invoices]
        hub = Hub(
            self.ledger(ledger),
            adapters,
            RetryPolicy(max_attempts=4, initial_wait=0.5, max_wait=2.0),
            sleep=self.time.sleep,
            clock=self.time.clock,
        )
        return hub.push(deliveries, redrive_failed=redrive)


@pytest.fixture
def pusher(fake: FakeXero, time_: VirtualTime, tmp_path: Path) -> Pusher:
    return Pusher(fake, time_, tmp_path, fake.app.issue_refresh_token())


def invoice_for(
    client_id: str = "acme",
    *,
    number: int = 1,
    fees: Sequence[str] = ("2209.00",),
    currency: str = "USD",
    name: str | None = None,
    period: str = "2026-01",
    fee_cap: str | None = None,
) -> Invoice:
    """An invoice whose campaign lines carry exactly ``fees`` (spend 1,000, share 100%)."""
    contract = Contract(
        client_id=client_id,
        name=name or f"{client_id.title()} Corp",
        email=f"billing@{client_id}.example",
        currency=currency,
        share_rate="1",
        baseline_roas="1",
        fee_cap=fee_cap,
    )
    metrics = [
        CampaignMetrics(
            client_id=client_id,
            campaign_id=f"campaign_{n:03d}",
            spend="1000",
            ltv=str(Decimal("1000") + Decimal(fee)),
        )
        for n, fee in enumerate(fees, start=1)
    ]
    outcome = compute_invoice(
        contract,
        metrics,
        number=f"KIKI-OaaS-{period.replace('-', '')}-{number:06d}",
        period=BillingPeriod.month(period),
        sources=(SourceEvidence(kind="metrics_file", location="metrics.csv"),),
        issue_date=date(2026, 2, 1),
    )
    assert isinstance(outcome, Invoice)
    assert [line.fee for line in outcome.lines][: len(fees)] == [Decimal(f) for f in fees]
    return outcome


def api_requests(fake: FakeXero, method: str | None = None, path: str | None = None) -> list[Any]:
    return [
        r
        for r in fake.requests
        if r.path.startswith(PREFIX)
        and (method is None or r.method == method)
        and (path is None or r.path == PREFIX + path)
    ]


def held(fake: FakeXero, number: str) -> list[dict[str, Any]]:
    return [i for i in fake.invoices() if i["InvoiceNumber"] == number]


# --------------------------------------------------------------------------------------------
# Throttling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["minute", "concurrent"])
def test_a_429_waits_retry_after_then_sends_the_same_key(
    pusher: Pusher, fake: FakeXero, time_: VirtualTime, problem: str
) -> None:
    fake.inject_error(
        "PUT",
        f"{PREFIX}/Invoices",
        status=429,
        headers={"Retry-After": "3", "X-Rate-Limit-Problem": problem},
    )
    invoice = invoice_for()
    [outcome] = pusher.push([invoice])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    puts = api_requests(fake, "PUT", "/Invoices")
    assert [r.status for r in puts] == [429, 200]
    assert puts[0].idempotency_key == puts[1].idempotency_key
    assert 3.0 in time_.waits
    assert len(held(fake, invoice.number)) == 1


def test_the_day_limit_defers_that_organisations_deliveries_and_others_go_on(
    pusher: Pusher, fake: FakeXero, time_: VirtualTime, tmp_path: Path
) -> None:
    fake.configure(
        rate_limits=RateLimits(windows=(Window(60, 60.0, "minute"), Window(4, 86400.0, "day")))
    )
    invoices = [invoice_for(c, number=n) for n, c in enumerate(["acme", "beta", "gamma"], 1)]
    files = JsonFileAdapter(JsonSettings(dir=tmp_path / "json"))
    outcomes = pusher.push(
        invoices,
        adapter=pusher.adapter(concurrency=1),  # one at a time: a deterministic order
        others={"json": (files, files.client_settings_model())},
    )
    xero = [o for o in outcomes if o.target == "xero"]
    assert [o.state for o in xero] == [
        DeliveryState.DELIVERED,
        DeliveryState.DEFERRED,
        DeliveryState.DEFERRED,
    ]
    assert xero[1].error is not None and "daily call limit" in xero[1].error
    assert "deliveries wait until 2026-" in xero[1].error
    assert xero[2].error is not None and "next request possible in" in xero[2].error
    assert all(o.state is DeliveryState.DELIVERED for o in outcomes if o.target == "json")
    # The third delivery never reached Xero: the organisation was paused until the reset.
    assert [r.status for r in api_requests(fake)] == [200, 200, 200, 200, 429]
    # After the reset (Xero's window empties) a later run completes the rest, nothing twice.
    time_.now += 86400
    fake.configure(rate_limits=XERO_RATE_LIMITS)
    later = pusher.push(invoices, adapter=pusher.adapter(concurrency=1))
    assert all(o.state is DeliveryState.DELIVERED for o in later), later
    assert sorted(i["InvoiceNumber"] for i in fake.invoices()) == [i.number for i in invoices]


def test_pacing_keeps_a_long_run_under_sixty_calls_a_minute(pusher: Pusher, fake: FakeXero) -> None:
    invoices = [invoice_for(f"client{n:02d}", number=n) for n in range(1, 26)]
    outcomes = pusher.push(invoices, adapter=pusher.adapter(concurrency=1))
    assert all(o.state is DeliveryState.DELIVERED for o in outcomes)
    stats = fake.rate_limit_stats()
    assert stats["rejected"] == 0 and stats["admitted"] == 75
    [tenant] = stats["tenants"].values()
    [minute] = [w for w in tenant["windows"] if w["name"] == "minute"]
    assert 50 <= minute["max_in_window"] <= 60


# --------------------------------------------------------------------------------------------
# Bad input fails one delivery, with Xero's reason; the others go on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "currency", "reason"),
    [
        (TAX_FREE, "EUR", "Organisation is not subscribed to currency EUR"),
        (
            XeroClientSettings(account_code="999", tax_type="NONE"),
            "USD",
            "Account code '999' is not a valid code for this document.",
        ),
        (
            XeroClientSettings(tax_type="BOGUS"),
            "USD",
            "The TaxType code 'BOGUS' does not exist or cannot be used for this type of "
            "transaction.",
        ),
    ],
)
def test_what_xero_refuses_fails_that_delivery_with_its_reason(
    pusher: Pusher, fake: FakeXero, client: XeroClientSettings, currency: str, reason: str
) -> None:
    bad = invoice_for("acme", currency=currency)
    good = invoice_for("beta", number=2)
    [failed] = pusher.push([bad], client)
    [delivered] = pusher.push([good])
    assert delivered.state is DeliveryState.DELIVERED, delivered.error
    assert failed.state is DeliveryState.FAILED
    assert failed.error is not None
    assert failed.error.startswith(f"invoice: Xero refused invoice {bad.number}: {reason}")
    correlation = api_requests(fake, "PUT", "/Invoices")[0].request_id
    assert f"request {correlation}" in failed.error
    assert held(fake, bad.number) == []
    # Nothing half-created is unrecorded: the contact made on the way is in the ledger.
    contact_id = failed.refs["contact_id"]
    assert [c["ContactID"] for c in fake.contacts() if c["ContactNumber"] == "acme"] == [contact_id]
    refs = pusher.ledger().client_refs("xero", DEFAULT_TENANT, "acme")
    assert refs == {"contact_id": contact_id}


def test_a_fixed_cause_is_redriven_without_a_duplicate(pusher: Pusher, fake: FakeXero) -> None:
    invoice = invoice_for(currency="EUR")
    [failed] = pusher.push([invoice])
    assert failed.state is DeliveryState.FAILED
    fake.configure(currencies=["EUR"])
    [again] = pusher.push([invoice], redrive=True)
    assert again.state is DeliveryState.DELIVERED, again.error
    assert len(held(fake, invoice.number)) == 1
    assert len(api_requests(fake, "PUT", "/Contacts")) == 1  # the contact was recorded


def test_a_name_over_xeros_limit_fails_before_any_call(pusher: Pusher, fake: FakeXero) -> None:
    long = invoice_for("acme", name="A" * 256)
    [failed, delivered] = pusher.push([long, invoice_for("beta", number=2)])
    assert failed.state is DeliveryState.FAILED
    assert failed.error == (
        "validate: client name is 256 characters long; Xero takes at most 255 for a contact "
        "(or set contact_id in [clients.xero])"
    )
    assert delivered.state is DeliveryState.DELIVERED
    assert not [r for r in api_requests(fake) if "acme" in r.query]


# --------------------------------------------------------------------------------------------
# Amounts: Xero's totals equal ours to the minor unit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "fees", "cap"),
    [
        ("USD", ["2209.00", "2209.00", "-1418.00"], "3000.00"),  # a fee-cap adjustment line
        ("USD", ["0.10", "0.20", "1234567.89"], None),
        ("JPY", ["2209", "12345"], None),
        ("KWD", ["220.900", "1.010"], None),
    ],
)
def test_xeros_totals_equal_the_invoices(
    pusher: Pusher, fake: FakeXero, currency: str, fees: list[str], cap: str | None
) -> None:
    fake.configure(currencies=["JPY", "KWD"])
    campaigns = fees[:2] if cap else fees
    invoice = invoice_for(currency=currency, fees=campaigns, fee_cap=cap)
    assert [line.fee for line in invoice.lines] == [Decimal(f) for f in fees]
    [outcome] = pusher.push([invoice])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    [created] = held(fake, invoice.number)
    assert Decimal(str(created["SubTotal"])) == invoice.total_fee
    assert Decimal(str(created["Total"])) == invoice.total_fee
    assert [Decimal(str(line["LineAmount"])) for line in created["LineItems"]] == [
        Decimal(f) for f in fees
    ]
    [put] = api_requests(fake, "PUT", "/Invoices")
    for fee in fees:
        text = str(Decimal(fee).quantize(Decimal("0.01")) if currency == "KWD" else fee)
        assert f'"UnitAmount": {text},' in put.body


def test_a_third_decimal_xero_would_round_is_refused_before_any_call(
    pusher: Pusher, fake: FakeXero
) -> None:
    fake.configure(currencies=["KWD"])
    [outcome] = pusher.push([invoice_for(currency="KWD", fees=["12.345"])])
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None and "2 decimal places" in outcome.error
    assert api_requests(fake) == []


def test_tax_exclusive_lines_keep_our_subtotal(pusher: Pusher, fake: FakeXero) -> None:
    invoice = invoice_for(fees=["1000.00"])
    [outcome] = pusher.push([invoice], XeroClientSettings(tax_type="OUTPUT"))
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    [created] = held(fake, invoice.number)
    assert Decimal(str(created["SubTotal"])) == Decimal("1000.00")
    assert Decimal(str(created["TotalTax"])) == Decimal("88.75")


# --------------------------------------------------------------------------------------------
# Contacts and look-ups
# --------------------------------------------------------------------------------------------


def test_the_contact_is_referenced_by_id_and_reused_next_period(
    pusher: Pusher, fake: FakeXero
) -> None:
    january = invoice_for(number=1)
    february = invoice_for(number=2, period="2026-02")
    [first] = pusher.push([january])
    [second] = pusher.push([february])
    assert first.state is second.state is DeliveryState.DELIVERED
    assert first.refs["contact_id"] == second.refs["contact_id"]
    assert len(api_requests(fake, "GET", "/Contacts")) == 1  # the ledger remembered it
    assert fake.state()["objects_created"] == {"contact": 1, "invoice": 2}
    for put in api_requests(fake, "PUT", "/Invoices"):
        [sent] = json.loads(put.body)["Invoices"]
        assert sent["Contact"] == {"ContactID": first.refs["contact_id"]}


def test_an_existing_contact_with_our_contact_number_is_used(
    pusher: Pusher, fake: FakeXero
) -> None:
    existing = fake.add_contact("ACME Corporation", "acme")
    [outcome] = pusher.push([invoice_for()])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["contact_id"] == existing["ContactID"]
    assert api_requests(fake, "PUT", "/Contacts") == []
    # The contact pre-existed, so the invoice was looked up before it was created.
    assert [r.method + " " + r.path for r in api_requests(fake)] == [
        f"GET {PREFIX}/Contacts",
        f"GET {PREFIX}/Invoices",
        f"PUT {PREFIX}/Invoices",
    ]


def test_a_contact_name_taken_by_another_contact_fails_with_a_way_out(
    pusher: Pusher, fake: FakeXero
) -> None:
    other = fake.add_contact("Acme Corp")
    invoice = invoice_for()
    [failed] = pusher.push([invoice])
    assert failed.state is DeliveryState.FAILED
    assert failed.error is not None
    assert "The contact name Acme Corp is already assigned to another contact" in failed.error
    assert "set contact_id in [clients.xero]" in failed.error
    client = XeroClientSettings(tax_type="NONE", contact_id=other["ContactID"])
    [delivered] = pusher.push([invoice], client, redrive=True)
    assert delivered.state is DeliveryState.DELIVERED, delivered.error
    assert held(fake, invoice.number)[0]["Contact"]["ContactID"] == other["ContactID"]


def test_two_contacts_with_our_contact_number_are_not_guessed_between(
    pusher: Pusher, fake: FakeXero
) -> None:
    for name in ("Acme One", "Acme Two"):
        fake.add_contact(name, "acme")
    [failed] = pusher.push([invoice_for()])
    assert failed.state is DeliveryState.FAILED
    assert failed.error is not None and "2 active Xero contacts carry ContactNumber" in failed.error
    assert fake.invoices() == []


def test_a_lost_ledger_finds_contact_and_invoice_instead_of_creating_them(
    pusher: Pusher, fake: FakeXero
) -> None:
    invoice = invoice_for()
    [first] = pusher.push([invoice], ledger="a")
    fake.expire_keys()
    [second] = pusher.push([invoice], ledger="b")
    assert second.state is DeliveryState.DELIVERED, second.error
    assert second.refs["invoice_id"] == first.refs["invoice_id"]
    assert second.refs["contact_id"] == first.refs["contact_id"]
    assert fake.state()["objects_created"] == {"contact": 1, "invoice": 1}


def test_a_voided_invoice_with_our_number_is_never_created_again(
    pusher: Pusher, fake: FakeXero
) -> None:
    invoice = invoice_for()
    [first] = pusher.push([invoice], ledger="a")
    with fake.app.lock:
        fake.app.organisation().invoices[first.refs["invoice_id"]]["Status"] = "VOIDED"
    fake.expire_keys()
    [second] = pusher.push([invoice], ledger="b")
    assert second.state is DeliveryState.FAILED
    assert second.error is not None
    assert f"Xero holds invoice {invoice.number} (InvoiceID {first.refs['invoice_id']}) as " in (
        second.error
    )
    assert "VOIDED" in second.error and "issue a new revision" in second.error
    assert len(held(fake, invoice.number)) == 1


def test_a_revision_gets_its_own_number(pusher: Pusher, fake: FakeXero) -> None:
    invoice = invoice_for()
    revised = invoice.model_copy(update={"revision": 1})
    pusher.push([invoice], ledger="a")
    [outcome] = pusher.push([revised], ledger="b")
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert sorted(i["InvoiceNumber"] for i in fake.invoices()) == [
        invoice.number,
        f"{invoice.number}-R1",
    ]


def test_someone_elses_invoice_with_our_number_is_not_adopted(
    pusher: Pusher, fake: FakeXero
) -> None:
    ours = invoice_for(fees=["2209.00"])
    pusher.push([invoice_for(fees=["1.00"])], ledger="a")  # another run made it, other amount
    fake.expire_keys()
    [outcome] = pusher.push([ours], ledger="b")
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    assert "with SubTotal 1.00 USD, not 2209.00 USD" in outcome.error
    assert "not ours to adopt" in outcome.error
