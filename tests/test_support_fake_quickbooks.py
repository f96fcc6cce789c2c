"""The QuickBooks Online fake: as strict as QBO, and every answer shaped by Intuit's XSD.

Driven with plain ``requests`` (the adapter's tests drive it through python-quickbooks). Rate-limit
tests freeze the fake's clock and advance it, so nothing depends on how long a request takes.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests

from tests.support.fake_provider import RateLimits, Window, spawn_fake
from tests.support.fake_quickbooks import (
    CLIENT_ID,
    CLIENT_SECRET,
    REALM,
    TOKEN_PATH,
    FakeQuickBooks,
    FakeQuickBooksApp,
)
from tests.support.quickbooks_schema import SchemaError, quickbooks_schema

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

T0 = 1_769_904_000.0  # 2026-02-01T00:00:00Z


class Client:
    """A bare QBO client: bearer token, JSON bodies, ``minorversion``."""

    def __init__(self, fake: FakeQuickBooks, token: str | None = None) -> None:
        self.fake = fake
        self.http = requests.Session()
        self.token = token or fake.app.issue_access_token()

    def call(
        self,
        method: str,
        tail: str,
        body: Any = None,
        *,
        requestid: str | None = None,
        content_type: str = "application/json",
        token: str | None = None,
    ) -> requests.Response:
        params = {"minorversion": "75"}
        if requestid is not None:
            params["requestid"] = requestid
        data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
        return self.http.request(
            method,
            f"{self.fake.api_base}/company/{REALM}/{tail}",
            params=params,
            data=data,
            headers={
                "Authorization": f"Bearer {token or self.token}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
            timeout=10,
        )

    def query(self, text: str) -> requests.Response:
        return self.call("POST", "query", text, content_type="application/text")

    def create(self, entity: str, body: dict[str, Any], requestid: str | None = None) -> Any:
        return self.call("POST", entity.lower(), body, requestid=requestid)


def answer(response: requests.Response) -> dict[str, Any]:
    """The JSON answer, after checking it against IntuitResponse in the XSD."""
    body: dict[str, Any] = json.loads(response.text, parse_float=Decimal)
    quickbooks_schema().validate_response(body)
    assert response.headers["intuit_tid"].startswith("1-")
    return body


def fault(response: requests.Response) -> dict[str, Any]:
    error: dict[str, Any] = answer(response)["Fault"]["Error"][0]
    return error


@pytest.fixture
def fake() -> Iterator[FakeQuickBooks]:
    with FakeQuickBooks(seed=3, rate_limits=RateLimits()) as server:
        yield server


@pytest.fixture
def qbo(fake: FakeQuickBooks) -> Client:
    return Client(fake)


def customer(name: str = "Acme Corp", currency: str = "USD") -> dict[str, Any]:
    return {"DisplayName": name, "CurrencyRef": {"value": currency}}


def made(qbo: Client, entity: str, body: dict[str, Any]) -> dict[str, Any]:
    response = qbo.create(entity, body)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = answer(response)[entity]
    return found


def item(qbo: Client) -> dict[str, Any]:
    return made(
        qbo, "Item", {"Name": "Profit share", "Type": "Service", "IncomeAccountRef": {"value": "1"}}
    )


def invoice_body(customer_id: str, item_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "DocNumber": "OaaS-202601-000001",
        "TxnDate": "2026-02-01",
        "DueDate": "2026-03-03",
        "CustomerRef": {"value": customer_id},
        "CurrencyRef": {"value": "USD"},
        "Line": [
            {
                "Amount": 2209.0,
                "DetailType": "SalesItemLineDetail",
                "SalesItemLineDetail": {
                    "ItemRef": {"value": item_id},
                    "Qty": 1,
                    "UnitPrice": 2209.0,
                },
            },
            {
                "Amount": -1418.0,
                "DetailType": "SalesItemLineDetail",
                "SalesItemLineDetail": {
                    "ItemRef": {"value": item_id},
                    "Qty": 1,
                    "UnitPrice": -1418,
                },
            },
        ],
        **extra,
    }


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------


def test_create_read_and_query_answers_pass_the_xsd(qbo: Client) -> None:
    acme = made(qbo, "Customer", customer())
    service = item(qbo)
    created = made(qbo, "Invoice", invoice_body(acme["Id"], service["Id"]))
    assert created["TotalAmt"] == Decimal("791.0")
    assert created["Line"][-1] == {
        "Amount": Decimal("791.0"),
        "DetailType": "SubTotalLineDetail",
        "SubTotalLineDetail": {},
    }
    assert created["CurrencyRef"] == {"value": "USD", "name": "United States Dollar"}
    read = answer(qbo.call("GET", f"invoice/{created['Id']}"))["Invoice"]
    assert read == created
    found = answer(qbo.query("select * from Invoice where DocNumber = 'OaaS-202601-000001'"))
    assert found["QueryResponse"]["Invoice"] == [created]
    assert found["QueryResponse"]["maxResults"] == 1
    empty = answer(qbo.query("SELECT * FROM Invoice WHERE DocNumber = 'nope'"))
    assert empty["QueryResponse"] == {}  # no entity key when nothing matches
    assert answer(qbo.call("GET", "account/79"))["Account"]["AccountType"] == "Income"


def test_send_emails_the_invoice_to_its_bill_email(qbo: Client, fake: FakeQuickBooks) -> None:
    acme, service = made(qbo, "Customer", customer()), item(qbo)
    created = made(qbo, "Invoice", invoice_body(acme["Id"], service["Id"]))
    refused = qbo.call(
        "POST", f"invoice/{created['Id']}/send", content_type="application/octet-stream"
    )
    assert refused.status_code == 400 and fault(refused)["code"] == "6000"
    with_email = made(
        qbo,
        "Invoice",
        invoice_body(
            acme["Id"], service["Id"], DocNumber="2", BillEmail={"Address": "a@b.example"}
        ),
    )
    sent = qbo.call(
        "POST", f"invoice/{with_email['Id']}/send", content_type="application/octet-stream"
    )
    assert answer(sent)["Invoice"]["EmailStatus"] == "EmailSent"
    assert answer(sent)["Invoice"]["DeliveryInfo"]["DeliveryType"] == "Email"
    assert fake.state()["emails"] == [{"invoice": with_email["Id"], "to": "a@b.example"}]
    missing = qbo.call("POST", "invoice/999/send", content_type="application/octet-stream")
    assert fault(missing)["code"] == "610"


# ------------------------------------------------------------------------------------------
# Validation against the XSD and QBO's rules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({**customer(), "Nickname": "A"}, "no such element"),
        ({**customer(), "Active": "yes"}, "a string where the XSD has boolean"),
        ({**customer(), "Balance": "12"}, "a string where the XSD has decimal"),
        ({**customer(), "JobInfo": {"Status": "Bogus"}}, "enumeration"),
        ({**customer(), "Level": "two"}, "a string where the XSD has int"),
        ({**customer(), "DisplayName": 7}, "a number where the XSD has string"),
    ],
)
def test_a_body_the_xsd_refuses_is_a_2010(qbo: Client, body: dict[str, Any], detail: str) -> None:
    refused = qbo.create("Customer", body)
    assert refused.status_code == 400
    error = fault(refused)
    assert error["code"] == "2010" and detail in error["Detail"]


def test_display_names_are_unique_across_customers_and_vendors(
    qbo: Client, fake: FakeQuickBooks
) -> None:
    made(qbo, "Customer", customer("Acme Corp"))
    again = qbo.create("Customer", customer("ACME CORP "))
    assert again.status_code == 400
    error = fault(again)
    assert (error["code"], error["Message"]) == ("6240", "Duplicate Name Exists Error")
    fake.app.add_vendor("Globex")
    assert "vendor" in fault(qbo.create("Customer", customer("Globex")))["Detail"]
    assert fault(qbo.create("Customer", customer("A:B")))["code"] == "6000"
    assert fault(qbo.create("Customer", {"CurrencyRef": {"value": "USD"}}))["code"] == "2020"


def test_string_lengths_are_qbos(qbo: Client) -> None:
    too_long = fault(qbo.create("Customer", customer("x" * 501)))
    assert too_long["code"] == "2050"
    assert too_long["Detail"].endswith("Min:0 Max:500 supported. Supplied length:501")
    acme, service = made(qbo, "Customer", customer()), item(qbo)
    number = fault(
        qbo.create("Invoice", invoice_body(acme["Id"], service["Id"], DocNumber="x" * 22))
    )
    assert (number["code"], number["element"]) == ("2050", "DocNumber")
    assert fault(qbo.create("Item", {"Name": "n" * 101, "Type": "Service"}))["code"] == "2050"


def test_amounts_must_be_qty_times_unit_price_and_add_up(qbo: Client) -> None:
    acme, service = made(qbo, "Customer", customer()), item(qbo)
    body = invoice_body(acme["Id"], service["Id"])
    body["Line"][0]["Amount"] = 2209.01
    error = fault(qbo.create("Invoice", body))
    assert error["code"] == "6070" and "Supplied value:2209.01" in error["Detail"]
    body = invoice_body(acme["Id"], service["Id"])
    body["Line"][0]["SalesItemLineDetail"].update(Qty=3, UnitPrice=0.3333333)
    body["Line"][0]["Amount"] = 1.00  # round(0.9999999, 2)
    assert qbo.create("Invoice", body).status_code == 200
    total = fault(
        qbo.create("Invoice", invoice_body(acme["Id"], service["Id"], DocNumber="2", TotalAmt=800))
    )
    assert total["code"] == "6000" and "sum of the lines" in total["Detail"]


def test_references_currencies_and_doc_numbers(qbo: Client, fake: FakeQuickBooks) -> None:
    acme, service = made(qbo, "Customer", customer()), item(qbo)
    assert fault(qbo.create("Invoice", invoice_body("999", service["Id"])))["code"] == "2500"
    assert fault(qbo.create("Invoice", invoice_body(acme["Id"], "999")))["code"] == "2500"
    euro = invoice_body(acme["Id"], service["Id"], CurrencyRef={"value": "EUR"})
    assert "customer's currency" in fault(qbo.create("Invoice", euro))["Detail"]
    assert fault(qbo.create("Customer", customer("Yen Co", "XAU")))["code"] == "2500"
    first = made(qbo, "Invoice", invoice_body(acme["Id"], service["Id"]))
    duplicate = fault(qbo.create("Invoice", invoice_body(acme["Id"], service["Id"])))
    assert duplicate["code"] == "6140" and f"TxnId={first['Id']}" in duplicate["Detail"]
    fake.configure(duplicate_doc_numbers=True)
    assert qbo.create("Invoice", invoice_body(acme["Id"], service["Id"])).status_code == 200
    bad_account = {"Name": "Other", "Type": "Service", "IncomeAccountRef": {"value": "4"}}
    assert fault(qbo.create("Item", bad_account))["code"] == "6000"  # a bank account


def test_queries_quote_and_filter_like_qbo(qbo: Client) -> None:
    made(qbo, "Customer", customer("O'Reilly \\ Sons"))
    found = answer(qbo.query(r"select * from Customer where DisplayName = 'O\'Reilly \\ Sons'"))
    assert [c["DisplayName"] for c in found["QueryResponse"]["Customer"]] == ["O'Reilly \\ Sons"]
    incomes = answer(qbo.query("select * from Account where AccountType = 'Income' maxresults 1"))
    assert [a["Id"] for a in incomes["QueryResponse"]["Account"]] == ["1"]
    both = answer(qbo.query("select * from Account where Id in ('1', '79') and Active = true"))
    assert [a["Name"] for a in both["QueryResponse"]["Account"]] == [
        "Services",
        "Sales of Product Income",
    ]
    # NOTE: LIKE takes % as its only wildcard (Intuit's query language reference).
    like = answer(qbo.query("select * from Account where Name like 'S%'"))
    assert [a["Name"] for a in like["QueryResponse"]["Account"]] == [
        "Services",
        "Sales of Product Income",
    ]
    nothing = answer(qbo.query("select * from Account where Name like 'S_rvices'"))
    assert nothing["QueryResponse"] == {}
    assert fault(qbo.query("delete from Account"))["code"] == "4000"
    wrong_type = qbo.call("POST", "query", "select * from Item", content_type="application/json")
    assert fault(wrong_type)["code"] == "2010"


# ------------------------------------------------------------------------------------------
# requestid
# ------------------------------------------------------------------------------------------


def test_requestid_replays_the_first_result_until_it_expires() -> None:
    with FakeQuickBooks(seed=1, rate_limits=RateLimits(), clock=lambda: T0) as fake:
        qbo = Client(fake, fake.app.issue_access_token(lifetime=10**9))
        first = qbo.create("Customer", customer(), requestid="k1-a")
        again = qbo.create("Customer", customer(), requestid="k1-a")
        assert again.json() == first.json()
        assert len(fake.state()["customers"]) == 1
        other = qbo.create("Customer", customer("Other"), requestid="k1-a")
        assert fault(other)["code"] == "6000"  # the id was used for another request
        fake.advance_clock(86_400)
        expired = qbo.create("Customer", customer(), requestid="k1-a")
        assert fault(expired)["code"] == "6240"  # run again: the name is taken now
        assert fault(qbo.create("Customer", customer("B"), requestid="k" * 51))["code"] == "2010"


# ------------------------------------------------------------------------------------------
# OAuth
# ------------------------------------------------------------------------------------------


def grant(fake: FakeQuickBooks, **form: str) -> requests.Response:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    return requests.post(
        fake.token_url,
        data=form,
        headers={"Authorization": f"Basic {basic}", "Accept": "application/json"},
        timeout=10,
    )


def test_refresh_tokens_rotate_and_the_old_one_stops_working(fake: FakeQuickBooks) -> None:
    seed = fake.app.issue_refresh_token()
    first = grant(fake, grant_type="refresh_token", refresh_token=seed)
    assert first.status_code == 200
    tokens = first.json()
    assert set(tokens) == {
        "x_refresh_token_expires_in",
        "refresh_token",
        "access_token",
        "token_type",
        "expires_in",
    }
    assert tokens["refresh_token"] != seed and tokens["expires_in"] == 3600
    reused = grant(fake, grant_type="refresh_token", refresh_token=seed)
    assert (reused.status_code, reused.json()) == (400, {"error": "invalid_grant"})
    assert grant(fake, grant_type="refresh_token", refresh_token=tokens["refresh_token"]).ok
    wrong_client = requests.post(fake.token_url, data={"grant_type": "refresh_token"}, timeout=10)
    assert (wrong_client.status_code, wrong_client.json()) == (401, {"error": "invalid_client"})
    code = fake.app.authorization_code("http://127.0.0.1:9/cb")
    wrong_uri = grant(fake, grant_type="authorization_code", code=code, redirect_uri="http://x/")
    assert wrong_uri.status_code == 400
    assert fake.state()["token_grants"] == 2


def test_access_tokens_expire_and_belong_to_one_company() -> None:
    with FakeQuickBooks(seed=1, rate_limits=RateLimits(), clock=lambda: T0) as fake:
        qbo = Client(fake)
        assert qbo.query("select * from Item").status_code == 200
        fake.advance_clock(3600)
        expired = qbo.query("select * from Item")
        assert expired.status_code == 401
        body = expired.json()
        assert body["fault"]["error"][0]["code"] == "3200"
        assert "AuthenticationFailed" in body["fault"]["error"][0]["message"]
        other = fake.app.issue_access_token(realm="123")
        forbidden = Client(fake, other).query("select * from Item")
        assert forbidden.status_code == 403 and fault(forbidden)["code"] == "3100"
        assert Client(fake, "nope").query("select * from Item").status_code == 401


# ------------------------------------------------------------------------------------------
# Limits and faults
# ------------------------------------------------------------------------------------------


def test_throttles_at_ten_a_second_with_json_and_xml_faults() -> None:
    with FakeQuickBooks(seed=1, clock=lambda: T0) as fake:
        qbo = Client(fake, fake.app.issue_access_token(lifetime=10**9))
        statuses = [qbo.query("select * from Item").status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429, 429]
        answers = [r for r in fake.requests if r.rate_limited]
        assert [r.rate_limited for r in answers] == ["second", "second"]
        first, second = (qbo.query("select * from Item") for _ in range(2))
        assert fault(first)["code"] == "3001" and first.headers["Content-Type"].startswith(
            "application/json"
        )
        assert second.headers["Content-Type"] == "application/xml"
        quickbooks_schema().validate_xml(second.content)
        assert "ThrottleExceeded" in second.text
        fake.advance_clock(1.5)
        assert qbo.query("select * from Item").status_code == 200
        stats = fake.rate_limit_stats()
        assert [w["limit"] for w in stats["limits"]["windows"]] == [10, 500]
        assert stats["limits"]["concurrency"] == 10


def test_minute_window_and_throttle_format() -> None:
    limits = RateLimits(windows=(Window(500, 60.0, "minute"),), count_rejected=False)
    with FakeQuickBooks(seed=1, clock=lambda: T0, rate_limits=limits) as fake:
        fake.configure(throttle_format="xml")
        qbo = Client(fake, fake.app.issue_access_token(lifetime=10**9))
        for _ in range(500):
            fake.app.limiter.admit()
            fake.app.limiter.release()
        refused = qbo.query("select * from Item")
        assert refused.status_code == 429 and refused.text.startswith("<?xml")


def test_ten_in_flight_then_429() -> None:
    app = FakeQuickBooksApp(seed=1)
    gate = threading.Event()
    real = app.execute

    def held(request: Any) -> Any:
        gate.wait(10)
        return real(request)

    app.execute = held  # type: ignore[method-assign]
    with FakeQuickBooks(app) as fake:
        token = fake.app.issue_access_token()
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    Client(fake, token).query("select * from Item").status_code
                )
            )
            for _ in range(10)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while fake.rate_limit_stats()["in_flight"] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = Client(fake, token).query("select * from Item")
        gate.set()
        for thread in threads:
            thread.join()
    assert refused.status_code == 429
    assert sorted(results) == [200] * 10


@pytest.mark.parametrize("body", ["json", "xml", "html"])
def test_injected_server_errors_in_every_body(fake: FakeQuickBooks, qbo: Client, body: str) -> None:
    fake.inject_error("POST", f"/v3/company/{REALM}/query", status=503, body=body)
    failed = qbo.query("select * from Item")
    assert failed.status_code == 503 and failed.headers["intuit_tid"]
    if body == "json":
        assert fault(failed)["code"] == "10000"
    elif body == "xml":
        quickbooks_schema().validate_xml(failed.content)
    else:
        assert "<title>503" in failed.text


def test_the_xsd_validator_refuses_what_the_xsd_refuses() -> None:
    schema = quickbooks_schema()
    with pytest.raises(SchemaError, match="no such element"):
        schema.validate("Invoice", {"Foo": "1"})
    with pytest.raises(SchemaError, match="xs:date"):
        schema.validate("Invoice", {"TxnDate": "2026-02-30"})
    with pytest.raises(SchemaError, match="null"):
        schema.validate("Invoice", {"DocNumber": None})
    with pytest.raises(SchemaError, match="not an element of the set"):
        schema.validate("Item", {"Type": "Widget"})


def test_runs_as_a_process_and_hands_out_tokens() -> None:
    with spawn_fake("tests.support.fake_quickbooks", "--seed", "5") as (url, _process):
        assert requests.get(f"{url}/_fake/health", timeout=5).json()["ok"] is True
        tokens = requests.post(f"{url}/_fake/quickbooks/tokens", timeout=5).json()
        assert tokens["realm"] == REALM and tokens["refresh_token"].startswith("AB11")
        answered = requests.post(
            f"{url}{TOKEN_PATH}",
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            auth=(tokens["client_id"], tokens["client_secret"]),
            timeout=5,
        )
        assert answered.status_code == 200
