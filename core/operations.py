"""What operators watch, read in one pass from the database: spend today and this month per provider and mode
(from the rollups), each breaker's state, each budget's use, and the job queue. The REST API's /metrics renders
it for Prometheus; because it is read from the database, every replica reports the same shared figures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.authz import authorize
from core.generation import breaker, budgets, usage
from core.security import Actor, Role
from db.models import CircuitState, GenerationJob, SpendMode

__all__ = ["BudgetUse", "OperationsSnapshot", "SpendFigure", "operations_snapshot"]

BREAKER_LEVEL = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


@dataclass(frozen=True)
class SpendFigure:
    provider: str
    mode: str
    """live | simulated: never added together."""
    period: str
    """day | month (UTC, calendar-aligned)."""
    actual_micro_usd: int
    images: int
    attempts: int


@dataclass(frozen=True)
class BudgetUse:
    budget_id: int
    name: str
    mode: str
    limit_micro_usd: int
    spent_micro_usd: int
    reserved_micro_usd: int


@dataclass(frozen=True)
class OperationsSnapshot:
    spend: tuple[SpendFigure, ...]
    breakers: dict[str, int]
    """Provider -> 0 closed, 1 half-open, 2 open."""
    budgets: tuple[BudgetUse, ...]
    jobs: dict[str, int]
    """Generation jobs by status (queued, running, succeeded, failed)."""


def operations_snapshot(session: Session, actor: Actor, now: datetime | None = None) -> OperationsSnapshot:
    """Staff only (ADMIN, HERO): spend and budget names are theirs to see."""
    authorize(session, actor, Role.ADMIN, Role.HERO, action="read operational metrics", lock=False)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    today = moment.date()
    spend: list[SpendFigure] = []
    for period, first in (("day", today), ("month", today.replace(day=1))):
        for row in usage.usage_summary(session, date_from=first, date_to=today, by=("provider",)):
            spend.append(
                SpendFigure(
                    str(row.group["provider"]), row.spend_mode, period, row.actual_micro_usd, row.images, row.attempts
                )
            )
    states = {p: BREAKER_LEVEL[s.state] for p, s in breaker.snapshot(session, moment).items()}
    uses = []
    for budget in budgets.list_budgets(session):
        if not budget.active:
            continue
        for mode in (SpendMode.LIVE, SpendMode.SIMULATED):
            figures = budgets.current_figures(session, budget.id, mode, now=moment)
            uses.append(
                BudgetUse(
                    budget.id,
                    budget.name,
                    mode.value,
                    figures.limit_micro_usd,
                    figures.spent_micro_usd,
                    figures.reserved_micro_usd,
                )
            )
    jobs = dict.fromkeys(("queued", "running", "succeeded", "failed"), 0)
    for status, count in session.execute(select(GenerationJob.status, func.count()).group_by(GenerationJob.status)):
        jobs[status] = count
    return OperationsSnapshot(tuple(spend), states, tuple(uses), jobs)
