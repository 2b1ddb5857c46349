"""Account: who you are, what your role may do, and changing your own password."""

from __future__ import annotations

import streamlit as st

from common.errors import Conflict, InvalidInput, PermissionDenied
from core.security import Role
from core.users import change_own_password
from db.engine import transaction
from ui import state
from ui.tokens_panel import token_panel

user = state.require_user()

st.title("Your account")
st.text(f"username: {user.username}")
st.text(f"role: {user.role.value}")
if user.role is Role.USER:
    st.info("Your role may generate in the Playground within your budget and see your own usage on the Usage page.")
else:
    st.info(f"Your role ({user.role.value}) may view and change provider settings, prices and budgets.")

st.subheader("Change password")
with st.form("change_password", clear_on_submit=False):
    current = st.text_input("Current password", type="password")
    new = st.text_input("New password", type="password", help="At least 10 characters.")
    repeat = st.text_input("Repeat the new password", type="password")
    submitted = st.form_submit_button("Change password")
if submitted:
    if new != repeat:
        st.error("The two new passwords differ.")
    else:
        try:
            with transaction(state.runtime().sessions) as session:
                change_own_password(session, user.actor(), current, new)
        except (InvalidInput, PermissionDenied, Conflict) as exc:
            st.error(str(exc))
        else:
            st.success("Password changed.")

st.subheader("API tokens")
st.caption("For the REST API: a token acts as you, with your role or a lesser one, until it expires or you revoke it.")
token_panel(user, user, key="own")
