"""The Budgets page's reads and its form input, testable without Streamlit.

Reads (ADMIN and HERO, authorized here from the database: core.generation.budgets' readers do not authorize):
every budget with this period's figures in one spend mode, its forecast and its alert thresholds; a budget's
period history. Changes go straight to the owners' services (core.generation.budgets, core.spend.alerts,
core.spend.webhooks), which authorize each one themselves.

`limit_from_text` and `thresholds_from_text` turn what a person typed into the services' values, with
InvalidInput naming the field, so the page shows the message under it and keeps the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.authz import authorize
from core.generation.budgets import (
    BUDGET_EDITORS,
    BudgetView,
    PeriodFigures,
    current_figures,
    get_budget,
    list_budgets,
    period_history,
)
from core.money import MAX_LIMIT_USD, exact_decimal, usd_to_micros
from core.security import Actor
from core.spend.alerts import thresholds
from core.spend.forecast import BudgetForecast, forecast_budget
from db.models import SpendMode

__all__ = [
    "BudgetLine",
    "budget_history",
    "limit_from_text",
    "load_budgets",
    "thresholds_from_text",
]


@dataclass(frozen=True)
class BudgetLine:
    """One budget as the page shows it, in one spend mode."""

    budget: BudgetView
    figures: PeriodFigures
    forecast: BudgetForecast | None
    """None for an inactive budget (it applies to nothing, so nothing is projected)."""
    thresholds: tuple[int, ...]
    default_thresholds: bool


def _reader(session: Session, actor: Actor, action: str) -> None:
    authorize(session, actor, *BUDGET_EDITORS, action=action, lock=False)


def load_budgets(session: Session, actor: Actor, mode: SpendMode | str = SpendMode.LIVE) -> list[BudgetLine]:
    """Every budget that is not deleted, in id order, with its figures, forecast and thresholds in `mode`."""
    _reader(session, actor, "read budgets")
    spend_mode = SpendMode(mode)
    lines = []
    for budget in list_budgets(session):
        levels, default = thresholds(session, budget.id)
        lines.append(
            BudgetLine(
                budget=budget,
                figures=current_figures(session, budget.id, spend_mode),
                forecast=forecast_budget(session, budget.id, mode=spend_mode) if budget.active else None,
                thresholds=levels,
                default_thresholds=default,
            )
        )
    return lines


def budget_history(
    session: Session, actor: Actor, budget_id: int, mode: SpendMode | str | None = None
) -> tuple[BudgetView, list[PeriodFigures]]:
    """A budget (deleted ones too) and its periods, newest first: past periods and those closed by a reset."""
    _reader(session, actor, "read budget history")
    return get_budget(session, budget_id), period_history(session, budget_id, mode=mode)


def limit_from_text(text: str) -> int:
    """A limit typed in dollars ("25", "0.50") as micro-USD; InvalidInput on the `limit_micro_usd` field."""
    try:
        amount = exact_decimal(text.strip(), what="the limit", maximum=MAX_LIMIT_USD, above_minimum=True)
        return usd_to_micros(amount)
    except ValueError as exc:
        msg = f"{exc} (dollars, e.g. 25 or 0.50)"
        raise InvalidInput(msg, {"limit_micro_usd": msg}) from None


def thresholds_from_text(text: str) -> list[int]:
    """Thresholds typed as percentages ("50, 80, 100"; empty = no threshold alerts); InvalidInput on the
    `thresholds` field. Their range and count are core.spend.alerts' to check."""
    values = []
    for part in text.replace(";", ",").split(","):
        cleaned = part.strip().rstrip("%").strip()
        if not cleaned:
            continue
        if not cleaned.isdigit():
            msg = f"a threshold is a whole percentage such as 80, not {part.strip()!r}"
            raise InvalidInput(msg, {"thresholds": msg})
        values.append(int(cleaned))
    return values
