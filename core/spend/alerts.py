"""Alerts: budget thresholds, breakers that open, days that spend far above their usual rate; read in-app.

What fires (each detector is a plain function the worker calls; `detect_alerts` runs them all):
- **Budget thresholds.** Every budget has thresholds in percent of its limit: 50 / 80 / 100 by default, or its
  own list (`set_thresholds`, ADMIN or HERO, audited). A threshold fires when the period's **spent** reaches it
  (`spent * 100 >= limit * threshold`, integers). Spent, not spent + reserved: reservations come and go (a
  failed or cancelled request gives its estimate back), so spent + reserved can touch 80 % and fall back, and
  an alert would then report money that was never spent; spent only grows within a period, so a crossing
  never flaps and every alert names money really spent. The price is a delay of one request's duration.
  Live and simulated money are separate period rows, so they fire separately and the title says which.
- **Breaker opened.** A provider's breaker that is open or half-open: one alert per outage (the moment it left
  CLOSED, `circuit_states.since`, is kept while it goes between OPEN and HALF_OPEN).
- **Spend anomaly.** Today's spend so far (UTC, from `usage_daily_rollups` only), extrapolated to the whole
  day, above `factor` x the median of the trailing 14 days' daily spend (missing days count as 0), and that
  median never below a floor. The elapsed time is at least one hour, so the first minutes of a day do not
  extrapolate one request into a day's fortune. Per spend mode, at most once per day.

"Fires once" is a database fact: every alert has a unique `dedupe_key` (`budget:<period id>:<threshold>`,
`breaker:<provider>:<opened at>`, `anomaly:<mode>:<day>`), inserted with INSERT ... ON CONFLICT DO NOTHING, so
however many processes see the same crossing at once, one insert wins; only the winner fans the alert out to
the webhooks (one `webhook_deliveries` row per subscribed webhook, in the same transaction), so each webhook
gets each alert once too.

In-app: alerts are unread per user (`alert_reads`). ADMIN and HERO see every alert; a USER sees only the
threshold alerts of budgets of their own (scope user, their id). The system actor sees everything and has no
read marks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy import insert as sa_insert
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, NotFound
from core import audit
from core.authz import AuthorizedActor, authorize
from core.generation import breaker
from core.generation.budgets import BUDGET_EDITORS
from core.generation.periods import as_utc
from core.generation.usage import spend_mode_of
from core.money import format_usd
from core.security import Actor
from db.engine import dialect_insert, transaction
from db.models import (
    AlertEvent,
    AlertRead,
    AlertRule,
    Budget,
    BudgetPeriod,
    BudgetScope,
    CircuitState,
    Role,
    SpendMode,
    UsageDailyRollup,
    Webhook,
    WebhookDelivery,
    utcnow,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AlertKind",
    "AlertView",
    "AnomalyConfig",
    "alert_payload",
    "detect_alerts",
    "detect_breaker_alerts",
    "detect_budget_alerts",
    "detect_spend_anomalies",
    "list_alerts",
    "mark_all_read",
    "mark_read",
    "set_thresholds",
    "thresholds",
    "unread_count",
]

DEFAULT_THRESHOLDS: tuple[int, ...] = (50, 80, 100)
MAX_THRESHOLDS = 10
MAX_THRESHOLD_PERCENT = 1000
"""The schema's check constraint: thresholds above 100 % alert on soft budgets run over."""
PERIOD_GRACE = timedelta(hours=1)
"""Periods that ended less than this ago are still checked, so a crossing in a period's last minutes (between two
worker passes) still fires."""
MAX_PAGE = 500


class AlertKind(StrEnum):
    BUDGET_THRESHOLD = "budget_threshold"
    BREAKER_OPEN = "breaker_open"
    SPEND_ANOMALY = "spend_anomaly"


@dataclass(frozen=True)
class AnomalyConfig:
    factor: int = 3
    """Alert when the day's projected spend is above factor x its usual daily spend."""
    trailing_days: int = 14
    floor_micro_usd: int = 5_000_000
    """The usual daily spend is taken as at least this ($5): a quiet history does not make $1 an anomaly."""
    min_elapsed: timedelta = timedelta(hours=1)
    """The extrapolation divides by at least this much of the day."""


