"""One invoice, every channel, one total: Stripe, QuickBooks, Xero, Zuora, JSON and both CSVs.

Each invoice is computed by the calculator (several campaign lines and a fee-cap or minimum-fee
adjustment line) in USD, JPY and KWD. Its total is then read back from what each channel would
send or write, without any server: the requests the adapters' steps build (``Step.request``),
serialised the way each adapter puts them on the wire and parsed back, and the files the file
targets write. Every one of them must give the invoice's total to the minor unit.

KWD has three decimals. Stripe takes it x1000 with a last digit of 0, QuickBooks and Xero keep
two decimals, so the KWD invoice here has fees whose third decimal is 0; a fee whose third decimal
is not 0 is refused before any call by those three and taken by Zuora (last test).
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.files import (
    JsonFileAdapter,
    JsonSettings,
    QuickBooksCsvAdapter,
    QuickBooksCsvClientSettings,
    QuickBooksCsvSettingsEnv,
    XeroCsvAdapter,
    XeroCsvClientSettings,
    XeroCsvSettingsEnv,
)
from kiki_billing_adapters.quickbooks import (
    QuickBooksAdapter,
    QuickBooksClientSettings,
    QuickBooksSettings,
)
from kiki_billing_adapters.quickbooks.wire import to_json_text
from kiki_billing_adapters.stripe import StripeAdapter, StripeClientSettings, StripeSettings
from kiki_billing_adapters.stripe.wire import invoice_total_minor
from kiki_billing_adapters.xero import XeroAdapter, XeroClientSettings, XeroSettings
from kiki_billing_adapters.xero.wire import decode_json, encode_json
from kiki_billing_adapters.zuora import ZuoraAdapter, ZuoraClientSettings, ZuoraSettings
from lxml import etree

from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    Invoice,
    LineKind,
    NotBilled,
    SourceEvidence,
)
from kiki_billing.money import currency_exponent, to_minor_units
from kiki_billing.plugin import (
    AmountLimitError,
    BillingAdapter,
    ClientSettings,
    StepContext,
    StepRequest,
)
from kiki_billing.profit_share import compute_invoice

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

PERIOD = BillingPeriod.month("2026-01")
NUMBER = "KIKI-OaaS-202601-000042"
# NOTE: the exponent Stripe uses for each currency (PROVIDERS.md: JPY is zero-decimal, KWD
# three-decimal), written out here rather than taken from the adapter under test.
STRIPE_EXPONENT = {"USD": 2, "JPY": 0, "KWD": 3}
ZUORA_RATE_PLAN = "2c92c0f95a0f1c3f015a10ce6f2d3b8d"
ZUORA_CHARGE = "2c92c0f95a0f1c3f015a10ce6f4a3b91"
ZUORA_ACCOUNT = "2c92c0f95a0f1c3f015a10ce6f2d3b00"
XERO_TENANT = "6f1c2a9e-4b7d-4c1e-9a3f-2d5e8b0c7a14"
ZUORA_OBJECTS = "http://object.api.zuora.com/"

# (currency, contract bounds, campaigns as (spend, ltv)): each gives an adjustment line.
CASES: dict[str, tuple[dict[str, str], list[tuple[str, str]]]] = {
    # Fees 2209.04 + 1012.35 + 56.79 = 3278.18, capped at 3000.00: a -278.18 line.
    "USD": (
        {"fee_cap": "3000.00"},
        [("36000.00", "130090.40"), ("12000.00", "46123.50"), ("1000.00", "3567.90")],
    ),
    # Fees 4000 + 1235 = 5235 yen, raised to the 20000 minimum: a +14765 line.
    "JPY": (
        {"minimum_fee": "20000"},
        [("100000", "340000"), ("50000", "162345")],
    ),
    # Fees 600.000 + 100.050 + 12.340 = 712.390 dinars, capped at 500: a -212.390 line; every
    # fee ends in 0, as Stripe requires (and QuickBooks and Xero, which keep two decimals).
    "KWD": (
        {"fee_cap": "500"},
        [("1000.0", "9000.0"), ("1000.0", "4000.5"), ("200.0", "723.4")],
    ),
}


def make_invoice(currency: str, bounds: Mapping[str, str], campaigns: Sequence[tuple[str, str]]):
    contract = Contract(
        client_id="acme",
        name="Acme Trading Co",
        email="ap@acme.test",
        currency=currency,
        payment_terms_days=14,
        **bounds,
    )
    rows = [
        CampaignMetrics(client_id="acme", campaign_id=f"c{i:02d}", spend=spend, ltv=ltv)
        for i, (spend, ltv) in enumerate(campaigns, start=1)
    ]
    invoice = compute_invoice(
        contract,
        rows,
        number=NUMBER,
        period=PERIOD,
        sources=(SourceEvidence(kind="metrics_file", location="metrics.csv"),),
    )
    assert not isinstance(invoice, NotBilled)
    return invoice


@pytest.fixture(params=sorted(CASES))
def invoice(request: pytest.FixtureRequest) -> Invoice:
    made = make_invoice(request.param, *CASES[request.param])
    kinds = [line.kind for line in made.lines]
    assert kinds.count(LineKind.CAMPAIGN) >= 2
    assert {LineKind.FEE_CAP, LineKind.MINIMUM_FEE} & set(kinds), "no adjustment line"
    assert made.total_fee == sum((line.fee for line in made.lines), Decimal(0)) > 0
    return made


# --------------------------------------------------------------------------------------------
# Adapters (no server: nothing here is ever sent)
# --------------------------------------------------------------------------------------------


def stripe_adapter(api_base: str = "https://api.stripe.com") -> StripeAdapter:
    return StripeAdapter(
        StripeSettings(api_key="sk_test_kiki_parity_0123456789", api_base=api_base)
    )


def quickbooks_adapter(api_base: str | None = None) -> QuickBooksAdapter:
    settings: dict[str, Any] = {
        "client_id": "ABkikiParityClientId",
        "client_secret": "kikiParitySecret",
        "realm_id": "9341453172471531",
        "refresh_token": "AB11kikiParityRefreshToken",
        "environment": "sandbox",
    }
    if api_base is not None:
        settings |= {"api_base": f"{api_base}/v3", "token_url": f"{api_base}/oauth2/token"}
    return QuickBooksAdapter(QuickBooksSettings(**settings))


def xero_adapter(api_base: str | None = None) -> XeroAdapter:
    settings: dict[str, Any] = {
        "client_id": "KIKIPARITYCLIENT0000000000000001",
        "client_secret": "kiki-parity-secret",
        "refresh_token": "kiki-parity-refresh-token",
        "tenant_id": XERO_TENANT,
    }
    if api_base is not None:
        settings |= {"api_base": f"{api_base}/api.xro/2.0", "token_url": f"{api_base}/token"}
    return XeroAdapter(XeroSettings(**settings))


def zuora_adapter(api_base: str = "https://apisandbox.zuora.com") -> ZuoraAdapter:
    return ZuoraAdapter(
        ZuoraSettings(
            username="api@parity.example",
            password="kiki-parity-password",
            api_base=f"{api_base}/apps/services/a/78.0",
        )
    )


ZUORA_CLIENT = ZuoraClientSettings(
    product_rate_plan_id=ZUORA_RATE_PLAN, product_rate_plan_charge_id=ZUORA_CHARGE
)


def build(
    adapter: BillingAdapter[Any, Any],
    invoice: Invoice,
    client: ClientSettings,
    refs: Mapping[str, str],
) -> dict[str, StepRequest]:
    """Every step's request, as the hub would build it with these earlier ids."""
    adapter.validate(invoice, client)
    requests = {}
    for step in adapter.steps(invoice, client):
        ctx = StepContext(
            invoice=invoice,
            client=client,
            refs=dict(refs),
            idempotency_key=idempotency_key(
                invoice.number, invoice.revision, adapter.name, step.name
            ),
        )
        requests[step.name] = step.request(ctx)
    return requests


