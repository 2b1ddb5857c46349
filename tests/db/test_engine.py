"""Engine set-up, transactions, dead databases and the schema's own guarantees, on both databases."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, exc, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from common.errors import DatabaseUnavailable
from db.engine import check_connection, make_engine, normalize_url, session_factory, transaction
from db.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    AlertEvent,
    AlertRule,
    Budget,
    BudgetPeriod,
    BudgetPeriodKind,
    BudgetScope,
    Generation,
    ProviderSettingsCurrent,
    ProviderSettingsVersion,
    Role,
    UsageAttempt,
    UsageDailyRollup,
    User,
)
from tests.dbfixtures import _fresh_pg


def test_sqlite_connections_get_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    engine.dispose()


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert make_engine("postgresql://u@127.0.0.1:1/db").dialect.driver == "psycopg"


def test_dead_database_gives_a_clear_error() -> None:
    engine = make_engine("postgresql://someone:hunter2secret@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable) as caught:
        check_connection(engine)
    message = str(caught.value)
    assert "cannot reach the database" in message and "127.0.0.1:1/nowhere" in message
    assert "hunter2secret" not in message  # the password never reaches a message
    with pytest.raises(DatabaseUnavailable), transaction(session_factory(engine)) as session:
        session.execute(text("SELECT 1"))
    engine.dispose()


def test_transaction_commits_or_rolls_back_whole(db_session_factory: sessionmaker[Session]) -> None:
    with transaction(db_session_factory) as session:
        session.add(User(username="kept", password_hash="x", role=Role.USER))
    with pytest.raises(RuntimeError), transaction(db_session_factory) as session:
        session.add(User(username="lost", password_hash="x", role=Role.USER))
        session.flush()
        raise RuntimeError("boom")
    with db_session_factory() as session:
        assert session.scalars(select(User.username)).all() == ["kept"]


def test_timestamps_are_utc_aware_and_naive_ones_are_refused(db_session_factory: sessionmaker[Session]) -> None:
    cest = timezone(timedelta(hours=2))
    with transaction(db_session_factory) as session:
        session.add(
            User(username="tz", password_hash="x", role=Role.USER, created_at=datetime(2026, 6, 1, 12, tzinfo=cest))
        )
    with db_session_factory() as session:
        created = session.scalars(select(User.created_at)).one()
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert created == datetime(2026, 6, 1, 10, tzinfo=UTC)
    with pytest.raises(exc.StatementError, match="naive datetime"), transaction(db_session_factory) as session:
        session.add(User(username="naive", password_hash="x", role=Role.USER, created_at=datetime(2026, 6, 1)))
        session.flush()


def test_money_columns_hold_large_exact_amounts(db_session_factory: sessionmaker[Session]) -> None:
    huge = 9_000_000_000_000_000  # 9 billion dollars in micro-dollars: beyond 32-bit, exact in BIGINT
    with transaction(db_session_factory) as session:
        gen = Generation(prompt="p", routing_policy="priority", status="succeeded", final_cost_micro_usd=huge)
        session.add(gen)
        session.flush()
        session.add(
            UsageAttempt(
                generation_id=gen.id,
                attempt_no=1,
                provider="sandbox",
                status="succeeded",
                estimated_micro_usd=huge,
                actual_micro_usd=huge - 1,
            )
        )
    with db_session_factory() as session:
        attempt = session.scalars(select(UsageAttempt)).one()
        assert (attempt.estimated_micro_usd, attempt.actual_micro_usd) == (huge, huge - 1)


def test_at_most_one_default_provider_is_a_database_rule(db_session_factory: sessionmaker[Session]) -> None:
    with transaction(db_session_factory) as session:
        for provider in ("sandbox", "qwen"):
            version = ProviderSettingsVersion(provider=provider, version=1, settings={}, created_by_name="t")
            session.add(version)
            session.flush()
            session.add(
                ProviderSettingsCurrent(
                    provider=provider,
                    current_version_id=version.id,
                    version=1,
                    active=True,
                    is_default=False,
                    priority=1,
                )
            )
    with pytest.raises(exc.IntegrityError), transaction(db_session_factory) as session:
        for pointer in session.scalars(select(ProviderSettingsCurrent)):
            pointer.is_default = True
        session.flush()


def _threshold_event(rule_id: int, period_id: int, *, key: str, spent: int) -> AlertEvent:
    return AlertEvent(
        kind="budget_threshold",
        dedupe_key=key,
        rule_id=rule_id,
        budget_period_id=period_id,
        title="80 % of g",
        spent_micro_usd=spent,
        limit_micro_usd=10,
    )


def test_alert_fires_once_per_period_by_unique_key(db_session_factory: sessionmaker[Session]) -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with transaction(db_session_factory) as session:
        budget = Budget(name="g", scope=BudgetScope.GLOBAL, period=BudgetPeriodKind.MONTHLY, limit_micro_usd=10)
        session.add(budget)
        session.flush()
        rule = AlertRule(budget_id=budget.id, threshold_percent=80)
        period = BudgetPeriod(budget_id=budget.id, period_start=start, period_end=datetime(2026, 12, 1, tzinfo=UTC))
        session.add_all([rule, period])
        session.flush()
        session.add(_threshold_event(rule.id, period.id, key=f"budget:{period.id}:{rule.id}", spent=8))
    # The same crossing seen again (same dedupe key), or under another key for the same rule and period: refused.
    for key in (f"budget:{period.id}:{rule.id}", "another-key"):
        with pytest.raises(exc.IntegrityError), transaction(db_session_factory) as session:
            session.add(_threshold_event(rule.id, period.id, key=key, spent=9))
            session.flush()
    with pytest.raises(exc.IntegrityError), transaction(db_session_factory) as session:
        session.execute(text("UPDATE budget_periods SET reserved_micro_usd = -1"))


def test_foreign_keys_are_enforced(db_engine: Engine) -> None:
    factory = session_factory(db_engine)
    with pytest.raises(exc.IntegrityError), transaction(factory) as session:
        session.add(UsageAttempt(generation_id="no-such-generation", attempt_no=1, provider="sandbox", status="x"))
        session.flush()


def test_rollup_histogram_columns_match_bucket_bounds(db_session_factory: sessionmaker[Session]) -> None:
    assert len(LATENCY_BUCKET_COLUMNS) == len(LATENCY_BUCKET_BOUNDS_MS) + 1
    assert list(LATENCY_BUCKET_BOUNDS_MS) == sorted(set(LATENCY_BUCKET_BOUNDS_MS))
    columns = set(UsageDailyRollup.__table__.columns.keys())
    assert set(LATENCY_BUCKET_COLUMNS) <= columns
    with transaction(db_session_factory) as session:
        session.add(
            UsageDailyRollup(day=date(2026, 11, 27), provider="sandbox", user_id=0, mode="sandbox", status="succeeded")
        )
    with pytest.raises(exc.IntegrityError), transaction(db_session_factory) as session:
        session.add(
            UsageDailyRollup(day=date(2026, 11, 27), provider="sandbox", user_id=0, mode="sandbox", status="succeeded")
        )
        session.flush()
    with db_session_factory() as session:
        row = session.scalars(select(UsageDailyRollup)).one()
        assert all(getattr(row, name) == 0 for name in LATENCY_BUCKET_COLUMNS)


def test_only_sqlite_and_postgresql_are_accepted() -> None:
    # Every race guard relies on their locking and upserts; another database must be refused at the start with
    # a message that says what to do, not fail later inside a guard.
    with pytest.raises(DatabaseUnavailable, match="SQLite or PostgreSQL, not mysql") as refused:
        make_engine("mysql://someone:secret@127.0.0.1/imagegate")
    assert "secret" not in str(refused.value)


def _kill_backends(url: str, pids: set[int]) -> None:
    killer = make_engine(url, poolclass=NullPool)
    with killer.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    killer.dispose()


def test_postgresql_replaces_a_pooled_connection_that_died_while_idle(
    pg_session_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server restart (here: the backend killed) finds the pooled connection idle: it is pinged, found dead and
    replaced before the transaction starts, so the request does not fail. A connection used a moment ago is not
    pinged (no round trip per transaction); its death shows as the next transaction failing cleanly."""
    monkeypatch.setattr("db.engine.PG_PING_AFTER_IDLE_S", 0.2)
    url = _fresh_pg(pg_session_database)
    engine = make_engine(url, pool_size=1, max_overflow=0)
    factory = session_factory(engine)

    def backend_pid() -> int:
        with transaction(factory) as session:
            return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())

    first = backend_pid()
    _kill_backends(url, {first})
    time.sleep(0.3)  # idle past the threshold: pinged at checkout, found dead, replaced
    second = backend_pid()
    assert second != first

    _kill_backends(url, {second})  # killed right after use: not pinged, so this transaction fails...
    with pytest.raises(DatabaseUnavailable):
        backend_pid()
    assert backend_pid() not in {first, second}  # ...and the pool has let the dead connection go
    engine.dispose()