@dataclass(frozen=True)
class AlertView:
    id: int
    kind: AlertKind
    title: str
    fired_at: datetime
    details: dict[str, Any]
    provider: str | None
    budget_period_id: int | None
    spent_micro_usd: int | None
    limit_micro_usd: int | None
    delivery_status: str
    read: bool


@dataclass
class _Detected:
    created: list[int] = field(default_factory=list)


# --- thresholds -----------------------------------------------------------------------------------------------


def thresholds(session: Session, budget_id: int) -> tuple[tuple[int, ...], bool]:
    """(the budget's active thresholds ascending, whether they are the defaults). A budget whose thresholds were
    never set has no rule rows and uses DEFAULT_THRESHOLDS; once set, its rows decide (possibly none active)."""
    rules = _rules(session, [budget_id]).get(budget_id)
    if rules is None:
        return DEFAULT_THRESHOLDS, True
    return tuple(sorted(t for t, _ in rules)), False


def _rules(session: Session, budget_ids: Iterable[int]) -> dict[int, list[tuple[int, int | None]]]:
    """Per budget that has rule rows: its ACTIVE (threshold, rule id) pairs (an empty list: alerts switched off)."""
    ids = list(budget_ids)
    found: dict[int, list[tuple[int, int | None]]] = {}
    if not ids:
        return found
    rows = session.execute(
        select(AlertRule.budget_id, AlertRule.threshold_percent, AlertRule.id, AlertRule.active).where(
            AlertRule.budget_id.in_(ids)
        )
    ).all()
    for budget_id, threshold, rule_id, active in rows:
        pairs = found.setdefault(int(budget_id), [])
        if active:
            pairs.append((int(threshold), int(rule_id)))
    return found


def _clean_thresholds(values: Sequence[int]) -> tuple[int, ...]:
    cleaned: set[int] = set()
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_THRESHOLD_PERCENT:
            msg = f"a threshold is a whole percentage from 1 to {MAX_THRESHOLD_PERCENT}, not {value!r}"
            raise InvalidInput(msg, {"thresholds": msg})
        cleaned.add(value)
    if len(cleaned) > MAX_THRESHOLDS:
        msg = f"at most {MAX_THRESHOLDS} thresholds per budget"
        raise InvalidInput(msg, {"thresholds": msg})
    return tuple(sorted(cleaned))


def set_thresholds(
    session: Session, actor: Actor, budget_id: int, values: Sequence[int], *, comment: str | None = None
) -> tuple[int, ...]:
    """Replace a budget's thresholds (ADMIN or HERO, checked in this transaction; audited). An empty list switches
    the budget's threshold alerts off. Alerts already fired stay; a new threshold already crossed fires at the
    next detection pass."""
    who = authorize(session, actor, *BUDGET_EDITORS, action="set alert thresholds")
    wanted = _clean_thresholds(values)
    budget = session.get(Budget, budget_id, populate_existing=True)
    if budget is None or budget.deleted_at is not None:
        raise NotFound(f"budget {budget_id} does not exist")
    before, was_default = thresholds(session, budget_id)
    if not was_default and before == wanted:
        return wanted
    # The defaults get rows too (inactive unless wanted), so "no rows" keeps meaning "defaults" and an empty
    # list can mean "none". One upsert per threshold: two editors at once cannot break the unique index.
    for threshold in sorted(set(wanted) | set(DEFAULT_THRESHOLDS) | set(before)):
        active = threshold in wanted
        insert = dialect_insert(session, AlertRule).values(
            budget_id=budget_id, threshold_percent=threshold, active=active
        )
        session.execute(
            insert.on_conflict_do_update(index_elements=["budget_id", "threshold_percent"], set_={"active": active})
        )
    session.flush()
    audit.record(
        session,
        who,
        "budget.alert_thresholds",
        "budget",
        str(budget_id),
        before={"thresholds": list(before), "default": was_default},
        after={"thresholds": list(wanted), "default": False},
        comment=comment,
    )
    return wanted


