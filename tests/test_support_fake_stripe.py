"""Checks of the Stripe test support: the fake server and the OpenAPI request validator.

Every raw HTTP call made here through :func:`call` is also validated against Stripe's OpenAPI
spec both ways (the request we send and the response the fake sends), so the fake's response
shapes are pinned to the spec, not to our idea of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe
import vcr

from tests.support.fake_stripe import API_VERSION, FakeStripe, Fault, spawn_fake_stripe
from tests.support.stripe_spec import (
    SpecViolation,
    decode_form,
    encode_form,
    iter_cassette_requests,
    validate_cassette,
    validate_stripe_request,
    validate_stripe_response,
)

# pytest-recording's --block-network (set in pyproject.toml) blocks 127.0.0.1 too unless allowed.
pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

KEY = "sk_test_kiki"
stripe.enable_telemetry = False


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(seed=7) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def sdk(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(
        KEY, base_addresses={"api": fake.url}, max_network_retries=0, stripe_version=API_VERSION
    )


def call(
    http: requests.Session,
    fake: FakeStripe,
    method: str,
    path: str,
    params: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    api_key: str = KEY,
    check_request: bool = True,
    check_response: bool = True,
) -> requests.Response:
    """Send a raw request; check it and the response against Stripe's spec."""
    body = encode_form(params or {}) if method == "POST" else None
    if method != "POST" and params:
        path = f"{path}?{encode_form(params)}"
    if check_request:
        validate_stripe_request(method, path, body)
    headers = {"Authorization": f"Bearer {api_key}", "Stripe-Version": API_VERSION}
    if method == "POST":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if key is not None:
        headers["Idempotency-Key"] = key
    response = http.request(method, fake.url + path, data=body, headers=headers, timeout=10)
    assert response.headers["Request-Id"].startswith("req_")
    if check_response:
        validate_stripe_response(method, path, response.status_code, response.content)
    return response


def new_customer(http: requests.Session, fake: FakeStripe, **params: Any) -> dict[str, Any]:
    response = call(http, fake, "POST", "/v1/customers", {"name": "Acme", **params})
    assert response.status_code == 200, response.text
    return response.json()


def new_invoice(
    http: requests.Session, fake: FakeStripe, customer: str, **params: Any
) -> dict[str, Any]:
    params = {"customer": customer, "currency": "eur", "auto_advance": False, **params}
    response = call(http, fake, "POST", "/v1/invoices", params)
    assert response.status_code == 200, response.text
    return response.json()


def add_item(
    http: requests.Session, fake: FakeStripe, customer: str, invoice: str, amount: int
) -> requests.Response:
    params = {"customer": customer, "invoice": invoice, "amount": amount, "currency": "eur"}
    return call(http, fake, "POST", "/v1/invoiceitems", params)


# ============================================================================================
# The Stripe SDK against the fake
# ============================================================================================


def test_stripe_sdk_end_to_end(fake: FakeStripe, sdk: stripe.StripeClient) -> None:
    customer = sdk.v1.customers.create(
        params={"name": "Acme GmbH", "email": "billing@acme.test", "metadata": {"kiki": "c1"}},
        options={"idempotency_key": "cus-c1"},
    )
    invoice = sdk.v1.invoices.create(
        params={
            "customer": customer.id,
            "currency": "eur",
            "collection_method": "send_invoice",
            "days_until_due": 14,
            "auto_advance": False,
            "metadata": {"kiki_invoice": "INV-1"},
        },
        options={"idempotency_key": "inv-INV-1"},
    )
    assert (invoice.status, invoice.total, invoice.livemode) == ("draft", 0, False)
    for index, amount in enumerate((12_345, 655)):
        sdk.v1.invoice_items.create(
            params={
                "customer": customer.id,
                "invoice": invoice.id,
                "amount": amount,
                "currency": "eur",
                "description": f"line {index}",
                "metadata": {"kiki_line": str(index)},
            },
            options={"idempotency_key": f"inv-INV-1-line-{index}"},
        )
    invoice = sdk.v1.invoices.finalize_invoice(
        invoice.id, params={"auto_advance": False}, options={"idempotency_key": "fin-INV-1"}
    )
    assert invoice.status == "open"
    assert invoice.number == f"{customer.invoice_prefix}-0001"
    assert invoice.due_date == invoice.created + 14 * 86400
    assert [line.amount for line in invoice.lines.data] == [12_345, 655]
    assert (invoice.subtotal, invoice.total, invoice.amount_due) == (13_000, 13_000, 13_000)

    paid = sdk.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-INV-1"})
    assert (paid.status, paid.paid, paid.amount_paid, paid.amount_remaining) == (
        "paid",
        True,
        13_000,
        0,
    )

    # The same create with the same key through the SDK: the stored response, nothing new.
    again = sdk.v1.invoices.create(
        params={
            "customer": customer.id,
            "currency": "eur",
            "collection_method": "send_invoice",
            "days_until_due": 14,
            "auto_advance": False,
            "metadata": {"kiki_invoice": "INV-1"},
        },
        options={"idempotency_key": "inv-INV-1"},
    )
    assert again.id == invoice.id and again.status == "draft"  # the response as first sent
    assert again.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(fake.state()["invoices"]) == 1

    listed = sdk.v1.invoices.list(params={"customer": customer.id, "status": "paid"})
    assert [i.id for i in listed.data] == [invoice.id]
    keys = [r.idempotency_key for r in fake.requests if r.method == "POST"]
    assert keys[:2] == ["cus-c1", "inv-INV-1"]
    assert all(r.headers["stripe-version"] == API_VERSION for r in fake.requests)


