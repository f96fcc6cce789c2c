"""The QuickBooks adapter through the hub, replayed from recorded traffic (cassettes/quickbooks/).

Each test pushes a worked-example invoice through Hub + QuickBooksAdapter + python-quickbooks and
intuit-oauth to ``https://sandbox-quickbooks.api.intuit.com`` and
``https://oauth.platform.intuit.com``, and by default replays it from its cassette
(``--record-mode=none --block-network``). A test fails if its cassette holds an interaction it
did not play; every recorded request and answer is checked against Intuit's XSD, and no token,
client secret or host detail is stored.

Recording (pytest-recording deletes a test's cassette and records it again)::

    # against the local fake (no credentials, no network); stored as Intuit's hosts
    KIKI_QUICKBOOKS_RECORD_AGAINST_FAKE=1 python -m pytest \\
        tests/adapters/quickbooks/test_cassettes.py --record-mode=rewrite
    # against a QuickBooks sandbox company (its realm is rewritten to the cassettes' one)
    KIKI_QUICKBOOKS_CLIENT_ID=... KIKI_QUICKBOOKS_CLIENT_SECRET=... \\
    KIKI_QUICKBOOKS_REFRESH_TOKEN=... KIKI_QUICKBOOKS_REALM_ID=... python -m pytest \\
        tests/adapters/quickbooks/test_cassettes.py --record-mode=rewrite

Tokens are replaced by placeholders in request bodies (also when matching a replayed request)
and in the token endpoint's answers; ``Authorization`` and ``User-Agent`` are never stored.
Recorded against the fake, the cassettes are reproducible byte for byte: its ids, tokens and
``intuit_tid`` come from a seeded generator, its clock is fixed, ``Date`` is that clock.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from decimal import Decimal
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest
from kiki_billing_adapters.quickbooks import (
    TOKEN_URL,
    QuickBooksAdapter,
    QuickBooksClientSettings,
    QuickBooksSettings,
)
from kiki_billing_adapters.quickbooks.oauth import ACCESS_TOKEN, EXPIRES_AT, REFRESH_TOKEN, SEED

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.plugin import MemoryCredentialStore
from tests.adapters.stripe.test_cassettes import acme, ecommerce, saas, techstartup
from tests.conftest import CASSETTES
from tests.support.fake_provider import RateLimits
from tests.support.fake_quickbooks import _QUERY, CLIENT_ID, CLIENT_SECRET, FakeQuickBooks
from tests.support.quickbooks_schema import quickbooks_schema

CASSETTE_TOPIC = "quickbooks"
CASSETTE_DIR = CASSETTES / CASSETTE_TOPIC

API_HOST = "https://sandbox-quickbooks.api.intuit.com"
OAUTH_HOST = "https://oauth.platform.intuit.com"
REALM = "9341453172471531"
"""The cassettes' company; a sandbox recording's realm is rewritten to it."""
RECORD_AGAINST_FAKE = "KIKI_QUICKBOOKS_RECORD_AGAINST_FAKE"
FAKE_NOW = 1769904000.0  # 2026-02-01T00:00:00Z, the worked example's issue date
FAKE_SEED = 2026
FAKE_ORIGIN = re.compile(r"^http://127\.0\.0\.1:\d+")
SCRUBBED_REFRESH = "scrubbed-refresh"
SCRUBBED_ACCESS = "scrubbed-access"
REPLAY_CLIENT = ("replay-client-id", "replay-client-secret")
API = f"/v3/company/{REALM}"


class Upstream(NamedTuple):
    kind: Literal["replay", "fake", "sandbox"]
    settings: QuickBooksSettings
    fake: FakeQuickBooks | None = None


def _recording_against_fake() -> bool:
    return os.environ.get(RECORD_AGAINST_FAKE) == "1"


@pytest.fixture(scope="module")
def recording_against(record_mode: str) -> Literal["replay", "fake", "sandbox"]:
    """Where this run's traffic goes (module-scoped: a run that cannot record fails before
    pytest-recording's rewrite mode deletes the cassettes)."""
    if record_mode == "none":
        return "replay"
    if _recording_against_fake():
        return "fake"
    needed = ("CLIENT_ID", "CLIENT_SECRET", "REFRESH_TOKEN", "REALM_ID")
    if not all(os.environ.get(f"KIKI_QUICKBOOKS_{name}") for name in needed):
        pytest.fail(
            f"recording needs {RECORD_AGAINST_FAKE}=1, or KIKI_QUICKBOOKS_CLIENT_ID, _SECRET, "
            "_REFRESH_TOKEN and _REALM_ID of a sandbox company"
        )
    return "sandbox"


