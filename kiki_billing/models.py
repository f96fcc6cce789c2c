"""The billing domain as frozen pydantic models.

Data flows one way: :class:`CampaignMetrics` (from a source) and :class:`Contract` (from the
contracts file) go into :mod:`kiki_billing.profit_share`, which returns :class:`Invoice` objects
and a :class:`RunSummary`.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from kiki_billing.errors import InputError
from kiki_billing.money import Rounding, currency_exponent, parse_amount

CALCULATOR_VERSION = "profit-share/1"
MAX_BASELINE_ROAS = Decimal(1_000_000)
MAX_REVISION = 99
"""Revisions an invoice number may have (``-R1`` to ``-R99``)."""

# NOTE: Stripe's minimum charge per currency ("Minimum and maximum charge amounts",
# stripe.com/docs/currencies#minimum-and-maximum-charge-amounts); a charge below it fails, so a
# contract may carry such a fee forward instead (carry_forward_below = "stripe").
STRIPE_MINIMUM_CHARGE: dict[str, Decimal] = {
    code: Decimal(amount)
    for code, amount in {
        "USD": "0.50", "AED": "2.00", "AUD": "0.50", "BGN": "1.00", "BRL": "0.50",
        "CAD": "0.50", "CHF": "0.50", "CZK": "15.00", "DKK": "2.50", "EUR": "0.50",
        "GBP": "0.30", "HKD": "4.00", "HUF": "175.00", "INR": "0.50", "JPY": "50",
        "MXN": "10.00", "MYR": "2.00", "NOK": "3.00", "NZD": "0.50", "PLN": "2.00",
        "RON": "2.00", "SEK": "3.00", "SGD": "0.50", "THB": "10.00",
    }.items()
}  # fmt: skip


def _strict_decimal(value: object) -> Decimal:
    if type(value) is Decimal and value.is_finite() and value.adjusted() < 15:
        return value  # computed or already parsed, and of a sane size: no need to re-parse
    try:
        return parse_amount(value)
    except InputError as exc:
        raise ValueError(exc.message) from None


def _computed_decimal(value: object) -> Decimal:
    if type(value) is Decimal and value.is_finite() and value.adjusted() < 30:
        return value
    try:
        return parse_amount(value, computed=True)
    except InputError as exc:
        raise ValueError(exc.message) from None


_AS_STRING = PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")

# Decimals enter as strings (never floats) and leave as plain decimal strings.
Amount = Annotated[Decimal, BeforeValidator(_strict_decimal), _AS_STRING]
"""An input amount: at most 15 integer and 12 fractional digits."""
Computed = Annotated[Decimal, BeforeValidator(_computed_decimal), _AS_STRING]
"""A computed amount or ratio: a product, a sum of lines, a ratio of two inputs."""

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


def _identifier(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid id (letters, digits and _ . : @ -, at most 128 chars)"
        )
    return value


class Frozen(BaseModel):
    """Base for immutable domain models."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class FloorMode(StrEnum):
    """Where losing campaigns are floored at zero margin."""

    PER_CAMPAIGN = "per_campaign"
    NET = "net"


class BillingPeriod(Frozen):
    """A billing period: a calendar month, ``start`` inclusive, ``end`` exclusive."""

    start: date
    end: date

    @classmethod
    def month(cls, label: str) -> BillingPeriod:
        """Parse ``YYYY-MM`` into the calendar month it names.

        Raises:
            ValueError: ``label`` is not ``YYYY-MM``.
        """
        match = re.fullmatch(r"([0-9]{4})-([0-9]{2})", label.strip())
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise ValueError(f"period must be YYYY-MM, got {label!r}")
        if not 1970 <= int(match.group(1)) <= 9998:
            raise ValueError(f"period year must be between 1970 and 9998, got {label!r}")
        year, month = int(match.group(1)), int(match.group(2))
        last = calendar.monthrange(year, month)[1]
        return cls(start=date(year, month, 1), end=date(year, month, last) + timedelta(days=1))

    @property
    def label(self) -> str:
        """``YYYY-MM`` for a calendar month, else ``start..end``."""
        if (
            self.start.day == 1
            and self.end == BillingPeriod.month(self.start.strftime("%Y-%m")).end
        ):
            return self.start.strftime("%Y-%m")
        return f"{self.start.isoformat()}..{self.end.isoformat()}"

    @property
    def compact(self) -> str:
        """``YYYYMM`` of the period's start, as used in invoice numbers."""
        return self.start.strftime("%Y%m")

    @property
    def last_day(self) -> date:
        """The last day inside the period."""
        return self.end - timedelta(days=1)

    def bounds(self, timezone: str = "UTC") -> tuple[datetime, datetime]:
        """The period's edges as UTC instants, taking midnight in ``timezone``."""
        zone = ZoneInfo(timezone)
        start = datetime.combine(self.start, time(0), zone).astimezone(UTC)
        end = datetime.combine(self.end, time(0), zone).astimezone(UTC)
        return start, end


