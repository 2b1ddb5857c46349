"""Alerts on SQLite and PostgreSQL: thresholds (default and per budget, authorized and audited), breaker and
anomaly alerts on seeded rows with hand-checked figures, in-app reading and read marks, fan-out to webhooks.

The race across processes is in test_alert_races.py; delivery in test_webhooks.py."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, NotFound, PermissionDenied
from core.generation import budgets
from core.generation.periods import period_bounds
from core.security import Actor
from core.spend import alerts
from core.spend.alerts import AlertKind, AnomalyConfig
from db.engine import transaction
from db.models import (
    AlertEvent,
    AlertRule,
    AuditLog,
    BudgetPeriod,
    BudgetPeriodKind,
    CircuitState,
    CircuitStateRow,
    Role,
    SpendMode,
    UsageDailyRollup,
    User,
    Webhook,
    WebhookDelivery,
)

Factory = sessionmaker[Session]
NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
SYSTEM = Actor.system("test")
USD = 1_000_000


def make_user(factory: Factory, name: str, role: Role, *, active: bool = True) -> Actor:
    with transaction(factory) as session:
        row = User(username=name, password_hash="not-a-real-hash", role=role, active=active)
        session.add(row)
        session.flush()
        return Actor(row.id, row.username, role)


def make_budget(factory: Factory, name: str = "monthly", limit: int = 10 * USD, **kwargs: Any) -> int:
    values: dict[str, Any] = {"scope": "global", "period": "monthly"} | kwargs
    with transaction(factory) as session:
        return budgets.create_budget(session, SYSTEM, name=name, limit_micro_usd=limit, **values).id


def set_spent(
    factory: Factory,
    budget_id: int,
    spent: int,
    *,
    reserved: int = 0,
    mode: SpendMode = SpendMode.LIVE,
    at: datetime = NOW,
) -> int:
    """The budget's current period row in `mode` with these figures (what settlement leaves); its id."""
    with transaction(factory) as session:
        budget = budgets.get_budget(session, budget_id)
        start, end = period_bounds(budget.period, at)
        row = session.scalar(
            select(BudgetPeriod).where(
                BudgetPeriod.budget_id == budget_id, BudgetPeriod.mode == mode, BudgetPeriod.period_start == start
            )
        )
        if row is None:
            row = BudgetPeriod(budget_id=budget_id, mode=mode, period_start=start, period_end=end)
            session.add(row)
        row.spent_micro_usd = spent
        row.reserved_micro_usd = reserved
        session.flush()
        return row.id


def detect(factory: Factory, now: datetime = NOW) -> list[int]:
    with transaction(factory) as session:
        return alerts.detect_budget_alerts(session, now)


def events(factory: Factory) -> list[AlertEvent]:
    with factory() as session:
        return list(session.scalars(select(AlertEvent).order_by(AlertEvent.id)))


# --- budget thresholds --------------------------------------------------------------------------------------


def test_default_thresholds_fire_once_each_on_spent_live_and_simulated_apart(db_session_factory: Factory) -> None:
    budget_id = make_budget(db_session_factory, "team monthly", 10 * USD)
    live = set_spent(db_session_factory, budget_id, 4_999_999, reserved=5 * USD)
    assert detect(db_session_factory) == []  # 49.99999 % spent: reserved money does not count

    set_spent(db_session_factory, budget_id, 5 * USD)
    first = detect(db_session_factory)
    assert len(first) == 1
    assert detect(db_session_factory) == []  # the same crossing seen again fires nothing

    set_spent(db_session_factory, budget_id, 10 * USD)  # 80 and 100 crossed at once: one alert each
    assert len(detect(db_session_factory)) == 2
    simulated = set_spent(db_session_factory, budget_id, 8 * USD, mode=SpendMode.SIMULATED)
    assert len(detect(db_session_factory)) == 2  # 50 and 80 of the simulated row, its own period row

    rows = events(db_session_factory)
    assert [(e.dedupe_key, e.spent_micro_usd, e.limit_micro_usd) for e in rows] == [
        (f"budget:{live}:50", 5 * USD, 10 * USD),
        (f"budget:{live}:80", 10 * USD, 10 * USD),
        (f"budget:{live}:100", 10 * USD, 10 * USD),
        (f"budget:{simulated}:50", 8 * USD, 10 * USD),
        (f"budget:{simulated}:80", 8 * USD, 10 * USD),
    ]
    assert rows[0].title == (
        "team monthly: 50% of its monthly live limit reached ($5.000000 spent of $10.000000, period from 2026-03-01)"
    )
    assert "monthly simulated limit" in rows[3].title
    assert all(e.kind == "budget_threshold" and e.delivery_status == "no_webhooks" for e in rows)
    assert rows[0].details["mode"] == "live" and rows[3].details["mode"] == "simulated"


