"""The Stripe adapter: payload mappers, validate() and classify() without any network, then
every step run in order against the local Stripe fake (127.0.0.1 only)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
import stripe
from kiki_billing_adapters.stripe import (
    StripeAdapter,
    StripeClientSettings,
    StripeSettings,
    classify_stripe_error,
    stripe_amount,
    to_stripe_customer,
    to_stripe_finalize,
    to_stripe_invoice,
    to_stripe_invoice_item,
)
from kiki_billing_adapters.stripe.wire import MAX_AMOUNT_MINOR, customer_search_query
from pydantic import ValidationError

from kiki_billing.hub.keys import idempotency_key
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    Invoice,
    NotBilled,
    SourceEvidence,
)
from kiki_billing.plugin import (
    AmountLimitError,
    DeliveryError,
    RateLimitedError,
    RateWindow,
    Step,
    StepContext,
    TerminalError,
    TransientError,
)
from kiki_billing.profit_share import compute_invoice

REPO = Path(__file__).resolve().parents[3]
PERIOD = BillingPeriod.month("2026-01")
NUMBER = "KIKI-OaaS-202601-000001"
TEST_KEY = "sk_test_kiki_adapter_unit_0123456789"
LOCALHOST_ONLY = r"^127\.0\.0\.1$"


def make_invoice(
    *,
    campaigns: int = 2,
    ltv: str = "130090.00",
    currency: str = "USD",
    fee_cap: str | None = "3000",
    number: str = NUMBER,
    terms: int = 14,
) -> Invoice:
    """Two campaigns of 2209.00 USD each, capped at 3000 by a -1418.00 adjustment line."""
    contract = Contract(
        client_id="acme",
        name="Acme Corp",
        email="ap@acme.test",
        currency=currency,
        fee_cap=fee_cap,
        payment_terms_days=terms,
    )
    rows = [
        CampaignMetrics(client_id="acme", campaign_id=f"c{i:03d}", spend="36000.00", ltv=ltv)
        for i in range(1, campaigns + 1)
    ]
    invoice = compute_invoice(
        contract,
        rows,
        number=number,
        period=PERIOD,
        sources=(SourceEvidence(kind="metrics_file", location="metrics.csv"),),
    )
    assert not isinstance(invoice, NotBilled)
    return invoice


def make_adapter(
    api_base: str = "https://api.stripe.invalid", key: str = TEST_KEY
) -> StripeAdapter:
    return StripeAdapter(StripeSettings(api_key=key, api_base=api_base))


def context(
    invoice: Invoice, client: StripeClientSettings, step: str, refs: Mapping[str, str] = {}
) -> StepContext:
    return StepContext(
        invoice=invoice,
        client=client,
        refs=dict(refs),
        idempotency_key=idempotency_key(invoice.number, invoice.revision, "stripe", step),
    )


def run_steps(
    adapter: StripeAdapter, invoice: Invoice, client: StripeClientSettings
) -> dict[str, str]:
    """What the hub does, minus retries and the ledger: skip or send each step in order."""
    adapter.validate(invoice, client)
    refs: dict[str, str] = {}
    for step in adapter.steps(invoice, client):
        ctx = context(invoice, client, step.name, refs)
        got = step.skip(ctx) if step.skip else None
        if got is None:
            got = step.send(ctx, step.request(ctx))
        assert all(isinstance(v, str) for v in got.values()), got
        refs.update(got)
    return refs


# --------------------------------------------------------------------------------------------
# stripe_amount
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("2209.00", "USD", 220900),
        ("-1418.00", "usd", -141800),
        ("0.01", "EUR", 1),
        ("1500", "JPY", 1500),
        ("1500.00", "JPY", 1500),
        ("12.340", "KWD", 12340),
        ("-0.010", "BHD", -10),
        ("1000", "ISK", 100000),
        ("250", "MGA", 250),
        ("999999.99", "USD", MAX_AMOUNT_MINOR),
    ],
)
def test_stripe_amount_follows_stripe_currency_rules(
    amount: str, currency: str, minor: int
) -> None:
    assert stripe_amount(Decimal(amount), currency) == minor


@pytest.mark.parametrize(
    ("amount", "currency", "fragment"),
    [
        ("1500.5", "JPY", "whole units"),
        ("100.50", "MGA", "whole units"),
        ("12.345", "KWD", "end in 0"),
        ("10.5", "ISK", "divisible by 100"),
        ("0.001", "USD", "not a whole number"),
        ("1000000.00", "USD", "at most 99,999,999"),
        ("-1000000.00", "USD", "at most 99,999,999"),
        ("100000000", "JPY", "at most 99,999,999"),
        ("1.00", "XYZ", "unknown currency"),
    ],
)
def test_stripe_amount_refuses_what_stripe_cannot_take(
    amount: str, currency: str, fragment: str
) -> None:
    with pytest.raises(AmountLimitError, match=fragment):
        stripe_amount(Decimal(amount), currency)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the adapter so much as builds its SDK client."""
    monkeypatch.setattr(
        StripeAdapter, "client", property(lambda self: pytest.fail("the adapter called Stripe"))
    )


