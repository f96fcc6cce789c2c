"""QuickBooks payloads, settings, validation and error classification, without the hub.

Every payload the mappers build is checked against Intuit's XSD; every error is classified from
what python-quickbooks, intuit-oauth or requests really raise when the local fake answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
from kiki_billing_adapters.quickbooks import (
    QuickBooksAdapter,
    QuickBooksClientSettings,
    QuickBooksSettings,
    classify_quickbooks_error,
    doc_number,
    line_amount,
    parse_fault,
    qbo_amount,
    to_json_text,
    to_qbo_customer,
    to_qbo_invoice,
    to_qbo_item,
)
from kiki_billing_adapters.quickbooks.wire import (
    account_query,
    customer_query,
    invoice_owner,
    invoice_query,
    item_query,
    private_note,
)

from kiki_billing.errors import ConfigurationError
from kiki_billing.exports.csv_formats import quickbooks_doc_number
from kiki_billing.plugin import (
    AmountLimitError,
    CredentialsExpired,
    DeliveryError,
    RateLimitedError,
    StepContext,
    TerminalError,
    TransientError,
)
from kiki_billing.testing import sample_invoice
from tests.adapters.quickbooks.conftest import settings_for
from tests.adapters.stripe.test_cassettes import acme
from tests.support.fake_quickbooks import REALM, TOKEN_PATH, FakeQuickBooks
from tests.support.quickbooks_schema import quickbooks_schema

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

CLIENT = QuickBooksClientSettings()
ENV = {
    "KIKI_QUICKBOOKS_CLIENT_ID": "ABclient0123456789",
    "KIKI_QUICKBOOKS_CLIENT_SECRET": "s3cr3t-client-value",
    "KIKI_QUICKBOOKS_REFRESH_TOKEN": "AB11refresh0123456789abcdef",
    "KIKI_QUICKBOOKS_REALM_ID": "9130357766900456",
}


def refs(**known: str) -> dict[str, str]:
    return {"customer_id": "58", "item_id": "19", **known}


# ------------------------------------------------------------------------------------------
# Mappers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number", ["KIKI-OaaS-202601-206181", "KIKI-OaaS-209912-999999", "OaaS-202601-000001"]
)
def test_doc_number_is_the_csv_exports_21_character_form(number: str) -> None:
    assert doc_number(number) == quickbooks_doc_number(number)
    assert len(doc_number(number)) <= 21


def test_a_number_too_long_for_doc_number_is_refused() -> None:
    with pytest.raises(TerminalError, match="21-character DocNumber"):
        doc_number("KIKI-" + "X" * 22)
    with pytest.raises(ValueError):
        quickbooks_doc_number("KIKI-" + "X" * 22)  # the same rule as the CSV export


def test_invoice_payload_for_the_worked_example() -> None:
    invoice = acme()
    payload = to_qbo_invoice(invoice, QuickBooksClientSettings(tax_code="NON"), refs())
    assert payload["DocNumber"] == "OaaS-202601-206181"
    assert payload["PrivateNote"] == (
        "kiki-billing invoice KIKI-OaaS-202601-206181 revision 0, profit share 2026-01"
    )
    assert (payload["TxnDate"], payload["DueDate"]) == ("2026-02-01", "2026-03-03")
    assert payload["CurrencyRef"] == {"value": "USD"}
    assert payload["CustomerRef"] == {"value": "58"}
    assert payload["BillEmail"] == {"Address": "billing@acme.example"}
    lines = payload["Line"]
    assert [line["Amount"] for line in lines] == [
        Decimal("2209.00"),
        Decimal("2209.00"),
        Decimal("-1418.00"),
    ]
    for line, source in zip(lines, invoice.lines, strict=True):
        detail = line["SalesItemLineDetail"]
        assert line["Amount"] == line_amount(detail["Qty"], detail["UnitPrice"])
        assert detail == {
            "ItemRef": {"value": "19"},
            "Qty": Decimal(1),
            "UnitPrice": source.fee,
            "TaxCodeRef": {"value": "NON"},
        }
        assert (line["LineNum"], line["Description"]) == (source.line_no, source.description)
    assert sum(line["Amount"] for line in lines) == invoice.total_fee == Decimal("3000.00")


def test_every_payload_passes_intuits_xsd() -> None:
    schema = quickbooks_schema()
    invoice = acme()
    for client in (CLIENT, QuickBooksClientSettings(tax_code="TAX", send=True)):
        schema.validate("Invoice", to_qbo_invoice(invoice, client, refs()))
    schema.validate("Customer", to_qbo_customer(invoice))
    schema.validate("Item", to_qbo_item("Profit share", "79"))
    # JSON -> text -> JSON keeps every number exact and every name the XSD's.
    text = to_json_text(to_qbo_invoice(invoice, CLIENT, refs()))
    schema.validate("Invoice", json.loads(text, parse_float=Decimal))


def test_placeholders_stand_for_ids_not_known_yet() -> None:
    payload = to_qbo_invoice(sample_invoice(), CLIENT, {})
    assert payload["CustomerRef"] == {"value": "{customer_id}"}
    assert payload["Line"][0]["SalesItemLineDetail"]["ItemRef"] == {"value": "{item_id}"}


def test_json_text_writes_exact_decimals_and_ascii() -> None:
    text = to_json_text(
        {"Amount": Decimal("2209.00"), "Qty": Decimal("0.3333333"), "n": 1, "ok": True,
         "name": "Société Générale – 株式会社", "none": None}
    )  # fmt: skip
    assert text == (
        '{"Amount": 2209.00, "Qty": 0.3333333, "n": 1, "ok": true, '
        '"name": "Soci\\u00e9t\\u00e9 G\\u00e9n\\u00e9rale \\u2013 \\u682a\\u5f0f\\u4f1a\\u793e", '
        '"none": null}'
    )
    assert text.isascii()
    with pytest.raises(ValueError):
        to_json_text({"Amount": Decimal("NaN")})
    with pytest.raises(TypeError):
        to_json_text({"Amount": 1.5})


def test_amounts_with_more_than_two_decimals_are_refused() -> None:
    assert qbo_amount(Decimal("12.30"), "USD") == Decimal("12.30")
    assert qbo_amount(Decimal("1.230"), "KWD") == Decimal("1.230")
    assert qbo_amount(Decimal("2209"), "JPY") == Decimal("2209")
    with pytest.raises(AmountLimitError, match="2 decimals"):
        qbo_amount(Decimal("1.234"), "KWD")
    with pytest.raises(AmountLimitError):
        qbo_amount(Decimal("1"), "XXQ")
    assert line_amount(Decimal(3), Decimal("0.3333333")) == Decimal("1.00")
    assert line_amount(Decimal(1), Decimal("-1418.00")) == Decimal("-1418.00")


def test_queries_quote_values() -> None:
    assert customer_query("O'Reilly \\ Sons") == (
        "select * from Customer where DisplayName = 'O\\'Reilly \\\\ Sons'"
    )
    assert item_query("Profit share") == "select * from Item where Name = 'Profit share'"
    assert invoice_query("OaaS-1") == "select * from Invoice where DocNumber = 'OaaS-1'"
    assert account_query(None) == "select * from Account where AccountType = 'Income' maxresults 1"
    assert account_query("79", by_id=True) == "select * from Account where Id = '79'"


def test_an_invoice_is_ours_only_with_our_number_and_revision() -> None:
    invoice = acme()
    assert invoice_owner({"PrivateNote": private_note(invoice)}, invoice) == "ours"
    revised = invoice.model_copy(update={"revision": 1})
    assert invoice_owner({"PrivateNote": private_note(invoice)}, revised) == "other-revision"
    assert invoice_owner({"PrivateNote": "typed by hand"}, invoice) == "foreign"
    assert invoice_owner({}, invoice) == "foreign"


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    for name in list(__import__("os").environ):
        if name.startswith("KIKI_QUICKBOOKS_"):
            monkeypatch.delenv(name)

    def set_env(**values: str | None) -> None:
        for name, value in {**ENV, **values}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    yield set_env


def test_settings_defaults_follow_the_environment(env: Callable[..., None]) -> None:
    env(KIKI_QUICKBOOKS_ENVIRONMENT="Sandbox")
    settings = QuickBooksAdapter.read_settings()
    assert isinstance(settings, QuickBooksSettings)
    assert settings.environment == "sandbox"
    assert settings.base_url == "https://sandbox-quickbooks.api.intuit.com/v3"
    assert settings.token_url == "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
    assert settings.account_id == "sandbox:9130357766900456"
    env(KIKI_QUICKBOOKS_ENVIRONMENT=None)
    production = QuickBooksAdapter.read_settings()
    assert isinstance(production, QuickBooksSettings)
    assert production.base_url == "https://quickbooks.api.intuit.com/v3"
    shown = repr(production) + str(production)
    assert not any(secret in shown for secret in ENV.values() if not secret.isdigit())


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KIKI_QUICKBOOKS_CLIENT_ID", None, "KIKI_QUICKBOOKS_CLIENT_ID is not set"),
        ("KIKI_QUICKBOOKS_CLIENT_SECRET", None, "KIKI_QUICKBOOKS_CLIENT_SECRET is not set"),
        ("KIKI_QUICKBOOKS_REALM_ID", None, "KIKI_QUICKBOOKS_REALM_ID is not set"),
        ("KIKI_QUICKBOOKS_REALM_ID", "acme-books", "KIKI_QUICKBOOKS_REALM_ID is invalid"),
        ("KIKI_QUICKBOOKS_ENVIRONMENT", "staging", "KIKI_QUICKBOOKS_ENVIRONMENT is invalid"),
        ("KIKI_QUICKBOOKS_CLIENT_SECRET", "pasted with\nnewline", "CLIENT_SECRET is invalid"),
        ("KIKI_QUICKBOOKS_REFRESH_TOKEN", "", "KIKI_QUICKBOOKS_REFRESH_TOKEN is invalid: is empty"),
        ("KIKI_QUICKBOOKS_API_BASE", "http://qbo.example/v3", "API_BASE is invalid: uses plain"),
        ("KIKI_QUICKBOOKS_TOKEN_URL", "ftp://x/y", "KIKI_QUICKBOOKS_TOKEN_URL is invalid"),
        ("KIKI_QUICKBOOKS_INCOME_ACCOUNT", " Sales", "INCOME_ACCOUNT is invalid"),
    ],
)
def test_a_missing_or_malformed_setting_names_the_variable_never_the_value(
    env: Callable[..., None], variable: str, value: str | None, expected: str
) -> None:
    env(**{variable: value})
    with pytest.raises(ConfigurationError) as raised:
        QuickBooksAdapter.read_settings()
    message = str(raised.value)
    assert expected in message and message.startswith("adapter 'quickbooks': ")
    if value:
        assert value.strip() not in message


def test_the_refresh_token_may_come_from_the_ledger_only(env: Callable[..., None]) -> None:
    env(KIKI_QUICKBOOKS_REFRESH_TOKEN=None)
    settings = QuickBooksAdapter.read_settings()
    assert isinstance(settings, QuickBooksSettings) and settings.refresh_token is None


def test_client_settings() -> None:
    defaults = {"item": "Consulting", "date_format": "MM/DD/YYYY", "home_currency": "USD"}
    merged = QuickBooksAdapter.client_settings(defaults, {"send": True})
    assert merged == QuickBooksClientSettings(item="Consulting", send=True)
    for bad in ({"item": "Fees:Profit"}, {"customer": "cus_1"}, {"item": "x" * 101}, {"x": 1}):
        with pytest.raises(ValueError):
            QuickBooksAdapter.client_settings({}, bad)


def test_limits_are_intuits_and_overridable(env: Callable[..., None]) -> None:
    env()
    adapter = QuickBooksAdapter(QuickBooksAdapter.read_settings())  # type: ignore[arg-type]
    limit = adapter.rate_limit()
    assert [(w.requests, w.seconds) for w in limit.windows] == [(10, 1.0), (500, 60.0)]
    assert limit.concurrency == 10
    env(KIKI_QUICKBOOKS_RATE_LIMIT="5/s,300/min", KIKI_QUICKBOOKS_CONCURRENCY="4")
    slower = QuickBooksAdapter(QuickBooksAdapter.read_settings())  # type: ignore[arg-type]
    assert str(slower.rate_limit()) == "5/s, 300/min, 4 in flight"


def test_no_network_at_import_or_construction(
    env: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    import intuitlib.client
    import intuitlib.utils

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network use")

    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(intuitlib.utils, "get_discovery_doc", refuse)
    monkeypatch.setattr(intuitlib.client, "get_discovery_doc", refuse)
    env()
    adapter = QuickBooksAdapter(QuickBooksAdapter.read_settings())  # type: ignore[arg-type]
    assert adapter.account == "production:9130357766900456"
    assert adapter.client.company_id == "9130357766900456"
    url = adapter.authorization_url("http://127.0.0.1:8765/callback", "st4te")
    assert url.startswith("https://appcenter.intuit.com/connect/oauth2?")
    assert "scope=com.intuit.quickbooks.accounting" in url
    assert "state=st4te" in url and "client_id=ABclient0123456789" in url
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback" in url
    invoice = sample_invoice()
    for step in adapter.steps(invoice, CLIENT):
        assert step.request(StepContext(invoice, CLIENT, {}, "k1-x")).path.startswith(
            "/v3/company/9130357766900456/"
        )
    adapter.close()


# ------------------------------------------------------------------------------------------
# Validation before any call
# ------------------------------------------------------------------------------------------


def adapter_for_validation() -> QuickBooksAdapter:
    return QuickBooksAdapter(
        QuickBooksSettings(client_id="a", client_secret="b", realm_id="1", refresh_token="c")
    )


@pytest.mark.parametrize(
    ("change", "client", "expected"),
    [
        ({"client_name": "x" * 501}, CLIENT, "DisplayName takes at most 500"),
        ({"client_name": "Acme: Europe"}, CLIENT, "contains ':'"),
        ({"client_name": "   "}, CLIENT, "name is empty"),
        ({"client_email": "a" * 95 + "@b.example"}, CLIENT, "email longer"),
        ({"client_email": None}, QuickBooksClientSettings(send=True), "no email to send to"),
        ({"number": "KIKI-OaaS-202601-0000001234"}, CLIENT, "DocNumber"),
        ({"currency": "KWD", "lines_fee": Decimal("1.234")}, CLIENT, "2 decimals"),
        ({"lines_description": "d" * 4001}, CLIENT, "description longer"),
    ],
)
def test_validate_refuses_what_quickbooks_would(
    change: dict[str, Any], client: QuickBooksClientSettings, expected: str
) -> None:
    invoice = sample_invoice()
    fee, description = change.pop("lines_fee", None), change.pop("lines_description", None)
    if fee is not None or description is not None:
        line = invoice.lines[0].model_copy(
            update={k: v for k, v in {"fee": fee, "description": description}.items() if v}
        )
        change["lines"] = (line, *invoice.lines[1:])
    with pytest.raises(TerminalError, match=expected):
        adapter_for_validation().validate(invoice.model_copy(update=change), client)


def test_an_existing_customer_needs_no_valid_display_name() -> None:
    invoice = sample_invoice().model_copy(update={"client_name": "Acme: Europe"})
    adapter_for_validation().validate(invoice, QuickBooksClientSettings(customer="58"))


# ------------------------------------------------------------------------------------------
# Classification of what the SDKs raise
# ------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(
    fake: FakeQuickBooks, make_adapter: Callable[..., QuickBooksAdapter]
) -> QuickBooksAdapter:
    made = make_adapter()
    made.tokens.access_token()  # refreshed once, so the faults below hit API calls only
    return made


def raised(adapter: QuickBooksAdapter, call: Callable[[Any], Any] | None = None) -> Exception:
    try:
        adapter._call(call or (lambda qb: qb.query("select * from Item")))
    except Exception as exc:
        return exc
    raise AssertionError("nothing raised")


def classified(adapter: QuickBooksAdapter, error: Exception) -> DeliveryError:
    return adapter.classify_error(error)


QUERY = f"/v3/company/{REALM}/query"


def test_throttles_are_rate_limited_for_60_s_in_json_xml_and_html(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter
) -> None:
    for body in ("json", "xml"):
        fake.inject_error("POST", QUERY, status=429, body=body)
        error = classified(adapter, raised(adapter))
        assert isinstance(error, RateLimitedError)
        assert (error.retry_after, error.status, error.code) == (60.0, 429, "3001")
        assert error.message.startswith("message=ThrottleExceeded; errorCode=003001")
        assert error.request_id and error.request_id.startswith("1-")
    # A 3001 in a 400 (python-quickbooks calls it a ValidationException) is a throttle too.
    fake.inject_error("POST", QUERY, status=400, code="3001", message="ThrottleExceeded")
    error = classified(adapter, raised(adapter))
    assert isinstance(error, RateLimitedError) and error.retry_after == 60.0
    fake.inject_error("POST", QUERY, status=429, headers={"Retry-After": "7"})
    error = classified(adapter, raised(adapter))
    assert isinstance(error, RateLimitedError) and error.retry_after == 7.0


@pytest.mark.parametrize(("status", "body"), [(500, "json"), (502, "xml"), (503, "html")])
def test_server_errors_are_transient_for_60_s(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter, status: int, body: str
) -> None:
    fake.inject_error("POST", QUERY, status=status, body=body)
    error = classified(adapter, raised(adapter))
    assert type(error) is TransientError, error
    assert (error.status, error.retry_after) == (status, 60.0)
    assert error.request_id and error.request_id.startswith("1-")
    if body == "html":
        assert error.message == "503 Service Temporarily Unavailable"


def test_a_lost_connection_is_transient(fake: FakeQuickBooks, adapter: QuickBooksAdapter) -> None:
    fake.inject_drop("POST", QUERY)
    exc = raised(adapter)
    assert isinstance(exc, requests.ConnectionError)
    error = classified(adapter, exc)
    assert type(error) is TransientError and error.status is None


@pytest.mark.parametrize("code", ["610", "2050", "2500", "4000", "5010", "6000", "6070", "6240"])
def test_intuit_fault_codes_are_terminal_with_intuits_message_and_tid(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter, code: str
) -> None:
    fake.inject_error("POST", QUERY, status=400, code=code, message=f"Failed {code}")
    exc = raised(adapter)
    error = classified(adapter, exc)
    assert type(error) is TerminalError
    tid = exc.kiki_response.headers["intuit_tid"]  # type: ignore[attr-defined]
    assert (error.code, error.status, error.request_id) == (code, 400, tid)
    assert str(error) == f"Failed {code} (HTTP 400, code {code}, request {tid})"


def test_a_real_validation_fault_reads_message_and_detail(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter
) -> None:
    body = to_json_text({"DisplayName": "x" * 501, "CurrencyRef": {"value": "USD"}})
    exc = raised(adapter, lambda qb: qb.create_object("Customer", body, request_id="k1-v"))
    error = classified(adapter, exc)
    assert type(error) is TerminalError and error.code == "2050"
    assert error.message == (
        "String length is either shorter or longer than supported by specification: String "
        "length specified does not match the supported length. Min:0 Max:500 supported. "
        "Supplied length:501"
    )


def test_401_is_a_refreshable_credential_and_marks_the_token(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter
) -> None:
    fake.app.access_tokens.clear()  # every token unknown: as after a revocation
    exc = raised(adapter)
    error = classified(adapter, exc)
    assert isinstance(error, CredentialsExpired)
    assert (error.status, error.code) == (401, "3200")
    assert "AuthenticationFailed" in error.message
    before = fake.state()["token_grants"]
    adapter.tokens.access_token()  # the refused token is not used again: a refresh
    assert fake.state()["token_grants"] == before + 1


def test_403_is_terminal(fake: FakeQuickBooks, adapter: QuickBooksAdapter) -> None:
    fake.inject_error(
        "POST", QUERY, status=403, code="3100", message="ApplicationAuthorizationFailed"
    )
    error = classified(adapter, raised(adapter))
    assert type(error) is TerminalError and error.status == 403


def test_token_endpoint_errors(
    fake: FakeQuickBooks, make_adapter: Callable[..., QuickBooksAdapter]
) -> None:
    from intuitlib.exceptions import AuthClientError

    spent = make_adapter()
    spent.tokens.access_token()
    stale = QuickBooksAdapter(settings_for(fake, make_adapter.seed))  # type: ignore[attr-defined]
    with pytest.raises(AuthClientError) as invalid_grant:
        stale.tokens.access_token()  # its own store is empty: the rotated seed, spent
    error = stale.classify_error(invalid_grant.value)
    assert type(error) is TerminalError and error.code == "invalid_grant"
    assert "kiki-billing connect quickbooks" in error.message
    assert error.request_id and error.request_id.startswith("1-")

    wrong = QuickBooksAdapter(
        settings_for(fake, fake.app.issue_refresh_token(), client_secret="no")
    )
    with pytest.raises(AuthClientError) as invalid_client:
        wrong.tokens.access_token()
    assert "KIKI_QUICKBOOKS_CLIENT_SECRET" in str(wrong.classify_error(invalid_client.value))

    fake.inject_error("POST", TOKEN_PATH, status=503)
    down = QuickBooksAdapter(settings_for(fake, fake.app.issue_refresh_token()))
    with pytest.raises(AuthClientError) as unavailable:
        down.tokens.access_token()
    assert type(down.classify_error(unavailable.value)) is TransientError


def test_no_refresh_token_anywhere_names_the_setting(fake: FakeQuickBooks) -> None:
    adapter = QuickBooksAdapter(settings_for(fake, None))
    with pytest.raises(TerminalError, match="set KIKI_QUICKBOOKS_REFRESH_TOKEN"):
        adapter.tokens.access_token()


def test_tokens_are_scrubbed_from_every_message() -> None:
    secret = "eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0..abc.def"
    body = json.dumps(
        {"Fault": {"Error": [{"Message": f"bad Bearer {secret}", "Detail": "AB11" + "x" * 40,
                              "code": "6000"}]}}
    )  # fmt: skip
    from quickbooks.exceptions import QuickbooksException

    error = classify_quickbooks_error(
        QuickbooksException(f"Error returned with status code '400': {body}", 10000), ["known1"]
    )
    assert "eyJ" not in str(error) and "AB11" not in str(error) and "***" in str(error)
    unknown = classify_quickbooks_error(RuntimeError("oops known1"), ["known1"])
    assert "known1" not in str(unknown) and isinstance(unknown, TerminalError)
    assert isinstance(classify_quickbooks_error(OSError("reset")), TransientError)


def test_parse_fault_reads_every_shape() -> None:
    xml = (
        '<IntuitResponse xmlns="http://schema.intuit.com/finance/v3"><Fault type="ValidationFault">'
        '<Error code="6240" element=""><Message>Duplicate Name Exists Error</Message>'
        "<Detail>The name supplied already exists. &amp; more</Detail></Error></Fault>"
        "</IntuitResponse>"
    )
    fault = parse_fault(xml)
    assert fault is not None and (fault.code, fault.fault_type) == ("6240", "ValidationFault")
    assert fault.text == "Duplicate Name Exists Error: The name supplied already exists. & more"
    gateway = parse_fault('{"fault":{"error":[{"message":"m","detail":"d","code":"3200"}]}}')
    assert gateway is not None and gateway.code == "3200" and gateway.text == "m: d"
    assert parse_fault('{"error":"invalid_grant"}').message == "invalid_grant"  # type: ignore[union-attr]
    assert parse_fault("") is None and parse_fault("{}") is None
    assert parse_fault("Bad Gateway").message == "Bad Gateway"  # type: ignore[union-attr]


def test_the_same_requestid_in_progress_is_retried_without_the_60_s_wait(
    fake: FakeQuickBooks, adapter: QuickBooksAdapter
) -> None:
    fake.inject_error("POST", QUERY, status=409, code="6000", message="in progress")
    error = classified(adapter, raised(adapter))
    assert type(error) is TransientError and error.retry_after is None


def test_a_throttle_in_an_html_page_is_a_throttle() -> None:
    page = (
        "<html><head><title>Error</title></head><body>message=ThrottleExceeded; "
        "errorCode=003001; statusCode=429</body></html>"
    )
    from quickbooks.exceptions import QuickbooksException

    raised = QuickbooksException(f"Error returned with status code '400': {page}", 10000)
    error = classify_quickbooks_error(raised)
    assert isinstance(error, RateLimitedError) and error.retry_after == 60.0
    assert error.status == 400 and error.code == "3001"
