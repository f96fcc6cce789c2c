"""Faults, sessions, bad input and replays through the real Hub, ZuoraAdapter and zeep.

Every test pushes through :class:`~kiki_billing.hub.dispatcher.Hub` with a real adapter (zeep
over HTTP) against the SOAP fake on 127.0.0.1, and checks from the fake's own books what exists
upstream: one subscription and one invoice per delivery, with the right total, whatever failed
on the way. The hub's retry waits are recorded, never slept.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from kiki_billing_adapters.files import JsonFileAdapter, JsonSettings
from kiki_billing_adapters.zuora import ZuoraAdapter

from kiki_billing.hub.ledger import DeliveryState
from kiki_billing.hub.plan import Delivery
from kiki_billing.plugin import NoClientSettings
from tests.adapters.zuora.conftest import MakeAdapter, Pusher, client_settings, invoice
from tests.support.fake_zuora import (
    BUNDLE_CHARGE,
    BUNDLE_RATE_PLAN,
    TAXED_CHARGE,
    TAXED_RATE_PLAN,
    USD_ONLY_CHARGE,
    USD_ONLY_RATE_PLAN,
    FakeZuora,
)

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])


def calls(fake: FakeZuora, operation: str) -> list[Any]:
    """The requests of one SOAP operation the fake received, in order."""
    return [r for r in fake.requests if f":{operation} " in r.body or f":{operation}>" in r.body]


def books(fake: FakeZuora) -> dict[str, Any]:
    """Accounts, subscriptions and invoices upstream, and each invoice's total."""
    state = fake.state()
    return {
        "accounts": len(state["accounts"]),
        "contacts": len(state["contacts"]),
        "subscriptions": [s["Name"] for s in state["subscriptions"]],
        "invoices": [Decimal(i["Amount"]) for i in state["invoices"]],
    }


def assert_billed_once(fake: FakeZuora, *totals: Decimal) -> None:
    found = books(fake)
    assert len(found["subscriptions"]) == len(set(found["subscriptions"])) == len(totals)
    assert sorted(found["invoices"]) == sorted(totals)


# --------------------------------------------------------------------------------------------
# A plain push, and the next period
# --------------------------------------------------------------------------------------------


