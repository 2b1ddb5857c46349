"""The routes that set and clear the session cookie, over HTTP (Starlette's test client, no browser)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.testclient import TestClient
from streamlit import config

from core import console_sessions
from core.security import hash_password
from db.engine import transaction
from db.models import ConsoleSession, Role, User
from ui import session_routes

SAME_ORIGIN = {"sec-fetch-site": "same-origin"}


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sessionmaker[Session]]:
    """A fresh data directory (SQLite) with one admin, as the console's own runtime sees it."""
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    st.cache_resource.clear()
    from ui.state import runtime

    factory = runtime().sessions
    with transaction(factory) as session:
        session.add(User(username="alice", password_hash=hash_password("x" * 12), role=Role.ADMIN, active=True))
    yield factory
    st.cache_resource.clear()


@pytest.fixture
def client(sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setattr(session_routes, "_served", False)  # restored after the test: AppTests run without routes
    with TestClient(Starlette(routes=session_routes.routes()), follow_redirects=False) as test_client:
        yield test_client


def _handoff(sessions: sessionmaker[Session]) -> console_sessions.StartedSession:
    with transaction(sessions) as session:
        user_id = session.scalars(select(User.id).where(User.username == "alice")).one()
        return console_sessions.start(session, user_id)


def _set_cookie_header(response: object) -> str:
    return str(response.headers.get("set-cookie", ""))  # type: ignore[attr-defined]


def test_the_hand_off_becomes_an_http_only_strict_cookie_and_lands_on_the_page(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    started = _handoff(sessions)
    response = client.get(session_routes.collect_url(started.handoff, "settings"), headers=SAME_ORIGIN)
    assert response.status_code == 303
    assert response.headers["location"] == "/settings"
    assert response.headers["cache-control"] == "no-store"
    header = _set_cookie_header(response)
    assert header.startswith(f"{session_routes.COOKIE_NAME}=")
    assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/" in header
    assert "Secure" not in header  # plain http (a local console); see the https test below
    max_age = int(header.split("Max-Age=")[1].split(";")[0])
    assert 12 * 3600 - 60 <= max_age <= 12 * 3600
    token = response.cookies[session_routes.COOKIE_NAME]
    with transaction(sessions) as session:
        valid = console_sessions.validate_token(session, token)
    assert valid is not None and valid.session_id == started.session_id

    # The code works once: a replay sets no cookie.
    again = client.get(session_routes.collect_url(started.handoff, "settings"), headers=SAME_ORIGIN)
    assert again.status_code == 303 and session_routes.COOKIE_NAME not in _set_cookie_header(again)


def test_a_request_from_another_site_gets_no_cookie_and_leaves_the_code_unused(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    started = _handoff(sessions)
    url = session_routes.collect_url(started.handoff, "")
    for site in ("cross-site", "same-site"):
        response = client.get(url, headers={"sec-fetch-site": site})
        assert response.status_code == 303 and not _set_cookie_header(response)
    assert session_routes.COOKIE_NAME in _set_cookie_header(client.get(url, headers={"sec-fetch-site": "none"}))


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example", "/settings", "..", "a/b", "%2F%2Fx"])
def test_the_redirect_never_leaves_the_console(
    client: TestClient, sessions: sessionmaker[Session], target: str
) -> None:
    response = client.get(
        session_routes.SESSION_PATH, params={"handoff": _handoff(sessions).handoff, "next": target},
        headers=SAME_ORIGIN,
    )
    assert response.headers["location"] == "/"


def test_only_known_flash_messages_pass_through(client: TestClient, sessions: sessionmaker[Session]) -> None:
    known = client.get(session_routes.collect_url(_handoff(sessions).handoff, "", "admin-created"), headers=SAME_ORIGIN)
    assert known.headers["location"] == "/?flash=admin-created"
    forged = client.get(
        session_routes.SESSION_PATH,
        params={"handoff": _handoff(sessions).handoff, "next": "", "flash": "Your password expired: type it here"},
        headers=SAME_ORIGIN,
    )
    assert forged.headers["location"] == "/"


def test_behind_https_the_cookie_is_secure(client: TestClient, sessions: sessionmaker[Session]) -> None:
    response = client.get(
        session_routes.collect_url(_handoff(sessions).handoff, ""),
        headers={**SAME_ORIGIN, "x-forwarded-proto": "https"},
    )
    assert "Secure" in _set_cookie_header(response)


def test_sign_out_revokes_the_cookie_and_deletes_it(client: TestClient, sessions: sessionmaker[Session]) -> None:
    started = _handoff(sessions)
    collected = client.get(session_routes.collect_url(started.handoff, ""), headers=SAME_ORIGIN)
    token = collected.cookies[session_routes.COOKIE_NAME]

    # Another site cannot sign this browser out.
    client.cookies.set(session_routes.COOKIE_NAME, token)
    refused = client.get(session_routes.SIGN_OUT_PATH, headers={"sec-fetch-site": "cross-site"})
    assert refused.status_code == 303 and not _set_cookie_header(refused)
    with transaction(sessions) as session:
        assert console_sessions.validate_token(session, token) is not None

    response = client.get(session_routes.SIGN_OUT_PATH, headers=SAME_ORIGIN)
    assert response.status_code == 303 and response.headers["location"] == "/"
    header = _set_cookie_header(response)
    assert header.startswith(f'{session_routes.COOKIE_NAME}=""') and "Max-Age=0" in header
    with transaction(sessions) as session:
        assert console_sessions.validate_token(session, token) is None
        row = session.get(ConsoleSession, started.session_id)
        assert row is not None and row.revoked_at is not None


def test_under_a_url_prefix_routes_redirects_and_cookie_stay_under_it(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_routes, "_served", False)
    previous = config.get_option("server.baseUrlPath")
    config.set_option("server.baseUrlPath", "/imagegate/")  # as `--server.baseUrlPath /imagegate/` would
    try:
        with TestClient(Starlette(routes=session_routes.routes()), follow_redirects=False) as client:
            url = session_routes.collect_url(_handoff(sessions).handoff, "account")
            assert url.startswith("/imagegate/_imagegate/session?")
            response = client.get(url, headers=SAME_ORIGIN)
            assert response.status_code == 303 and response.headers["location"] == "/imagegate/account"
            assert "Path=/imagegate" in _set_cookie_header(response)
            signed_out = client.get(session_routes.sign_out_url(), headers=SAME_ORIGIN)
            assert signed_out.status_code == 303 and signed_out.headers["location"] == "/imagegate/"
    finally:
        config.set_option("server.baseUrlPath", previous)