def test_sdk_maps_fake_errors_to_its_exceptions(fake: FakeStripe, sdk: stripe.StripeClient) -> None:
    customer = sdk.v1.customers.create(params={"name": "Acme"})
    invoice = sdk.v1.invoices.create(params={"customer": customer.id, "auto_advance": False})
    sdk.v1.invoice_items.create(
        params={"customer": customer.id, "invoice": invoice.id, "amount": 500}
    )

    with pytest.raises(stripe.InvalidRequestError) as bad:
        sdk.v1.invoices.create(params={"customer": customer.id, "collection_method": "bogus"})
    assert (bad.value.http_status, bad.value.param) == (400, "collection_method")

    with pytest.raises(stripe.InvalidRequestError) as missing:
        sdk.v1.invoices.retrieve("in_doesnotexist")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")

    fake.inject_card_error()
    with pytest.raises(stripe.CardError) as declined:
        sdk.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-1"})
    assert declined.value.code == "card_declined"
    # 402 is kept under the key: the same key gets the decline again, a new key pays.
    with pytest.raises(stripe.CardError):
        sdk.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-1"})
    assert sdk.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-2"}).paid

    fake.inject_429("POST", "/v1/customers", retry_after=2)
    with pytest.raises(stripe.RateLimitError) as limited:
        sdk.v1.customers.create(params={"name": "B"})
    assert limited.value.headers is not None and limited.value.headers["Retry-After"] == "2"

    fake.inject_drop("POST", "/v1/customers")
    with pytest.raises(stripe.APIConnectionError):
        sdk.v1.customers.create(params={"name": "C"})

    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient(
            "sk_live_nope", base_addresses={"api": fake.url}, max_network_retries=0
        ).v1.customers.list()


def test_sdk_sees_in_flight_409_as_plain_api_error(
    fake: FakeStripe, sdk: stripe.StripeClient
) -> None:
    """stripe-python maps ``idempotency_error`` to IdempotencyError only for 400/404."""
    fake.inject_delay("POST", "/v1/customers", seconds=0.6)
    first = threading.Thread(
        target=sdk.v1.customers.create,
        kwargs={"params": {"name": "A"}, "options": {"idempotency_key": "same"}},
    )
    first.start()
    _wait_for_requests(fake, 1)
    with pytest.raises(stripe.APIError) as conflict:
        sdk.v1.customers.create(params={"name": "A"}, options={"idempotency_key": "same"})
    first.join()
    assert not isinstance(conflict.value, stripe.IdempotencyError)
    assert conflict.value.http_status == 409
    assert conflict.value.error is not None
    assert conflict.value.error.type == "idempotency_error"
    assert conflict.value.error.code == "idempotency_key_in_use"


def test_sdk_requests_recorded_by_vcr_conform_to_spec(
    fake: FakeStripe, sdk: stripe.StripeClient, tmp_path: Path
) -> None:
    cassette = tmp_path / "stripe_flow.yaml"
    with vcr.VCR(record_mode="all").use_cassette(str(cassette)):
        customer = sdk.v1.customers.create(params={"name": "A", "metadata": {"k": "v"}})
        invoice = sdk.v1.invoices.create(
            params={
                "customer": customer.id,
                "currency": "usd",
                "auto_advance": False,
                "pending_invoice_items_behavior": "exclude",
            }
        )
        sdk.v1.invoice_items.create(
            params={
                "customer": customer.id,
                "invoice": invoice.id,
                "quantity": 3,
                "unit_amount_decimal": "33.3333",
                "currency": "usd",
            }
        )
        sdk.v1.invoices.finalize_invoice(invoice.id, params={"expand": ["customer"]})
        sdk.v1.invoices.pay(invoice.id)
        sdk.v1.invoices.list(
            params={"customer": customer.id, "limit": 5, "expand": ["data.customer"]}
        )
        sdk.v1.customers.search(params={"query": "metadata['k']:'v'"})
    requests_seen = list(iter_cassette_requests(cassette))
    assert [m for m, _, _ in requests_seen] == ["POST"] * 5 + ["GET"] * 2
    assert decode_form(requests_seen[3][2])["expand"] == {"0": "customer"}  # SDK: indexed
    assert validate_cassette(cassette, host=None) == 7
    assert fake.state()["invoices"][0]["total"] == 100  # 3 x 33.3333 rounded half up


