"""The Xero adapter through the Hub, replayed from recorded Xero traffic (cassettes/xero/).

Each test pushes an invoice of the PRODUCT.md worked example through Hub + XeroAdapter to
``https://api.xero.com`` (tokens from ``https://identity.xero.com``) and, by default, replays it
from its cassette (``--record-mode=none --block-network``, see pyproject.toml). A test fails if
its cassette holds an interaction it did not play, and every cassette request (and every JSON
answer) is checked against Xero's OpenAPI spec.

Secrets never reach a cassette: ``Authorization`` and ``xero-tenant-id`` are dropped
(tests/conftest.py), the refresh token and code in token requests and every token in token
answers are replaced by ``REDACTED`` (here); requests match on method, URL and body.

Recording (the test's cassette is deleted and recorded again with ``--record-mode=rewrite``)::

    # against the local fake (no credentials, no network); stored as api.xero.com's traffic
    KIKI_XERO_RECORD_AGAINST_FAKE=1 python -m pytest tests/adapters/xero/test_cassettes.py \\
        --record-mode=rewrite
    # against a Xero organisation (the Demo Company), with a connected app
    KIKI_XERO_CLIENT_ID=... KIKI_XERO_CLIENT_SECRET=... KIKI_XERO_REFRESH_TOKEN=... \\
        KIKI_XERO_TENANT_ID=... python -m pytest tests/adapters/xero/test_cassettes.py \\
        --record-mode=rewrite

Recorded against the fake, the cassettes are byte-for-byte reproducible: ids and correlation ids
come from a seeded generator, the fake's clock is fixed, ``Date`` is the fake's clock and the
fake's ``Server`` header is dropped. Xero cannot be made to answer 429 on demand, so that
cassette is only recorded against the fake.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import date
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings, XeroSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, Invoice, SourceEvidence
from kiki_billing.plugin import MemoryCredentialStore
from kiki_billing.profit_share import compute_invoice
from tests.conftest import CASSETTES
from tests.support.fake_xero import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    PREFIX,
    FakeXero,
    FakeXeroApp,
)
from tests.support.xero_spec import iter_cassette_requests, validate_cassette

CASSETTE_TOPIC = "xero"
CASSETTE_DIR = CASSETTES / CASSETTE_TOPIC

XERO_API = "https://api.xero.com"
XERO_IDENTITY = "https://identity.xero.com"
RECORD_AGAINST_FAKE = "KIKI_XERO_RECORD_AGAINST_FAKE"
REDACTED = "REDACTED"
REPLAY_CLIENT_ID = "0123456789ABCDEF0123456789ABCDEF"
REPLAY_SECRET = "kiki-cassette-replay-secret"  # never on the wire in replay
FAKE_SEED = 2026
FAKE_NOW = 1769904000  # 2026-02-01T00:00:00Z, the worked example's issue date
FAKE_ORIGIN = re.compile(r"^http://127\.0\.0\.1:\d+")
SOFTWARE_VERSION = "0.1.0"
PERIOD = BillingPeriod.month("2026-01")
NUMBERS = {
    "acme": "KIKI-OaaS-202601-206181",
    "techstartup": "KIKI-OaaS-202601-220735",
    "ecommerce": "KIKI-OaaS-202601-818427",
    "saas": "KIKI-OaaS-202601-170223",
}
TAX_FREE = XeroClientSettings(tax_type="NONE")


# --------------------------------------------------------------------------------------------
# The worked example's invoices
# --------------------------------------------------------------------------------------------


# client id -> name, email, campaigns (id, name, platform, spend, LTV), contract terms
EXAMPLE: dict[str, tuple[str, str, list[tuple[str, str, str, str, str]], dict[str, str]]] = {
    # 2,209.00 per campaign; two campaigns capped at 3,000.00 by a -1,418.00 adjustment.
    "acme": (
        "Acme Corp",
        "billing@acme.example",
        [
            ("campaign_001", "Spring retargeting", "Meta Ads", "36000.00", "130090.00"),
            ("campaign_005", "Summer retargeting", "Meta Ads", "36000.00", "130090.00"),
        ],
        {"fee_cap": "3000.00"},
    ),
    "techstartup": (  # 3,213.00
        "TechStartup Inc",
        "ap@techstartup.example",
        [("campaign_002", "Search brand + generic", "Google Ads", "44000.00", "164130.00")],
        {},
    ),
    "ecommerce": (  # 1,753.00
        "E-commerce Co",
        "finance@ecommerce.example",
        [("campaign_003", "Creator spark ads", "TikTok Ads", "40000.00", "137530.00")],
        {},
    ),
    "saas": (  # 946.00
        "SaaS Platform",
        "billing@saas.example",
        [("campaign_004", "Decision-maker ABM", "LinkedIn Ads", "25000.00", "84460.00")],
        {},
    ),
}


def example(client_id: str) -> Invoice:
    """One client's January 2026 invoice, independent of the machine and the software version."""
    name, email, campaigns, contract = EXAMPLE[client_id]
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


