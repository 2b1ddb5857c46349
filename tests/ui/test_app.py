"""The console through Streamlit's AppTest: first-run admin set-up, sign-in, and what each role can reach."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from core import console_sessions
from core.runtime import open_runtime
from core.security import Actor, Role, hash_password
from core.users import create_user, list_users
from db.engine import transaction
from db.models import ConsoleSession, User

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "ui" / "console.py")
PASSWORD = "correct horse battery"


@pytest.fixture
def fresh_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A new data directory (SQLite) and no cached runtime or set-up code from another test."""
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    st.cache_resource.clear()
    yield tmp_path
    st.cache_resource.clear()


def _app(deep_link: str | None = None) -> AppTest:
    """A new browser session; `deep_link` (e.g. "pages/settings.py") opens that page's URL directly."""
    at = AppTest.from_file(APP, default_timeout=60)
    if deep_link is not None:
        at.switch_page(deep_link)  # before the first run: the page is named by its URL, as a link would
    at.run()
    assert not at.exception, at.exception
    return at


def _setup_code() -> str:
    from ui import state

    return state.setup_code()


def _fill_first_run(at: AppTest, code: str, username: str, password: str, confirm: str | None = None) -> None:
    at.text_input[0].input(code)
    at.text_input[1].input(username)
    at.text_input[2].input(password)
    at.text_input[3].input(confirm if confirm is not None else password)
    at.button[0].click()
    at.run()


def _usernames() -> list[str]:
    runtime = open_runtime(prepare=False)
    with runtime.sessions() as session:
        return [u.username for u in list_users(session, Actor.system())]


def test_first_run_needs_the_terminal_code(fresh_console: Path, capsys: pytest.CaptureFixture[str]) -> None:
    at = _app()
    assert at.title[0].value == "Welcome to Imagegate"
    assert any("Sandbox mode" in w.value for w in at.warning)  # on every page, this one included
    code = _setup_code()
    # The code is printed in the terminal that started the console, and nowhere on the page.
    assert code in capsys.readouterr().out
    assert all(code not in m.value for m in at.markdown)

    _fill_first_run(at, "AAAA-BBBB-CCCC", "alice", PASSWORD)
    assert "set-up code is not right" in at.error[0].value
    assert _usernames() == []
    # The form keeps what was typed.
    assert at.text_input[1].value == "alice"

    _fill_first_run(at, code, "alice", PASSWORD, confirm="something else entirely")
    assert "passwords differ" in at.error[0].value
    assert _usernames() == []

    _fill_first_run(at, code, "alice", "short")
    assert at.error and "10" in at.error[0].value
    assert _usernames() == []

    _fill_first_run(at, code.lower().replace("-", " "), "alice", PASSWORD)
    assert not at.exception
    assert _usernames() == ["alice"]
    assert at.title[0].value == "Provider settings"
    assert "created" in at.success[0].value


def test_settings_page_lists_every_provider_with_price_and_sources(fresh_console: Path) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    summary = at.dataframe[0].value
    assert set(summary["id"]) == {"fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"}
    by_id = summary.set_index("id")
    # Seeded prices: fal $0.02/MP at its default landscape_4_3 (1024x768) = 0.786432 MP -> $0.015729.
    assert by_id.loc["fal-qwen", "one image"] == "$0.015729"
    assert by_id.loc["ideogram", "one image"] == "$0.060000"
    assert by_id.loc["qwen", "one image"] == "$0.000000"
    assert by_id.loc["ideogram", "premium"]
    assert by_id.loc["fal-qwen", "priority"] == 98
    # No key anywhere in tests: every real provider is offline, and the page says so.
    assert set(by_id.loc[["fal-qwen", "ideogram", "huggingface", "qwen"], "mode"]) == {"sandbox"}
    assert any("Sandbox mode" in w.value for w in at.warning)
    # Each provider's effective parameters say where each value came from.
    effective = [df.value for df in at.dataframe[1:] if "parameter" in df.value.columns]  # the editor's preview
    assert effective and all({"parameter", "value", "from"} <= set(df.columns) for df in effective)
    assert any("catalog" in " ".join(df["from"]) or "provider" in " ".join(df["from"]) for df in effective)


def test_sign_in_and_roles(fresh_console: Path) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    runtime = open_runtime(prepare=False)
    admin = Actor(user_id=1, username="alice", role=Role.ADMIN)
    with transaction(runtime.sessions) as session:
        create_user(session, admin, "bob", PASSWORD, Role.USER)

    at = _app()  # a new browser session: not signed in
    assert at.title[0].value == "Sign in to Imagegate"
    assert [m.value for m in at.markdown] == []  # nothing else on the page (no stray string printed by magic)
    at.text_input[0].input("bob")
    at.text_input[1].input("wrong password!!")
    at.button[0].click()
    at.run()
    assert "wrong password" in at.error[0].value
    assert at.text_input[0].value == "bob"

    at.text_input[1].input(PASSWORD)
    at.button[0].click()
    at.run()
    assert at.title[0].value == "Your account"
    assert any("USER" in t.value for t in at.text)

    # A USER cannot reach the Settings page: it is not registered for the role at all.
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(str(ROOT / "pages" / "settings.py"))


def test_staff_can_switch_to_settings(fresh_console: Path) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    at.switch_page(str(ROOT / "pages" / "account.py"))
    at.run()
    assert at.title[0].value == "Your account"
    at.switch_page(str(ROOT / "pages" / "settings.py"))
    at.run()
    assert at.title[0].value == "Provider settings"


