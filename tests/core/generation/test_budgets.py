"""Budgets on SQLite and PostgreSQL: periods, admission, settlement, resets, administration, the settings limit.

The races across processes are in test_budget_races.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Boolean, Integer, String, column, delete, func, insert, select, table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, BudgetExceeded, InvalidInput, NotFound, PermissionDenied
from core import settings_service
from core.generation import budgets
from core.generation.budgets import Admission, BudgetView, PeriodFigures, Reservation, SpendMode
from core.generation.periods import period_bounds
from core.security import Actor
from db import migrate
from db.engine import make_engine, session_factory, transaction
from db.models import (
    AuditLog,
    Budget,
    BudgetPeriod,
    BudgetPeriodKind,
    BudgetReservation,
    ReservationStatus,
    Role,
    User,
    UTCDateTime,
)
from tests.dbfixtures import create_pg_database, drop_pg_database

T0 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
Factory = sessionmaker[Session]


# --- fixtures and helpers -------------------------------------------------------------------------------------


def _user(factory: Factory, name: str, role: Role) -> Actor:
    with transaction(factory) as session:
        row = User(username=name, password_hash="not-a-real-hash", role=role)
        session.add(row)
        session.flush()
        return Actor(row.id, row.username, role)


@pytest.fixture
def admin(db_session_factory: Factory) -> Actor:
    return _user(db_session_factory, "admin", Role.ADMIN)


@pytest.fixture
def hero(db_session_factory: Factory) -> Actor:
    return _user(db_session_factory, "hero", Role.HERO)


@pytest.fixture
def user(db_session_factory: Factory) -> Actor:
    return _user(db_session_factory, "user", Role.USER)


def _create(factory: Factory, actor: Actor, **kwargs: Any) -> BudgetView:
    values: dict[str, Any] = {"name": "global daily", "scope": "global", "period": "daily", "limit_micro_usd": 1000}
    values.update(kwargs)
    with transaction(factory) as session:
        return budgets.create_budget(session, actor, **values)


def _reserve(
    factory: Factory,
    applied: list[BudgetView],
    amount: int,
    *,
    now: datetime = T0,
    mode: SpendMode = SpendMode.LIVE,
    expires_in: timedelta = HOUR,
) -> Admission:
    with transaction(factory) as session:
        return budgets.reserve(session, applied, amount, mode, None, expires_in, now=now)


def _figures(factory: Factory, budget: BudgetView, *, now: datetime = T0, mode: SpendMode = SpendMode.LIVE):
    with factory() as session:
        return budgets.current_figures(session, budget.id, mode, now=now)


def _spent_reserved(figures: PeriodFigures) -> tuple[int, int]:
    return figures.spent_micro_usd, figures.reserved_micro_usd


def _statuses(factory: Factory, reservation: Reservation) -> list[ReservationStatus]:
    ids = [h.reservation_id for h in reservation.holds]
    with factory() as session:
        rows = session.scalars(select(BudgetReservation).where(BudgetReservation.id.in_(ids)))
        return sorted(ReservationStatus(r.status) for r in rows)


def _audit(factory: Factory, action: str) -> list[AuditLog]:
    with factory() as session:
        return list(session.scalars(select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.id)))


# --- periods (pure) -------------------------------------------------------------------------------------------


def test_periods_are_utc_calendar_days_and_months() -> None:
    daily = BudgetPeriodKind.DAILY
    monthly = BudgetPeriodKind.MONTHLY
    assert period_bounds(daily, datetime(2026, 3, 14, 23, 59, 59, 999_999, tzinfo=UTC)) == (
        datetime(2026, 3, 14, tzinfo=UTC),
        datetime(2026, 3, 15, tzinfo=UTC),
    )
    assert period_bounds(daily, datetime(2026, 3, 15, tzinfo=UTC))[0] == datetime(2026, 3, 15, tzinfo=UTC)
    assert period_bounds(monthly, datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds(monthly, datetime(2028, 2, 29, 8, tzinfo=UTC)) == (
        datetime(2028, 2, 1, tzinfo=UTC),
        datetime(2028, 3, 1, tzinfo=UTC),
    )
    # 01:30 in UTC+2 is still the previous UTC day (and month).
    eastern = datetime(2026, 4, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert period_bounds(daily, eastern)[0] == datetime(2026, 3, 31, tzinfo=UTC)
    assert period_bounds(monthly, eastern)[0] == datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="naive"):
        period_bounds(daily, datetime(2026, 3, 14))


# --- periods in the database ----------------------------------------------------------------------------------


def test_a_new_day_starts_by_itself_at_utc_midnight(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin, limit_micro_usd=100)
    last_moment = datetime(2026, 3, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    _reserve(db_session_factory, [daily], 100, now=last_moment - HOUR)
    with pytest.raises(BudgetExceeded):
        _reserve(db_session_factory, [daily], 1, now=last_moment)
    midnight = datetime(2026, 4, 1, tzinfo=UTC)
    _reserve(db_session_factory, [daily], 100, now=midnight)
    assert _spent_reserved(_figures(db_session_factory, daily, now=last_moment)) == (0, 100)
    assert _spent_reserved(_figures(db_session_factory, daily, now=midnight)) == (0, 100)
    with db_session_factory() as session:
        history = budgets.period_history(session, daily.id)
    assert [(f.period_start, f.period_end) for f in history] == [
        (midnight, datetime(2026, 4, 2, tzinfo=UTC)),
        (datetime(2026, 3, 31, tzinfo=UTC), midnight),
    ]


def test_a_new_month_starts_by_itself_at_the_month_end(db_session_factory: Factory, admin: Actor) -> None:
    monthly = _create(db_session_factory, admin, name="monthly", period="monthly", limit_micro_usd=500)
    _reserve(db_session_factory, [monthly], 300, now=datetime(2026, 2, 1, tzinfo=UTC))
    _reserve(db_session_factory, [monthly], 200, now=datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC))
    with pytest.raises(BudgetExceeded):
        _reserve(db_session_factory, [monthly], 1, now=datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC))
    _reserve(db_session_factory, [monthly], 500, now=datetime(2026, 3, 1, tzinfo=UTC))
    february = _figures(db_session_factory, monthly, now=datetime(2026, 2, 15, tzinfo=UTC))
    march = _figures(db_session_factory, monthly, now=datetime(2026, 3, 31, 23, tzinfo=UTC))
    assert (february.period_start, february.reserved_micro_usd) == (datetime(2026, 2, 1, tzinfo=UTC), 500)
    assert (march.period_start, march.period_end) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert march.reserved_micro_usd == 500


def test_the_current_period_row_is_created_once(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    for _ in range(3):
        _reserve(db_session_factory, [daily], 10)
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(BudgetPeriod)) == 1


# --- admission ------------------------------------------------------------------------------------------------


def test_reserve_holds_the_estimate_in_every_budget_and_settle_replaces_it(
    db_session_factory: Factory, admin: Actor, user: Actor
) -> None:
    glob = _create(db_session_factory, admin, limit_micro_usd=10_000)
    mine = _create(
        db_session_factory,
        admin,
        name="user monthly",
        scope="user",
        scope_id=user.user_id,
        period="monthly",
        limit_micro_usd=5_000,
    )
    admission = _reserve(db_session_factory, [glob, mine], 1_200)
    assert admission.soft_exceeded == ()
    assert [h.budget_id for h in admission.reservation.holds] == [glob.id, mine.id]
    assert _spent_reserved(_figures(db_session_factory, glob)) == (0, 1_200)
    assert _spent_reserved(_figures(db_session_factory, mine)) == (0, 1_200)

    with transaction(db_session_factory) as session:
        outcome = budgets.settle(session, admission.reservation, 1_100, Billing.BILLED, now=T0)
    assert (outcome.closed, outcome.already_closed) == (2, 0)
    assert _spent_reserved(_figures(db_session_factory, glob)) == (1_100, 0)
    assert _spent_reserved(_figures(db_session_factory, mine)) == (1_100, 0)
    assert _statuses(db_session_factory, admission.reservation) == [ReservationStatus.SETTLED] * 2


def test_an_actual_cost_above_the_estimate_is_recorded_never_refused(db_session_factory: Factory, admin: Actor):
    daily = _create(db_session_factory, admin, limit_micro_usd=1_000)
    admission = _reserve(db_session_factory, [daily], 900)
    with transaction(db_session_factory) as session:
        budgets.settle(session, admission.reservation, 1_250, Billing.BILLED, now=T0)
    figures = _figures(db_session_factory, daily)
    assert _spent_reserved(figures) == (1_250, 0)
    assert (figures.left_micro_usd, figures.over_micro_usd) == (0, 250)
    with pytest.raises(BudgetExceeded):
        _reserve(db_session_factory, [daily], 0)


def test_a_hard_budget_refuses_naming_its_figures_and_nothing_stays_held(
    db_session_factory: Factory, admin: Actor, user: Actor
) -> None:
    glob = _create(db_session_factory, admin, name="everyone", limit_micro_usd=10_000)
    mine = _create(
        db_session_factory,
        admin,
        name="user cap",
        scope="user",
        scope_id=str(user.user_id),
        period="monthly",
        limit_micro_usd=1_000_000,
    )
    _reserve(db_session_factory, [mine], 0)  # the user budget's period row first: it is held first below
    _reserve(db_session_factory, [glob], 9_000)
    with transaction(db_session_factory) as session:
        admission = budgets.reserve(session, [glob], 500, "live", None, HOUR, now=T0)
        budgets.settle(session, admission.reservation, 400, Billing.BILLED, now=T0)
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(db_session_factory, [mine, glob], 700)
    error = refused.value
    assert (error.budget_id, error.budget_name, error.mode) == (glob.id, "everyone", "live")
    assert (error.limit_micro_usd, error.spent_micro_usd, error.reserved_micro_usd) == (10_000, 400, 9_000)
    assert (error.requested_micro_usd, error.left_micro_usd) == (700, 600)
    assert str(error) == (
        "budget 'everyone' (live) has $0.000600 left of $0.010000 (spent $0.000400, reserved $0.009000); "
        "this request needs $0.000700"
    )
    # The user budget (lower period id, held first) was given back; no reservation row was written.
    assert _spent_reserved(_figures(db_session_factory, mine)) == (0, 0)
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(BudgetReservation)) == 3
    _reserve(db_session_factory, [mine, glob], 600)  # exactly what is left fits


def test_the_callers_transaction_may_go_on_after_a_refusal(db_session_factory: Factory, admin: Actor) -> None:
    small = _create(db_session_factory, admin, name="small", limit_micro_usd=100)
    big = _create(db_session_factory, admin, name="big", limit_micro_usd=10_000)
    with transaction(db_session_factory) as session:
        with pytest.raises(BudgetExceeded):
            budgets.reserve(session, [big, small], 500, SpendMode.LIVE, None, HOUR, now=T0)
        budgets.reserve(session, [big], 500, SpendMode.LIVE, None, HOUR, now=T0)
    assert _figures(db_session_factory, big).reserved_micro_usd == 500
    assert _figures(db_session_factory, small).reserved_micro_usd == 0


def test_a_soft_budget_holds_anyway_and_says_it_is_exceeded(db_session_factory: Factory, admin: Actor) -> None:
    soft = _create(
        db_session_factory, admin, name="soft", limit_micro_usd=1_000, hard=False, degrade_action="cheaper_preset"
    )
    first = _reserve(db_session_factory, [soft], 800)
    assert first.soft_exceeded == ()
    second = _reserve(db_session_factory, [soft], 300)
    (exceeded,) = second.soft_exceeded
    assert (exceeded.budget_id, exceeded.mode, exceeded.reserved_micro_usd) == (soft.id, SpendMode.LIVE, 1_100)
    assert (exceeded.left_micro_usd, exceeded.over_micro_usd) == (0, 100)


def test_a_budget_named_twice_counts_once(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    admission = _reserve(db_session_factory, [daily, daily], 100)
    assert len(admission.reservation.holds) == 1
    assert _figures(db_session_factory, daily).reserved_micro_usd == 100


def test_bad_amounts_and_modes_are_refused(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    with transaction(db_session_factory) as session:
        for amount in (-1, True, 1.5):
            with pytest.raises(InvalidInput):
                budgets.reserve(session, [daily], amount, SpendMode.LIVE, None, HOUR, now=T0)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="mode must be one of live, simulated"):
            budgets.reserve(session, [daily], 1, "real", None, HOUR, now=T0)
        with pytest.raises(InvalidInput, match="expires_in"):
            budgets.reserve(session, [daily], 1, SpendMode.LIVE, None, timedelta(0), now=T0)


# --- live and simulated ---------------------------------------------------------------------------------------


def test_simulated_spend_is_counted_apart_from_live_spend(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin, limit_micro_usd=1_000)
    sim = _reserve(db_session_factory, [daily], 1_000, mode=SpendMode.SIMULATED)
    with transaction(db_session_factory) as session:
        budgets.settle(session, sim.reservation, 1_000, Billing.BILLED, now=T0)
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(db_session_factory, [daily], 1, mode=SpendMode.SIMULATED)
    assert refused.value.mode == "simulated"
    live = _reserve(db_session_factory, [daily], 1_000)  # the live period is untouched by the rehearsal
    assert live.reservation.mode is SpendMode.LIVE
    live_figures = _figures(db_session_factory, daily)
    sim_figures = _figures(db_session_factory, daily, mode=SpendMode.SIMULATED)
    assert (live_figures.mode, _spent_reserved(live_figures)) == (SpendMode.LIVE, (0, 1_000))
    assert (sim_figures.mode, _spent_reserved(sim_figures)) == (SpendMode.SIMULATED, (1_000, 0))
    with db_session_factory() as session:
        modes = session.execute(select(BudgetReservation.mode, BudgetReservation.amount_micro_usd)).all()
    assert sorted((SpendMode(m), a) for m, a in modes) == [(SpendMode.LIVE, 1_000), (SpendMode.SIMULATED, 1_000)]


# --- settlement paths -----------------------------------------------------------------------------------------


def test_release_gives_the_estimate_back_once(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    admission = _reserve(db_session_factory, [daily], 700)
    with transaction(db_session_factory) as session:
        assert budgets.release(session, admission.reservation).closed == 1
    with transaction(db_session_factory) as session:
        assert budgets.release(session, admission.reservation).already_closed == 1
        assert budgets.settle(session, admission.reservation, 700, Billing.BILLED).already_closed == 1
    assert _spent_reserved(_figures(db_session_factory, daily)) == (0, 0)
    assert _statuses(db_session_factory, admission.reservation) == [ReservationStatus.RELEASED]


def test_settling_twice_counts_once(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    admission = _reserve(db_session_factory, [daily], 300)
    for expected_closed in (1, 0, 0):
        with transaction(db_session_factory) as session:
            assert budgets.settle(session, admission.reservation, 250, Billing.BILLED).closed == expected_closed
    assert _spent_reserved(_figures(db_session_factory, daily)) == (250, 0)


def test_unknown_billing_holds_the_estimate_until_reconciled(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    billed = _reserve(db_session_factory, [daily], 200)
    not_billed = _reserve(db_session_factory, [daily], 300)
    with transaction(db_session_factory) as session:
        budgets.settle(session, billed.reservation, 150, Billing.UNKNOWN)
        budgets.settle(session, not_billed.reservation, 0, Billing.UNKNOWN)
    assert _spent_reserved(_figures(db_session_factory, daily)) == (0, 500)
    assert _statuses(db_session_factory, billed.reservation) == [ReservationStatus.HELD]
    # Held reservations are not expired by the sweep: they may have been billed.
    with transaction(db_session_factory) as session:
        assert budgets.expire_stale(session, T0 + 2 * HOUR) == 0
        with pytest.raises(InvalidInput, match="billing facts"):
            budgets.reconcile(session, billed.reservation, 150, Billing.UNKNOWN)
    with transaction(db_session_factory) as session:
        assert budgets.reconcile(session, billed.reservation, 180, Billing.BILLED).closed == 1
        assert budgets.reconcile(session, not_billed.reservation, 0, Billing.NOT_BILLED).closed == 1
    with transaction(db_session_factory) as session:
        assert budgets.reconcile(session, billed.reservation, 180, Billing.BILLED).already_closed == 1
    assert _spent_reserved(_figures(db_session_factory, daily)) == (180, 0)
    assert _statuses(db_session_factory, not_billed.reservation) == [ReservationStatus.RELEASED]


def test_stale_reservations_expire_once_and_a_late_charge_is_still_recorded(
    db_session_factory: Factory, admin: Actor
) -> None:
    daily = _create(db_session_factory, admin)
    crashed = _reserve(db_session_factory, [daily], 400, expires_in=timedelta(minutes=5))
    alive = _reserve(db_session_factory, [daily], 100, expires_in=HOUR)
    with transaction(db_session_factory) as session:
        assert budgets.expire_stale(session, T0 + timedelta(minutes=5)) == 0  # not past its expiry yet
    with transaction(db_session_factory) as session:
        assert budgets.expire_stale(session, T0 + timedelta(minutes=6)) == 1
    with transaction(db_session_factory) as session:
        assert budgets.expire_stale(session, T0 + timedelta(minutes=7)) == 0
    assert _spent_reserved(_figures(db_session_factory, daily)) == (0, 100)
    assert _statuses(db_session_factory, crashed.reservation) == [ReservationStatus.EXPIRED]
    # The crashed request had in fact been billed (found by recovery): the charge is recorded, once.
    with transaction(db_session_factory) as session:
        assert budgets.release(session, crashed.reservation).closed == 0
        assert budgets.reconcile(session, crashed.reservation, 390, Billing.BILLED).closed == 1
        assert budgets.settle(session, crashed.reservation, 390, Billing.BILLED).closed == 0
    assert _spent_reserved(_figures(db_session_factory, daily)) == (390, 100)
    assert alive.reservation.holds[0].reservation_id != crashed.reservation.holds[0].reservation_id


def test_a_reservation_is_found_again_by_its_generation(db_session_factory: Factory, admin: Actor) -> None:
    from db.models import Generation

    glob = _create(db_session_factory, admin, limit_micro_usd=5_000)
    monthly = _create(db_session_factory, admin, name="monthly", period="monthly", limit_micro_usd=5_000)
    with transaction(db_session_factory) as session:
        generation = Generation(prompt="a fox", routing_policy="priority", status="running")
        session.add(generation)
        session.flush()
        admission = budgets.reserve(session, [monthly, glob], 250, SpendMode.LIVE, generation.id, HOUR, now=T0)
    with db_session_factory() as session:
        found = budgets.reservation_for_generation(session, generation.id)
        assert budgets.reservation_for_generation(session, "no-such-generation") is None
    assert found is not None
    assert sorted(found.holds, key=lambda h: h.period_id) == sorted(
        admission.reservation.holds, key=lambda h: h.period_id
    )
    assert (found.amount_micro_usd, found.mode, found.generation_id) == (250, SpendMode.LIVE, generation.id)


# --- resets ---------------------------------------------------------------------------------------------------


def test_a_reset_closes_the_period_with_its_figures_and_starts_afresh(
    db_session_factory: Factory, admin: Actor, hero: Actor
) -> None:
    daily = _create(db_session_factory, admin, limit_micro_usd=1_000)
    done = _reserve(db_session_factory, [daily], 600)
    with transaction(db_session_factory) as session:
        budgets.settle(session, done.reservation, 600, Billing.BILLED)
    in_flight = _reserve(db_session_factory, [daily], 300)
    with pytest.raises(BudgetExceeded):
        _reserve(db_session_factory, [daily], 200)

    with transaction(db_session_factory) as session:
        closed = budgets.reset_period(session, hero, daily.id, now=T0 + HOUR, comment="new contract")
    assert (closed.spent_micro_usd, closed.reserved_micro_usd) == (600, 300)
    assert (closed.reset_at, closed.reset_by) == (T0 + HOUR, hero.user_id)
    assert _spent_reserved(_figures(db_session_factory, daily)) == (0, 0)
    _reserve(db_session_factory, [daily], 1_000, now=T0 + 2 * HOUR)

    # A request admitted before the reset settles into the closed row, as after a rollover.
    with transaction(db_session_factory) as session:
        budgets.settle(session, in_flight.reservation, 300, Billing.BILLED)
    with db_session_factory() as session:
        history = budgets.period_history(session, daily.id, mode=SpendMode.LIVE)
    assert [(f.reset_at is not None, f.spent_micro_usd, f.reserved_micro_usd) for f in history] == [
        (False, 0, 1_000),
        (True, 900, 0),
    ]
    (entry,) = _audit(db_session_factory, "budget.period_reset")
    assert (entry.actor_id, entry.target_id, entry.comment) == (hero.user_id, str(daily.id), "new contract")
    assert entry.before is not None and entry.before["spent_micro_usd"] == 600


def test_a_reset_needs_an_open_period_and_an_editor(db_session_factory: Factory, admin: Actor, user: Actor) -> None:
    daily = _create(db_session_factory, admin)
    with transaction(db_session_factory) as session, pytest.raises(NotFound, match="nothing live"):
        budgets.reset_period(session, admin, daily.id, now=T0)
    _reserve(db_session_factory, [daily], 10)
    with transaction(db_session_factory) as session, pytest.raises(NotFound, match="nothing simulated"):
        budgets.reset_period(session, admin, daily.id, SpendMode.SIMULATED, now=T0)
    with transaction(db_session_factory) as session, pytest.raises(PermissionDenied):
        budgets.reset_period(session, user, daily.id, now=T0)
    assert _figures(db_session_factory, daily).reserved_micro_usd == 10


# --- administration -------------------------------------------------------------------------------------------


def test_create_update_and_soft_delete_each_write_one_audit_row(
    db_session_factory: Factory, admin: Actor, hero: Actor
) -> None:
    daily = _create(db_session_factory, hero, name="  team daily ", limit_micro_usd=2_000_000)
    assert (daily.name, daily.hard, daily.degrade_action, daily.active) == ("team daily", True, None, True)
    with transaction(db_session_factory) as session:
        updated = budgets.update_budget(
            session, admin, daily.id, limit_micro_usd=3_000_000, hard=False, degrade_action="smaller_size"
        )
        unchanged = budgets.update_budget(session, admin, daily.id, limit_micro_usd=3_000_000)
    assert (updated.limit_micro_usd, updated.hard, updated.degrade_action) == (3_000_000, False, "smaller_size")
    assert unchanged == updated
    admission = _reserve(db_session_factory, [updated], 100)
    with transaction(db_session_factory) as session:
        deleted = budgets.delete_budget(session, hero, daily.id, comment="no longer needed")
    assert deleted.deleted_at is not None and not deleted.active

    created, changed, removed = (
        _audit(db_session_factory, a) for a in ("budget.created", "budget.updated", "budget.deleted")
    )
    assert len(created) == len(changed) == len(removed) == 1
    assert created[0].actor_id == hero.user_id and created[0].after is not None
    assert changed[0].before is not None and changed[0].after is not None
    assert (changed[0].before["limit_micro_usd"], changed[0].after["limit_micro_usd"]) == (2_000_000, 3_000_000)
    assert removed[0].comment == "no longer needed"

    # Soft delete: the budget row, its period and its reservation stay; it no longer applies; it still settles.
    with db_session_factory() as session:
        assert session.get(Budget, daily.id) is not None
        assert budgets.list_budgets(session) == []
        assert [b.id for b in budgets.list_budgets(session, include_deleted=True)] == [daily.id]
        assert budgets.applicable_budgets(session, "sandbox", None) == []
    with transaction(db_session_factory) as session:
        assert budgets.settle(session, admission.reservation, 90, Billing.BILLED).closed == 1
        with pytest.raises(NotFound, match="deleted"):
            budgets.update_budget(session, admin, daily.id, limit_micro_usd=1)
    assert _figures(db_session_factory, deleted).spent_micro_usd == 90


def test_a_user_may_not_change_budgets(db_session_factory: Factory, admin: Actor, user: Actor) -> None:
    daily = _create(db_session_factory, admin)
    with transaction(db_session_factory) as session:
        with pytest.raises(PermissionDenied):
            budgets.create_budget(session, user, name="mine", scope="global", period="daily", limit_micro_usd=1)
        with pytest.raises(PermissionDenied):
            budgets.update_budget(session, user, daily.id, limit_micro_usd=10**9)
        with pytest.raises(PermissionDenied):
            budgets.delete_budget(session, user, daily.id)
    with db_session_factory() as session:
        assert budgets.get_budget(session, daily.id).limit_micro_usd == 1000


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": " "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"scope": "team"}, "scope"),
        ({"period": "weekly"}, "period"),
        ({"limit_micro_usd": -1}, "limit_micro_usd"),
        ({"limit_micro_usd": 10_000_000 * 10**6 + 1}, "limit_micro_usd"),
        ({"scope_id": "sandbox"}, "scope_id"),
        ({"scope": "provider", "scope_id": "nope", "period": "monthly"}, "scope_id"),
        ({"scope": "user", "scope_id": "999999"}, "scope_id"),
        ({"scope": "provider", "scope_id": "sandbox", "period": "daily"}, "period"),
        ({"hard": False}, "degrade_action"),
        ({"hard": True, "degrade_action": "cheaper_preset"}, "degrade_action"),
    ],
)
def test_invalid_budgets_are_refused_field_by_field(
    db_session_factory: Factory, admin: Actor, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        _create(db_session_factory, admin, **changes)
    assert field in refused.value.field_errors
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Budget)) == 0


def test_applicable_budgets_are_global_the_providers_and_the_users(
    db_session_factory: Factory, admin: Actor, user: Actor
) -> None:
    glob = _create(db_session_factory, admin)
    fal = _create(db_session_factory, admin, name="fal", scope="provider", scope_id="fal-qwen", period="monthly")
    _create(db_session_factory, admin, name="ideogram", scope="provider", scope_id="ideogram", period="monthly")
    mine = _create(db_session_factory, admin, name="mine", scope="user", scope_id=user.user_id)
    _create(db_session_factory, admin, name="other", scope="user", scope_id=admin.user_id)
    off = _create(db_session_factory, admin, name="off")
    with transaction(db_session_factory) as session:
        budgets.update_budget(session, admin, off.id, active=False)
    with transaction(db_session_factory) as session:
        assert [b.id for b in budgets.applicable_budgets(session, "fal-qwen", user.user_id)] == [
            glob.id,
            fal.id,
            mine.id,
        ]
        assert [b.id for b in budgets.applicable_budgets(session, "sandbox", None)] == [glob.id]


# --- the provider's daily cost limit IS its daily budget -------------------------------------------------------


def _set_daily_limit(factory: Factory, actor: Actor, provider: str, limit: str | None) -> None:
    with transaction(factory) as session:
        settings_service.save_provider_settings(session, actor, provider, {"daily_cost_limit_usd": limit})


def test_the_settings_daily_cost_limit_is_the_providers_daily_budget(db_session_factory: Factory, admin: Actor) -> None:
    with transaction(db_session_factory) as session:
        assert budgets.applicable_budgets(session, "sandbox", None) == []
    _set_daily_limit(db_session_factory, admin, "sandbox", "0.001")
    with transaction(db_session_factory) as session:
        (limit,) = budgets.applicable_budgets(session, "sandbox", None)
    assert (limit.scope_id, limit.period, limit.limit_micro_usd, limit.hard) == ("sandbox", "daily", 1_000, True)
    assert limit.settings_provider == "sandbox"
    _reserve(db_session_factory, [limit], 1_000)
    with pytest.raises(BudgetExceeded, match="sandbox daily cost limit"):
        _reserve(db_session_factory, [limit], 1)

    # Raising the limit in the settings raises the budget: same row, same period, one audit entry.
    _set_daily_limit(db_session_factory, admin, "sandbox", "0.0015")
    for _ in range(2):
        with transaction(db_session_factory) as session:
            (raised,) = budgets.applicable_budgets(session, "sandbox", None)
    assert (raised.id, raised.limit_micro_usd) == (limit.id, 1_500)
    _reserve(db_session_factory, [raised], 500)
    assert len(_audit(db_session_factory, "budget.updated")) == 1

    # It is changed only in the settings.
    with transaction(db_session_factory) as session:
        with pytest.raises(InvalidInput, match="daily_cost_limit_usd"):
            budgets.update_budget(session, admin, limit.id, limit_micro_usd=10**9)
        with pytest.raises(InvalidInput, match="daily_cost_limit_usd"):
            budgets.delete_budget(session, admin, limit.id)

    # No limit in the settings: the budget stops applying; its history stays.
    _set_daily_limit(db_session_factory, admin, "sandbox", None)
    with transaction(db_session_factory) as session:
        assert budgets.applicable_budgets(session, "sandbox", None) == []
        assert budgets.get_budget(session, limit.id).active is False
        # Settings handed in by the caller (the service caches them) are used as they are.
        cached = settings_service.validate_settings("sandbox", {"daily_cost_limit_usd": "0.002"})
        (back,) = budgets.applicable_budgets(session, "sandbox", None, provider_settings=cached)
        with pytest.raises(ValueError, match="settings of sandbox"):
            budgets.applicable_budgets(session, "fal-qwen", None, provider_settings=cached)
    assert (back.id, back.limit_micro_usd, back.active) == (limit.id, 2_000, True)
    assert _spent_reserved(_figures(db_session_factory, back)) == (0, 1_500)


def test_a_reset_between_finding_the_period_and_holding_in_it_starts_the_reservation_over(
    db_session_factory: Factory, admin: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    daily = _create(db_session_factory, admin, limit_micro_usd=1_000)
    _reserve(db_session_factory, [daily], 900)
    find = budgets._open_period_id
    resets: list[PeriodFigures] = []

    def find_then_reset(session: Session, budget: BudgetView, mode: SpendMode, now: datetime) -> int:
        period_id = find(session, budget, mode, now)
        if not resets:  # an admin resets the period right after this request found it
            with transaction(db_session_factory) as other:
                resets.append(budgets.reset_period(other, admin, budget.id, mode, now=now))
        return period_id

    monkeypatch.setattr(budgets, "_open_period_id", find_then_reset)
    admission = _reserve(db_session_factory, [daily], 500)  # would not fit in the closed period
    (closed,) = resets
    (hold,) = admission.reservation.holds
    assert hold.period_id != closed.period_id
    assert _spent_reserved(_figures(db_session_factory, daily)) == (0, 500)
    with db_session_factory() as session:
        history = budgets.period_history(session, daily.id)
    assert [(f.period_id, f.reserved_micro_usd) for f in history if f.reset_at is not None] == [(closed.period_id, 900)]


# --- the ledger is never deleted by a cascade -----------------------------------------------------------------


def test_a_budget_with_a_ledger_cannot_be_hard_deleted(db_session_factory: Factory, admin: Actor) -> None:
    daily = _create(db_session_factory, admin)
    _reserve(db_session_factory, [daily], 10)
    with pytest.raises(IntegrityError), transaction(db_session_factory) as session:
        session.execute(delete(BudgetPeriod))
    with pytest.raises(IntegrityError), transaction(db_session_factory) as session:
        session.execute(delete(Budget))
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(BudgetReservation)) == 1


# --- migration 0004 on a database that already has budget rows -------------------------------------------------

_OLD_BUDGETS = table(
    "budgets",
    column("id", Integer),
    column("name", String),
    column("scope", String),
    column("period", String),
    column("limit_micro_usd", Integer),
    column("hard", Boolean),
    column("active", Boolean),
    column("created_at", UTCDateTime()),
    column("updated_at", UTCDateTime()),
)
_OLD_PERIODS = table(
    "budget_periods",
    column("id", Integer),
    column("budget_id", Integer),
    column("period_start", UTCDateTime()),
    column("period_end", UTCDateTime()),
    column("spent_micro_usd", Integer),
    column("reserved_micro_usd", Integer),
)
_OLD_RESERVATIONS = table(
    "budget_reservations",
    column("id", String),
    column("budget_period_id", Integer),
    column("amount_micro_usd", Integer),
    column("status", String),
    column("created_at", UTCDateTime()),
    column("expires_at", UTCDateTime()),
)


def _at_0003_with_a_ledger(url: str) -> None:
    migrate.upgrade(url, "0003")
    start, end = period_bounds(BudgetPeriodKind.DAILY, T0)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(_OLD_BUDGETS).values(
                    id=1,
                    name="old",
                    scope="global",
                    period="daily",
                    limit_micro_usd=100,
                    hard=True,
                    active=True,
                    created_at=T0,
                    updated_at=T0,
                )
            )
            conn.execute(
                insert(_OLD_PERIODS).values(
                    id=1, budget_id=1, period_start=start, period_end=end, spent_micro_usd=40, reserved_micro_usd=10
                )
            )
            conn.execute(
                insert(_OLD_RESERVATIONS).values(
                    id="r1",
                    budget_period_id=1,
                    amount_micro_usd=10,
                    status="reserved",
                    created_at=T0,
                    expires_at=T0 + HOUR,
                )
            )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_migration_0004_keeps_an_existing_ledger_as_live_postgresql(pg_admin_dsn: str) -> None:
    name, url = create_pg_database(pg_admin_dsn, prefix="imagegate_budgets_0004")
    try:
        _at_0003_with_a_ledger(url)
        migrate.upgrade(url)
        assert migrate.schema_diff(url) == []
        engine = make_engine(url)
        try:
            with session_factory(engine)() as session:
                figures = budgets.current_figures(session, 1, now=T0)
                reservation = session.get(BudgetReservation, "r1")
            assert (figures.mode, figures.spent_micro_usd, figures.reserved_micro_usd) == (SpendMode.LIVE, 40, 10)
            assert reservation is not None and reservation.mode == SpendMode.LIVE
        finally:
            engine.dispose()
    finally:
        drop_pg_database(pg_admin_dsn, name)


def test_migration_0004_refuses_to_rebuild_a_sqlite_ledger_it_could_lose(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _at_0003_with_a_ledger(url)
    with pytest.raises(RuntimeError, match="foreign keys"):
        migrate.upgrade(url)
    assert migrate.current_revision(url) == "0003"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(_OLD_RESERVATIONS)).scalar() == 1
    finally:
        engine.dispose()
