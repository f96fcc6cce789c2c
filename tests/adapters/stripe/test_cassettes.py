"""The Stripe adapter through the Hub, replayed from recorded Stripe traffic (cassettes/stripe/).

Each test pushes one invoice of the PRODUCT.md worked example through Hub + StripeAdapter +
stripe-python to ``https://api.stripe.com`` and, by default, replays it from its cassette
(``--record-mode=none --block-network``, see pyproject.toml). A test fails if its cassette holds
an interaction it did not play, and every cassette request is checked against Stripe's OpenAPI
spec.

Recording (the cassettes of a test are deleted and recorded again with ``--record-mode=rewrite``;
pytest-recording lifts ``--block-network`` for ``vcr`` tests in any record mode but ``none``)::

    # against the local fake (no key, no network); requests are stored as api.stripe.com
    KIKI_STRIPE_RECORD_AGAINST_FAKE=1 python -m pytest tests/adapters/test_stripe_cassettes.py \
        --record-mode=rewrite
    # against Stripe in test mode
    KIKI_STRIPE_API_KEY=sk_test_... python -m pytest tests/adapters/test_stripe_cassettes.py \
        --record-mode=rewrite

Recorded against the fake, the cassettes are byte-for-byte reproducible: ids come from a seeded
generator, the fake's clock is fixed, request ids are drawn from a generator seeded with the test
name, ``Date`` is the fake's clock and the fake's ``Server`` header is dropped.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import pytest
from kiki_billing_adapters.stripe import (
    API_VERSION,
    StripeAdapter,
    StripeClientSettings,
    StripeSettings,
)

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    Invoice,
    SourceEvidence,
)
from kiki_billing.profit_share import compute_invoice
from tests.conftest import CASSETTES
from tests.support.fake_stripe import FakeResponse, FakeStripe
from tests.support.stripe_spec import (
    find_operation,
    validate_cassette,
    validate_stripe_response,
)

CASSETTE_TOPIC = "stripe"
CASSETTE_DIR = CASSETTES / CASSETTE_TOPIC

STRIPE_API = "https://api.stripe.com"
RECORD_AGAINST_FAKE = "KIKI_STRIPE_RECORD_AGAINST_FAKE"
REPLAY_KEY = "sk_test_kiki_cassette_replay"
"""Never on the wire in replay; Authorization is scrubbed from cassettes anyway."""
FAKE_KEY = "sk_test_kiki_cassette_recording"
FAKE_SEED = 2026
FAKE_NOW = 1769904000  # 2026-02-01T00:00:00Z, the worked example's issue date
FAKE_ORIGIN = re.compile(r"^http://127\.0\.0\.1:\d+")

PERIOD = BillingPeriod.month("2026-01")
SOFTWARE_VERSION = "0.1.0"
"""Pinned: the content hash rides in the draft's metadata, and cassettes match on bodies."""
# Numbers as assign_invoice_numbers() gives them for the worked example's four clients.
NUMBERS = {
    "acme": "KIKI-OaaS-202601-206181",
    "techstartup": "KIKI-OaaS-202601-220735",
    "ecommerce": "KIKI-OaaS-202601-818427",
    "saas": "KIKI-OaaS-202601-170223",
}


# --------------------------------------------------------------------------------------------
# The worked example's invoices
# --------------------------------------------------------------------------------------------


def worked_example_invoice(
    client_id: str,
    name: str,
    email: str,
    campaigns: Sequence[tuple[str, str, str, str, str]],
    **contract: Any,
) -> Invoice:
    """One client's January 2026 invoice, independent of the machine and the software version."""
    terms = Contract(client_id=client_id, name=name, email=email, **contract)
    metrics = [
        CampaignMetrics(
            client_id=client_id,
            campaign_id=campaign_id,
            campaign_name=campaign_name,
            platform=platform,
            spend=spend,
            ltv=ltv,
        )
        for campaign_id, campaign_name, platform, spend, ltv in campaigns
    ]
    computed = compute_invoice(
        terms,
        metrics,
        number=NUMBERS[client_id],
        period=PERIOD,
        sources=(SourceEvidence(kind="metrics_file", location="sample_metrics.csv"),),
        issue_date=date(2026, 2, 1),
    )
    assert isinstance(computed, Invoice)
    proof = computed.proof.model_copy(update={"software_version": SOFTWARE_VERSION})
    return computed.model_copy(update={"proof": proof}).sealed()


