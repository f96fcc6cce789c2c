from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from kiki_billing.models import BillingPeriod, CampaignMetrics, Contract, FloorMode, Invoice
from kiki_billing.money import CURRENCY_EXPONENTS, Rounding
from kiki_billing.profit_share import assign_invoice_numbers, compute_run

PERIOD = BillingPeriod.month("2026-03")


def amounts(places: int) -> st.SearchStrategy[str]:
    return st.decimals(
        min_value=0, max_value=10**9, places=places, allow_nan=False, allow_infinity=False
    ).map(lambda d: format(d, "f"))


@st.composite
def client_cases(draw: st.DrawFn) -> tuple[Contract, list[CampaignMetrics]]:
    currency = draw(st.sampled_from(["USD", "JPY", "KWD", "EUR", "CLF"]))
    contract = Contract(
        client_id="c",
        name="Client",
        currency=currency,
        baseline_roas=format(draw(st.decimals(0, 10, places=2)), "f"),
        share_rate=format(draw(st.decimals(0, 1, places=4)), "f"),
        floor=draw(st.sampled_from(list(FloorMode))),
        rounding=draw(st.sampled_from(list(Rounding))),
    )
    n = draw(st.integers(1, 8))
    places = draw(st.integers(0, 6))
    rows = [
        CampaignMetrics(
            client_id="c",
            campaign_id=f"camp{i}",
            spend=draw(amounts(places)),
            ltv=draw(amounts(places)),
        )
        for i in range(n)
    ]
    return contract, rows


@settings(max_examples=300, deadline=None)
@given(client_cases())
def test_totals_equal_sum_of_lines_and_fees_are_bounded(
    case: tuple[Contract, list[CampaignMetrics]],
) -> None:
    contract, rows = case
    run = compute_run([contract], rows, PERIOD, [])
    half_minor = Decimal(1).scaleb(-CURRENCY_EXPONENTS[contract.currency]) / 2
    for inv in run.invoices:
        assert isinstance(inv, Invoice)
        assert inv.total_fee == sum(line.fee for line in inv.lines)
        assert inv.total_fee > 0
        exponent = CURRENCY_EXPONENTS[inv.currency]
        for line in inv.lines:
            assert -line.fee.as_tuple().exponent == exponent  # rounded once, to the minor unit
            if contract.floor is FloorMode.PER_CAMPAIGN:
                assert line.fee >= 0
            positive = max(line.margin_recovered, Decimal(0))
            assert line.fee <= contract.share_rate * positive + half_minor
        assert inv.total_margin_recovered == sum(line.margin_recovered for line in inv.lines)
        assert inv.client_keeps == inv.total_margin_recovered - inv.total_fee
    (totals,) = run.summary.by_currency or (None,)
    if totals is not None:
        assert totals.total_fee == sum(inv.total_fee for inv in run.invoices)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
        min_size=1,
        max_size=40,
        unique=True,
    )
)
def test_numbering_is_deterministic_and_unique(client_ids: list[str]) -> None:
    contracts = [Contract(client_id=c, name=c) for c in client_ids]
    first = assign_invoice_numbers(contracts, PERIOD)
    second = assign_invoice_numbers(list(reversed(contracts)), PERIOD)
    assert first == second
    assert len(set(first.values())) == len(client_ids)