# ============================================================================================
# Idempotency
# ============================================================================================


def test_replay_returns_the_same_object_and_creates_nothing(
    fake: FakeStripe, http: requests.Session
) -> None:
    first = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k1")
    second = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Original-Request"] == first.headers["Request-Id"]
    assert second.headers["Request-Id"] != first.headers["Request-Id"]
    assert second.headers["Idempotency-Key"] == "k1"
    assert len(fake.state()["customers"]) == 1
    assert [r.replayed for r in fake.requests] == [False, True]


def test_same_key_with_other_parameters_or_endpoint_is_an_idempotency_error(
    fake: FakeStripe, http: requests.Session
) -> None:
    customer = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k1").json()
    other_body = call(http, fake, "POST", "/v1/customers", {"name": "B"}, key="k1")
    assert other_body.status_code == 400
    assert other_body.json()["error"]["type"] == "idempotency_error"
    assert "same parameters" in other_body.json()["error"]["message"]
    other_path = call(http, fake, "POST", "/v1/invoices", {"customer": customer["id"]}, key="k1")
    assert other_path.status_code == 400
    assert "same endpoint" in other_path.json()["error"]["message"]
    assert len(fake.state()["customers"]) == 1
    assert fake.state()["invoices"] == []


def test_parameter_order_does_not_change_the_fingerprint(
    fake: FakeStripe, http: requests.Session
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "k"}
    one = http.post(f"{fake.url}/v1/customers", data="name=A&email=a%40x.test", headers=headers)
    two = http.post(f"{fake.url}/v1/customers", data="email=a%40x.test&name=A", headers=headers)
    assert two.headers["Idempotent-Replayed"] == "true"
    assert one.json()["id"] == two.json()["id"]


