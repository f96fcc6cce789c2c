"""The Zuora adapter through the Hub, replayed from recorded SOAP traffic (cassettes/zuora/).

Each test pushes invoices of the PRODUCT.md worked example through Hub + ZuoraAdapter + zeep to
``https://apisandbox.zuora.com/apps/services/a/78.0`` and, by default, replays them from its
cassette (``--record-mode=none --block-network``). A test fails if its cassette holds an
interaction it did not play, and every recorded request and answer is checked against the
schemas of the 78.0 and the 82.0 WSDL.

Secrets never reach a cassette: the user name, the password and every session id are replaced
by ``***`` in request and answer bodies (``before_record_request`` scrubs the live requests of a
replay the same way, so bodies still match).

Recording (the cassettes of the tests that run are deleted and recorded again)::

    # against the local fake (no credentials, no network); stored as apisandbox.zuora.com
    KIKI_ZUORA_RECORD_AGAINST_FAKE=1 python -m pytest tests/adapters/zuora/test_cassettes.py \
        --record-mode=rewrite
    # against a Zuora sandbox tenant (a one-time flat-fee charge in its catalogue)
    KIKI_ZUORA_USERNAME=... KIKI_ZUORA_PASSWORD=... KIKI_ZUORA_TEST_RATE_PLAN_ID=... \
        KIKI_ZUORA_TEST_CHARGE_ID=... python -m pytest tests/adapters/zuora/test_cassettes.py \
        --record-mode=rewrite

Recorded against the fake, cassettes are byte-for-byte reproducible: seeded ids, the fake's
clock fixed, request ids drawn from a generator seeded with the test's name, ``Date`` from the
fake's clock and its ``Server`` header dropped. A real tenant cannot be made to answer a transient
fault, so that test records against the fake only; a lost answer and an expired session are
provoked from the client side, which works against both.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytest
import requests
from kiki_billing_adapters.zuora import ZuoraAdapter, ZuoraClientSettings, ZuoraSettings
from lxml import etree
from requests.adapters import HTTPAdapter

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, Invoice, SourceEvidence
from kiki_billing.profit_share import compute_invoice
from tests.conftest import CASSETTES
from tests.support.fake_provider import FakeResponse
from tests.support.fake_zuora import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
    FakeZuora,
)
from tests.support.zuora_wsdl import API_NS, OBJECT_NS, SOAP_ENV, WSDL_78, WSDLS, schema_for

CASSETTE_TOPIC = "zuora"
CASSETTE_DIR = CASSETTES / CASSETTE_TOPIC

ZUORA_HOST = "https://apisandbox.zuora.com"
ZUORA_ENDPOINT = f"{ZUORA_HOST}/apps/services/a/78.0"
RECORD_AGAINST_FAKE = "KIKI_ZUORA_RECORD_AGAINST_FAKE"
REPLAY_USERNAME = "kiki-cassette-replay@example.com"
REPLAY_PASSWORD = "kiki-cassette-replay"
"""Never on the wire in replay: login bodies are scrubbed before they are matched."""
SCRUBBED = "***"
FAKE_SEED = 2026
FAKE_NOW = 1769904000  # 2026-02-01T00:00:00Z, the worked example's issue date
FAKE_ORIGIN = re.compile(r"http://127\.0\.0\.1:\d+")
SECRET_ELEMENTS = re.compile(rb"(<(?:[\w-]+:)?(?:username|password|session|Session)>)[^<]*(</)")
"""Credentials in a login request, the session in every SessionHeader and login answer."""
PERIOD = BillingPeriod.month("2026-01")
# These tests only ever record into an empty tenant; their numbers are their own.
NUMBERS = {
    "acme": "KIKI-OaaS-202601-306181",
    "techstartup": "KIKI-OaaS-202601-320735",
    "ecommerce": "KIKI-OaaS-202601-318427",
    "saas": "KIKI-OaaS-202601-370223",
    "shop": "KIKI-OaaS-202601-388001",
    "agency": "KIKI-OaaS-202601-391002",
}
FAKE_ONLY = {"test_a_transient_fault_is_retried_then_succeeds"}
"""Tests that need the fake to answer a fault no real tenant can be made to send."""


# --------------------------------------------------------------------------------------------
# The worked example's invoices
# --------------------------------------------------------------------------------------------


def worked_example_invoice(
    client_id: str, name: str, campaigns: Sequence[tuple[str, str, str]], **contract: Any
) -> Invoice:
    terms = Contract(
        client_id=client_id, name=name, email=f"billing@{client_id}.example", **contract
    )
    metrics = [
        CampaignMetrics(client_id=client_id, campaign_id=campaign, spend=spend, ltv=ltv)
        for campaign, spend, ltv in campaigns
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
    return computed.sealed()


def acme() -> Invoice:
    """2,209.00 per campaign; two campaigns capped at 3,000.00 by a -1,418.00 adjustment."""
    return worked_example_invoice(
        "acme",
        "Acme Corp",
        [("campaign_001", "36000.00", "130090.00"), ("campaign_005", "36000.00", "130090.00")],
        fee_cap="3000.00",
    )


def single(client_id: str, name: str, spend: str, ltv: str, **contract: Any) -> Invoice:
    return worked_example_invoice(client_id, name, [("campaign_002", spend, ltv)], **contract)


# --------------------------------------------------------------------------------------------
# Where the traffic goes
# --------------------------------------------------------------------------------------------


class Upstream(NamedTuple):
    kind: Literal["replay", "fake", "zuora"]
    endpoint: str
    username: str
    password: str
    fake: FakeZuora | None

    @property
    def client(self) -> ZuoraClientSettings:
        return ZuoraClientSettings(
            product_rate_plan_id=os.environ.get("KIKI_ZUORA_TEST_RATE_PLAN_ID", ONE_TIME_RATE_PLAN),
            product_rate_plan_charge_id=os.environ.get(
                "KIKI_ZUORA_TEST_CHARGE_ID", ONE_TIME_CHARGE
            ),
        )


def _recording_against_fake() -> bool:
    return os.environ.get(RECORD_AGAINST_FAKE) == "1"


@pytest.fixture(scope="module")
def recording_against(record_mode: str) -> Literal["replay", "fake", "zuora"]:
    """Where this run's traffic goes; fails before rewrite mode deletes any cassette."""
    if record_mode == "none":
        return "replay"
    if _recording_against_fake():
        return "fake"
    if not (os.environ.get("KIKI_ZUORA_USERNAME") and os.environ.get("KIKI_ZUORA_PASSWORD")):
        pytest.fail(
            f"recording needs {RECORD_AGAINST_FAKE}=1, or KIKI_ZUORA_USERNAME and "
            "KIKI_ZUORA_PASSWORD of a sandbox tenant"
        )
    return "zuora"


