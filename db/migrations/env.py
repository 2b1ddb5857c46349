"""Alembic environment: runs migrations against the URL db.migrate passes, else common.config.database_url().

A caller may also hand over an open connection (`config.attributes["connection"]`), so tests and the app can
migrate inside a connection they already hold.

Every online upgrade or downgrade holds the database's migration lock (db.upgrade_lock) on its connection, so
any number of processes may migrate at start at once: one does the work, the others find it done.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from common.config import database_url
from db.engine import make_engine, normalize_url
from db.models import Base
from db.upgrade_lock import upgrade_lock

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or database_url()
    return normalize_url(str(url))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode rebuilds the table (copy, drop, rename).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=False,
    )


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    # The lock comes first: Alembic must read the version table only once no one else is migrating.
    with upgrade_lock(connection):
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
