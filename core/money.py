"""Money as integer micro-dollars.

The database stores amounts as integers of 1/1,000,000 USD; Python code uses `Decimal` for display and input,
never float. Prices are computed exactly (Fraction/Decimal) and rounded once per request, half up, to the
micro-dollar (`round_half_up_micros`): the one rounding rule of the product.

Every amount a person or a file gives (prices, limits, and the quantities prices are computed from) passes
`exact_decimal` here, the one place for the rules: a plain decimal (no exponent: `1E+999999` is six bytes of
text and a million digits of number), at most six decimal places, within a sane maximum, and exact (a float
is accepted only when it is exactly the decimal it was written as). Bounded inputs keep every later step
(exact estimates, formatting, pages) cheap and free of `decimal` signals.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

MICRO = 1_000_000
_MICRO_EXP = Decimal("0.000001")

MAX_DECIMAL_PLACES = 6
"""The micro-dollar is the unit of account: no amount (or priced quantity) has more places than that."""
MAX_UNIT_PRICE_USD = Decimal(1_000_000)
"""The dearest a single priced unit (a megapixel, an image, a GPU second) may be: far above any real price."""
MAX_LIMIT_USD = Decimal(10_000_000)
"""The largest cost or budget limit."""
MAX_AMOUNT_USD = Decimal(1_000_000_000_000)
"""The largest amount `usd_to_micros` converts: its micro-dollars still fit a 64-bit integer column."""
MAX_AMOUNT_CHARS = 40
"""Longer text is no amount anyone means; refusing it early keeps parsing cheap."""
_PLAIN_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SHOWN_CHARS = 24

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


class WrittenNumber(float):
    """A number read from JSON that remembers how it was written.

    A float alone would round `0.12345678901234567` silently; the import parser makes its numbers
    WrittenNumbers, so money from a file is exactly the decimal the file says, while every parameter that
    takes a float still gets one."""

    written: str

    def __new__(cls, written: str) -> WrittenNumber:
        number = super().__new__(cls, written)
        number.written = written
        return number


def _shown(value: object) -> str:
    """A value for a message, cut short: a hostile amount must not make an error message a megabyte."""
    if isinstance(value, WrittenNumber):
        text = value.written
    elif isinstance(value, str | Decimal):
        text = str(value)
    else:
        text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _plain_decimal(text: str, what: str) -> Decimal:
    body = text.strip()
    if len(body) > MAX_AMOUNT_CHARS:
        raise ValueError(f"{what} {_shown(body)} is {len(body):,} characters long; no amount needs that many")
    if _PLAIN_DECIMAL.fullmatch(body) is None:
        if "e" in body.lower() and _PLAIN_DECIMAL.fullmatch(body.lower().split("e", 1)[0]) is not None:
            raise ValueError(f"{what} {_shown(body)} uses an exponent; write it as a plain decimal such as 0.05")
        raise ValueError(f"{what} {_shown(body)} is not a plain decimal number such as 0.05")
    return Decimal(body)


def _decimal_places(value: Decimal) -> int:
    """Decimal places of `value` ignoring trailing zeros (0.0500 has 2), computed without a decimal context."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0")) if any(digits) else len(digits)
    return max(0, -(exponent + trailing))


def exact_decimal(
    value: object,
    *,
    what: str,
    maximum: Decimal,
    minimum: Decimal = Decimal(0),
    places: int = MAX_DECIMAL_PLACES,
    above_minimum: bool = False,
) -> Decimal:
    """`value` as an exact, bounded Decimal, or ValueError with a message naming `what`.

    Accepted: a Decimal, an int, a plain decimal string (`"0.05"`; no exponent, no `$`), a WrittenNumber
    (by its written text), or a float that is exactly the decimal it reads as (0.5, not 0.1). The value must
    lie within [minimum, maximum] (above `minimum` when `above_minimum`) and have at most `places` decimal
    places. The result is canonical: no exponent, no trailing zeros (`1E+2` -> `100`, `0.0500` -> `0.05`).
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an amount such as 0.05, not {value}")
    if isinstance(value, WrittenNumber):
        dec = _plain_decimal(value.written, what)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be a finite amount, not {value}")
        dec = Decimal(repr(value))
        if Decimal(value) != dec:
            raise ValueError(
                f"{what} {value!r} is not exactly {value!r} as a binary float; give it as text (\"{value!r}\")"
            )
    elif isinstance(value, int):
        if abs(value) > 10**MAX_AMOUNT_CHARS:  # compared as ints: converting a huge one costs time
            raise ValueError(f"{what} {_shown(value)} is above the maximum of {maximum:,}")
        dec = Decimal(value)
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        dec = _plain_decimal(value, what)
    else:
        raise ValueError(f"{what} must be an amount such as 0.05, not {type(value).__name__}")
    if not dec.is_finite():
        raise ValueError(f"{what} must be a finite amount, not {_shown(value)}")
    # Comparisons are exact whatever the exponent; nothing below runs on an unbounded value.
    if dec > maximum:
        raise ValueError(f"{what} {_shown(value)} is above the maximum of {maximum:,}")
    if dec < minimum or (above_minimum and dec == minimum):
        rule = f"above {minimum}" if above_minimum else f"at least {minimum}" if minimum else "0 or more"
        verb = "is negative; it must be" if dec < 0 else "must be"
        raise ValueError(f"{what} {_shown(value)} {verb} {rule}")
    if _decimal_places(dec) > places:
        raise ValueError(f"{what} {_shown(value)} has more than {places} decimal places")
    return Decimal(format(dec.normalize(), "f")) + 0  # + 0 turns -0 into 0


def unit_price(value: object, what: str = "the price") -> Decimal:
    """A price per unit: 0 to MAX_UNIT_PRICE_USD, whole micro-dollars."""
    return exact_decimal(value, what=what, maximum=MAX_UNIT_PRICE_USD)


def money_limit(value: object, what: str = "the limit") -> Decimal:
    """A cost or budget limit: 0 to MAX_LIMIT_USD, whole micro-dollars."""
    return exact_decimal(value, what=what, maximum=MAX_LIMIT_USD)


def _to_decimal(value: Decimal | str | int) -> Decimal:
    # bool is an int subclass; True dollars is a bug, not an amount.
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int):
        raise TypeError(
            f"an amount of money must be a Decimal, a string or an int, not {type(value).__name__}"
            " (floats cannot hold cents exactly)"
        )
    if isinstance(value, str):
        text = value.strip().removeprefix("$").replace(",", "").strip()
        if len(text) > MAX_AMOUNT_CHARS:
            raise ValueError(f"{_shown(value)} is not an amount of money (expected something like 0.05)")
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{_shown(value)} is not an amount of money (expected something like 0.05)") from None
    else:
        dec = Decimal(value)
    if not dec.is_finite():
        raise ValueError(f"{_shown(value)} is not a finite amount of money")
    if dec.copy_abs() > MAX_AMOUNT_USD:  # exact, no context: scaling 1E+100000000 would raise decimal.Overflow
        raise ValueError(f"{_shown(value)} is beyond any amount of money this product handles")
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
