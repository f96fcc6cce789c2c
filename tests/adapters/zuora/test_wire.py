"""The Zuora adapter without a server: mappers, settings, the WSDL, envelopes, classification.

Classification is checked on what zeep really raises for real HTTP answers (a
``requests.Response`` handed to zeep's own reply parser), and every envelope the adapter builds is
checked against the schemas of the 78.0 and the 82.0 WSDL.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from kiki_billing_adapters.zuora import (
    DEFAULT_WSDL,
    SESSION_MASK,
    ZuoraAdapter,
    ZuoraApiError,
    ZuoraClientSettings,
    ZuoraSettings,
    ZuoraWsdl,
    classify_zuora_error,
    subscription_name,
    to_zuora_account,
    to_zuora_activation,
    to_zuora_contact,
    to_zuora_subscribe,
    with_session,
    zoql_literal,
    zuora_amount,
)
from kiki_billing_adapters.zuora.wire import (
    account_query,
    account_status_query,
    contact_query,
    invoice_items_query,
    invoice_query,
    subscription_query,
)
from pydantic import ValidationError
from zeep.exceptions import Fault

from kiki_billing.models import InvoiceLine, LineKind
from kiki_billing.plugin import (
    AmountLimitError,
    ConfigurationError,
    CredentialsExpired,
    RateLimitedError,
    StepContext,
    TerminalError,
    TransientError,
)
from tests.adapters.zuora.conftest import MakeAdapter, Pusher, invoice
from tests.support.fake_zuora import DEFAULT_PASSWORD, FakeZuora
from tests.support.zuora_wsdl import WSDL_78, WSDL_82, WSDLS, schema_for

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

ID_A = "2c92c0f95a0f1c3f015a10ce6f2d3b8d"
ID_B = "2c92c0f95a0f1c3f015a10ce6f4a3b91"
ID_C = "2c92c0f8aaaaaaaaaaaaaaaaaaaaaaaa"
LOCAL = "http://127.0.0.1:9/apps/services/a/78.0"


def settings(**overrides: Any) -> ZuoraSettings:
    values: dict[str, Any] = {"username": "api@example.com", "password": "s3cret-Pa55"}
    values.update(overrides)
    return ZuoraSettings(**values)


def client(**overrides: Any) -> ZuoraClientSettings:
    return ZuoraClientSettings(
        **{"product_rate_plan_id": ID_A, "product_rate_plan_charge_id": ID_B, **overrides}
    )


def with_lines(fees: list[str], currency: str = "USD") -> Any:
    base = invoice(currency=currency)
    template: InvoiceLine = base.lines[0]
    lines = tuple(
        template.model_copy(
            update={
                "line_no": n,
                "description": f"Line {n}",
                "fee": Decimal(fee),
                "kind": LineKind.CAMPAIGN if Decimal(fee) >= 0 else LineKind.FEE_CAP,
            }
        )
        for n, fee in enumerate(fees, 1)
    )
    total = sum((Decimal(f) for f in fees), Decimal(0))
    return base.model_copy(update={"lines": lines, "total_fee": total})


# --------------------------------------------------------------------------------------------
# Mappers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        ("2209", "USD", "2209.00"),
        ("-1418.00", "USD", "-1418.00"),
        ("0.1", "EUR", "0.10"),
        ("1500", "JPY", "1500"),
        ("12.345", "KWD", "12.345"),
        ("99999999999.99", "USD", "99999999999.99"),
    ],
)
def test_amounts_are_the_exact_decimal_text_in_minor_units(
    amount: str, currency: str, text: str
) -> None:
    assert zuora_amount(Decimal(amount), currency) == text


@pytest.mark.parametrize(("amount", "currency"), [("10.005", "USD"), ("10.5", "JPY"), ("1", "XXQ")])
def test_amounts_finer_than_the_minor_unit_are_refused(amount: str, currency: str) -> None:
    with pytest.raises(AmountLimitError):
        zuora_amount(Decimal(amount), currency)


def test_subscription_name_is_the_invoice_number_and_the_keys_prefix() -> None:
    inv = invoice(3)
    key = "k1-0123456789abcdef0123456789abcdef"
    assert subscription_name(inv, key) == "KIKI-OaaS-202601-000003-k1-0123456789abcdef"
    assert subscription_name(inv, key) == subscription_name(inv, key)
    assert subscription_name(inv, "k1-f" + key[4:]) != subscription_name(inv, key)
    assert len(subscription_name(inv, key)) == 43


def test_zoql_literals_are_escaped() -> None:
    assert zoql_literal("acme") == "'acme'"
    assert zoql_literal("o'brien\\x") == "'o\\'brien\\\\x'"
    assert account_query("acme") == (
        "select Id, AccountNumber, Currency, Status, BillToId from Account "
        "where AccountNumber = 'acme'"
    )
    assert "where Id = 'x'" in account_status_query("x")
    assert "from Contact where AccountId = 'x'" in contact_query("x")
    assert "from Subscription where Name = 'x'" in subscription_query("x")
    assert "from InvoiceItem where SubscriptionId = 'x'" in invoice_items_query("x")
    assert "InvoiceNumber, Amount, Balance, Status from Invoice" in invoice_query("x")


def test_a_new_account_is_a_draft_in_the_invoices_currency() -> None:
    inv = invoice(currency="EUR", client="acme")
    assert to_zuora_account(inv, client()) == {
        "AccountNumber": "acme",
        "Batch": "Batch1",
        "BillCycleDay": 1,
        "Currency": "EUR",
        "Name": inv.client_name,
        "Notes": "kiki-billing client acme",
        "PaymentTerm": "Net 30",
        "Status": "Draft",
    }
    assert to_zuora_account(inv, client(account_number="ACME-01"))["AccountNumber"] == "ACME-01"
    zero = inv.model_copy(update={"payment_terms_days": 0})
    assert to_zuora_account(zero, client())["PaymentTerm"] == "Due Upon Receipt"


def test_contact_and_activation() -> None:
    inv = invoice()
    long_name = inv.model_copy(update={"client_name": "X" * 150, "client_email": None})
    assert to_zuora_contact(inv, ID_C) == {
        "AccountId": ID_C,
        "FirstName": "Billing",
        "LastName": inv.client_name,
        "WorkEmail": inv.client_email,
    }
    assert to_zuora_contact(long_name, ID_C) == {
        "AccountId": ID_C,
        "FirstName": "Billing",
        "LastName": "X" * 100,
    }
    assert to_zuora_activation(ID_C, ID_A) == {
        "Id": ID_C,
        "BillToId": ID_A,
        "SoldToId": ID_A,
        "Status": "Active",
    }


def test_subscribe_has_one_rate_plan_per_line_at_the_lines_fee() -> None:
    inv = with_lines(["2209.00", "2209.00", "-1418.00"])
    request = to_zuora_subscribe(inv, client(process_payments=True), ID_C, "NAME-1")
    plans = request["SubscriptionData"]["RatePlanData"]
    # Two instances of one charge need two RatePlanData entries.
    assert [p["RatePlan"]["ProductRatePlanId"] for p in plans] == [ID_A] * 3
    charges = [p["RatePlanChargeData"] for p in plans]
    assert [c[0]["RatePlanCharge"]["Price"] for c in charges] == ["2209.00", "2209.00", "-1418.00"]
    assert {c[0]["RatePlanCharge"]["ProductRatePlanChargeId"] for c in charges} == {ID_B}
    assert [c[0]["RatePlanCharge"]["Description"] for c in charges] == [
        "Line 1",
        "Line 2",
        "Line 3",
    ]
    assert request["Account"] == {"Id": ID_C}
    options = request["SubscribeOptions"]
    assert options["GenerateInvoice"] is True and options["ProcessPayments"] is True
    processing = options["SubscribeInvoiceProcessingOptions"]
    assert processing["InvoiceProcessingScope"] == "Subscription"
    assert processing["InvoiceDate"] == processing["InvoiceTargetDate"] == "2026-02-01"
    subscription = request["SubscriptionData"]["Subscription"]
    assert subscription["Name"] == "NAME-1"
    assert subscription["ContractEffectiveDate"] == "2026-02-01"
    assert subscription["IsInvoiceSeparate"] is True and subscription["AutoRenew"] is False
    assert (
        to_zuora_subscribe(inv, client(), ID_C, "N")["SubscribeOptions"]["ProcessPayments"] is False
    )


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_come_from_the_exact_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIKI_ZUORA_USERNAME", "api@example.com")
    monkeypatch.setenv("KIKI_ZUORA_PASSWORD", "s3cret-Pa55")
    monkeypatch.setenv("KIKI_ZUORA_API_BASE", "https://rest.eu.zuora.com/apps/services/a/78.0")
    monkeypatch.setenv("KIKI_ZUORA_WSDL", str(WSDL_82))
    monkeypatch.setenv("KIKI_ZUORA_CONCURRENCY", "5")
    read = ZuoraAdapter.read_settings()
    assert isinstance(read, ZuoraSettings)
    assert read.username.get_secret_value() == "api@example.com"
    assert read.password.get_secret_value() == "s3cret-Pa55"
    assert read.api_base == "https://rest.eu.zuora.com/apps/services/a/78.0"
    assert read.wsdl == str(WSDL_82)
    adapter = ZuoraAdapter(read)
    assert adapter.rate_limit().concurrency == 5
    shown = f"{read!r} {read} {adapter.account}"
    assert "s3cret-Pa55" not in shown and "api@example.com" not in shown
    assert adapter.account.startswith("rest.eu.zuora.com:user-")


def test_missing_or_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("USERNAME", "PASSWORD", "API_BASE", "WSDL"):
        monkeypatch.delenv(f"KIKI_ZUORA_{name}", raising=False)
    with pytest.raises(ConfigurationError, match="KIKI_ZUORA_USERNAME is not set"):
        ZuoraAdapter.read_settings()
    monkeypatch.setenv("KIKI_ZUORA_USERNAME", "api@example.com")
    monkeypatch.setenv("KIKI_ZUORA_PASSWORD", "pass word")
    with pytest.raises(ConfigurationError, match="KIKI_ZUORA_PASSWORD is invalid") as caught:
        ZuoraAdapter.read_settings()
    assert "pass word" not in str(caught.value)
    monkeypatch.setenv("KIKI_ZUORA_PASSWORD", "ok")
    monkeypatch.setenv("KIKI_ZUORA_API_BASE", "http://www.zuora.com/apps/services/a/78.0")
    with pytest.raises(ConfigurationError, match="KIKI_ZUORA_API_BASE is invalid: uses plain"):
        ZuoraAdapter.read_settings()


def test_the_endpoint_defaults_to_the_wsdls_address() -> None:
    assert ZuoraAdapter(settings()).endpoint == "https://www.zuora.com/apps/services/a/78.0"
    sandbox = ZuoraAdapter(settings(wsdl=str(WSDL_82)))
    assert sandbox.endpoint == "https://apisandbox.zuora.com/apps/services/a/82.0"
    assert sandbox.account.startswith("apisandbox.zuora.com:user-")
    assert ZuoraAdapter(settings(api_base=LOCAL)).endpoint == LOCAL


def test_client_settings_check_ids_and_keys() -> None:
    assert client().process_payments is False and client().account_number is None
    for bad in ({"product_rate_plan_id": "short"}, {"account_number": "has space"}):
        with pytest.raises(ValidationError):
            client(**bad)
    with pytest.raises(ValidationError):
        ZuoraClientSettings(product_rate_plan_id=ID_A)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="Extra inputs"):
        client(customer="x")
    defaults = {"product_rate_plan_id": ID_A, "product_rate_plan_charge_id": ID_B}
    merged = ZuoraAdapter.client_settings(defaults, {"process_payments": True})
    assert merged == client(process_payments=True)


def test_published_limits() -> None:
    limit = ZuoraAdapter(settings()).rate_limit()
    assert [(w.requests, w.seconds) for w in limit.windows] == [(50_000, 60.0)]
    assert limit.concurrency == 20


# --------------------------------------------------------------------------------------------
# The WSDL
# --------------------------------------------------------------------------------------------


def test_the_default_wsdl_ships_with_its_provenance() -> None:
    assert DEFAULT_WSDL.read_bytes() == WSDL_78.read_bytes()
    provenance = (DEFAULT_WSDL.parent / "PROVENANCE.md").read_text()
    assert "f46dfc8787a784466aa1f5d622aaae102986e322" in provenance
    assert "Apache-2.0" in provenance


def test_a_wsdl_is_parsed_once_per_process() -> None:
    assert ZuoraWsdl.load(WSDL_82) is ZuoraWsdl.load(str(WSDL_82))
    first, second = ZuoraAdapter(settings()), ZuoraAdapter(settings())
    assert first.wsdl is second.wsdl is ZuoraWsdl.load(None)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot be read"),
        ("not xml at all", "is not a WSDL"),
        ("<root/>", "is not a Zuora WSDL"),
    ],
)
def test_a_bad_wsdl_is_a_configuration_error(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    path = tmp_path / "tenant.wsdl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError) as caught:
        ZuoraAdapter(settings(wsdl=str(path)))
    message = str(caught.value)
    assert message.startswith(f"KIKI_ZUORA_WSDL: {path} {reason}")
    assert "\n" not in message


def test_a_wsdl_without_a_field_the_adapter_sends_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.wsdl"
    text = WSDL_78.read_text()
    path.write_text(text.replace('name="IsInvoiceSeparate"', 'name="IsSeparate"'))
    with pytest.raises(ConfigurationError, match="Subscription has no field IsInvoiceSeparate"):
        ZuoraAdapter(settings(wsdl=str(path)))


def test_a_wsdl_is_never_fetched_over_the_network(tmp_path: Path) -> None:
    path = tmp_path / "remote.wsdl"
    text = WSDL_78.read_text()
    path.write_text(
        text.replace(
            '<import namespace="http://api.zuora.com/" />',
            '<import namespace="http://api.zuora.com/" '
            'schemaLocation="https://www.zuora.com/apps/services/a/78.0?xsd=1" />',
            1,
        )
    )
    with pytest.raises(ConfigurationError, match="never fetches WSDL parts over the network"):
        ZuoraAdapter(settings(wsdl=str(path)))


# --------------------------------------------------------------------------------------------
# Envelopes
# --------------------------------------------------------------------------------------------

REFS = {"account_id": ID_C, "bill_to_contact_id": ID_A, "invoice_id": ID_B}


def step_requests(adapter: ZuoraAdapter, inv: Any, refs: dict[str, str]) -> dict[str, Any]:
    settings_ = client()
    key = "k1-0123456789abcdef0123456789abcdef"
    return {
        step.name: step.request(StepContext(inv, settings_, refs, key))
        for step in adapter.steps(inv, settings_)
    }


@pytest.mark.parametrize("wsdl", WSDLS, ids=["78.0", "82.0"])
def test_every_envelope_the_adapter_sends_conforms_to_the_wsdl(wsdl: Path) -> None:
    adapter = ZuoraAdapter(settings(wsdl=str(wsdl), api_base=LOCAL))
    schema = schema_for(wsdl)
    inv = with_lines(["2209.00", "2209.00", "-1418.00"])
    requests_ = step_requests(adapter, inv, REFS)
    assert [r.payload["operation"] for r in requests_.values()] == [
        "create",
        "create",
        "update",
        "subscribe",
        "query",
    ]
    envelopes = [with_session(r.payload["envelope"], "S" * 96) for r in requests_.values()]
    queries = [
        account_query("acme"),
        account_status_query(ID_C),
        contact_query(ID_C),
        subscription_query("KIKI-OaaS-202601-000001-k1-0123456789abcdef"),
        invoice_items_query(ID_C),
    ]
    envelopes += [with_session(adapter.wsdl.query(q).xml, "S" * 96) for q in queries]
    envelopes.append(adapter.wsdl.login("api@example.com", "s3cret-Pa55"))
    for envelope in envelopes:
        schema.check_envelope(envelope)
    subscribe = requests_["subscribe"]
    assert (
        "<ns1:useSingleTransaction>true</ns1:useSingleTransaction>"
        in (subscribe.payload["envelope"])
    )
    assert subscribe.headers == {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
    assert {r.method for r in requests_.values()} == {"POST"}
    assert {r.path for r in requests_.values()} == {"/apps/services/a/78.0"}


def test_envelopes_mask_the_session_and_sending_changes_nothing_else() -> None:
    adapter = ZuoraAdapter(settings(api_base=LOCAL))
    built = step_requests(adapter, invoice(), REFS)["subscribe"].payload["envelope"]
    assert f"<ns0:session>{SESSION_MASK}</ns0:session>" in built
    assert "s3cret-Pa55" not in built
    sent = with_session(built, "real-session-id").decode()
    assert sent == built.replace(
        f"<ns0:session>{SESSION_MASK}</ns0:session>", "<ns0:session>real-session-id</ns0:session>"
    )
    odd = with_session(built, "a<b&c").decode()
    assert "<ns0:session>a&lt;b&amp;c</ns0:session>" in odd


def test_dry_run_requests_carry_placeholders_for_ids_not_known_yet() -> None:
    adapter = ZuoraAdapter(settings(api_base=LOCAL))
    built = step_requests(adapter, invoice(), {})
    assert ">{account_id}<" in built["contact"].payload["envelope"]
    assert ">{bill_to_contact_id}<" in built["activate"].payload["envelope"]
    assert ">{account_id}<" in built["subscribe"].payload["envelope"]
    assert "Id = '{invoice_id}'" in built["verify"].payload["envelope"]


def test_validation_refuses_what_zuora_would() -> None:
    adapter = ZuoraAdapter(settings(api_base=LOCAL))
    adapter.validate(with_lines(["1.00"] * 50), client())
    with pytest.raises(TerminalError, match="at most 50 rate plans"):
        adapter.validate(with_lines(["1.00"] * 51), client())
    with pytest.raises(AmountLimitError):
        adapter.validate(with_lines(["1.005"]), client())
    long = invoice().model_copy(update={"client_id": "c" * 71})
    with pytest.raises(TerminalError, match="70-character AccountNumber"):
        adapter.validate(long, client())
    adapter.validate(long, client(account_number="C-71"))
    with pytest.raises(TerminalError, match=r"Contact\.WorkEmail"):
        adapter.validate(invoice().model_copy(update={"client_email": "a@" + "b" * 90}), client())


# --------------------------------------------------------------------------------------------
# Classification, from real answers parsed by zeep
# --------------------------------------------------------------------------------------------


class Answer:
    """A transport that answers every post with one prepared HTTP response."""

    def __init__(self, status: int, body: bytes | str, headers: dict[str, str] | None = None):
        self.response = requests.Response()
        self.response.status_code = status
        self.response._content = body.encode() if isinstance(body, str) else body
        self.response.headers.update(
            {
                "Content-Type": "text/xml; charset=utf-8",
                "Zuora-Request-Id": "req-1",
                **(headers or {}),
            }
        )

    def post(self, address: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return self.response


def fault(code: str, message: str, detail: str = "UnexpectedErrorFault") -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
        f'<soapenv:Fault><faultcode xmlns:fns="http://fault.api.zuora.com/">fns:{code}'
        f"</faultcode><faultstring>{message}</faultstring><detail><fns:{detail} "
        'xmlns:fns="http://fault.api.zuora.com/"><fns:FaultCode>'
        f"{code}</fns:FaultCode><fns:FaultMessage>{message}</fns:FaultMessage></fns:{detail}>"
        "</detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )


def answer(
    status: int,
    body: str,
    headers: dict[str, str] | None = None,
    operation: str = "query",
) -> Any:
    wsdl = ZuoraWsdl.load(None)
    envelope = wsdl.query("select Id from Account where Id = '1'")
    if operation == "login":
        try:
            return wsdl.post_login(Answer(status, body, headers), LOCAL, "u", "p")
        except Exception as exc:
            return exc
    try:
        return wsdl.post(Answer(status, body, headers), LOCAL, envelope, session="s")
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("LOCK_COMPETITION", TransientError),
        ("TEMPORARY_ERROR", TransientError),
        ("SERVER_UNAVAILABLE", TransientError),
        ("TRANSACTION_TIMEOUT", TransientError),
        ("UNKNOWN_ERROR", TransientError),
        ("REQUEST_EXCEEDED_RATE", RateLimitedError),
        ("INVALID_SESSION", CredentialsExpired),
        ("INVALID_VALUE", TerminalError),
        ("MISSING_REQUIRED_VALUE", TerminalError),
        ("INVALID_FIELD", TerminalError),
        ("NO_PERMISSION", TerminalError),
    ],
)
def test_soap_faults_classify_by_zuoras_code(code: str, kind: type[Exception]) -> None:
    raised = answer(500, fault(code, f"{code} said Zuora"))
    assert isinstance(raised, ZuoraApiError)
    classified = classify_zuora_error(raised)
    assert type(classified) is kind, classified
    assert classified.code == code and classified.status == 500
    assert classified.request_id == "req-1"
    assert str(classified) == (
        f"Zuora query: {code} said Zuora (HTTP 500, code {code}, request req-1)"
    )


def test_a_429_is_rate_limited_with_retry_after() -> None:
    raised = answer(429, fault("REQUEST_EXCEEDED_LIMIT", "Too many"), {"Retry-After": "7"})
    classified = classify_zuora_error(raised)
    assert isinstance(classified, RateLimitedError)
    assert classified.retry_after == 7.0 and classified.status == 429


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_http_errors_without_soap_are_transient(status: int) -> None:
    raised = answer(
        status, "<html><body>Service Unavailable</body></html>", {"Content-Type": "text/html"}
    )
    classified = classify_zuora_error(raised)
    assert type(classified) is TransientError and classified.status == status


def test_an_empty_error_and_a_non_soap_200_are_transient() -> None:
    assert type(classify_zuora_error(answer(502, ""))) is TransientError
    assert type(classify_zuora_error(answer(200, "<<not xml"))) is TransientError
    assert type(classify_zuora_error(answer(404, "<html/>"))) is TerminalError


def test_a_refused_login_is_terminal_with_zuoras_message() -> None:
    raised = answer(
        500,
        fault("INVALID_VALUE", "Invalid login. User name and password do not match.", "LoginFault"),
        operation="login",
    )
    classified = classify_zuora_error(raised)
    assert type(classified) is TerminalError
    assert classified.message == (
        "Zuora refused the login of KIKI_ZUORA_USERNAME: Invalid login. User name and password "
        "do not match."
    )


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError("Connection reset by peer"),
        requests.ReadTimeout("read timed out"),
        requests.exceptions.ChunkedEncodingError("Connection broken"),
    ],
)
def test_no_answer_is_transient(error: Exception) -> None:
    assert type(classify_zuora_error(error)) is TransientError


def test_other_errors() -> None:
    assert isinstance(classify_zuora_error(Fault("x", code="fns:LOCK_COMPETITION")), TransientError)
    assert type(classify_zuora_error(Fault("bad", code="fns:INVALID_ID"))) is TerminalError
    assert type(classify_zuora_error(ConfigurationError("no wsdl"))) is TerminalError
    assert type(classify_zuora_error(ValueError("bug"))) is TerminalError
    result = ZuoraApiError(
        "The subscription name X already exists.",
        operation="subscribe",
        code="DUPLICATE_VALUE",
        field="Name",
    )
    classified = classify_zuora_error(result)
    assert type(classified) is TerminalError
    assert str(classified) == (
        "Zuora subscribe: The subscription name X already exists. (field Name) "
        "(code DUPLICATE_VALUE)"
    )


def test_the_hub_scrubs_credentials_from_messages() -> None:
    adapter = ZuoraAdapter(settings(api_base=LOCAL))
    error = adapter.classify_error(
        ZuoraApiError(
            "user api@example.com with s3cret-Pa55", operation="create", code="INVALID_VALUE"
        )
    )
    assert "s3cret-Pa55" not in str(error) and "api@example.com" not in str(error)


# --------------------------------------------------------------------------------------------
# Nothing secret in logs
# --------------------------------------------------------------------------------------------


def test_no_credential_or_session_reaches_a_log(
    fake: FakeZuora, make_adapter: MakeAdapter, pusher: Pusher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("zeep", "zeep.transports", "urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    [outcome] = pusher.push(make_adapter(), invoice())
    assert outcome.ok, outcome.error
    sessions = list(fake.app.sessions)
    assert sessions
    text = caplog.text
    for secret in (DEFAULT_PASSWORD, *sessions):
        assert secret not in text
