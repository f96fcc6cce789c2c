"""Retries, faults and crash recovery through the real Hub, StripeAdapter and stripe SDK.

Every test drives :class:`~kiki_billing.hub.dispatcher.Hub` with a real
:class:`~adapters.stripe.StripeAdapter` (stripe-python over HTTP) against the local Stripe fake on
127.0.0.1, injects one kind of fault, and checks four things: how many attempts the fake received
for the endpoint, that every attempt carried the same ``Idempotency-Key``, the waits the hub asked
for, and that Stripe's side holds exactly one invoice with the right lines, amounts and status.

Time is virtual: the hub's retry waits and the account's token bucket both advance one clock and
never sleep, so the waits are exact and the tests fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.stripe import StripeAdapter, StripeClientSettings, StripeSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import StepContext
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_stripe import FakeStripe, RecordedRequest

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

TEST_KEY = "sk_test_kiki_hub_faults_0123456789"
TEST_RATE = 25.0  # requests per second the adapter allows a test-mode key
LINE_AMOUNTS = [10010, 10020]  # sample_invoice(lines=2): fees 100.10 and 100.20 USD
SERVICE_UNAVAILABLE = "The server is temporarily unavailable (injected by the kiki fake)."

DRAFT = ("POST", "/v1/invoices")
ITEM = ("POST", "/v1/invoiceitems")
FINALIZE = ("POST", "/v1/invoices/{invoice}/finalize")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@dataclass
class VirtualTime:
    """One clock for the hub's retry waits and the account's token bucket; nothing sleeps."""

    now: float = 0.0
    waits: list[float] = field(default_factory=list)
    """What the retry loop asked for (the ``sleep`` injected into the Hub)."""
    throttle: list[float] = field(default_factory=list)
    """What the account's token bucket asked for (rate limit and Retry-After pauses)."""

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def bucket_sleep(self, seconds: float) -> None:
        self.throttle.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=11) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield ledger
    ledger.close()


@pytest.fixture
def clock() -> VirtualTime:
    """Virtual time; the hub's account limiters run on it too."""
    return VirtualTime()


MakeHub = Callable[..., Hub]


@pytest.fixture
def make_hub(fake: FakeStripe, ledger: Ledger, clock: VirtualTime) -> MakeHub:
    def make(
        policy: RetryPolicy | None = None, *, concurrency: int | None = None, **kwargs: Any
    ) -> Hub:
        settings = StripeSettings(api_key=TEST_KEY, api_base=fake.url, concurrency=concurrency)
        return Hub(
            ledger,
            {"stripe": StripeAdapter(settings)},
            policy or RetryPolicy(max_attempts=4, initial_wait=0.1, max_wait=1.0),
            sleep=clock.sleep,
            pace=clock.bucket_sleep,
            clock=clock.clock,
            **kwargs,
        )

    return make


def invoice(number: int = 1, lines: int = 2) -> Invoice:
    inv = sample_invoice(lines=lines)
    return inv.model_copy(
        update={"number": f"KIKI-OaaS-202601-{number:06d}", "client_id": f"client{number}"}
    ).sealed()


def deliveries(*invoices: Invoice, **client: Any) -> list[Delivery]:
    settings = StripeClientSettings(**client)
    account = StripeSettings(api_key=TEST_KEY).account_id
    return [
        Delivery(invoice=inv, target="stripe", client=settings, account=account) for inv in invoices
    ]


def key(inv: Invoice, step: str) -> str:
    return idempotency_key(inv.number, inv.revision, "stripe", step)


def sent(fake: FakeStripe, route: tuple[str, str], since: int = 0) -> list[RecordedRequest]:
    """The requests the fake received for ``(method, route template)``."""
    return [r for r in fake.requests[since:] if (r.method, r.route) == route]


def keys_of(requests: list[RecordedRequest]) -> list[str | None]:
    return [r.idempotency_key for r in requests]


def statuses(requests: list[RecordedRequest]) -> list[int | None]:
    return [r.status for r in requests]