def test_validation_errors_are_not_stored(fake: FakeStripe, http: requests.Session) -> None:
    customer = new_customer(http, fake)
    invoice = new_invoice(http, fake, customer["id"])
    params = {"customer": customer["id"], "invoice": invoice["id"], "currency": "eur"}
    bad = call(
        http,
        fake,
        "POST",
        "/v1/invoiceitems",
        {**params, "amount": "12.5"},
        key="line-1",
        check_request=False,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "parameter_invalid_integer"
    assert bad.json()["error"]["param"] == "amount"
    fixed = call(http, fake, "POST", "/v1/invoiceitems", {**params, "amount": 1250}, key="line-1")
    assert fixed.status_code == 200
    assert "Idempotent-Replayed" not in fixed.headers
    # A handler-level 4xx (not a spec error) is not stored either.
    finalized = call(http, fake, "POST", f"/v1/invoices/{invoice['id']}/finalize", key="f")
    late = call(http, fake, "POST", "/v1/invoiceitems", {**params, "amount": 1}, key="line-2")
    assert (finalized.status_code, late.status_code) == (200, 400)
    assert fake.state()["idempotency_keys"] == 2


def test_keys_are_scoped_per_api_key(fake: FakeStripe, http: requests.Session) -> None:
    one = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k", api_key="sk_test_1")
    two = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k", api_key="sk_test_2")
    assert one.json()["id"] != two.json()["id"]
    assert "Idempotent-Replayed" not in two.headers


def test_same_key_while_the_first_is_in_flight_is_409(
    fake: FakeStripe, http: requests.Session
) -> None:
    fake.inject_delay("POST", "/v1/customers", seconds=0.5)
    results: list[requests.Response] = []
    first = threading.Thread(
        target=lambda: results.append(
            call(requests.Session(), fake, "POST", "/v1/customers", {"name": "A"}, key="k")
        )
    )
    first.start()
    _wait_for_requests(fake, 1)
    conflict = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    first.join()
    assert conflict.status_code == 409
    assert conflict.json()["error"]["type"] == "idempotency_error"
    assert conflict.json()["error"]["code"] == "idempotency_key_in_use"
    assert results[0].status_code == 200
    retry = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == results[0].json()["id"]


def test_overlong_key_is_rejected(fake: FakeStripe, http: requests.Session) -> None:
    response = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k" * 256)
    assert response.status_code == 400
    assert fake.state()["customers"] == []


# ============================================================================================
# Faults
# ============================================================================================


def test_503_after_the_operation_is_a_lost_response(
    fake: FakeStripe, http: requests.Session
) -> None:
    customer = new_customer(http, fake)
    fault = fake.inject_503("POST", "/v1/invoices", after=True)
    params = {"customer": customer["id"], "auto_advance": False}
    lost = call(http, fake, "POST", "/v1/invoices", params, key="inv-1")
    assert lost.status_code == 503 and lost.json()["error"]["type"] == "api_error"
    assert len(fake.state()["invoices"]) == 1  # it was created all the same
    retry = call(http, fake, "POST", "/v1/invoices", params, key="inv-1")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == fake.state()["invoices"][0]["id"]
    assert len(fake.state()["invoices"]) == 1
    assert (fault.hits, fake.faults) == (1, [])


def test_503_before_the_operation_does_nothing(fake: FakeStripe, http: requests.Session) -> None:
    fake.inject_503("POST", "/v1/customers", times=2)
    statuses = [
        call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k").status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]
    assert len(fake.state()["customers"]) == 1
    assert [r.fault for r in fake.requests] == ["503", "503", None]


def test_500_is_stored_and_replayed(fake: FakeStripe, http: requests.Session) -> None:
    fake.inject_500("POST", "/v1/customers")
    first = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert first.status_code == 500
    assert first.headers["Stripe-Should-Retry"] == "false"
    again = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true"
    fresh = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k2")
    assert fresh.status_code == 200
    assert len(fake.state()["customers"]) == 1


def test_429_is_not_stored(fake: FakeStripe, http: requests.Session) -> None:
    fake.inject_429("POST", "/v1/customers", retry_after=3)
    limited = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "3"
    assert limited.json()["error"]["code"] == "rate_limit"
    ok = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert ok.status_code == 200 and "Idempotent-Replayed" not in ok.headers


def test_dropped_connections(fake: FakeStripe, http: requests.Session) -> None:
    fake.inject_drop("POST", "/v1/customers")
    with pytest.raises(requests.ConnectionError):
        call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="before")
    assert fake.state()["customers"] == []

    fake.inject_drop("POST", "/v1/customers", after=True)
    with pytest.raises(requests.ConnectionError):
        call(http, fake, "POST", "/v1/customers", {"name": "B"}, key="after")
    created = fake.state()["customers"]
    assert [c["name"] for c in created] == ["B"]
    retry = call(http, fake, "POST", "/v1/customers", {"name": "B"}, key="after")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == created[0]["id"]
    assert [r.status for r in fake.requests] == [0, 0, 200]


def test_faults_match_method_and_path(fake: FakeStripe, http: requests.Session) -> None:
    customer = new_customer(http, fake)
    invoice = new_invoice(http, fake, customer["id"])
    assert add_item(http, fake, customer["id"], invoice["id"], 100).status_code == 200
    fake.inject(Fault.service_unavailable("POST", "/v1/invoices/*/pay"))
    assert call(http, fake, "GET", f"/v1/invoices/{invoice['id']}").status_code == 200
    finalize = call(http, fake, "POST", f"/v1/invoices/{invoice['id']}/finalize")
    assert finalize.status_code == 200
    assert call(http, fake, "POST", f"/v1/invoices/{invoice['id']}/pay").status_code == 503
    assert call(http, fake, "POST", f"/v1/invoices/{invoice['id']}/pay").status_code == 200


def test_control_endpoints(fake: FakeStripe, http: requests.Session) -> None:
    added = http.post(
        f"{fake.url}/_fake/faults",
        json={"preset": "503", "method": "POST", "path": "/v1/customers", "after": True},
    )
    assert added.status_code == 200 and added.json()["faults"][0]["status"] == 503
    assert call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k").status_code == 503
    http.post(f"{fake.url}/_fake/faults", json={"kind": "error", "status": 500, "times": 2})
    http.post(f"{fake.url}/_fake/faults", json={"preset": "429", "retry_after": 2})
    assert len(http.get(f"{fake.url}/_fake/faults").json()["faults"]) == 2
    assert http.post(f"{fake.url}/_fake/faults", json={"preset": "nope"}).status_code == 400
    assert http.post(f"{fake.url}/_fake/faults", json={"colour": "red"}).status_code == 400
    assert http.delete(f"{fake.url}/_fake/faults").json() == {"faults": []}

    state = http.get(f"{fake.url}/_fake/state").json()
    assert [c["name"] for c in state["customers"]] == ["A"]
    assert state["request_log"] == [["POST", "/v1/customers", "k"]]
    assert state["requests_by_path"] == {"POST /v1/customers": 1}
    assert state["requests_by_route"] == {"POST /v1/customers": 1}

    config = http.post(f"{fake.url}/_fake/config", json={"latency": 0.01}).json()
    assert config["latency"] == 0.01
    assert http.post(f"{fake.url}/_fake/config", json={"bogus": 1}).status_code == 400
    assert http.post(f"{fake.url}/_fake/reset").json() == {"ok": True}
    assert http.get(f"{fake.url}/_fake/state").json()["customers"] == []


# ============================================================================================
# Stripe behaviour
# ============================================================================================


def test_auth_is_required(fake: FakeStripe, http: requests.Session) -> None:
    missing = http.get(f"{fake.url}/v1/customers")
    assert missing.status_code == 401
    assert "did not provide an API key" in missing.json()["error"]["message"]
    live = http.get(f"{fake.url}/v1/customers", headers={"Authorization": "Bearer sk_live_x1234"})
    assert live.status_code == 401
    basic = http.get(f"{fake.url}/v1/customers", auth=(KEY, ""))
    assert basic.status_code == 200


def test_unknown_url_and_unknown_parameter(fake: FakeStripe, http: requests.Session) -> None:
    unknown = call(http, fake, "GET", "/v1/charges", check_request=False, check_response=False)
    assert unknown.status_code == 404
    assert "Unrecognized request URL" in unknown.json()["error"]["message"]
    typo = call(
        http,
        fake,
        "POST",
        "/v1/invoices",
        {"customer": "cus_x", "collection_methd": "x"},
        check_request=False,
    )
    assert typo.status_code == 400
    assert typo.json()["error"] == {
        "type": "invalid_request_error",
        "message": "Received unknown parameter: collection_methd",
        "code": "parameter_unknown",
        "doc_url": "https://stripe.com/docs/error-codes/parameter-unknown",
        "param": "collection_methd",
    }
    not_modelled = call(http, fake, "POST", "/v1/invoices", {"customer": "c", "footer": "x"})
    assert not_modelled.status_code == 400
    assert "models only" in not_modelled.json()["error"]["message"]


def test_invoice_rules(fake: FakeStripe, http: requests.Session) -> None:
    customer = new_customer(http, fake)["id"]
    days = call(
        http,
        fake,
        "POST",
        "/v1/invoices",
        {"customer": customer, "collection_method": "charge_automatically", "days_until_due": 30},
    )
    assert days.status_code == 400 and days.json()["error"]["param"] == "days_until_due"
    assert call(http, fake, "POST", "/v1/invoices", {"customer": "cus_nope"}).status_code == 400

    invoice = new_invoice(http, fake, customer)["id"]
    assert call(http, fake, "POST", f"/v1/invoices/{invoice}/void").status_code == 400
    assert add_item(http, fake, customer, invoice, 1000).status_code == 200
    assert add_item(http, fake, customer, invoice, -200).status_code == 200  # a credit line
    too_big = add_item(http, fake, customer, invoice, 100_000_000)
    assert too_big.json()["error"]["code"] == "amount_too_large"
    wrong_currency = call(
        http,
        fake,
        "POST",
        "/v1/invoiceitems",
        {"customer": customer, "invoice": invoice, "amount": 1, "currency": "usd"},
    )
    assert wrong_currency.status_code == 400

    opened = call(http, fake, "POST", f"/v1/invoices/{invoice}/finalize").json()
    assert (opened["status"], opened["amount_due"], opened["due_date"]) == ("open", 800, None)
    assert opened["status_transitions"]["finalized_at"] is not None
    again = call(http, fake, "POST", f"/v1/invoices/{invoice}/finalize")
    assert again.status_code == 400
    assert add_item(http, fake, customer, invoice, 5).status_code == 400
    not_sendable = call(http, fake, "POST", f"/v1/invoices/{invoice}/send")
    assert not_sendable.status_code == 400  # charge_automatically
    voided = call(http, fake, "POST", f"/v1/invoices/{invoice}/void").json()
    assert voided["status"] == "void"
    assert call(http, fake, "POST", f"/v1/invoices/{invoice}/pay").status_code == 400

    empty = new_invoice(http, fake, customer)["id"]
    zero = call(http, fake, "POST", f"/v1/invoices/{empty}/finalize").json()
    assert (zero["status"], zero["paid"], zero["amount_paid"]) == ("paid", True, 0)

    to_send = new_invoice(http, fake, customer, collection_method="send_invoice", days_until_due=7)[
        "id"
    ]
    assert add_item(http, fake, customer, to_send, 990).status_code == 200
    sent = call(http, fake, "POST", f"/v1/invoices/{to_send}/send").json()
    assert sent["status"] == "open" and sent["due_date"] == sent["created"] + 7 * 86400
    assert fake.state()["sent"] == {to_send: 1}


def test_250_items_per_invoice(fake: FakeStripe) -> None:
    with requests.Session() as http:
        customer = new_customer(http, fake)["id"]
        invoice = new_invoice(http, fake, customer)["id"]
        for _ in range(250):
            assert add_item(http, fake, customer, invoice, 1).status_code == 200
        over = add_item(http, fake, customer, invoice, 1)
        assert over.status_code == 400 and "250" in over.json()["error"]["message"]
        full = call(http, fake, "GET", f"/v1/invoices/{invoice}").json()
    assert (full["total"], full["lines"]["total_count"], len(full["lines"]["data"])) == (
        250,
        250,
        10,
    )
    assert full["lines"]["has_more"] is True


def test_pending_items_and_lists(fake: FakeStripe, http: requests.Session) -> None:
    customer = new_customer(http, fake, email="a@x.test")["id"]
    pending = call(
        http,
        fake,
        "POST",
        "/v1/invoiceitems",
        {"customer": customer, "amount": 700, "currency": "eur"},
    ).json()
    assert pending["invoice"] is None
    excluded = new_invoice(http, fake, customer)
    included = new_invoice(http, fake, customer, pending_invoice_items_behavior="include")
    assert (excluded["total"], included["total"]) == (0, 700)

    newest_first = call(http, fake, "GET", "/v1/invoices", {"customer": customer}).json()
    assert [i["id"] for i in newest_first["data"]] == [included["id"], excluded["id"]]
    page = call(http, fake, "GET", "/v1/invoices", {"limit": 1}).json()
    assert page["has_more"] is True and page["url"] == "/v1/invoices"
    rest = call(
        http, fake, "GET", "/v1/invoices", {"limit": 1, "starting_after": page["data"][0]["id"]}
    ).json()
    assert [i["id"] for i in rest["data"]] == [excluded["id"]] and rest["has_more"] is False
    drafts = call(http, fake, "GET", "/v1/invoices", {"status": "open"}).json()
    assert drafts["data"] == []
    by_email = call(http, fake, "GET", "/v1/customers", {"email": "a@x.test"}).json()
    assert [c["id"] for c in by_email["data"]] == [customer]
    expanded = call(
        http, fake, "GET", f"/v1/invoices/{included['id']}", {"expand": ["customer"]}
    ).json()
    assert expanded["customer"]["id"] == customer


def test_search_is_not_read_after_write_when_lagged(http: requests.Session) -> None:
    with FakeStripe(search_lag=0.3) as fake:
        new_customer(http, fake, metadata={"kiki_customer": "C-1"})
        query = {"query": "metadata['kiki_customer']:'C-1'"}
        assert call(http, fake, "GET", "/v1/customers/search", query).json()["data"] == []
        time.sleep(0.35)
        found = call(http, fake, "GET", "/v1/customers/search", query).json()
        assert found["object"] == "search_result" and len(found["data"]) == 1


def test_rate_limit_and_latency(http: requests.Session) -> None:
    with FakeStripe(rate_limit=0.5, burst=3, latency=0.02) as fake:
        started = time.monotonic()
        statuses = [call(http, fake, "GET", "/v1/customers").status_code for _ in range(8)]
        assert time.monotonic() - started >= 8 * 0.02
        assert statuses[:3] == [200] * 3 and statuses.count(429) >= 4
        limited = next(r for r in fake.requests if r.status == 429)
        assert limited.path == "/v1/customers"
        response = call(http, fake, "GET", "/v1/customers")
        assert response.status_code == 429 and "Retry-After" not in response.headers


def test_window_rate_mode_admits_100_in_any_second_without_retry_after(
    http: requests.Session,
) -> None:
    now = time.time()
    with FakeStripe(rate_mode="window", clock=lambda: now) as fake:
        statuses = [call(http, fake, "GET", "/v1/customers").status_code for _ in range(101)]
        assert statuses == [200] * 100 + [429]
        limited = call(http, fake, "GET", "/v1/customers")
        assert limited.json()["error"]["code"] == "rate_limit"
        assert "Retry-After" not in limited.headers
        fake.advance_clock(1.001)
        assert call(http, fake, "GET", "/v1/customers").status_code == 200
        stats = fake.rate_limit_stats()
        assert fake.state()["config"]["rate_limit"] == 100
    assert stats["windows"] == [
        {"limit": 100, "seconds": 1.0, "name": "second", "max_in_window": 100}
    ]
    assert (stats["received"], stats["admitted"], stats["rejected"]) == (103, 101, 2)


def test_keys_expire_after_24_hours_on_the_fakes_clock(
    fake: FakeStripe, http: requests.Session
) -> None:
    first = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    fake.advance_clock(24 * 3600 - 1)
    replayed = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert replayed.headers["Idempotent-Replayed"] == "true"
    fake.advance_clock(1)
    assert fake.state()["idempotency_keys"] == 0
    again = call(http, fake, "POST", "/v1/customers", {"name": "A"}, key="k")
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert fake.state()["objects_created"] == {"customer": 2}


def test_handles_fifty_concurrent_connections() -> None:
    with FakeStripe(latency=0.05) as fake:

        def work(index: int) -> int:
            with requests.Session() as session:
                return call(
                    session, fake, "POST", "/v1/customers", {"name": f"c{index}"}, key=f"k{index}"
                ).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=50) as pool:
            statuses = list(pool.map(work, range(200)))
        elapsed = time.monotonic() - started
    assert statuses == [200] * 200
    assert elapsed < 3.0  # 200 requests x 50 ms over 50 connections: ~0.2 s when concurrent
    assert len(fake.state()["customers"]) == 200


