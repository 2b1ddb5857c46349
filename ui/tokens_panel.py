"""The API-token block shared by the Users page (an admin, for anyone) and the Account page (your own):
list, create (the secret shown once, in this tab only), revoke. Widgets only: core.api_tokens decides."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from common.errors import InvalidInput, NotFound, PermissionDenied
from core import api_tokens
from core.security import Role
from core.users import UserView
from db.engine import transaction
from ui import state

_SHOWN_ONCE = "imagegate_new_token"
"""Session-state key of a just-created secret: shown on the next run, then forgotten."""


def _when(value: object) -> str:
    return "—" if value is None else f"{value:%Y-%m-%d %H:%M}"


def token_panel(viewer: UserView, owner: UserView, key: str) -> None:
    """Tokens of `owner` as `viewer` may manage them (core refuses anything else)."""
    fresh = st.session_state.pop(_SHOWN_ONCE, None)
    if fresh is not None and fresh[0] == key:
        st.success("Token created. Copy it now: it is not stored and will not be shown again.")
        st.code(fresh[1], language=None)

    with state.db_session() as session:
        tokens = api_tokens.list_tokens(session, viewer.actor(), owner.id)
    if tokens:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "id": t.id,
                        "name": t.name,
                        "token": f"{t.prefix}…",
                        "role": t.effective_role.value,
                        "status": t.status(),
                        "rate limit/min": t.rate_limit_per_minute or "default",
                        "created": _when(t.created_at),
                        "last used": _when(t.last_used_at),
                        "expires": _when(t.expires_at) if t.expires_at else "never",
                    }
                    for t in tokens
                ]
            ),
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption(f"{owner.username} has no API tokens.")

    roles = [r for r in (Role.USER, Role.HERO, Role.ADMIN) if api_tokens.capped_role(r, owner.role) is r]
    with st.form(f"new_token_{key}", clear_on_submit=False):
        cols = st.columns([3, 2, 2, 2])
        name = cols[0].text_input("Token name", placeholder="what uses it, e.g. nightly batch", key=f"tn-{key}")
        role = cols[1].selectbox(
            "Acts as",
            roles,
            index=len(roles) - 1,
            format_func=lambda r: r.value,
            key=f"tr-{key}",
            help="Never above the user's role; lowered at once if the user's role is lowered.",
        )
        days = cols[2].number_input(
            "Expires after (days, 0 = never)", 0, api_tokens.MAX_LIFETIME_DAYS, 90, key=f"td-{key}"
        )
        limit = cols[3].number_input("Requests per minute (0 = default)", 0, 100_000, 0, key=f"tl-{key}")
        create = st.form_submit_button("Create token")
    if create:
        try:
            with transaction(state.runtime().sessions) as session:
                created = api_tokens.create_token(
                    session,
                    viewer.actor(),
                    owner.id,
                    name,
                    role=role,
                    expires_in_days=int(days) or None,
                    rate_limit_per_minute=int(limit) or None,
                )
        except (InvalidInput, PermissionDenied, NotFound) as exc:
            st.error(str(exc))
        else:
            st.session_state[_SHOWN_ONCE] = (key, created.secret)
            st.rerun()

    active = [t for t in tokens if t.revoked_at is None]
    if active:
        cols = st.columns([3, 1])
        chosen = cols[0].selectbox(
            "Revoke a token", active, format_func=lambda t: f"{t.id}: {t.name} ({t.prefix}…)", key=f"rv-{key}"
        )
        cols[1].write("")
        if cols[1].button("Revoke", key=f"rvb-{key}", help="Refused from its next request on."):
            try:
                with transaction(state.runtime().sessions) as session:
                    api_tokens.revoke_token(session, viewer.actor(), chosen.id)
            except (PermissionDenied, NotFound) as exc:
                st.error(str(exc))
            else:
                state.flash(f"Token {chosen.name} ({chosen.prefix}…) revoked.")
                st.rerun()