# --- firing ---------------------------------------------------------------------------------------------------


_Hooks = list[tuple[int, list[str]]]


def _webhooks(session: Session) -> _Hooks:
    """Active, not deleted webhooks with the kinds they take (an empty list takes every kind), read once a pass."""
    rows = session.execute(
        select(Webhook.id, Webhook.events)
        .where(Webhook.active.is_(True), Webhook.deleted_at.is_(None))
        .order_by(Webhook.id)
    ).all()
    return [(int(webhook_id), list(events or [])) for webhook_id, events in rows]


def _already_fired(session: Session, keys: Sequence[str]) -> set[str]:
    """Which of `keys` exist (through the unique index on dedupe_key): a steady pass inserts nothing."""
    found: set[str] = set()
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        found.update(session.scalars(select(AlertEvent.dedupe_key).where(AlertEvent.dedupe_key.in_(chunk))))
    return found


def alert_payload(event: AlertEvent) -> dict[str, Any]:
    """The JSON body webhooks receive for an alert (the delivery id and event type travel in headers too)."""
    return {
        "type": event.kind,
        "alert": {
            "id": event.id,
            "kind": event.kind,
            "title": event.title,
            "fired_at": as_utc(event.fired_at).isoformat(),
            "provider": event.provider,
            "budget_period_id": event.budget_period_id,
            "spent_micro_usd": event.spent_micro_usd,
            "limit_micro_usd": event.limit_micro_usd,
            "details": event.details,
        },
    }


def _fire(session: Session, values: dict[str, Any], hooks: _Hooks | None = None) -> int | None:
    """Insert the alert unless its dedupe key exists; the winner fans it out to the webhooks that take its kind
    (one delivery each, in the same transaction). Returns the new alert's id, or None when another process (or
    an earlier pass) fired it."""
    candidates = hooks if hooks is not None else _webhooks(session)
    subscribers = [wid for wid, kinds in candidates if not kinds or values["kind"] in kinds]
    row = {**values, "delivery_status": "pending" if subscribers else "no_webhooks"}
    insert = dialect_insert(session, AlertEvent).values(**row).on_conflict_do_nothing()
    created = session.execute(insert.returning(AlertEvent.id)).first()
    if created is None:
        return None
    event_id = int(created[0])
    if subscribers:
        payload = alert_payload(AlertEvent(id=event_id, **row))  # transient: the payload from what was inserted
        session.execute(
            sa_insert(WebhookDelivery),
            [
                {
                    "webhook_id": webhook_id,
                    "alert_event_id": event_id,
                    "event_type": row["kind"],
                    "payload": payload,
                    "status": "pending",
                    "attempts": 0,
                    "created_at": row["fired_at"],
                    "next_attempt_at": row["fired_at"],
                }
                for webhook_id in subscribers
            ],
        )
    return event_id