@pytest.fixture
def upstream(recording_against: Literal["replay", "fake", "sandbox"]) -> Iterator[Upstream]:
    if recording_against == "replay":
        yield Upstream(
            "replay",
            QuickBooksSettings(
                client_id=REPLAY_CLIENT[0],
                client_secret=REPLAY_CLIENT[1],
                refresh_token=SCRUBBED_REFRESH,
                realm_id=REALM,
                environment="sandbox",
            ),
        )
    elif recording_against == "fake":
        fake = FakeQuickBooks(
            seed=FAKE_SEED, realm=REALM, clock=lambda: FAKE_NOW, rate_limits=RateLimits()
        ).start()
        try:
            settings = QuickBooksSettings(
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                refresh_token=fake.app.issue_refresh_token(),
                realm_id=REALM,
                environment="sandbox",
                api_base=fake.api_base,
                token_url=fake.token_url,
            )
            yield Upstream("fake", settings, fake)
        finally:
            fake.stop()
    else:
        yield Upstream(
            "sandbox",
            QuickBooksSettings(environment="sandbox"),  # type: ignore[call-arg]
        )


def _as_intuit_request(request: Any) -> Any:
    """The fake's origin as Intuit's hosts; any company as the cassettes' one."""
    parts = urlsplit(request.uri)
    origin = OAUTH_HOST if parts.path.startswith("/oauth2/") else API_HOST
    request.uri = FAKE_ORIGIN.sub(origin, request.uri)
    request.uri = re.sub(r"/v3/company/\d+/", f"/v3/company/{REALM}/", request.uri)
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() == "server":  # BaseHTTP/0.6 Python/3.x: the fake's, not Intuit's
            del headers[name]
        elif name.lower() == "date" and _recording_against_fake():
            headers[name] = [formatdate(FAKE_NOW, usegmt=True)]
    body = response.get("body", {}).get("string")
    if body:
        text = body.decode() if isinstance(body, bytes) else body
        if '"access_token"' in text or '"refresh_token"' in text:
            tokens = json.loads(text)
            tokens["access_token"] = SCRUBBED_ACCESS
            tokens["refresh_token"] = SCRUBBED_REFRESH
            tokens.pop("id_token", None)
            response["body"]["string"] = json.dumps(tokens).encode()
            for name in headers:
                if name.lower() == "content-length":
                    headers[name] = [str(len(response["body"]["string"]))]
    return response


@pytest.fixture(scope="module")
def vcr_config(vcr_config: dict[str, Any]) -> dict[str, Any]:
    """tests/conftest.py's scrubbing, plus: Intuit's hosts and the cassettes' realm, and the
    tokens of the OAuth exchanges (in request bodies, also when matching, and in answers)."""
    scrub = vcr_config["before_record_response"]
    return {
        **vcr_config,
        "before_record_request": _as_intuit_request,
        "before_record_response": [scrub, _scrub_response],
        "filter_post_data_parameters": [
            ("refresh_token", SCRUBBED_REFRESH),
            ("code", "scrubbed-code"),
            ("client_secret", None),
        ],
    }


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def adapter_for(upstream: Upstream, **credentials: str) -> QuickBooksAdapter:
    adapter = QuickBooksAdapter(upstream.settings)
    adapter.credentials = MemoryCredentialStore(credentials or None)
    return adapter


