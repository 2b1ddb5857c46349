"""Migrations: round trips on both databases, models and migrated schema in agreement, any working directory."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from db import migrate
from db.engine import make_engine
from db.models import Base
from db.upgrade_lock import upgrade_lock
from tests.dbfixtures import create_pg_database, drop_pg_database

EXPECTED_TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    assert migrate.current_revision(url) is None
    migrate.upgrade(url)
    assert migrate.current_revision(url) == migrate.head_revision()
    assert _tables(url) == EXPECTED_TABLES
    assert migrate.schema_diff(url) == []

    migrate.downgrade(url, "base")
    assert migrate.current_revision(url) is None
    assert _tables(url) == set()

    migrate.upgrade(url)
    assert _tables(url) == EXPECTED_TABLES
    assert migrate.schema_diff(url) == []


def test_round_trip_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'rt.db'}")


@pytest.mark.postgres
def test_round_trip_postgresql(pg_admin_dsn: str) -> None:
    name, url = create_pg_database(pg_admin_dsn, prefix="imagegate_migrations")
    try:
        _round_trip(url)
    finally:
        drop_pg_database(pg_admin_dsn, name)


def test_schema_diff_sees_a_missing_index(db_url: str) -> None:
    """The agreement check can fail: drop one index the models declare and it is reported."""
    assert migrate.schema_diff(db_url) == []
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_usage_attempts_provider_request"))
    engine.dispose()
    diff = migrate.schema_diff(db_url)
    assert any(op[0] == "add_index" and op[1].name == "ix_usage_attempts_provider_request" for op in diff)


def test_upgrade_works_from_any_working_directory(tmp_path: Path) -> None:
    db_file = tmp_path / "elsewhere.db"
    code = f"from db.migrate import upgrade; upgrade('sqlite:///{db_file}')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert _tables(f"sqlite:///{db_file}") == EXPECTED_TABLES


def test_default_url_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db_file = tmp_path / "from-env.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db_file}")
    migrate.upgrade()
    assert migrate.current_revision() == migrate.head_revision()
    assert db_file.exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def never_migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend in turn, never migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'never-migrated.db'}"
        return
    admin_dsn = request.getfixturevalue("pg_admin_dsn")
    name, url = create_pg_database(admin_dsn, prefix="imagegate_lock")
    try:
        yield url
    finally:
        drop_pg_database(admin_dsn, name)


def test_an_upgrade_waits_while_another_holds_the_migration_lock(never_migrated_url: str) -> None:
    """What keeps processes starting together from migrating twice (tests/db/test_concurrent_start.py races
    real processes): while one connection holds the lock, another process's upgrade does nothing, then runs."""
    url = never_migrated_url
    finished = threading.Event()
    errors: list[BaseException] = []

    def upgrade_elsewhere() -> None:
        try:
            migrate.upgrade(url)
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    engine = make_engine(url)
    try:
        with engine.connect() as connection, upgrade_lock(connection):
            waiting = threading.Thread(target=upgrade_elsewhere)
            waiting.start()
            assert not finished.wait(1.0), errors  # held back by the lock
            assert migrate.current_revision(url) is None
    finally:
        engine.dispose()
    waiting.join(timeout=120)
    assert finished.is_set() and errors == []
    assert migrate.current_revision(url) == migrate.head_revision()
