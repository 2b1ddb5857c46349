"""Session state and process-wide resources for the console. Widgets only: every rule lives in core."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from sqlalchemy.orm import Session

from common.errors import DatabaseUnavailable
from core import console_sessions, keys
from core.providers.registry import all_connections
from core.runtime import Runtime, open_runtime
from core.security import Role
from core.setup_code import new_setup_code, setup_banner
from core.users import UserView, get_user
from db.engine import transaction
from ui import session_routes

SETUP_CODE_ENV = "IMAGEGATE_SETUP_CODE"
SESSION_KEY = "imagegate_console_session"
"""This tab's row in console_sessions (its id; the secret token only ever lives in the browser's cookie)."""
FLASH_KEY = "imagegate_flash"
STAFF = frozenset({Role.ADMIN, Role.HERO})
"""Who sees provider settings, prices and budgets."""


@st.cache_resource(show_spinner="Preparing the database…")
def runtime() -> Runtime:
    keys.register_secret_source(_streamlit_secrets())
    return open_runtime()


def _streamlit_secrets() -> dict[str, str]:
    """Provider keys from .streamlit/secrets.toml, if there is one (values never displayed)."""
    try:
        return {k: v for k, v in st.secrets.items() if isinstance(v, str)}
    except (FileNotFoundError, KeyError):
        return {}


@st.cache_resource
def setup_code() -> str:
    """One code per server process, printed in the terminal that started the console: by manage.py before
    the server starts (handed over in IMAGEGATE_SETUP_CODE), else here on the first visit."""
    handed_over = os.environ.get(SETUP_CODE_ENV, "").strip()
    if handed_over:
        return handed_over
    code = new_setup_code()
    print(setup_banner(code), flush=True)
    return code


def get_runtime_or_stop() -> Runtime:
    try:
        return runtime()
    except DatabaseUnavailable as exc:
        st.error(f"The database is not reachable: {exc}")
        st.stop()
        raise


@contextmanager
def db_session() -> Iterator[Session]:
    """A read session; writes go through core services inside db.engine.transaction."""
    with runtime().sessions() as session:
        yield session


def session_cookie() -> str | None:
    """The session cookie the browser sent when this tab connected (a reload or a deep link brings it)."""
    return st.context.cookies.get(session_routes.COOKIE_NAME)


def current_user() -> UserView | None:
    """The signed-in user, checked against the database on every run: this tab's session (or, on a new tab, the
    browser's cookie) must still be open and its user active, so a sign-out elsewhere, a deactivation or a
    role change takes effect at once. The role is always the database's."""
    known = st.session_state.get(SESSION_KEY)
    token = session_cookie() if known is None else None
    if known is None and not token:
        return None
    with transaction(runtime().sessions) as session:
        if known is not None:
            valid = console_sessions.validate(session, int(known))
        else:
            valid = console_sessions.validate_token(session, str(token))
        user = get_user(session, valid.user_id) if valid is not None else None
    if valid is None or user is None:
        st.session_state.pop(SESSION_KEY, None)
        return None
    st.session_state[SESSION_KEY] = valid.session_id
    return user


def require_user(roles: frozenset[Role] = frozenset(Role)) -> UserView:
    """The signed-in user if their role is one of `roles`; otherwise the page stops here, showing nothing.

    Every page calls this first. ui/console.py registers only the pages a role may see, and this check holds
    even if a page script is ever run some other way."""
    user = current_user()
    if user is None or user.role not in roles:
        st.stop()
    return user


def sign_in(user: UserView, *, page: str = "", flash_key: str | None = None) -> None:
    """Start a session for someone who has just proven who they are, and open `page` (a URL path) for them.

    With the session routes served, the browser goes through the route that sets its HttpOnly cookie (a full
    page load, so the cookie is there for every later reload and deep link); otherwise this tab reruns."""
    with transaction(runtime().sessions) as session:
        started = console_sessions.start(session, user.id)
    st.session_state[SESSION_KEY] = started.session_id
    if session_routes.served():
        _go_to(session_routes.collect_url(started.handoff, page, flash_key))
    if flash_key is not None:
        flash(session_routes.FLASHES[flash_key])
    st.rerun()


def sign_out() -> None:
    """End this tab's session in the database (every tab and the cookie with it), then forget the cookie."""
    known = st.session_state.pop(SESSION_KEY, None)
    if known is not None:
        with transaction(runtime().sessions) as session:
            console_sessions.revoke(session, int(known))
    if session_routes.served():
        _go_to(session_routes.sign_out_url())
    st.rerun()


def _go_to(url: str) -> None:
    """A full page load of one of our own URLs (built by session_routes: no user text in it)."""
    st.html(f"<script>window.location.replace({json.dumps(url)});</script>", unsafe_allow_javascript=True)
    st.stop()


def flash(message: str) -> None:
    """A message that survives the next st.rerun() (a toast right before a rerun is often lost)."""
    st.session_state[FLASH_KEY] = message


def show_flash() -> None:
    """A message kept for this run: from session state, or named in the URL by the sign-in redirect."""
    message = st.session_state.pop(FLASH_KEY, None)
    key = st.query_params.get(session_routes.FLASH_PARAM)
    if key is not None:
        del st.query_params[session_routes.FLASH_PARAM]
        message = message or session_routes.FLASHES.get(key)
    if message:
        st.success(message)


def offline_banner() -> None:
    """Every page says when any provider is not live (emulator or sandbox)."""
    offline = [c for c in all_connections() if c.is_offline and c.provider != "sandbox"]
    if offline:
        lines = ", ".join(f"{c.provider}: {c.mode.value}" for c in offline)
        st.warning(
            f"**Sandbox mode** — these providers are not live, so nothing here is a real generation or a "
            f"real charge: {lines}. Set a provider's API key to go live.",
            icon=":material/science:",
        )