def test_validate_accepts_a_normal_invoice(no_calls: None) -> None:
    make_adapter().validate(make_invoice(), StripeClientSettings())


def test_validate_refuses_a_line_over_the_amount_limit_before_any_call(no_calls: None) -> None:
    invoice = make_invoice(campaigns=1, ltv="100000000.00", fee_cap=None)
    assert invoice.lines[0].fee > Decimal("999999.99")
    with pytest.raises(AmountLimitError, match="99,999,999"):
        make_adapter().validate(invoice, StripeClientSettings())


def test_validate_refuses_a_total_over_the_amount_limit_before_any_call(no_calls: None) -> None:
    # Each line is under 99,999,999 cents; their sum is not.
    invoice = make_invoice(campaigns=2, ltv="6000000.00", fee_cap=None)
    assert all(stripe_amount(line.fee, "USD") <= MAX_AMOUNT_MINOR for line in invoice.lines)
    with pytest.raises(AmountLimitError, match="totals"):
        make_adapter().validate(invoice, StripeClientSettings())


def test_validate_refuses_more_than_250_lines_before_any_call(no_calls: None) -> None:
    invoice = make_invoice(campaigns=251, ltv="108100.00", fee_cap=None)
    with pytest.raises(TerminalError, match="at most 250 invoice items") as caught:
        make_adapter().validate(invoice, StripeClientSettings())
    assert not caught.value.retriable
    make_adapter().validate(
        invoice.model_copy(update={"lines": invoice.lines[:250]}), StripeClientSettings()
    )


def test_validate_refuses_an_amount_stripe_cannot_represent(no_calls: None) -> None:
    invoice = make_invoice(currency="KWD", fee_cap=None, ltv="130090.005")
    assert any(stripe_amount_fails(line.fee, "KWD") for line in invoice.lines)
    with pytest.raises(AmountLimitError, match="end in 0"):
        make_adapter().validate(invoice, StripeClientSettings())


def stripe_amount_fails(amount: Decimal, currency: str) -> bool:
    try:
        stripe_amount(amount, currency)
    except AmountLimitError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Payload mappers and steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("collection", "method", "days"),
    [
        ("auto", "charge_automatically", None),
        ("now", "charge_automatically", None),
        ("send_invoice", "send_invoice", 14),
    ],
)
def test_draft_payload_per_collection_mode(collection: str, method: str, days: int | None) -> None:
    invoice = make_invoice(terms=14)
    client = StripeClientSettings(collection=collection)
    params = to_stripe_invoice(invoice, client, "cus_123")
    assert params["customer"] == "cus_123"
    assert params["currency"] == "usd"
    assert params["collection_method"] == method
    assert params.get("days_until_due") == days
    assert ("days_until_due" in params) is (collection == "send_invoice")
    assert "due_date" not in params
    assert params["auto_advance"] is False
    assert params["pending_invoice_items_behavior"] == "exclude"
    assert params["metadata"] == {
        "kiki_invoice_number": NUMBER,
        "kiki_revision": "0",
        "kiki_client_id": "acme",
        "kiki_content_hash": invoice.content_hash,
        "kiki_period": "2026-01",
    }
    assert to_stripe_finalize(client) == {"auto_advance": collection == "auto"}