def push(
    adapter: QuickBooksAdapter,
    invoice: Invoice,
    client: QuickBooksClientSettings,
    tmp_path: Path,
    ledger: str = "ledger",
) -> tuple[DeliveryOutcome, list[float]]:
    waits: list[float] = []
    store = Ledger(f"sqlite:///{tmp_path / (ledger + '.sqlite3')}")
    hub = Hub(
        store,
        {"quickbooks": adapter},
        RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0),
        sleep=waits.append,
        pace=waits.append,
    )
    try:
        (outcome,) = hub.push([Delivery(invoice, "quickbooks", client, adapter.account)])
    finally:
        store.close()
    return outcome, waits


def traffic(cassette: Any) -> list[tuple[str, str, int]]:
    """(method, path with ids as ``{id}``, status) of every interaction, in order."""
    calls = []
    for request, response in zip(cassette.requests, cassette.responses, strict=True):
        path = urlsplit(request.uri).path.removeprefix(API)
        path = re.sub(r"/invoice/\d+/", "/invoice/{id}/", path)
        calls.append((request.method, path, response["status"]["code"]))
    return calls


def query_texts(cassette: Any) -> list[str]:
    return [_text(r.body) for r in cassette.requests if r.uri.split("?")[0].endswith("/query")]


def _text(body: Any) -> str:
    return body.decode() if isinstance(body, bytes) else str(body or "")


def answer(cassette: Any, index: int) -> dict[str, Any]:
    body = cassette.responses[index]["body"]["string"]
    parsed: dict[str, Any] = json.loads(_text(body), parse_float=Decimal)
    return parsed


def assert_keys(cassette: Any, invoice: Invoice, steps: list[str]) -> None:
    """Every create and send carried its step's requestid, in step order."""
    keys = {idempotency_key(invoice.number, invoice.revision, "quickbooks", s): s for s in steps}
    sent = []
    for request in cassette.requests:
        query = parse_qs(urlsplit(request.uri).query)
        assert query.get("minorversion") in (["75"], None), request.uri
        if "requestid" in query:
            assert request.method == "POST" and not request.uri.split("?")[0].endswith("/query")
            sent.append(keys.get(query["requestid"][0], query["requestid"][0]))
    assert sent == steps


def assert_all_played(cassette: Any, record_mode: str) -> None:
    if record_mode == "none":
        assert cassette.all_played, f"{cassette.play_count} of {len(cassette.data)} played"


TOKEN = ("POST", "/oauth2/v1/tokens/bearer", 200)


def q(status: int = 200) -> tuple[str, str, int]:
    return ("POST", "/query", status)


# ------------------------------------------------------------------------------------------
# The cassettes
# ------------------------------------------------------------------------------------------


