"""OIDC sign-in on the sign-in page, when `[auth]` is configured in .streamlit/secrets.toml (`st.login`).

Streamlit runs the OIDC flow and keeps the identity in its own cookie (`st.user`); core.oidc maps that identity
to an account an admin created (by the email set on the Users page), and the console session starts as for a
password sign-in. The person clicks "Continue as ..." rather than being signed in silently: after signing out
of the console, Streamlit's identity cookie is still there, and signing out must not be undone by a reload.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import streamlit as st

from core.oidc import OidcRefused, identity_from_claims, sign_in_oidc
from core.security import Role
from db.engine import transaction
from ui import state


def _auth_section() -> Mapping[str, Any] | None:
    try:
        section = st.secrets.get("auth")
    except (FileNotFoundError, KeyError):
        return None
    return section if isinstance(section, Mapping) else None


def providers() -> list[str | None]:
    """The configured identity providers: None for a single provider set directly in [auth], else the names
    of its [auth.NAME] sections; empty when OIDC is not configured."""
    section = _auth_section()
    if not section:
        return []
    named: list[str | None] = [str(name) for name, value in section.items() if isinstance(value, Mapping)]
    return named or ([None] if "server_metadata_url" in section or "client_id" in section else [])


def _authlib_available() -> bool:
    """st.login needs Authlib (`streamlit[auth]`)."""
    return importlib.util.find_spec("authlib") is not None


def _claims() -> Mapping[str, Any] | None:
    """The identity Streamlit holds for this browser, or None."""
    if not st.user.is_logged_in:
        return None
    return dict(st.user)


def offer(page: str, landing: Callable[[str, Role], str]) -> None:
    """Under the password form: "Sign in with ..." buttons, or "Continue as ..." once an identity is held."""
    names = providers()
    if not names:
        return
    st.divider()
    if not _authlib_available():
        st.warning("Single sign-on is configured in secrets, but Authlib is missing: `pip install 'streamlit[auth]'`.")
        return
    claims = _claims()
    if claims is None:
        for name in names:
            label = "Sign in with single sign-on" if name is None else f"Sign in with {name}"
            if st.button(label, key=f"oidc-{name or 'default'}"):
                st.login(name) if name is not None else st.login()
        return
    who = str(claims.get("email") or claims.get("name") or claims.get("sub") or "this identity")
    left, right = st.columns(2)
    go = left.button(f"Continue as {who}", type="primary", key="oidc-continue")
    if right.button("Use another identity", key="oidc-logout"):
        st.logout()
    if not go:
        return
    try:
        with transaction(state.runtime().sessions) as session:
            user = sign_in_oidc(session, identity_from_claims(claims))
    except OidcRefused as exc:
        message = str(exc)
        st.error(message[:1].upper() + message[1:])
        return
    state.sign_in(user, page=landing(page, user.role))