def test_customer_and_invoice_item_payloads() -> None:
    invoice = make_invoice()
    assert to_stripe_customer(invoice) == {
        "name": "Acme Corp",
        "email": "ap@acme.test",
        "metadata": {"kiki_client_id": "acme"},
    }
    cap = invoice.lines[-1]
    assert to_stripe_invoice_item(invoice, cap, {"customer_id": "cus_1", "invoice_id": "in_1"}) == {
        "customer": "cus_1",
        "invoice": "in_1",
        "amount": -141800,
        "currency": "usd",
        "description": cap.description,
        "metadata": {"kiki_invoice_number": NUMBER, "kiki_line_no": str(cap.line_no)},
    }
    assert customer_search_query("acme") == "metadata['kiki_client_id']:'acme'"


@pytest.mark.parametrize(
    ("collection", "last"),
    [
        ("auto", None),
        ("now", "/v1/invoices/{invoice_id}/pay"),
        ("send_invoice", "/v1/invoices/{invoice_id}/send"),
    ],
)
def test_steps_and_dry_run_requests_show_placeholders(collection: str, last: str | None) -> None:
    invoice = make_invoice()
    client = StripeClientSettings(collection=collection)
    steps = make_adapter().steps(invoice, client)
    names = [step.name for step in steps]
    expected = ["customer", "draft", "line-1", "line-2", "line-3", "finalize"]
    assert names == ([*expected, "collect"] if last else expected)
    requests = {step.name: step.request(context(invoice, client, step.name)) for step in steps}
    assert requests["draft"].payload["customer"] == "{customer_id}"
    assert requests["line-2"].path == "/v1/invoiceitems"
    assert requests["line-2"].payload["invoice"] == "{invoice_id}"
    assert requests["line-2"].payload["customer"] == "{customer_id}"
    assert requests["finalize"].path == "/v1/invoices/{invoice_id}/finalize"
    if last:
        assert requests["collect"].path == last
        assert requests["collect"].payload == {}
    known = context(invoice, client, "finalize", {"customer_id": "cus_9", "invoice_id": "in_9"})
    by_name = {step.name: step for step in steps}
    assert by_name["finalize"].request(known).path == "/v1/invoices/in_9/finalize"
    assert by_name["line-1"].request(known).payload["invoice"] == "in_9"


def test_customer_step_is_skipped_for_a_configured_or_known_customer() -> None:
    invoice = make_invoice()
    step = make_adapter().steps(invoice, StripeClientSettings())[0]
    assert step.skip is not None
    configured = StripeClientSettings(customer="cus_Configured1")
    assert step.skip(context(invoice, configured, "customer")) == {"customer_id": "cus_Configured1"}
    known = context(invoice, StripeClientSettings(), "customer", {"customer_id": "cus_Earlier"})
    assert step.skip(known) == {"customer_id": "cus_Earlier"}
    assert step.skip(context(invoice, StripeClientSettings(), "customer")) is None


def test_collect_is_skipped_when_finalize_already_settled_the_invoice() -> None:
    invoice = make_invoice()
    client = StripeClientSettings(collection="now")
    collect = make_adapter().steps(invoice, client)[-1]
    assert collect.name == "collect" and collect.skip is not None
    paid = context(invoice, client, "collect", {"invoice_id": "in_1", "invoice_status": "paid"})
    assert collect.skip(paid) == {"invoice_status": "paid"}
    open_ = context(invoice, client, "collect", {"invoice_id": "in_1", "invoice_status": "open"})
    assert collect.skip(open_) is None