def detect_budget_alerts(session: Session, now: datetime | None = None) -> list[int]:
    """Fire the thresholds crossed by the periods running at `now` (or ended within PERIOD_GRACE); returns the
    ids of alerts this call created."""
    moment = as_utc(now) if now is not None else utcnow()
    rows = session.execute(
        select(BudgetPeriod, Budget)
        .join(Budget, Budget.id == BudgetPeriod.budget_id)
        .where(
            Budget.deleted_at.is_(None),
            Budget.active.is_(True),
            BudgetPeriod.period_start <= moment,
            BudgetPeriod.period_end > moment - PERIOD_GRACE,
            BudgetPeriod.spent_micro_usd > 0,
        )
        .order_by(BudgetPeriod.id)
    ).all()
    rules = _rules(session, {budget.id for _, budget in rows})
    crossed: list[tuple[BudgetPeriod, Budget, int, int | None]] = []
    for period, budget in rows:
        pairs = rules.get(budget.id, [(t, None) for t in DEFAULT_THRESHOLDS])
        spent, limit = period.spent_micro_usd, budget.limit_micro_usd
        crossed.extend((period, budget, t, rule) for t, rule in sorted(pairs) if spent * 100 >= limit * t)
    fired = _already_fired(session, [f"budget:{period.id}:{t}" for period, _, t, _ in crossed])
    hooks = _webhooks(session)
    created: list[int] = []
    for period, budget, threshold, rule_id in crossed:
        if f"budget:{period.id}:{threshold}" in fired:
            continue
        spent, limit = period.spent_micro_usd, budget.limit_micro_usd
        mode = SpendMode(period.mode).value
        started = as_utc(period.period_start)
        title = (
            f"{budget.name}: {threshold}% of its {budget.period.value} {mode} limit reached "
            f"({format_usd(spent)} spent of {format_usd(limit)}, period from {started:%Y-%m-%d})"
        )
        event_id = _fire(
            session,
            {
                "kind": AlertKind.BUDGET_THRESHOLD.value,
                "dedupe_key": f"budget:{period.id}:{threshold}",
                "rule_id": rule_id,
                "budget_period_id": period.id,
                "title": title,
                "details": {
                    "budget_id": budget.id,
                    "budget_name": budget.name,
                    "scope": budget.scope.value,
                    "scope_id": budget.scope_id,
                    "period": budget.period.value,
                    "mode": mode,
                    "threshold_percent": threshold,
                    "period_start": as_utc(period.period_start).isoformat(),
                    "period_end": as_utc(period.period_end).isoformat(),
                    "reserved_micro_usd": period.reserved_micro_usd,
                    "hard": budget.hard,
                },
                "fired_at": moment,
                "spent_micro_usd": spent,
                "limit_micro_usd": limit,
            },
            hooks,
        )
        if event_id is not None:
            created.append(event_id)
    return created


def detect_breaker_alerts(session: Session, now: datetime | None = None) -> list[int]:
    """Fire once per outage for every breaker that is open or half-open (read from circuit_states)."""
    moment = as_utc(now) if now is not None else utcnow()
    created: list[int] = []
    for provider, snap in breaker.snapshot(session, moment).items():
        if snap.state is CircuitState.CLOSED or snap.since is None:
            continue
        opened_at = as_utc(snap.since)
        event_id = _fire(
            session,
            {
                "kind": AlertKind.BREAKER_OPEN.value,
                "dedupe_key": f"breaker:{provider}:{opened_at.isoformat()}",
                "provider": provider,
                "title": f"{provider}: circuit breaker opened at {opened_at:%Y-%m-%d %H:%M:%S} UTC ({snap.reason})",
                "details": {
                    "opened_at": opened_at.isoformat(),
                    "state": snap.state.value,
                    "reason": snap.reason,
                    "last_error_class": snap.last_error_class,
                    "opened_count": snap.opened_count,
                    "next_probe_at": snap.next_probe_at.isoformat() if snap.next_probe_at else None,
                },
                "fired_at": moment,
            },
        )
        if event_id is not None:
            created.append(event_id)
    return created


def _median(values: Sequence[int]) -> Fraction:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return Fraction(ordered[middle])
    return Fraction(ordered[middle - 1] + ordered[middle], 2)


def _exact(value: Fraction) -> str:
    """A median of whole micro-dollars is whole or ends in .5: shown exactly, as a decimal string."""
    return str(Decimal(value.numerator) / Decimal(value.denominator))


def daily_spend(session: Session, first: date, last: date) -> dict[tuple[date, SpendMode], int]:
    """Actual spend per UTC day and spend mode, from the rollups (one grouped query over their day index)."""
    rows = session.execute(
        select(UsageDailyRollup.day, UsageDailyRollup.mode, func.sum(UsageDailyRollup.actual_micro_usd))
        .where(UsageDailyRollup.day >= first, UsageDailyRollup.day <= last)
        .group_by(UsageDailyRollup.day, UsageDailyRollup.mode)
    ).all()
    totals: dict[tuple[date, SpendMode], int] = {}
    for day, attempt_mode, total in rows:
        key = (day, spend_mode_of(attempt_mode))
        totals[key] = totals.get(key, 0) + int(total or 0)
    return totals


