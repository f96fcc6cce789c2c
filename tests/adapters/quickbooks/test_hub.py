"""The QuickBooks adapter through the real hub against the local fake: steps, look-ups, bad input.

Each bad input fails its own delivery with QuickBooks' reason (or ours, before any call), leaves
nothing created that the ledger does not know, and lets the other deliveries go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.quickbooks import QuickBooksAdapter, QuickBooksClientSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.revisions import as_revision
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from tests.adapters.quickbooks.conftest import settings_for
from tests.adapters.stripe.test_cassettes import acme, ecommerce, saas, techstartup
from tests.support.fake_quickbooks import REALM, FakeQuickBooks

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

CLIENT = QuickBooksClientSettings()
API = f"/v3/company/{REALM}"
Made = Callable[..., QuickBooksAdapter]


class Pusher:
    """Pushes through one ledger (or a new one), recording the hub's waits."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.waits: list[float] = []
        self.ledgers = 0
        self.ledger = self.new_ledger()

    def new_ledger(self) -> Ledger:
        self.ledgers += 1
        self.ledger = Ledger(f"sqlite:///{self.tmp_path / f'ledger{self.ledgers}.sqlite3'}")
        return self.ledger

    def __call__(
        self,
        adapter: QuickBooksAdapter,
        invoices: Sequence[Invoice],
        client: QuickBooksClientSettings = CLIENT,
        *,
        pace: Callable[[float], None] | None = None,
    ) -> list[DeliveryOutcome]:
        hub = Hub(
            self.ledger,
            {"quickbooks": adapter},
            RetryPolicy(max_attempts=4, initial_wait=0.0, max_wait=0.0),
            sleep=self.waits.append,
            pace=pace or self.waits.append,
        )
        return hub.push([Delivery(i, "quickbooks", client, adapter.account) for i in invoices])


@pytest.fixture
def push(tmp_path: Path) -> Pusher:
    return Pusher(tmp_path)


def writes(fake: FakeQuickBooks, tail: str = "") -> list[str]:
    """Paths of the creates and sends the fake received (queries and reads left out)."""
    return [
        r.path.removeprefix(API)
        for r in fake.requests
        if r.method == "POST" and r.path.startswith(API + tail) and not r.path.endswith("/query")
    ]


def state(fake: FakeQuickBooks, kind: str) -> list[dict[str, Any]]:
    return list(fake.state()[kind])


# ------------------------------------------------------------------------------------------
# The steps and their look-ups
# ------------------------------------------------------------------------------------------


