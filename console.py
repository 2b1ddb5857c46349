"""Imagegate console: first-run admin set-up, sign-in, and the pages each role may see."""

from __future__ import annotations

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from common.errors import InvalidInput, PermissionDenied
from core.security import Role
from core.setup_code import setup_code_matches
from common.errors import AccountLocked
from core.users import authenticate, create_first_admin, needs_first_admin
from db.engine import transaction
from ui import state

st.set_page_config(page_title="Imagegate", page_icon=":material/image:", layout="wide")


def _narrow() -> DeltaGenerator:
    """Forms read better at about half the wide layout."""
    column, _ = st.columns([3, 2])
    return column


def first_run_page() -> None:
    st.title("Welcome to Imagegate")
    st.write(
        "No account exists yet. Create the first administrator. The one-time set-up code was printed in the "
        "terminal that started the console, so only whoever runs this server can claim it."
    )
    code = state.setup_code()
    with _narrow(), st.form("first_admin", clear_on_submit=False):
        given = st.text_input("Set-up code", placeholder="e.g. K7QM-2RTP-9WHX")
        username = st.text_input("Admin username")
        password = st.text_input("Password", type="password", help="At least 10 characters.")
        confirm = st.text_input("Repeat the password", type="password")
        submitted = st.form_submit_button("Create admin account", type="primary")
    if not submitted:
        return
    if not setup_code_matches(code, given):
        st.error("That set-up code is not right. Copy it from the terminal that started the console.")
        return
    if password != confirm:
        st.error("The two passwords differ.")
        return
    try:
        user = create_first_admin(state.runtime().sessions, username, password)
    except InvalidInput as exc:
        st.error(str(exc))
        return
    except PermissionDenied as exc:
        st.error(str(exc))
        return
    state.sign_in(user)
    state.flash(f"Admin account {user.username!r} created. You are signed in.")
    st.rerun()


def sign_in_page() -> None:
    st.title("Sign in to Imagegate")
    with _narrow(), st.form("sign_in", clear_on_submit=False):
        username = st.text_input("Username")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return
    try:
        with transaction(state.runtime().sessions) as session:
            user = authenticate(session, username, password)
    except AccountLocked as exc:
        st.error(str(exc).capitalize())
        return
    if user is None:
        st.error("Unknown username or wrong password (or the account is deactivated).")
        return
    state.sign_in(user)
    st.rerun()


def main() -> None:
    runtime = state.get_runtime_or_stop()
    state.offline_banner()
    with runtime.sessions() as session:
        fresh = needs_first_admin(session)
    if fresh:
        st.navigation([st.Page(first_run_page, title="First run", icon=":material/key:")], position="hidden").run()
        return
    user = state.current_user()
    if user is None:
        st.navigation([st.Page(sign_in_page, title="Sign in", icon=":material/key:")], position="hidden").run()
        return

    settings = st.Page("pages/settings.py", title="Settings", icon=":material/tune:", default=True)
    account = st.Page("pages/account.py", title="Account", icon=":material/person:")
    staff = user.role in (Role.ADMIN, Role.HERO)
    # A page left out of a role's list cannot be reached, by link or by URL.
    pages = [settings, account] if staff else [account]
    with st.sidebar:
        st.caption(f"Signed in as **{user.username}** ({user.role.value})")
        if st.button("Sign out"):
            state.sign_out()
            st.rerun()
    state.show_flash()
    st.navigation(pages).run()


main()
