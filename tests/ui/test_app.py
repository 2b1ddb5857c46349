"""The console through Streamlit's AppTest: first-run admin set-up, sign-in, and what each role can reach."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.runtime import open_runtime
from core.security import Actor, Role
from core.users import create_user, list_users
from db.engine import transaction

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
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


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
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
    effective = [df.value for df in at.dataframe[1:]]
    assert all({"parameter", "value", "from"} <= set(df.columns) for df in effective)
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
        at.switch_page("pages/settings.py")


def test_staff_can_switch_to_settings(fresh_console: Path) -> None:
    at = _app()
    _fill_first_run(at, _setup_code(), "alice", PASSWORD)
    at.switch_page("pages/account.py")
    at.run()
    assert at.title[0].value == "Your account"
    at.switch_page("pages/settings.py")
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
