"""OIDC sign-in on the sign-in page (AppTest): offered only when [auth] is configured; an identity is mapped by
core.oidc (admin-set email, then the link), and an unknown one is refused with the message. Streamlit's OIDC
round trip itself needs an identity provider, so `st.user`'s claims are stood in for here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from core import oidc
from db.engine import transaction
from tests.ui.admin_helpers import APP, actor, console_db, rerun, titles

__all__ = ["console_db"]

CLAIMS = {"iss": "https://login.example.com", "sub": "42", "email": "bob@example.com", "email_verified": True}


def _signed_out(monkeypatch: pytest.MonkeyPatch, claims: Mapping[str, Any] | None, configured: bool = True) -> AppTest:
    from ui import oidc_sign_in, state

    monkeypatch.setattr(state, "session_cookie", lambda: None)
    monkeypatch.setattr(oidc_sign_in, "providers", lambda: [None] if configured else [])
    monkeypatch.setattr(oidc_sign_in, "_claims", lambda: claims)
    monkeypatch.setattr(oidc_sign_in, "_authlib_available", lambda: True)
    at = AppTest.from_file(APP, default_timeout=60)
    return rerun(at)


def test_no_sso_button_without_auth_config(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = _signed_out(monkeypatch, None, configured=False)
    assert titles(at) == ["Sign in to Imagegate"]
    assert [b.label for b in at.button] == ["Sign in"]


def test_sso_button_when_configured(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = _signed_out(monkeypatch, None)
    assert "Sign in with single sign-on" in [b.label for b in at.button]


def test_an_identity_signs_in_as_the_account_with_its_email(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _signed_out(monkeypatch, CLAIMS)
    next(b for b in at.button if b.label == "Continue as bob@example.com").click()
    rerun(at)
    assert any("No Imagegate account has the email bob@example.com" in e.value for e in at.error)
    assert titles(at) == ["Sign in to Imagegate"]

    with transaction(console_db) as session:
        oidc.set_email(session, actor(console_db, "alice"), actor(console_db, "bob").user_id or 0, "bob@example.com")
    next(b for b in at.button if b.label == "Continue as bob@example.com").click()
    rerun(at)
    assert titles(at) == ["Your account"]  # bob is a USER: his start page
    assert any("(USER)" in c.value for c in at.sidebar.caption)