def test_runs_as_a_subprocess() -> None:
    with spawn_fake_stripe("--latency", "0.01", "--rate-limit", "100") as (url, process):
        assert url.startswith("http://127.0.0.1:")
        health = requests.get(f"{url}/_fake/health", timeout=5).json()
        assert health == {"ok": True, "url": url}
        created = requests.post(
            f"{url}/v1/customers",
            data={"name": "A"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=5,
        )
        assert created.status_code == 200
        config = requests.get(f"{url}/_fake/state", timeout=5).json()["config"]
        assert (config["rate_limit"], config["latency"]) == (100.0, 0.01)
    assert process.returncode == 0


def test_runs_as_a_subprocess_in_window_rate_mode() -> None:
    with spawn_fake_stripe("--rate-mode", "window", "--key-lifetime", "60") as (url, process):
        config = requests.get(f"{url}/_fake/config", timeout=5).json()
        assert (config["rate_mode"], config["rate_limit"], config["key_lifetime"]) == (
            "window",
            100,
            60,
        )
        assert config["rate_limits"]["windows"] == [
            {"limit": 100, "seconds": 1.0, "name": "second"}
        ]
        clock = requests.post(f"{url}/_fake/clock", json={"advance": 60}, timeout=5).json()
        assert clock["offset"] == 60
    assert process.returncode == 0


# ============================================================================================
# The OpenAPI validator
# ============================================================================================

VALID_REQUESTS = [
    (
        "POST",
        "/v1/invoices",
        "customer=cus_1&currency=eur&collection_method=send_invoice&days_until_due=30"
        "&auto_advance=false&description=Oct&metadata[kiki_invoice]=INV-1"
        "&pending_invoice_items_behavior=exclude",
    ),
    (
        "POST",
        "/v1/invoiceitems",
        "customer=cus_1&invoice=in_1&amount=12345&currency=eur&description=Fee"
        "&metadata[kiki_line]=1",
    ),
    ("POST", "/v1/invoiceitems", "customer=cus_1&quantity=2&unit_amount_decimal=10.125"),
    ("POST", "/v1/invoices/in_1/finalize", "auto_advance=false&expand[0]=customer"),
    ("POST", "/v1/invoices/in_1/pay", ""),
    ("POST", "/v1/invoices/in_1/void", None),
    ("GET", "/v1/invoices?customer=cus_1&limit=100&starting_after=in_0&status=open", None),
    ("GET", "/v1/customers/search?query=metadata%5B%27k%27%5D%3A%27v%27", None),
    (
        "POST",
        "/v1/invoices",
        "customer=cus_1&custom_fields[0][name]=PO&custom_fields[0][value]=42&metadata=",
    ),
    ("DELETE", "/v1/invoices/in_1", None),
    ("GET", "https://api.stripe.com/v1/invoices/in_1?expand[]=customer", None),
]


@pytest.mark.parametrize(("method", "url", "body"), VALID_REQUESTS)
def test_validator_accepts_conforming_requests(method: str, url: str, body: str | None) -> None:
    validate_stripe_request(method, url, body)


@pytest.mark.parametrize(
    ("method", "url", "body", "expected"),
    [
        (
            "POST",
            "/v1/invoices",
            "customer=cus_1&collection_methd=send_invoice",
            "body collection_methd: unknown parameter",
        ),
        (
            "POST",
            "/v1/invoiceitems",
            "customer=cus_1&amount=abc",
            "body amount: 'abc' is not a valid integer",
        ),
        (
            "POST",
            "/v1/invoiceitems",
            "customer=cus_1&amount=10.5",
            "body amount: '10.5' is not a valid integer",
        ),
        (
            "POST",
            "/v1/invoices",
            "customer=cus_1&collection_method=bogus",
            "body collection_method: 'bogus' is not one of",
        ),
        (
            "POST",
            "/v1/invoices",
            "customer=cus_1&auto_advance=yes",
            "body auto_advance: 'yes' is not a valid boolean",
        ),
        ("POST", "/v1/invoiceitems", "amount=1", "body customer: required parameter is missing"),
        (
            "POST",
            "/v1/invoices",
            "customer=c&automatic_tax[enabled]=true&automatic_tax[x]=1",
            "body automatic_tax[x]: unknown parameter",
        ),
        (
            "POST",
            "/v1/invoices",
            "customer=c&custom_fields[0][name]=a",
            "body custom_fields[0][value]: required parameter is missing",
        ),
        (
            "POST",
            "/v1/invoices",
            "customer=c&metadata[a][b]=1",
            "body metadata[a]: {'b': '1'} is not of type 'string'",
        ),
        ("POST", "/v1/invoiceitems", "customer=c&unit_amount_decimal=1.2.3", "is not a 'decimal'"),
        ("GET", "/v1/invoices?limit=ten&colour=red", None, "query limit: 'ten' is not a valid"),
        ("GET", "/v1/invoices?colour=red", None, "query colour: unknown parameter"),
        ("GET", "/v1/customers/search", None, "query query: required parameter is missing"),
        ("GET", "/v1/invoices/in_1", "expand[]=x", "must not have a body"),
        ("POST", "/v1/invoices", "customer=c&a=1&a[b]=2", "conflicts with an earlier use"),
        ("POST", "/v1/charges", "amount=1", "unknown path"),
        ("PUT", "/v1/invoices", "", "the spec has no PUT for this path"),
    ],
)
def test_validator_rejects(method: str, url: str, body: str | None, expected: str) -> None:
    with pytest.raises(SpecViolation) as caught:
        validate_stripe_request(method, url, body)
    assert expected in str(caught.value)
    assert isinstance(caught.value, AssertionError)


def test_decode_form_bracket_notation() -> None:
    assert decode_form(
        b"a=1&m[k]=v&m[k2]=&l[]=x&l[]=y&i[0]=p&i[1]=q&o[0][n]=a&o[0][v]=b&o[1][n]=c&s=a+b%26"
    ) == {
        "a": "1",
        "m": {"k": "v", "k2": ""},
        "l": ["x", "y"],
        "i": {"0": "p", "1": "q"},
        "o": {"0": {"n": "a", "v": "b"}, "1": {"n": "c"}},
        "s": "a b&",
    }
    assert decode_form("f[][name]=a&f[][value]=b&f[][name]=c") == {
        "f": [{"name": "a", "value": "b"}, {"name": "c"}]
    }
    assert decode_form(encode_form({"m": {"k": "v"}, "e": ["x"], "b": False})) == {
        "m": {"k": "v"},
        "e": {"0": "x"},
        "b": "false",
    }


def test_iter_cassette_requests_reads_vcr_yaml(tmp_path: Path) -> None:
    cassette = tmp_path / "c.yaml"
    cassette.write_text(
        """interactions:
- request:
    body: customer=cus_1&amount=100&currency=eur
    headers: {}
    method: POST
    uri: https://api.stripe.com/v1/invoiceitems
  response:
    body: {string: '{}'}
    headers: {}
    status: {code: 200, message: OK}
- request:
    body: null
    headers: {}
    method: GET
    uri: https://quickbooks.api.intuit.com/v3/company/1/query
  response:
    body: {string: ''}
    headers: {}
    status: {code: 200, message: OK}
- request:
    body: !!binary |
      Y3VzdG9tZXI9Y3VzXzEmY29sbGVjdGlvbl9tZXRoZD14
    headers: {}
    method: POST
    uri: https://api.stripe.com/v1/invoices
  response:
    body: {string: ''}
    headers: {}
    status: {code: 200, message: OK}
version: 1
""",
        encoding="utf-8",
    )
    seen = list(iter_cassette_requests(cassette))
    assert [(m, u) for m, u, _ in seen] == [
        ("POST", "https://api.stripe.com/v1/invoiceitems"),
        ("GET", "https://quickbooks.api.intuit.com/v3/company/1/query"),
        ("POST", "https://api.stripe.com/v1/invoices"),
    ]
    assert seen[2][2] == b"customer=cus_1&collection_methd=x"
    with pytest.raises(SpecViolation, match=r"(?s)c\.yaml, interaction 2: .*collection_methd"):
        validate_cassette(cassette)


def test_block_network_still_blocks_other_hosts() -> None:
    """The module's allowed_hosts opens 127.0.0.1 only."""
    import socket

    with socket.socket() as sock, pytest.raises(RuntimeError, match="Network is disabled"):
        sock.connect(("10.255.255.1", 9))


def _wait_for_requests(fake: FakeStripe, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(fake.requests) < count:
        assert time.monotonic() < deadline, "the fake did not receive the request"
        time.sleep(0.005)