def upstream(fake: FakeStripe, inv: Invoice) -> dict[str, Any]:
    """The one invoice Stripe holds for ``inv`` (fails on none or a duplicate)."""
    found = [
        i for i in fake.state()["invoices"] if i["metadata"]["kiki_invoice_number"] == inv.number
    ]
    assert len(found) == 1, f"{len(found)} Stripe invoices for {inv.number}"
    return found[0]


def assert_delivered_once(
    fake: FakeStripe, inv: Invoice, outcome: DeliveryOutcome, status: str = "open"
) -> dict[str, Any]:
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    remote = upstream(fake, inv)
    assert remote["id"] == outcome.refs["invoice_id"]
    assert [line["amount"] for line in remote["lines"]["data"]] == LINE_AMOUNTS
    assert [line["invoice_item"] for line in remote["lines"]["data"]] == [
        outcome.refs["invoice_item_1"],
        outcome.refs["invoice_item_2"],
    ]
    assert remote["total"] == remote["amount_due"] == sum(LINE_AMOUNTS) == 20030
    assert remote["currency"] == "usd"
    assert remote["status"] == outcome.refs["invoice_status"] == status
    items = [i for i in fake.state()["invoice_items"] if i["invoice"] == remote["id"]]
    assert len(items) == len(LINE_AMOUNTS)
    return remote


def backoff_bounds(policy: RetryPolicy, retry: int) -> tuple[float, float]:
    """tenacity's wait_exponential_jitter: initial * 2**(n-1) + U(0, initial), capped."""
    low = policy.initial_wait * 2 ** (retry - 1)
    return min(low, policy.max_wait), min(low + policy.initial_wait, policy.max_wait)


def assert_backoff(waits: list[float], policy: RetryPolicy, retries: int) -> None:
    assert len(waits) == retries, waits
    for n, wait in enumerate(waits, start=1):
        low, high = backoff_bounds(policy, n)
        assert low <= wait <= high, (n, wait)


def crash_ledger(ledger: Ledger, unknown_steps: tuple[str, ...]) -> None:
    """Leave the ledger as a killed process would: the delivery held by a dead owner, and the
    outcome of ``unknown_steps`` unknown (in flight, ids not recorded)."""
    placeholders = ", ".join("?" for _ in unknown_steps)
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE delivery_steps SET state='in_flight', refs='{}' "
            f"WHERE step IN ({placeholders})",
            unknown_steps,
        )
        conn.exec_driver_sql(
            "UPDATE deliveries SET state='in_flight', owner='dead-host:1:1', lease_until=0, "
            "refs='{}'"
        )


def expire_idempotency_keys(fake: FakeStripe) -> None:
    """Stripe forgets a key after 24 h; so does the fake, on its clock."""
    fake.advance_clock(24 * 3600)
    assert fake.state()["idempotency_keys"] == 0


class ProcessKilled(BaseException):
    """Stands for SIGKILL: nothing in the hub catches it."""


# --------------------------------------------------------------------------------------------
# Transient faults: retried with the same key
# --------------------------------------------------------------------------------------------


def test_503_on_draft_is_retried_with_the_same_key(make_hub, fake, clock) -> None:
    policy = RetryPolicy(max_attempts=4, initial_wait=0.1, max_wait=1.0)
    inv = invoice()
    # NOTE: the path is a prefix; the draft is the first POST under /v1/invoices.
    fake.inject_503("POST", "/v1/invoices")
    (outcome,) = make_hub(policy).push(deliveries(inv))

    assert_delivered_once(fake, inv, outcome)
    drafts = sent(fake, DRAFT)
    assert statuses(drafts) == [503, 200]
    assert keys_of(drafts) == [key(inv, "draft")] * 2
    assert_backoff(clock.waits, policy, retries=1)
    assert len(fake.state()["invoices"]) == 1


