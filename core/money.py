"""Money as integer micro-dollars.

The database stores amounts as integers of 1/1,000,000 USD; Python code uses `Decimal` for display and input,
never float. Prices are computed exactly (Fraction/Decimal) and rounded once per request, half up, to the
micro-dollar (`round_half_up_micros`): the one rounding rule of the product.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from fractions import Fraction

MICRO = 1_000_000
_MICRO_EXP = Decimal("0.000001")

# The rounding modes the decimal module offers; anything else is a typo that would silently round wrongly.
_ROUNDINGS = {
    "ROUND_HALF_UP",
    "ROUND_HALF_EVEN",
    "ROUND_HALF_DOWN",
    "ROUND_UP",
    "ROUND_DOWN",
    "ROUND_CEILING",
    "ROUND_FLOOR",
    "ROUND_05UP",
}


def _to_decimal(value: Decimal | str | int) -> Decimal:
    # bool is an int subclass; True dollars is a bug, not an amount.
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int):
        raise TypeError(
            f"an amount of money must be a Decimal, a string or an int, not {type(value).__name__}"
            " (floats cannot hold cents exactly)"
        )
    if isinstance(value, str):
        text = value.strip().removeprefix("$").replace(",", "").strip()
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{value!r} is not an amount of money (expected something like 0.05)") from None
    else:
        dec = Decimal(value)
    if not dec.is_finite():
        raise ValueError(f"{value!r} is not a finite amount of money")
    return dec


def usd_to_micros(value: Decimal | str | int, *, rounding: str | None = None) -> int:
    """Dollars -> integer micro-dollars, exactly.

    An amount with a fraction of a micro-dollar is refused unless `rounding` (a decimal module rounding mode
    such as `decimal.ROUND_HALF_UP`) says how to round it: silent rounding of money is how totals drift.
    """
    dec = _to_decimal(value)
    scaled = dec.scaleb(6)
    if scaled == scaled.to_integral_value():
        return int(scaled)
    if rounding is None:
        raise ValueError(
            f"${dec} has a fraction of a micro-dollar (more than 6 decimal places); give a rounding rule to round it"
        )
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding rule {rounding!r}; use one of the decimal module's ROUND_* modes")
    return int(scaled.quantize(Decimal(1), rounding=rounding))


def micros_to_usd(micros: int) -> Decimal:
    """Integer micro-dollars -> Decimal dollars, exactly (6 decimal places)."""
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise TypeError(f"micro-dollars must be an int, not {type(micros).__name__}")
    return (Decimal(micros) / MICRO).quantize(_MICRO_EXP)


def round_half_up_micros(amount_usd: Fraction | Decimal | int) -> int:
    """An exact dollar amount -> micro-dollars, rounded half up (away from zero on a tie).

    This is the product's one rounding rule, applied once per request to the exact total: 1024x1024 at
    $0.05/MP is $0.0524288 -> 52429 micro-dollars. Half up (rather than ceil) keeps estimates unbiased to
    within half a micro-dollar, and matches the design document's worked examples.
    """
    exact = Fraction(amount_usd) * MICRO
    sign = -1 if exact < 0 else 1
    magnitude = abs(exact)
    whole, rest = divmod(magnitude.numerator, magnitude.denominator)
    if 2 * rest >= magnitude.denominator:
        whole += 1
    return sign * whole


def format_usd(micros: int) -> str:
    """`$0.052429`: always six decimals, because the micro-dollar is the unit of account.

    Fewer decimals would show two different stored amounts (52,429 and 52,000 micro-dollars) as the same
    "$0.05" and make itemised lists not add up to their totals; per-image prices are a few cents, so the
    digits that differ between requests sit in the 4th-6th places. Thousands are grouped for readability.
    """
    usd = micros_to_usd(micros)
    sign = "-" if usd < 0 else ""
    return f"{sign}${abs(usd):,.6f}"