# --------------------------------------------------------------------------------------------
# Where the traffic goes: the cassette, the local fake, or Xero
# --------------------------------------------------------------------------------------------


class Upstream(NamedTuple):
    kind: Literal["replay", "fake", "xero"]
    settings: XeroSettings
    fake: FakeXero | None


def _recording_against_fake() -> bool:
    return os.environ.get(RECORD_AGAINST_FAKE) == "1"


@pytest.fixture(scope="module")
def recording_against(record_mode: str) -> Literal["replay", "fake", "xero"]:
    """Where this run's traffic goes; fails before pytest-recording deletes any cassette."""
    if record_mode == "none":
        return "replay"
    if _recording_against_fake():
        return "fake"
    needed = ["CLIENT_ID", "CLIENT_SECRET", "REFRESH_TOKEN", "TENANT_ID"]
    missing = [f"KIKI_XERO_{n}" for n in needed if not os.environ.get(f"KIKI_XERO_{n}")]
    if missing:
        pytest.fail(f"recording needs {RECORD_AGAINST_FAKE}=1 or {', '.join(missing)}")
    return "xero"


@pytest.fixture(scope="module")
def xero_store() -> MemoryCredentialStore:
    """Recording against Xero, the rotated refresh token goes from one test to the next."""
    return MemoryCredentialStore()


@pytest.fixture
def upstream(recording_against: str) -> Iterator[Upstream]:
    if recording_against == "replay":
        yield Upstream(
            "replay",
            XeroSettings(
                client_id=REPLAY_CLIENT_ID,
                client_secret=REPLAY_SECRET,
                refresh_token="kiki-cassette-replay-seed",
                tenant_id=DEFAULT_TENANT,
            ),
            None,
        )
    elif recording_against == "fake":
        with FakeXero(FakeXeroApp(seed=FAKE_SEED, clock=lambda: float(FAKE_NOW))) as fake:
            settings = XeroSettings(
                client_id=DEFAULT_CLIENT_ID,
                client_secret=DEFAULT_CLIENT_SECRET,
                refresh_token=fake.app.issue_refresh_token(),
                tenant_id=DEFAULT_TENANT,
                api_base=fake.api_base,
                token_url=fake.token_url,
            )
            yield Upstream("fake", settings, fake)
    else:
        yield Upstream("xero", XeroSettings(), None)


def _scrub_token_form(request: Any) -> Any:
    """The refresh token or code of a token request as ``REDACTED`` (also when matching).

    vcrpy's ``filter_post_data_parameters`` is not used: it re-serialises every JSON body
    through floats, which would hide the exact decimals the adapter sends.
    """
    if urlsplit(request.uri).path != "/connect/token" or not request.body:
        return request
    raw = request.body.decode() if isinstance(request.body, bytes) else request.body
    form = [(k, REDACTED if k in ("refresh_token", "code") else v) for k, v in parse_qsl(raw)]
    request.body = urlencode(form).encode()
    for name in list(request.headers):
        if name.lower() == "content-length":
            request.headers[name] = str(len(request.body))
    return request


def _as_xero_request(request: Any) -> Any:
    parts = urlsplit(request.uri)
    if FAKE_ORIGIN.match(request.uri):
        origin = XERO_IDENTITY if parts.path == "/connect/token" else XERO_API
        request.uri = FAKE_ORIGIN.sub(origin, request.uri)
    return request


_TOKEN_FIELDS = ("access_token", "refresh_token", "id_token")


def _scrub_tokens(response: dict[str, Any]) -> dict[str, Any]:
    body = response.get("body", {}).get("string")
    if not body:
        return response
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    if not any(f'"{field}"' in text for field in _TOKEN_FIELDS):
        return response
    data = json.loads(text)
    for field in _TOKEN_FIELDS:
        if field in data:
            data[field] = REDACTED
    scrubbed = json.dumps(data)
    response["body"]["string"] = scrubbed.encode() if isinstance(body, bytes) else scrubbed
    for name, value in response.get("headers", {}).items():
        if name.lower() == "content-length":
            value[:] = [str(len(scrubbed.encode()))]
    return response


