"""AppTest helpers for page tests: a fresh SQLite console with accounts, and a browser session already signed in
as one of them (a console session row, exactly what the sign-in form starts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core import console_sessions
from core.runtime import Runtime, open_runtime
from core.security import Actor, Role
from core.users import UserView, create_user
from db.engine import transaction
from tests.dbfixtures import _fresh_pg, pg_admin_dsn, pg_session_database

__all__ = ["console", "console_any_db", "pg_admin_dsn", "pg_session_database"]

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "ui" / "console.py")
PASSWORD = "correct horse battery"
SESSION_KEY = "imagegate_console_session"


@dataclass(frozen=True)
class Console:
    data_dir: Path
    runtime: Runtime
    users: dict[Role, UserView]

    def app(self, role: Role, page: str | None = None) -> AppTest:
        """A new browser session signed in as the account with `role`, on `page` (e.g. "settings") or its start."""
        with transaction(self.runtime.sessions) as session:
            started = console_sessions.start(session, self.users[role].id)
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state[SESSION_KEY] = started.session_id
        if page is not None:
            at.switch_page(str(ROOT / "pages" / f"{page}.py"))
        at.run()
        assert not at.exception, at.exception
        return at


def _console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str | None) -> Iterator[Console]:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    if url is None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    st.cache_resource.clear()
    runtime = open_runtime()
    users: dict[Role, UserView] = {}
    with transaction(runtime.sessions) as session:
        for name, role in (("alice", Role.ADMIN), ("hero", Role.HERO), ("bob", Role.USER)):
            users[role] = create_user(session, Actor.system("test"), name, PASSWORD, role)
    yield Console(tmp_path, runtime, users)
    st.cache_resource.clear()
    runtime.engine.dispose()


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    """A new data directory (SQLite, migrated and seeded) with one account per role, sandbox providers."""
    yield from _console(tmp_path, monkeypatch, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def console_any_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Console]:
    """The same on SQLite, then on PostgreSQL (a fresh database of this test session, emptied, then migrated
    and seeded by the console itself)."""
    url = None if request.param == "sqlite" else _fresh_pg(request.getfixturevalue("pg_session_database"))
    yield from _console(tmp_path, monkeypatch, url)


def by_key(elements: object, key: str) -> object:
    """The element with this widget key."""
    for element in elements:  # type: ignore[attr-defined]
        if getattr(element, "key", None) == key:
            return element
    raise AssertionError(f"no element with key {key!r}")


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]
