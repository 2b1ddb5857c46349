"""One migrator at a time: every process upgrades the schema at start, so the upgrade holds a database lock.

Without it, processes starting together on a fresh database all see "no version table" and all create the same
tables: on PostgreSQL 3 of 4 crashed with UniqueViolation, on SQLite about half the trials lost one to "table
already exists". With the lock the first starter migrates; the others wait, then find the schema at head.

- PostgreSQL: a session-level advisory lock on a fixed key (advisory locks are per database), taken on the
  migration connection before Alembic reads the version table and released after its transaction commits. The
  server drops it when the connection dies, so a crashed migrator never leaves it held.
- SQLite: `BEGIN IMMEDIATE` on the migration connection, i.e. SQLite's own write lock, held until the upgrade
  commits. The whole upgrade is then one transaction (SQLite's DDL is transactional), so a crash mid-upgrade
  rolls it back. Chosen over a lock file beside the database: it works for any SQLite path, needs no file
  permissions or clean-up, and cannot be left stale by a killed process.

A starter waits at most `LOCK_WAIT_S` for the lock, then fails with a message saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, exc, text

from common.errors import DatabaseUnavailable
from db.engine import SQLITE_BUSY_TIMEOUT_MS

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = int.from_bytes(b"imgt-mig", "big")
"""A fixed 64-bit key ("imgt-mig"): every Imagegate process asks for the same lock."""
LOCK_WAIT_S = 600
"""How long a starter waits for another process's upgrade; generous, since a real migration may copy tables."""


def _waited_too_long(error: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"another process has been upgrading the database schema for over {LOCK_WAIT_S} s "
        f"(the migration lock is still held): {error}"
    )


@contextmanager
def _postgres_lock(connection: Connection, owns_transaction: bool) -> Iterator[None]:
    try:
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_S}s'"))
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        if not owns_transaction:
            connection.execute(text("SET LOCAL lock_timeout TO DEFAULT"))
    except exc.OperationalError as error:
        if owns_transaction:
            connection.rollback()
        if "lock timeout" in str(error.orig).lower():
            raise _waited_too_long(error) from error
        raise
    if owns_transaction:
        # The session-level lock outlives this commit; Alembic then runs its own transaction.
        connection.commit()
    try:
        yield
    finally:
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
            if owns_transaction:
                connection.commit()
        except exc.DBAPIError:
            # A broken connection: the server released the lock with it. Never hide the upgrade's own error.
            log.warning("could not release the migration lock; it goes with the connection", exc_info=True)


@contextmanager
def _sqlite_lock(connection: Connection, owns_transaction: bool) -> Iterator[None]:
    driver = connection.connection.driver_connection
    if driver is not None and getattr(driver, "in_transaction", False):
        # The caller already writes in a transaction of its own: that transaction is the lock.
        yield
        return
    connection.exec_driver_sql(f"PRAGMA busy_timeout = {LOCK_WAIT_S * 1000}")
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    except exc.OperationalError as error:
        if owns_transaction:
            connection.rollback()
        if "locked" in str(error.orig).lower():
            raise _waited_too_long(error) from error
        raise
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    try:
        yield
    except BaseException:
        if owns_transaction:
            connection.rollback()
        raise
    if owns_transaction:
        connection.commit()


@contextmanager
def upgrade_lock(connection: Connection) -> Iterator[None]:
    """Hold the database's migration lock on `connection` while the block runs Alembic on it.

    On a connection with no transaction open, the lock's transaction is this function's: on SQLite the upgrade
    runs inside it and is committed (or rolled back) here. A connection already in a transaction is the
    caller's: nothing is committed for it."""
    owns_transaction = not connection.in_transaction()
    dialect = connection.dialect.name
    if dialect == "postgresql":
        with _postgres_lock(connection, owns_transaction):
            yield
    elif dialect == "sqlite":
        with _sqlite_lock(connection, owns_transaction):
            yield
    else:
        yield