def test_lost_invoice_item_response_is_replayed_not_duplicated(make_hub, fake, clock) -> None:
    inv = invoice()
    fake.inject_503("POST", "/v1/invoiceitems", after=True)  # line 1 is written, reply lost
    (outcome,) = make_hub().push(deliveries(inv))

    assert_delivered_once(fake, inv, outcome)
    items = sent(fake, ITEM)
    assert keys_of(items) == [key(inv, "line-1"), key(inv, "line-1"), key(inv, "line-2")]
    assert statuses(items) == [503, 200, 200]
    assert [r.replayed for r in items] == [False, True, False]  # Stripe replayed the first write
    assert len(clock.waits) == 1
    assert len(fake.state()["invoice_items"]) == 2


def test_429_retry_after_is_waited_out_then_delivered(make_hub, fake, clock) -> None:
    inv = invoice()
    fake.inject_429("POST", "/v1/invoiceitems", retry_after=2)
    (outcome,) = make_hub().push(deliveries(inv))

    assert_delivered_once(fake, inv, outcome)
    items = sent(fake, ITEM)
    assert keys_of(items) == [key(inv, "line-1"), key(inv, "line-1"), key(inv, "line-2")]
    assert statuses(items) == [429, 200, 200]
    assert clock.waits == [2.0]
    # The 429 also paused the account for 2 s; that pause overlaps the retry wait instead of
    # adding to it, so the limiter only ever spaces requests at 24/s (25/s less headroom).
    assert clock.throttle and max(clock.throttle) <= 1 / (TEST_RATE - 1) + 1e-9


def test_connection_reset_after_finalize_is_retried_without_a_second_finalize(
    make_hub, fake, clock
) -> None:
    inv = invoice()
    fake.inject_drop("POST", "/v1/invoices/*/finalize", after=True)
    (outcome,) = make_hub().push(deliveries(inv))

    remote = assert_delivered_once(fake, inv, outcome)
    finalizes = sent(fake, FINALIZE)
    assert keys_of(finalizes) == [key(inv, "finalize")] * 2
    assert statuses(finalizes) == [0, 200]  # 0: the connection was reset after the work
    assert [r.replayed for r in finalizes] == [False, True]
    # Finalized once: the customer's invoice sequence moved by one and the number is its first.
    (customer,) = fake.state()["customers"]
    assert customer["next_invoice_sequence"] == 2
    assert (
        remote["number"] == outcome.refs["invoice_number"] == f"{customer['invoice_prefix']}-0001"
    )
    assert remote["auto_advance"] is True
    assert len(clock.waits) == 1


# --------------------------------------------------------------------------------------------
# Terminal errors: not retried
# --------------------------------------------------------------------------------------------


def test_500_with_should_retry_false_fails_at_once_and_others_are_delivered(
    make_hub, fake, clock, ledger
) -> None:
    first, second = invoice(1), invoice(2)
    fake.inject_500("POST", "/v1/invoices", should_retry=False)
    # One worker, so the first invoice's draft is the one that meets the 500.
    failed, delivered = make_hub(concurrency=1).push(deliveries(first, second))

    drafts = sent(fake, DRAFT)
    assert keys_of(drafts) == [key(first, "draft"), key(second, "draft")]  # no retry
    assert statuses(drafts) == [500, 200]
    request_id = drafts[0].request_id
    assert failed.state is DeliveryState.FAILED
    assert failed.error == (
        "draft: An unknown error occurred (injected by the kiki fake). "
        f"(HTTP 500, request {request_id})"
    )
    assert clock.waits == []
    assert_delivered_once(fake, second, delivered)
    assert [i["metadata"]["kiki_invoice_number"] for i in fake.state()["invoices"]] == [
        second.number
    ]
    account = StripeSettings(api_key=TEST_KEY).account_id
    record = ledger.find_delivery(first.number, 0, "stripe", account)
    assert record is not None and record.state is DeliveryState.FAILED
    assert request_id in (record.last_error or "")