def test_one_item_per_realm_one_customer_per_client(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter = make_adapter()
    outcomes = push(adapter, [acme(), techstartup(), ecommerce(), saas()])
    assert [o.state for o in outcomes] == [DeliveryState.DELIVERED] * 4, outcomes
    # Delivered in parallel: the deliveries that lost the race for the item got a 6240 and
    # found the winner's, so the realm has one.
    assert [i["Name"] for i in state(fake, "items")] == ["Profit share"]
    assert {o.refs["item_id"] for o in outcomes} == {state(fake, "items")[0]["Id"]}
    assert sorted(c["DisplayName"] for c in state(fake, "customers")) == [
        "Acme Corp",
        "E-commerce Co",
        "SaaS Platform",
        "TechStartup Inc",
    ]
    invoices = {i["DocNumber"]: i for i in state(fake, "invoices")}
    assert Decimal(str(invoices["OaaS-202601-206181"]["TotalAmt"])) == Decimal("3000.00")
    assert invoices["OaaS-202601-206181"]["PrivateNote"].startswith(
        "kiki-billing invoice KIKI-OaaS-202601-206181 revision 0"
    )

    # The next period: the client's customer and the item come from the ledger.
    before = len(fake.requests)
    later = acme().model_copy(update={"number": "KIKI-OaaS-202602-206181", "period": "2026-02"})
    [outcome] = push(adapter, [later])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["customer_id"] == outcomes[0].refs["customer_id"]
    sent = [(r.method, r.path.removeprefix(API), r.body) for r in fake.requests[before:]]
    assert sent[0][:2] == ("POST", "/query") and "from Invoice" in sent[0][2]
    assert [s[:2] for s in sent[1:]] == [("POST", "/invoice")]


def test_a_lost_ledger_and_expired_ids_create_nothing_twice(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    client = QuickBooksClientSettings(send=True)
    [first] = push(make_adapter(), [acme()], client)
    assert first.state is DeliveryState.DELIVERED, first.error
    assert first.refs["invoice_email_status"] == "EmailSent"
    fake.app.idempotency.clear()
    push.new_ledger()
    [second] = push(make_adapter(), [acme()], client)  # a new process: nothing in memory
    assert second.state is DeliveryState.DELIVERED, second.error
    assert writes(fake) == [
        "/item",
        "/customer",
        "/invoice",
        f"/invoice/{first.refs['invoice_id']}/send",
    ]
    assert len(state(fake, "emails")) == 1
    for name in ("item_id", "customer_id", "invoice_id"):
        assert first.refs[name] == second.refs[name]


def test_a_customer_made_meanwhile_is_found_after_its_6240(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter()
    real = adapter._lookup_customer
    calls: list[int] = []

    def racing_lookup(ctx: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # someone creates the customer right after our look-up
            other = make_adapter()
            other._call(
                lambda qb: qb.create_object(
                    "Customer", '{"DisplayName": "Acme Corp", "CurrencyRef": {"value": "USD"}}'
                )
            )
            return None
        return real(ctx)

    monkeypatch.setattr(adapter, "_lookup_customer", racing_lookup)
    [outcome] = push(adapter, [acme()])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert len(state(fake, "customers")) == 1
    assert outcome.refs["customer_id"] == state(fake, "customers")[0]["Id"]
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------
# Bad input: that delivery fails, the others go on
# ------------------------------------------------------------------------------------------


def test_a_name_held_by_a_vendor_fails_that_delivery_with_intuits_reason(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    fake.app.add_vendor("Acme Corp")
    failed, other = push(make_adapter(), [acme(), techstartup()])
    assert other.state is DeliveryState.DELIVERED, other.error
    assert failed.state is DeliveryState.FAILED
    assert failed.error is not None and failed.error.startswith(
        "customer: Duplicate Name Exists Error: The name supplied already exists. : Another "
        "vendor is already using this name. Please use a different name. (HTTP 400, code 6240, "
        "request 1-"
    )
    # What was created is recorded: the item, in both deliveries' refs and the ledger.
    assert failed.refs["item_id"] == state(fake, "items")[0]["Id"]
    assert [c["DisplayName"] for c in state(fake, "customers")] == ["TechStartup Inc"]
    assert len(state(fake, "invoices")) == 1


def test_a_customer_billing_in_another_currency_fails_before_the_invoice(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    make_adapter()._call(
        lambda qb: qb.create_object(
            "Customer", '{"DisplayName": "Acme Corp", "CurrencyRef": {"value": "EUR"}}'
        )
    )
    failed, other = push(make_adapter(), [acme(), saas()])
    assert other.state is DeliveryState.DELIVERED
    assert failed.state is DeliveryState.FAILED and failed.error is not None
    assert "bills in EUR, and a customer's currency is fixed" in failed.error
    assert failed.error.startswith("customer: ")
    assert [i["DocNumber"] for i in state(fake, "invoices")] == ["OaaS-202601-170223"]


def test_a_remembered_customer_in_another_currency_is_refused_before_the_call(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter = make_adapter()
    [first] = push(adapter, [acme()])
    assert first.state is DeliveryState.DELIVERED
    euro = acme().model_copy(
        update={"number": "KIKI-OaaS-202602-206181", "period": "2026-02", "currency": "EUR"}
    )
    before = len(writes(fake))
    [failed] = push(adapter, [euro])
    assert failed.state is DeliveryState.FAILED and failed.error is not None
    assert failed.error.startswith("invoice: QuickBooks customer ")
    assert "bills in USD" in failed.error
    assert len(writes(fake)) == before


def test_a_configured_customer_in_another_currency_fails_with_quickbooks_reason(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    result = make_adapter()._call(
        lambda qb: qb.create_object(
            "Customer", '{"DisplayName": "Euro Acme", "CurrencyRef": {"value": "EUR"}}'
        )
    )
    client = QuickBooksClientSettings(customer=result["Customer"]["Id"])
    [failed] = push(make_adapter(), [acme()], client)
    assert failed.state is DeliveryState.FAILED and failed.error is not None
    assert failed.error.startswith(
        "invoice: A business validation error has occurred while processing your request: "
        "Business Validation Error: The transaction currency (USD) must match the customer's "
        "currency (EUR). (HTTP 400, code 6000, request 1-"
    )
    assert state(fake, "invoices") == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("Consulting Income", "names no active QuickBooks account ('Consulting Income'"),
        ("Checking", "of type 'Bank'; the service item needs an Income account"),
    ],
)
def test_an_unknown_income_account_fails_before_anything_is_created(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher, setting: str, expected: str
) -> None:
    failed, also = push(make_adapter(income_account=setting), [acme(), saas()])
    assert failed.state is also.state is DeliveryState.FAILED
    assert failed.error is not None and failed.error.startswith("income-account: ")
    assert expected in failed.error
    assert writes(fake) == []


def test_the_income_account_by_id_name_or_digits_in_a_name(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    company = fake.app.companies[REALM]
    company.accounts["200"] = {**company.accounts["79"], "Id": "200", "Name": "4000"}
    for setting, expected in (("79", "79"), ("Other Income", "85"), ("4000", "200")):
        adapter = make_adapter(income_account=setting)
        [outcome] = push(adapter, [acme()], QuickBooksClientSettings(item=f"Fees {setting}"))
        assert outcome.state is DeliveryState.DELIVERED, outcome.error
        assert outcome.refs["income_account_id"] == expected
        item = next(i for i in state(fake, "items") if i["Name"] == f"Fees {setting}")
        assert item["IncomeAccountRef"]["value"] == expected
        push.new_ledger()
        fake.app.idempotency.clear()


def test_a_name_over_quickbooks_limit_is_refused_before_any_call(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    long_name = techstartup().model_copy(update={"client_name": "T" * 501})
    failed, other = push(make_adapter(), [long_name, saas()])
    assert failed.state is DeliveryState.FAILED and other.state is DeliveryState.DELIVERED
    assert failed.error == (
        "validate: client name of 501 characters: QuickBooks' DisplayName takes at most 500 "
        "(set [clients.quickbooks] customer to an existing customer's Id instead)"
    )
    assert [c["DisplayName"] for c in state(fake, "customers")] == ["SaaS Platform"]


def test_an_invoice_number_held_by_someone_else_is_not_adopted(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter = make_adapter()
    [first] = push(adapter, [saas()])
    fake.app.companies[REALM].invoices[first.refs["invoice_id"]]["PrivateNote"] = "typed by hand"
    push.new_ledger()
    [again] = push(adapter, [saas()])
    assert again.state is DeliveryState.FAILED and again.error is not None
    assert "QuickBooks already holds an invoice with DocNumber OaaS-202601-170223" in again.error
    assert len(state(fake, "invoices")) == 1


@pytest.mark.parametrize("duplicates_allowed", [True, False])
def test_a_revision_gets_its_own_doc_number_and_voids_the_one_it_replaces(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher, duplicates_allowed: bool
) -> None:
    fake.configure(duplicate_doc_numbers=duplicates_allowed)
    adapter = make_adapter()
    [first] = push(adapter, [saas()])
    revised = as_revision(saas(), 1)
    [second] = push(adapter, [revised])
    assert second.state is DeliveryState.DELIVERED, second.error
    assert second.refs["invoice_id"] != first.refs["invoice_id"]
    held = {i["DocNumber"]: i for i in state(fake, "invoices")}
    number = saas().number.removeprefix("KIKI-")
    assert set(held) == {number, f"{number}-R1"}
    assert held[number]["PrivateNote"].startswith("Voided")
    assert held[f"{number}-R1"]["PrivateNote"].split(",")[0].endswith("revision 1")


# ------------------------------------------------------------------------------------------
# Throttles, outages, tokens
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["json", "xml"])
def test_a_throttle_waits_60_s_then_succeeds(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher, body: str
) -> None:
    fake.inject_error("POST", f"{API}/invoice", status=429, body=body)
    [outcome] = push(make_adapter(), [saas()])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert 60.0 in push.waits
    invoice_posts = [r for r in fake.requests if r.path == f"{API}/invoice"]
    assert [r.status for r in invoice_posts] == [429, 200]
    assert invoice_posts[0].idempotency_key == invoice_posts[1].idempotency_key


def test_a_5xx_after_the_write_is_replayed_by_requestid(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    fake.inject_error("POST", f"{API}/invoice", status=503, after=True, body="html")
    [outcome] = push(make_adapter(), [saas()])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert len(state(fake, "invoices")) == 1
    assert [r.replayed for r in fake.requests if r.path == f"{API}/invoice"] == [False, True]


def test_a_401_refreshes_once_then_a_second_is_terminal(
    fake: FakeQuickBooks, make_adapter: Made, push: Pusher
) -> None:
    adapter = make_adapter()
    adapter.tokens.access_token()
    fake.app.access_tokens.clear()  # the access token is refused: refresh, retry, delivered
    [outcome] = push(adapter, [saas()])
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert fake.state()["token_grants"] == 2

    real = fake.app.authenticate

    def always_refused(request: Any) -> str:
        real(request)
        if request.path.startswith(API):
            fake.app.access_tokens.clear()
            return real(request)
        return "oauth"

    fake.app.authenticate = always_refused  # type: ignore[method-assign]
    [refused] = push(make_adapter(), [techstartup()])
    assert refused.state is DeliveryState.FAILED and refused.error is not None
    assert "refused again after a token refresh" in refused.error
    assert "code 3200" in refused.error


def test_the_hub_keeps_under_intuits_limits(make_adapter: Made, tmp_path: Path) -> None:
    with FakeQuickBooks(seed=5) as limited:  # 10/s, 500/min, 10 in flight
        adapter = QuickBooksAdapter(settings_for(limited, limited.app.issue_refresh_token()))
        push = Pusher(tmp_path)
        started = time.monotonic()
        outcomes = push(adapter, [acme(), techstartup(), saas()], pace=time.sleep)
        assert all(o.state is DeliveryState.DELIVERED for o in outcomes), outcomes
        stats = limited.rate_limit_stats()
        assert stats["rejected"] == 0, stats
        assert stats["windows"][0]["max_in_window"] <= 10
        assert stats["received"] >= 20 and time.monotonic() > started
