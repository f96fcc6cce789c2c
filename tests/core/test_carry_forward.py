"""``carry_forward_below``: a fee below the threshold is carried to the next period's invoice."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiki_billing.config import load_contracts
from kiki_billing.errors import InputError
from kiki_billing.models import (
    STRIPE_MINIMUM_CHARGE,
    BillingPeriod,
    CampaignMetrics,
    Contract,
    Invoice,
    LineKind,
    NotBilled,
    SourceEvidence,
)
from kiki_billing.profit_share import CarriedFee, compute_invoice, compute_run

FEBRUARY = BillingPeriod.month("2026-02")
EVIDENCE = (SourceEvidence(kind="metrics_file", location="metrics.csv"),)


def contract(**kw: object) -> Contract:
    return Contract(client_id="acme", name="Acme", **kw)  # type: ignore[arg-type]


def metrics(fee_cents: int) -> list[CampaignMetrics]:
    """One campaign whose 10% fee is ``fee_cents`` (spend 100.00, baseline 3x)."""
    ltv = Decimal(300) + Decimal(fee_cents) / 10
    return [CampaignMetrics(client_id="acme", campaign_id="c1", spend="100.00", ltv=str(ltv))]


def compute(c: Contract, fee_cents: int, carried: list[CarriedFee] | None = None):
    return compute_invoice(
        c,
        metrics(fee_cents),
        number="KIKI-OaaS-202602-000001",
        period=FEBRUARY,
        sources=EVIDENCE,
        carried=carried or (),
    )


def test_a_fee_below_the_threshold_is_not_issued_but_carried() -> None:
    outcome = compute(contract(carry_forward_below="0.50"), 30)
    assert isinstance(outcome, NotBilled)
    assert outcome.reason == "carried_forward"
    assert (outcome.carried_fee, outcome.carried_below) == (Decimal("0.30"), Decimal("0.50"))


def test_a_carried_fee_is_billed_next_period_as_its_own_line() -> None:
    carried = [CarriedFee("2026-01", "USD", Decimal("0.30"))]
    outcome = compute(contract(carry_forward_below="0.50"), 1000, carried)
    assert isinstance(outcome, Invoice)
    own, late = outcome.lines
    assert (own.kind, own.fee) == (LineKind.CAMPAIGN, Decimal("10.00"))
    assert (late.kind, late.fee, late.carried_from) == (
        LineKind.CARRIED_FORWARD,
        Decimal("0.30"),
        "2026-01",
    )
    assert "2026-01" in late.description and "0.50 USD minimum" in late.description
    assert outcome.total_fee == Decimal("10.30") == sum(line.fee for line in outcome.lines)


def test_still_below_together_carries_only_the_new_fee() -> None:
    carried = [CarriedFee("2026-01", "USD", Decimal("0.30"))]
    outcome = compute(contract(carry_forward_below="0.50"), 10, carried)
    assert isinstance(outcome, NotBilled) and outcome.carried_fee == Decimal("0.10")


def test_a_carried_fee_in_another_currency_waits() -> None:
    carried = [CarriedFee("2026-01", "EUR", Decimal("0.30"))]
    outcome = compute(contract(carry_forward_below="0.50"), 1000, carried)
    assert isinstance(outcome, Invoice) and len(outcome.lines) == 1


def test_stripes_published_minimum_per_currency() -> None:
    assert contract(carry_forward_below="stripe").carry_threshold() == Decimal("0.50")
    assert contract(carry_forward_below="stripe", currency="GBP").carry_threshold() == Decimal(
        "0.30"
    )
    assert contract(carry_forward_below="stripe", currency="JPY").carry_threshold() == Decimal(50)
    assert STRIPE_MINIMUM_CHARGE["HUF"] == Decimal("175.00")
    with pytest.raises(ValidationError, match="no minimum charge for KWD"):
        contract(carry_forward_below="stripe", currency="KWD")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "more than 0"),
        ("0", "more than 0"),
        ("0.001", "more decimals"),
        ("x", "carry_forward_below"),
    ],
)
def test_a_bad_threshold_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        contract(carry_forward_below=value)


def test_the_contracts_file_takes_it_in_defaults_or_per_client(tmp_path: Path) -> None:
    path = tmp_path / "contracts.toml"
    path.write_text(
        '[defaults]\ncarry_forward_below = "stripe"\n'
        '[[clients]]\nid = "a"\nname = "A"\n'
        '[[clients]]\nid = "b"\nname = "B"\ncarry_forward_below = 1.25\n'
    )
    a, b = load_contracts(path).contracts
    assert (a.carry_threshold(), b.carry_threshold()) == (Decimal("0.50"), Decimal("1.25"))
    path.write_text('[[clients]]\nid = "a"\nname = "A"\ncarry_forward_below = "-2"\n')
    with pytest.raises(InputError) as bad:
        load_contracts(path)
    assert bad.value.field == "carry_forward_below" and bad.value.row == 2


def test_invoices_without_carried_lines_keep_their_hash() -> None:
    outcome = compute(contract(), 1000)
    assert isinstance(outcome, Invoice)
    assert "carried_from" not in json.loads(outcome.canonical_json())["lines"][0]


def test_a_run_summary_counts_carried_clients_once() -> None:
    run = compute_run([contract(carry_forward_below="0.50")], metrics(30), FEBRUARY, EVIDENCE)
    [nb] = run.not_billed
    assert nb.reason == "carried_forward" and run.invoices == ()
    assert run.summary.by_currency[0].total_fee == 0
