"""Shared by the AppTest files of the Providers, Users and Audit pages: a fresh console database with one account
per role, and a browser session signed in as any of them (through the session cookie, as a reload would)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from core import console_sessions, security
from core.runtime import open_runtime
from core.security import Actor, Role
from core.users import create_first_admin, create_user
from db.engine import transaction
from db.models import User

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "ui" / "console.py")
PASSWORD = "correct horse battery"
PEOPLE = {"alice": Role.ADMIN, "hero": Role.HERO, "bob": Role.USER}


def page(name: str) -> str:
    return str(ROOT / "pages" / f"{name}.py")


@pytest.fixture
def console_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sessionmaker[Session]]:
    """A migrated, seeded SQLite database in a fresh data directory with alice (ADMIN), hero (HERO), bob (USER)."""
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    st.cache_resource.clear()
    old = security.set_password_hasher(PasswordHasher.from_parameters(CHEAPEST))
    sessions = open_runtime().sessions
    admin = create_first_admin(sessions, "alice", PASSWORD).actor()
    with transaction(sessions) as session:
        for name, role in PEOPLE.items():
            if name != "alice":
                create_user(session, admin, name, PASSWORD, role)
    yield sessions
    security.set_password_hasher(old)
    st.cache_resource.clear()


def actor(sessions: sessionmaker[Session], username: str) -> Actor:
    with sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return Actor(user_id=user.id, username=user.username, role=user.role)


def open_as(
    monkeypatch: pytest.MonkeyPatch, sessions: sessionmaker[Session], username: str, page_name: str | None = None
) -> AppTest:
    """A new browser session whose cookie belongs to `username`, opening `page_name`'s URL (or the start page)."""
    from ui import state

    with transaction(sessions) as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        started = console_sessions.start(session, user_id)
    with transaction(sessions) as session:
        issued = console_sessions.collect(session, started.handoff)
    assert issued is not None
    monkeypatch.setattr(state, "session_cookie", lambda: issued.token)
    at = AppTest.from_file(APP, default_timeout=60)
    if page_name is not None:
        at.switch_page(page(page_name))
    at.run()
    assert not at.exception, at.exception
    return at


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    return at