def _as_xero_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() == "server":  # BaseHTTP/0.6 Python/3.x: the fake's, not Xero's
            del headers[name]
        elif name.lower() == "date":
            headers[name] = [formatdate(FAKE_NOW, usegmt=True)]
    return response


@pytest.fixture
def vcr_config(vcr_config: dict[str, Any]) -> dict[str, Any]:
    """tests/conftest.py's scrubbing, plus the tokens of the identity endpoint; recording
    against the fake, its traffic stored as Xero's (https) with its volatile headers stable."""
    scrubbers = [vcr_config["before_record_response"], _scrub_tokens]
    config = {
        **vcr_config,
        "before_record_request": _scrub_token_form,
        "before_record_response": scrubbers,
    }
    if _recording_against_fake():
        config["before_record_request"] = [_as_xero_request, _scrub_token_form]
        config["before_record_response"] = [*scrubbers, _as_xero_response]
    return config


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_adapter(
    upstream: Upstream, store: MemoryCredentialStore, xero_store: MemoryCredentialStore
) -> XeroAdapter:
    credentials = xero_store if upstream.kind == "xero" else store
    return XeroAdapter(upstream.settings, credentials=credentials)


def push(
    upstream: Upstream,
    adapter: XeroAdapter,
    invoice: Invoice,
    client: XeroClientSettings,
    ledger_path: Path,
) -> tuple[DeliveryOutcome, list[float]]:
    ledger = Ledger(f"sqlite:///{ledger_path}")
    waits: list[float] = []
    hub = Hub(
        ledger,
        {"xero": adapter},
        RetryPolicy(max_attempts=3, initial_wait=0.5, max_wait=2.0),
        # Replaying or recording against the fake, nothing needs waiting for.
        sleep=time.sleep if upstream.kind == "xero" else waits.append,
        pace=time.sleep if upstream.kind == "xero" else lambda _: None,
    )
    try:
        (outcome,) = hub.push([Delivery(invoice, "xero", client, adapter.account)])
    finally:
        ledger.close()
    return outcome, waits


def traffic(cassette: Any) -> list[tuple[str, str, int]]:
    """(method, path, status) of every interaction, paths below the API base shortened."""
    found = []
    for request, response in zip(cassette.requests, cassette.responses, strict=True):
        path = urlsplit(request.uri).path.removeprefix(PREFIX)
        found.append((request.method, path, response["status"]["code"]))
    return found


def response_json(cassette: Any, index: int) -> Any:
    body = cassette.responses[index]["body"]["string"]
    return json.loads(body.decode() if isinstance(body, bytes) else body)


def request_json(cassette: Any, index: int) -> Any:
    body = cassette.requests[index].body
    return json.loads(body.decode() if isinstance(body, bytes) else body)


def header(message: Any, name: str) -> str | None:
    for key, value in message.items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    return None


def assert_keys(cassette: Any, invoice: Invoice) -> None:
    """Every PUT carried its step's derived Idempotency-Key, in step order; nothing else did."""
    steps = ["contact", "invoice"]
    keys = {idempotency_key(invoice.number, invoice.revision, "xero", s): s for s in steps}
    puts = [r for r in cassette.requests if r.method == "PUT"]
    expected = ["contact" if "/Contacts" in r.uri else "invoice" for r in puts]
    assert [keys.get(r.headers.get("Idempotency-Key")) for r in puts] == expected
    assert all(
        r.headers.get("Idempotency-Key") is None for r in cassette.requests if r.method != "PUT"
    )


def assert_all_played(cassette: Any, record_mode: str) -> None:
    if record_mode == "none":
        assert cassette.all_played, (
            f"{cassette.play_count} of {len(cassette.data)} interactions played"
        )


TOKEN = ("POST", "/connect/token", 200)
CONTACT_MISS = ("GET", "/Contacts", 200)
CONTACT_PUT = ("PUT", "/Contacts", 200)
INVOICE_PUT = ("PUT", "/Invoices", 200)


# --------------------------------------------------------------------------------------------
# The cassettes
# --------------------------------------------------------------------------------------------