def test_deleted_or_inactive_budgets_and_old_periods_do_not_fire(db_session_factory: Factory) -> None:
    gone = make_budget(db_session_factory, "gone", 10 * USD)
    set_spent(db_session_factory, gone, 10 * USD)
    with transaction(db_session_factory) as session:
        budgets.delete_budget(session, SYSTEM, gone)
    assert detect(db_session_factory) == []
    daily = make_budget(db_session_factory, "daily", 1 * USD, period="daily")
    set_spent(db_session_factory, daily, 1 * USD)
    # The period ended 2 hours before: past the grace, it is history, not news.
    assert detect(db_session_factory, NOW + timedelta(hours=14)) == []
    # Within an hour of its end it still fires (a crossing in the period's last minutes).
    assert len(detect(db_session_factory, NOW + timedelta(hours=12, minutes=30))) == 3


def test_thresholds_per_budget_authorized_from_the_database_and_audited(db_session_factory: Factory) -> None:
    admin = make_user(db_session_factory, "admin", Role.ADMIN)
    hero = make_user(db_session_factory, "hero", Role.HERO)
    user = make_user(db_session_factory, "user", Role.USER)
    retired = make_user(db_session_factory, "retired", Role.ADMIN, active=False)
    forged = Actor(user.user_id, "user", Role.ADMIN)  # a role claim grants nothing
    budget_id = make_budget(db_session_factory)
    with db_session_factory() as session:
        assert alerts.thresholds(session, budget_id) == ((50, 80, 100), True)

    for who, reason in ((user, "USER"), (forged, "USER"), (retired, "deactivated")):
        with pytest.raises(PermissionDenied, match=reason), transaction(db_session_factory) as session:
            alerts.set_thresholds(session, who, budget_id, [10])
    with pytest.raises(InvalidInput, match="whole percentage"), transaction(db_session_factory) as session:
        alerts.set_thresholds(session, admin, budget_id, [0])
    with pytest.raises(NotFound), transaction(db_session_factory) as session:
        alerts.set_thresholds(session, admin, 9999, [10])

    with transaction(db_session_factory) as session:
        assert alerts.set_thresholds(session, admin, budget_id, [90, 25, 25]) == (25, 90)
    with transaction(db_session_factory) as session:
        assert alerts.set_thresholds(session, hero, budget_id, [25, 90]) == (25, 90)  # no change: no audit row
    with db_session_factory() as session:
        assert alerts.thresholds(session, budget_id) == ((25, 90), False)
        audits = session.scalars(select(AuditLog).where(AuditLog.action == "budget.alert_thresholds")).all()
        assert [(a.actor_name, a.actor_role, a.before, a.after) for a in audits] == [
            (
                "admin",
                "ADMIN",
                {"thresholds": [50, 80, 100], "default": True},
                {"thresholds": [25, 90], "default": False},
            )
        ]
    live = set_spent(db_session_factory, budget_id, 8 * USD)
    assert len(detect(db_session_factory)) == 1
    (event,) = events(db_session_factory)
    assert event.dedupe_key == f"budget:{live}:25"
    with db_session_factory() as session:
        rule = session.scalar(
            select(AlertRule).where(AlertRule.budget_id == budget_id, AlertRule.threshold_percent == 25)
        )
        assert rule is not None and event.rule_id == rule.id

    # An empty list switches the budget's threshold alerts off (the defaults do not come back).
    with transaction(db_session_factory) as session:
        assert alerts.set_thresholds(session, admin, budget_id, []) == ()
    set_spent(db_session_factory, budget_id, 10 * USD)
    assert detect(db_session_factory) == []
    with db_session_factory() as session:
        assert alerts.thresholds(session, budget_id) == ((), False)


