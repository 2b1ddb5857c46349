"""Users (ADMIN only): create accounts, change roles, deactivate and reactivate, reset passwords, unlock sign-in,
set the email an OIDC sign-in is matched by, and manage anyone's API tokens. The last-admin rule is shown (the
only active admin's role and deactivate controls are disabled, with the reason) and enforced again by core."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from core import oidc, users
from core.security import Role
from db.engine import transaction
from ui import state
from ui.tokens_panel import token_panel

ADMINS = frozenset({Role.ADMIN})
me = state.require_user(ADMINS)
ERRORS = (InvalidInput, PermissionDenied, NotFound, Conflict)

st.title("Users")
st.caption(
    "ADMIN manages users and everything else; HERO changes settings, prices and budgets and reads the audit "
    "log; USER generates within their budget and sees their own usage."
)


def _when(value: object) -> str:
    return "—" if value is None else f"{value:%Y-%m-%d %H:%M}"


def _change(label: str, fn: Callable[..., object], *args: object) -> None:
    """Run one core change in a transaction; flash on success, show the error at the control on failure."""
    try:
        with transaction(state.runtime().sessions) as session:
            fn(session, me.actor(), *args)
    except ERRORS as exc:
        st.error(str(exc))
    else:
        state.flash(label)
        st.rerun()


with state.db_session() as session:
    people = users.list_users(session, me.actor())
active_admins = [u for u in people if u.role is Role.ADMIN and u.active]

st.dataframe(
    pd.DataFrame(
        [
            {
                "username": u.username,
                "role": u.role.value,
                "status": "active" if u.active else "deactivated",
                "sign-in": f"locked until {_when(u.locked_until)}" if u.locked_until else "ok",
                "email (OIDC)": u.email or "—",
                "OIDC linked": u.oidc_linked,
                "last sign-in": _when(u.last_login_at),
                "created": _when(u.created_at),
            }
            for u in people
        ]
    ),
    hide_index=True,
    width="stretch",
)
if len(active_admins) == 1:
    st.info(
        f"{active_admins[0].username} is the only active admin, so that account cannot be demoted or "
        "deactivated: make someone else an admin first."
    )

with st.expander("Create a user", expanded=False), st.form("create_user", clear_on_submit=False):
    cols = st.columns(2)
    username = cols[0].text_input("Username", help="3-32 characters: a-z, 0-9, '.', '_' and '-'.")
    role = cols[1].selectbox("Role", list(Role), index=2, format_func=lambda r: r.value)
    password = cols[0].text_input("Password", type="password", help="At least 10 characters.")
    repeat = cols[1].text_input("Repeat the password", type="password")
    email = st.text_input("Email for OIDC sign-in (optional)")
    create = st.form_submit_button("Create user", type="primary")
if create:
    if password != repeat:
        st.error("The two passwords differ.")
    else:
        try:
            with transaction(state.runtime().sessions) as session:
                created = users.create_user(session, me.actor(), username, password, role or Role.USER)
                if email.strip():
                    oidc.set_email(session, me.actor(), created.id, email)
        except ERRORS as exc:
            st.error(str(exc))
        else:
            state.flash(f"Created {created.username} ({created.role.value}).")
            st.session_state["managed_user"] = created.username
            st.rerun()

st.subheader("Manage a user")
by_name = {u.username: u for u in people}
# Options are usernames (stable across role and status changes, so the selection stays put after a change).
picked = st.selectbox(
    "User",
    list(by_name),
    format_func=lambda n: f"{n} ({by_name[n].role.value}{'' if by_name[n].active else ', deactivated'})",
    key="managed_user",
)
chosen = by_name.get(picked) if picked is not None else None
if chosen is not None:
    last_admin = chosen.role is Role.ADMIN and chosen.active and len(active_admins) <= 1
    why_not = "the only active admin: make someone else an admin first" if last_admin else None

    role_col, active_col = st.columns(2)
    with role_col:
        new_role = st.selectbox(
            "Role",
            list(Role),
            index=list(Role).index(chosen.role),
            format_func=lambda r: r.value,
            disabled=last_admin,
            key=f"role-{chosen.id}",
            help=why_not,
        )
        if st.button("Change role", disabled=last_admin or new_role is chosen.role, key=f"set-role-{chosen.id}"):
            _change(f"{chosen.username} is now {new_role.value}.", users.set_role, chosen.id, new_role)
    with active_col:
        st.write("Account")
        if chosen.active:
            if st.button("Deactivate", disabled=last_admin, key=f"deactivate-{chosen.id}", help=why_not):
                _change(f"{chosen.username} is deactivated.", users.set_active, chosen.id, False)
        elif st.button("Reactivate", key=f"activate-{chosen.id}"):
            _change(f"{chosen.username} is active again.", users.set_active, chosen.id, True)
    if why_not:
        st.caption(f"Role and deactivation are disabled: {chosen.username} is {why_not}.")

    pw_col, mail_col = st.columns(2)
    with pw_col, st.form(f"reset-{chosen.id}", clear_on_submit=True):
        st.write("Reset password (also unlocks sign-in)")
        new_password = st.text_input("New password", type="password", key=f"pw-{chosen.id}")
        reset = st.form_submit_button("Reset password")
    if reset:
        _change(f"Password of {chosen.username} reset.", users.reset_password, chosen.id, new_password)
    with mail_col, st.form(f"email-{chosen.id}", clear_on_submit=False):
        st.write("Email for OIDC sign-in")
        new_email = st.text_input(
            "Email",
            value=chosen.email or "",
            key=f"mail-{chosen.id}",
            help="An OIDC sign-in with this (verified) email is linked to this account. A new email unlinks it.",
        )
        save_email = st.form_submit_button("Save email")
    if save_email:
        _change(f"Email of {chosen.username} saved.", oidc.set_email, chosen.id, new_email.strip() or None)

    if chosen.locked_until is not None:
        st.warning(f"Sign-in of {chosen.username} is locked until {_when(chosen.locked_until)} (wrong passwords).")
        if st.button("Unlock sign-in", key=f"unlock-{chosen.id}"):
            _change(f"Sign-in of {chosen.username} unlocked.", users.unlock, chosen.id)

    st.subheader(f"API tokens of {chosen.username}")
    token_panel(me, chosen, key=f"user-{chosen.id}")
