"""Budgets: spending limits that hold across any number of processes, reserved at admission, settled after.

The life of one request's money (ARCHITECTURE.md, steps "admit" and "settle"):

1. `applicable_budgets` finds the active budgets for a request: global, its provider's, its user's. A provider's
   `daily_cost_limit_usd` setting IS that provider's daily budget: the budget row with `settings_provider` set
   follows the setting (created, changed, switched off with it); admins change it only in the settings.
2. `reserve` holds the estimate against every applicable budget with one atomic statement per budget,
   `UPDATE budget_periods SET reserved = reserved + :a WHERE id = :p AND spent + reserved + :a <= :limit`,
   always in period-id order; every writer locks a period before the reservations in it, so two transactions
   never wait on each other in opposite orders and PostgreSQL has no deadlock to break. A hard budget without
   room raises `BudgetExceeded`, after giving back what this call had already reserved; a soft budget holds the
   amount anyway and is reported, so the caller can degrade.
3. `settle` replaces the estimate with the actual cost (`spent += actual, reserved -= estimate`, one statement
   per period); an actual above the estimate is recorded, never refused. Billing unknown holds the estimate
   (status `held`) until `reconcile`; `release` gives it back when nothing was billed; `expire_stale` gives back
   what a crashed process left past its expiry. Each status change is one guarded UPDATE
   (`... WHERE status = 'reserved'`), so however many processes try, each reservation counts exactly once.

Periods are calendar days and months in UTC (`periods.py`). The row for "now" is created on demand with an
INSERT that cannot race (a unique index on the open period + ON CONFLICT DO NOTHING, then a read), so a new
period starts by itself. Live money and the would-be cost of sandbox and emulator runs (`SpendMode.SIMULATED`)
are counted in separate period rows against the same limits, so budgets can be rehearsed offline and the two
never mix in one figure. An admin's `reset_period` closes the open row, its figures kept as history, and opens a
fresh one; requests admitted before the reset settle into the row they reserved against, exactly as a request
admitted at 23:59:59 settles into yesterday.

Invariants, per period row: `reserved` is the sum of its open reservations (reserved or held), `spent` the sum of
its settled actual costs; `spent + reserved <= limit` holds whenever every actual cost is at most its estimate.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from common.errors import Billing, BudgetExceeded, Conflict, InvalidInput, NotFound
from core import audit
from core.authz import AuthorizedActor, authorize
from core.catalog import PROVIDERS
from core.generation.periods import as_utc, period_bounds
from core.money import MAX_LIMIT_USD, MICRO
from core.security import Actor
from core.settings import ProviderSettings
from db.engine import dialect_insert
from db.models import (
    Budget,
    BudgetPeriod,
    BudgetPeriodKind,
    BudgetReservation,
    BudgetScope,
    ReservationStatus,
    Role,
    SpendMode,
    User,
    new_uuid,
    utcnow,
)

__all__ = [
    "BUDGET_EDITORS",
    "DEGRADE_ACTIONS",
    "Admission",
    "BudgetExceeded",
    "BudgetView",
    "Hold",
    "PeriodFigures",
    "Reservation",
    "SettleOutcome",
    "SpendMode",
    "applicable_budgets",
    "create_budget",
    "current_figures",
    "delete_budget",
    "expire_stale",
    "get_budget",
    "list_budgets",
    "period_history",
    "reconcile",
    "release",
    "reservation_for_generation",
    "reserve",
    "reset_period",
    "settle",
    "sync_provider_daily_budget",
    "update_budget",
]

BUDGET_EDITORS: tuple[Role, ...] = (Role.ADMIN, Role.HERO)
DEGRADE_ACTIONS: tuple[str, ...] = ("cheaper_preset", "smaller_size", "cheaper_provider")
MAX_LIMIT_MICRO_USD = int(MAX_LIMIT_USD) * MICRO
MAX_NAME_LENGTH = 100
EXPIRY_BATCH = 500
"""Reservations expired per `expire_stale` call: short transactions; the worker calls again while it finds more."""
_RESERVE_ATTEMPTS = 3
"""A period reset between finding the period and reserving in it makes `reserve` start over, this many times."""


# --- what callers see -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetView:
    id: int
    name: str
    scope: BudgetScope
    scope_id: str | None
    period: BudgetPeriodKind
    limit_micro_usd: int
    hard: bool
    degrade_action: str | None
    active: bool
    deleted_at: datetime | None
    settings_provider: str | None
    """Set when this budget is the provider's daily cost limit from its settings (changed only there)."""
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PeriodFigures:
    """One budget's figures for one period in one mode (live or simulated: never both in one figure)."""

    budget_id: int
    budget_name: str
    mode: SpendMode
    period_start: datetime
    period_end: datetime
    limit_micro_usd: int
    spent_micro_usd: int
    reserved_micro_usd: int
    period_id: int | None
    """None when nothing was reserved in this period yet (the row is created by the first reservation)."""
    reset_at: datetime | None = None
    reset_by: int | None = None

    @property
    def left_micro_usd(self) -> int:
        return max(0, self.limit_micro_usd - self.spent_micro_usd - self.reserved_micro_usd)

    @property
    def over_micro_usd(self) -> int:
        """How far spent + reserved is above the limit (a soft budget, or actual costs above their estimates)."""
        return max(0, self.spent_micro_usd + self.reserved_micro_usd - self.limit_micro_usd)


