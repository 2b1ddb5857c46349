"""The Usage page's data, read in one call (`load_usage`) and testable without Streamlit.

Who sees what is decided here, from the database: ADMIN and HERO see everyone's usage and may filter by user; a
USER sees only their own (their filters are pinned to their account, and asking for someone else's is refused).

Every figure comes from `usage_daily_rollups` (never a scan of usage_attempts), in ONE spend mode at a time: live
or simulated (emulator and sandbox), never added together. One statement reads the rollups at the grain the page
needs (day x provider x error class) and the figures are folded from it; top users are a second statement (staff
only). The row models are core.spend.reports' (cost per image against the target, success rate, p50/p95 from the
rollups' latency histograms), the forecast is core.spend.forecast's, the recommendations core.spend.optimizer's.

`recent_attempts` is the row-level view under the charts: the same keyset pages as core.usage_log (its row
model), but for every role (a USER's pinned to their own) and by spend mode (simulated = emulator + sandbox).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput, PermissionDenied
from core.authz import AuthorizedActor, authorize
from core.catalog import PROVIDERS
from core.generation.budgets import list_budgets
from core.security import Actor, Role
from core.spend.forecast import BudgetForecast, forecast_budget
from core.spend.optimizer import OptimizerReport, recommend
from core.spend.reports import (  # reports' one accumulator and SpendRow builder, so the figures agree
    MAX_REPORT_DAYS,
    NO_USER_LABEL,
    ErrorClassRow,
    SpendAccumulator,
    SpendRow,
    cost_per_image_micros,
    rollup_sums,
    spend_row,
    target_cost_per_image_micros,
    usd,
)
from core.usage_log import MAX_PAGE, STATUSES, AttemptRow, AttemptsPage
from db.models import BudgetScope, UsageAttempt, UsageDailyRollup, User

__all__ = [
    "DaySpend",
    "UsageFilters",
    "UsageView",
    "load_usage",
    "recent_attempts",
    "usage_csv",
    "user_choices",
]

SpendModeName = Literal["live", "simulated"]
SIMULATED_MODES = ("emulator", "sandbox")
TOP_USERS = 10
READERS = (Role.ADMIN, Role.HERO, Role.USER)


class UsageFilters(BaseModel):
    """What the page asks for. Dates are UTC days, both inclusive."""

    model_config = ConfigDict(frozen=True)

    date_from: date
    date_to: date
    spend_mode: SpendModeName = "live"
    provider: str | None = None
    user_id: int | None = None
    """0 = work done without a signed-in user (CLI, system)."""


class DaySpend(BaseModel):
    model_config = ConfigDict(frozen=True)

    day: date
    provider: str
    attempts: int
    images: int
    actual_micro_usd: int


class UsageView(BaseModel):
    """Everything the Usage page shows, in the filters' one spend mode."""

    model_config = ConfigDict(frozen=True)

    filters: UsageFilters
    """As applied: a USER's user_id is always their own."""
    staff: bool
    target_cost_per_image_micro_usd: int
    total: SpendRow
    days: list[DaySpend]
    """Spend per day and provider (only the pairs with attempts), by day then provider."""
    providers: list[SpendRow]
    """Per provider: spend, images, cost per image against the target, success rate, latency p50/p95."""
    error_classes: list[ErrorClassRow]
    top_users: list[SpendRow]
    """Staff only (empty for a USER): the users with the largest spend, largest first."""
    forecasts: list[BudgetForecast]
    """Active budgets' forecasts in this spend mode: every budget for staff, a USER's own budgets for a USER."""
    optimizer: OptimizerReport | None
    """Staff only: the optimizer's recommendations (last 30 complete days, this spend mode)."""


# --- reading ----------------------------------------------------------------------------------------------------


def _reader(session: Session, actor: Actor) -> AuthorizedActor:
    return authorize(session, actor, *READERS, action="read usage", lock=False)


def _is_staff(who: AuthorizedActor) -> bool:
    return who.is_system or who.role in (Role.ADMIN, Role.HERO)