def acme() -> Invoice:
    """2,209.00 per campaign; two campaigns capped at 3,000.00 by a -1,418.00 adjustment."""
    return worked_example_invoice(
        "acme",
        "Acme Corp",
        "billing@acme.example",
        [
            ("campaign_001", "Spring retargeting", "Meta Ads", "36000.00", "130090.00"),
            ("campaign_005", "Summer retargeting", "Meta Ads", "36000.00", "130090.00"),
        ],
        fee_cap="3000.00",
    )


def techstartup() -> Invoice:
    """3,213.00."""
    return worked_example_invoice(
        "techstartup",
        "TechStartup Inc",
        "ap@techstartup.example",
        [("campaign_002", "Search brand + generic", "Google Ads", "44000.00", "164130.00")],
    )


def ecommerce() -> Invoice:
    """1,753.00, due 30 days after it is sent."""
    return worked_example_invoice(
        "ecommerce",
        "E-commerce Co",
        "finance@ecommerce.example",
        [("campaign_003", "Creator spark ads", "TikTok Ads", "40000.00", "137530.00")],
    )


def saas() -> Invoice:
    """946.00."""
    return worked_example_invoice(
        "saas",
        "SaaS Platform",
        "billing@saas.example",
        [("campaign_004", "Decision-maker ABM", "LinkedIn Ads", "25000.00", "84460.00")],
    )


# --------------------------------------------------------------------------------------------
# Where the traffic goes: the cassette, the local fake, or Stripe in test mode
# --------------------------------------------------------------------------------------------


class Upstream(NamedTuple):
    kind: Literal["replay", "fake", "stripe"]
    api_base: str
    api_key: str


def _recording_against_fake() -> bool:
    return os.environ.get(RECORD_AGAINST_FAKE) == "1"


class _SeededRequestIds:
    """Gives the fake's random request ids stable replacements, in order of appearance."""

    def __init__(self, seed: str) -> None:
        self.rng = random.Random(seed)
        self.ids: dict[str, str] = {}

    def __call__(self, request_id: str) -> str:
        if request_id not in self.ids:
            alphabet = string.ascii_letters + string.digits
            self.ids[request_id] = "req_" + "".join(self.rng.choices(alphabet, k=14))
        return self.ids[request_id]


