"""Checks of the Xero fake itself, over HTTP with plain ``requests``: it must be at least as
strict as Xero (tokens, spec, validation, idempotency window, limits per organisation).

The fake's clock is frozen in these tests and advanced explicitly; nothing waits on time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.support.fake_provider import RateLimits, Window, spawn_fake
from tests.support.fake_xero import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    PREFIX,
    FakeXero,
    FakeXeroApp,
    parse_where,
)
from tests.support.xero_spec import response_problems

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

T0 = 1_769_904_000.0  # 2026-02-01T00:00:00Z
OTHER_TENANT = "0b9a2c1e-7d3f-4e5a-8b6c-9d0e1f2a3b4c"
CLIENT = (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)


class Xero:
    """A tiny client of the fake: one access token, the default organisation."""

    def __init__(self, fake: FakeXero, tenant: str = DEFAULT_TENANT) -> None:
        self.fake = fake
        self.tenant = tenant
        self.session = requests.Session()
        granted = self.refresh(fake.app.issue_refresh_token())
        assert granted.status_code == 200, granted.text
        self.token = granted.json()["access_token"]

    def refresh(self, refresh_token: str, auth: tuple[str, str] = CLIENT) -> requests.Response:
        return self.session.post(
            self.fake.token_url,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=auth,
            timeout=10,
        )

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        tenant: str | None = None,
        raw: bytes | None = None,
    ) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "xero-tenant-id": tenant or self.tenant,
            "Accept": "application/json",
        }
        if key:
            headers["Idempotency-Key"] = key
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        return self.session.request(
            method, self.fake.api_base + path, data=data, headers=headers, timeout=10
        )

    def contact(self, name: str = "Acme Corp", number: str = "acme") -> str:
        answer = self.call(
            "PUT",
            "/Contacts?summarizeErrors=false",
            {"Contacts": [{"Name": name, "ContactNumber": number}]},
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["Contacts"][0]["ContactID"])


def invoice_body(contact_id: str, number: str = "KIKI-1", **changes: Any) -> dict[str, Any]:
    line = {
        "Description": "Profit share",
        "Quantity": 1,
        "UnitAmount": 2209.00,
        "LineAmount": 2209.00,
        "AccountCode": "200",
        "TaxType": "NONE",
    }
    line.update(changes.pop("line", {}))
    invoice = {
        "Type": "ACCREC",
        "Contact": {"ContactID": contact_id},
        "Date": "2026-02-01",
        "DueDate": "2026-03-03",
        "LineAmountTypes": "Exclusive",
        "InvoiceNumber": number,
        "CurrencyCode": "USD",
        "Status": "AUTHORISED",
        "LineItems": [line],
    }
    invoice.update(changes)
    return {"Invoices": [invoice]}


@pytest.fixture
def fake() -> Iterator[FakeXero]:
    with FakeXero(FakeXeroApp(seed=3, clock=lambda: T0)) as server:
        yield server


@pytest.fixture
def xero(fake: FakeXero) -> Iterator[Xero]:
    client = Xero(fake)
    yield client
    client.session.close()


# --------------------------------------------------------------------------------------------
# OAuth
# --------------------------------------------------------------------------------------------


def test_refresh_tokens_rotate_and_a_spent_one_dies_after_the_grace_period(
    fake: FakeXero, xero: Xero
) -> None:
    seed = fake.app.issue_refresh_token()
    first = xero.refresh(seed)
    assert first.status_code == 200
    granted = first.json()
    assert granted["refresh_token"] != seed and granted["expires_in"] == 1800
    assert granted["token_type"] == "Bearer"
    # Spent, but within the 30-minute grace period (a lost answer): it works once more.
    fake.advance_clock(1799)
    assert xero.refresh(seed).status_code == 200
    fake.advance_clock(1)
    late = xero.refresh(seed)
    assert late.status_code == 400 and late.json() == {"error": "invalid_grant"}
    # The rotated one still works.
    assert xero.refresh(granted["refresh_token"]).status_code == 200


def test_no_grace_period_makes_a_double_spend_fail(fake: FakeXero, xero: Xero) -> None:
    fake.configure(refresh_grace=0)
    seed = fake.app.issue_refresh_token()
    assert xero.refresh(seed).status_code == 200
    assert xero.refresh(seed).json() == {"error": "invalid_grant"}


def test_token_endpoint_refuses_unknown_tokens_and_clients(fake: FakeXero, xero: Xero) -> None:
    assert xero.refresh("not-a-token").json() == {"error": "invalid_grant"}
    bad_client = xero.refresh(fake.app.issue_refresh_token(), auth=(DEFAULT_CLIENT_ID, "wrong"))
    assert bad_client.status_code == 400 and bad_client.json() == {"error": "invalid_client"}


def test_authorization_code_needs_the_same_redirect_and_is_single_use(
    fake: FakeXero, xero: Xero
) -> None:
    code = fake.app.authorize("http://127.0.0.1:8765/callback")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "http://x/cb"}
    assert xero.session.post(fake.token_url, data=form, auth=CLIENT, timeout=10).status_code == 400
    form["redirect_uri"] = "http://127.0.0.1:8765/callback"
    granted = xero.session.post(fake.token_url, data=form, auth=CLIENT, timeout=10)
    assert granted.status_code == 200 and granted.json()["refresh_token"]
    again = xero.session.post(fake.token_url, data=form, auth=CLIENT, timeout=10)
    assert again.json() == {"error": "invalid_grant"}


def test_access_tokens_expire_on_the_fake_clock(fake: FakeXero, xero: Xero) -> None:
    assert xero.call("GET", "/Organisation").status_code == 200
    fake.advance_clock(1800)
    expired = xero.call("GET", "/Organisation")
    assert expired.status_code == 401
    assert expired.json()["Detail"].startswith("TokenExpired: token expired at")
    assert expired.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_tokens_and_foreign_tenants_are_refused(fake: FakeXero, xero: Xero) -> None:
    assert xero.call("GET", "/Contacts", tenant=OTHER_TENANT).status_code == 403
    fake.app.revoke_access_tokens()
    refused = xero.call("GET", "/Contacts")
    assert refused.status_code == 401 and refused.json()["Title"] == "Unauthorized"


def test_connections_list_the_organisations_a_token_reaches(fake: FakeXero, xero: Xero) -> None:
    answer = xero.session.get(
        fake.url + "/connections", headers={"Authorization": f"Bearer {xero.token}"}, timeout=10
    )
    assert answer.status_code == 200
    [connection] = answer.json()
    assert connection["tenantId"] == DEFAULT_TENANT
    assert connection["tenantType"] == "ORGANISATION"


# --------------------------------------------------------------------------------------------
# The spec, read strictly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"InvoiceNumer": "KIKI-1"}, "'InvoiceNumer' was unexpected"),
        ({"Total": 5}, "'Total' was unexpected"),  # read-only
        ({"Status": "PAIDX"}, "is not one of"),
        ({"line": {"Quantity": "abc"}}, "is not of type 'number'"),
        ({"line": {"UnitAmmount": 1}}, "'UnitAmmount' was unexpected"),
        ({"CurrencyCode": "XXX"}, "is not one of"),
    ],
)
def test_requests_that_break_the_spec_are_400(
    xero: Xero, mutation: dict[str, Any], expected: str
) -> None:
    contact = xero.contact()
    answer = xero.call("PUT", "/Invoices?summarizeErrors=false", invoice_body(contact, **mutation))
    assert answer.status_code == 400
    body = answer.json()
    assert body["Type"] == "PostDataInvalidException" and body["ErrorNumber"] == 14
    assert expected in body["Message"]
    assert xero.fake.invoices() == []


def test_undeclared_query_parameters_and_bad_booleans_are_refused(xero: Xero) -> None:
    assert xero.call("GET", "/Contacts?ContactNumbers=acme").status_code == 400
    assert xero.call("PUT", "/Contacts?summarizeErrors=no", {"Contacts": []}).status_code == 400
    assert xero.call("GET", "/Contacts?where=Name%3D%3Dacme").json()["Type"] == (
        "QueryParseException"
    )


# --------------------------------------------------------------------------------------------
# Validation, element by element
# --------------------------------------------------------------------------------------------


def test_summarized_errors_are_a_400_and_nothing_is_saved(xero: Xero) -> None:
    contact = xero.contact()
    body = invoice_body(contact)
    body["Invoices"].append(invoice_body(contact, "KIKI-2", CurrencyCode="EUR")["Invoices"][0])
    answer = xero.call("PUT", "/Invoices", body)
    assert answer.status_code == 400
    error = answer.json()
    assert (error["ErrorNumber"], error["Type"]) == (10, "ValidationException")
    assert error["Message"] == "A validation exception occurred"
    [element] = error["Elements"]
    assert element["ValidationErrors"] == [
        {"Message": "Organisation is not subscribed to currency EUR"}
    ]
    assert xero.fake.invoices() == []


def test_unsummarized_errors_come_per_element_in_a_200(xero: Xero) -> None:
    contact = xero.contact()
    body = invoice_body(contact)
    body["Invoices"].append(
        invoice_body(contact, "KIKI-2", line={"AccountCode": "999", "TaxType": "BOGUS"})[
            "Invoices"
        ][0]
    )
    answer = xero.call("PUT", "/Invoices?summarizeErrors=false", body)
    assert answer.status_code == 200
    good, bad = answer.json()["Invoices"]
    assert good["HasErrors"] is False and good["Total"] == 2209.0
    assert bad["HasErrors"] is True
    assert [e["Message"] for e in bad["ValidationErrors"]] == [
        "Account code '999' is not a valid code for this document.",
        "The TaxType code 'BOGUS' does not exist or cannot be used for this type of transaction.",
    ]
    assert [i["InvoiceNumber"] for i in xero.fake.invoices()] == ["KIKI-1"]
    assert response_problems("PUT", xero.fake.api_base + "/Invoices", 200, answer.content) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"line": {"UnitAmount": 1.005, "LineAmount": 1.01}}, "more than 2 decimal places"),
        ({"line": {"LineAmount": 2209.01}}, "is not Quantity x UnitAmount"),
        ({"line": {"AccountCode": "470"}}, "Account code '470' is not a valid code"),
        ({"line": {"TaxType": "INPUT"}}, "The TaxType code 'INPUT' does not exist"),
        ({"Status": "PAID"}, "cannot be created with status PAID"),
        ({"line": {"UnitAmount": -1, "LineAmount": -1}}, "cannot total less than zero"),
        ({"Contact": {"ContactID": "00000000-0000-4000-8000-000000000000"}}, "could not be found"),
    ],
)
def test_invoices_xero_would_refuse_or_round_are_refused(
    xero: Xero, changes: dict[str, Any], message: str
) -> None:
    contact = xero.contact()
    answer = xero.call(
        "PUT", "/Invoices?summarizeErrors=false", invoice_body(contact, **changes)
    ).json()
    [element] = answer["Invoices"]
    assert element["HasErrors"] is True
    assert message in element["ValidationErrors"][0]["Message"]


def test_unitdp_4_allows_four_decimals_and_totals_round_to_two(xero: Xero) -> None:
    contact = xero.contact()
    body = invoice_body(contact, line={"UnitAmount": 1.0051, "Quantity": 3})
    del body["Invoices"][0]["LineItems"][0]["LineAmount"]
    answer = xero.call("PUT", "/Invoices?summarizeErrors=false&unitdp=4", body).json()
    [invoice] = answer["Invoices"]
    assert invoice["HasErrors"] is False
    assert invoice["LineItems"][0]["LineAmount"] == 3.02 and invoice["Total"] == 3.02


def test_invoice_numbers_are_unique_and_a_name_only_contact_is_created_silently(
    xero: Xero,
) -> None:
    contact = xero.contact()
    assert xero.call("PUT", "/Invoices?summarizeErrors=false", invoice_body(contact)).ok
    again = xero.call("PUT", "/Invoices?summarizeErrors=false", invoice_body(contact, "kiki-1"))
    assert again.json()["Invoices"][0]["ValidationErrors"] == [
        {"Message": "Invoice # must be unique."}
    ]
    by_name = invoice_body(contact, "KIKI-9", Contact={"Name": "Nobody Ltd"})
    assert xero.call("PUT", "/Invoices?summarizeErrors=false", by_name).ok
    assert sorted(c["Name"] for c in xero.fake.contacts()) == ["Acme Corp", "Nobody Ltd"]


def test_contact_names_are_unique_and_limited_to_255(xero: Xero) -> None:
    xero.contact()
    twin = xero.call(
        "PUT", "/Contacts?summarizeErrors=false", {"Contacts": [{"Name": "ACME corp"}]}
    ).json()["Contacts"][0]
    assert twin["HasValidationErrors"] is True
    assert "is already assigned to another contact" in twin["ValidationErrors"][0]["Message"]
    long_name = {"Contacts": [{"Name": "x" * 256}]}
    too_long = xero.call("PUT", "/Contacts?summarizeErrors=false", long_name).json()
    assert "255 characters" in too_long["Contacts"][0]["ValidationErrors"][0]["Message"]


def test_invoices_are_found_by_number_and_voided_ones_stay(xero: Xero) -> None:
    contact = xero.contact()
    created = xero.call("PUT", "/Invoices?summarizeErrors=false", invoice_body(contact)).json()
    invoice_id = created["Invoices"][0]["InvoiceID"]
    voided = xero.call(
        "POST", "/Invoices", {"Invoices": [{"InvoiceID": invoice_id, "Status": "VOIDED"}]}
    )
    assert voided.json()["Invoices"][0]["Status"] == "VOIDED"
    [found] = xero.call("GET", "/Invoices?InvoiceNumbers=kiki-1").json()["Invoices"]
    assert (found["InvoiceID"], found["Status"]) == (invoice_id, "VOIDED")
    assert "LineItems" not in found  # no paging: summaries only
    paged = xero.call("GET", "/Invoices?InvoiceNumbers=KIKI-1&page=1").json()
    assert paged["Invoices"][0]["LineItems"][0]["LineAmount"] == 2209.0


def test_where_clauses_take_escaped_quotes_and_ignore_case(xero: Xero) -> None:
    assert parse_where(r'ContactNumber=="a\"b\\c" AND Name=="x"') == [
        ("ContactNumber", 'a"b\\c'),
        ("Name", "x"),
    ]
    xero.contact(name="Quote Co", number='a"b\\c')
    where = quote(r'ContactNumber=="A\"B\\C"', safe="")
    [contact] = xero.call("GET", f"/Contacts?where={where}").json()["Contacts"]
    assert contact["ContactNumber"] == 'a"b\\c'


# --------------------------------------------------------------------------------------------
# Idempotency and limits
# --------------------------------------------------------------------------------------------


def test_idempotency_keys_replay_within_a_short_window_only(fake: FakeXero, xero: Xero) -> None:
    contact = xero.contact()
    body = invoice_body(contact)
    first = xero.call("PUT", "/Invoices?summarizeErrors=false", body, key="k1-test")
    replay = xero.call("PUT", "/Invoices?summarizeErrors=false", body, key="k1-test")
    assert replay.json()["Invoices"][0]["InvoiceID"] == first.json()["Invoices"][0]["InvoiceID"]
    assert len(fake.invoices()) == 1
    fake.advance_clock(300)  # the key window (300 s by default) has passed
    late = xero.call("PUT", "/Invoices?summarizeErrors=false", body, key="k1-test").json()
    assert late["Invoices"][0]["ValidationErrors"] == [{"Message": "Invoice # must be unique."}]
    assert len(fake.invoices()) == 1


def test_minute_and_day_windows_are_per_organisation(fake: FakeXero) -> None:
    fake.app.add_organisation(OTHER_TENANT, "Other Ltd")
    fake.configure(
        rate_limits=RateLimits(windows=(Window(60, 60.0, "minute"), Window(100, 86400.0, "day")))
    )
    xero = Xero(fake)
    answers = [xero.call("GET", "/Organisation") for _ in range(61)]
    assert [a.status_code for a in answers[:60]] == [200] * 60
    assert answers[59].headers["X-MinLimit-Remaining"] == "0"
    assert answers[59].headers["X-DayLimit-Remaining"] == "40"
    throttled = answers[60]
    assert throttled.status_code == 429
    assert throttled.headers["X-Rate-Limit-Problem"] == "minute"
    assert throttled.headers["Retry-After"] == "60"
    # Another organisation is not slowed down.
    assert xero.call("GET", "/Organisation", tenant=OTHER_TENANT).status_code == 200
    fake.advance_clock(61)
    for _ in range(39):  # the 429 counted too: 61 of the day's 100 are gone
        assert xero.call("GET", "/Organisation").status_code == 200
    day = xero.call("GET", "/Organisation")
    assert day.status_code == 429 and day.headers["X-Rate-Limit-Problem"] == "day"
    assert int(day.headers["Retry-After"]) == 86400 - 61


def test_five_requests_in_flight_per_organisation(fake: FakeXero) -> None:
    gate = threading.Event()
    entered = threading.Semaphore(0)
    execute = fake.app.execute

    def held(request: Any) -> Any:
        entered.release()
        gate.wait(timeout=10)
        return execute(request)

    clients = [Xero(fake) for _ in range(6)]
    fake.app.execute = held  # type: ignore[method-assign]
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(c.call, "GET", "/Organisation") for c in clients[:5]]
        for _ in range(5):
            assert entered.acquire(timeout=10)
        sixth = clients[5].call("GET", "/Organisation")
        gate.set()
        assert all(f.result().status_code == 200 for f in futures)
    assert sixth.status_code == 429
    assert sixth.headers["X-Rate-Limit-Problem"] == "concurrent"
    assert int(sixth.headers["Retry-After"]) >= 1


def test_answers_carry_xero_headers_and_decimal_amounts(xero: Xero) -> None:
    contact = xero.contact()
    answer = xero.call("PUT", "/Invoices?summarizeErrors=false", invoice_body(contact))
    assert answer.headers["Xero-Correlation-Id"]
    assert b'"Total": 2209.00' in answer.content
    invoice = answer.json(parse_float=Decimal)["Invoices"][0]
    assert invoice["Date"] == "/Date(1769904000000+0000)/"
    assert invoice["DueDateString"] == "2026-03-03T00:00:00"
    assert invoice["Contact"]["ContactID"] == contact


def test_runs_as_a_process() -> None:
    seed = "kiki-subprocess-seed-0123456789abcdef"
    with spawn_fake("tests.support.fake_xero", "--refresh-token", seed) as (url, _):
        answer = requests.post(
            url + "/connect/token",
            data={"grant_type": "refresh_token", "refresh_token": seed},
            auth=CLIENT,
            timeout=10,
        )
        assert answer.status_code == 200
        organisation = requests.get(
            url + PREFIX + "/Organisation",
            headers={
                "Authorization": f"Bearer {answer.json()['access_token']}",
                "xero-tenant-id": DEFAULT_TENANT,
            },
            timeout=10,
        )
        assert organisation.json()["Organisations"][0]["OrganisationID"] == DEFAULT_TENANT
