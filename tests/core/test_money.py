"""The one place for money rules (core.money.exact_decimal): plain decimals, at most six places, bounded, exact."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from core.money import (
    MAX_LIMIT_USD,
    MAX_UNIT_PRICE_USD,
    WrittenNumber,
    exact_decimal,
    money_limit,
    unit_price,
    usd_to_micros,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("0.05", "0.05"),
        (" 0.0500 ", "0.05"),  # trailing zeros are no extra precision
        ("100", "100"),
        ("0", "0"),
        ("-0", "0"),
        ("0.000001", "0.000001"),
        ("1000000", "1000000"),  # the maximum itself
        (3, "3"),
        (Decimal("1E+2"), "100"),  # a Decimal from code is judged by its value, and written without exponent
        (0.5, "0.5"),  # a float that is exactly the decimal it reads as
        (0.25, "0.25"),
        (WrittenNumber("0.02"), "0.02"),  # a JSON number, by the text the file holds
        (WrittenNumber("0.123456"), "0.123456"),
    ],
)
def test_exact_amounts_are_accepted_and_made_canonical(given: object, expected: str) -> None:
    result = unit_price(given)
    assert str(result) == expected
    assert "E" not in str(result)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("1E+1000", "uses an exponent"),  # broke debug-config and the Settings page
        ("1E+999999", "uses an exponent"),  # stored about 1 MB per version
        ("1E+100000000", "uses an exponent"),  # escaped as decimal.Overflow
        ("1e-2", "uses an exponent"),
        (WrittenNumber("1e-2"), "uses an exponent"),
        (Decimal("1E+1000"), "above the maximum of 1,000,000"),
        (Decimal("1E+100000000"), "above the maximum of 1,000,000"),
        (10**100, "above the maximum"),
        ("1000000.000001", "above the maximum"),
        ("0.0000001", "more than 6 decimal places"),
        (Decimal("1E-7"), "more than 6 decimal places"),
        (WrittenNumber("0.12345678901234567"), "more than 6 decimal places"),  # a float would round it silently
        (0.1, "not exactly 0.1 as a binary float"),
        (0.02, "not exactly 0.02 as a binary float"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        ("-0.01", "is negative"),
        (-1, "is negative"),
        (True, "not True"),
        ("$5", "not a plain decimal"),
        ("1,000", "not a plain decimal"),
        ("abc", "not a plain decimal"),
        ("", "not a plain decimal"),
        ("9" * 41, "characters long"),
        ([1], "not list"),
    ],
)
def test_inexact_unbounded_or_odd_amounts_are_refused(given: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"^the price") as caught:
        unit_price(given)
    assert message in str(caught.value)


def test_messages_never_repeat_a_huge_value() -> None:
    with pytest.raises(ValueError) as caught:
        unit_price("1" * 1_000_000)
    assert len(str(caught.value)) < 200
    with pytest.raises(ValueError) as caught:
        unit_price(Decimal("1" * 100_000))
    assert len(str(caught.value)) < 200


def test_limits_go_higher_than_unit_prices() -> None:
    assert money_limit("10000000") == MAX_LIMIT_USD
    with pytest.raises(ValueError, match="above the maximum of 10,000,000"):
        money_limit("10000000.01")
    with pytest.raises(ValueError, match="above the maximum of 1,000,000"):
        unit_price(str(MAX_UNIT_PRICE_USD + 1))


def test_other_quantities_take_their_own_bounds() -> None:
    assert exact_decimal("0.5", what="seconds", maximum=Decimal(60), above_minimum=True) == Decimal("0.5")
    with pytest.raises(ValueError, match="seconds 0 must be above 0"):
        exact_decimal("0", what="seconds", maximum=Decimal(60), above_minimum=True)
    with pytest.raises(ValueError, match="more than 2 decimal places"):
        exact_decimal("0.125", what="x", maximum=Decimal(1), places=2)


def test_written_numbers_are_floats_for_parameters_and_exact_text_for_money() -> None:
    number = json.loads("0.12345678901234567", parse_float=WrittenNumber)
    assert isinstance(number, WrittenNumber) and number == 0.12345678901234567
    assert number.written == "0.12345678901234567"


@pytest.mark.parametrize("hostile", ["1E+100000000", "-1E+100000000", Decimal("1E+100000000"), "1" * 1000])
def test_usd_to_micros_refuses_unbounded_amounts_without_a_decimal_signal(hostile: object) -> None:
    with pytest.raises(ValueError):  # not decimal.Overflow, not InvalidOperation
        usd_to_micros(hostile)  # type: ignore[arg-type]
    assert usd_to_micros("1000000000000") == 10**18  # the largest amount still fits a 64-bit column