def test_400_validation_error_fails_at_once_with_stripes_message(make_hub, fake, clock) -> None:
    inv = invoice()
    (outcome,) = make_hub().push(deliveries(inv, customer="cus_KikiNoSuchCustomer"))

    drafts = sent(fake, DRAFT)
    assert keys_of(drafts) == [key(inv, "draft")]
    assert statuses(drafts) == [400]
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error == (
        "draft: No such customer: 'cus_KikiNoSuchCustomer' "
        f"(HTTP 400, code resource_missing, request {drafts[0].request_id})"
    )
    assert clock.waits == []
    assert fake.state()["invoices"] == []
    # The configured customer means no customer step reached Stripe; it existed before this
    # delivery, so its invoices were listed before the draft was created.
    assert [(r.method, r.route) for r in fake.requests] == [("GET", "/v1/invoices"), DRAFT]


# --------------------------------------------------------------------------------------------
# Giving up for now, and the circuit breaker
# --------------------------------------------------------------------------------------------


def test_exhausted_503s_defer_then_a_later_push_completes_without_duplicate(
    make_hub, fake, clock, ledger
) -> None:
    policy = RetryPolicy(max_attempts=4, initial_wait=0.1, max_wait=1.0)
    inv = invoice()
    # Line 1 is written by the first attempt; every reply, replays included, is lost.
    fake.inject_503("POST", "/v1/invoiceitems", times=4, after=True)
    (outcome,) = make_hub(policy).push(deliveries(inv))

    items = sent(fake, ITEM)
    assert outcome.state is DeliveryState.DEFERRED
    assert outcome.error == (
        f"line-1: {SERVICE_UNAVAILABLE} (HTTP 503, request {items[-1].request_id})"
    )
    assert keys_of(items) == [key(inv, "line-1")] * 4
    assert statuses(items) == [503] * 4
    assert [r.replayed for r in items] == [False, True, True, True]
    assert_backoff(clock.waits, policy, retries=3)
    assert len(fake.state()["invoice_items"]) == 1
    (record,) = ledger.deliveries()
    assert record.state is DeliveryState.DEFERRED

    before = len(fake.requests)
    (outcome,) = make_hub(policy).push(deliveries(inv))

    assert_delivered_once(fake, inv, outcome)
    # Line 1's outcome was unknown: it is found on the draft, not sent again.
    assert [(r.method, r.route) for r in fake.requests[before:]] == [
        ("GET", "/v1/invoices/{invoice}/lines"),
        ITEM,
        FINALIZE,
    ]
    assert keys_of(sent(fake, ITEM, since=before)) == [key(inv, "line-2")]
    assert len(fake.state()["invoice_items"]) == 2


def test_circuit_breaker_defers_later_deliveries_without_calling_stripe(
    make_hub, fake, clock
) -> None:
    invoices = [invoice(n) for n in range(1, 7)]
    fake.inject_503("*", "/v1/", times=1000)
    hub = make_hub(RetryPolicy(max_attempts=2, initial_wait=0), concurrency=1, breaker_threshold=2)
    outcomes = hub.push(deliveries(*invoices))

    assert [o.state for o in outcomes] == [DeliveryState.DEFERRED] * 6
    search = [r for r in fake.requests if r.route == "/v1/customers/search"]
    assert len(fake.requests) == len(search) == 4  # two deliveries x two attempts, then open
    for outcome, request in zip(outcomes[:2], search[1::2], strict=True):
        assert outcome.error == (
            f"customer: {SERVICE_UNAVAILABLE} (HTTP 503, request {request.request_id})"
        )
    assert [o.error for o in outcomes[2:]] == [
        "deferred: stripe circuit open after repeated failures"
    ] * 4

    fake.clear_faults()
    outcomes = make_hub(concurrency=1).push(deliveries(*invoices))
    for inv, outcome in zip(invoices, outcomes, strict=True):
        assert_delivered_once(fake, inv, outcome)
    assert len(fake.state()["invoices"]) == 6


