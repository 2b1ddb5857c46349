"""Engines, sessions and transactions for SQLite (embedded default) and PostgreSQL (shared store).

SQLite gets WAL (readers never block the writer), a busy timeout (concurrent writers wait instead of failing at
once) and foreign keys (off by default in SQLite) on every new DBAPI connection. PostgreSQL goes through
psycopg 3. PostgreSQL pools ping before handing out a connection, so a server restart costs one reconnect
instead of an error (SQLite has no server to lose and does not ping), and a database that is really gone raises
`DatabaseUnavailable` with a message a person can act on.

Concurrency note for writers: Python 3.11's sqlite3 opens a transaction at the first write, not the first read,
so on SQLite a read-then-write sequence is not isolated. Code that must not race therefore relies on what holds
on both databases: single atomic statements (`UPDATE ... SET x = x + :n WHERE x + :n <= :limit`) and unique
constraints (settings versions, the first-admin flag, one alert per period), turning a lost race into a clear
error instead of a silent double write.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from common.config import database_url
from common.errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
PG_PING_AFTER_IDLE_S = 1.0
"""A pooled PostgreSQL connection idle longer than this is pinged before it is handed out (see `_ping_if_idle`)."""


def normalize_url(url: str) -> str:
    """Accept the common `postgresql://` / `postgres://` spellings and use psycopg 3, the driver we ship."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def _set_wal(cursor: Any) -> None:
    """Switch to WAL. On a new file the switch takes an exclusive lock and SQLite does not wait for it (no busy
    handler), so processes opening a fresh database at once got "database is locked": retry within the busy
    timeout. Once the file is in WAL (a persistent setting) this is a no-op."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # In-memory databases cannot use WAL; asking is harmless (SQLite answers "memory").
        _set_wal(cursor)
        # WAL + synchronous=NORMAL: a commit is appended to the WAL without an fsync (the WAL is synced at each
        # checkpoint). It never corrupts the database; a crash of the process loses nothing (the commit is in
        # the OS's file cache); a power loss or OS crash may lose the last commits before the next checkpoint,
        # never half of one. FULL would fsync at every commit (one per attempt end) for that last case only.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for `url`, or for `common.config.database_url()` when none is given. Only SQLite and
    PostgreSQL are supported: every race guard relies on their locking and upsert semantics."""
    resolved = normalize_url(url or database_url())
    backend = make_url(resolved).get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise DatabaseUnavailable(
            f"Imagegate runs on SQLite or PostgreSQL, not {backend} ({safe_url(resolved)}): set DATABASE_URL to a "
            "postgresql:// URL, or unset it for the embedded SQLite file"
        )
    # PostgreSQL pings a pooled connection that sat idle before handing it out (`_ping_if_idle`): a server
    # restart then costs a reconnect, not a failed request (most transactions are not safe to re-run blindly).
    # SQLite has no server to lose: its "ping" was a SELECT 1 per checkout for nothing.
    options: dict[str, Any] = {}
    if backend == "sqlite":
        options["connect_args"] = {
            # Sessions may be used from the thread pool of an async app or Streamlit's script threads;
            # the pool still hands one connection to one user at a time.
            "check_same_thread": False,
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        }
    elif backend == "postgresql":
        options["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        if "poolclass" not in kwargs:
            options["pool_size"] = 5
            options["max_overflow"] = 10
    options.update(kwargs)
    engine = create_engine(resolved, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _on_sqlite_connect)
    elif "pool_pre_ping" not in kwargs:
        event.listen(engine.pool, "checkin", _note_checkin)
        event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Ping a connection that sat in the pool longer than PG_PING_AFTER_IDLE_S; a dead one is replaced
    (`DisconnectionError` makes the pool connect anew and try again).

    SQLAlchemy's `pool_pre_ping` pings at every checkout: one more round trip per transaction, four per
    generation, for connections that served a request a moment ago. A server restart or an idle timeout
    finds connections that sat idle, and those are still pinged; a connection that dies within a second of
    its last use fails its next transaction as it would have failed mid-transaction anyway."""
    checked_in_at = record.info.get("checked_in_at")
    if checked_in_at is None or time.monotonic() - checked_in_at < PG_PING_AFTER_IDLE_S:
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        dbapi_connection.rollback()  # the ping opened a transaction (the driver is not in autocommit)
    except Exception as error:  # any failure means this connection cannot serve: the pool replaces it
        raise exc.DisconnectionError(f"a pooled connection failed its ping: {error}") from error


def dialect_insert(session: Session, table: Any) -> Any:
    """INSERT for the session's database with its ON CONFLICT clauses (`on_conflict_do_nothing`,
    `on_conflict_do_update`): the race-safe upserts every shared-state module uses."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)  # make_engine admits only these two


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects returned by a service stay readable after its transaction commits.
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def _is_connection_failure(error: exc.DBAPIError) -> bool:
    if error.connection_invalidated:
        return True
    if isinstance(error, exc.InterfaceError):
        return True
    if isinstance(error, exc.OperationalError):
        message = str(error.orig).lower()
        return any(
            marker in message
            for marker in (
                "connection refused",
                "connection failed",
                "could not connect",
                "server closed the connection",
                "terminating connection",
                "unable to open database file",
                "does not exist",
                "timeout expired",
            )
        )
    return False


def _unavailable(engine_url: str, error: BaseException) -> DatabaseUnavailable:
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    return DatabaseUnavailable(f"cannot reach the database at {safe_url(engine_url)}: {reason}")


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: everything inside commits together, or nothing does (any exception rolls back)."""
    session = factory()
    try:
        yield session
        session.commit()
    except exc.DBAPIError as error:
        session.rollback()
        if _is_connection_failure(error):
            url = session.get_bind().engine.url.render_as_string(hide_password=False)
            raise _unavailable(url, error) from error
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_connection(engine: Engine) -> None:
    """Raise `DatabaseUnavailable` unless a trivial query succeeds (app start, `imagegate db check`)."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except exc.DBAPIError as error:
        raise _unavailable(engine.url.render_as_string(hide_password=False), error) from error
