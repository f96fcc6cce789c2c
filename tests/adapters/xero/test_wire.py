"""The Xero adapter without the hub: mappers, validation, settings and error classification.

Classification is checked on real HTTP answers of the local fake (429s of every kind, 401,
403, 400, 404, 503) and real ``requests`` failures (a refused connection, a reset, a timeout).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from kiki_billing_adapters.xero import (
    SCOPES,
    XeroAdapter,
    XeroClientSettings,
    XeroHTTPError,
    XeroSettings,
    classify_xero_error,
    encode_json,
    to_xero_contact,
    to_xero_invoice,
    xero_amount,
    xero_invoice_number,
)
from kiki_billing_adapters.xero.wire import (
    contact_lookup_path,
    element_errors,
    error_message,
    invoice_lookup_path,
    where_equals,
)
from pydantic import ValidationError

from kiki_billing.errors import ConfigurationError
from kiki_billing.plugin import (
    AmountLimitError,
    CredentialsExpired,
    RateLimitedError,
    StepContext,
    TerminalError,
    TransientError,
)
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_xero import PREFIX, FakeXero, parse_where
from tests.support.xero_spec import load_spec, request_problems

from .conftest import MakeAdapter

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

CONTACT = "430fa14a-f945-44d3-9f97-5df5e28441b8"
TENANT = "6f1c2a9e-4b7d-4c1e-9a3f-2d5e8b0c7a14"
HEADERS = {"xero-tenant-id": TENANT, "Idempotency-Key": "k1-0123"}


def invoice_with(fees: list[str], currency: str = "USD", **changes: Any) -> Any:
    invoice = sample_invoice(currency, lines=len(fees))
    lines = tuple(
        line.model_copy(update={"fee": Decimal(fee)})
        for line, fee in zip(invoice.lines, fees, strict=True)
    )
    total = sum((Decimal(f) for f in fees), start=Decimal(0))
    return invoice.model_copy(update={"lines": lines, "total_fee": total, **changes})


# --------------------------------------------------------------------------------------------
# Amounts and JSON
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "sent"),
    [
        ("2209.00", "USD", "2209.00"),
        ("0.1", "USD", "0.10"),
        ("-1418.00", "USD", "-1418.00"),
        ("2209", "JPY", "2209"),
        ("220.900", "KWD", "220.90"),
        ("99999999999.99", "USD", "99999999999.99"),
    ],
)
def test_amounts_are_sent_exactly(amount: str, currency: str, sent: str) -> None:
    assert str(xero_amount(Decimal(amount), currency)) == sent
    assert encode_json({"UnitAmount": xero_amount(Decimal(amount), currency)}) == (
        f'{{"UnitAmount": {sent}}}'.encode()
    )


def test_a_third_decimal_xero_would_round_is_refused() -> None:
    with pytest.raises(AmountLimitError, match="2 decimal places"):
        xero_amount(Decimal("12.345"), "KWD")
    with pytest.raises(AmountLimitError):
        xero_amount(Decimal("1"), "XXZ")


def test_json_has_no_floats_and_escapes_text() -> None:
    body = encode_json({"a": [Decimal("0.30"), 1, True, None, 'say "hi"\n']})
    assert body == b'{"a": [0.30, 1, true, null, "say \\"hi\\"\\n"]}'
    assert json.loads(body, parse_float=Decimal)["a"][0] == Decimal("0.30")
    with pytest.raises(TypeError):
        encode_json({"a": Decimal("NaN")})
    with pytest.raises(TypeError):
        encode_json({"a": 0.1})


# --------------------------------------------------------------------------------------------
# Mappers
# --------------------------------------------------------------------------------------------


def test_invoice_names_its_contact_by_id_only_and_carries_every_field() -> None:
    invoice = sample_invoice()
    client = XeroClientSettings(account_code="260", tax_type="NONE", status="DRAFT")
    [body] = to_xero_invoice(invoice, client, CONTACT)["Invoices"]
    assert body["Contact"] == {"ContactID": CONTACT}
    assert body["Type"] == "ACCREC"
    assert body["InvoiceNumber"] == invoice.number
    assert body["Reference"] == "Profit share 2026-01"
    assert (body["Date"], body["DueDate"]) == ("2026-02-01", "2026-03-03")
    assert (body["CurrencyCode"], body["Status"], body["LineAmountTypes"]) == (
        "USD",
        "DRAFT",
        "Exclusive",
    )
    assert [item["UnitAmount"] for item in body["LineItems"]] == [
        Decimal("100.10"),
        Decimal("100.20"),
    ]
    for item, line in zip(body["LineItems"], invoice.lines, strict=True):
        assert item == {
            "Description": line.description,
            "Quantity": Decimal(1),
            "UnitAmount": line.fee,
            "LineAmount": line.fee,
            "AccountCode": "260",
            "TaxType": "NONE",
        }
    assert "BrandingThemeID" not in body


def test_optional_fields_and_revisions() -> None:
    invoice = sample_invoice().model_copy(update={"revision": 2})
    theme = "5d4dd402-c851-497e-aae1-9ff265c0d15a"
    client = XeroClientSettings(branding_theme_id=theme, line_amount_types="Inclusive")
    [body] = to_xero_invoice(invoice, client)["Invoices"]
    assert body["InvoiceNumber"] == f"{invoice.number}-R2" == xero_invoice_number(invoice)
    assert body["Contact"] == {"ContactID": "{contact_id}"}  # dry run, before the contact step
    assert "TaxType" not in body["LineItems"][0]
    assert body["BrandingThemeID"] == theme and body["LineAmountTypes"] == "Inclusive"


def test_contact_carries_name_number_and_email() -> None:
    invoice = sample_invoice()
    assert to_xero_contact(invoice) == {
        "Contacts": [
            {"Name": "Acme Corp", "ContactNumber": "acme", "EmailAddress": "billing@acme.example"}
        ]
    }
    bare = invoice.model_copy(update={"client_email": None})
    assert "EmailAddress" not in to_xero_contact(bare)["Contacts"][0]


def test_every_request_the_adapter_builds_conforms_to_the_spec(make_adapter: MakeAdapter) -> None:
    adapter = make_adapter()
    invoice, client = sample_invoice(lines=3), XeroClientSettings(tax_type="OUTPUT")
    refs = {"contact_id": CONTACT}
    for step in adapter.steps(invoice, client):
        request = step.request(StepContext(invoice, client, refs, "k1-0123"))
        url = PREFIX + request.path
        assert request_problems(request.method, url, encode_json(request.payload), HEADERS) == []
    for path in (contact_lookup_path("acme"), invoice_lookup_path(invoice.number)):
        assert request_problems("GET", PREFIX + path, None, {"xero-tenant-id": TENANT}) == []


def test_every_field_name_sent_is_a_property_of_xeros_schemas() -> None:
    # The spec has no `required` fields, so names are checked against `properties` here too.
    schemas = load_spec()["components"]["schemas"]
    theme = "5d4dd402-c851-497e-aae1-9ff265c0d15a"
    client = XeroClientSettings(tax_type="NONE", branding_theme_id=theme)
    [invoice] = to_xero_invoice(sample_invoice(), client, CONTACT)["Invoices"]
    assert set(invoice) <= set(schemas["Invoice"]["properties"])
    assert set(invoice["Contact"]) <= set(schemas["Contact"]["properties"])
    assert set(invoice["LineItems"][0]) <= set(schemas["LineItem"]["properties"])
    [contact] = to_xero_contact(sample_invoice())["Contacts"]
    assert set(contact) <= set(schemas["Contact"]["properties"])
    read_only = {k for k, v in schemas["Invoice"]["properties"].items() if v.get("readOnly")}
    assert not set(invoice) & read_only


@pytest.mark.parametrize("client_id", ["acme", 'a"b', "back\\slash", "x y=z&w", "ünï"])
def test_contact_look_up_filter_survives_quotes_and_escapes(client_id: str) -> None:
    query = parse_qs(urlsplit(contact_lookup_path(client_id)).query)
    [where] = query["where"]
    assert where == where_equals("ContactNumber", client_id)
    assert parse_where(where) == [("ContactNumber", client_id)]


def test_invoice_look_up_is_by_number() -> None:
    assert invoice_lookup_path("KIKI-OaaS-202601-000001") == (
        "/Invoices?InvoiceNumbers=KIKI-OaaS-202601-000001"
    )


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

VALID_ENV = {
    "KIKI_XERO_CLIENT_ID": "0123456789ABCDEF0123456789ABCDEF",
    "KIKI_XERO_CLIENT_SECRET": "secret-value-do-not-show",
    "KIKI_XERO_REFRESH_TOKEN": "refresh-value-do-not-show",
    "KIKI_XERO_TENANT_ID": TENANT,
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in VALID_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_settings_from_the_environment_with_xeros_defaults(env: pytest.MonkeyPatch) -> None:
    settings = XeroAdapter.read_settings()
    assert isinstance(settings, XeroSettings)
    assert settings.api_base == "https://api.xero.com/api.xro/2.0"
    assert settings.token_url == "https://identity.xero.com/connect/token"
    assert settings.connections_url == "https://api.xero.com/connections"
    adapter = XeroAdapter(settings)
    assert adapter.account == TENANT
    shown = f"{settings!r} {settings} {adapter.account}"
    assert "do-not-show" not in shown
    limit = adapter.rate_limit()
    assert [(w.requests, w.seconds) for w in limit.windows] == [(60, 60.0), (5000, 86400.0)]
    assert limit.concurrency == 5


@pytest.mark.parametrize(
    "variable", ["KIKI_XERO_CLIENT_ID", "KIKI_XERO_CLIENT_SECRET", "KIKI_XERO_TENANT_ID"]
)
def test_a_missing_setting_is_named(env: pytest.MonkeyPatch, variable: str) -> None:
    env.delenv(variable)
    with pytest.raises(ConfigurationError, match=f"{variable} is not set"):
        XeroAdapter.read_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KIKI_XERO_CLIENT_ID", "not a client id!"),
        ("KIKI_XERO_CLIENT_SECRET", "secret with space"),
        ("KIKI_XERO_REFRESH_TOKEN", "refresh\nwith-newline"),
        ("KIKI_XERO_TENANT_ID", "acme-tenant"),
        ("KIKI_XERO_API_BASE", "http://api.example.com/api.xro/2.0"),
        ("KIKI_XERO_TOKEN_URL", "ftp://identity.xero.com/connect/token"),
    ],
)
def test_a_malformed_setting_is_named_never_shown(
    env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    env.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"{variable} is invalid") as caught:
        XeroAdapter.read_settings()
    assert value not in str(caught.value)


def test_client_settings_take_exports_xero_defaults_they_know() -> None:
    defaults = {"account_code": "260", "tax_type": "OUTPUT", "date_format": "MM/DD/YYYY"}
    defaults["branding_theme"] = "Standard"
    client = XeroAdapter.client_settings(defaults, {"status": "DRAFT"})
    assert client == XeroClientSettings(account_code="260", tax_type="OUTPUT", status="DRAFT")
    assert XeroAdapter.defaults_tables == ("exports.xero",)


def test_a_csv_tax_rate_name_is_refused_as_a_tax_type() -> None:
    with pytest.raises(ValidationError, match="TaxType code"):
        XeroClientSettings(tax_type="Tax Exempt")
    with pytest.raises(ValidationError):
        XeroClientSettings(status="PAID")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        XeroClientSettings(contact_id="acme")


# --------------------------------------------------------------------------------------------
# Validation before any call
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_name": "x" * 256}, "client name is 256 characters long; Xero takes at most 255"),
        ({"client_id": "c" * 51}, r"ContactNumber\) is 51 characters long"),
        ({"client_email": "a" * 250 + "@b.com"}, "client email"),
    ],
)
def test_contact_texts_over_xeros_limits_are_refused(
    make_adapter: MakeAdapter, changes: dict[str, Any], message: str
) -> None:
    adapter, invoice = make_adapter(), sample_invoice().model_copy(update=changes)
    with pytest.raises(TerminalError, match=message):
        adapter.validate(invoice, XeroClientSettings())
    # An existing contact is not created: its texts are Xero's business.
    adapter.validate(invoice, XeroClientSettings(contact_id=CONTACT))


def test_amounts_xero_would_round_or_refuse_are_refused(make_adapter: MakeAdapter) -> None:
    adapter, client = make_adapter(), XeroClientSettings()
    with pytest.raises(AmountLimitError, match="2 decimal places"):
        adapter.validate(invoice_with(["220.905"], "KWD"), client)
    adapter.validate(invoice_with(["220.900", "1.010"], "KWD"), client)
    adapter.validate(invoice_with(["2209"], "JPY"), client)
    with pytest.raises(AmountLimitError, match="less than zero"):
        adapter.validate(invoice_with(["10.00", "-20.00"]), client)
    long_line = sample_invoice().lines[0].model_copy(update={"description": "d" * 4001})
    with pytest.raises(TerminalError, match="4000"):
        adapter.validate(sample_invoice().model_copy(update={"lines": (long_line,)}), client)


# --------------------------------------------------------------------------------------------
# Classification, from real answers
# --------------------------------------------------------------------------------------------


def failure(adapter: XeroAdapter, fake: FakeXero, status: int, **headers: str) -> Exception:
    fake.inject_error("GET", f"{PREFIX}/Organisation", status=status, headers=headers)
    with pytest.raises(Exception) as caught:
        adapter._call("GET", "/Organisation")
    return caught.value


def test_429_minute_and_concurrent_wait_retry_after(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    for problem in ("minute", "concurrent", "appminute"):
        raw = failure(adapter, fake, 429, **{"Retry-After": "7", "X-Rate-Limit-Problem": problem})
        assert isinstance(raw, XeroHTTPError)
        error = adapter.classify_error(raw)
        assert isinstance(error, RateLimitedError)
        assert (error.window, error.retry_after, error.status) == (problem, 7.0, 429)
        assert error.request_id == raw.headers["xero-correlation-id"]


def test_429_day_gives_the_seconds_until_the_reset(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    raw = failure(adapter, fake, 429, **{"Retry-After": "40000", "X-Rate-Limit-Problem": "day"})
    error = adapter.classify_error(raw)
    assert isinstance(error, RateLimitedError)
    assert (error.window, error.retry_after) == ("day", 40000.0)
    assert "daily call limit" in error.message and "40000 s" in error.message


def test_429_day_hits_the_real_window_of_the_fake(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    from tests.support.fake_provider import RateLimits, Window

    adapter = make_adapter()
    adapter._call("GET", "/Organisation")  # the token first
    fake.configure(rate_limits=RateLimits(windows=(Window(2, 86400.0, "day"),)))
    adapter._call("GET", "/Organisation")
    adapter._call("GET", "/Organisation")
    with pytest.raises(XeroHTTPError) as caught:
        adapter._call("GET", "/Organisation")
    error = adapter.classify_error(caught.value)
    assert isinstance(error, RateLimitedError) and error.window == "day"
    assert error.retry_after is not None and 86000 < error.retry_after <= 86400


def test_401_is_a_refreshable_credential_and_marks_the_token(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    first = adapter.tokens.access_token()
    fake.app.revoke_access_tokens()
    with pytest.raises(XeroHTTPError) as caught:
        adapter._call("GET", "/Organisation")
    error = adapter.classify_error(caught.value)
    assert isinstance(error, CredentialsExpired) and error.status == 401
    assert "AuthenticationUnsuccessful" in error.message
    assert adapter.tokens.access_token() != first  # refreshed before the retry


def test_403_400_404_are_terminal_and_5xx_transient(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    forbidden = adapter.classify_error(failure(adapter, fake, 403))
    assert isinstance(forbidden, TerminalError) and "KIKI_XERO_TENANT_ID" in forbidden.message
    invalid = adapter.classify_error(failure(adapter, fake, 400))
    assert isinstance(invalid, TerminalError) and invalid.code == "PostDataInvalidException"
    missing = adapter.classify_error(failure(adapter, fake, 404))
    assert isinstance(missing, TerminalError) and "cannot be found" in missing.message
    for status in (500, 503):
        down = adapter.classify_error(failure(adapter, fake, status))
        assert isinstance(down, TransientError) and not isinstance(down, RateLimitedError)


def test_validation_exception_carries_every_elements_messages() -> None:
    body = {
        "ErrorNumber": 10,
        "Type": "ValidationException",
        "Message": "A validation exception occurred",
        "Elements": [
            {"ValidationErrors": [{"Message": "Invoice # must be unique."}]},
            {"ValidationErrors": [{"Message": "Organisation is not subscribed to currency JPY"}]},
        ],
    }
    error = classify_xero_error(XeroHTTPError(400, {}, body, "PUT /Invoices"))
    assert isinstance(error, TerminalError) and error.code == "ValidationException"
    assert error.message == (
        "A validation exception occurred: Invoice # must be unique.; Organisation is not "
        "subscribed to currency JPY"
    )
    assert element_errors({"HasErrors": True}) == [
        "Xero reported a validation error without a message"
    ]
    assert error_message({"error": "invalid_grant"}, "x") == ("invalid_grant", "invalid_grant")


def test_no_answer_is_transient(make_adapter: MakeAdapter, fake: FakeXero) -> None:
    adapter = make_adapter()
    adapter.tokens.access_token()
    fake.inject_drop("GET", f"{PREFIX}/Organisation")
    with pytest.raises(requests.ConnectionError) as reset:
        adapter._call("GET", "/Organisation")
    assert isinstance(adapter.classify_error(reset.value), TransientError)
    closed = make_adapter(api_base="http://127.0.0.1:9/api.xro/2.0")
    closed.credentials = adapter.credentials
    with pytest.raises(requests.ConnectionError) as refused:
        closed._call("GET", "/Organisation")
    assert isinstance(closed.classify_error(refused.value), TransientError)
    assert isinstance(adapter.classify_error(requests.Timeout("slow")), TransientError)
    assert isinstance(adapter.classify_error(RuntimeError("bug")), TerminalError)


# --------------------------------------------------------------------------------------------
# First connection
# --------------------------------------------------------------------------------------------


def test_authorization_url_asks_for_invoices_contacts_and_offline_use(
    make_adapter: MakeAdapter,
) -> None:
    adapter = make_adapter()
    url = adapter.authorization_url("http://127.0.0.1:8765/callback", "state-123")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
        "https://login.xero.com/identity/connect/authorize"
    )
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "response_type": "code",
        "client_id": adapter.settings.client_id,
        "redirect_uri": "http://127.0.0.1:8765/callback",
        "scope": "offline_access accounting.transactions accounting.contacts",
        "state": "state-123",
    }
    assert SCOPES == ("offline_access", "accounting.transactions", "accounting.contacts")


def test_a_2xx_without_json_is_an_unknown_outcome_not_a_failure(
    make_adapter: MakeAdapter, fake: FakeXero
) -> None:
    adapter = make_adapter()
    adapter.tokens.access_token()
    proxy_page = requests.Response()
    proxy_page.status_code, proxy_page._content = 200, b"<html>gateway</html>"
    adapter._http().request = lambda *a, **k: proxy_page  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="answered 200 without a JSON object"):
        adapter._call("PUT", "/Invoices?summarizeErrors=false", {"Invoices": []}, "k1-x")