def test_client_settings_check_the_customer_id() -> None:
    with pytest.raises(ValidationError):
        StripeClientSettings(customer="acme")
    with pytest.raises(ValidationError):
        StripeClientSettings(collection="later")


def test_settings_account_and_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIKI_STRIPE_API_KEY", TEST_KEY)
    settings = StripeSettings()
    assert settings.api_base == "https://api.stripe.com"
    assert settings.api_version == "2023-08-16"
    assert TEST_KEY not in repr(settings)
    test = StripeAdapter(settings)
    assert test.account.startswith("test:") and TEST_KEY not in test.account
    assert (test.rate_limit().windows, test.rate_limit().concurrency) == (
        (RateWindow(25, 1.0),),
        10,
    )
    live = make_adapter(key="sk_live_" + "x" * 24)
    assert live.account.startswith("live:") and live.account != test.account
    assert live.rate_limit().windows == (RateWindow(100, 1.0),)
    monkeypatch.setenv("KIKI_STRIPE_RATE_LIMIT", "7")
    monkeypatch.setenv("KIKI_STRIPE_CONCURRENCY", "2")
    tuned = StripeAdapter(StripeSettings())
    assert (tuned.rate_limit().windows, tuned.rate_limit().concurrency) == (
        (RateWindow(7, 1.0),),
        2,
    )


