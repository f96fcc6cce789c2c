"""Corrections through the real hub and XeroAdapter against the local Xero fake.

The fake is as strict as Xero: no void of a part-paid invoice, credit notes checked like invoices
(contact, accounts, tax, unique number), an allocation never above the credit left or the amount
due, every request checked against Xero's OpenAPI spec 16.1.0.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.hub.revisions import as_revision
from kiki_billing.hub.runner import DeliveryOutcome
from kiki_billing.models import Invoice
from kiki_billing.testing.contract import sample_invoice
from tests.support.fake_xero import PREFIX, FakeXero

from .conftest import MakeAdapter

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

CLIENT = XeroClientSettings(tax_type="NONE")


@pytest.fixture
def ledger(tmp_path: Path):
    book = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


def push(
    adapter: XeroAdapter,
    ledger: Ledger,
    invoice: Invoice,
    *,
    attempts: int = 3,
    client: XeroClientSettings = CLIENT,
) -> DeliveryOutcome:
    hub = Hub(ledger, {"xero": adapter}, RetryPolicy(max_attempts=attempts), sleep=lambda _: None)
    [outcome] = hub.push([Delivery(invoice, "xero", client, adapter.account)])
    return outcome


def amended(invoice: Invoice, keep: int = 1, extra: Invoice | None = None) -> Invoice:
    lines = list(invoice.lines[:keep])
    if extra is not None:
        lines += [
            line.model_copy(update={"line_no": len(lines) + n})
            for n, line in enumerate(extra.lines, 1)
        ]
    total = sum(line.fee for line in lines)
    return as_revision(invoice.model_copy(update={"lines": tuple(lines), "total_fee": total}), 1)


def org(fake: FakeXero) -> dict[str, Any]:
    (state,) = fake.state()["organisations"].values()
    return state


def invoice_numbered(fake: FakeXero, number: str) -> dict[str, Any]:
    (found,) = [i for i in org(fake)["invoices"] if i["InvoiceNumber"] == number]
    return found


def writes(fake: FakeXero, method: str, path: str) -> list[Any]:
    return [r for r in fake.requests if r.method == method and r.path == PREFIX + path]


def test_unpaid_invoice_is_voided_then_reissued_under_its_revision_number(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    assert push(adapter, ledger, first).ok
    second = amended(first)
    outcome = push(adapter, ledger, second)
    assert outcome.state is DeliveryState.DELIVERED, outcome.error
    assert outcome.refs["corrected_r0"] == "void"
    assert invoice_numbered(fake, first.number)["Status"] == "VOIDED"
    new = invoice_numbered(fake, f"{first.number}-R1")
    assert new["Status"] == "AUTHORISED" and Decimal(str(new["Total"])) == Decimal("100.10")
    assert org(fake)["credit_notes"] == []
    [void] = writes(fake, "POST", "/Invoices")
    assert void.headers.get("idempotency-key")


def test_paid_invoice_amended_down_is_credited_with_its_payment_left_as_credit(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    done = push(adapter, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "paid")
    outcome = push(adapter, ledger, amended(first))
    assert outcome.ok, outcome.error
    assert outcome.refs["corrected_r0"] == "credit"
    [note] = org(fake)["credit_notes"]
    assert note["Type"] == "ACCRECCREDIT" and note["Status"] == "AUTHORISED"
    assert note["CreditNoteNumber"] == f"{first.number}-CN"
    assert Decimal(str(note["Total"])) == first.total_fee
    # Nothing was due, so nothing is allocated: the whole credit is the client's to use.
    assert note["Allocations"] == []
    assert Decimal(str(note["RemainingCredit"])) == first.total_fee
    assert invoice_numbered(fake, first.number)["Status"] == "PAID"
    new = invoice_numbered(fake, f"{first.number}-R1")
    assert Decimal(str(new["Total"])) == Decimal("100.10")  # never negative


def test_part_paid_invoice_credit_is_allocated_against_what_is_due(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    done = push(adapter, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    second = amended(first, keep=2, extra=sample_invoice(lines=1))  # amended up
    outcome = push(adapter, ledger, second)
    assert outcome.ok, outcome.error
    [note] = org(fake)["credit_notes"]
    [allocation] = note["Allocations"]
    assert Decimal(str(allocation["Amount"])) == Decimal("150.30")
    assert Decimal(str(note["RemainingCredit"])) == Decimal("50.00")
    old = invoice_numbered(fake, first.number)
    assert old["Status"] == "PAID" and Decimal(str(old["AmountDue"])) == 0
    assert Decimal(str(invoice_numbered(fake, f"{first.number}-R1")["Total"])) == Decimal("300.40")


def test_a_lost_credit_note_answer_is_found_by_its_number(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    done = push(adapter, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    fake.inject_error("PUT", f"{PREFIX}/CreditNotes", status=503, after=True)
    deferred = push(adapter, ledger, amended(first), attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    assert len(org(fake)["credit_notes"]) == 1
    fake.advance_clock(3600)  # Xero's idempotency window is long gone (and the token)
    outcome = push(adapter, ledger, amended(first), attempts=2)
    assert outcome.ok, outcome.error
    [note] = org(fake)["credit_notes"]
    assert len(note["Allocations"]) == 1
    assert len(writes(fake, "PUT", "/CreditNotes")) == 1


def test_a_lost_allocation_answer_is_found_on_the_credit_note(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    done = push(adapter, ledger, first)
    fake.mark_invoice(done.refs["invoice_id"], "partly_paid", "50.00")
    fake.inject_error("PUT", f"{PREFIX}/CreditNotes/*/Allocations", status=503, after=True)
    deferred = push(adapter, ledger, amended(first), attempts=1)
    assert deferred.state is DeliveryState.DEFERRED
    fake.advance_clock(3600)
    outcome = push(adapter, ledger, amended(first), attempts=2)
    assert outcome.ok, outcome.error
    [note] = org(fake)["credit_notes"]
    assert len(note["Allocations"]) == 1
    allocations = [
        r for r in fake.requests if r.path.endswith("/Allocations") and r.method == "PUT"
    ]
    assert len(allocations) == 1


def test_a_draft_is_deleted_not_voided(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    draft = XeroClientSettings(tax_type="NONE", status="DRAFT")
    assert push(adapter, ledger, first, client=draft).ok
    outcome = push(adapter, ledger, amended(first), client=draft)
    assert outcome.ok, outcome.error
    assert invoice_numbered(fake, first.number)["Status"] == "DELETED"


def test_the_fake_refuses_what_xero_refuses(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    done = push(adapter, ledger, first)
    invoice_id = done.refs["invoice_id"]
    fake.mark_invoice(invoice_id, "partly_paid", "50.00")
    refused = adapter._call(
        "POST",
        "/Invoices?summarizeErrors=false",
        {"Invoices": [{"InvoiceID": invoice_id, "Status": "VOIDED"}]},
    )
    [element] = refused.body["Invoices"]
    assert element["HasErrors"] is True
    note = adapter._call(
        "PUT",
        "/CreditNotes?summarizeErrors=false",
        {
            "CreditNotes": [
                {
                    "Type": "ACCRECCREDIT",
                    "Contact": {"ContactID": done.refs["contact_id"]},
                    "Status": "AUTHORISED",
                    "LineAmountTypes": "NoTax",
                    "LineItems": [
                        {
                            "Description": "x",
                            "Quantity": Decimal(1),
                            "UnitAmount": Decimal("200.00"),
                            "AccountCode": "200",
                        }
                    ],
                }
            ]
        },
    ).body["CreditNotes"][0]
    over = adapter._call(
        "PUT",
        f"/CreditNotes/{note['CreditNoteID']}/Allocations?summarizeErrors=false",
        {
            "Allocations": [
                {
                    "Invoice": {"InvoiceID": invoice_id},
                    "Amount": Decimal("150.31"),
                    "Date": "2026-02-01",
                }
            ]
        },
    ).body["Allocations"][0]
    assert "exceeds the invoice's amount due" in str(over["ValidationErrors"])
    assert invoice_numbered(fake, first.number)["Status"] == "AUTHORISED"


def test_the_period_listing_finds_every_revision(
    fake: FakeXero, make_adapter: MakeAdapter, ledger: Ledger
) -> None:
    adapter, first = make_adapter(), sample_invoice()
    push(adapter, ledger, first)
    push(adapter, ledger, amended(first))
    start = len(fake.requests)
    listed = adapter.remote_period_invoices("2026-01")
    assert fake.writes_since(start) == []
    assert sorted((r.kiki_number, r.kiki_revision, r.state.value) for r in listed) == [
        (first.number, 0, "void"),
        (first.number, 1, "open"),
    ]
    assert adapter.remote_period_invoices("2026-02") == []