def minor(amount: Decimal, currency: str) -> int:
    """``amount`` in the currency's ISO minor units, refusing anything finer."""
    scaled = amount.scaleb(currency_exponent(currency))
    assert scaled == scaled.to_integral_value(), f"{amount} {currency} is finer than a minor unit"
    return int(scaled)


# --------------------------------------------------------------------------------------------
# What each channel totals
# --------------------------------------------------------------------------------------------


def stripe_total(invoice: Invoice) -> Decimal:
    """The sum of the invoice items' integer ``amount``s, in Stripe's unit for the currency."""
    adapter = stripe_adapter()
    requests = build(
        adapter, invoice, StripeClientSettings(), {"customer_id": "cus_P1", "invoice_id": "in_P1"}
    )
    amounts = []
    for line in invoice.lines:
        payload = requests[f"line-{line.line_no}"].payload
        assert payload["currency"] == invoice.currency.lower()
        assert payload["invoice"] == "in_P1"
        assert isinstance(payload["amount"], int)
        exponent = STRIPE_EXPONENT[invoice.currency]
        assert Decimal(payload["amount"]).scaleb(-exponent) == line.fee, line
        amounts.append(payload["amount"])
    assert requests["draft"].payload["currency"] == invoice.currency.lower()
    assert sum(amounts) == invoice_total_minor(invoice)
    return Decimal(sum(amounts)).scaleb(-STRIPE_EXPONENT[invoice.currency])