class _SeededRequestIds:
    """Stable replacements for the fake's random request ids, in order of appearance."""

    def __init__(self, seed: str) -> None:
        self.rng = random.Random(seed)
        self.ids: dict[str, str] = {}

    def __call__(self, request_id: str) -> str:
        if request_id not in self.ids:
            hexes = "".join(self.rng.choices("0123456789abcdef", k=32))
            self.ids[request_id] = "-".join(
                (hexes[:8], hexes[8:12], hexes[12:16], hexes[16:20], hexes[20:])
            )
        return self.ids[request_id]


def _start_fake(test_name: str) -> FakeZuora:
    fake = FakeZuora(seed=FAKE_SEED, wsdl=WSDL_78, clock=lambda: float(FAKE_NOW))
    fake.configure(users={DEFAULT_USERNAME: DEFAULT_PASSWORD})
    handle = fake.app.handle
    stable = _SeededRequestIds(test_name)

    def with_stable_request_ids(
        method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        response = handle(method, target, headers, body)
        if "Zuora-Request-Id" in response.headers:
            response.headers["Zuora-Request-Id"] = stable(response.headers["Zuora-Request-Id"])
        return response

    fake.app.handle = with_stable_request_ids  # type: ignore[method-assign]
    return fake.start()


@pytest.fixture
def upstream(
    recording_against: Literal["replay", "fake", "zuora"], request: pytest.FixtureRequest
) -> Iterator[Upstream]:
    if recording_against == "replay":
        yield Upstream("replay", ZUORA_ENDPOINT, REPLAY_USERNAME, REPLAY_PASSWORD, None)
    elif recording_against == "fake":
        fake = _start_fake(request.node.name)
        try:
            yield Upstream("fake", fake.endpoint, DEFAULT_USERNAME, DEFAULT_PASSWORD, fake)
        finally:
            fake.stop()
        assert fake.app.rejected == []
    else:
        yield Upstream(
            "zuora",
            os.environ.get("KIKI_ZUORA_API_BASE", ZUORA_ENDPOINT),
            os.environ["KIKI_ZUORA_USERNAME"],
            os.environ["KIKI_ZUORA_PASSWORD"],
            None,
        )


def _scrub_body(body: Any) -> Any:
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not body:
        return body
    return SECRET_ELEMENTS.sub(rb"\g<1>" + SCRUBBED.encode() + rb"\g<2>", body)


def _scrub_request(request: Any) -> Any:
    request.body = _scrub_body(request.body)
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    body = response.get("body", {})
    body["string"] = _scrub_body(body.get("string"))
    return response


def _as_zuora_request(request: Any) -> Any:
    request.uri = FAKE_ORIGIN.sub(ZUORA_HOST, request.uri)
    return request


def _as_zuora_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() == "server":  # BaseHTTP/0.6 Python/3.x: the fake's, not Zuora's
            del headers[name]
        elif name.lower() == "date":
            headers[name] = [formatdate(FAKE_NOW, usegmt=True)]
    body = response.get("body", {})
    text = body.get("string")
    if text:
        body["string"] = FAKE_ORIGIN.sub(ZUORA_HOST, text.decode("utf-8")).encode("utf-8")
    return response


@pytest.fixture
def vcr_config(
    vcr_config: dict[str, Any],
    recording_against: Literal["replay", "fake", "zuora"],
    request: pytest.FixtureRequest,
) -> dict[str, Any]:
    """tests/conftest.py's scrubbing plus credentials and sessions out of every body; when
    recording against the fake, its traffic stored as apisandbox.zuora.com's."""
    if recording_against == "zuora" and request.node.name in FAKE_ONLY:
        pytest.skip("a real tenant cannot be made to answer this fault; record it against the fake")
    before_response = [vcr_config["before_record_response"], _scrub_response]
    before_request: list[Any] = [_scrub_request]
    if recording_against == "fake":
        before_request.append(_as_zuora_request)
        before_response.append(_as_zuora_response)
    return {
        **vcr_config,
        "before_record_request": before_request,
        "before_record_response": before_response,
    }


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Pushes:
    """A Zuora adapter aimed at the upstream, and pushes of it through the hub."""

    def __init__(self, upstream: Upstream, tmp_path: Path, **settings: Any) -> None:
        self.upstream = upstream
        self.tmp_path = tmp_path
        self.adapter = ZuoraAdapter(
            ZuoraSettings(
                username=upstream.username,
                password=settings.pop("password", upstream.password),
                api_base=upstream.endpoint,
                wsdl=str(WSDL_78),
            )
        )
        self.waits: list[float] = []

    def push(self, *invoices: Invoice, ledger: str = "ledger") -> list[DeliveryOutcome]:
        store = Ledger(f"sqlite:///{self.tmp_path / (ledger + '.sqlite3')}")
        hub = Hub(
            store,
            {"zuora": self.adapter},
            RetryPolicy(max_attempts=3, initial_wait=0.5, max_wait=2.0),
            # Replaying or recording against the fake, nothing needs waiting for.
            sleep=time.sleep if self.upstream.kind == "zuora" else self.waits.append,
        )
        client = self.upstream.client
        try:
            return hub.push(
                [Delivery(inv, "zuora", client, self.adapter.account) for inv in invoices]
            )
        finally:
            store.close()

    def close(self) -> None:
        self.adapter.close()


@pytest.fixture
def pushes(upstream: Upstream, tmp_path: Path) -> Iterator[Pushes]:
    made = Pushes(upstream, tmp_path)
    yield made
    made.close()


def operations(cassette: Any) -> list[str]:
    """The SOAP operation (and ZOQL object of a query) of every interaction, in order."""
    found = []
    for request in cassette.requests:
        body = etree.fromstring(request.body)
        payload = body.find(f"{{{SOAP_ENV}}}Body")[0]
        name = etree.QName(payload).localname
        if name == "query":
            zoql = payload.findtext(f"{{{API_NS}}}queryString") or ""
            name += " " + zoql.split(" from ")[1].split()[0]
        found.append(name)
    return found


def answer(cassette: Any, index: int) -> Any:
    """The body's element of an interaction's answer."""
    body = cassette.responses[index]["body"]["string"]
    return etree.fromstring(body).find(f"{{{SOAP_ENV}}}Body")[0]


def field(element: Any, name: str) -> str | None:
    for ns in (API_NS, OBJECT_NS):
        found = element.find(f".//{{{ns}}}{name}")
        if found is not None:
            return str(found.text)
    return None


def assert_all_played(cassette: Any, record_mode: str) -> None:
    if record_mode == "none":
        assert cassette.all_played, f"{cassette.play_count} of {len(cassette.data)} played"


NEW_ACCOUNT = ["login", "query Account", "create", "create", "update"]


# --------------------------------------------------------------------------------------------
# The cassettes
# --------------------------------------------------------------------------------------------


@pytest.mark.vcr
def test_push_logs_in_and_subscribes_with_the_invoice(
    pushes: Pushes, vcr: Any, record_mode: str
) -> None:
    invoice = acme()
    [outcome] = pushes.push(invoice)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert operations(vcr) == [*NEW_ACCOUNT, "subscribe", "query Invoice"]
    login = answer(vcr, 0)
    assert field(login, "Session") == SCRUBBED
    assert field(login, "ServerUrl") == ZUORA_ENDPOINT
    subscribed = answer(vcr, 5)
    assert field(subscribed, "Success") == "true"
    assert field(subscribed, "SubscriptionId") == outcome.refs["subscription_id"]
    assert field(subscribed, "SubscriptionNumber") == outcome.refs["subscription_name"]
    assert field(subscribed, "InvoiceId") == outcome.refs["invoice_id"]
    assert field(subscribed, "InvoiceNumber") == outcome.refs["invoice_number"]
    sent = etree.fromstring(vcr.requests[5].body)
    prices = [price.text for price in sent.iter(f"{{{OBJECT_NS}}}Price")]
    assert prices == ["2209.00", "2209.00", "-1418.00"]
    verified = answer(vcr, 6)
    assert field(verified, "Amount") in ("3000.00", "3000")
    assert outcome.refs["invoice_amount"] in ("3000.00", "3000")
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_a_lost_subscribe_answer_is_found_by_query_after_duplicate_value(
    pushes: Pushes, vcr: Any, record_mode: str
) -> None:
    """The first subscribe's answer is lost on the way back; the retry sends the same
    subscription name, Zuora refuses it as a duplicate, and query() finds what exists."""
    lose_first_subscribe_answer(pushes.adapter)
    invoice = single("techstartup", "TechStartup Inc", "44000.00", "164130.00")
    [outcome] = pushes.push(invoice)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert operations(vcr) == [
        *NEW_ACCOUNT,
        "subscribe",  # made, but its answer never reached us
        "subscribe",  # the same envelope again
        "query Subscription",
        "query InvoiceItem",
        "query Invoice",
    ]
    assert vcr.requests[5].body == vcr.requests[6].body
    refused = answer(vcr, 6)
    assert field(refused, "Success") == "false"
    assert field(refused, "Code") == "DUPLICATE_VALUE"
    made = answer(vcr, 5)
    assert field(made, "SubscriptionId") == outcome.refs["subscription_id"]
    assert field(made, "InvoiceId") == outcome.refs["invoice_id"]
    assert outcome.refs["invoice_amount"] in ("3213.00", "3213")
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_a_replay_with_a_lost_ledger_finds_everything_by_query(
    pushes: Pushes, vcr: Any, record_mode: str
) -> None:
    invoice = single("ecommerce", "E-commerce Co", "40000.00", "137530.00")
    [first] = pushes.push(invoice, ledger="first")
    [second] = pushes.push(invoice, ledger="lost-and-replaced")

    assert first.state is second.state is DeliveryState.DELIVERED, (first.error, second.error)
    assert operations(vcr) == [
        *NEW_ACCOUNT,
        "subscribe",
        "query Invoice",
        # the replay, on a new ledger: found, not made again
        "query Account",
        "query Subscription",
        "query InvoiceItem",
        "query Invoice",
    ]
    for name in ("account_id", "subscription_id", "invoice_id", "invoice_number"):
        assert first.refs[name] == second.refs[name], name
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_an_expired_session_is_refused_then_the_adapter_logs_in_again(
    pushes: Pushes, upstream: Upstream, vcr: Any, record_mode: str
) -> None:
    [first] = pushes.push(single("saas", "SaaS Platform", "25000.00", "84460.00"))
    expire_session(pushes.adapter, upstream)
    [second] = pushes.push(single("shop", "Shop Ltd", "20000.00", "70000.00"))

    assert first.state is second.state is DeliveryState.DELIVERED, (first.error, second.error)
    ops = operations(vcr)
    assert ops == [
        *NEW_ACCOUNT,
        "subscribe",
        "query Invoice",
        "query Account",  # INVALID_SESSION
        "login",
        "query Account",
        "create",
        "create",
        "update",
        "subscribe",
        "query Invoice",
    ]
    refused = answer(vcr, 7)
    assert refused.tag == f"{{{SOAP_ENV}}}Fault"
    assert refused.findtext("faultcode") == "fns:INVALID_SESSION"
    assert vcr.responses[7]["status"]["code"] == 500
    assert vcr.requests[7].body == vcr.requests[9].body  # the same call, after the login
    assert pushes.adapter.logins == 2
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_a_transient_fault_is_retried_then_succeeds(
    pushes: Pushes, upstream: Upstream, vcr: Any, record_mode: str
) -> None:
    if upstream.fake is not None:
        upstream.fake.inject_soap_fault("subscribe", "LOCK_COMPETITION")
    [outcome] = pushes.push(single("agency", "Agency GmbH", "30000.00", "110000.00"))

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert operations(vcr) == [*NEW_ACCOUNT, "subscribe", "subscribe", "query Invoice"]
    fault = answer(vcr, 5)
    assert fault.findtext("faultcode") == "fns:LOCK_COMPETITION"
    assert vcr.responses[5]["status"]["code"] == 500
    assert vcr.requests[5].body == vcr.requests[6].body
    assert field(answer(vcr, 6), "Success") == "true"
    assert pushes.waits  # the hub waited before the retry
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_a_refused_login_fails_the_delivery_with_zuoras_message(
    upstream: Upstream, tmp_path: Path, vcr: Any, record_mode: str
) -> None:
    pushes = Pushes(upstream, tmp_path, password="kiki-wrong-password")
    try:
        [outcome] = pushes.push(acme())
    finally:
        pushes.close()

    assert operations(vcr) == ["login"]
    assert outcome.state is DeliveryState.FAILED
    fault = answer(vcr, 0)
    message = fault.findtext("faultstring")
    assert outcome.error == (
        f"account: Zuora refused the login of KIKI_ZUORA_USERNAME: {message} (HTTP 500, code "
        f"{fault.findtext('faultcode').split(':')[1]}, request "
        f"{vcr.responses[0]['headers']['Zuora-Request-Id'][0]})"
    )
    assert_all_played(vcr, record_mode)


# --------------------------------------------------------------------------------------------
# Client-side provocations (they work against the fake and a real tenant alike)
# --------------------------------------------------------------------------------------------


class _LoseFirstAnswer(HTTPAdapter):
    """Receives the first subscribe's answer (the cassette records it), then drops it."""

    lost = False

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        response = super().send(request, *args, **kwargs)
        body = request.body if isinstance(request.body, bytes) else b""
        if not self.lost and b":subscribe>" in body:
            self.lost = True
            response.close()
            raise requests.ConnectionError("connection reset by peer (answer lost)")
        return response


def lose_first_subscribe_answer(adapter: ZuoraAdapter) -> None:
    session = adapter.transport.session
    lossy = _LoseFirstAnswer()
    session.mount("https://", lossy)
    session.mount("http://", lossy)


def expire_session(adapter: ZuoraAdapter, upstream: Upstream) -> None:
    """End the adapter's session upstream without the adapter knowing."""
    if upstream.fake is not None:
        upstream.fake.advance_clock(upstream.fake.app.session_lifetime)
    elif upstream.kind == "zuora":
        # A real tenant cannot be told to end a session; one it never issued is as dead.
        session = adapter._session
        assert session is not None
        adapter._session = dataclasses.replace(session, id="kiki-expired-session")


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


def _interactions(path: Path) -> list[tuple[Any, dict[str, Any]]]:
    from vcr.serialize import deserialize
    from vcr.serializers import yamlserializer

    requests_, responses = deserialize(path.read_text(encoding="utf-8"), yamlserializer)
    return list(zip(requests_, responses, strict=True))


@pytest.mark.parametrize("wsdl", WSDLS, ids=["78.0", "82.0"])
def test_every_cassette_request_and_answer_conforms_to_the_wsdl(wsdl: Path) -> None:
    paths = _cassettes()
    assert {p.stem for p in paths} == _cassette_tests(), "a cassette without its test, or not"
    schema = schema_for(wsdl)
    for path in paths:
        for request, response in _interactions(path):
            where = f"{path.name}: {request.method} {request.uri}"
            schema.check_envelope(request.body)
            schema.check_envelope(response["body"]["string"], response=True)
            assert request.method == "POST", where


def test_cassettes_look_like_zuora_and_hold_no_secrets() -> None:
    for path in _cassettes():
        text = path.read_text(encoding="utf-8")
        for secret in (DEFAULT_PASSWORD, DEFAULT_USERNAME, REPLAY_PASSWORD, "127.0.0.1"):
            assert secret not in text, f"{path.name} holds {secret!r}"
        for request, response in _interactions(path):
            where = f"{path.name}: {request.uri}"
            assert request.uri == ZUORA_ENDPOINT, where
            for scrubbed in ("Authorization", "User-Agent", "Cookie"):
                assert scrubbed not in request.headers, where
            assert request.headers.get("SOAPAction") == '""', where
            assert request.headers.get("Content-Type") == "text/xml; charset=utf-8", where
            for body in (request.body, response["body"]["string"]):
                for element in etree.fromstring(body).iter():
                    if etree.QName(element).localname in (
                        "username",
                        "password",
                        "session",
                        "Session",
                    ):
                        assert element.text == SCRUBBED, where
            headers = {k.lower(): v for k, v in response["headers"].items()}
            assert re.fullmatch(r"[0-9a-f-]{36}", headers["zuora-request-id"][0]), where
            assert "server" not in headers or "BaseHTTP" not in headers["server"][0], where
            assert headers["content-type"][0].startswith("text/xml"), where
