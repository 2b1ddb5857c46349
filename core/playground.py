"""What the Playground shows before anything is spent: where a request would run, what it would cost and how
much of each budget that applies to the person is left. Reads only.

The route is core.generation.routing's (the same plan the service makes, on the same settings snapshot and
breakers), the cost is that plan's first candidate's estimate, and the budgets are the ones the service would
reserve in (global, the provider's, the user's own), in the mode the provider runs in now (live or simulated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.generation import breaker
from core.generation.budgets import current_figures, list_budgets
from core.generation.context import read_request_context
from core.generation.models import GenerationRequest
from core.generation.routing import RoutePlan, RouteRequest, plan_route, snapshot_preparer
from core.generation.snapshot import load_snapshot
from core.money import format_usd
from core.overview import PREVIEW_PROMPT
from core.prompts import prompt_problem
from core.providers.base import ConnectionMode
from core.providers.registry import connection_for
from core.settings import ProviderSettings
from db.models import BudgetScope, SpendMode


@dataclass(frozen=True)
class BudgetLeft:
    """One budget that applies to the request, in the mode the request would spend in."""

    name: str
    scope: str
    period: str
    hard: bool
    mode: str
    limit_micro_usd: int
    spent_micro_usd: int
    reserved_micro_usd: int

    @property
    def left_micro_usd(self) -> int:
        return max(0, self.limit_micro_usd - self.spent_micro_usd - self.reserved_micro_usd)

    @property
    def used_share(self) -> float:
        """Spent and reserved as a share of the limit (0..1, for a progress bar)."""
        if self.limit_micro_usd <= 0:
            return 1.0
        return min(1.0, (self.spent_micro_usd + self.reserved_micro_usd) / self.limit_micro_usd)

    def describe(self) -> str:
        kind = "hard" if self.hard else "soft"
        return (
            f"{self.name} ({self.scope}, {self.period}, {kind}, {self.mode}): {format_usd(self.left_micro_usd)} left "
            f"of {format_usd(self.limit_micro_usd)}"
        )


@dataclass(frozen=True)
class Estimate:
    """The request as it would run now."""

    provider: str | None
    """The first provider of the route (where it would run); None when none can."""
    mode: str | None
    estimate_micro_usd: int | None
    breakdown: tuple[str, ...]
    route: tuple[str, ...]
    """The plan in words: each candidate and why, each provider left out and why."""
    field_errors: Mapping[str, str]
    error: str | None
    budgets: tuple[BudgetLeft, ...]

    @property
    def formatted(self) -> str:
        return "—" if self.estimate_micro_usd is None else format_usd(self.estimate_micro_usd)

    @property
    def simulated(self) -> bool:
        return self.mode is not None and self.mode != ConnectionMode.LIVE.value

    @property
    def left_micro_usd(self) -> int | None:
        """The least left in any hard budget that applies (None: no hard budget applies)."""
        hard = [b.left_micro_usd for b in self.budgets if b.hard]
        return min(hard) if hard else None

    @property
    def refused_by(self) -> BudgetLeft | None:
        """The first hard budget this estimate does not fit in (the service would refuse it there)."""
        if self.estimate_micro_usd is None:
            return None
        return next((b for b in self.budgets if b.hard and b.left_micro_usd < self.estimate_micro_usd), None)


def budgets_left(
    session: Session, provider: str, user_id: int | None, settings: ProviderSettings | None = None
) -> list[BudgetLeft]:
    """The active budgets a request to `provider` by `user_id` counts against, with what is left of each in the
    mode the provider runs in now. A provider's daily cost limit from its settings shows as its budget even
    before the first request makes its row."""
    mode = SpendMode.LIVE if connection_for(provider).mode is ConnectionMode.LIVE else SpendMode.SIMULATED
    out: list[BudgetLeft] = []
    budgets = list_budgets(session)
    daily_limit = settings.daily_cost_limit_micros if settings is not None else None
    if daily_limit is not None and not any(b.settings_provider == provider and b.active for b in budgets):
        # Its row is made by the first request (core.generation.budgets.sync_provider_daily_budget), empty.
        out.append(BudgetLeft(f"{provider} daily cost limit", "provider", "daily", True, mode.value, daily_limit, 0, 0))
    for budget in budgets:
        if not budget.active:
            continue
        applies = (
            budget.scope is BudgetScope.GLOBAL
            or (budget.scope is BudgetScope.PROVIDER and budget.scope_id == provider)
            or (budget.scope is BudgetScope.USER and user_id is not None and budget.scope_id == str(user_id))
        )
        if not applies:
            continue
        figures = current_figures(session, budget.id, mode)
        out.append(
            BudgetLeft(
                name=budget.name,
                scope=budget.scope.value if budget.scope is not BudgetScope.USER else "you",
                period=budget.period.value,
                hard=budget.hard,
                mode=mode.value,
                limit_micro_usd=figures.limit_micro_usd,
                spent_micro_usd=figures.spent_micro_usd,
                reserved_micro_usd=figures.reserved_micro_usd,
            )
        )
    return out


def estimate(session: Session, request: GenerationRequest, *, user_id: int | None) -> Estimate:
    """Where and at what cost the request would run now, and the budgets left, without running anything.

    An empty prompt is priced with a placeholder (the cost does not depend on the words), so the estimate shows
    from the first moment; a prompt with a problem (too long, control characters) is a field error."""
    errors: dict[str, str] = {}
    prompt = request.prompt
    problem = prompt_problem(prompt, field="prompt")
    if problem is not None and prompt.strip():
        errors["prompt"] = problem
    snapshot = load_snapshot(session)
    route = RouteRequest(
        prompt=prompt if problem is None else PREVIEW_PROMPT,
        negative_prompt=request.negative_prompt or None,
        preset=request.preset,
        overrides=dict(request.params),
        provider=request.provider,
        policy=request.policy,
        allow_fallback=request.allow_fallback,
    )
    try:
        context = read_request_context(session, snapshot, user_id)  # tiers and preferences, as generate() reads them
        preparer = snapshot_preparer(
            snapshot, units_this_month=context.units_this_month, user_preferences=context.preferences
        )
        plan: RoutePlan = plan_route(route, snapshot, prepare=preparer, breakers=breaker.snapshot(session))
    except InvalidInput as exc:
        return Estimate(None, None, None, (), (), {**errors, **exc.field_errors}, str(exc), ())
    refusal = plan.refusal()
    if refusal is not None or not plan.candidates:
        field_errors = dict(refusal.field_errors) if refusal is not None else {}
        return Estimate(None, None, None, (), tuple(plan.describe()), {**field_errors, **errors}, str(refusal), ())
    first = plan.candidates[0]
    cost = first.prepared.estimate
    return Estimate(
        provider=first.provider,
        mode=connection_for(first.provider).mode.value,
        estimate_micro_usd=first.estimate_micro_usd,
        breakdown=tuple(cost.breakdown) if cost is not None else (),
        route=tuple(plan.describe()),
        field_errors=errors,
        error=None,
        budgets=tuple(budgets_left(session, first.provider, user_id, snapshot.routing_settings().get(first.provider))),
    )
