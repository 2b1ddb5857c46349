"""Volume tiers in effect: each provider's month-to-date billed units, from the daily rollups (live only).

Tiered prices (core.pricing.PriceTier) lower the unit price once the calendar month's usage passes a threshold.
The estimate needs "how many units has this provider billed this month" before the request:
`month_to_date_units` answers it from `usage_daily_rollups` (never a scan of usage_attempts), counting the
unit the price charges in:

- megapixel: the megapixels of the images returned (what the estimate counts; a provider's own unit count may
  round differently, and attempts that reported none would otherwise be missed);
- image (and free): the images returned;
- gpu_second: the GPU seconds the provider reported (nothing else measures them).

Only live attempts count: sandbox and emulator runs never move a real invoice onto a cheaper tier. The month is
the UTC calendar month containing `now`, the same calendar budgets use (core.generation.periods).

Crossing a tier inside one request: the request is split at the boundary and each part priced at its band
(core.pricing.estimate_cost, core.generation.settlement.price_units); the estimate names the bands it used
(`CostEstimate.tiers_used`). Two requests admitted at the same moment both see the month-to-date figure before
either: the second may be priced a few units on the dearer side of a boundary, never the cheaper side, so a
reservation never under-holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import price_store
from core.money import MICRO
from core.pricing import PriceUnit, ProviderPrice
from db.models import UsageDailyRollup

__all__ = ["MonthUnits", "TierPosition", "month_to_date_units", "month_units", "tier_position"]

LIVE_MODE = "live"
"""The rollups' connection mode of live attempts (core.generation.usage.AttemptMode.LIVE)."""


def _utc_day(now: datetime) -> date:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime: pass a timezone-aware datetime")
    return now.astimezone(UTC).date()


@dataclass(frozen=True)
class MonthUnits:
    """A provider's live month-to-date counters from the rollups (micro-units, as stored)."""

    provider: str
    month_start: date
    through: date
    megapixels_micro: int
    images: int
    billed_units_micro: int

    def in_unit(self, unit: PriceUnit) -> Decimal:
        """The month-to-date quantity in a price's unit (see the module docstring for which counter)."""
        if unit is PriceUnit.MEGAPIXEL:
            return Decimal(self.megapixels_micro) / MICRO
        if unit is PriceUnit.GPU_SECOND:
            return Decimal(self.billed_units_micro) / MICRO
        return Decimal(self.images)


def month_units(session: Session, provider: str, now: datetime) -> MonthUnits:
    """The provider's live counters from the 1st of `now`'s UTC month through `now`'s UTC day (inclusive)."""
    day = _utc_day(now)
    start = day.replace(day=1)
    rollup = UsageDailyRollup
    row = session.execute(
        select(
            func.coalesce(func.sum(rollup.megapixels_micro), 0),
            func.coalesce(func.sum(rollup.images), 0),
            func.coalesce(func.sum(rollup.billed_units_micro), 0),
        ).where(
            rollup.provider == provider,
            rollup.mode == LIVE_MODE,
            rollup.day >= start,
            rollup.day <= day,
        )
    ).one()
    return MonthUnits(provider, start, day, int(row[0]), int(row[1]), int(row[2]))


def month_to_date_units(
    session: Session, provider: str, now: datetime, *, price: ProviderPrice | None = None
) -> Decimal:
    """The provider's billed units so far this UTC month (live only), in its price's unit, for
    `estimate_cost(..., units_used_this_month=...)`. `price` is the price the estimate uses (default: the one in
    force today); a provider without a price has used 0 units of nothing."""
    if price is None:
        view = price_store.active_price(session, provider, _utc_day(now))
        if view is None:
            return Decimal(0)
        price = view.price
    return month_units(session, provider, now).in_unit(price.unit)


class TierPosition(BaseModel):
    """Where a provider stands on its price's volume tiers this month."""

    model_config = ConfigDict(frozen=True)

    provider: str
    unit: str
    units_month_to_date: Decimal
    current_usd_per_unit: Decimal
    next_tier_from_units: Decimal | None
    """The threshold of the next cheaper band; None when the price has no further tier."""
    next_tier_usd_per_unit: Decimal | None
    units_to_next_tier: Decimal | None


def tier_position(price: ProviderPrice, units_month_to_date: Decimal) -> TierPosition | None:
    """The band in effect after `units_month_to_date` and the next one; None for a price without tiers (or a
    keyed/free price, which cannot have them)."""
    if not price.tiers or price.usd_per_unit is None:
        return None
    current = price.usd_per_unit
    upcoming = None
    for tier in price.tiers:
        if Fraction(units_month_to_date) >= Fraction(tier.from_units):
            current = tier.usd_per_unit
        elif upcoming is None:
            upcoming = tier
    return TierPosition(
        provider=price.provider,
        unit=price.unit.value,
        units_month_to_date=units_month_to_date,
        current_usd_per_unit=current,
        next_tier_from_units=None if upcoming is None else upcoming.from_units,
        next_tier_usd_per_unit=None if upcoming is None else upcoming.usd_per_unit,
        units_to_next_tier=None if upcoming is None else upcoming.from_units - units_month_to_date,
    )