def _applied(who: AuthorizedActor, filters: UsageFilters) -> UsageFilters:
    """The filters after the checks: a USER's pinned to their own account."""
    errors: dict[str, str] = {}
    if filters.date_to < filters.date_from:
        errors["date_to"] = "before the start date"
    elif (filters.date_to - filters.date_from).days + 1 > MAX_REPORT_DAYS:
        errors["date_to"] = f"at most {MAX_REPORT_DAYS} days"
    if filters.provider is not None and filters.provider not in PROVIDERS:
        errors["provider"] = f"one of {', '.join(PROVIDERS)}"
    if errors:
        said = "; ".join(f"{name}: {problem}" for name, problem in errors.items())
        raise InvalidInput(f"the usage filter is not valid: {said}", errors)
    if _is_staff(who):
        return filters
    if filters.user_id is not None and filters.user_id != who.user_id:
        raise PermissionDenied(f"{who.username} may not read another account's usage")
    return filters.model_copy(update={"user_id": who.user_id})


def _conditions(filters: UsageFilters) -> list[Any]:
    rollup = UsageDailyRollup
    conditions: list[Any] = [rollup.day >= filters.date_from, rollup.day <= filters.date_to]
    conditions.append(rollup.mode == "live" if filters.spend_mode == "live" else rollup.mode != "live")
    if filters.provider is not None:
        conditions.append(rollup.provider == filters.provider)
    if filters.user_id is not None:
        conditions.append(rollup.user_id == filters.user_id)
    return conditions


def _top_users(session: Session, filters: UsageFilters, target: int, names: dict[int, str]) -> list[SpendRow]:
    rollup = UsageDailyRollup
    spent = func.sum(rollup.actual_micro_usd)
    statement = (
        select(rollup.user_id, *rollup_sums())
        .where(*_conditions(filters))
        .group_by(rollup.user_id)
        .order_by(spent.desc(), rollup.user_id)
        .limit(TOP_USERS)
    )
    rows = []
    for user_id, *values in session.execute(statement).all():
        uid = int(user_id or 0)
        label = NO_USER_LABEL if uid == 0 else names.get(uid, f"user {uid}")
        rows.append(spend_row(filters.spend_mode, str(uid), label, SpendAccumulator.from_sums(values), target))
    return rows


def user_choices(session: Session, actor: Actor) -> dict[int, str]:
    """The accounts the user filter offers: every account for staff, none for a USER (pinned to their own)."""
    who = _reader(session, actor)
    if not _is_staff(who):
        return {}
    return {
        int(uid): str(name) for uid, name in session.execute(select(User.id, User.username).order_by(User.username))
    }


def _forecasts(session: Session, who: AuthorizedActor, spend_mode: str) -> list[BudgetForecast]:
    mine = [
        b
        for b in list_budgets(session)
        if b.active and (_is_staff(who) or (b.scope is BudgetScope.USER and b.scope_id == str(who.user_id)))
    ]
    return [forecast_budget(session, b.id, mode=spend_mode) for b in mine]


