"""The Users page through AppTest: ADMIN only (a HERO or USER cannot reach it by link or URL); create, change
role, deactivate, reset password, unlock, email; the last-admin rule shown as disabled controls; API tokens."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from core import api_tokens, users
from core.security import Role
from db.engine import transaction
from db.models import User
from tests.ui.admin_helpers import PASSWORD, actor, console_db, open_as, page, rerun, titles

__all__ = ["console_db"]


def _button(at: AppTest, label: str) -> object:
    return next(b for b in at.button if b.label == label)


def _user(sessions: sessionmaker[Session], name: str) -> User:
    with sessions() as session:
        return session.scalars(select(User).where(User.username == name)).one()


@pytest.mark.parametrize("username", ["hero", "bob"])
def test_only_admins_reach_the_users_page(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, username: str
) -> None:
    at = open_as(monkeypatch, console_db, username, "users")  # the URL, typed or linked
    assert "Users" not in titles(at)
    assert not any(b.label == "Create user" for b in at.button)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(page("users"))


def test_the_last_admin_rule_is_shown(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_as(monkeypatch, console_db, "alice", "users")
    assert titles(at)[0] == "Users"
    assert set(at.dataframe[0].value["username"]) == {"alice", "bob", "hero"}
    assert any("only active admin" in i.value for i in at.info)
    at.selectbox(key="managed_user").select_index(0)  # alice (sorted by username)
    rerun(at)
    assert _button(at, "Deactivate").disabled  # type: ignore[attr-defined]
    assert at.selectbox(key=f"role-{_user(console_db, 'alice').id}").disabled
    assert any("disabled" in c.value and "only active admin" in c.value for c in at.caption)
    # Another admin lifts the rule.
    with transaction(console_db) as session:
        users.set_role(session, actor(console_db, "alice"), _user(console_db, "hero").id, Role.ADMIN)
    rerun(at)
    assert not _button(at, "Deactivate").disabled  # type: ignore[attr-defined]
    assert not any("only active admin" in i.value for i in at.info)


def test_create_change_role_deactivate_reset_unlock_email(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_as(monkeypatch, console_db, "alice", "users")
    form_inputs = {t.label: t for t in at.text_input}
    form_inputs["Username"].input("carol")
    form_inputs["Password"].input(PASSWORD)
    form_inputs["Repeat the password"].input("different password")
    _button(at, "Create user").click()  # type: ignore[attr-defined]
    rerun(at)
    assert "passwords differ" in at.error[0].value
    assert {t.label: t for t in at.text_input}["Username"].value == "carol"  # the form keeps its input
    {t.label: t for t in at.text_input}["Repeat the password"].input(PASSWORD)
    {t.label: t for t in at.text_input}["Email for OIDC sign-in (optional)"].input("Carol@Example.com")
    _button(at, "Create user").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("Created carol (USER)" in s.value for s in at.success)
    carol = _user(console_db, "carol")
    assert carol.email == "carol@example.com"

    names = [o for o in at.selectbox(key="managed_user").options]
    at.selectbox(key="managed_user").select_index(next(i for i, n in enumerate(names) if n.startswith("carol")))
    rerun(at)
    at.selectbox(key=f"role-{carol.id}").select(Role.HERO)
    rerun(at)
    _button(at, "Change role").click()  # type: ignore[attr-defined]
    rerun(at)
    assert _user(console_db, "carol").role is Role.HERO
    _button(at, "Deactivate").click()  # type: ignore[attr-defined]
    rerun(at)
    assert not _user(console_db, "carol").active
    _button(at, "Reactivate").click()  # type: ignore[attr-defined]
    rerun(at)
    assert _user(console_db, "carol").active

    for _ in range(users.MAX_FAILED_SIGN_INS):
        users.authenticate(console_db, "carol", "wrong password")
    rerun(at)
    assert any("locked until" in w.value for w in at.warning)
    _button(at, "Unlock sign-in").click()  # type: ignore[attr-defined]
    rerun(at)
    assert _user(console_db, "carol").locked_until is None

    at.text_input(key=f"pw-{carol.id}").input("short")
    _button(at, "Reset password").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("10" in e.value for e in at.error)
    at.text_input(key=f"pw-{carol.id}").input("a brand new password")
    _button(at, "Reset password").click()  # type: ignore[attr-defined]
    rerun(at)
    assert users.authenticate(console_db, "carol", "a brand new password") is not None

    at.text_input(key=f"mail-{carol.id}").input("not an email")
    _button(at, "Save email").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("email address" in e.value for e in at.error)


def test_admin_manages_anyones_api_tokens(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_as(monkeypatch, console_db, "alice", "users")
    names = list(at.selectbox(key="managed_user").options)
    at.selectbox(key="managed_user").select_index(next(i for i, n in enumerate(names) if n.startswith("bob")))
    rerun(at)
    bob = _user(console_db, "bob")
    # Bob is a USER: a token for him can act as USER only.
    assert [str(o) for o in at.selectbox(key=f"tr-user-{bob.id}").options] == ["USER"]
    at.text_input(key=f"tn-user-{bob.id}").input("bob's script")
    _button(at, "Create token").click()  # type: ignore[attr-defined]
    rerun(at)
    (secret,) = [c.value for c in at.code]
    assert secret.startswith("igt_")
    with transaction(console_db) as session:
        assert api_tokens.authenticate_token(session, secret).username == "bob"
    rerun(at)  # shown once: gone at the next run
    assert not at.code
    assert at.dataframe[1].value["name"].tolist() == ["bob's script"]
    _button(at, "Revoke").click()  # type: ignore[attr-defined]
    rerun(at)
    with pytest.raises(api_tokens.TokenRefused), transaction(console_db) as session:
        api_tokens.authenticate_token(session, secret)


def test_every_user_manages_their_own_tokens_on_the_account_page(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    with transaction(console_db) as session:  # someone else's token, which bob must not see
        api_tokens.create_token(session, actor(console_db, "alice"), _user(console_db, "hero").id, "hero's")
    at = open_as(monkeypatch, console_db, "bob", "account")
    assert titles(at)[0] == "Your account"
    assert any("bob has no API tokens" in c.value for c in at.caption)
    assert [str(o) for o in at.selectbox(key="tr-own").options] == ["USER"]
    at.text_input(key="tn-own").input("my laptop")
    _button(at, "Create token").click()  # type: ignore[attr-defined]
    rerun(at)
    (secret,) = [c.value for c in at.code]
    with transaction(console_db) as session:
        assert api_tokens.authenticate_token(session, secret).role is Role.USER
    rerun(at)
    assert not at.code
    assert at.dataframe[0].value["name"].tolist() == ["my laptop"]
    _button(at, "Revoke").click()  # type: ignore[attr-defined]
    rerun(at)
    assert at.dataframe[0].value["status"].tolist() == ["revoked"]
