"""Metrics + contracts -> invoices. Pure functions: no I/O, no clock.

Per campaign line (PRODUCT.md section 1)::

    baseline value   = baseline ROAS x spend
    margin recovered = LTV - baseline value
    fee              = share rate x billable margin, rounded once to the minor unit

The billable margin is the margin floored at zero per line (``floor = "per_campaign"``) or the
signed margin with the invoice total floored at zero (``floor = "net"``). A minimum fee or a fee
cap adds an adjustment line, so the total is always the sum of the lines.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from kiki_billing import __version__
from kiki_billing.errors import InputError
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    CurrencyTotals,
    FloorMode,
    Invoice,
    InvoiceLine,
    LineKind,
    NotBilled,
    ProofOfValue,
    RunSummary,
    SourceEvidence,
)
from kiki_billing.money import MONEY_CONTEXT, currency_exponent, round_to_minor

INVOICE_NUMBER_PREFIX = "KIKI-OaaS"
_ZERO = Decimal(0)
_RATIO_QUANTUM = Decimal("0.0001")


@dataclass(frozen=True)
class CarriedFee:
    """A fee of an earlier period that was below ``carry_forward_below`` and not issued.

    Attributes:
        period: The period it was computed for (``YYYY-MM``).
        currency: Its currency.
        amount: The fee, in the currency's major unit (rounded as its lines were).
    """

    period: str
    currency: str
    amount: Decimal


@dataclass(frozen=True)
class BillingRun:
    """The result of computing one period: invoices, clients not billed, and the summary."""

    period: BillingPeriod
    invoices: tuple[Invoice, ...]
    not_billed: tuple[NotBilled, ...]
    summary: RunSummary


def exact(amount: Decimal, currency: str) -> Decimal:
    """Show ``amount`` with exactly the currency's decimals when that loses nothing."""
    quantum = Decimal(1).scaleb(-currency_exponent(currency))
    rounded = amount.quantize(quantum, context=MONEY_CONTEXT)
    if rounded == amount:
        return rounded
    return amount.normalize(context=MONEY_CONTEXT)


def ratio(numerator: Decimal, denominator: Decimal) -> Decimal | None:
    """``numerator / denominator`` to four decimals, or ``None`` when the denominator is 0."""
    if denominator == 0:
        return None
    return (numerator / denominator).quantize(_RATIO_QUANTUM, context=MONEY_CONTEXT)


def percent(rate: Decimal) -> str:
    """``Decimal("0.10")`` -> ``"10"``, ``Decimal("0.125")`` -> ``"12.5"``."""
    return format((rate * 100).normalize(context=MONEY_CONTEXT), "f")


