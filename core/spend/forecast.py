"""Budget forecasts: the projected spend at the end of each budget's period, and when it would run out.

Method (one rule for daily and monthly budgets):

    committed  = the budget's spent + reserved in the current period (core.generation.budgets.current_figures:
                 exact, and right after a reset, which opens a fresh period)
    daily rate = the budget's scope's actual spend over the last RATE_WINDOW_DAYS complete UTC days before today,
                 from the rollups, divided by the number of those days
    projected  = committed + daily rate x time left in the period (in days, to the second)
    runs out   = now + (limit - committed) / daily rate, when that falls inside the period; now when the limit is
                 already reached; None otherwise (a zero rate, or the limit is not reached before the period ends)

Why: the rollups are daily, so a day is the finest rate they give; seven complete days hold one of every weekday
(a weekend lull or a Monday batch does not skew it), react to a change within a week, and leave today's partial
day out (it would always read low in the morning). A younger installation divides by the days it has existed (the
first rollup day), so a two-day history is not averaged over seven. The rate uses actual costs only; attempts
whose billing is still unknown are in `committed` through their held estimate, not in the rate.

Scopes: a global budget's rate is all spend, a provider budget's that provider's, a user budget's that user's; in
the budget's spend mode only (live by default; simulated budgets get simulated rates). Money is integer micro-USD,
computed exactly and rounded half up once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.generation.budgets import BudgetView, current_figures, get_budget, list_budgets
from core.generation.periods import as_utc
from core.money import round_half_up_micros
from db.models import BudgetScope, SpendMode, UsageDailyRollup, utcnow

__all__ = ["RATE_WINDOW_DAYS", "BudgetForecast", "daily_rate", "forecast_budget", "forecast_budgets"]

RATE_WINDOW_DAYS = 7
_DAY_S = 86_400


class BudgetForecast(BaseModel):
    """One budget's forecast for its current period in one spend mode."""

    model_config = ConfigDict(frozen=True)

    budget_id: int
    budget_name: str
    scope: str
    scope_id: str | None
    period: str
    mode: str
    period_start: datetime
    period_end: datetime
    limit_micro_usd: int
    committed_micro_usd: int
    """Spent + reserved in the current period."""
    daily_rate_micro_usd: int
    """Actual spend per day over the rate window, rounded half up."""
    rate_days: int
    """The complete days the rate is taken from (RATE_WINDOW_DAYS, fewer on a young installation, 0 = no history)."""
    projected_micro_usd: int
    """committed + rate x time left in the period."""
    projected_over_limit: bool
    runs_out_at: datetime | None
    """When committed spend would reach the limit at this rate; None when it will not within the period."""
    method: str


def _scope_conditions(budget: BudgetView, mode: SpendMode) -> list[Any]:
    rollup = UsageDailyRollup
    conditions: list[Any] = [rollup.mode == "live" if mode is SpendMode.LIVE else rollup.mode != "live"]
    if budget.scope is BudgetScope.PROVIDER:
        conditions.append(rollup.provider == budget.scope_id)
    elif budget.scope is BudgetScope.USER:
        conditions.append(rollup.user_id == int(budget.scope_id or 0))
    return conditions


def daily_rate(session: Session, budget: BudgetView, now: datetime, mode: SpendMode) -> tuple[Fraction, int]:
    """(exact micro-USD per day, days counted) over the complete UTC days before `now`'s day."""
    today = as_utc(now).date()
    window_start = today - timedelta(days=RATE_WINDOW_DAYS)
    first_day = session.scalar(select(func.min(UsageDailyRollup.day)))
    if first_day is None or first_day >= today:
        return Fraction(0), 0
    start = max(window_start, first_day)
    days = (today - start).days
    rollup = UsageDailyRollup
    total = session.scalar(
        select(func.coalesce(func.sum(rollup.actual_micro_usd), 0)).where(
            rollup.day >= start, rollup.day < today, *_scope_conditions(budget, mode)
        )
    )
    return Fraction(int(total or 0), days), days


def _spend_mode(mode: SpendMode | str) -> SpendMode:
    try:
        return SpendMode(mode)
    except ValueError:
        raise InvalidInput(
            f"the spend mode is live or simulated, not {mode!r}", {"mode": "live or simulated"}
        ) from None


def forecast_budget(
    session: Session, budget_id: int, *, now: datetime | None = None, mode: SpendMode | str = SpendMode.LIVE
) -> BudgetForecast:
    """The forecast the Budgets page shows beside a budget (see the module docstring for the method)."""
    moment = as_utc(now or utcnow())
    spend_mode = _spend_mode(mode)
    budget = get_budget(session, budget_id)
    figures = current_figures(session, budget_id, spend_mode, now=moment)
    committed = figures.spent_micro_usd + figures.reserved_micro_usd
    rate, days = daily_rate(session, budget, moment, spend_mode)
    left_days = Fraction(max(0, int((figures.period_end - moment).total_seconds())), _DAY_S)
    projected = round_half_up_micros(Fraction(committed) / 1_000_000 + rate * left_days / 1_000_000)

    limit = figures.limit_micro_usd
    runs_out: datetime | None = None
    if committed >= limit:
        runs_out = moment
    elif rate > 0:
        seconds = (Fraction(limit - committed) / rate) * _DAY_S
        at = moment + timedelta(seconds=float(seconds))  # a time of day, not money: float is fine here
        runs_out = at if at < figures.period_end else None
    return BudgetForecast(
        budget_id=budget.id,
        budget_name=budget.name,
        scope=budget.scope.value,
        scope_id=budget.scope_id,
        period=budget.period.value,
        mode=spend_mode.value,
        period_start=figures.period_start,
        period_end=figures.period_end,
        limit_micro_usd=limit,
        committed_micro_usd=committed,
        daily_rate_micro_usd=round_half_up_micros(rate / 1_000_000),
        rate_days=days,
        projected_micro_usd=projected,
        projected_over_limit=projected > limit,
        runs_out_at=runs_out,
        method=(
            f"spent + reserved so far, plus the average daily spend of the last {days} complete day(s) "
            f"x {float(left_days):.2f} day(s) left in the period"
        ),
    )


def forecast_budgets(
    session: Session, *, now: datetime | None = None, mode: SpendMode | str = SpendMode.LIVE
) -> list[BudgetForecast]:
    """A forecast for every active budget, in id order."""
    moment = as_utc(now or utcnow())
    _spend_mode(mode)
    return [forecast_budget(session, b.id, now=moment, mode=mode) for b in list_budgets(session) if b.active]
