"""Budget forecasts on a seeded history with known answers (worked out by hand below), on both databases."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.generation.budgets import create_budget
from core.generation.periods import period_bounds
from core.security import Actor
from core.spend.forecast import forecast_budget, forecast_budgets
from db.engine import transaction
from db.models import BudgetPeriod, BudgetPeriodKind, SpendMode
from tests.core.spend.rollup_seed import add_rollup, add_user

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # 10.5 days before the month ends (Dec 1, 00:00 UTC)
USD = 1_000_000
SYSTEM = Actor.system("test")


def _period(session: Session, budget_id: int, kind: BudgetPeriodKind, spent: int, reserved: int = 0,
            mode: SpendMode = SpendMode.LIVE) -> None:  # fmt: skip
    start, end = period_bounds(kind, NOW)
    session.add(BudgetPeriod(budget_id=budget_id, mode=mode, period_start=start, period_end=end,
                             spent_micro_usd=spent, reserved_micro_usd=reserved))  # fmt: skip
    session.flush()


def test_forecasts_with_known_answers(db_session_factory: sessionmaker[Session]) -> None:
    """History: Nov 13-19 (the 7 complete days before Nov 20), $1/day on fal-qwen by alice and $1/day on ideogram
    by bob: global rate $2/day, fal-qwen $1/day, alice $1/day. Left out of every rate: Nov 12's $50 (before the
    window), today's $5 (partial day), and $100 of sandbox spend on Nov 15 (simulated: its own rate)."""
    factory = db_session_factory
    with transaction(factory) as s:
        alice, bob = add_user(s, "alice"), add_user(s, "bob")
        for offset in range(7):
            day = date(2026, 11, 13) + timedelta(days=offset)
            add_rollup(s, day, "fal-qwen", user_id=alice, images=1, actual_micro_usd=1 * USD)
            add_rollup(s, day, "ideogram", user_id=bob, images=1, actual_micro_usd=1 * USD)
        add_rollup(s, date(2026, 11, 12), "fal-qwen", user_id=alice, actual_micro_usd=50 * USD)
        add_rollup(s, date(2026, 11, 20), "fal-qwen", user_id=alice, actual_micro_usd=5 * USD)
        add_rollup(s, date(2026, 11, 15), "fal-qwen", mode="sandbox", actual_micro_usd=100 * USD)

        def budget(name: str, scope: str, period: str, limit_usd: int, scope_id: str | int | None = None) -> int:
            return create_budget(s, SYSTEM, name=name, scope=scope, period=period, limit_micro_usd=limit_usd * USD,
                                 scope_id=scope_id).id  # fmt: skip

        a = budget("global 100", "global", "monthly", 100)
        b = budget("global 70", "global", "monthly", 70)
        c = budget("fal 20", "provider", "monthly", 20, "fal-qwen")
        d = budget("alice 10", "user", "monthly", 10, alice)
        e = budget("global daily 3", "global", "daily", 3)
        f = budget("untouched", "global", "monthly", 200)
        _period(s, a, BudgetPeriodKind.MONTHLY, 60 * USD)
        _period(s, b, BudgetPeriodKind.MONTHLY, 60 * USD)
        _period(s, c, BudgetPeriodKind.MONTHLY, 15 * USD, reserved=1 * USD)
        _period(s, d, BudgetPeriodKind.MONTHLY, 12 * USD)
        _period(s, e, BudgetPeriodKind.DAILY, 2_500_000)

    with factory() as s:
        fa, fb, fc, fd, fe = (forecast_budget(s, i, now=NOW) for i in (a, b, c, d, e))
        ff = forecast_budget(s, f, now=NOW, mode="simulated")
        everything = forecast_budgets(s, now=NOW)

    # A: $60 + $2/day x 10.5 days = $81, under $100: never runs out this month.
    assert (fa.daily_rate_micro_usd, fa.rate_days) == (2 * USD, 7)
    assert fa.projected_micro_usd == 81 * USD and not fa.projected_over_limit and fa.runs_out_at is None
    # B: the same $81 projected over a $70 limit; ($70 - $60) / $2 = 5 days -> Nov 25, 12:00.
    assert fb.projected_micro_usd == 81 * USD and fb.projected_over_limit
    assert fb.runs_out_at == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    # C: fal-qwen only: $15 spent + $1 reserved = $16, + $1/day x 10.5 = $26.50; ($20 - $16) / $1 = 4 days.
    assert (fc.committed_micro_usd, fc.daily_rate_micro_usd) == (16 * USD, 1 * USD)
    assert fc.projected_micro_usd == 26_500_000 and fc.runs_out_at == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    # D: alice already spent $12 of $10: ran out now; projected $12 + $10.50 = $22.50.
    assert fd.runs_out_at == NOW and fd.projected_micro_usd == 22_500_000
    # E: a daily budget: $2.50 by noon, half a day left at $2/day -> $3.50 over $3; $0.50 / $2 = 6 h -> 18:00.
    assert fe.projected_micro_usd == 3_500_000 and fe.projected_over_limit
    assert fe.runs_out_at == datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
    # F, simulated: the sandbox's $100 over 7 days = $14.285714.../day (-> 14,285,714); nothing spent yet;
    # $100/7 x 10.5 = exactly $150 (the exact rate, not the rounded one); never reaches $200 this month.
    assert ff.daily_rate_micro_usd == 14_285_714 and ff.committed_micro_usd == 0
    assert ff.projected_micro_usd == 150 * USD and ff.runs_out_at is None
    assert [x.budget_id for x in everything] == [a, b, c, d, e, f]


def test_a_young_installation_divides_by_the_days_it_has(db_session_factory: sessionmaker[Session]) -> None:
    with transaction(db_session_factory) as s:
        add_rollup(s, date(2026, 11, 18), "fal-qwen", actual_micro_usd=3 * USD)
        add_rollup(s, date(2026, 11, 19), "fal-qwen", actual_micro_usd=1 * USD)
        budget_id = create_budget(s, SYSTEM, name="g", scope="global", period="monthly", limit_micro_usd=50 * USD).id
    with db_session_factory() as s:
        forecast = forecast_budget(s, budget_id, now=NOW)
    # Two days of history: ($3 + $1) / 2 = $2/day, not $4/7; projected 0 + $2 x 10.5 = $21.
    assert (forecast.rate_days, forecast.daily_rate_micro_usd) == (2, 2 * USD)
    assert forecast.projected_micro_usd == 21 * USD and forecast.runs_out_at is None


@pytest.mark.parametrize("history", [False, True])
def test_no_history_projects_what_is_committed(db_session_factory: sessionmaker[Session], history: bool) -> None:
    with transaction(db_session_factory) as s:
        if history:  # today only: no complete day yet
            add_rollup(s, NOW.date(), "fal-qwen", actual_micro_usd=9 * USD)
        budget_id = create_budget(s, SYSTEM, name="g", scope="global", period="monthly", limit_micro_usd=50 * USD).id
        _period(s, budget_id, BudgetPeriodKind.MONTHLY, 9 * USD)
    with db_session_factory() as s:
        forecast = forecast_budget(s, budget_id, now=NOW)
    assert forecast.rate_days == 0 and forecast.daily_rate_micro_usd == 0
    assert forecast.projected_micro_usd == 9 * USD and forecast.runs_out_at is None


def test_a_wrong_mode_is_invalid_input(db_session_factory: sessionmaker[Session]) -> None:
    from common.errors import InvalidInput

    with db_session_factory() as s, pytest.raises(InvalidInput):
        forecast_budgets(s, now=NOW, mode="both")
