from decimal import Decimal

import pytest

from kiki_billing.errors import InputError
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    FloorMode,
    Invoice,
    LineKind,
    NotBilled,
    SourceEvidence,
)
from kiki_billing.money import Rounding
from kiki_billing.profit_share import (
    assign_invoice_numbers,
    compute_invoice,
    compute_run,
)

PERIOD = BillingPeriod.month("2026-01")
EVIDENCE = (SourceEvidence(kind="metrics_file", location="metrics.csv", record_count=4),)

WORKED_EXAMPLE = [
    (
        "acme",
        "Acme Corp",
        "campaign_001",
        "Meta Ads",
        "36000.00",
        "130090.00",
        "22090.00",
        "2209.00",
    ),
    (
        "techstartup",
        "TechStartup Inc",
        "campaign_002",
        "Google Ads",
        "44000.00",
        "164130.00",
        "32130.00",
        "3213.00",
    ),
    (
        "ecommerce",
        "E-commerce Co",
        "campaign_003",
        "TikTok Ads",
        "40000.00",
        "137530.00",
        "17530.00",
        "1753.00",
    ),
    (
        "saas",
        "SaaS Platform",
        "campaign_004",
        "LinkedIn Ads",
        "25000.00",
        "84460.00",
        "9460.00",
        "946.00",
    ),
]


def metrics(client: str, campaign: str, spend: str, ltv: str, **extra: object) -> CampaignMetrics:
    return CampaignMetrics(client_id=client, campaign_id=campaign, spend=spend, ltv=ltv, **extra)


def invoice_for(contract: Contract, rows: list[CampaignMetrics]) -> Invoice | NotBilled:
    return compute_invoice(
        contract, rows, number="KIKI-OaaS-202601-000001", period=PERIOD, sources=EVIDENCE
    )


def test_worked_example_reproduced_to_the_cent() -> None:
    contracts = [Contract(client_id=c, name=n) for c, n, *_ in WORKED_EXAMPLE]
    rows = [
        metrics(c, camp, spend, ltv, platform=p) for c, _, camp, p, spend, ltv, *_ in WORKED_EXAMPLE
    ]
    run = compute_run(contracts, rows, PERIOD, EVIDENCE)
    by_client = {inv.client_id: inv for inv in run.invoices}
    for client, _, campaign, _, spend, ltv, margin, fee in WORKED_EXAMPLE:
        inv = by_client[client]
        (line,) = inv.lines
        assert (line.campaign_id, str(line.spend), str(line.ltv)) == (campaign, spend, ltv)
        assert str(line.margin_recovered) == margin
        assert str(line.fee) == fee
        assert inv.total_fee == line.fee
    (usd,) = run.summary.by_currency
    assert str(usd.total_spend) == "145000.00"
    assert str(usd.total_ltv) == "516210.00"
    assert str(usd.total_baseline_value) == "435000.00"
    assert str(usd.total_margin_recovered) == "81210.00"
    assert str(usd.total_fee) == "8121.00"
    assert str(usd.client_keeps) == "73089.00"
    assert str(usd.monthly_recurring_revenue) == "8121.00"
    assert usd.spend_weighted_roas == Decimal("3.5601")
    assert usd.client_roi_on_fee == Decimal("9.0000")


def test_losing_campaign_is_floored_per_line_by_default() -> None:
    contract = Contract(client_id="acme", name="Acme")
    inv = invoice_for(
        contract,
        [metrics("acme", "win", "100.00", "400.00"), metrics("acme", "lose", "100.00", "200.00")],
    )
    assert isinstance(inv, Invoice)
    lose, win = inv.lines
    assert lose.margin_recovered == Decimal("-100.00")
    assert lose.billable_margin == Decimal("0.00")
    assert lose.fee == Decimal("0.00")
    assert win.fee == Decimal("10.00")
    assert inv.total_fee == Decimal("10.00")
    assert inv.total_margin_recovered == Decimal("0.00")


def test_net_floor_offsets_losing_campaigns() -> None:
    contract = Contract(client_id="acme", name="Acme", floor=FloorMode.NET)
    inv = invoice_for(
        contract,
        [metrics("acme", "a", "100.00", "400.00"), metrics("acme", "b", "100.00", "250.00")],
    )
    assert isinstance(inv, Invoice)
    assert [line.fee for line in inv.lines] == [Decimal("10.00"), Decimal("-5.00")]
    assert inv.total_fee == Decimal("5.00")


def test_net_floor_with_overall_loss_bills_nothing() -> None:
    contract = Contract(client_id="acme", name="Acme", floor=FloorMode.NET)
    outcome = invoice_for(
        contract,
        [metrics("acme", "a", "100.00", "310.00"), metrics("acme", "b", "100.00", "250.00")],
    )
    assert isinstance(outcome, NotBilled)
    assert outcome.reason == "zero_fee"


def test_zero_fee_is_recorded_not_invoiced() -> None:
    contract = Contract(client_id="acme", name="Acme")
    outcome = invoice_for(contract, [metrics("acme", "a", "100.00", "300.00")])
    assert isinstance(outcome, NotBilled)
    run = compute_run([contract], [metrics("acme", "a", "100.00", "300.00")], PERIOD, EVIDENCE)
    assert run.invoices == ()
    assert run.summary.not_billed[0].client_id == "acme"


def test_client_without_metrics_is_recorded_as_no_metrics() -> None:
    run = compute_run([Contract(client_id="acme", name="Acme")], [], PERIOD, EVIDENCE)
    assert run.not_billed[0].reason == "no_metrics"


