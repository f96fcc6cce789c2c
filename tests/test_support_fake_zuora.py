"""The Zuora SOAP fake is at least as strict as Zuora: checked with raw envelopes, no adapter.

Envelopes are built with zeep from the WSDL (as a client would) or by hand where a client would
not send them, posted with ``requests``, and the answers read as XML. Time is the fake's clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
from kiki_billing_adapters.zuora import ZuoraWsdl, with_session
from lxml import etree

from tests.support.fake_zuora import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
    FakeZuora,
    spawn_fake_zuora,
)
from tests.support.zuora_wsdl import API_NS, OBJECT_NS, SOAP_ENV, WSDL_78, WSDL_82, schema_for

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

T0 = 1_769_904_000.0


class Soap:
    """Posts envelopes to a fake and reads the answers."""

    def __init__(self, fake: FakeZuora, wsdl: Any = WSDL_78) -> None:
        self.fake = fake
        self.wsdl = ZuoraWsdl.load(wsdl)
        self.http = requests.Session()
        self.session = ""

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        sent = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""', **(headers or {})}
        answer = self.http.post(self.fake.endpoint, data=body, headers=sent, timeout=10)
        if answer.headers.get("Content-Type", "").startswith("text/xml"):
            root = etree.fromstring(answer.content)
            schema_for(self.fake.app.schema.path).check_envelope(answer.content, response=True)
            return answer.status_code, root.find(f"{{{SOAP_ENV}}}Body")[0]
        return answer.status_code, answer.text

    def login(self, username: str = DEFAULT_USERNAME, password: str = DEFAULT_PASSWORD) -> Any:
        status, body = self.post(self.wsdl.login(username, password))
        if status == 200:
            self.session = body.findtext(f".//{{{API_NS}}}Session")
        return status, body

    def call(self, envelope: Any) -> tuple[int, Any]:
        return self.post(with_session(envelope.xml, self.session))

    def query(self, zoql: str) -> tuple[int, Any]:
        return self.call(self.wsdl.query(zoql))

    def create(self, kind: str, **fields: Any) -> Any:
        status, body = self.call(self.wsdl.create(kind, fields))
        assert status == 200, body
        return body.find(f"{{{API_NS}}}result")

    def active_account(self, number: str = "acme", currency: str = "USD") -> str:
        account = text(self.create("Account", **account_fields(number, currency)), "Id")
        contact = text(self.create("Contact", AccountId=account, FirstName="A", LastName="B"), "Id")
        fields = {"Id": account, "BillToId": contact, "SoldToId": contact, "Status": "Active"}
        status, body = self.call(self.wsdl.update("Account", fields))
        assert status == 200 and text(body, "Success") == "true", etree.tostring(body)
        return account

    def subscribe(self, account: str, name: str, prices: list[str], **options: Any) -> Any:
        request = {
            "Account": {"Id": account},
            "SubscribeOptions": {"GenerateInvoice": options.pop("generate", True), **options},
            "SubscriptionData": {
                "Subscription": {
                    "Name": name,
                    "ContractEffectiveDate": "2026-02-01",
                    "TermType": "EVERGREEN",
                },
                "RatePlanData": [
                    {
                        "RatePlan": {"ProductRatePlanId": ONE_TIME_RATE_PLAN},
                        "RatePlanChargeData": [
                            {
                                "RatePlanCharge": {
                                    "ProductRatePlanChargeId": ONE_TIME_CHARGE,
                                    "Price": price,
                                }
                            }
                        ],
                    }
                    for price in prices
                ],
            },
        }
        status, body = self.call(self.wsdl.subscribe(request, single_transaction=True))
        assert status == 200, body
        return body.find(f"{{{API_NS}}}result")


def account_fields(number: str, currency: str = "USD") -> dict[str, Any]:
    return {
        "AccountNumber": number,
        "Name": f"Client {number}",
        "Currency": currency,
        "BillCycleDay": 1,
        "Status": "Draft",
    }


def text(element: Any, name: str) -> str | None:
    for ns in (API_NS, OBJECT_NS):
        found = element.find(f".//{{{ns}}}{name}")
        if found is not None:
            return str(found.text)
    return None


def fault_code(body: Any) -> str:
    assert body.tag == f"{{{SOAP_ENV}}}Fault", etree.tostring(body)
    return str(body.findtext("faultcode"))


@pytest.fixture
def fake() -> Iterator[FakeZuora]:
    with FakeZuora(seed=3, clock=lambda: T0) as server:
        yield server


@pytest.fixture
def soap(fake: FakeZuora) -> Iterator[Soap]:
    client = Soap(fake)
    client.login()
    yield client
    client.http.close()


# --------------------------------------------------------------------------------------------
# Envelopes
# --------------------------------------------------------------------------------------------


GOOD_FIELDS = (
    "<o:AccountNumber>acme</o:AccountNumber><o:BillCycleDay>1</o:BillCycleDay>"
    "<o:Currency>USD</o:Currency><o:Name>Client acme</o:Name><o:Status>Draft</o:Status>"
)


def hand_made_create(session: str, fields: str) -> bytes:
    """A create() of one Account written by hand, as no zeep client would write it."""
    return (
        f'<e:Envelope xmlns:e="{SOAP_ENV}"><e:Header><a:SessionHeader xmlns:a="{API_NS}">'
        f"<a:session>{session}</a:session></a:SessionHeader></e:Header><e:Body>"
        f'<a:create xmlns:a="{API_NS}"><a:zObjects xmlns:o="{OBJECT_NS}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="o:Account">'
        f"{fields}</a:zObjects></a:create></e:Body></e:Envelope>"
    ).encode()


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("<o:BillCycleDay>1</o:BillCycleDay>", "<o:BillCycleDay>one</o:BillCycleDay>"),
        ("<o:Name>Client acme</o:Name>", "<o:Nickname>acme</o:Nickname>"),
        ("<o:AccountNumber>acme", "<o:Id>x</o:Id><o:AccountNumber>acme"),
        ("<o:Currency>USD</o:Currency>", ""),
    ],
    ids=["not-an-int", "unknown-field", "bad-id", "out-of-order"],
)
def test_requests_the_wsdl_rejects_are_refused(
    fake: FakeZuora, soap: Soap, good: str, bad: str
) -> None:
    broken = GOOD_FIELDS.replace(good, bad)
    if not bad:  # Currency moved after Status: out of the sequence's order
        broken += good
    status, body = soap.post(hand_made_create(soap.session, broken))
    assert status == 500 and fault_code(body) == "fns:INVALID_VALUE"
    assert "Invalid request" in str(body.findtext("faultstring"))
    assert len(fake.app.rejected) == 1
    fake.app.rejected.clear()
    assert fake.state()["accounts"] == []
    status, body = soap.post(hand_made_create(soap.session, GOOD_FIELDS))
    assert status == 200 and text(body, "Success") == "true"


def test_not_a_soap_envelope_is_refused(fake: FakeZuora, soap: Soap) -> None:
    for body in (b"not xml", b"<Envelope/>", b'<e:Envelope xmlns:e="' + SOAP_ENV.encode() + b'"/>'):
        status, answer = soap.post(body)
        assert status == 500 and fault_code(answer) == "fns:INVALID_VALUE"
    fake.app.rejected.clear()


def test_every_answer_conforms_to_the_82_wsdl_too() -> None:
    with FakeZuora(seed=1, wsdl=WSDL_82) as fake:
        soap = Soap(fake, WSDL_82)
        assert soap.login()[0] == 200
        account = soap.active_account()
        result = soap.subscribe(account, "S-1", ["10.00"])
        assert text(result, "Success") == "true"
        status, body = soap.query("select Id, Amount, AmountWithoutTax from Invoice")
        assert status == 500 and fault_code(body) == "fns:INVALID_FIELD"  # not in 82.0
        assert fake.app.rejected == []


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


def test_sessions_expire_on_the_fakes_clock(fake: FakeZuora, soap: Soap) -> None:
    assert soap.query("select Id from Account")[0] == 200
    fake.advance_clock(fake.app.session_lifetime - 1)
    assert soap.query("select Id from Account")[0] == 200
    fake.advance_clock(1)
    status, body = soap.query("select Id from Account")
    assert status == 500 and fault_code(body) == "fns:INVALID_SESSION"
    assert soap.login()[0] == 200 and soap.query("select Id from Account")[0] == 200


def test_a_wrong_password_is_a_login_fault_and_counted(fake: FakeZuora) -> None:
    soap = Soap(fake)
    status, body = soap.login(password="nope")
    assert status == 500 and fault_code(body) == "fns:INVALID_VALUE"
    assert body.find(".//{http://fault.api.zuora.com/}LoginFault") is not None
    assert fake.state()["failed_logins"] == {DEFAULT_USERNAME: 1}
    status, body = soap.query("select Id from Account")
    assert fault_code(body) == "fns:INVALID_SESSION"


def test_login_answers_the_server_url_of_the_version_called(fake: FakeZuora, soap: Soap) -> None:
    _, body = soap.login()
    assert text(body, "ServerUrl") == f"{fake.url}/apps/services/a/78.0"


# --------------------------------------------------------------------------------------------
# query
# --------------------------------------------------------------------------------------------


def test_zoql_checks_fields_and_syntax(soap: Soap) -> None:
    soap.create("Account", **account_fields("o'brien"))
    status, body = soap.query(
        "select Id, accountnumber from Account where AccountNumber = 'o\\'brien'"
    )
    assert status == 200 and text(body, "size") == "1"
    assert text(body, "AccountNumber") == "o'brien"
    record = body.find(f".//{{{API_NS}}}records")
    assert record.get("{http://www.w3.org/2001/XMLSchema-instance}type") == "ns2:Account"
    for zoql, code in [
        ("select Id, Nope from Account", "fns:INVALID_FIELD"),
        ("select Id from Account where (Name = 'a' or Name = 'b')", "fns:MALFORMED_QUERY"),
        ("select Id from Account where Name like 5", "fns:MALFORMED_QUERY"),
        ("select from Account", "fns:MALFORMED_QUERY"),
        ("select Id from Widget", "fns:INVALID_TYPE"),
    ]:
        status, body = soap.query(zoql)
        assert status == 500 and fault_code(body) == code, zoql


def test_zoql_or_and_like(soap: Soap) -> None:
    for number in ("kiki-1", "kiki-12", "kiki_3", "other"):
        soap.create("Account", **account_fields(number))

    def numbers(where: str) -> list[str]:
        status, body = soap.query(f"select AccountNumber from Account where {where}")
        assert status == 200, where
        return sorted(n.text for n in body.iter(f"{{{OBJECT_NS}}}AccountNumber"))

    assert numbers("AccountNumber like 'kiki-%'") == ["kiki-1", "kiki-12"]
    assert numbers("AccountNumber like 'kiki_1%'") == ["kiki-1", "kiki-12"]
    assert numbers("AccountNumber like 'kiki-_'") == ["kiki-1"]
    assert numbers("AccountNumber = 'other' or AccountNumber = 'kiki_3'") == ["kiki_3", "other"]
    # "and" binds first: (kiki-1 and Batch1) or other
    either = "AccountNumber = 'kiki-1' and Batch = 'Batch1' or AccountNumber = 'other'"
    assert numbers(either) == ["kiki-1", "other"]


def test_query_pages_with_a_locator(soap: Soap) -> None:
    for n in range(5):
        soap.create("Account", **account_fields(f"a{n}"))
    envelope = soap.wsdl.query("select Id from Account")
    xml = with_session(envelope.xml, soap.session).decode()
    paged = xml.replace(
        "</soap-env:Header>",
        f'<ns9:QueryOptions xmlns:ns9="{API_NS}"><ns9:batchSize>2</ns9:batchSize>'
        "</ns9:QueryOptions></soap-env:Header>",
    )
    status, body = soap.post(paged.encode())
    assert text(body, "done") == "false" and text(body, "size") == "5"
    assert len(body.findall(f".//{{{API_NS}}}records")) == 2
    locator = text(body, "queryLocator")
    more = (
        f'<e:Envelope xmlns:e="{SOAP_ENV}"><e:Header><a:SessionHeader xmlns:a="{API_NS}">'
        f"<a:session>{soap.session}</a:session></a:SessionHeader></e:Header><e:Body>"
        f'<a:queryMore xmlns:a="{API_NS}"><a:queryLocator>{locator}</a:queryLocator></a:queryMore>'
        "</e:Body></e:Envelope>"
    )
    status, body = soap.post(more.encode())
    assert status == 200 and len(body.findall(f".//{{{API_NS}}}records")) == 3
    assert text(body, "done") == "true"


# --------------------------------------------------------------------------------------------
# create and update
# --------------------------------------------------------------------------------------------


def test_account_numbers_are_unique(soap: Soap) -> None:
    assert text(soap.create("Account", **account_fields("acme")), "Success") == "true"
    again = soap.create("Account", **account_fields("acme"))
    assert text(again, "Success") == "false" and text(again, "Code") == "DUPLICATE_VALUE"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"Currency": "XYZ"}, "INVALID_VALUE"),
        ({"Status": "Active"}, "INVALID_VALUE"),
        ({"Name": None}, "MISSING_REQUIRED_VALUE"),
        ({"PaymentTerm": "Net 14"}, "INVALID_VALUE"),
        ({"BillCycleDay": 40}, "INVALID_VALUE"),
    ],
)
def test_account_rules(soap: Soap, change: dict[str, Any], code: str) -> None:
    fields = {k: v for k, v in {**account_fields("acme"), **change}.items() if v is not None}
    result = soap.create("Account", **fields)
    assert text(result, "Success") == "false" and text(result, "Code") == code


def test_one_transaction_is_all_or_nothing(fake: FakeZuora, soap: Soap) -> None:
    objects = [
        soap.wsdl.objects.Account(**account_fields("one")),
        soap.wsdl.objects.Account(**account_fields("two", "XYZ")),
    ]

    def create(single: bool) -> Any:
        message = soap.wsdl.client.create_message(
            soap.wsdl._service,
            "create",
            zObjects=objects,
            _soapheaders=[
                soap.wsdl._masked_session(),
                soap.wsdl._call_options(useSingleTransaction=single),
            ],
        )
        body = etree.tostring(message).decode().replace("***", soap.session)
        return soap.post(body.encode())[1]

    results = create(True).findall(f"{{{API_NS}}}result")
    assert [text(r, "Code") for r in results] == ["TRANSACTION_FAILED", "INVALID_VALUE"]
    assert fake.state()["accounts"] == []
    results = create(False).findall(f"{{{API_NS}}}result")
    assert [text(r, "Success") for r in results] == ["true", "false"]
    assert [a["AccountNumber"] for a in fake.state()["accounts"]] == ["one"]


def test_at_most_50_objects_a_call(soap: Soap) -> None:
    objects = [soap.wsdl.objects.Account(**account_fields(f"a{n}")) for n in range(51)]
    message = soap.wsdl.client.create_message(
        soap.wsdl._service, "create", zObjects=objects, _soapheaders=[soap.wsdl._masked_session()]
    )
    body = etree.tostring(message).decode().replace("***", soap.session)
    status, answer = soap.post(body.encode())
    assert status == 500 and fault_code(answer) == "fns:MAX_RECORDS_EXCEEDED"


def test_activation_needs_contacts_of_the_account(soap: Soap) -> None:
    account = text(soap.create("Account", **account_fields("acme")), "Id")
    other = text(soap.create("Account", **account_fields("other")), "Id")
    stranger = text(soap.create("Contact", AccountId=other, FirstName="A", LastName="B"), "Id")
    for fields, code in [
        ({"Id": account, "Status": "Active"}, "MISSING_REQUIRED_VALUE"),
        ({"Id": account, "BillToId": stranger, "SoldToId": stranger}, "INVALID_VALUE"),
    ]:
        _, body = soap.call(soap.wsdl.update("Account", fields))
        result = body.find(f"{{{API_NS}}}result")
        assert text(result, "Success") == "false" and text(result, "Code") == code


# --------------------------------------------------------------------------------------------
# subscribe
# --------------------------------------------------------------------------------------------


def test_subscribe_generates_an_invoice_that_totals_its_items(fake: FakeZuora, soap: Soap) -> None:
    account = soap.active_account()
    result = soap.subscribe(account, "KIKI-1", ["2209.00", "2209.00", "-1418.00"])
    assert text(result, "Success") == "true"
    [invoice] = fake.state()["invoices"]
    assert invoice["Id"] == text(result, "InvoiceId")
    assert invoice["InvoiceNumber"] == text(result, "InvoiceNumber")
    assert Decimal(invoice["Amount"]) == Decimal("3000.00")
    assert [Decimal(i["ChargeAmount"]) for i in invoice["items"]] == [
        Decimal("2209.00"),
        Decimal("2209.00"),
        Decimal("-1418.00"),
    ]
    assert {i["SubscriptionNumber"] for i in invoice["items"]} == {"KIKI-1"}


def test_subscription_names_are_unique(fake: FakeZuora, soap: Soap) -> None:
    account = soap.active_account()
    assert text(soap.subscribe(account, "KIKI-1", ["1.00"]), "Success") == "true"
    again = soap.subscribe(account, "KIKI-1", ["1.00"])
    assert text(again, "Success") == "false" and text(again, "Code") == "DUPLICATE_VALUE"
    assert len(fake.state()["subscriptions"]) == len(fake.state()["invoices"]) == 1


def test_subscribe_rules(fake: FakeZuora, soap: Soap) -> None:
    draft = text(soap.create("Account", **account_fields("draft")), "Id")
    assert "not active" in str(text(soap.subscribe(draft, "S-1", ["1.00"]), "Message"))
    account = soap.active_account("jpy", "JPY")
    refused = soap.subscribe(account, "S-2", ["10.50"])
    assert text(refused, "Code") == "INVALID_VALUE" and "more decimals" in str(
        text(refused, "Message")
    )
    assert fake.state()["subscriptions"] == []


def test_the_account_scope_also_bills_the_accounts_unbilled_charges(
    fake: FakeZuora, soap: Soap
) -> None:
    account = soap.active_account()
    soap.subscribe(account, "S-1", ["5.00"], generate=False)
    assert fake.state()["invoices"] == []
    soap.subscribe(account, "S-2", ["7.00"])  # InvoiceProcessingScope Account by default
    [invoice] = fake.state()["invoices"]
    assert Decimal(invoice["Amount"]) == Decimal("12.00")


def test_a_declined_payment_rolls_the_whole_call_back(fake: FakeZuora, soap: Soap) -> None:
    account = soap.active_account()
    fake.configure(decline_payments=True)
    result = soap.subscribe(account, "S-1", ["5.00"], ProcessPayments=True)
    assert text(result, "Code") == "TRANSACTION_FAILED"
    state = fake.state()
    assert state["subscriptions"] == state["invoices"] == state["payments"] == []


# --------------------------------------------------------------------------------------------
# Limits and faults
# --------------------------------------------------------------------------------------------


def test_requests_over_the_concurrency_cap_get_429_request_exceeded_limit(
    fake: FakeZuora, soap: Soap
) -> None:
    fake.configure(rate_limits={"windows": [[50_000, 60.0, "minute"]], "concurrency": 1})
    gate = threading.Event()
    entered = threading.Event()
    app = fake.app
    original = app.dispatch

    def held(call: Any) -> Any:
        entered.set()
        gate.wait(10)
        return original(call)

    app.dispatch = held  # type: ignore[method-assign]
    first: list[Any] = []
    worker = threading.Thread(target=lambda: first.append(Soap(fake).login()))
    worker.start()
    assert entered.wait(10)
    status, body = Soap(fake).login()
    gate.set()
    worker.join(10)
    assert status == 429 and fault_code(body) == "fns:REQUEST_EXCEEDED_LIMIT"
    assert "concurrent requests" in str(body.findtext("faultstring"))
    assert first[0][0] == 200


def test_the_minute_window_answers_429(fake: FakeZuora) -> None:
    fake.configure(rate_limits={"windows": [[2, 60.0, "minute"]]}, rate_limit_retry_after=30)
    soap = Soap(fake)
    assert soap.login()[0] == 200 and soap.query("select Id from Account")[0] == 200
    answer = soap.http.post(
        fake.endpoint, data=soap.wsdl.login(DEFAULT_USERNAME, DEFAULT_PASSWORD), timeout=10
    )
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "30"
    assert b"fns:REQUEST_EXCEEDED_LIMIT" in answer.content
    fake.advance_clock(61)
    assert soap.query("select Id from Account")[0] == 200


def test_faults_target_one_operation(fake: FakeZuora, soap: Soap) -> None:
    fault = fake.inject_soap_fault("create", "LOCK_COMPETITION")
    assert soap.query("select Id from Account")[0] == 200
    status, body = soap.call(soap.wsdl.create("Account", account_fields("acme")))
    assert status == 500 and fault_code(body) == "fns:LOCK_COMPETITION"
    assert fault.hits == 1 and fake.state()["accounts"] == []
    control = requests.post(
        f"{fake.url}/_fake/faults",
        json={"preset": "soap_fault", "operation": "create", "code": "TEMPORARY_ERROR"},
        timeout=10,
    )
    assert control.status_code == 200
    status, body = soap.call(soap.wsdl.create("Account", account_fields("acme")))
    assert fault_code(body) == "fns:TEMPORARY_ERROR"
    fake.inject_http_error("create", 503)
    status, page = soap.call(soap.wsdl.create("Account", account_fields("acme")))
    assert status == 503 and "Service Unavailable" in page


def test_a_lost_answer_happens_upstream(fake: FakeZuora, soap: Soap) -> None:
    fake.inject_lost("create")
    with pytest.raises(requests.ConnectionError):
        soap.call(soap.wsdl.create("Account", account_fields("acme")))
    assert [a["AccountNumber"] for a in fake.state()["accounts"]] == ["acme"]


# --------------------------------------------------------------------------------------------
# As a process
# --------------------------------------------------------------------------------------------


def test_the_fake_runs_as_a_process() -> None:
    with spawn_fake_zuora("--seed", "9", "--session-lifetime", "60") as (url, _process):
        health = requests.get(f"{url}/_fake/health", timeout=10).json()
        assert health == {"ok": True, "url": url}
        config = requests.get(f"{url}/_fake/config", timeout=10).json()
        assert config["session_lifetime"] == 60 and config["users"] == [DEFAULT_USERNAME]
        assert "kiki-fake-password" not in str(config)
        login = ZuoraWsdl.load(WSDL_78).login(DEFAULT_USERNAME, DEFAULT_PASSWORD)
        answer = requests.post(
            f"{url}/apps/services/a/78.0",
            data=login,
            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
            timeout=10,
        )
        assert answer.status_code == 200 and b"<ns1:Session>" in answer.content
        state = requests.get(f"{url}/_fake/state", timeout=10).json()
        assert state["sessions"] == 1 and state["accounts"] == []
        # What a crash test scripts: slow subscribe answers (after the work is done).
        slow = {"preset": "delay", "operation": "subscribe", "seconds": 0.2, "after": True}
        queued = requests.post(f"{url}/_fake/faults", json=slow, timeout=10).json()["faults"]
        assert queued[0]["operation"] == "subscribe" and queued[0]["kind"] == "delay"