def test_push_creates_account_contact_and_a_subscription_with_its_invoice(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    inv = invoice(lines=3)
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    refs = outcome.refs
    state = fake.state()
    [account] = state["accounts"]
    assert account["AccountNumber"] == inv.client_id == refs["account_number"]
    assert account["Status"] == "Active" and account["Currency"] == "USD"
    assert account["BillToId"] == account["SoldToId"] == refs["bill_to_contact_id"]
    [subscription] = state["subscriptions"]
    assert subscription["Id"] == refs["subscription_id"]
    assert subscription["Name"] == refs["subscription_name"]
    assert subscription["Name"].startswith(inv.number + "-k1-")
    [zuora_invoice] = state["invoices"]
    assert zuora_invoice["Id"] == refs["invoice_id"]
    assert zuora_invoice["InvoiceNumber"] == refs["invoice_number"]
    assert Decimal(zuora_invoice["Amount"]) == inv.total_fee == Decimal(refs["invoice_amount"])
    assert refs["invoice_status"] == "Posted"
    assert [Decimal(i["ChargeAmount"]) for i in zuora_invoice["items"]] == [
        line.fee for line in inv.lines
    ]
    # login, account look-up, create account, create contact, activate, subscribe, verify
    assert [len(calls(fake, op)) for op in ("login", "query", "create", "update", "subscribe")] == [
        1,
        2,
        2,
        1,
        1,
    ]


def test_the_next_period_reuses_the_account_without_looking_it_up(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter = make_adapter()
    first, second = invoice(1, client="acme"), invoice(2, client="acme", period="2026-02")
    [one] = pusher.push(adapter, first)
    before = len(fake.requests)
    [two] = pusher.push(adapter, second)
    assert one.ok and two.ok, (one.error, two.error)
    assert two.refs["account_id"] == one.refs["account_id"]
    later = fake.requests[before:]
    # The account, its contact and status come from the ledger; the subscription is looked up
    # by its name first (this delivery did not make the account), then made and verified.
    assert len(later) == 3
    assert "from Subscription where Name" in later[0].body
    assert ":subscribe>" in later[1].body and "from Invoice where Id" in later[2].body
    assert_billed_once(fake, first.total_fee, second.total_fee)
    assert books(fake)["accounts"] == 1


def test_an_existing_active_account_is_found_and_billed(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    [made] = pusher.push(make_adapter(), invoice(1, client="acme"))
    later = invoice(2, client="acme")
    [outcome] = pusher.push(make_adapter(), later, ledger="another")
    assert outcome.ok, outcome.error
    assert outcome.refs["account_id"] == made.refs["account_id"]
    assert books(fake)["accounts"] == 1 and books(fake)["contacts"] == 1


# --------------------------------------------------------------------------------------------
# Transient faults, throttling, lost answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["LOCK_COMPETITION", "TEMPORARY_ERROR", "SERVER_UNAVAILABLE", "TRANSACTION_TIMEOUT"]
)
def test_a_transient_fault_is_retried_and_bills_once(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher, code: str
) -> None:
    fake.inject_soap_fault("subscribe", code, times=2)
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.ok, outcome.error
    assert len(calls(fake, "subscribe")) == 3
    assert_billed_once(fake, inv.total_fee)


def test_a_503_page_and_a_dropped_connection_are_retried(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_http_error("create", 503)
    fake.inject(fake.app.fault_type(kind="drop", operation="update"))
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.ok, outcome.error
    assert_billed_once(fake, inv.total_fee)
    assert books(fake)["accounts"] == 1


def test_a_429_waits_retry_after_and_slows_the_tenant(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_soap_fault(
        "subscribe", "REQUEST_EXCEEDED_LIMIT", status=429, headers={"Retry-After": "3"}
    )
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.ok, outcome.error
    assert 3.0 in pusher.waits
    assert_billed_once(fake, inv.total_fee)


def test_the_fakes_concurrency_cap_answers_429_and_the_hub_recovers(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.configure(
        latency=0.02, rate_limits={"windows": [[50_000, 60.0, "minute"]], "concurrency": 2}
    )
    invoices = [invoice(n) for n in range(1, 7)]
    outcomes = pusher.push(make_adapter(concurrency=6), *invoices, attempts=12)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    # Each refusal lowers the hub's cap below the requests in flight: a few, then none.
    stats = fake.rate_limit_stats()
    assert 0 < stats["rejected"] <= 8, stats
    assert_billed_once(fake, *(inv.total_fee for inv in invoices))


def test_within_the_published_limit_the_fake_never_throttles(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.configure(latency=0.01)
    invoices = [invoice(n) for n in range(1, 31)]
    outcomes = pusher.push(make_adapter(), *invoices)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    stats = fake.rate_limit_stats()
    assert stats["rejected"] == 0 and 1 < stats["max_in_flight"] <= 20
    assert_billed_once(fake, *(inv.total_fee for inv in invoices))


def test_a_lost_subscribe_answer_is_resolved_by_duplicate_value_and_query(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_lost("subscribe")
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.ok, outcome.error
    subscribes = calls(fake, "subscribe")
    assert len(subscribes) == 2 and subscribes[0].body == subscribes[1].body
    assert subscribes[1].status == 200  # DUPLICATE_VALUE inside a SubscribeResult
    assert_billed_once(fake, inv.total_fee)
    state = fake.state()
    assert outcome.refs["subscription_id"] == state["subscriptions"][0]["Id"]
    assert outcome.refs["invoice_id"] == state["invoices"][0]["Id"]


def test_a_lost_account_answer_is_resolved_by_the_unique_account_number(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_lost("create")
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv)
    assert outcome.ok, outcome.error
    assert books(fake)["accounts"] == 1
    assert_billed_once(fake, inv.total_fee)


def test_retries_spent_then_a_new_run_looks_the_subscription_up(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_lost("subscribe")
    inv = invoice()
    [first] = pusher.push(make_adapter(), inv, attempts=1)
    assert first.state is DeliveryState.DEFERRED
    before = len(calls(fake, "subscribe"))
    [second] = pusher.push(make_adapter(), inv)
    assert second.ok, second.error
    assert len(calls(fake, "subscribe")) == before  # found by query(), not sent again
    assert_billed_once(fake, inv.total_fee)


def test_a_subscription_found_without_its_invoice_fails_verify_and_is_never_sent_again(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.inject_lost("subscribe")
    inv = invoice()
    [first] = pusher.push(make_adapter(), inv, attempts=1)
    assert first.state is DeliveryState.DEFERRED
    with fake.app.lock:  # someone deletes the invoice in Zuora meanwhile
        fake.app.tenant.invoices.clear()
        fake.app.tenant.invoice_items.clear()
    for redrive in (False, True):
        [outcome] = pusher.push(make_adapter(), inv, redrive=redrive)
        assert outcome.state is DeliveryState.FAILED
        assert outcome.error is not None and outcome.error.startswith(
            f"verify: Zuora subscription {outcome.refs['subscription_name']} "
            f"({outcome.refs['subscription_id']}) has no single invoice of its own"
        )
    assert len(calls(fake, "subscribe")) == 1
    assert len(books(fake)["subscriptions"]) == 1


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


def test_an_expired_session_logs_in_once_again(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter = make_adapter()
    [one] = pusher.push(adapter, invoice(1))
    fake.advance_clock(fake.app.session_lifetime)  # Zuora ends the session before we expect
    [two] = pusher.push(adapter, invoice(2))
    assert one.ok and two.ok, (one.error, two.error)
    assert adapter.logins == 2
    # One INVALID_SESSION fault, then a login and the same call again.
    assert [r.status for r in fake.requests].count(500) == 1


def test_the_session_is_renewed_before_its_lifetime_runs_out(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    now = [0.0]
    adapter = make_adapter(session_lifetime=600, clock=lambda: now[0])
    [one] = pusher.push(adapter, invoice(1))
    now[0] = 600 - 59  # within the last minute of the session
    [two] = pusher.push(adapter, invoice(2))
    assert one.ok and two.ok
    assert adapter.logins == 2
    assert all(r.status == 200 for r in fake.requests)


def test_invalid_session_twice_in_a_row_fails_the_delivery(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.configure(session_lifetime=0.0)  # every session is dead on arrival
    [outcome] = pusher.push(make_adapter(), invoice())
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    assert "Invalid Session" in outcome.error and "refused again" in outcome.error
    assert len(calls(fake, "login")) == 2


def test_wrong_credentials_fail_with_zuoras_reason_and_other_targets_go_on(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher, tmp_path: Any
) -> None:
    adapter = make_adapter(password="wrong-password")
    files = JsonFileAdapter(JsonSettings(dir=tmp_path / "json"))
    hub = pusher.hub({"zuora": adapter, "json": files})
    invoices = [invoice(1), invoice(2)]
    outcomes = hub.push(
        [Delivery(inv, "zuora", client_settings(), adapter.account) for inv in invoices]
        + [Delivery(invoices[0], "json", NoClientSettings(), files.account)]
    )
    by_target = {(o.target, o.invoice_number): o for o in outcomes}
    for inv in invoices:
        failed = by_target["zuora", inv.number]
        assert failed.state is DeliveryState.FAILED
        assert failed.error is not None
        assert "Invalid login. User name and password do not match." in failed.error
        assert "wrong-password" not in failed.error
    errors = sorted(str(by_target["zuora", inv.number].error) for inv in invoices)
    assert ["not tried again in this run" in e for e in errors].count(True) == 1
    assert by_target["json", invoices[0].number].ok
    # One login attempt for the whole run: Zuora locks users after repeated failures.
    assert sum(fake.app.failed_logins.values()) == 1
    assert books(fake)["accounts"] == 0


# --------------------------------------------------------------------------------------------
# Bad configuration upstream: Zuora's reason, nothing half-made unrecorded
# --------------------------------------------------------------------------------------------


def test_an_unknown_rate_plan_charge_fails_with_zuoras_reason_then_retry_bills_once(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter = make_adapter()
    inv = invoice()
    bad = client_settings(product_rate_plan_charge_id="2c92c0f8000000000000000000000bad")
    [failed] = pusher.push(adapter, inv, client=bad)
    assert failed.state is DeliveryState.FAILED
    assert failed.error is not None and failed.error.startswith(
        "subscribe: Zuora subscribe: The product rate plan charge 2c92c0f8000000000000000000000bad "
        "is not a charge of the product rate plan"
    )
    assert "code INVALID_VALUE" in failed.error
    # What was made is recorded: the account, its contact, its activation.
    ledger = pusher.ledger()
    [record] = ledger.deliveries()
    steps = ledger.steps(record.id)
    assert {n for n, s in steps.items() if s.state is DeliveryState.DELIVERED} == {
        "account",
        "contact",
        "activate",
    }
    assert books(fake)["subscriptions"] == [] and books(fake)["accounts"] == 1
    [fixed] = pusher.push(adapter, inv, redrive=True)
    assert fixed.ok, fixed.error
    assert fixed.refs["account_id"] == failed.refs["account_id"]
    assert_billed_once(fake, inv.total_fee)
    assert books(fake)["accounts"] == 1


def test_an_account_in_another_currency_is_refused_before_anything_is_made(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    adapter = make_adapter()
    [eur] = pusher.push(adapter, invoice(1, currency="EUR", client="acme"))
    assert eur.ok, eur.error
    usd = invoice(2, currency="USD", client="acme")
    [outcome] = pusher.push(adapter, usd, ledger="fresh")
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error == (
        f"account: Zuora account {eur.refs['account_id']} bills in EUR, but invoice {usd.number} "
        "is in USD; bill this client from an account in USD (account_number in "
        "[clients.zuora]) (code currency_mismatch)"
    )
    assert len(books(fake)["subscriptions"]) == 1


def test_a_charge_not_priced_in_the_accounts_currency_fails_with_zuoras_reason(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    only_usd = client_settings(
        product_rate_plan_id=USD_ONLY_RATE_PLAN, product_rate_plan_charge_id=USD_ONLY_CHARGE
    )
    [outcome] = pusher.push(make_adapter(), invoice(currency="EUR"), client=only_usd)
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    assert "has no price in EUR, the account's currency" in outcome.error
    assert books(fake)["subscriptions"] == [] and books(fake)["invoices"] == []


@pytest.mark.parametrize(
    ("plan", "charge", "zuora_total"),
    [
        (
            TAXED_RATE_PLAN,
            TAXED_CHARGE,
            lambda total: total + (total / 10).quantize(Decimal("0.01")),
        ),
        (BUNDLE_RATE_PLAN, BUNDLE_CHARGE, lambda total: total + 50),
    ],
    ids=["tax", "another-charge-in-the-rate-plan"],
)
def test_a_zuora_invoice_that_does_not_total_ours_is_a_terminal_error(
    fake: FakeZuora,
    make_adapter: MakeAdapter,
    pusher: Pusher,
    plan: str,
    charge: str,
    zuora_total: Callable[[Decimal], Decimal],
) -> None:
    settings = client_settings(product_rate_plan_id=plan, product_rate_plan_charge_id=charge)
    adapter = make_adapter()
    inv = invoice()
    [outcome] = pusher.push(adapter, inv, client=settings)
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    [billed] = books(fake)["invoices"]
    assert billed == zuora_total(inv.total_fee) != inv.total_fee
    assert outcome.error.startswith(
        f"verify: Zuora invoice {outcome.refs['invoice_number']} totals {billed} USD, but invoice "
        f"{inv.number} totals {inv.total_fee} USD"
    )
    # Re-driven after the operator looked at it: only the check runs again, nothing is re-sent.
    before = len(calls(fake, "subscribe"))
    [again] = pusher.push(adapter, inv, client=settings, redrive=True)
    assert again.state is DeliveryState.FAILED
    assert len(calls(fake, "subscribe")) == before
    assert len(books(fake)["subscriptions"]) == 1


def test_process_payments_collects_the_invoice(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    inv = invoice()
    [outcome] = pusher.push(make_adapter(), inv, client=client_settings(process_payments=True))
    assert outcome.ok, outcome.error
    [payment] = fake.state()["payments"]
    assert payment["Id"] == outcome.refs["payment_id"]
    assert Decimal(payment["Amount"]) == inv.total_fee
    assert Decimal(fake.state()["invoices"][0]["Balance"]) == 0


def test_a_declined_payment_makes_nothing_in_one_transaction(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher
) -> None:
    fake.configure(decline_payments=True)
    [outcome] = pusher.push(
        make_adapter(), invoice(), client=client_settings(process_payments=True)
    )
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None and "Your card was declined." in outcome.error
    assert "code TRANSACTION_FAILED" in outcome.error
    assert books(fake)["subscriptions"] == [] and books(fake)["invoices"] == []


def test_the_login_follows_server_url_only_for_a_remote_https_endpoint(
    make_adapter: MakeAdapter,
) -> None:
    local = make_adapter()
    assert local._address("https://services470.zuora.com/apps/services/a/78.0") == local.endpoint
    remote = ZuoraAdapter(
        local.settings.model_copy(update={"api_base": "https://www.zuora.com/apps/services/a/78.0"})
    )
    assert (
        remote._address("https://services470.zuora.com/apps/services/a/78.0")
        == "https://services470.zuora.com/apps/services/a/78.0"
    )
    assert remote._address("http://services470.zuora.com/x") == remote.endpoint
    assert remote._address(None) == remote.endpoint