def detect_spend_anomalies(
    session: Session, now: datetime | None = None, config: AnomalyConfig | None = None
) -> list[int]:
    """Fire when today's spend, extrapolated to the whole day, runs above factor x the usual daily spend."""
    cfg = config or AnomalyConfig()
    moment = as_utc(now) if now is not None else utcnow()
    today = moment.date()
    totals = daily_spend(session, today - timedelta(days=cfg.trailing_days), today)
    day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = max(moment - day_start, cfg.min_elapsed)
    created: list[int] = []
    for mode in SpendMode:
        spent_today = totals.get((today, mode), 0)
        if spent_today <= 0:
            continue
        history = [totals.get((today - timedelta(days=i), mode), 0) for i in range(1, cfg.trailing_days + 1)]
        median = _median(history)
        usual = max(median, Fraction(cfg.floor_micro_usd))
        projected = (
            Fraction(spent_today)
            * Fraction(timedelta(days=1) // timedelta(microseconds=1))
            / Fraction(elapsed // timedelta(microseconds=1))
        )
        if projected <= cfg.factor * usual:
            continue
        projected_micro = int(projected)  # floor: shown, never summed
        title = (
            f"{mode.value} spend today is running at {format_usd(projected_micro)}/day "
            f"({format_usd(spent_today)} so far), over {cfg.factor}x the usual {format_usd(int(usual))}/day "
            f"(median of the last {cfg.trailing_days} days: {format_usd(int(median))})"
        )
        event_id = _fire(
            session,
            {
                "kind": AlertKind.SPEND_ANOMALY.value,
                "dedupe_key": f"anomaly:{mode.value}:{today.isoformat()}",
                "title": title,
                "details": {
                    "mode": mode.value,
                    "day": today.isoformat(),
                    "spent_today_micro_usd": spent_today,
                    "projected_micro_usd": projected_micro,
                    "median_micro_usd": _exact(median),
                    "usual_micro_usd": _exact(usual),
                    "floor_micro_usd": cfg.floor_micro_usd,
                    "factor": cfg.factor,
                    "trailing_days": cfg.trailing_days,
                    "elapsed_s": int(elapsed.total_seconds()),
                },
                "fired_at": moment,
                "spent_micro_usd": spent_today,
            },
        )
        if event_id is not None:
            created.append(event_id)
    return created


def detect_alerts(
    session_factory: sessionmaker[Session], now: datetime | None = None, *, anomaly: AnomalyConfig | None = None
) -> int:
    """One detection pass (what the worker runs): thresholds, breakers, anomalies, each in its own short
    transaction. Returns how many alerts this pass created (0 when other processes fired them first)."""
    created = 0
    with transaction(session_factory) as session:
        created += len(detect_budget_alerts(session, now))
    with transaction(session_factory) as session:
        created += len(detect_breaker_alerts(session, now))
    with transaction(session_factory) as session:
        created += len(detect_spend_anomalies(session, now, anomaly))
    return created


# --- in-app: reading and read marks ---------------------------------------------------------------------------


def _reader(session: Session, actor: Actor, action: str, *, lock: bool) -> AuthorizedActor:
    return authorize(session, actor, Role.ADMIN, Role.HERO, Role.USER, action=action, lock=lock)


def _visible(who: AuthorizedActor) -> Any:
    """The alerts `who` may see: ADMIN, HERO and the system every one; a USER their own budgets' thresholds."""
    query = select(AlertEvent)
    if who.role is Role.USER:
        query = (
            query.join(BudgetPeriod, BudgetPeriod.id == AlertEvent.budget_period_id)
            .join(Budget, Budget.id == BudgetPeriod.budget_id)
            .where(
                AlertEvent.kind == AlertKind.BUDGET_THRESHOLD.value,
                Budget.scope == BudgetScope.USER,
                Budget.scope_id == str(who.user_id),
            )
        )
    return query


def _needs_account(who: AuthorizedActor, action: str) -> None:
    if who.user_id is None:
        msg = f"read marks belong to an account; the system actor {who.username} cannot {action} (act as a user)"
        raise InvalidInput(msg, {"actor": msg})


def list_alerts(
    session: Session, actor: Actor, *, unread_only: bool = False, kind: AlertKind | str | None = None, limit: int = 100
) -> list[AlertView]:
    """Alerts `actor` may see, newest first, each with whether this account has read it."""
    who = _reader(session, actor, "read alerts", lock=False)
    if unread_only:
        _needs_account(who, "list unread alerts")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be 1-{MAX_PAGE}", {"limit": f"must be 1-{MAX_PAGE}"})
    read_join = and_(AlertRead.alert_event_id == AlertEvent.id, AlertRead.user_id == (who.user_id or -1))
    query = _visible(who).add_columns(AlertRead.read_at).outerjoin(AlertRead, read_join)
    if kind is not None:
        try:
            wanted = AlertKind(kind)
        except ValueError:
            kinds = ", ".join(k.value for k in AlertKind)
            raise InvalidInput(f"unknown alert kind {kind!r}; one of {kinds}", {"kind": f"one of {kinds}"}) from None
        query = query.where(AlertEvent.kind == wanted.value)
    if unread_only:
        query = query.where(AlertRead.read_at.is_(None))
    query = query.order_by(AlertEvent.fired_at.desc(), AlertEvent.id.desc()).limit(limit)
    return [
        AlertView(
            id=event.id,
            kind=AlertKind(event.kind),
            title=event.title,
            fired_at=event.fired_at,
            details=event.details,
            provider=event.provider,
            budget_period_id=event.budget_period_id,
            spent_micro_usd=event.spent_micro_usd,
            limit_micro_usd=event.limit_micro_usd,
            delivery_status=event.delivery_status,
            read=read_at is not None,
        )
        for event, read_at in session.execute(query.execution_options(populate_existing=True)).all()
    ]


def unread_count(session: Session, actor: Actor) -> int:
    """How many alerts this account may see and has not read (the console's badge)."""
    who = _reader(session, actor, "read alerts", lock=False)
    _needs_account(who, "count unread alerts")
    read_join = and_(AlertRead.alert_event_id == AlertEvent.id, AlertRead.user_id == who.user_id)
    visible = _visible(who).outerjoin(AlertRead, read_join).where(AlertRead.read_at.is_(None))
    return int(session.scalar(select(func.count()).select_from(visible.subquery())) or 0)


def _mark(session: Session, user_id: int, event_ids: Iterable[int], now: datetime) -> int:
    marked = 0
    for event_id in sorted(set(event_ids)):
        insert = dialect_insert(session, AlertRead).values(alert_event_id=event_id, user_id=user_id, read_at=now)
        if session.execute(insert.on_conflict_do_nothing().returning(AlertRead.alert_event_id)).first() is not None:
            marked += 1
    return marked


def mark_read(session: Session, actor: Actor, event_ids: Sequence[int], *, now: datetime | None = None) -> int:
    """Mark alerts read for this account; returns how many were unread. An id the account may not see is
    NotFound (the same answer as an id that does not exist)."""
    who = _reader(session, actor, "mark alerts read", lock=True)
    _needs_account(who, "mark alerts read")
    assert who.user_id is not None
    wanted = {int(i) for i in event_ids}
    visible = set(session.scalars(_visible(who).with_only_columns(AlertEvent.id).where(AlertEvent.id.in_(wanted))))
    missing = sorted(wanted - visible)
    if missing:
        raise NotFound(f"no alert {', '.join(map(str, missing))}")
    return _mark(session, who.user_id, visible, as_utc(now) if now else utcnow())


def mark_all_read(session: Session, actor: Actor, *, now: datetime | None = None) -> int:
    """Mark every alert this account may see as read; returns how many were unread."""
    who = _reader(session, actor, "mark alerts read", lock=True)
    _needs_account(who, "mark alerts read")
    assert who.user_id is not None
    read_join = and_(AlertRead.alert_event_id == AlertEvent.id, AlertRead.user_id == who.user_id)
    unread = session.scalars(
        _visible(who)
        .with_only_columns(AlertEvent.id)
        .outerjoin(AlertRead, read_join)
        .where(AlertRead.read_at.is_(None))
    ).all()
    return _mark(session, who.user_id, unread, as_utc(now) if now else utcnow())