class Contract(Frozen):
    """One client's profit-share contract, as read from the contracts file."""

    client_id: str
    name: str
    email: str | None = None
    currency: str = "USD"
    baseline_roas: Amount = Decimal("3.0")
    share_rate: Amount = Decimal("0.10")
    floor: FloorMode = FloorMode.PER_CAMPAIGN
    payment_terms_days: int = Field(default=30, ge=0, le=3650)
    rounding: Rounding = Rounding.HALF_UP
    minimum_fee: Amount | None = None
    fee_cap: Amount | None = None
    carry_forward_below: Amount | Literal["stripe"] | None = None
    """A fee total below this (or below Stripe's minimum charge for the currency, with
    ``"stripe"``) is not issued but carried to the next period's invoice."""
    timezone: str = "UTC"
    invoice_sequence: int | None = Field(default=None, ge=1, le=999_999)
    targets: tuple[str, ...] = ()
    target_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("currency")
    @classmethod
    def _check_currency(cls, value: str) -> str:
        try:
            currency_exponent(value)
        except InputError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("share_rate")
    @classmethod
    def _check_share_rate(cls, value: Decimal) -> Decimal:
        if not Decimal(0) <= value <= Decimal(1):
            raise ValueError(f"share rate must be between 0 and 1, got {value}")
        return value

    @field_validator("baseline_roas")
    @classmethod
    def _check_baseline(cls, value: Decimal) -> Decimal:
        if not Decimal(0) <= value <= MAX_BASELINE_ROAS:
            raise ValueError(
                f"baseline ROAS must be between 0 and {MAX_BASELINE_ROAS}, got {value}"
            )
        return value

    @field_validator("minimum_fee", "fee_cap")
    @classmethod
    def _check_fee_bound(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> Contract:
        if (
            self.minimum_fee is not None
            and self.fee_cap is not None
            and self.minimum_fee > self.fee_cap
        ):
            raise ValueError(f"minimum_fee {self.minimum_fee} exceeds fee_cap {self.fee_cap}")
        return self

    @field_validator("carry_forward_below")
    @classmethod
    def _check_carry_forward(
        cls, below: Decimal | str | None, info: ValidationInfo
    ) -> Decimal | str | None:
        currency = str(info.data.get("currency") or "USD")
        if below == "stripe" and currency not in STRIPE_MINIMUM_CHARGE:
            raise ValueError(
                f"Stripe publishes no minimum charge for {currency}; give the amount instead "
                '(e.g. "0.50")'
            )
        if isinstance(below, Decimal):
            if below <= 0:
                raise ValueError(f"must be more than 0, got {below}")
            exponent = currency_exponent(currency)
            if below != below.quantize(Decimal(1).scaleb(-exponent)):
                raise ValueError(f"{below} has more decimals than {currency} has")
        return below

    def carry_threshold(self) -> Decimal | None:
        """The total below which a fee is carried forward, or ``None``."""
        below = self.carry_forward_below
        if below == "stripe":
            return STRIPE_MINIMUM_CHARGE[self.currency]
        return below


class CampaignMetrics(Frozen):
    """What one campaign of one client spent and earned in a period, with where it came from."""

    client_id: str
    campaign_id: str
    spend: Amount
    ltv: Amount
    campaign_name: str | None = None
    platform: str | None = None
    accuracy: Amount | None = None
    record_count: int = 1
    origin_file: str | None = Field(default=None, exclude=True)
    origin_row: int | None = Field(default=None, exclude=True)

    @field_validator("client_id", "campaign_id")
    @classmethod
    def _check_ids(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("spend", "ltv")
    @classmethod
    def _check_not_negative(cls, value: Decimal) -> Decimal:
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value


class SourceEvidence(Frozen):
    """Where the numbers of a run came from, so that an auditor can fetch them again."""

    kind: Literal["metrics_file", "audit_trail", "prometheus"]
    location: str
    sha256: str | None = None
    record_count: int = 0
    chain_head: str | None = None
    queries: tuple[str, ...] = ()
    window_start: datetime | None = None
    window_end: datetime | None = None
    read_at: datetime | None = None


class ProofOfValue(Frozen):
    """Everything needed to recompute every line of an invoice."""

    formula: str = (
        "baseline_value = baseline_roas * spend; margin_recovered = ltv - baseline_value; "
        "fee = round(share_rate * billable_margin, minor unit, rounding) per line; "
        "billable_margin = max(margin_recovered, 0) per line (floor=per_campaign) or "
        "margin_recovered (floor=net, invoice total floored at 0); "
        "total_fee = sum(line fees) incl. minimum-fee / fee-cap adjustment lines"
    )
    calculator_version: str = CALCULATOR_VERSION
    software_version: str
    baseline_roas: Amount
    share_rate: Amount
    floor: FloorMode
    rounding: Rounding
    minimum_fee: Amount | None = None
    fee_cap: Amount | None = None
    input_records: int
    sources: tuple[SourceEvidence, ...]


class LineKind(StrEnum):
    """What an invoice line bills."""

    CAMPAIGN = "campaign"
    MINIMUM_FEE = "minimum_fee_adjustment"
    FEE_CAP = "fee_cap_adjustment"
    CARRIED_FORWARD = "carried_forward"
    """A fee of an earlier period that was below ``carry_forward_below`` and not issued."""


class InvoiceLine(Frozen):
    """One line of an invoice: a campaign's profit share, or a min/cap adjustment."""

    line_no: int
    kind: LineKind
    description: str
    campaign_id: str | None = None
    campaign_name: str | None = None
    platform: str | None = None
    spend: Computed
    ltv: Computed
    baseline_roas: Computed
    achieved_roas: Computed | None = None
    baseline_value: Computed
    margin_recovered: Computed
    billable_margin: Computed
    share_rate: Computed
    fee: Computed
    accuracy: Computed | None = None
    carried_from: str | None = None
    """The period (``YYYY-MM``) a carried-forward line's fee was computed for."""

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A line that carries nothing forward serialises as before this field existed, so
        # every invoice issued earlier keeps its billing hash.
        data = handler(self)
        if isinstance(data, dict) and data.get("carried_from") is None:
            data.pop("carried_from", None)
        return data


class Invoice(Frozen):
    """One profit-share invoice per client and period, immutable once issued."""

    number: str
    revision: int = Field(default=0, ge=0, le=MAX_REVISION)
    client_id: str
    client_name: str
    client_email: str | None = None
    period: str
    period_start: date
    period_end: date
    issue_date: date
    due_date: date
    currency: str
    payment_terms_days: int
    rounding: Rounding
    lines: tuple[InvoiceLine, ...]
    total_spend: Computed
    total_ltv: Computed
    total_baseline_value: Computed
    total_margin_recovered: Computed
    total_fee: Computed
    client_keeps: Computed
    proof: ProofOfValue
    content_hash: str = ""
    """:meth:`billing_hash` at issue: identifies what is billed, not where it was read from."""

    @property
    def document_number(self) -> str:
        """The number the revision is issued under: the base, then ``-R<n>`` from revision 1.

        ``KIKI-OaaS-202601-000042`` is revision 0; its corrections are
        ``KIKI-OaaS-202601-000042-R1``, ``-R2``, ... Every target that shows a number of its own
        uses this form (or the shortest form the provider allows, see the adapters).
        """
        return revision_number(self.number, self.revision)

    def canonical_json(self, *, indent: int | None = None) -> str:
        """The invoice as canonical JSON: sorted keys, decimal strings, UTF-8."""
        return canonical_json(self.model_dump(mode="json"), indent=indent)

    def billing_hash(self) -> str:
        """SHA-256 of what is billed: every field but the evidence (``proof``) and the hash.

        The same invoice computed from a copy of the same data (another folder, another file
        name, other line endings, another software version) has the same billing hash; a
        changed amount, line, date, client detail or currency changes it.
        """
        body = self.model_dump(mode="json", exclude={"content_hash", "proof"})
        return hashlib.sha256(canonical_json(body).encode()).hexdigest()

    def document_and_billing_hash(self) -> tuple[str, str]:
        """:meth:`canonical_json` and :meth:`billing_hash` from one serialisation."""
        data = self.model_dump(mode="json")
        document = canonical_json(data)
        body = {k: v for k, v in data.items() if k not in ("content_hash", "proof")}
        return document, hashlib.sha256(canonical_json(body).encode()).hexdigest()

    def sealed(self) -> Invoice:
        """Return this invoice with its content hash (:meth:`billing_hash`) filled in."""
        return self.model_copy(update={"content_hash": self.billing_hash()})


class NotBilled(Frozen):
    """A client of the run that gets no invoice, and why (recorded, never pushed)."""

    client_id: str
    reason: Literal["zero_fee", "no_metrics", "carried_forward"]
    currency: str
    total_spend: Computed
    total_ltv: Computed
    total_margin_recovered: Computed
    carried_fee: Computed | None = None
    """``carried_forward``: the period's own fee, carried to the next period's invoice."""
    carried_below: Computed | None = None
    """``carried_forward``: the contract's threshold (``carry_forward_below``)."""

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in ("carried_fee", "carried_below"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data


class CurrencyTotals(Frozen):
    """Totals of a run in one currency."""

    currency: str
    invoices: int
    total_spend: Computed
    total_ltv: Computed
    total_baseline_value: Computed
    total_margin_recovered: Computed
    total_fee: Computed
    client_keeps: Computed
    monthly_recurring_revenue: Computed
    spend_weighted_roas: Computed | None
    client_roi_on_fee: Computed | None


class RunSummary(Frozen):
    """The summary of one billing run: per-currency totals and who was not billed."""

    period: str
    clients: int
    invoices: int
    not_billed: tuple[NotBilled, ...]
    by_currency: tuple[CurrencyTotals, ...]
    sources: tuple[SourceEvidence, ...]


def revision_number(number: str, revision: int) -> str:
    """``number`` for revision 0, ``number-R<revision>`` after (see ``Invoice.document_number``)."""
    return number if revision == 0 else f"{number}-R{revision}"


def canonical_json(data: Any, *, indent: int | None = None) -> str:
    """Serialise ``data`` deterministically (sorted keys, no float, UTF-8 kept)."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(
        data, sort_keys=True, ensure_ascii=False, separators=separators, indent=indent
    )