def test_a_code_handed_over_by_manage_py_is_the_one_that_works(
    fresh_console: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGATE_SETUP_CODE", "K7QM-2RTP-9WHX")
    at = _app()
    _fill_first_run(at, "AAAA-BBBB-CCCC", "alice", PASSWORD)
    assert "set-up code is not right" in at.error[0].value
    _fill_first_run(at, "K7QM-2RTP-9WHX", "alice", PASSWORD)
    assert _usernames() == ["alice"]


def test_sign_in_locks_after_repeated_wrong_passwords(fresh_console: Path) -> None:
    from core.users import MAX_FAILED_SIGN_INS

    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    at = _app()
    for _ in range(MAX_FAILED_SIGN_INS):
        at.text_input[0].input("alice")
        at.text_input[1].input("not the password")
        at.button[0].click()
        at.run()
        assert "wrong password" in at.error[0].value
    at.text_input[1].input(PASSWORD)
    at.button[0].click()
    at.run()
    assert "locked for about 15 more minutes" in at.error[0].value
    assert at.title[0].value == "Sign in to Imagegate"


# --- sessions: deep links, the cookie, sign-out, deactivation ---------------------------------------------------


def _sessions() -> sessionmaker[Session]:
    return open_runtime(prepare=False).sessions


def _sign_in(at: AppTest, username: str, password: str = PASSWORD) -> None:
    at.text_input[0].input(username)
    at.text_input[1].input(password)
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception


def _with_bob() -> None:
    with transaction(_sessions()) as session:
        bob = User(username="bob", password_hash=hash_password(PASSWORD), role=Role.USER, active=True)
        session.add(bob)


def _set_user(username: str, **values: object) -> None:
    with transaction(_sessions()) as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        for key, value in values.items():
            setattr(user, key, value)


def _cookie_for(username: str) -> str:
    """What a browser that signed in as `username` before holds: a collected session token."""
    with transaction(_sessions()) as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        started = console_sessions.start(session, user_id)
    with transaction(_sessions()) as session:
        issued = console_sessions.collect(session, started.handoff)
    assert issued is not None
    return issued.token


def _titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def test_a_deep_link_shows_the_sign_in_form_and_then_its_page(fresh_console: Path) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    _with_bob()

    at = _app(deep_link=str(ROOT / "pages" / "settings.py"))  # a new browser session, signed out, opening /settings
    assert _titles(at) == ["Sign in to Imagegate"]  # the form, at the page's own URL
    _sign_in(at, "alice")
    assert _titles(at) == ["Provider settings"]

    # A USER following the same link lands on their own start page: their role has no such page.
    at = _app(deep_link=str(ROOT / "pages" / "settings.py"))
    _sign_in(at, "bob")
    assert _titles(at) == ["Your account"]


def test_the_first_run_form_answers_at_a_deep_link_too(fresh_console: Path) -> None:
    at = _app(deep_link=str(ROOT / "pages" / "account.py"))
    assert _titles(at) == ["Welcome to Imagegate"]
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    assert _titles(at) == ["Your account"]


def test_a_new_tab_with_the_cookie_is_signed_in_until_the_session_ends(
    fresh_console: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    token = _cookie_for("alice")
    from ui import state

    monkeypatch.setattr(state, "session_cookie", lambda: token)
    at = _app()  # a reload: a new Streamlit session whose browser sends the cookie
    assert _titles(at) == ["Provider settings"]
    session_id = at.session_state[state.SESSION_KEY]

    # Signing out (in this tab) revokes the session in the database: the same cookie no longer works anywhere.
    at.sidebar.button[0].click()
    at.run()
    assert _titles(at) == ["Sign in to Imagegate"]
    with _sessions()() as session:
        row = session.get(ConsoleSession, session_id)
        assert row is not None and row.revoked_at is not None
    assert _titles(_app()) == ["Sign in to Imagegate"]


def test_an_unknown_or_forged_cookie_signs_nobody_in(fresh_console: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    from ui import state

    for forged in ["", "1", "alice", "A" * 43, "ADMIN:1"]:
        monkeypatch.setattr(state, "session_cookie", lambda forged=forged: forged)
        assert _titles(_app()) == ["Sign in to Imagegate"]


def test_deactivation_and_role_changes_take_effect_at_the_next_run(
    fresh_console: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    _with_bob()
    _set_user("bob", role=Role.ADMIN)
    at = _app()
    _sign_in(at, "bob")
    assert _titles(at) == ["Provider settings"]

    _set_user("bob", role=Role.USER)  # demoted elsewhere: the next run reads the role from the database
    at.run()
    assert _titles(at) == ["Your account"]
    assert any("(USER)" in c.value for c in at.sidebar.caption)

    _set_user("bob", active=False)  # deactivated elsewhere: the next run ends the session
    at.run()
    assert _titles(at) == ["Sign in to Imagegate"]
    _set_user("bob", active=True)  # reactivation does not revive the old session
    at.run()
    assert _titles(at) == ["Sign in to Imagegate"]


def test_with_the_session_routes_sign_in_sends_the_browser_to_collect_its_cookie(
    fresh_console: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui import session_routes

    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    monkeypatch.setattr(session_routes, "_served", True)
    at = _app(deep_link=str(ROOT / "pages" / "settings.py"))
    _sign_in(at, "alice")
    scripts = [h.proto.body for h in at.get("html")]
    assert len(scripts) == 1 and "window.location.replace" in scripts[0]
    assert f"{session_routes.SESSION_PATH}?handoff=" in scripts[0] and "next=settings" in scripts[0]
