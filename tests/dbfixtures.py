"""Database fixtures any test folder can use: `from tests.dbfixtures import *  # noqa: F403` in a conftest.py.

- `db_session_factory` (and `db_engine`, `db_url`) run each test on SQLite AND on PostgreSQL, each starting
  from a freshly migrated, empty schema. `sqlite_session_factory` is the SQLite-only variant.
- PostgreSQL: one uniquely named database per test session (`imagegate_test_<pid>_<random>`), created through
  the `postgres` maintenance database, migrated once, emptied before every test, dropped at the end; no
  shared database is ever touched. Unreachable server: the tests skip, or FAIL when CI=true.
- SQLite: migrated once into a template file, copied per test (much faster than migrating each time).
- `fast_password_hashing`: argon2 with minimal cost, for tests that create many users.
- `recorded_statements(engine)`: the SQL statements an engine sends while the block runs.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from psycopg import sql
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core import security
from db import migrate
from db.engine import make_engine, session_factory
from db.models import Base

__all__ = [
    "db_engine",
    "db_session_factory",
    "db_url",
    "fast_password_hashing",
    "pg_admin_dsn",
    "pg_session_database",
    "sqlite_session_factory",
    "sqlite_template",
]

PG_HOST = os.environ.get("IMAGEGATE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IMAGEGATE_TEST_PG_PORT", "5432"))
PG_USERS = ("postgres", "root")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def find_pg_admin_dsn() -> str | None:
    """A libpq DSN for the `postgres` maintenance database, or None when the server is unreachable."""
    for user in PG_USERS:
        dsn = f"host={PG_HOST} port={PG_PORT} user={user} dbname=postgres connect_timeout=3"
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return dsn
        except psycopg.Error:
            continue
    return None


def _sqlalchemy_url(admin_dsn: str, database: str) -> str:
    user = dict(part.split("=", 1) for part in admin_dsn.split())["user"]
    return f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{database}"


def create_pg_database(admin_dsn: str, prefix: str = "imagegate_test") -> tuple[str, str]:
    """Create an empty, uniquely named database: (name, SQLAlchemy URL)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, _sqlalchemy_url(admin_dsn, name)


def drop_pg_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def require_pg(dsn: str | None) -> str:
    """The DSN, or skip the test (FAIL it under CI=true) because PostgreSQL is unreachable."""
    if dsn is None:
        message = f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} (users tried: {', '.join(PG_USERS)})"
        if _in_ci():
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return dsn


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    return require_pg(find_pg_admin_dsn())


@pytest.fixture(scope="session")
def pg_session_database(pg_admin_dsn: str) -> Iterator[str]:
    """URL of this test session's own PostgreSQL database, migrated to head."""
    name, url = create_pg_database(pg_admin_dsn)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_pg_database(pg_admin_dsn, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db-template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    # Fold the WAL back into the main file so a plain file copy carries the whole schema.
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


# DELETE, children first: on tables this small it is far cheaper than TRUNCATE, which recreates every file.
_EMPTY_ALL = "; ".join(f'DELETE FROM "{t.name}"' for t in reversed(Base.metadata.sorted_tables))


def _fresh_sqlite(template: Path, directory: Path, name: str = "imagegate.db") -> str:
    target = directory / name
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def _fresh_pg(url: str) -> str:
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(_EMPTY_ALL)
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on each backend in turn."""
    if request.param == "sqlite":
        return _fresh_sqlite(request.getfixturevalue("sqlite_template"), tmp_path)
    return _fresh_pg(request.getfixturevalue("pg_session_database"))


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session_factory(db_engine: Engine) -> sessionmaker[Session]:
    return session_factory(db_engine)


@pytest.fixture
def sqlite_session_factory(sqlite_template: Path, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(_fresh_sqlite(sqlite_template, tmp_path, "sqlite-only.db"))
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def fast_password_hashing() -> Iterator[None]:
    previous = security.set_password_hasher(PasswordHasher.from_parameters(CHEAPEST))
    yield
    security.set_password_hasher(previous)


@contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements `engine` sends while the block runs (for tests that count reads and writes)."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)