@pytest.mark.vcr
def test_push_creates_item_customer_invoice_and_emails_it(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice, client = acme(), QuickBooksClientSettings(send=True)
    outcome, _ = push(adapter_for(upstream), invoice, client, tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert traffic(vcr) == [
        TOKEN,
        q(),  # the first active Income account
        q(),  # the item by Name: none
        ("POST", "/item", 200),
        q(),  # the customer by DisplayName: none
        ("POST", "/customer", 200),
        q(),  # the invoice by DocNumber: none
        ("POST", "/invoice", 200),
        ("POST", "/invoice/{id}/send", 200),
    ]
    assert query_texts(vcr)[1:] == [
        "select * from Item where Name = 'Profit share'",
        "select * from Customer where DisplayName = 'Acme Corp'",
        "select * from Invoice where DocNumber = 'OaaS-202601-206181'",
    ]
    assert_keys(vcr, invoice, ["item", "customer", "invoice", "send"])
    created = answer(vcr, 7)["Invoice"]
    assert created["Id"] == outcome.refs["invoice_id"]
    assert created["DocNumber"] == "OaaS-202601-206181"
    assert "KIKI-OaaS-202601-206181 revision 0" in created["PrivateNote"]
    sales = [line for line in created["Line"] if line["DetailType"] == "SalesItemLineDetail"]
    assert [line["Amount"] for line in sales] == [
        Decimal("2209.00"),
        Decimal("2209.00"),
        Decimal("-1418.00"),
    ]
    assert created["Line"][-1]["DetailType"] == "SubTotalLineDetail"
    assert created["TotalAmt"] == Decimal("3000.00")
    assert answer(vcr, 8)["Invoice"]["EmailStatus"] == "EmailSent"
    assert outcome.refs["invoice_email_status"] == "EmailSent"
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_after_a_lost_ledger_finds_everything_by_look_up(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    invoice = techstartup()
    first_process = adapter_for(upstream)
    first, _ = push(first_process, invoice, QuickBooksClientSettings(), tmp_path, "a")
    assert first.state is DeliveryState.DELIVERED, first.error
    made = vcr.play_count if record_mode == "none" else len(vcr.requests)
    if upstream.fake is not None:
        upstream.fake.app.idempotency.clear()  # QBO forgot the requestids
    # A new process (nothing in memory) with a new ledger; the tokens are in the database.
    second_process = QuickBooksAdapter(upstream.settings)
    second_process.credentials = first_process.credentials
    again, _ = push(second_process, invoice, QuickBooksClientSettings(), tmp_path, "b")
    assert again.state is DeliveryState.DELIVERED, again.error
    assert traffic(vcr)[made:] == [q(), q(), q(), q()]  # account, item, customer, invoice
    assert query_texts(vcr)[-1] == "select * from Invoice where DocNumber = 'OaaS-202601-220735'"
    for name in ("item_id", "customer_id", "invoice_id"):
        assert first.refs[name] == again.refs[name]
    assert all(answer(vcr, i)["QueryResponse"] for i in range(made + 1, made + 4))
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_waits_out_a_throttle_and_retries_with_the_same_requestid(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    if upstream.fake is not None:
        upstream.fake.inject_error("POST", f"{API}/invoice", status=429, body="xml")
    invoice = saas()
    outcome, waits = push(adapter_for(upstream), invoice, QuickBooksClientSettings(), tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    invoices = [
        (r, s) for r, s in zip(vcr.requests, traffic(vcr), strict=True) if s[1] == "/invoice"
    ]
    if upstream.kind != "sandbox":  # a real sandbox does not throttle on demand
        assert [s[2] for _, s in invoices] == [429, 200]
        throttled = vcr.responses[traffic(vcr).index(("POST", "/invoice", 429))]
        assert _text(throttled["body"]["string"]).startswith("<?xml")
        assert "ThrottleExceeded" in _text(throttled["body"]["string"])
        assert 60.0 in waits
        assert invoices[0][0].uri == invoices[1][0].uri  # the same requestid
    assert_keys(vcr, invoice, ["item", "customer", "invoice"] + ["invoice"] * (len(invoices) - 1))
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_refreshes_a_refused_access_token_once(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    refresh = SCRUBBED_REFRESH
    if upstream.fake is not None:
        refresh = upstream.fake.app.issue_refresh_token()
    elif upstream.kind == "sandbox":
        refresh = os.environ["KIKI_QUICKBOOKS_REFRESH_TOKEN"]
    adapter = adapter_for(
        upstream,
        **{
            ACCESS_TOKEN: "revoked-access-token",
            REFRESH_TOKEN: refresh,
            EXPIRES_AT: "4102444800",  # 2100: not expired as far as we know
            SEED: upstream.settings.seed_fingerprint(),
        },
    )
    outcome, _ = push(adapter, ecommerce(), QuickBooksClientSettings(), tmp_path)

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert traffic(vcr)[:3] == [q(401), TOKEN, q()]  # refused, refreshed, sent again
    refused = answer(vcr, 0)
    assert refused["fault"]["error"][0]["code"] == "3200"
    assert sum(s == TOKEN for s in traffic(vcr)) == 1
    assert adapter.credentials.load()[ACCESS_TOKEN] != "revoked-access-token"
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_to_an_unknown_customer_fails_with_intuits_validation_fault(
    upstream: Upstream, vcr: Any, record_mode: str, tmp_path: Path
) -> None:
    client = QuickBooksClientSettings(customer="999999")
    outcome, _ = push(adapter_for(upstream), saas(), client, tmp_path)

    assert outcome.state is DeliveryState.FAILED
    assert traffic(vcr)[-2:] == [q(), ("POST", "/invoice", 400)]
    fault = answer(vcr, len(vcr.requests) - 1)["Fault"]
    error = fault["Error"][0]
    assert (fault["type"], error["code"]) == ("ValidationFault", "2500")
    tid = next(v for k, v in vcr.responses[-1]["headers"].items() if k.lower() == "intuit_tid")
    assert outcome.error == (
        f"invoice: {error['Message']}: {error['Detail']} (HTTP 400, code 2500, request {tid[0]})"
    )
    assert_all_played(vcr, record_mode)


# ------------------------------------------------------------------------------------------
# The cassette files themselves
# ------------------------------------------------------------------------------------------


def _cassettes() -> list[Path]:
    return sorted(CASSETTE_DIR.glob("*.yaml"))


def _cassette_tests() -> set[str]:
    return {
        name
        for name, value in globals().items()
        if name.startswith("test_")
        and any(mark.name == "vcr" for mark in getattr(value, "pytestmark", []))
    }


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    return None


ENTITIES = {"customer": "Customer", "item": "Item", "invoice": "Invoice"}


def test_every_quickbooks_cassette_conforms_to_intuits_xsd() -> None:
    from vcr.serialize import deserialize
    from vcr.serializers import yamlserializer

    schema = quickbooks_schema()
    paths = _cassettes()
    assert {p.stem for p in paths} == _cassette_tests(), "a cassette without its test, or not"
    for path in paths:
        requests, responses = deserialize(path.read_text(encoding="utf-8"), yamlserializer)
        for request, response in zip(requests, responses, strict=True):
            where = f"{path.name}: {request.method} {request.uri}"
            parts = urlsplit(request.uri)
            body = _text(request.body)
            answered = _text(response["body"]["string"])
            if parts.path == "/oauth2/v1/tokens/bearer":
                assert request.uri == TOKEN_URL, where
                form = parse_qs(body)
                assert form["grant_type"] == ["refresh_token"], where
                assert form["refresh_token"] == [SCRUBBED_REFRESH], where
                if response["status"]["code"] == 200:
                    tokens = json.loads(answered)
                    assert (tokens["access_token"], tokens["refresh_token"]) == (
                        SCRUBBED_ACCESS,
                        SCRUBBED_REFRESH,
                    ), where
                continue
            assert request.uri.startswith(f"{API_HOST}{API}/"), where
            tail = parts.path.removeprefix(API + "/")
            content_type = _header(request.headers, "Content-Type")
            if tail == "query":
                assert content_type == "application/text" and _QUERY.match(body), where
            elif tail in ENTITIES:
                assert content_type == "application/json", where
                schema.validate(ENTITIES[tail], json.loads(body, parse_float=Decimal))
            else:
                assert re.fullmatch(r"invoice/\d+/send", tail) and not body, where
            status = response["status"]["code"]
            if answered.startswith("<"):
                schema.validate_xml(answered.encode())
            elif status == 401:
                assert json.loads(answered)["fault"]["type"] == "AUTHENTICATION", where
            else:
                schema.validate_response(json.loads(answered, parse_float=Decimal))
            assert (_header(response["headers"], "intuit_tid") or "").startswith("1-"), where


def test_quickbooks_cassettes_hold_no_secret_nor_host_detail() -> None:
    for path in _cassettes():
        text = path.read_text(encoding="utf-8")
        for secret in (*REPLAY_CLIENT, CLIENT_ID, CLIENT_SECRET, "Basic ", "eyJ"):
            assert secret not in text, f"{path.name} holds {secret!r}"
        for token in (r"AB11[A-Za-z0-9]{20,}", r"Bearer [A-Za-z0-9._~+/-]{8,}"):
            assert not re.search(token, text), f"{path.name} holds a token"
        for header in ("Authorization", "User-Agent", "Cookie"):
            assert f"{header}:" not in text, f"{path.name} stores {header}"
        assert "BaseHTTP" not in text and "127.0.0.1" not in text