# --------------------------------------------------------------------------------------------
# Crash recovery: look up by natural key before re-sending
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["kept", "expired"])
def test_rerun_after_crash_with_every_step_unknown_creates_nothing(
    make_hub, fake, ledger, keys
) -> None:
    inv = invoice()
    (first,) = make_hub().push(deliveries(inv, collection="now"))
    assert_delivered_once(fake, inv, first, status="paid")
    crash_ledger(ledger, ("draft", "line-1", "line-2", "finalize", "collect"))
    if keys == "expired":
        expire_idempotency_keys(fake)
    before = len(fake.requests)

    (outcome,) = make_hub().push(deliveries(inv, collection="now"))

    assert_delivered_once(fake, inv, outcome, status="paid")
    assert outcome.refs == first.refs
    # Every step is found upstream by its natural key and nothing is posted again; the
    # draft's look-up sees the invoice paid, so finalize and collect need no request at all.
    assert [(r.method, r.route) for r in fake.requests[before:]] == [
        ("GET", "/v1/invoices"),
        ("GET", "/v1/invoices/{invoice}/lines"),
        ("GET", "/v1/invoices/{invoice}/lines"),
    ]
    assert len(fake.state()["invoice_items"]) == 2
    if keys == "expired":
        assert fake.state()["idempotency_keys"] == 0


@pytest.mark.parametrize("keys", ["kept", "expired"])
def test_rerun_after_crash_right_after_the_draft_finds_it_upstream(
    make_hub, fake, ledger, monkeypatch, keys
) -> None:
    inv = invoice()
    record_steps = ledger.record_steps

    def killed_after_draft(delivery_id: int, writes: Any, **kwargs: Any) -> None:
        writes = list(writes)
        if any(w.step == "draft" and w.state is DeliveryState.DELIVERED for w in writes):
            raise ProcessKilled  # Stripe created the draft; the ledger never heard back
        record_steps(delivery_id, writes, **kwargs)

    monkeypatch.setattr(ledger, "record_steps", killed_after_draft)
    with pytest.raises(ProcessKilled):
        make_hub().push(deliveries(inv))
    monkeypatch.setattr(ledger, "record_steps", record_steps)
    (draft_id,) = [i["id"] for i in fake.state()["invoices"]]
    assert ledger.steps(ledger.deliveries()[0].id)["draft"].state is DeliveryState.IN_FLIGHT
    crash_ledger(ledger, ("draft",))
    if keys == "expired":
        expire_idempotency_keys(fake)
    before = len(fake.requests)

    (outcome,) = make_hub().push(deliveries(inv))

    assert_delivered_once(fake, inv, outcome)
    assert outcome.refs["invoice_id"] == draft_id
    # The draft is found, not created by this run, so its lines may exist: each is looked up
    # before it is posted (a lost ledger elsewhere could have added them).
    assert [(r.method, r.route) for r in fake.requests[before:]] == [
        ("GET", "/v1/invoices"),  # the draft, found by its kiki_invoice_number metadata
        ("GET", "/v1/invoices/{invoice}/lines"),
        ITEM,
        ("GET", "/v1/invoices/{invoice}/lines"),
        ITEM,
        ("GET", "/v1/invoices/{invoice}"),
        FINALIZE,
    ]
    assert sent(fake, DRAFT, since=before) == []

    if keys == "expired":
        # Control: with the key forgotten, re-sending the draft would have made a second one.
        adapter = StripeAdapter(StripeSettings(api_key=TEST_KEY, api_base=fake.url))
        client = StripeClientSettings()
        draft_step = adapter.steps(inv, client)[1]
        refs = {"customer_id": outcome.refs["customer_id"]}
        ctx = StepContext(inv, client, refs, key(inv, "draft"))
        assert draft_step.send(ctx, draft_step.request(ctx))["invoice_id"] != draft_id
        assert len(fake.state()["invoices"]) == 2


def test_redrive_after_a_stored_500_delivers(make_hub, fake) -> None:
    inv = invoice()
    fake.inject_500("POST", "/v1/invoices", should_retry=False)
    (outcome,) = make_hub().push(deliveries(inv))
    assert outcome.state is DeliveryState.FAILED

    (outcome,) = make_hub().push(deliveries(inv), redrive_failed=True)

    assert_delivered_once(fake, inv, outcome)