def quickbooks_total(invoice: Invoice) -> Decimal:
    """The sum of the sales lines' ``Amount``s of the invoice as sent (``TotalAmt`` if sent)."""
    requests = build(
        quickbooks_adapter(),
        invoice,
        QuickBooksClientSettings(),
        {"customer_id": "58", "item_id": "19", "income_account_id": "1"},
    )
    request = requests["invoice"]
    assert request.method == "POST" and request.path.endswith("/invoice")
    sent = json.loads(to_json_text(request.payload), parse_float=Decimal)
    assert sent["CurrencyRef"] == {"value": invoice.currency}
    lines = [line for line in sent["Line"] if line["DetailType"] == "SalesItemLineDetail"]
    assert len(lines) == len(invoice.lines)
    total = Decimal(0)
    for sent_line, line in zip(lines, invoice.lines, strict=True):
        detail = sent_line["SalesItemLineDetail"]
        amount = Decimal(sent_line["Amount"])
        # NOTE: QBO refuses a line whose Amount is not round(Qty x UnitPrice, 2) (error 6070).
        assert amount == (Decimal(detail["Qty"]) * Decimal(detail["UnitPrice"])).quantize(
            Decimal("0.01")
        )
        assert amount == line.fee
        total += amount
    if "TotalAmt" in sent:
        assert Decimal(sent["TotalAmt"]) == total
    return total


def xero_total(invoice: Invoice) -> Decimal:
    """The sum of the ``LineAmount``s of the ``PUT /Invoices`` body, as encoded on the wire."""
    client = XeroClientSettings(tax_type="NONE")
    requests = build(xero_adapter(), invoice, client, {"contact_id": XERO_TENANT})
    request = requests["invoice"]
    assert request.method == "PUT"
    (sent,) = decode_json(encode_json(request.payload))["Invoices"]
    assert sent["CurrencyCode"] == invoice.currency
    total = Decimal(0)
    for item, line in zip(sent["LineItems"], invoice.lines, strict=True):
        amount = Decimal(str(item["LineAmount"]))
        assert amount == Decimal(str(item["Quantity"])) * Decimal(str(item["UnitAmount"]))
        # NOTE: Xero keeps line amounts at 2 decimals: nothing finer may be sent.
        assert amount == amount.quantize(Decimal("0.01"))
        assert amount == line.fee
        total += amount
    return total


def zuora_total(invoice: Invoice) -> Decimal:
    """The sum of the one-time charges' ``Price``s in the subscribe envelope as sent."""
    requests = build(zuora_adapter(), invoice, ZUORA_CLIENT, {"account_id": ZUORA_ACCOUNT})
    request = requests["subscribe"]
    assert request.payload["operation"] == "subscribe"
    envelope = etree.fromstring(str(request.payload["envelope"]).encode())
    texts = [str(e.text) for e in envelope.iter(f"{{{ZUORA_OBJECTS}}}Price")]
    # Exact decimal text with the currency's decimals, never a float's.
    assert {len(text.partition(".")[2]) for text in texts} == {currency_exponent(invoice.currency)}
    prices = [Decimal(text) for text in texts]
    assert prices == [line.fee for line in invoice.lines]
    return sum(prices, Decimal(0))


def written(adapter: BillingAdapter[Any, Any], invoice: Invoice, client: ClientSettings) -> str:
    """The file a file target writes for ``invoice`` (its one step, run for real)."""
    (step,) = adapter.steps(invoice, client)
    ctx = StepContext(invoice=invoice, client=client, refs={}, idempotency_key="k")
    refs = step.send(ctx, step.request(ctx))
    return Path(refs["path"]).read_text(encoding="utf-8")


def json_totals(invoice: Invoice, folder: Path) -> tuple[Decimal, Decimal]:
    """``total_fee`` and the sum of the lines' ``fee`` of the canonical JSON file."""
    adapter = JsonFileAdapter(JsonSettings(dir=folder / "json"))
    document = json.loads(written(adapter, invoice, adapter.client_settings({}, {})))
    assert isinstance(document["total_fee"], str)  # decimal text, never a float
    lines = sum((Decimal(line["fee"]) for line in document["lines"]), Decimal(0))
    return Decimal(document["total_fee"]), lines


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def quickbooks_csv_total(invoice: Invoice, folder: Path) -> Decimal:
    """The sum of the ``*ItemAmount`` cells of the QuickBooks import file."""
    adapter = QuickBooksCsvAdapter(QuickBooksCsvSettingsEnv(dir=folder / "quickbooks"))
    rows = csv_rows(written(adapter, invoice, QuickBooksCsvClientSettings()))
    assert len(rows) == len(invoice.lines)
    for row in rows:
        assert Decimal(row["ItemQuantity"]) * Decimal(row["ItemRate"]) == Decimal(
            row["*ItemAmount"]
        )
    return sum((Decimal(row["*ItemAmount"]) for row in rows), Decimal(0))


