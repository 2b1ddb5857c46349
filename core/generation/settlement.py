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


def price_units(
    price: ProviderPrice,
    units: Decimal | int | Fraction,
    *,
    params: Mapping[str, Any] | None = None,
    units_used_this_month: Decimal | int | Fraction = 0,
) -> int:
    """The cost in micro-USD of `units` of `price`'s unit (volume tiers from `units_used_this_month`; the key
    parameter, e.g. Ideogram's rendering_speed, from `params`), rounded once, half up."""
    raise NotImplementedError


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
    raise NotImplementedError


def require_price(prepared: PreparedRequest) -> int:
    """The price version id of a prepared request that can be priced; `InvalidInput` otherwise (an unpriced
    provider is never run as free)."""
    raise NotImplementedError


_UNUSED: tuple[Any, ...] = (InvalidInput, round_half_up_micros, PriceUnit)
