"""Exact money: decimal parsing, ISO 4217 minor units and rounding.

Money is always :class:`decimal.Decimal`. Amounts enter as decimal strings in the currency's
major unit; floats, NaN, Infinity and exponent notation are refused. A fee is rounded once,
per line, to the currency's minor unit.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal
from enum import StrEnum

from kiki_billing.errors import InputError

# ISO 4217 minor-unit exponents. Every currency Stripe accepts is here; the ones not listed
# in the exceptions have two decimals.
_TWO_DECIMALS = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP BYN BZD
CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD
GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD
MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP
PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB
TJS TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VES WST XCD YER ZAR ZMW ZWL
"""
_ZERO_DECIMALS = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_THREE_DECIMALS = "BHD IQD JOD KWD LYD OMR TND"
_FOUR_DECIMALS = "CLF UYW"

CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(_TWO_DECIMALS.split(), 2),
    **dict.fromkeys(_ZERO_DECIMALS.split(), 0),
    **dict.fromkeys(_THREE_DECIMALS.split(), 3),
    **dict.fromkeys(_FOUR_DECIMALS.split(), 4),
}

# Wide enough that no intermediate product of an amount (<= 15 integer digits, <= 12
# decimals) and a rate (<= 12 decimals) is ever rounded before the one rounding per line.
MONEY_CONTEXT = decimal.Context(
    prec=60,
    rounding=decimal.ROUND_HALF_UP,
    traps=[
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
    ],
)

_AMOUNT = re.compile(r"-?(?:0|[1-9]\d{0,14})(?:\.\d{1,12})?")
# Computed amounts (a baseline value, a total of many lines, a ratio) may outgrow any one
# input; they are still plain decimals, bounded so that nothing absurd is ever stored.
_COMPUTED = re.compile(r"-?(?:0|[1-9]\d{0,29})(?:\.\d{1,16})?")


class Rounding(StrEnum):
    """How a line fee is rounded to the minor unit."""

    HALF_UP = "half_up"
    HALF_EVEN = "half_even"

    @property
    def decimal_mode(self) -> str:
        """The :mod:`decimal` rounding constant for this mode."""
        return decimal.ROUND_HALF_UP if self is Rounding.HALF_UP else decimal.ROUND_HALF_EVEN


def currency_exponent(currency: str) -> int:
    """Return the ISO 4217 minor-unit exponent of ``currency``.

    Args:
        currency: An ISO 4217 code, upper case (``"USD"``).

    Returns:
        The number of decimals of the minor unit (USD 2, JPY 0, KWD 3).

    Raises:
        InputError: The currency is not a known ISO 4217 code.
    """
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise InputError(f"unknown currency {currency!r} (expected an ISO 4217 code)") from None


def parse_amount(value: object, *, field: str | None = None, computed: bool = False) -> Decimal:
    """Parse a decimal string such as ``"36000.00"`` into an exact :class:`Decimal`.

    Args:
        value: The raw value; must be a ``str`` (or an existing finite ``Decimal``).
        field: The field name, for the error message.
        computed: A value kiki-billing computed (up to 30 integer and 16 fractional digits)
            rather than an input (up to 15 and 12).

    Returns:
        The exact amount.

    Raises:
        InputError: Not a plain decimal string: a float, NaN, Infinity, exponent notation,
            thousands separators, more than 15 integer or 12 fractional digits.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InputError(f"amount must be finite, got {value}", field=field)
        text = format(value, "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise InputError(
            f"amount must be a decimal string, got {type(value).__name__} {value!r}", field=field
        )
    if not (_COMPUTED if computed else _AMOUNT).fullmatch(text):
        raise InputError(f"not a decimal amount: {value!r}", field=field)
    return Decimal(text)


def round_to_minor(
    amount: Decimal, currency: str, rounding: Rounding = Rounding.HALF_UP
) -> Decimal:
    """Round ``amount`` to the minor unit of ``currency`` (the one rounding per line)."""
    quantum = Decimal(1).scaleb(-currency_exponent(currency))
    return amount.quantize(quantum, rounding=rounding.decimal_mode, context=MONEY_CONTEXT)


def with_minor_digits(amount: Decimal, currency: str) -> Decimal:
    """Show ``amount`` with at least the currency's decimals, without rounding it.

    ``Decimal("36000")`` in USD becomes ``Decimal("36000.00")``; an amount that already has
    more decimals than the currency keeps them all.
    """
    exponent = currency_exponent(currency)
    current = -int(amount.as_tuple().exponent)
    if current >= exponent:
        return amount
    return amount.quantize(Decimal(1).scaleb(-exponent), context=MONEY_CONTEXT)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """Return ``amount`` as an integer count of minor units; it must already be rounded.

    Raises:
        ValueError: ``amount`` has more decimals than the currency's minor unit.
    """
    scaled = amount.scaleb(currency_exponent(currency), context=MONEY_CONTEXT)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} {currency} is not a whole number of minor units")
    return int(scaled)


def format_money(amount: Decimal, currency: str) -> str:
    """Format ``amount`` as a plain decimal string in the major unit (``"8121.00"``)."""
    return format(with_minor_digits(amount, currency), "f")