def xero_csv_total(invoice: Invoice, folder: Path) -> Decimal:
    """The sum of ``*Quantity`` x ``*UnitAmount`` of the Xero import file."""
    adapter = XeroCsvAdapter(XeroCsvSettingsEnv(dir=folder / "xero"))
    rows = csv_rows(written(adapter, invoice, XeroCsvClientSettings()))
    assert len(rows) == len(invoice.lines)
    assert {row["Currency"] for row in rows} == {invoice.currency}
    return sum(
        (Decimal(row["*Quantity"]) * Decimal(row["*UnitAmount"]) for row in rows), Decimal(0)
    )


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_every_channel_gives_the_invoice_total_to_the_minor_unit(
    invoice: Invoice, tmp_path: Path
) -> None:
    json_total, json_lines = json_totals(invoice, tmp_path)
    totals = {
        "stripe invoice items": stripe_total(invoice),
        "quickbooks invoice": quickbooks_total(invoice),
        "xero invoice": xero_total(invoice),
        "zuora subscribe": zuora_total(invoice),
        "json total_fee": json_total,
        "json lines": json_lines,
        "quickbooks csv": quickbooks_csv_total(invoice, tmp_path),
        "xero csv": xero_csv_total(invoice, tmp_path),
    }
    expected = minor(invoice.total_fee, invoice.currency)
    in_minor_units = {name: minor(total, invoice.currency) for name, total in totals.items()}
    assert in_minor_units == dict.fromkeys(totals, expected), (invoice.currency, totals)
    assert expected == to_minor_units(invoice.total_fee, invoice.currency)


def test_the_cases_cover_both_adjustment_signs() -> None:
    lines = [line for code, case in CASES.items() for line in make_invoice(code, *case).lines]
    adjustments = [line.fee for line in lines if line.kind is not LineKind.CAMPAIGN]
    assert any(fee < 0 for fee in adjustments) and any(fee > 0 for fee in adjustments)


# --------------------------------------------------------------------------------------------
# A third KWD decimal: refused before any call where it cannot be represented
# --------------------------------------------------------------------------------------------


class _Counter(http.server.BaseHTTPRequestHandler):
    requests: list[str]

    def _any(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 that records every request it gets (and answers 500)."""
    seen: list[str] = []
    handler = type("Handler", (_Counter,), {"requests": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def kwd_invoice_with_a_third_decimal() -> Invoice:
    # Fees 600.000 and 100.055: the second has a third decimal that is not 0.
    invoice = make_invoice("KWD", {}, [("1000.0", "9000.0"), ("1000.0", "4000.55")])
    assert [line.fee for line in invoice.lines] == [Decimal("600.000"), Decimal("100.055")]
    return invoice


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("stripe", "Stripe requires amounts in three-decimal currencies"),
        ("quickbooks", "QuickBooks Online keeps amounts to 2 decimals"),
        ("xero", "Xero keeps line and invoice totals to 2 decimal places"),
    ],
)
def test_a_kwd_fee_ending_in_5_is_refused_before_any_call(
    target: str, reason: str, counting_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, seen = counting_server
    invoice = kwd_invoice_with_a_third_decimal()
    adapter: BillingAdapter[Any, Any]
    client: ClientSettings
    if target == "stripe":
        adapter, client = stripe_adapter(url), StripeClientSettings()
    elif target == "quickbooks":
        adapter, client = quickbooks_adapter(url), QuickBooksClientSettings()
    else:
        adapter, client = xero_adapter(url), XeroClientSettings(tax_type="NONE")

    with pytest.raises(AmountLimitError, match=reason) as refused:
        adapter.validate(invoice, client)
    assert not refused.value.retriable
    assert "100.055" in str(refused.value)

    # Through the hub: the delivery fails at validation, no step is started, nothing is sent.
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    hub = Hub(ledger, {target: adapter}, RetryPolicy(max_attempts=2, initial_wait=0, max_wait=0))
    (outcome,) = hub.push([Delivery(invoice, target, client, adapter.account)])
    assert outcome.state is DeliveryState.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith("validate: ") and reason in outcome.error
    record = ledger.find_delivery(invoice.number, invoice.revision, target, adapter.account)
    assert record is not None and ledger.steps(record.id) == {}
    assert seen == []


def test_a_kwd_fee_ending_in_5_is_taken_whole_by_zuora_and_the_json_file(tmp_path: Path) -> None:
    invoice = kwd_invoice_with_a_third_decimal()
    zuora_adapter().validate(invoice, ZUORA_CLIENT)  # Zuora keeps KWD to its 3 decimals
    assert zuora_total(invoice) == invoice.total_fee == Decimal("700.055")
    assert json_totals(invoice, tmp_path) == (invoice.total_fee, invoice.total_fee)
