"""Session state and process-wide resources for the console. Widgets only: every rule lives in core."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from sqlalchemy.orm import Session

from core import keys
from common.errors import NotFound
from core.providers.registry import all_connections
from core.runtime import Runtime, open_runtime
from core.setup_code import new_setup_code, setup_banner
from core.users import UserView, get_user
from db.engine import DatabaseUnavailable

SETUP_CODE_ENV = "IMAGEGATE_SETUP_CODE"
USER_KEY = "imagegate_user_id"
FLASH_KEY = "imagegate_flash"


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


def current_user() -> UserView | None:
    """The signed-in user, re-read every run so a role change or deactivation takes effect at once."""
    user_id = st.session_state.get(USER_KEY)
    if user_id is None:
        return None
    with db_session() as session:
        try:
            user = get_user(session, int(user_id))
        except NotFound:
            user = None
    if user is None or not user.active:
        st.session_state.pop(USER_KEY, None)
        return None
    return user


def sign_in(user: UserView) -> None:
    st.session_state[USER_KEY] = user.id


def sign_out() -> None:
    st.session_state.pop(USER_KEY, None)


def flash(message: str) -> None:
    """A message that survives the next st.rerun() (a toast right before a rerun is often lost)."""
    st.session_state[FLASH_KEY] = message


def show_flash() -> None:
    message = st.session_state.pop(FLASH_KEY, None)
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