@pytest.mark.vcr
def test_push_creates_the_contact_and_an_authorised_invoice(
    upstream: Upstream,
    xero_store: MemoryCredentialStore,
    vcr: Any,
    record_mode: str,
    tmp_path: Path,
) -> None:
    invoice = example("acme")
    adapter = make_adapter(upstream, MemoryCredentialStore(), xero_store)
    outcome, _ = push(upstream, adapter, invoice, TAX_FREE, tmp_path / "ledger.sqlite3")

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    if upstream.kind != "xero":  # a real organisation may hold the contact from a last run
        assert traffic(vcr) == [TOKEN, CONTACT_MISS, CONTACT_PUT, INVOICE_PUT]
    assert_keys(vcr, invoice)
    [sent] = request_json(vcr, -1)["Invoices"]
    assert sent["Contact"] == {"ContactID": outcome.refs["contact_id"]}
    assert sent["InvoiceNumber"] == invoice.number and sent["Type"] == "ACCREC"
    [created] = response_json(vcr, -1)["Invoices"]
    assert created["InvoiceID"] == outcome.refs["invoice_id"]
    assert created["Status"] == outcome.refs["invoice_status"] == "AUTHORISED"
    assert [line["LineAmount"] for line in created["LineItems"]] == [2209.0, 2209.0, -1418.0]
    assert created["SubTotal"] == created["Total"] == 3000.0
    assert created["CurrencyCode"] == "USD" and created["Reference"] == "Profit share 2026-01"
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_after_a_lost_ledger_finds_the_contact_and_the_invoice(
    upstream: Upstream,
    xero_store: MemoryCredentialStore,
    vcr: Any,
    record_mode: str,
    tmp_path: Path,
) -> None:
    invoice = example("techstartup")
    adapter = make_adapter(upstream, MemoryCredentialStore(), xero_store)
    first, _ = push(upstream, adapter, invoice, TAX_FREE, tmp_path / "a.sqlite3")
    assert first.state is DeliveryState.DELIVERED, first.error
    # The ledger is lost; Xero's idempotency keys have long expired: the look-ups find both.
    second, _ = push(upstream, adapter, invoice, TAX_FREE, tmp_path / "b.sqlite3")

    assert second.state is DeliveryState.DELIVERED, second.error
    found = [("GET", "/Contacts", 200), ("GET", "/Invoices", 200)]
    if upstream.kind != "xero":
        assert traffic(vcr) == [TOKEN, CONTACT_MISS, CONTACT_PUT, INVOICE_PUT, *found]
    assert traffic(vcr)[-2:] == found
    assert [r.method for r in vcr.requests].count("PUT") <= 2
    assert second.refs == first.refs
    lookup = urlsplit(vcr.requests[-1].uri)
    assert lookup.query == f"InvoiceNumbers={invoice.number}"
    [found] = response_json(vcr, -1)["Invoices"]
    assert found["InvoiceID"] == first.refs["invoice_id"] and found["SubTotal"] == 3213.0
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_waits_out_a_429_then_succeeds(
    upstream: Upstream,
    xero_store: MemoryCredentialStore,
    vcr: Any,
    record_mode: str,
    tmp_path: Path,
) -> None:
    if upstream.kind == "xero":
        pytest.skip("Xero cannot be made to answer 429 on demand; recorded against the fake")
    if upstream.fake is not None:
        upstream.fake.inject_error(
            "PUT",
            f"{PREFIX}/Invoices",
            status=429,
            headers={"Retry-After": "2", "X-Rate-Limit-Problem": "minute"},
        )
    invoice = example("ecommerce")
    adapter = make_adapter(upstream, MemoryCredentialStore(), xero_store)
    outcome, waits = push(upstream, adapter, invoice, TAX_FREE, tmp_path / "ledger.sqlite3")

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert traffic(vcr) == [
        TOKEN,
        CONTACT_MISS,
        CONTACT_PUT,
        ("PUT", "/Invoices", 429),
        INVOICE_PUT,
    ]
    throttled = vcr.responses[3]["headers"]
    assert header(throttled, "X-Rate-Limit-Problem") == "minute"
    assert header(throttled, "Retry-After") == "2" and waits == [2.0]
    puts = [
        r
        for r in vcr.requests
        if r.method == "PUT" and r.uri.endswith("/Invoices?summarizeErrors=false")
    ]
    assert puts[0].headers["Idempotency-Key"] == puts[1].headers["Idempotency-Key"]
    assert puts[0].body == puts[1].body
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_refreshes_the_access_token_after_a_401(
    upstream: Upstream,
    xero_store: MemoryCredentialStore,
    vcr: Any,
    record_mode: str,
    tmp_path: Path,
) -> None:
    # The stored access token is one Xero no longer takes (revoked, or expired early).
    seed = upstream.settings.refresh_token
    assert seed is not None
    store = xero_store if upstream.kind == "xero" else MemoryCredentialStore()
    current = dict(store.load())
    store.update(
        lambda _: {
            "access_token": "kiki-revoked-access-token",
            "refresh_token": current.get("refresh_token") or seed.get_secret_value(),
            "expires_at": f"{time.time() + 1500:.0f}",
            "seed": current.get("seed", upstream.settings.seed_fingerprint),
        }
    )
    adapter = XeroAdapter(upstream.settings, credentials=store)
    invoice = example("saas")
    outcome, waits = push(upstream, adapter, invoice, TAX_FREE, tmp_path / "ledger.sqlite3")

    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert traffic(vcr)[:3] == [("GET", "/Contacts", 401), TOKEN, CONTACT_MISS]
    assert header(vcr.responses[0]["headers"], "WWW-Authenticate") is not None
    assert waits == [0.0]  # a refused token is retried at once, after the refresh
    assert vcr.requests[0].body == vcr.requests[2].body is None
    assert store.load()["access_token"] != "kiki-revoked-access-token"
    assert_all_played(vcr, record_mode)