# --- breaker and anomaly alerts -------------------------------------------------------------------------------


def _breaker(factory: Factory, state: CircuitState, since: datetime) -> None:
    with transaction(factory) as session:
        row = session.get(CircuitStateRow, "ideogram")
        if row is None:
            row = CircuitStateRow(provider="ideogram")
            session.add(row)
        row.state = state
        row.since = since
        row.reason = "5 failures in a row (unavailable)"
        row.last_error_class = "unavailable"
        row.opened_count = (row.opened_count or 0) + (1 if state is CircuitState.OPEN else 0)


def test_breaker_open_alerts_once_per_outage(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        assert alerts.detect_breaker_alerts(session, NOW) == []  # every breaker closed (no rows)
    opened = NOW - timedelta(minutes=3)
    _breaker(db_session_factory, CircuitState.OPEN, opened)
    with transaction(db_session_factory) as session:
        assert len(alerts.detect_breaker_alerts(session, NOW)) == 1
    _breaker(db_session_factory, CircuitState.HALF_OPEN, opened)  # the same outage, probing
    with transaction(db_session_factory) as session:
        assert alerts.detect_breaker_alerts(session, NOW) == []
    _breaker(db_session_factory, CircuitState.CLOSED, NOW)
    _breaker(db_session_factory, CircuitState.OPEN, NOW + timedelta(minutes=10))  # a new outage
    with transaction(db_session_factory) as session:
        assert len(alerts.detect_breaker_alerts(session, NOW + timedelta(minutes=11))) == 1
    first, second = events(db_session_factory)
    assert first.kind == second.kind == "breaker_open" and first.provider == "ideogram"
    assert first.dedupe_key == "breaker:ideogram:2026-03-14T11:57:00+00:00"
    assert first.title == (
        "ideogram: circuit breaker opened at 2026-03-14 11:57:00 UTC (5 failures in a row (unavailable))"
    )
    assert second.dedupe_key == "breaker:ideogram:2026-03-14T12:10:00+00:00"


def _rollup(
    factory: Factory,
    day: date,
    micros: int,
    *,
    mode: str = "live",
    provider: str = "fal-qwen",
    status: str = "succeeded",
) -> None:
    with transaction(factory) as session:
        session.add(
            UsageDailyRollup(
                day=day, provider=provider, user_id=0, mode=mode, status=status, error_class="",
                attempts=1, actual_micro_usd=micros, estimated_micro_usd=micros,
            )
        )  # fmt: skip


def test_spend_anomaly_from_rollups_with_hand_checked_figures(db_session_factory: Factory) -> None:
    today = NOW.date()
    # Live history: 7 days at $6 and 7 days at $10 (spread over two providers on some days) -> the median of
    # the 14 days is ($6 + $10) / 2 = $8, above the $5 floor; 3 x $8 = $24 a day is the alarm line.
    for i in range(1, 15):
        amount = 6 * USD if i % 2 else 10 * USD
        if i == 2:
            _rollup(db_session_factory, today - timedelta(days=i), 4 * USD)
            _rollup(db_session_factory, today - timedelta(days=i), 6 * USD, provider="ideogram")
        else:
            _rollup(db_session_factory, today - timedelta(days=i), amount)
    _rollup(db_session_factory, today - timedelta(days=15), 1000 * USD)  # outside the 14 days: ignored
    six_am = NOW.replace(hour=6)  # a quarter of the day gone: the day's pace is 4 x the spend so far
    _rollup(db_session_factory, today, 6 * USD)  # projected exactly $24: not above 3 x $8
    # Simulated (emulator + sandbox rows): no history, so the floor: 3 x $5 = $15 a day.
    _rollup(db_session_factory, today, 3 * USD, mode="emulator")
    _rollup(db_session_factory, today, 750_000, mode="sandbox")  # $3.75 so far -> projected exactly $15
    with transaction(db_session_factory) as session:
        assert alerts.detect_spend_anomalies(session, six_am) == []
    _rollup(db_session_factory, today, 1, provider="ideogram")  # $6.000001 -> $24.000004 a day: above
    _rollup(
        db_session_factory, today, 1, mode="sandbox", status="failed"
    )  # billed, then failed: $3.750001 -> $15.000004 a day: above
    with transaction(db_session_factory) as session:
        created = alerts.detect_spend_anomalies(session, six_am)
    assert len(created) == 2
    with transaction(db_session_factory) as session:
        assert alerts.detect_spend_anomalies(session, six_am + timedelta(hours=1)) == []  # once per day and mode
    live, simulated = events(db_session_factory)
    assert live.dedupe_key == "anomaly:live:2026-03-14" and simulated.dedupe_key == "anomaly:simulated:2026-03-14"
    assert live.details | {} == {
        "mode": "live",
        "day": "2026-03-14",
        "spent_today_micro_usd": 6_000_001,
        "projected_micro_usd": 24_000_004,
        "median_micro_usd": "8000000",
        "usual_micro_usd": "8000000",
        "floor_micro_usd": 5_000_000,
        "factor": 3,
        "trailing_days": 14,
        "elapsed_s": 21_600,
    }
    assert live.title == (
        "live spend today is running at $24.000004/day ($6.000001 so far), over 3x the usual $8.000000/day "
        "(median of the last 14 days: $8.000000)"
    )
    assert simulated.details["usual_micro_usd"] == "5000000" and simulated.details["median_micro_usd"] == "0"


def test_anomaly_extrapolates_over_at_least_an_hour(db_session_factory: Factory) -> None:
    today = NOW.date()
    midnight = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    _rollup(db_session_factory, today, 625_000)  # 10 minutes in: $0.625 -> over one hour, $15 a day
    config = AnomalyConfig(floor_micro_usd=5 * USD)
    with transaction(db_session_factory) as session:
        assert alerts.detect_spend_anomalies(session, midnight + timedelta(minutes=10), config) == []
    _rollup(db_session_factory, today, 1, status="failed")
    with transaction(db_session_factory) as session:
        assert len(alerts.detect_spend_anomalies(session, midnight + timedelta(minutes=10), config)) == 1


# --- in-app reading -------------------------------------------------------------------------------------------


def test_in_app_visibility_unread_and_read_marks(db_session_factory: Factory) -> None:
    admin = make_user(db_session_factory, "admin", Role.ADMIN)
    hero = make_user(db_session_factory, "hero", Role.HERO)
    ann = make_user(db_session_factory, "ann", Role.USER)
    bob = make_user(db_session_factory, "bob", Role.USER)
    team = make_budget(db_session_factory, "team", 10 * USD)
    anns = make_budget(db_session_factory, "ann's", 2 * USD, scope="user", scope_id=ann.user_id)
    set_spent(db_session_factory, team, 5 * USD)
    set_spent(db_session_factory, anns, 1 * USD)
    _breaker(db_session_factory, CircuitState.OPEN, NOW)
    assert alerts.detect_alerts(db_session_factory, NOW) == 3

    with db_session_factory() as session:
        titles = [a.title.split(":")[0] for a in alerts.list_alerts(session, admin)]
        assert sorted(titles) == ["ann's", "ideogram", "team"]
        with pytest.raises(InvalidInput, match="unknown alert kind ''") as refused:
            alerts.list_alerts(session, admin, kind="")
        assert "kind" in refused.value.field_errors
        assert alerts.unread_count(session, admin) == alerts.unread_count(session, hero) == 3
        (own,) = alerts.list_alerts(session, ann)
        assert own.title.startswith("ann's: 50%") and not own.read
        assert alerts.list_alerts(session, bob) == [] and alerts.unread_count(session, bob) == 0
        assert len(alerts.list_alerts(session, SYSTEM)) == 3
        with pytest.raises(InvalidInput, match="read marks belong to an account"):
            alerts.list_alerts(session, SYSTEM, unread_only=True)
        team_alert = next(a for a in alerts.list_alerts(session, admin) if a.title.startswith("team"))

    with transaction(db_session_factory) as session, pytest.raises(NotFound):
        alerts.mark_read(session, bob, [own.id])  # not his: the same answer as no such alert
    with transaction(db_session_factory) as session:
        assert alerts.mark_read(session, admin, [team_alert.id]) == 1
    with transaction(db_session_factory) as session:
        assert alerts.mark_read(session, admin, [team_alert.id]) == 0  # already read
    with db_session_factory() as session:
        assert alerts.unread_count(session, admin) == 2
        assert alerts.unread_count(session, hero) == 3  # read marks are per user
        unread = alerts.list_alerts(session, admin, unread_only=True)
        assert team_alert.id not in {a.id for a in unread} and len(unread) == 2
        assert [a.read for a in alerts.list_alerts(session, admin) if a.id == team_alert.id] == [True]
        assert [a.kind for a in alerts.list_alerts(session, admin, kind="breaker_open")] == [AlertKind.BREAKER_OPEN]
    with transaction(db_session_factory) as session:
        assert alerts.mark_all_read(session, admin) == 2
        assert alerts.mark_all_read(session, ann) == 1
    with db_session_factory() as session:
        assert alerts.unread_count(session, admin) == 0 and alerts.unread_count(session, ann) == 0
        assert alerts.unread_count(session, hero) == 3

    with transaction(db_session_factory) as session:  # a deactivated account reads nothing
        account = session.get(User, hero.user_id)
        assert account is not None
        account.active = False
    with db_session_factory() as session, pytest.raises(PermissionDenied, match="deactivated"):
        alerts.list_alerts(session, hero)


def test_an_alert_fans_out_to_subscribed_webhooks_only(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        session.add_all(
            [
                Webhook(name="all", url="https://hooks.example.com/a", events=[], signing_secret="s1"),
                Webhook(
                    name="budgets", url="https://hooks.example.com/b", events=["budget_threshold"], signing_secret="s2"
                ),
                Webhook(name="off", url="https://hooks.example.com/c", events=[], signing_secret="s3", active=False),
            ]
        )
    budget_id = make_budget(db_session_factory)
    set_spent(db_session_factory, budget_id, 5 * USD)
    _breaker(db_session_factory, CircuitState.OPEN, NOW)
    assert alerts.detect_alerts(db_session_factory, NOW) == 2
    with db_session_factory() as session:
        rows = session.execute(
            select(AlertEvent.kind, Webhook.name, WebhookDelivery.status, WebhookDelivery.payload)
            .join(AlertEvent, AlertEvent.id == WebhookDelivery.alert_event_id)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .order_by(AlertEvent.id, Webhook.id)
        ).all()
        assert [(kind, name, status) for kind, name, status, _ in rows] == [
            ("budget_threshold", "all", "pending"),
            ("budget_threshold", "budgets", "pending"),
            ("breaker_open", "all", "pending"),
        ]
        payload = rows[0][3]
        assert payload["type"] == "budget_threshold" and payload["alert"]["kind"] == "budget_threshold"
        assert payload["alert"]["details"]["threshold_percent"] == 50
        assert payload["alert"]["spent_micro_usd"] == 5 * USD
        assert (
            session.scalar(select(func.count()).select_from(AlertEvent).where(AlertEvent.delivery_status == "pending"))
            == 2
        )


def test_detect_alerts_counts_one_pass(db_session_factory: Factory) -> None:
    budget_id = make_budget(db_session_factory, period=BudgetPeriodKind.DAILY.value, limit=1 * USD)
    set_spent(db_session_factory, budget_id, 1 * USD)
    assert alerts.detect_alerts(db_session_factory, NOW) == 3
    assert alerts.detect_alerts(db_session_factory, NOW) == 0