def _start_fake(test_name: str) -> FakeStripe:
    fake = FakeStripe(seed=FAKE_SEED, clock=lambda: float(FAKE_NOW))
    handle = fake.app.handle
    stable = _SeededRequestIds(test_name)

    def with_stable_request_ids(
        method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        response = handle(method, target, headers, body)
        for name in ("Request-Id", "Original-Request"):
            if name in response.headers:
                response.headers[name] = stable(response.headers[name])
        return response

    fake.app.handle = with_stable_request_ids  # type: ignore[method-assign]
    return fake.start()


@pytest.fixture(scope="module")
def recording_against(record_mode: str) -> Literal["replay", "fake", "stripe"]:
    """Where this run's traffic goes. Module-scoped so that a run that cannot record fails
    before pytest-recording's rewrite mode deletes the cassettes."""
    if record_mode == "none":
        return "replay"
    if _recording_against_fake():
        return "fake"
    if not os.environ.get("KIKI_STRIPE_API_KEY", "").startswith(("sk_test_", "rk_test_")):
        pytest.fail(
            f"recording needs {RECORD_AGAINST_FAKE}=1 or KIKI_STRIPE_API_KEY set to a "
            "test-mode key (sk_test_/rk_test_; never a live key)"
        )
    return "stripe"


@pytest.fixture
def upstream(
    recording_against: Literal["replay", "fake", "stripe"], request: pytest.FixtureRequest
) -> Iterator[Upstream]:
    if recording_against == "replay":
        yield Upstream("replay", STRIPE_API, REPLAY_KEY)
    elif recording_against == "fake":
        fake = _start_fake(request.node.name)
        try:
            yield Upstream("fake", fake.url, FAKE_KEY)
        finally:
            fake.stop()
    else:
        yield Upstream("stripe", STRIPE_API, os.environ["KIKI_STRIPE_API_KEY"])


def _as_stripe_request(request: Any) -> Any:
    request.uri = FAKE_ORIGIN.sub(STRIPE_API, request.uri)
    return request


def _as_stripe_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() == "server":  # BaseHTTP/0.6 Python/3.x: the fake's, not Stripe's
            del headers[name]
        elif name.lower() == "date":
            headers[name] = [formatdate(FAKE_NOW, usegmt=True)]
    return response


@pytest.fixture
def vcr_config(vcr_config: dict[str, Any]) -> dict[str, Any]:
    """tests/conftest.py's scrubbing, plus, when recording against the fake, its traffic stored
    as api.stripe.com's (https, port 443) with the fake's volatile headers made stable."""
    if not _recording_against_fake():
        return vcr_config
    scrub = vcr_config["before_record_response"]
    return {
        **vcr_config,
        "before_record_request": _as_stripe_request,
        "before_record_response": [scrub, _as_stripe_response],
    }


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def push(
    upstream: Upstream, invoice: Invoice, client: StripeClientSettings, tmp_path: Path
) -> tuple[DeliveryOutcome, StripeAdapter]:
    adapter = StripeAdapter(StripeSettings(api_key=upstream.api_key, api_base=upstream.api_base))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    waits: list[float] = []
    hub = Hub(
        ledger,
        {"stripe": adapter},
        RetryPolicy(max_attempts=3, initial_wait=0.5, max_wait=2.0),
        # Replaying or recording against the fake, nothing needs waiting for.
        sleep=time.sleep if upstream.kind == "stripe" else waits.append,
    )
    try:
        (outcome,) = hub.push(
            [Delivery(invoice=invoice, target="stripe", client=client, account=adapter.account)]
        )
    finally:
        ledger.close()
    return outcome, adapter


def traffic(cassette: Any) -> list[tuple[str, str]]:
    """(method, spec path template) of every interaction in the cassette, in order."""
    return [
        (r.method, find_operation(r.method, urlsplit(r.uri).path)[0].template)
        for r in cassette.requests
    ]


def response_json(cassette: Any, index: int) -> dict[str, Any]:
    body = cassette.responses[index]["body"]["string"]
    return json.loads(body.decode() if isinstance(body, bytes) else body)


def header(message: Mapping[str, Any], name: str) -> str | None:
    for key, value in message.items():
        if key.lower() == name.lower():
            return value[0] if isinstance(value, list) else value
    return None


def assert_pushed(
    cassette: Any,
    upstream: Upstream,
    invoice: Invoice,
    adapter: StripeAdapter,
    client: StripeClientSettings,
    expected: list[tuple[str, str]],
) -> None:
    """The cassette holds ``expected`` traffic, and every POST of the hub carried its step's
    derived Idempotency-Key, in step order, with the pinned Stripe-Version on every request."""
    got = traffic(cassette)
    steps = [s.name for s in adapter.steps(invoice, client)]
    created_customer = ("POST", "/v1/customers") in got and not client.customer
    if upstream.kind == "stripe" and not created_customer and not client.customer:
        # NOTE: re-recorded against Stripe, the customer search may find the customer an
        # earlier recording made; the hub then reuses it instead of creating one.
        expected = [call for call in expected if call != ("POST", "/v1/customers")]
    if not created_customer:
        steps.remove("customer")
    assert got == expected
    keys = {idempotency_key(invoice.number, invoice.revision, "stripe", s): s for s in steps}
    sent = [r.headers.get("Idempotency-Key") for r in cassette.requests if r.method == "POST"]
    assert [keys[k] for k in sent if k in keys] == steps
    assert all(r.headers.get("Stripe-Version") == API_VERSION for r in cassette.requests)
    assert all(
        r.headers.get("Idempotency-Key") is None for r in cassette.requests if r.method != "POST"
    )


def assert_all_played(cassette: Any, record_mode: str) -> None:
    """A replayed test must use every interaction of its cassette."""
    if record_mode == "none":
        assert cassette.all_played, (
            f"{cassette.play_count} of {len(cassette.data)} interactions played"
        )


CUSTOMER = [("GET", "/v1/customers/search"), ("POST", "/v1/customers")]


def new_invoice_routes(lines: int, *then: tuple[str, str]) -> list[tuple[str, str]]:
    """A new client's invoice: customer, draft, an item per line, finalize, then ``then``."""
    items = [("POST", "/v1/invoiceitems")] * lines
    finalize = ("POST", "/v1/invoices/{invoice}/finalize")
    return [*CUSTOMER, ("POST", "/v1/invoices"), *items, finalize, *then]


# --------------------------------------------------------------------------------------------
# The cassettes
# --------------------------------------------------------------------------------------------


@pytest.mark.vcr
def test_push_auto_collection_lets_stripe_collect(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice, client = acme(), StripeClientSettings(collection="auto")
    outcome, adapter = push(upstream, invoice, client, tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert_pushed(
        vcr,
        upstream,
        invoice,
        adapter,
        client,
        new_invoice_routes(3),
    )
    finalized = response_json(vcr, -1)
    assert finalized["id"] == outcome.refs["invoice_id"]
    assert finalized["status"] == outcome.refs["invoice_status"] == "open"
    assert finalized["collection_method"] == "charge_automatically"
    assert finalized["auto_advance"] is True
    assert [line["amount"] for line in finalized["lines"]["data"]] == [220900, 220900, -141800]
    assert finalized["total"] == finalized["amount_due"] == 300000
    assert finalized["metadata"]["kiki_invoice_number"] == invoice.number
    assert finalized["metadata"]["kiki_content_hash"] == invoice.content_hash
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_now_collection_pays_at_once(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    # NOTE: real Stripe pays only with the customer's default payment method, which this
    # customer (and the fake, which does not model payment methods) lacks: recorded against
    # Stripe in test mode, this test records the 4xx from /pay instead (see the README).
    invoice, client = techstartup(), StripeClientSettings(collection="now")
    outcome, adapter = push(upstream, invoice, client, tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert_pushed(
        vcr,
        upstream,
        invoice,
        adapter,
        client,
        new_invoice_routes(1, ("POST", "/v1/invoices/{invoice}/pay")),
    )
    paid = response_json(vcr, -1)
    assert paid["status"] == outcome.refs["invoice_status"] == "paid"
    assert paid["collection_method"] == "charge_automatically"
    assert paid["auto_advance"] is False
    assert [line["amount"] for line in paid["lines"]["data"]] == [321300]
    assert paid["amount_paid"] == 321300 and paid["amount_remaining"] == 0
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_send_invoice_emails_it_due_after_the_terms(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice, client = ecommerce(), StripeClientSettings(collection="send_invoice")
    outcome, adapter = push(upstream, invoice, client, tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert_pushed(
        vcr,
        upstream,
        invoice,
        adapter,
        client,
        new_invoice_routes(1, ("POST", "/v1/invoices/{invoice}/send")),
    )
    draft_request = next(r for r in vcr.requests if r.uri == f"{STRIPE_API}/v1/invoices")
    assert b"days_until_due=30" in draft_request.body
    sent = response_json(vcr, -1)
    assert sent["status"] == outcome.refs["invoice_status"] == "open"
    assert sent["collection_method"] == "send_invoice"
    assert abs(sent["due_date"] - sent["created"] - 30 * 86400) < 86400
    assert sent["amount_due"] == 175300
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_to_a_configured_customer_skips_the_customer_step(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice = saas()
    # The client's existing Stripe customer, made by someone else before the push.
    existing = StripeAdapter(
        StripeSettings(api_key=upstream.api_key, api_base=upstream.api_base)
    ).client.v1.customers.create(
        params={"name": invoice.client_name, "email": invoice.client_email or ""},
        options={"idempotency_key": "kiki-cassette-existing-customer-saas"},
    )
    client = StripeClientSettings(customer=existing.id, collection="send_invoice")
    outcome, adapter = push(upstream, invoice, client, tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["customer_id"] == existing.id
    assert_pushed(
        vcr,
        upstream,
        invoice,
        adapter,
        client,
        [
            ("POST", "/v1/customers"),  # the set-up above, not the hub
            # The customer existed before this delivery: its invoices are listed first, so a
            # lost ledger never bills it twice.
            ("GET", "/v1/invoices"),
            ("POST", "/v1/invoices"),
            ("POST", "/v1/invoiceitems"),
            ("POST", "/v1/invoices/{invoice}/finalize"),
            ("POST", "/v1/invoices/{invoice}/send"),
        ],
    )
    sent = response_json(vcr, -1)
    assert sent["customer"] == existing.id
    assert sent["amount_due"] == 94600
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_to_an_unknown_customer_fails_with_stripes_message(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice = techstartup()
    client = StripeClientSettings(customer="cus_KikiNoSuchCustomer", collection="auto")
    outcome, _ = push(upstream, invoice, client, tmp_path)

    # The look-up by natural key, then the draft; a 400 is not retried.
    assert traffic(vcr) == [("GET", "/v1/invoices"), ("POST", "/v1/invoices")]
    assert vcr.responses[1]["status"]["code"] == 400
    error = response_json(vcr, 1)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "resource_missing" and error["param"] == "customer"
    request_id = header(vcr.responses[1]["headers"], "Request-Id")
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error == (
        f"draft: {error['message']} (HTTP 400, code resource_missing, request {request_id})"
    )
    assert error["message"] == "No such customer: 'cus_KikiNoSuchCustomer'"
    assert_all_played(vcr, record_mode)


# --------------------------------------------------------------------------------------------
# The cassette files themselves
# --------------------------------------------------------------------------------------------


def _cassettes() -> list[Path]:
    return sorted(CASSETTE_DIR.glob("*.yaml"))


def _cassette_tests() -> set[str]:
    return {
        name
        for name, value in globals().items()
        if name.startswith("test_")
        and any(mark.name == "vcr" for mark in getattr(value, "pytestmark", []))
    }


def test_every_stripe_cassette_request_conforms_to_the_spec() -> None:
    paths = _cassettes()
    assert {p.stem for p in paths} == _cassette_tests(), "a cassette without its test, or not"
    for path in paths:
        assert validate_cassette(path) > 0, f"{path.name}: no request to api.stripe.com"


def test_stripe_cassettes_look_like_stripe_and_hold_no_secrets() -> None:
    from vcr.serialize import deserialize
    from vcr.serializers import yamlserializer

    for path in _cassettes():
        text = path.read_text(encoding="utf-8")
        for secret in ("sk_test_", "sk_live_", "rk_test_", "rk_live_", "Bearer "):
            assert secret not in text, f"{path.name} holds {secret!r}"
        requests, responses = deserialize(text, yamlserializer)
        assert requests, path.name
        for request, response in zip(requests, responses, strict=True):
            where = f"{path.name}: {request.method} {request.uri}"
            assert request.uri.startswith(f"{STRIPE_API}/v1/"), where
            for scrubbed in ("Authorization", "User-Agent", "X-Stripe-Client-User-Agent"):
                assert scrubbed not in request.headers, where
            assert request.headers.get("Stripe-Version") == API_VERSION, where
            assert (request.headers.get("Idempotency-Key") is not None) is (
                request.method == "POST"
            ), where
            headers = response["headers"]
            assert (header(headers, "Request-Id") or "").startswith("req_"), where
            assert header(headers, "Stripe-Version") == API_VERSION, where
            assert "BaseHTTP" not in (header(headers, "Server") or ""), where
            body = response["body"]["string"]
            validate_stripe_response(request.method, request.uri, response["status"]["code"], body)