@pytest.mark.vcr
def test_push_with_an_unknown_account_code_fails_with_xeros_message(
    upstream: Upstream,
    xero_store: MemoryCredentialStore,
    vcr: Any,
    record_mode: str,
    tmp_path: Path,
) -> None:
    invoice = example("saas")
    client = XeroClientSettings(account_code="999", tax_type="NONE")
    adapter = make_adapter(upstream, MemoryCredentialStore(), xero_store)
    outcome, _ = push(upstream, adapter, invoice, client, tmp_path / "ledger.sqlite3")

    assert outcome.state is DeliveryState.FAILED
    assert traffic(vcr)[-1] == INVOICE_PUT  # a 200 whose element carries the errors
    [element] = response_json(vcr, -1)["Invoices"]
    assert element["HasErrors"] is True
    [problem] = element["ValidationErrors"]
    correlation = header(vcr.responses[-1]["headers"], "Xero-Correlation-Id")
    assert outcome.error == (
        f"invoice: Xero refused invoice {invoice.number}: {problem['Message']} "
        f"(code ValidationException, request {correlation})"
    )
    assert problem["Message"] == "Account code '999' is not a valid code for this document."
    # The contact made on the way is recorded, so nothing half-created is unknown.
    assert outcome.refs["contact_id"]
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


def test_every_xero_cassette_request_conforms_to_the_spec() -> None:
    paths = _cassettes()
    assert {p.stem for p in paths} == _cassette_tests(), "a cassette without its test, or not"
    for path in paths:
        assert validate_cassette(path) > 0, f"{path.name}: no request"


def test_xero_cassettes_look_like_xero_and_hold_no_secrets() -> None:
    for path in _cassettes():
        text = path.read_text(encoding="utf-8")
        for secret in (DEFAULT_CLIENT_SECRET, "kiki-fake-access-", "kiki-revoked-access-token"):
            assert secret not in text, f"{path.name} holds {secret!r}"
        assert not re.search(r"(Bearer|Basic) [A-Za-z0-9._~+/=-]{12,}", text), path.name
        for request, response in iter_cassette_requests(path):
            where = f"{path.name}: {request.method} {request.uri}"
            parts = urlsplit(request.uri)
            for scrubbed in ("Authorization", "xero-tenant-id", "User-Agent"):
                assert header(request.headers, scrubbed) is None, where
            if parts.path == "/connect/token":
                assert f"{parts.scheme}://{parts.netloc}" == XERO_IDENTITY, where
                body = request.body.decode() if isinstance(request.body, bytes) else request.body
                assert body == f"grant_type=refresh_token&refresh_token={REDACTED}", where
                if response["status"]["code"] == 200:
                    granted = json.loads(response["body"]["string"])
                    assert granted["access_token"] == granted["refresh_token"] == REDACTED
                continue
            assert request.uri.startswith(XERO_API + PREFIX + "/"), where
            assert (header(request.headers, "Idempotency-Key") is not None) is (
                request.method == "PUT"
            ), where
            headers = response["headers"]
            assert header(headers, "Xero-Correlation-Id"), where
            assert header(headers, "X-DayLimit-Remaining") is not None, where
            assert "BaseHTTP" not in (header(headers, "Server") or ""), where