@dataclass(frozen=True)
class Hold:
    """One reservation row: the request's estimate held in one budget's period."""

    reservation_id: str
    budget_id: int
    period_id: int


@dataclass(frozen=True)
class Reservation:
    """The estimate of one request, held in every budget that applies to it (one `Hold` each)."""

    mode: SpendMode
    amount_micro_usd: int
    generation_id: str | None
    expires_at: datetime
    holds: tuple[Hold, ...]
    """In period-id order, the order every writer locks periods in."""


@dataclass(frozen=True)
class Admission:
    reservation: Reservation
    soft_exceeded: tuple[PeriodFigures, ...]
    """Soft budgets this request takes over their limit (figures after the reservation): the caller degrades."""


@dataclass(frozen=True)
class SettleOutcome:
    closed: int
    """Holds this call changed. Across every process, each hold is changed by exactly one call."""
    already_closed: int
    """Holds some other call (another process, the expiry sweep) had already closed: nothing counted twice."""


# --- small helpers --------------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return as_utc(now) if now is not None else utcnow()


def _view(row: Any) -> BudgetView:
    """A budget as callers see it, from its ORM row or a Core row of the same columns."""
    return BudgetView(
        id=row.id,
        name=row.name,
        scope=BudgetScope(row.scope),
        scope_id=row.scope_id,
        period=BudgetPeriodKind(row.period),
        limit_micro_usd=row.limit_micro_usd,
        hard=row.hard,
        degrade_action=row.degrade_action,
        active=row.active,
        deleted_at=row.deleted_at,
        settings_provider=row.settings_provider,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _public(view: BudgetView) -> dict[str, Any]:
    """The audited form of a budget."""
    return {
        "name": view.name,
        "scope": view.scope.value,
        "scope_id": view.scope_id,
        "period": view.period.value,
        "limit_micro_usd": view.limit_micro_usd,
        "hard": view.hard,
        "degrade_action": view.degrade_action,
        "active": view.active,
    }


def _figures_public(figures: PeriodFigures) -> dict[str, Any]:
    return {
        "mode": figures.mode.value,
        "period_start": figures.period_start.isoformat(),
        "period_end": figures.period_end.isoformat(),
        "limit_micro_usd": figures.limit_micro_usd,
        "spent_micro_usd": figures.spent_micro_usd,
        "reserved_micro_usd": figures.reserved_micro_usd,
    }


def _amount(value: int, field: str) -> int:
    # bool is an int in Python; True micro-dollars is a bug, not an amount.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{field} must be whole micro-dollars (an int)", {field: "must be an int"})
    if value < 0:
        raise InvalidInput(f"{field} must not be negative", {field: "must not be negative"})
    return value


def _mode(mode: SpendMode | str) -> SpendMode:
    try:
        return SpendMode(mode)
    except ValueError:
        msg = f"mode must be one of {', '.join(m.value for m in SpendMode)}"
        raise InvalidInput(msg, {"mode": msg}) from None


def _insert_ignoring_conflicts(session: Session, values: dict[str, Any]) -> None:
    """INSERT a period row unless an open row for the same (budget, mode, start) exists: the loser of a race
    inserts nothing and reads the winner's row."""
    session.execute(dialect_insert(session, BudgetPeriod).values(**values).on_conflict_do_nothing())


def _open_period_query(budget_id: int, mode: SpendMode, start: datetime) -> Any:
    return select(BudgetPeriod.id).where(
        BudgetPeriod.budget_id == budget_id,
        BudgetPeriod.mode == mode,
        BudgetPeriod.period_start == start,
        BudgetPeriod.reset_at.is_(None),
    )


_periods = cast(Table, BudgetPeriod.__table__)
_reservations = cast(Table, BudgetReservation.__table__)


class _Hot:
    """Admission's and settlement's statements, built once (values bound at execution) and run as Core on the
    session's connection, in its transaction."""

    open_period = select(_periods.c.id).where(
        _periods.c.budget_id == bindparam("b"),
        _periods.c.mode == bindparam("m", type_=_periods.c.mode.type),
        _periods.c.period_start == bindparam("s", type_=_periods.c.period_start.type),
        _periods.c.reset_at.is_(None),
    )
    _hold = (
        update(_periods)
        .where(_periods.c.id == bindparam("pid"), _periods.c.reset_at.is_(None))
        .values(reserved_micro_usd=_periods.c.reserved_micro_usd + bindparam("a"))
        .returning(_periods.c.spent_micro_usd, _periods.c.reserved_micro_usd)
    )
    hold_soft = _hold
    hold_hard = _hold.where(
        _periods.c.spent_micro_usd + _periods.c.reserved_micro_usd + bindparam("a2") <= bindparam("limit")
    )
    move = (
        update(_periods)
        .where(_periods.c.id == bindparam("pid"))
        .values(
            spent_micro_usd=_periods.c.spent_micro_usd + bindparam("ds"),
            reserved_micro_usd=_periods.c.reserved_micro_usd + bindparam("dr"),
        )
    )
    transition = (
        update(_reservations)
        .where(
            _reservations.c.id == bindparam("rid"),
            _reservations.c.status == bindparam("from_", type_=_reservations.c.status.type),
        )
        .returning(_reservations.c.budget_period_id, _reservations.c.amount_micro_usd)
    )
    lock_period = select(_periods.c.id).where(_periods.c.id == bindparam("pid")).with_for_update(key_share=True)


def _open_period_id(session: Session, budget: BudgetView, mode: SpendMode, now: datetime) -> int:
    """The id of the budget's open period row for `now`, created if this is the period's first request."""
    start, end = period_bounds(budget.period, now)
    connection = session.connection()
    key = {"b": budget.id, "m": mode, "s": start}
    period_id = connection.execute(_Hot.open_period, key).scalar()
    if period_id is None:
        _insert_ignoring_conflicts(
            session,
            {
                "budget_id": budget.id,
                "mode": mode,
                "period_start": start,
                "period_end": end,
                "spent_micro_usd": 0,
                "reserved_micro_usd": 0,
            },
        )
        period_id = connection.execute(_Hot.open_period, key).scalar()
    if period_id is None:  # inserted or found by now, unless the row was reset in between: reserve starts over
        raise Conflict(f"the current period of budget {budget.name!r} changed while it was being opened; try again")
    return int(period_id)


def _figures(session: Session, budget: BudgetView, period_id: int) -> PeriodFigures:
    row = session.get(BudgetPeriod, period_id, populate_existing=True)
    if row is None:
        raise NotFound(f"budget period {period_id} does not exist")
    return _period_figures(row, budget)


def _period_figures(row: BudgetPeriod, budget: BudgetView) -> PeriodFigures:
    return PeriodFigures(
        budget_id=budget.id,
        budget_name=budget.name,
        mode=SpendMode(row.mode),
        period_start=row.period_start,
        period_end=row.period_end,
        limit_micro_usd=budget.limit_micro_usd,
        spent_micro_usd=row.spent_micro_usd,
        reserved_micro_usd=row.reserved_micro_usd,
        period_id=row.id,
        reset_at=row.reset_at,
        reset_by=row.reset_by,
    )


def _authorize(session: Session, actor: Actor, action: str) -> AuthorizedActor:
    """The acting account, checked in this transaction (exists, active, ADMIN or HERO): core.authz."""
    return authorize(session, actor, *BUDGET_EDITORS, action=action)


def _settings_follower(session: Session) -> AuthorizedActor:
    """Who the audit log names when a settings-backed budget follows its setting: the process itself (the
    person who changed the setting is named in that setting's own audit row)."""
    return authorize(session, Actor.system("budgets"), *BUDGET_EDITORS, action="follow provider settings", lock=False)


# --- which budgets apply ------------------------------------------------------------------------------------------


def _load_provider_settings(session: Session, provider: str) -> ProviderSettings | None:
    from core.settings_service import settings_for_routing  # settings_service is heavier; only this path needs it

    return settings_for_routing(session).get(provider)


def sync_provider_daily_budget(
    session: Session, provider: str, limit_micro_usd: int | None, *, now: datetime | None = None
) -> BudgetView | None:
    """Make the provider's settings-backed daily budget follow its `daily_cost_limit_usd` (None: switched off).

    The setting is the one source: this only brings the budget row in line with it. Creation is an insert that
    cannot race (a unique index on `settings_provider`), and a change is one guarded UPDATE, so when several
    processes notice the same new setting, one of them changes the row and writes the one audit entry."""
    moment = _now(now)
    query = select(Budget).where(Budget.settings_provider == provider)
    row = session.scalar(query)
    if row is None:
        if limit_micro_usd is None:
            return None
        values: dict[str, Any] = {
            "name": f"{provider} daily cost limit (provider settings)",
            "scope": BudgetScope.PROVIDER,
            "scope_id": provider,
            "period": BudgetPeriodKind.DAILY,
            "limit_micro_usd": limit_micro_usd,
            "hard": True,
            "active": True,
            "created_at": moment,
            "updated_at": moment,
            "settings_provider": provider,
        }
        insert = dialect_insert(session, Budget)
        created = session.execute(insert.values(**values).on_conflict_do_nothing().returning(Budget.id)).first()
        row = session.scalar(query.execution_options(populate_existing=True))
        if row is None:  # pragma: no cover - inserted or found: the unique index leaves no third way
            raise Conflict(f"the daily budget of {provider} could not be created; try again")
        if created is not None:
            audit.record(
                session,
                _settings_follower(session),
                "budget.created",
                "budget",
                str(row.id),
                after=_public(_view(row)),
                comment=f"{provider} settings: daily_cost_limit_usd",
            )
        return _view(row)

    want_active = limit_micro_usd is not None
    want_limit = limit_micro_usd if limit_micro_usd is not None else row.limit_micro_usd
    if row.active == want_active and row.limit_micro_usd == want_limit:
        return _view(row)
    before = _public(_view(row))
    changed = session.execute(
        update(Budget)
        .where(
            Budget.id == row.id,
            or_(Budget.active != want_active, Budget.limit_micro_usd != want_limit),
        )
        .values(active=want_active, limit_micro_usd=want_limit, updated_at=moment)
        .returning(Budget.id)
        .execution_options(synchronize_session=False)
    ).first()
    session.refresh(row)
    if changed is not None:
        audit.record(
            session,
            _settings_follower(session),
            "budget.updated",
            "budget",
            str(row.id),
            before=before,
            after=_public(_view(row)),
            comment=f"{provider} settings: daily_cost_limit_usd",
        )
    return _view(row)


def applicable_budgets(
    session: Session,
    provider: str,
    user_id: int | None,
    *,
    provider_settings: ProviderSettings | None = None,
    now: datetime | None = None,
) -> list[BudgetView]:
    """The active budgets a request to `provider` by `user_id` counts against: global, the provider's (its
    settings' daily cost limit included) and the user's, in id order.

    `provider_settings` is the provider's current settings when the caller has them (the generation service
    caches them); without it they are read from the database."""
    if provider_settings is not None and provider_settings.provider != provider:
        raise ValueError(f"settings of {provider_settings.provider} handed in for a request to {provider}")
    settings = provider_settings if provider_settings is not None else _load_provider_settings(session, provider)
    limit = settings.daily_cost_limit_micros if settings is not None else None
    # One read finds both the budgets that apply and the provider's settings-backed daily budget (active or
    # not); it is written only when it is out of line with the setting (a changed setting, seen once).
    rows = _applicable_rows(session, provider, user_id)
    follower = next((r for r in rows if r.settings_provider == provider), None)
    in_line = (
        limit is None and (follower is None or not follower.active)
    ) or (
        follower is not None and follower.active and follower.limit_micro_usd == limit
    )  # fmt: skip
    if not in_line:
        sync_provider_daily_budget(session, provider, limit, now=now)
        rows = _applicable_rows(session, provider, user_id)
    return [_view(r) for r in rows if r.active and r.deleted_at is None and _applies(r, provider, user_id)]


def _applies(row: Any, provider: str, user_id: int | None) -> bool:
    scope = BudgetScope(row.scope)
    if scope is BudgetScope.GLOBAL:
        return True
    if scope is BudgetScope.PROVIDER:
        return bool(row.scope_id == provider)
    return user_id is not None and row.scope_id == str(user_id)


def _applicable_rows(session: Session, provider: str, user_id: int | None) -> list[Any]:
    """Budget rows (Core) that may apply to a request to `provider` by `user_id`, plus the provider's
    settings-backed one whatever its state, in id order."""
    params = {"provider": provider, "user_scope": None if user_id is None else str(user_id)}
    return list(session.connection().execute(_applicable_query(), params))


@functools.cache
def _applicable_query() -> Any:
    """`_applicable_rows`' statement, built once (it runs on every admission). With no user, `scope_id = NULL`
    matches nothing, so no user budget applies."""
    table = cast(Table, Budget.__table__)
    provider = bindparam("provider", type_=table.c.scope_id.type)
    user_scope = bindparam("user_scope", type_=table.c.scope_id.type)
    return (
        select(table)
        .where(
            or_(
                table.c.scope == BudgetScope.GLOBAL,
                (table.c.scope == BudgetScope.PROVIDER) & (table.c.scope_id == provider),
                table.c.settings_provider == provider,
                (table.c.scope == BudgetScope.USER) & (table.c.scope_id == user_scope),
            )
        )
        .order_by(table.c.id)
    )


# --- admission ----------------------------------------------------------------------------------------------------


class _PeriodWasReset(Exception):
    """The period row was closed by an admin's reset after it was found: start the reservation over."""


def _hold(session: Session, budget: BudgetView, period_id: int, amount: int) -> tuple[bool, int, int]:
    """Add `amount` to the period's reserved total: (held, spent, reserved after). A hard budget holds only when
    the amount fits under its limit, decided by the one UPDATE; a soft budget always holds."""
    connection = session.connection()
    if budget.hard:  # spent + reserved + amount <= limit, decided by the UPDATE itself
        params = {"pid": period_id, "a": amount, "a2": amount, "limit": budget.limit_micro_usd}
        row = connection.execute(_Hot.hold_hard, params).first()
    else:
        row = connection.execute(_Hot.hold_soft, {"pid": period_id, "a": amount}).first()
    if row is not None:
        return True, int(row[0]), int(row[1])
    current = session.execute(
        select(BudgetPeriod.spent_micro_usd, BudgetPeriod.reserved_micro_usd, BudgetPeriod.reset_at).where(
            BudgetPeriod.id == period_id
        )
    ).one()
    if current[2] is not None:
        raise _PeriodWasReset
    return False, int(current[0]), int(current[1])


def _give_back(session: Session, held: Iterable[int], amount: int) -> None:
    for period_id in held:
        session.execute(
            update(BudgetPeriod)
            .where(BudgetPeriod.id == period_id)
            .values(reserved_micro_usd=BudgetPeriod.reserved_micro_usd - amount)
            .execution_options(synchronize_session=False)
        )


@functools.cache
def _insert_reservation() -> Any:
    """The reservation insert, built once (its values are bound at execution)."""
    return insert(cast(Table, BudgetReservation.__table__))


def reserve(
    session: Session,
    budgets: Sequence[BudgetView],
    amount_micro_usd: int,
    mode: SpendMode | str,
    generation_id: str | None,
    expires_in: timedelta,
    *,
    now: datetime | None = None,
) -> Admission:
    """Hold `amount_micro_usd` in the current period of every budget in `budgets`, all or none.

    Raises `BudgetExceeded` naming the first hard budget without room (in period-id order); what this call had
    already held is given back first, so the caller's transaction may go on or roll back. Soft budgets over
    their limit are returned in `Admission.soft_exceeded`. Commit the transaction to make the holds visible."""
    amount = _amount(amount_micro_usd, "amount_micro_usd")
    spend_mode = _mode(mode)
    if expires_in <= timedelta(0):
        raise InvalidInput("expires_in must be positive", {"expires_in": "must be positive"})
    moment = _now(now)
    for _attempt in range(_RESERVE_ATTEMPTS):
        # Periods are opened in budget-id order and held in period-id order: every transaction waits on rows
        # in the same order, so none can wait on another that waits on it.
        distinct = sorted({b.id: b for b in budgets}.values(), key=lambda b: b.id)  # a budget counts once
        opened = [(_open_period_id(session, b, spend_mode, moment), b) for b in distinct]
        plan = sorted(opened, key=lambda p: p[0])
        held: list[int] = []
        soft_exceeded: list[PeriodFigures] = []
        try:
            for period_id, budget in plan:
                ok, spent, reserved = _hold(session, budget, period_id, amount)
                if not ok:
                    _give_back(session, held, amount)
                    raise BudgetExceeded(
                        budget_id=budget.id,
                        budget_name=budget.name,
                        mode=spend_mode.value,
                        limit_micro_usd=budget.limit_micro_usd,
                        spent_micro_usd=spent,
                        reserved_micro_usd=reserved,
                        requested_micro_usd=amount,
                    )
                held.append(period_id)
                if not budget.hard and spent + reserved > budget.limit_micro_usd:
                    soft_exceeded.append(_figures(session, budget, period_id))
        except _PeriodWasReset:
            _give_back(session, held, amount)
            continue
        expires_at = moment + expires_in
        holds = tuple(
            Hold(reservation_id=new_uuid(), budget_id=budget.id, period_id=period_id) for period_id, budget in plan
        )
        # Core on the session's connection (same transaction): no unit of work for rows nobody reads back.
        session.connection().execute(
            _insert_reservation(),
            [
                {
                    "id": hold.reservation_id,
                    "budget_period_id": hold.period_id,
                    "generation_id": generation_id,
                    "mode": spend_mode,
                    "amount_micro_usd": amount,
                    "actual_micro_usd": None,
                    "status": ReservationStatus.RESERVED,
                    "created_at": moment,
                    "expires_at": expires_at,
                    "closed_at": None,
                }
                for hold in holds
            ],
        )
        reservation = Reservation(spend_mode, amount, generation_id, expires_at, holds)
        return Admission(reservation=reservation, soft_exceeded=tuple(soft_exceeded))
    raise Conflict("budget periods were reset while this request was being admitted; try again")


# --- settlement ---------------------------------------------------------------------------------------------------


def _transition(
    session: Session,
    reservation_id: str,
    from_status: ReservationStatus,
    to_status: ReservationStatus,
    now: datetime,
    actual_micro_usd: int | None = None,
) -> tuple[int, int] | None:
    """Move one reservation from `from_status` to `to_status`: (period id, amount) if this call did it, None if
    the reservation was not in `from_status` (someone else got there first). The guard is the whole point."""
    values: dict[str, Any] = {"rid": reservation_id, "from_": from_status, "status": to_status}
    if to_status is not ReservationStatus.HELD:
        values["closed_at"] = now
    if actual_micro_usd is not None:
        values["actual_micro_usd"] = actual_micro_usd
    row = session.connection().execute(_Hot.transition, values).first()
    return None if row is None else (int(row[0]), int(row[1]))


def _lock_period(session: Session, period_id: int) -> None:
    """PostgreSQL: take the period's row lock before touching any of its reservations.

    Every writer locks a period before the reservations in it, and periods in id order, so no two transactions
    can each hold what the other waits for (a sweep closing several reservations of one period would otherwise
    deadlock with a settle of one of them). FOR NO KEY UPDATE leaves new reservations' foreign-key checks free.
    SQLite needs nothing: its one writer lock is taken at a transaction's first write."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_Hot.lock_period, {"pid": period_id})


def _move(session: Session, period_id: int, *, spent: int = 0, reserved: int = 0) -> None:
    """One statement: add `spent` to the period's spent total and `reserved` (negative: give back) to reserved."""
    if spent or reserved:
        session.connection().execute(_Hot.move, {"pid": period_id, "ds": spent, "dr": reserved})


def _close_hold(
    session: Session,
    reservation_id: str,
    from_statuses: Sequence[ReservationStatus],
    billing: Billing,
    actual: int,
    now: datetime,
) -> bool:
    """Close one hold by the billing facts, from the first of `from_statuses` it is in. True if this call did."""
    for source in from_statuses:
        estimate_still_held = source in (ReservationStatus.RESERVED, ReservationStatus.HELD)
        if billing is Billing.BILLED:
            done = _transition(session, reservation_id, source, ReservationStatus.SETTLED, now, actual)
            if done is not None:
                # An expired hold already gave its estimate back; a late charge is still a charge.
                _move(session, done[0], spent=actual, reserved=-done[1] if estimate_still_held else 0)
                return True
        elif billing is Billing.NOT_BILLED:
            if not estimate_still_held:
                continue  # nothing billed and nothing held: an expired hold stays as it is
            done = _transition(session, reservation_id, source, ReservationStatus.RELEASED, now, 0)
            if done is not None:
                _move(session, done[0], reserved=-done[1])
                return True
        else:  # UNKNOWN: keep holding the estimate until `reconcile` knows
            if source is not ReservationStatus.RESERVED:
                continue
            if _transition(session, reservation_id, source, ReservationStatus.HELD, now) is not None:
                return True
    return False


def _close_all(
    session: Session,
    reservation: Reservation,
    from_statuses: Sequence[ReservationStatus],
    billing: Billing,
    actual: int,
    now: datetime | None,
) -> SettleOutcome:
    moment = _now(now)
    closed = 0
    for hold in sorted(reservation.holds, key=lambda h: h.period_id):
        _lock_period(session, hold.period_id)
        closed += _close_hold(session, hold.reservation_id, from_statuses, billing, actual, moment)
    return SettleOutcome(closed=closed, already_closed=len(reservation.holds) - closed)


def settle(
    session: Session,
    reservation: Reservation,
    actual_micro_usd: int,
    billing: Billing,
    *,
    now: datetime | None = None,
) -> SettleOutcome:
    """Settle a request's reservation by its billing facts, exactly once per hold.

    BILLED: the actual cost replaces the estimate (above the estimate is recorded, never refused; a hold that
    had already expired still records the charge). NOT_BILLED: the estimate is given back. UNKNOWN: the
    estimate stays held (status `held`) until `reconcile`."""
    actual = _amount(actual_micro_usd, "actual_micro_usd")
    return _close_all(
        session,
        reservation,
        (ReservationStatus.RESERVED, ReservationStatus.EXPIRED),
        Billing(billing),
        actual,
        now,
    )


def release(session: Session, reservation: Reservation, *, now: datetime | None = None) -> SettleOutcome:
    """Give the estimate back: the request failed and nothing was billed."""
    return settle(session, reservation, 0, Billing.NOT_BILLED, now=now)


def reconcile(
    session: Session,
    reservation: Reservation,
    actual_micro_usd: int,
    billing: Billing,
    *,
    now: datetime | None = None,
) -> SettleOutcome:
    """Close holds kept at the estimate (billing was unknown) once the facts are known: BILLED records the
    actual cost, NOT_BILLED gives the estimate back. A hold the expiry sweep released is charged if BILLED."""
    if Billing(billing) is Billing.UNKNOWN:
        msg = "reconcile needs the billing facts: billed or not billed"
        raise InvalidInput(msg, {"billing": msg})
    actual = _amount(actual_micro_usd, "actual_micro_usd")
    return _close_all(
        session, reservation, (ReservationStatus.HELD, ReservationStatus.EXPIRED), Billing(billing), actual, now
    )


def expire_stale(session: Session, now: datetime | None = None, *, limit: int = EXPIRY_BATCH) -> int:
    """Give back the estimates of reservations still `reserved` past their expiry (left by a crashed process):
    status `expired`, exactly once however many workers sweep at the same time. Returns how many this call
    expired; call again while it returns `limit`. Held reservations (billing unknown) are not touched: they
    wait for `reconcile`."""
    moment = _now(now)
    candidates = session.execute(
        select(BudgetReservation.id, BudgetReservation.budget_period_id)
        .where(BudgetReservation.status == ReservationStatus.RESERVED, BudgetReservation.expires_at < moment)
        .order_by(BudgetReservation.budget_period_id, BudgetReservation.id)
        .limit(limit)
    ).all()
    expired = 0
    locked: int | None = None
    for reservation_id, period_id in candidates:
        if period_id != locked:
            _lock_period(session, period_id)
            locked = period_id
        done = _transition(session, reservation_id, ReservationStatus.RESERVED, ReservationStatus.EXPIRED, moment)
        if done is not None:
            _move(session, done[0], reserved=-done[1])
            expired += 1
    return expired


def reservation_for_generation(session: Session, generation_id: str) -> Reservation | None:
    """The reservation a generation made (for recovery after a crash), rebuilt from its rows; None if none."""
    rows = session.execute(
        select(BudgetReservation, BudgetPeriod.budget_id)
        .join(BudgetPeriod, BudgetPeriod.id == BudgetReservation.budget_period_id)
        .where(BudgetReservation.generation_id == generation_id)
        .order_by(BudgetReservation.budget_period_id)
    ).all()
    if not rows:
        return None
    first: BudgetReservation = rows[0][0]
    holds = tuple(Hold(row.id, int(budget_id), row.budget_period_id) for row, budget_id in rows)
    return Reservation(SpendMode(first.mode), first.amount_micro_usd, generation_id, first.expires_at, holds)


# --- reading figures ------------------------------------------------------------------------------------------


def get_budget(session: Session, budget_id: int) -> BudgetView:
    row = session.get(Budget, budget_id, populate_existing=True)
    if row is None:
        raise NotFound(f"budget {budget_id} does not exist")
    return _view(row)


def list_budgets(session: Session, *, include_deleted: bool = False) -> list[BudgetView]:
    query = select(Budget).order_by(Budget.id).execution_options(populate_existing=True)
    if not include_deleted:
        query = query.where(Budget.deleted_at.is_(None))
    return [_view(row) for row in session.scalars(query)]


def current_figures(
    session: Session, budget_id: int, mode: SpendMode | str = SpendMode.LIVE, *, now: datetime | None = None
) -> PeriodFigures:
    """The budget's figures for the period containing `now`, in one mode; zeros if nothing was reserved yet."""
    budget = get_budget(session, budget_id)
    spend_mode = _mode(mode)
    start, end = period_bounds(budget.period, _now(now))
    row = session.scalar(
        select(BudgetPeriod)
        .where(
            BudgetPeriod.budget_id == budget.id,
            BudgetPeriod.mode == spend_mode,
            BudgetPeriod.period_start == start,
            BudgetPeriod.reset_at.is_(None),
        )
        .execution_options(populate_existing=True)
    )
    if row is not None:
        return _period_figures(row, budget)
    return PeriodFigures(budget.id, budget.name, spend_mode, start, end, budget.limit_micro_usd, 0, 0, None)


def period_history(
    session: Session, budget_id: int, *, mode: SpendMode | str | None = None, limit: int = 100
) -> list[PeriodFigures]:
    """The budget's period rows, newest first: past periods and periods closed by a reset (`reset_at` set).

    The limit shown is the budget's current limit (limits are not versioned per period)."""
    budget = get_budget(session, budget_id)
    query = select(BudgetPeriod).where(BudgetPeriod.budget_id == budget.id)
    if mode is not None:
        query = query.where(BudgetPeriod.mode == _mode(mode))
    query = (
        query.order_by(BudgetPeriod.period_start.desc(), BudgetPeriod.id.desc())
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [_period_figures(row, budget) for row in session.scalars(query)]


# --- administration (ADMIN and HERO; each change with its audit row) ----------------------------------------------


def _name(name: str) -> str:
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned or len(cleaned) > MAX_NAME_LENGTH:
        msg = f"a budget needs a name of 1-{MAX_NAME_LENGTH} characters"
        raise InvalidInput(msg, {"name": msg})
    return cleaned


def _limit(value: int) -> int:
    limit = _amount(value, "limit_micro_usd")
    if limit > MAX_LIMIT_MICRO_USD:
        msg = f"a budget limit is at most ${MAX_LIMIT_USD:,}"
        raise InvalidInput(msg, {"limit_micro_usd": msg})
    return limit


def _degrade(hard: bool, action: str | None) -> str | None:
    if hard:
        if action is not None:
            msg = "a hard budget refuses; only a soft budget has a degrade action"
            raise InvalidInput(msg, {"degrade_action": msg})
        return None
    if action not in DEGRADE_ACTIONS:
        msg = f"a soft budget needs a degrade action: one of {', '.join(DEGRADE_ACTIONS)}"
        raise InvalidInput(msg, {"degrade_action": msg})
    return action


def _settings_budget_message(provider: str | None) -> str:
    return (
        f"a provider's daily budget is its settings' daily cost limit: change daily_cost_limit_usd in the "
        f"settings of {provider}"
    )


def _scope_id(session: Session, scope: BudgetScope, scope_id: str | int | None) -> str | None:
    if scope is BudgetScope.GLOBAL:
        if scope_id is not None:
            raise InvalidInput("a global budget has no scope id", {"scope_id": "must be empty for a global budget"})
        return None
    if scope is BudgetScope.PROVIDER:
        if scope_id not in PROVIDERS:
            msg = f"unknown provider {scope_id!r}; known providers: {', '.join(PROVIDERS)}"
            raise InvalidInput(msg, {"scope_id": msg})
        return str(scope_id)
    text_id = str(scope_id) if scope_id is not None else ""
    if not text_id.isdigit() or session.get(User, int(text_id)) is None:
        msg = f"no user with id {scope_id!r}"
        raise InvalidInput(msg, {"scope_id": msg})
    return str(int(text_id))


def _editable(session: Session, budget_id: int) -> Budget:
    # PostgreSQL: one editor at a time per budget. SQLite's single writer lock does the same at the first write.
    row = session.scalar(
        select(Budget).where(Budget.id == budget_id).with_for_update().execution_options(populate_existing=True)
    )
    if row is None:
        raise NotFound(f"budget {budget_id} does not exist")
    if row.deleted_at is not None:
        raise NotFound(f"budget {row.name!r} was deleted")
    return row


def create_budget(
    session: Session,
    actor: Actor,
    *,
    name: str,
    scope: BudgetScope | str,
    period: BudgetPeriodKind | str,
    limit_micro_usd: int,
    scope_id: str | int | None = None,
    hard: bool = True,
    degrade_action: str | None = None,
) -> BudgetView:
    who = _authorize(session, actor, "create budgets")
    try:
        budget_scope = BudgetScope(scope)
    except ValueError:
        msg = f"scope must be one of {', '.join(s.value for s in BudgetScope)}"
        raise InvalidInput(msg, {"scope": msg}) from None
    try:
        kind = BudgetPeriodKind(period)
    except ValueError:
        msg = f"period must be one of {', '.join(k.value for k in BudgetPeriodKind)}"
        raise InvalidInput(msg, {"period": msg}) from None
    if budget_scope is BudgetScope.PROVIDER and kind is BudgetPeriodKind.DAILY:
        raise InvalidInput(_settings_budget_message(str(scope_id)), {"period": _settings_budget_message(None)})
    if not isinstance(hard, bool):
        raise InvalidInput("hard must be true or false", {"hard": "must be true or false"})
    moment = utcnow()
    row = Budget(
        name=_name(name),
        scope=budget_scope,
        scope_id=_scope_id(session, budget_scope, scope_id),
        period=kind,
        limit_micro_usd=_limit(limit_micro_usd),
        hard=hard,
        degrade_action=_degrade(hard, degrade_action),
        active=True,
        created_by=who.user_id,
        created_at=moment,
        updated_at=moment,
    )
    session.add(row)
    session.flush()
    view = _view(row)
    audit.record(session, who, "budget.created", "budget", str(row.id), after=_public(view))
    return view


_UNCHANGED: Any = object()


def update_budget(
    session: Session,
    actor: Actor,
    budget_id: int,
    *,
    name: str | None = None,
    limit_micro_usd: int | None = None,
    hard: bool | None = None,
    degrade_action: str | None = _UNCHANGED,
    active: bool | None = None,
    comment: str | None = None,
) -> BudgetView:
    """Change a budget's name, limit, hard/soft, degrade action or active flag. A change takes effect for the
    next reservation, in the current period too; a call that changes nothing writes no audit row."""
    who = _authorize(session, actor, "change budgets")
    row = _editable(session, budget_id)
    if row.settings_provider is not None:
        msg = _settings_budget_message(row.settings_provider)
        raise InvalidInput(msg, {"budget": msg})
    before = _view(row)
    new_hard = before.hard if hard is None else hard
    if not isinstance(new_hard, bool) or (active is not None and not isinstance(active, bool)):
        raise InvalidInput("hard and active must be true or false", {"hard": "must be true or false"})
    # Left unchanged, a soft budget keeps its action and a budget made hard drops it.
    keep_action = None if new_hard else before.degrade_action
    new_action = keep_action if degrade_action is _UNCHANGED else degrade_action
    after = replace(
        before,
        name=before.name if name is None else _name(name),
        limit_micro_usd=before.limit_micro_usd if limit_micro_usd is None else _limit(limit_micro_usd),
        hard=new_hard,
        degrade_action=_degrade(new_hard, new_action),
        active=before.active if active is None else active,
    )
    if _public(after) == _public(before):
        return before
    row.name = after.name
    row.limit_micro_usd = after.limit_micro_usd
    row.hard = after.hard
    row.degrade_action = after.degrade_action
    row.active = after.active
    row.updated_at = utcnow()
    session.flush()
    audit.record(
        session,
        who,
        "budget.updated",
        "budget",
        str(row.id),
        before=_public(before),
        after=_public(after),
        comment=comment,
    )
    return _view(row)


def delete_budget(session: Session, actor: Actor, budget_id: int, *, comment: str | None = None) -> BudgetView:
    """Soft delete: the budget stops applying; it, its periods and its reservations stay as the ledger.
    Open reservations still settle into their periods."""
    who = _authorize(session, actor, "delete budgets")
    row = _editable(session, budget_id)
    if row.settings_provider is not None:
        msg = _settings_budget_message(row.settings_provider)
        raise InvalidInput(msg, {"budget": msg})
    before = _public(_view(row))
    moment = utcnow()
    row.deleted_at = moment
    row.active = False
    row.updated_at = moment
    session.flush()
    audit.record(session, who, "budget.deleted", "budget", str(row.id), before=before, comment=comment)
    return _view(row)


def reset_period(
    session: Session,
    actor: Actor,
    budget_id: int,
    mode: SpendMode | str = SpendMode.LIVE,
    *,
    now: datetime | None = None,
    comment: str | None = None,
) -> PeriodFigures:
    """Start the budget's current period afresh: the open row is closed with its figures (`reset_at`,
    `reset_by`) and a new row at zero takes its place. Returns the closed row's figures.

    Requests admitted before the reset settle into the closed row, as they would after a period rollover."""
    who = _authorize(session, actor, "reset budget periods")
    row = _editable(session, budget_id)
    budget = _view(row)
    spend_mode = _mode(mode)
    moment = _now(now)
    start, end = period_bounds(budget.period, moment)
    period_id = session.scalar(_open_period_query(budget.id, spend_mode, start))
    if period_id is None:
        raise NotFound(f"budget {budget.name!r} has nothing {spend_mode.value} in its current period to reset")
    closed = session.execute(
        update(BudgetPeriod)
        .where(BudgetPeriod.id == period_id, BudgetPeriod.reset_at.is_(None))
        .values(reset_at=moment, reset_by=who.user_id)
        .returning(BudgetPeriod.id)
        .execution_options(synchronize_session=False)
    ).first()
    if closed is None:
        raise Conflict(f"the current period of budget {budget.name!r} was reset by someone else just now")
    session.add(
        BudgetPeriod(
            budget_id=budget.id,
            mode=spend_mode,
            period_start=start,
            period_end=end,
            spent_micro_usd=0,
            reserved_micro_usd=0,
        )
    )
    session.flush()
    figures = _figures(session, budget, int(period_id))
    audit.record(
        session,
        who,
        "budget.period_reset",
        "budget",
        str(budget.id),
        before=_figures_public(figures),
        comment=comment,
    )
    return figures
