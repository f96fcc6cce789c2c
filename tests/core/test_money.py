from decimal import Decimal

import pytest

from kiki_billing.errors import InputError
from kiki_billing.money import (
    CURRENCY_EXPONENTS,
    Rounding,
    currency_exponent,
    format_money,
    parse_amount,
    round_to_minor,
    to_minor_units,
)


@pytest.mark.parametrize(
    ("currency", "exponent"), [("USD", 2), ("JPY", 0), ("KWD", 3), ("EUR", 2), ("CLF", 4)]
)
def test_currency_exponent_follows_iso_4217(currency: str, exponent: int) -> None:
    assert currency_exponent(currency) == exponent


def test_every_stripe_zero_and_three_decimal_currency_is_known() -> None:
    for code in [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]:
        assert code in CURRENCY_EXPONENTS
    for code in ["BHD", "JOD", "KWD", "OMR", "TND"]:
        assert CURRENCY_EXPONENTS[code] == 3


def test_unknown_currency_is_refused() -> None:
    with pytest.raises(InputError, match="unknown currency 'XYZ'"):
        currency_exponent("XYZ")


@pytest.mark.parametrize(
    "bad", ["1e5", "1E-2", "NaN", "nan", "Infinity", "-inf", "1,000.00", "", " ", "0x10", "1.2.3"]
)
def test_parse_amount_refuses_non_decimal_strings(bad: str) -> None:
    with pytest.raises(InputError, match="not a decimal amount"):
        parse_amount(bad, field="spend")


@pytest.mark.parametrize("bad", [1.5, float("nan"), float("inf"), None, [1]])
def test_parse_amount_refuses_non_strings(bad: object) -> None:
    with pytest.raises(InputError):
        parse_amount(bad)


def test_parse_amount_refuses_absurd_sizes() -> None:
    with pytest.raises(InputError):
        parse_amount("1" * 16)
    with pytest.raises(InputError):
        parse_amount("0." + "1" * 13)


def test_parse_amount_is_exact() -> None:
    assert parse_amount("130090.01") == Decimal("130090.01")
    assert parse_amount("-0.5") == Decimal("-0.5")


def test_rounding_modes_differ_only_on_ties() -> None:
    assert round_to_minor(Decimal("2.345"), "USD", Rounding.HALF_UP) == Decimal("2.35")
    assert round_to_minor(Decimal("2.345"), "USD", Rounding.HALF_EVEN) == Decimal("2.34")
    assert round_to_minor(Decimal("2.355"), "USD", Rounding.HALF_EVEN) == Decimal("2.36")
    assert round_to_minor(Decimal("1234.5"), "JPY") == Decimal("1235")
    assert round_to_minor(Decimal("1.2345"), "KWD") == Decimal("1.235")


def test_minor_units_and_formatting() -> None:
    assert to_minor_units(Decimal("2209.00"), "USD") == 220900
    assert to_minor_units(Decimal("1235"), "JPY") == 1235
    assert to_minor_units(Decimal("1.235"), "KWD") == 1235
    with pytest.raises(ValueError, match="not a whole number"):
        to_minor_units(Decimal("1.001"), "USD")
    assert format_money(Decimal("8121"), "USD") == "8121.00"
    assert format_money(Decimal("5"), "JPY") == "5"