def test_minimum_fee_adds_an_adjustment_line() -> None:
    contract = Contract(client_id="acme", name="Acme", minimum_fee="500")
    inv = invoice_for(contract, [metrics("acme", "a", "1000.00", "4000.00")])
    assert isinstance(inv, Invoice)
    assert [line.kind for line in inv.lines] == [LineKind.CAMPAIGN, LineKind.MINIMUM_FEE]
    assert [line.fee for line in inv.lines] == [Decimal("100.00"), Decimal("400.00")]
    assert inv.total_fee == Decimal("500.00")


def test_minimum_fee_applies_even_without_margin() -> None:
    contract = Contract(client_id="acme", name="Acme", minimum_fee="500")
    inv = invoice_for(contract, [metrics("acme", "a", "1000.00", "1000.00")])
    assert isinstance(inv, Invoice)
    assert inv.total_fee == Decimal("500.00")


def test_fee_cap_adds_a_negative_adjustment_line() -> None:
    contract = Contract(client_id="acme", name="Acme", fee_cap="1000")
    inv = invoice_for(contract, [metrics("acme", "a", "36000.00", "130090.00")])
    assert isinstance(inv, Invoice)
    assert [line.fee for line in inv.lines] == [Decimal("2209.00"), Decimal("-1209.00")]
    assert inv.total_fee == Decimal("1000.00")
    assert inv.total_fee == sum(line.fee for line in inv.lines)


def test_rounding_mode_is_per_contract() -> None:
    rows = [metrics("acme", "a", "0.00", "0.25")]  # fee 0.025
    up = invoice_for(Contract(client_id="acme", name="A"), rows)
    even = invoice_for(Contract(client_id="acme", name="A", rounding=Rounding.HALF_EVEN), rows)
    assert isinstance(up, Invoice) and isinstance(even, Invoice)
    assert up.total_fee == Decimal("0.03")
    assert even.total_fee == Decimal("0.02")


def test_zero_and_three_decimal_currencies_round_to_their_minor_unit() -> None:
    jpy = invoice_for(
        Contract(client_id="acme", name="A", currency="JPY"), [metrics("acme", "a", "1000", "3015")]
    )
    kwd = invoice_for(
        Contract(client_id="acme", name="A", currency="KWD"),
        [metrics("acme", "a", "1.000", "3.0155")],
    )
    assert isinstance(jpy, Invoice) and isinstance(kwd, Invoice)
    assert str(jpy.total_fee) == "2"  # 1.5 rounds half up
    assert str(kwd.total_fee) == "0.002"


def test_contract_validation() -> None:
    with pytest.raises(ValueError, match="share rate must be between 0 and 1"):
        Contract(client_id="a", name="A", share_rate="1.5")
    with pytest.raises(ValueError, match="unknown currency"):
        Contract(client_id="a", name="A", currency="ABC")
    with pytest.raises(ValueError, match="exceeds fee_cap"):
        Contract(client_id="a", name="A", minimum_fee="10", fee_cap="5")


def test_unknown_client_names_file_row_and_field() -> None:
    row = metrics("ghost", "a", "1.00", "5.00", origin_file="m.csv", origin_row=7)
    with pytest.raises(InputError) as err:
        compute_run([Contract(client_id="acme", name="A")], [row], PERIOD, EVIDENCE)
    assert str(err.value).startswith(
        "m.csv, row 7, field 'client_id': client 'ghost' has no contract"
    )


def test_duplicate_campaign_names_both_rows() -> None:
    a = metrics("acme", "c", "1.00", "5.00", origin_file="m.csv", origin_row=2)
    b = metrics("acme", "c", "1.00", "5.00", origin_file="m.csv", origin_row=5)
    with pytest.raises(InputError, match=r"m.csv, row 5, field 'campaign_id': duplicate.*row 2"):
        compute_run([Contract(client_id="acme", name="A")], [a, b], PERIOD, EVIDENCE)


def test_invoice_numbers_are_deterministic_and_distinct() -> None:
    contracts = [Contract(client_id=f"client-{i}", name=f"C{i}") for i in range(3000)]
    first = assign_invoice_numbers(contracts, PERIOD)
    again = assign_invoice_numbers(list(reversed(contracts)), PERIOD)
    assert first == again
    assert len(set(first.values())) == len(contracts)
    assert all(n.startswith("KIKI-OaaS-202601-") and len(n) == 23 for n in first.values())


def test_pinned_invoice_sequence_wins_and_duplicates_are_refused() -> None:
    pinned = Contract(client_id="acme", name="A", invoice_sequence=42)
    assert assign_invoice_numbers([pinned], PERIOD)["acme"] == "KIKI-OaaS-202601-000042"
    other = Contract(client_id="beta", name="B", invoice_sequence=42)
    with pytest.raises(InputError, match="both pin"):
        assign_invoice_numbers([pinned, other], PERIOD)


def test_content_hash_covers_the_content() -> None:
    contract = Contract(client_id="acme", name="Acme")
    inv = invoice_for(contract, [metrics("acme", "a", "100.00", "400.00")])
    again = invoice_for(contract, [metrics("acme", "a", "100.00", "400.00")])
    other = invoice_for(contract, [metrics("acme", "a", "100.00", "400.01")])
    assert isinstance(inv, Invoice) and isinstance(again, Invoice) and isinstance(other, Invoice)
    assert len(inv.content_hash) == 64
    assert inv.content_hash == again.content_hash == inv.billing_hash()
    assert other.content_hash != inv.content_hash
    assert inv.revision == 0