def invoice_number_seed(client_id: str) -> int:
    """The six-digit number a client's invoices carry unless it collides or is pinned.

    Derived from the client id alone, so the same client gets the same suffix on every
    machine and every run. Version 1 of the derivation: changing it renumbers every invoice.
    """
    digest = hashlib.sha256(f"kiki-invoice-number/v1:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 999_999 + 1


def assign_invoice_numbers(contracts: Iterable[Contract], period: BillingPeriod) -> dict[str, str]:
    """Give every contract a distinct ``KIKI-OaaS-YYYYMM-NNNNNN`` number for ``period``.

    Pinned ``invoice_sequence`` values win; the others take their seed and, on a collision,
    the next free number, in client-id order, so the result depends only on the contracts.

    Raises:
        InputError: Two contracts pin the same ``invoice_sequence``.
    """
    ordered = sorted(contracts, key=lambda c: c.client_id)
    taken: dict[int, str] = {}
    for contract in ordered:
        if contract.invoice_sequence is not None:
            other = taken.setdefault(contract.invoice_sequence, contract.client_id)
            if other != contract.client_id:
                raise InputError(
                    f"clients {other!r} and {contract.client_id!r} both pin "
                    f"invoice_sequence {contract.invoice_sequence}",
                    field="invoice_sequence",
                )
    numbers: dict[str, int] = {
        c.client_id: c.invoice_sequence for c in ordered if c.invoice_sequence
    }
    for contract in ordered:
        if contract.client_id in numbers:
            continue
        candidate = invoice_number_seed(contract.client_id)
        while candidate in taken:
            candidate = candidate % 999_999 + 1
        taken[candidate] = contract.client_id
        numbers[contract.client_id] = candidate
    return {
        client: f"{INVOICE_NUMBER_PREFIX}-{period.compact}-{number:06d}"
        for client, number in numbers.items()
    }


def campaign_line(line_no: int, metrics: CampaignMetrics, contract: Contract) -> InvoiceLine:
    """Price one campaign under ``contract``: the one rounding of this line happens here."""
    currency = contract.currency
    baseline_value = contract.baseline_roas * metrics.spend
    margin = metrics.ltv - baseline_value
    billable = max(margin, _ZERO) if contract.floor is FloorMode.PER_CAMPAIGN else margin
    fee = round_to_minor(contract.share_rate * billable, currency, contract.rounding)
    label = metrics.campaign_name or metrics.campaign_id
    platform = f" ({metrics.platform})" if metrics.platform else ""
    return InvoiceLine(
        line_no=line_no,
        kind=LineKind.CAMPAIGN,
        description=f"Profit share {percent(contract.share_rate)}% of margin recovered: "
        f"{label}{platform}",
        campaign_id=metrics.campaign_id,
        campaign_name=metrics.campaign_name,
        platform=metrics.platform,
        spend=exact(metrics.spend, currency),
        ltv=exact(metrics.ltv, currency),
        baseline_roas=contract.baseline_roas,
        achieved_roas=ratio(metrics.ltv, metrics.spend),
        baseline_value=exact(baseline_value, currency),
        margin_recovered=exact(margin, currency),
        billable_margin=exact(billable, currency),
        share_rate=contract.share_rate,
        fee=fee,
        accuracy=metrics.accuracy,
    )


def adjustment_line(line_no: int, kind: LineKind, fee: Decimal, contract: Contract) -> InvoiceLine:
    """A minimum-fee or fee-cap adjustment line that carries no campaign figures."""
    zero = exact(_ZERO, contract.currency)
    bound = contract.minimum_fee if kind is LineKind.MINIMUM_FEE else contract.fee_cap
    what = "Minimum fee" if kind is LineKind.MINIMUM_FEE else "Fee cap"
    return InvoiceLine(
        line_no=line_no,
        kind=kind,
        description=f"{what} adjustment (contract {what.lower()} {bound} {contract.currency})",
        spend=zero,
        ltv=zero,
        baseline_roas=contract.baseline_roas,
        baseline_value=zero,
        margin_recovered=zero,
        billable_margin=zero,
        share_rate=contract.share_rate,
        fee=fee,
    )


def carried_line(line_no: int, carried: CarriedFee, contract: Contract) -> InvoiceLine:
    """A line that bills an earlier period's fee carried forward (no campaign figures)."""
    zero = exact(_ZERO, contract.currency)
    below = contract.carry_threshold()
    why = f"below the {below} {contract.currency} minimum" if below is not None else "carried"
    return InvoiceLine(
        line_no=line_no,
        kind=LineKind.CARRIED_FORWARD,
        description=f"Profit share of {carried.period} carried forward ({why})",
        spend=zero,
        ltv=zero,
        baseline_roas=contract.baseline_roas,
        baseline_value=zero,
        margin_recovered=zero,
        billable_margin=zero,
        share_rate=contract.share_rate,
        fee=carried.amount,
        carried_from=carried.period,
    )


def price_lines(contract: Contract, metrics: Sequence[CampaignMetrics]) -> list[InvoiceLine]:
    """All lines of a client's invoice: campaigns by id, then any min/cap adjustment."""
    ordered = sorted(metrics, key=lambda m: m.campaign_id)
    lines = [campaign_line(n, m, contract) for n, m in enumerate(ordered, start=1)]
    computed = sum((line.fee for line in lines), _ZERO)
    if contract.floor is FloorMode.NET:
        computed = max(computed, _ZERO)
    currency, rounding = contract.currency, contract.rounding
    if contract.minimum_fee is not None:
        minimum = round_to_minor(contract.minimum_fee, currency, rounding)
        if sum((line.fee for line in lines), _ZERO) < minimum:
            delta = minimum - sum((line.fee for line in lines), _ZERO)
            lines.append(adjustment_line(len(lines) + 1, LineKind.MINIMUM_FEE, delta, contract))
            computed = minimum
    if contract.fee_cap is not None:
        cap = round_to_minor(contract.fee_cap, currency, rounding)
        if computed > cap:
            lines.append(
                adjustment_line(len(lines) + 1, LineKind.FEE_CAP, cap - computed, contract)
            )
    return lines


def compute_invoice(
    contract: Contract,
    metrics: Sequence[CampaignMetrics],
    *,
    number: str,
    period: BillingPeriod,
    sources: Sequence[SourceEvidence],
    issue_date: date | None = None,
    carried: Sequence[CarriedFee] = (),
) -> Invoice | NotBilled:
    """Compute one client's invoice for ``period``, or why it is not billed.

    Args:
        contract: The client's contract.
        metrics: The client's campaign metrics for the period (one per campaign).
        number: The invoice number from :func:`assign_invoice_numbers`.
        period: The billing period.
        sources: Evidence of where the metrics came from.
        issue_date: Defaults to the first day after the period, so reruns agree.
        carried: Earlier periods' fees carried forward to this invoice (each its own line,
            after the period's own lines and adjustments; the minimum fee and the fee cap apply
            to the period's own fees only).

    Returns:
        The sealed invoice, or a :class:`NotBilled` record when the fee is zero.
    """
    currency = contract.currency
    lines = price_lines(contract, metrics)
    campaign_lines = [line for line in lines if line.kind is LineKind.CAMPAIGN]
    own_fee = sum((line.fee for line in lines), _ZERO)
    for earlier in sorted(
        (c for c in carried if c.currency == currency and c.amount > 0), key=lambda c: c.period
    ):
        lines.append(carried_line(len(lines) + 1, earlier, contract))
    total_fee = sum((line.fee for line in lines), _ZERO)
    total_spend = sum((line.spend for line in campaign_lines), _ZERO)
    total_ltv = sum((line.ltv for line in campaign_lines), _ZERO)
    total_margin = sum((line.margin_recovered for line in campaign_lines), _ZERO)
    below = contract.carry_threshold()
    if campaign_lines and below is not None and 0 < total_fee < below:
        # Not issued: this period's own fee waits for the next invoice (earlier carried fees
        # keep waiting, each with its own period).
        return NotBilled(
            client_id=contract.client_id,
            reason="carried_forward",
            currency=currency,
            total_spend=exact(total_spend, currency),
            total_ltv=exact(total_ltv, currency),
            total_margin_recovered=exact(total_margin, currency),
            carried_fee=max(own_fee, _ZERO),
            carried_below=below,
        )
    if total_fee <= 0 or not campaign_lines:
        return NotBilled(
            client_id=contract.client_id,
            reason="zero_fee" if campaign_lines else "no_metrics",
            currency=currency,
            total_spend=exact(total_spend, currency),
            total_ltv=exact(total_ltv, currency),
            total_margin_recovered=exact(total_margin, currency),
        )
    issued = issue_date or period.end
    invoice = Invoice(
        number=number,
        client_id=contract.client_id,
        client_name=contract.name,
        client_email=contract.email,
        period=period.label,
        period_start=period.start,
        period_end=period.last_day,
        issue_date=issued,
        due_date=issued + timedelta(days=contract.payment_terms_days),
        currency=currency,
        payment_terms_days=contract.payment_terms_days,
        rounding=contract.rounding,
        lines=tuple(lines),
        total_spend=exact(total_spend, currency),
        total_ltv=exact(total_ltv, currency),
        total_baseline_value=exact(
            sum((line.baseline_value for line in campaign_lines), _ZERO), currency
        ),
        total_margin_recovered=exact(total_margin, currency),
        total_fee=total_fee,
        client_keeps=exact(total_margin - total_fee, currency),
        proof=ProofOfValue(
            software_version=__version__,
            baseline_roas=contract.baseline_roas,
            share_rate=contract.share_rate,
            floor=contract.floor,
            rounding=contract.rounding,
            minimum_fee=contract.minimum_fee,
            fee_cap=contract.fee_cap,
            input_records=sum(m.record_count for m in metrics),
            sources=tuple(sources),
        ),
    )
    return invoice.sealed()


def group_metrics(
    metrics: Iterable[CampaignMetrics], contracts: Mapping[str, Contract], contracts_file: str
) -> dict[str, list[CampaignMetrics]]:
    """Group metrics by client, refusing unknown clients and duplicate campaigns.

    Raises:
        InputError: A client has no contract, or a campaign appears twice.
    """
    grouped: dict[str, list[CampaignMetrics]] = defaultdict(list)
    seen: dict[tuple[str, str], CampaignMetrics] = {}
    for item in metrics:
        if item.client_id not in contracts:
            raise InputError(
                f"client {item.client_id!r} has no contract in {contracts_file}",
                file=item.origin_file,
                row=item.origin_row,
                field="client_id",
            )
        key = (item.client_id, item.campaign_id)
        if key in seen:
            first = seen[key]
            raise InputError(
                f"duplicate campaign {item.campaign_id!r} for client {item.client_id!r} "
                f"(first at row {first.origin_row})",
                file=item.origin_file,
                row=item.origin_row,
                field="campaign_id",
            )
        seen[key] = item
        grouped[item.client_id].append(item)
    return grouped


@dataclass
class _Tally:
    """Running totals of one currency."""

    invoices: int = 0
    spend: Decimal = _ZERO
    ltv: Decimal = _ZERO
    baseline: Decimal = _ZERO
    margin: Decimal = _ZERO
    fee: Decimal = _ZERO

    def add(self, spend: Decimal, ltv: Decimal, margin: Decimal, fee: Decimal = _ZERO) -> None:
        self.spend += spend
        self.ltv += ltv
        self.baseline += ltv - margin
        self.margin += margin
        self.fee += fee

    def totals(self, currency: str) -> CurrencyTotals:
        keeps = self.margin - self.fee
        return CurrencyTotals(
            currency=currency,
            invoices=self.invoices,
            total_spend=exact(self.spend, currency),
            total_ltv=exact(self.ltv, currency),
            total_baseline_value=exact(self.baseline, currency),
            total_margin_recovered=exact(self.margin, currency),
            total_fee=exact(self.fee, currency),
            client_keeps=exact(keeps, currency),
            monthly_recurring_revenue=exact(self.fee, currency),
            spend_weighted_roas=ratio(self.ltv, self.spend),
            client_roi_on_fee=ratio(keeps, self.fee),
        )


def summarise(
    period: BillingPeriod,
    invoices: Sequence[Invoice],
    not_billed: Sequence[NotBilled],
    sources: Sequence[SourceEvidence],
) -> RunSummary:
    """Totals per currency over every client with metrics; fees from the invoices."""
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    for inv in invoices:
        tally = tallies[inv.currency]
        tally.invoices += 1
        tally.add(inv.total_spend, inv.total_ltv, inv.total_margin_recovered, inv.total_fee)
    for nb in not_billed:
        if nb.reason in ("zero_fee", "carried_forward"):
            tallies[nb.currency].add(nb.total_spend, nb.total_ltv, nb.total_margin_recovered)
    return RunSummary(
        period=period.label,
        clients=len(invoices) + len(not_billed),
        invoices=len(invoices),
        not_billed=tuple(not_billed),
        by_currency=tuple(tallies[c].totals(c) for c in sorted(tallies)),
        sources=tuple(sources),
    )


def compute_run(
    contracts: Sequence[Contract],
    metrics: Iterable[CampaignMetrics],
    period: BillingPeriod,
    sources: Sequence[SourceEvidence],
    *,
    contracts_file: str = "the contracts file",
    issue_date: date | None = None,
    carried: Mapping[str, Sequence[CarriedFee]] | None = None,
) -> BillingRun:
    """Compute every client's invoice for ``period``.

    Args:
        contracts: All contracts; clients without metrics are recorded as ``no_metrics``.
        metrics: Campaign metrics of the period, from one source.
        period: The billing period.
        sources: Evidence of the source, copied into every invoice's proof of value.
        contracts_file: Named in errors about clients without a contract.
        issue_date: Override of the issue date (default: the day after the period).
        carried: Fees of earlier periods carried forward, by client id (from the ledger).

    Returns:
        The invoices (by client id), the clients not billed, and the run summary.

    Raises:
        InputError: A client in the metrics has no contract, or a campaign is duplicated.
    """
    by_id = {c.client_id: c for c in contracts}
    grouped = group_metrics(metrics, by_id, contracts_file)
    numbers = assign_invoice_numbers(contracts, period)
    invoices: list[Invoice] = []
    not_billed: list[NotBilled] = []
    for client_id in sorted(by_id):
        outcome = compute_invoice(
            by_id[client_id],
            grouped.get(client_id, []),
            number=numbers[client_id],
            period=period,
            sources=sources,
            issue_date=issue_date,
            carried=(carried or {}).get(client_id, ()),
        )
        (invoices if isinstance(outcome, Invoice) else not_billed).append(outcome)  # type: ignore[arg-type]
    return BillingRun(
        period=period,
        invoices=tuple(invoices),
        not_billed=tuple(not_billed),
        summary=summarise(period, invoices, not_billed, sources),
    )