def test_module_imports_without_the_stripe_sdk() -> None:
    code = (
        "import sys; sys.modules['stripe'] = None\n"
        "import kiki_billing_adapters.stripe as a\n"
        "assert a.StripeAdapter.requires == ('stripe',) and a.StripeAdapter.extra == 'stripe'\n"
        "print(a.stripe_amount(__import__('decimal').Decimal('1.10'), 'USD'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "110"


def test_every_write_carries_the_hubs_key_and_the_adapter_makes_none() -> None:
    """The adapter only passes ctx.idempotency_key through; it never makes up a key."""
    answers = {
        "/v1/customers/search": {"data": []},
        "/v1/customers": {"id": "cus_1"},
        "/v1/invoices": {"id": "in_1"},
        "/v1/invoiceitems": {"id": "ii_1"},
        "/v1/invoices/in_1/finalize": {"id": "in_1", "status": "open"},
        "/v1/invoices/in_1/pay": {"id": "in_1", "status": "paid"},
    }
    client = MagicMock()
    client.raw_request.side_effect = lambda method, path, **_: SimpleNamespace(data=answers[path])
    adapter = make_adapter()
    adapter._client = client
    invoice = make_invoice()
    settings = StripeClientSettings(collection="now")
    refs = run_steps(adapter, invoice, settings)
    assert refs["invoice_status"] == "paid"

    steps = {
        "/v1/customers": "customer",
        "/v1/invoices": "draft",
        "/v1/invoices/in_1/finalize": "finalize",
        "/v1/invoices/in_1/pay": "collect",
    }
    calls = client.raw_request.call_args_list
    writes = [call for call in calls if call.args[0] == "post"]
    assert len(writes) == 4 + len(invoice.lines)
    lines = 0
    for call in writes:
        path = call.args[1]
        if path == "/v1/invoiceitems":
            lines += 1
            step = f"line-{lines}"
        else:
            step = steps[path]
        expected = idempotency_key(invoice.number, invoice.revision, "stripe", step)
        assert call.kwargs["idempotency_key"] == expected, step
    reads = [call for call in calls if call.args[0] == "get"]
    assert all("idempotency_key" not in call.kwargs for call in reads)


# --------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------


def _body(code: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": "Stripe says no."}
    if code:
        error["code"] = code
    return {"error": error}


REQ = {"Request-Id": "req_abc123"}


@pytest.mark.parametrize(
    ("error", "kind", "status", "code"),
    [
        pytest.param(
            stripe.APIConnectionError("Network error: connection reset", should_retry=True),
            TransientError,
            None,
            None,
            id="connection",
        ),
        pytest.param(
            stripe.RateLimitError(
                "Too many requests", None, 429, _body("rate_limit"), {**REQ, "Retry-After": "2"}
            ),
            RateLimitedError,
            429,
            "rate_limit",
            id="429",
        ),
        pytest.param(
            stripe.RateLimitError("Lock timeout", None, 429, _body("lock_timeout"), REQ),
            TransientError,
            429,
            "lock_timeout",
            id="lock_timeout-429",
        ),
        pytest.param(
            stripe.InvalidRequestError(
                "Lock timeout", None, "lock_timeout", None, 400, _body("lock_timeout"), REQ
            ),
            TransientError,
            400,
            "lock_timeout",
            id="lock_timeout-400",
        ),
        pytest.param(
            stripe.APIError(
                "Another request with this key is in progress",
                None,
                409,
                _body("idempotency_key_in_use", "idempotency_error"),
                REQ,
            ),
            TransientError,
            409,
            "idempotency_key_in_use",
            id="409",
        ),
        pytest.param(
            stripe.APIError("Service unavailable", None, 503, _body(kind="api_error"), REQ),
            TransientError,
            503,
            None,
            id="503",
        ),
        pytest.param(
            stripe.APIError(
                "Internal error",
                None,
                500,
                _body(kind="api_error"),
                {**REQ, "Stripe-Should-Retry": "false"},
            ),
            TerminalError,
            500,
            None,
            id="500-should-retry-false",
        ),
        pytest.param(
            stripe.InvalidRequestError(
                "Try again", None, None, None, 400, _body(), {**REQ, "stripe-should-retry": "true"}
            ),
            TransientError,
            400,
            None,
            id="400-should-retry-true",
        ),
        pytest.param(
            stripe.InvalidRequestError(
                "Invalid integer: 1.5",
                "amount",
                "parameter_invalid",
                None,
                400,
                _body("parameter_invalid"),
                REQ,
            ),
            TerminalError,
            400,
            "parameter_invalid",
            id="400",
        ),
        pytest.param(
            stripe.InvalidRequestError(
                "No such invoice: 'in_x'",
                "id",
                "resource_missing",
                None,
                404,
                _body("resource_missing"),
                REQ,
            ),
            TerminalError,
            404,
            "resource_missing",
            id="404",
        ),
        pytest.param(
            stripe.AuthenticationError(
                f"Invalid API Key provided: {TEST_KEY}", None, 401, _body(), REQ
            ),
            TerminalError,
            401,
            None,
            id="401",
        ),
        pytest.param(
            stripe.PermissionError("Restricted key", None, 403, _body(), REQ),
            TerminalError,
            403,
            None,
            id="403",
        ),
        pytest.param(
            stripe.CardError(
                "Your card was declined.",
                None,
                "card_declined",
                None,
                402,
                _body("card_declined", "card_error"),
                REQ,
            ),
            TerminalError,
            402,
            "card_declined",
            id="402",
        ),
        pytest.param(
            stripe.IdempotencyError(
                "Keys for idempotent requests can only be used with the same parameters",
                None,
                400,
                _body(kind="idempotency_error"),
                REQ,
            ),
            TerminalError,
            400,
            None,
            id="idempotency-400",
        ),
    ],
)
def test_classify_maps_stripe_errors(
    error: stripe.StripeError, kind: type[DeliveryError], status: int | None, code: str | None
) -> None:
    classified = make_adapter().classify_error(error)
    assert type(classified) is kind
    assert classified.status == status
    assert classified.code == code
    assert classified.message == error.user_message.replace(TEST_KEY, "***")
    assert TEST_KEY not in str(classified)
    if status is not None:
        assert classified.request_id == "req_abc123"
        assert "req_abc123" in str(classified)


def test_classify_reads_retry_after_and_scrubs_the_key() -> None:
    adapter = make_adapter()
    throttled = adapter.classify(
        stripe.RateLimitError("slow down", None, 429, _body("rate_limit"), {"Retry-After": "3"})
    )
    assert isinstance(throttled, RateLimitedError) and throttled.retry_after == 3.0
    no_header = adapter.classify(stripe.RateLimitError("slow down", None, 429, _body(), {}))
    assert isinstance(no_header, RateLimitedError) and no_header.retry_after is None
    auth = adapter.classify_error(stripe.AuthenticationError(f"bad key {TEST_KEY}", None, 401))
    assert TEST_KEY not in auth.message and "***" in auth.message


def test_classify_other_exceptions() -> None:
    adapter = make_adapter()
    already = TerminalError("ours")
    assert adapter.classify(already) is already
    assert type(adapter.classify(KeyError("id"))) is TerminalError
    assert type(adapter.classify(ConnectionResetError("reset"))) is TransientError
    assert type(classify_stripe_error(ValueError("x"))) is TerminalError
    local = stripe.AuthenticationError("No API key provided.")
    assert type(adapter.classify(local)) is TerminalError


# --------------------------------------------------------------------------------------------
# End to end against the local fake
# --------------------------------------------------------------------------------------------

fake_stripe = pytest.importorskip("tests.support.fake_stripe")
local_network = pytest.mark.block_network(allowed_hosts=[LOCALHOST_ONLY])

try:
    from tests.support.stripe_spec import validate_stripe_request
except ImportError:  # pragma: no cover - the spec helper is optional
    validate_stripe_request = None  # type: ignore[assignment]


Captured = list[tuple[str, str, bytes]]


@pytest.fixture
def fake() -> Iterator[tuple[Any, Captured]]:
    """The fake on 127.0.0.1, recording every raw request (method, target, body)."""
    with fake_stripe.FakeStripe(seed=7) as server:
        captured: Captured = []
        handle = server.app.handle

        def recording(method: str, target: str, headers: Mapping[str, str], body: bytes) -> Any:
            if not target.startswith("/_fake/"):
                captured.append((method, target, body))
            return handle(method, target, headers, body)

        server.app.handle = recording
        yield server, captured


def _upstream_invoice(server: Any, invoice_id: str) -> dict[str, Any]:
    invoices = {i["id"]: i for i in server.state()["invoices"]}
    return invoices[invoice_id]


@local_network
@pytest.mark.parametrize(
    ("collection", "status", "method", "auto_advance", "collect_path"),
    [
        ("auto", "open", "charge_automatically", True, None),
        ("now", "paid", "charge_automatically", False, "pay"),
        ("send_invoice", "open", "send_invoice", False, "send"),
    ],
)
def test_every_step_against_the_fake(
    fake: tuple[Any, Captured],
    collection: str,
    status: str,
    method: str,
    auto_advance: bool,
    collect_path: str | None,
) -> None:
    server, captured = fake
    adapter = make_adapter(server.url)
    invoice = make_invoice(terms=14)
    client = StripeClientSettings(collection=collection)
    refs = run_steps(adapter, invoice, client)

    upstream = _upstream_invoice(server, refs["invoice_id"])
    assert upstream["customer"] == refs["customer_id"]
    assert upstream["status"] == refs["invoice_status"] == status
    assert upstream["collection_method"] == method
    assert upstream["auto_advance"] is auto_advance
    # days_until_due is not a field of the 2023-08-16 invoice object; due_date is.
    if collection == "send_invoice":
        assert abs(upstream["due_date"] - upstream["created"] - 14 * 86400) < 60
    else:
        assert upstream["due_date"] is None
    assert upstream["currency"] == "usd"
    assert upstream["metadata"]["kiki_invoice_number"] == NUMBER
    lines = upstream["lines"]["data"]
    assert [line["amount"] for line in lines] == [220900, 220900, -141800]
    assert [line["metadata"]["kiki_line_no"] for line in lines] == ["1", "2", "3"]
    assert [line["invoice_item"] for line in lines] == [
        refs[f"invoice_item_{n}"] for n in (1, 2, 3)
    ]
    assert upstream["total"] == stripe_amount(invoice.total_fee, "USD") == 300000
    state = server.state()
    assert len(state["customers"]) == 1 and len(state["invoices"]) == 1
    assert state["customers"][0]["metadata"] == {"kiki_client_id": "acme"}
    assert state["sent"].get(refs["invoice_id"], 0) == (1 if collect_path == "send" else 0)

    # Every POST carried the hub's key for its step; no GET carried one.
    posts = [r for r in server.requests if r.method == "POST"]
    step_names = [s.name for s in adapter.steps(invoice, client)]
    assert [r.idempotency_key for r in posts] == [
        idempotency_key(invoice.number, invoice.revision, "stripe", name) for name in step_names
    ]
    assert all(r.idempotency_key is None for r in server.requests if r.method != "POST")
    assert all(r.headers["stripe-version"] == "2023-08-16" for r in server.requests)

    # Each request conforms to Stripe's 2023-08-16 OpenAPI spec.
    if validate_stripe_request is not None:
        assert captured
        for http_method, target, body in captured:
            validate_stripe_request(http_method, target, body if http_method == "POST" else None)


@local_network
def test_lookups_find_what_was_sent(fake: tuple[Any, Captured]) -> None:
    server, _ = fake
    adapter = make_adapter(server.url)
    invoice = make_invoice()
    client = StripeClientSettings(collection="now")
    refs = run_steps(adapter, invoice, client)
    steps: dict[str, Step] = {s.name: s for s in adapter.steps(invoice, client)}
    for name, step in steps.items():
        assert step.lookup is not None, name
        found = step.lookup(context(invoice, client, name, refs))
        assert found is not None, name
        assert all(refs[k] == v for k, v in found.items()), (name, found)
    # Nothing is found for another invoice revision.
    other = invoice.model_copy(update={"revision": 1})
    assert steps["draft"].lookup is not None
    assert steps["draft"].lookup(context(other, client, "draft", refs)) is None


@local_network
def test_lost_draft_response_is_found_by_lookup_without_a_duplicate(
    fake: tuple[Any, Captured],
) -> None:
    server, _ = fake
    adapter = make_adapter(server.url)
    invoice = make_invoice()
    client = StripeClientSettings()
    steps = adapter.steps(invoice, client)
    first = context(invoice, client, "customer")
    customer_refs = steps[0].send(first, steps[0].request(first))
    server.inject_drop("POST", "/v1/invoices", after=True)
    draft = steps[1]
    ctx = context(invoice, client, "draft", customer_refs)
    with pytest.raises(stripe.APIConnectionError) as lost:
        draft.send(ctx, draft.request(ctx))
    assert isinstance(adapter.classify(lost.value), TransientError)
    assert draft.lookup is not None
    found = draft.lookup(ctx)
    assert found is not None
    # A retry with the same key replays the same invoice rather than creating a second.
    assert draft.send(ctx, draft.request(ctx))["invoice_id"] == found["invoice_id"]
    assert len(server.state()["invoices"]) == 1


@local_network
def test_classify_real_sdk_errors_from_the_fake(fake: tuple[Any, Captured]) -> None:
    server, _ = fake
    adapter = make_adapter(server.url)
    invoice = make_invoice()
    client = StripeClientSettings()
    customer = adapter.steps(invoice, client)[0]
    ctx = context(invoice, client, "customer")

    server.inject_429("GET", "/v1/customers/search", retry_after=2)
    assert customer.lookup is not None
    with pytest.raises(stripe.StripeError) as throttled:
        customer.lookup(ctx)
    error = adapter.classify(throttled.value)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 2.0 and error.status == 429 and error.code == "rate_limit"
    assert error.request_id and error.request_id.startswith("req_")

    server.inject_500("POST", "/v1/customers", should_retry=False)
    with pytest.raises(stripe.StripeError) as failed:
        customer.send(ctx, customer.request(ctx))
    error = adapter.classify(failed.value)
    assert type(error) is TerminalError and error.status == 500
    assert error.request_id and error.request_id.startswith("req_")
