"""Settlement: the actual cost of one attempt, from the billing facts the adapter reported.

The rules (ARCHITECTURE.md, "settle"):

| billing    | billed units reported | actual cost                                                       |
|------------|-----------------------|-------------------------------------------------------------------|
| billed     | yes                   | the attempt's price version applied to the billed units           |
| billed     | no                    | the attempt's estimate                                            |
| not_billed | -                     | 0                                                                 |
| unknown    | -                     | None: budgets hold the estimate until the attempt is reconciled   |

Billed units are in the price's own unit (fal: megapixels x $/MP; Ideogram: images x $/image, keyed by the
attempt's rendering speed; GPU seconds for a gpu_second price). A free price (the Qwen Space, the sandbox) costs
0 and is `not_billed` whatever the adapter said. Sandbox and emulator attempts are priced exactly the same way,
their figure labelled simulated (their would-be cost, so budgets can be rehearsed offline). The amount is
computed exactly and rounded once, half up, to the micro-dollar, as estimates are (core.money).

An attempt never runs without a usable price: `require_price` refuses a prepared request without one (prepare
already reports it; this is the assertion at the door), so no unpriced attempt is ever recorded as $0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from common.errors import Billing, InvalidInput
from core.generation.prepare import PreparedRequest
from core.money import round_half_up_micros
from core.pricing import PriceUnit, ProviderPrice

__all__ = ["Settlement", "actual_cost", "price_units", "require_price"]

_MODES = frozenset({"live", "emulator", "sandbox"})


@dataclass(frozen=True)
class Settlement:
    """The settled facts of one attempt."""

    actual_micro_usd: int | None
    """None exactly when billing is unknown."""
    billing: Billing
    billed_units: Decimal | None
    simulated: bool
    """A sandbox or emulator attempt: its would-be cost, never live money."""
    basis: str
    """How the figure was reached: billed_units | estimate | not_billed | free | unknown."""


def _unit_price(price: ProviderPrice, params: Mapping[str, Any] | None) -> Fraction:
    """The base price per unit; for a keyed price (Ideogram by rendering_speed), the attempt's key value, or
    the catalog default when the attempt did not set it (as the estimate did)."""
    if price.unit is PriceUnit.FREE:
        return Fraction(0)
    if price.key_param is None:
        assert price.usd_per_unit is not None  # guaranteed by ProviderPrice's validation
        return Fraction(price.usd_per_unit)
    value = (params or {}).get(price.key_param)
    if value is None:
        value = price.spec.params[price.key_param].default
    for key, amount in price.keyed_usd_per_unit.items():
        if isinstance(value, str) and key.lower() == value.strip().lower():
            return Fraction(amount)
    raise ValueError(
        f"no {price.provider} price for {price.key_param}={value!r}; priced values: "
        f"{', '.join(price.keyed_usd_per_unit)}"
    )


def price_units(
    price: ProviderPrice,
    units: Decimal | int | Fraction,
    *,
    params: Mapping[str, Any] | None = None,
    units_used_this_month: Decimal | int | Fraction = 0,
) -> int:
    """The cost in micro-USD of `units` of `price`'s unit (volume tiers from `units_used_this_month`; the key
    parameter, e.g. Ideogram's rendering_speed, from `params`), computed exactly and rounded once, half up.
    Raises ValueError for an unusable stored price or negative quantities."""
    if price.problem is not None:
        raise ValueError(f"the stored price of {price.provider} cannot be used: {price.problem}")
    quantity, used = Fraction(units), Fraction(units_used_this_month)
    if quantity < 0 or used < 0:
        raise ValueError("units cannot be negative")
    if price.unit is PriceUnit.FREE:
        return 0
    base = _unit_price(price, params)
    if not price.tiers:
        return round_half_up_micros(quantity * base)
    # Volume tiers, as core.pricing.estimate_cost applies them: a quantity straddling a boundary is split.
    bands = [(Fraction(0), base), *((Fraction(t.from_units), Fraction(t.usd_per_unit)) for t in price.tiers)]
    start, end, total = used, used + quantity, Fraction(0)
    for i, (low, band_price) in enumerate(bands):
        high = bands[i + 1][0] if i + 1 < len(bands) else None
        part_low = max(start, low)
        part_high = end if high is None else min(end, high)
        if part_high > part_low:
            total += (part_high - part_low) * band_price
    return round_half_up_micros(total)


def actual_cost(
    *,
    price: ProviderPrice,
    billing: Billing,
    billed_units: Decimal | None,
    estimated_micro_usd: int,
    params: Mapping[str, Any] | None = None,
    mode: str = "live",
    units_used_this_month: Decimal | int | Fraction = 0,
) -> Settlement:
    """The actual cost of one attempt (see the table above). `params` are the attempt's effective parameters
    (for a keyed price); `mode` its connection mode (live | emulator | sandbox)."""
    if mode not in _MODES:
        raise ValueError(f"an attempt's mode is one of {', '.join(sorted(_MODES))}, not {mode!r}")
    if price.problem is not None:
        raise ValueError(f"the stored price of {price.provider} cannot be used: {price.problem}")
    if estimated_micro_usd < 0:
        raise ValueError("an estimate cannot be negative")
    facts = Billing(billing)
    if facts is Billing.NOT_BILLED and billed_units is not None:
        raise ValueError("an attempt with billed units cannot say it was not billed")
    simulated = mode != "live"
    if price.unit is PriceUnit.FREE:
        # Free is free whatever happened (even "unknown": nothing can have been charged).
        return Settlement(0, Billing.NOT_BILLED, None, simulated, "free")
    if facts is Billing.NOT_BILLED:
        return Settlement(0, facts, None, simulated, "not_billed")
    if facts is Billing.UNKNOWN:
        return Settlement(None, facts, billed_units, simulated, "unknown")
    if billed_units is None:
        return Settlement(estimated_micro_usd, facts, None, simulated, "estimate")
    cost = price_units(price, billed_units, params=params, units_used_this_month=units_used_this_month)
    return Settlement(cost, facts, billed_units, simulated, "billed_units")


def require_price(prepared: PreparedRequest) -> int:
    """The price version id of a prepared request that can be priced; `InvalidInput` otherwise (an unpriced
    provider is never run as free)."""
    if prepared.price is None:
        raise InvalidInput(
            f"{prepared.provider} has no price in force: it is never run as free; enter a price first",
            {"provider": "no price in force"},
        )
    if prepared.estimate is None:
        reason = "; ".join(prepared.problems) or "the request cannot be priced"
        raise InvalidInput(f"{prepared.provider}: {reason}", {"provider": "cannot be priced"})
    return prepared.price.id