def load_usage(
    session: Session, actor: Actor, filters: UsageFilters, *, with_recommendations: bool = True
) -> UsageView:
    """The Usage page's figures for `filters` as `actor` may see them (see the module docstring)."""
    who = _reader(session, actor)
    applied = _applied(who, filters)
    staff = _is_staff(who)
    target = target_cost_per_image_micros(session)
    rollup = UsageDailyRollup
    statement = (
        select(rollup.day, rollup.provider, rollup.error_class, *rollup_sums())
        .where(*_conditions(applied))
        .group_by(rollup.day, rollup.provider, rollup.error_class)
    )
    total = SpendAccumulator()
    per_day: dict[tuple[date, str], SpendAccumulator] = {}
    per_provider: dict[str, SpendAccumulator] = {}
    per_error: dict[tuple[str, str], int] = {}
    for day, provider, error_class, *values in session.execute(statement).all():
        group = SpendAccumulator.from_sums(values)
        total.add(group)
        per_day.setdefault((day, str(provider)), SpendAccumulator()).add(group)
        per_provider.setdefault(str(provider), SpendAccumulator()).add(group)
        if error_class:
            key = (str(provider), str(error_class))
            per_error[key] = per_error.get(key, 0) + group.attempts - group.succeeded
    mode = applied.spend_mode
    days = [
        DaySpend(day=day, provider=provider, attempts=acc.attempts, images=acc.images, actual_micro_usd=acc.actual)
        for (day, provider), acc in sorted(per_day.items())
    ]
    providers = [spend_row(mode, p, p, acc, target) for p, acc in sorted(per_provider.items())]
    failures = {p: acc.attempts - acc.succeeded for p, acc in per_provider.items()}
    errors = [
        ErrorClassRow(
            spend_mode=mode,
            provider=provider,
            error_class=error_class,
            attempts=count,
            share_of_failures=count / failures[provider] if failures.get(provider) else 0.0,
        )
        for (provider, error_class), count in sorted(per_error.items())
        if count
    ]
    names: dict[int, str] = {}
    top: list[SpendRow] = []
    if staff:
        names = {int(uid): str(name) for uid, name in session.execute(select(User.id, User.username))}
        top = _top_users(session, applied, target, names)
    return UsageView(
        filters=applied,
        staff=staff,
        target_cost_per_image_micro_usd=target,
        total=spend_row(mode, "total", "total", total, target),
        days=days,
        providers=providers,
        error_classes=errors,
        top_users=top,
        forecasts=_forecasts(session, who, mode),
        optimizer=recommend(session, spend_mode=mode) if staff and with_recommendations else None,
    )


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def recent_attempts(
    session: Session,
    actor: Actor,
    filters: UsageFilters,
    *,
    status: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> AttemptsPage:
    """One page of the attempts behind the figures, newest first (keyset by id: pass `next_before_id` on)."""
    who = _reader(session, actor)
    applied = _applied(who, filters)
    errors: dict[str, str] = {}
    if not 1 <= limit <= MAX_PAGE:
        errors["limit"] = f"between 1 and {MAX_PAGE}"
    if status is not None and status not in STATUSES:
        errors["status"] = f"one of {', '.join(STATUSES)}"
    if errors:
        said = "; ".join(f"{name}: {problem}" for name, problem in errors.items())
        raise InvalidInput(f"the usage filter is not valid: {said}", errors)
    attempt = UsageAttempt
    conditions: list[Any] = [
        attempt.started_at >= _day_start(applied.date_from),
        attempt.started_at < _day_start(applied.date_to + timedelta(days=1)),
        attempt.mode == "live" if applied.spend_mode == "live" else attempt.mode.in_(SIMULATED_MODES),
    ]
    if applied.provider is not None:
        conditions.append(attempt.provider == applied.provider)
    if applied.user_id is not None:
        conditions.append(attempt.user_id.is_(None) if applied.user_id == 0 else attempt.user_id == applied.user_id)
    if status is not None:
        conditions.append(attempt.status == status)
    if before_id is not None:
        conditions.append(attempt.id < before_id)
    rows = list(session.scalars(select(attempt).where(*conditions).order_by(attempt.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    page = rows[:limit]
    return AttemptsPage(
        attempts=[AttemptRow.model_validate(row, from_attributes=True) for row in page],
        next_before_id=page[-1].id if more and page else None,
    )


def usage_csv(view: UsageView) -> str:
    """The spend per day and provider, then per provider, as CSV (exact dollars, one spend mode, one header)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["spend_mode", "day", "provider", "attempts", "images", "actual_usd", "cost_per_image_usd"])
    mode = view.filters.spend_mode
    for d in view.days:
        per_image = cost_per_image_micros(d.actual_micro_usd, d.images)
        writer.writerow(
            [mode, d.day.isoformat(), d.provider, d.attempts, d.images, usd(d.actual_micro_usd), usd(per_image)]
        )
    for p in view.providers:
        writer.writerow(
            [mode, "all days", p.key, p.attempts, p.images, usd(p.actual_micro_usd), usd(p.cost_per_image_micro_usd)]
        )
    total = view.total
    writer.writerow(
        [
            mode,
            "all days",
            "total",
            total.attempts,
            total.images,
            usd(total.actual_micro_usd),
            usd(total.cost_per_image_micro_usd),
        ]
    )
    return out.getvalue()
