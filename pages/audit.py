"""Audit (ADMIN, HERO): who changed what and when, filtered by actor, entity, action and dates, with the
before/after of the change chosen."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from common.errors import InvalidInput
from core import audit, users
from ui import state

me = state.require_user(state.STAFF)
PAGE_SIZE = 200
ENTITIES = [
    "user", "provider", "provider_settings", "global_settings", "price", "budget", "webhook", "api_token",
    "alert_rule",
]  # fmt: skip

st.title("Audit log")
st.caption("Every change, with who made it (as the account was then), when (UTC), and the state before and after.")

with state.db_session() as session:
    people = users.list_users(session, me.actor())

cols = st.columns([2, 2, 2, 3])
who = cols[0].selectbox("Actor", [None, *people], format_func=lambda u: "anyone" if u is None else u.username)
entity = cols[1].selectbox(
    "Entity", [None, *ENTITIES], format_func=lambda e: "any" if e is None else e, accept_new_options=True
)
action = cols[2].text_input("Action", placeholder="e.g. user.set_role", help="The exact action name.")
today = datetime.now(UTC).date()
period = cols[3].date_input("Dates (UTC)", value=(today - timedelta(days=30), today), max_value=today)
target = st.text_input("Entity id", placeholder="e.g. a user id or provider name (exact)")

start, end = period if isinstance(period, tuple) and len(period) == 2 else (None, None)  # a range half picked
since = datetime.combine(start, time.min, UTC) if isinstance(start, date) else None
until = datetime.combine(end + timedelta(days=1), time.min, UTC) if isinstance(end, date) else None

try:
    with state.db_session() as session:
        entries = audit.list_entries(
            session,
            me.actor(),
            since=since,
            until=until,
            actor_id=who.id if who is not None else None,
            action=action.strip() or None,
            target_type=entity or None,
            target_id=target.strip() or None,
            limit=PAGE_SIZE,
        )
except InvalidInput as exc:
    st.error(str(exc))
    st.stop()


def _short(value: Any) -> str:
    if value is None:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


if not entries:
    st.info("No changes match these filters.")
    st.stop()
if len(entries) == PAGE_SIZE:
    st.caption(f"Showing the newest {PAGE_SIZE}; narrow the filters to see older ones.")

st.dataframe(
    pd.DataFrame(
        [
            {
                "id": e.id,
                "when (UTC)": e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                "who": e.actor_name,
                "role": e.actor_role,
                "action": e.action,
                "entity": e.target_type,
                "entity id": e.target_id,
                "changed": ", ".join(e.changed_fields()) or "—",
                "comment": e.comment or "",
            }
            for e in entries
        ]
    ),
    hide_index=True,
    width="stretch",
)

chosen = st.selectbox(
    "Show the change",
    entries,
    format_func=lambda e: f"#{e.id} {e.at:%Y-%m-%d %H:%M} {e.actor_name}: {e.action} {e.target_type} {e.target_id}",
)
if chosen is not None:
    changes = chosen.changed_fields()
    st.text(f"{chosen.actor_name} ({chosen.actor_role}) — {chosen.action} on {chosen.target_type} {chosen.target_id}")
    if chosen.comment:
        st.text(f"comment: {chosen.comment}")
    if changes:
        st.dataframe(
            pd.DataFrame([{"field": k, "before": _short(b), "after": _short(a)} for k, (b, a) in changes.items()]),
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("Nothing differs between before and after.")
    left, right = st.columns(2)
    left.caption("Before")
    left.json(chosen.before or {}, expanded=True)
    right.caption("After")
    right.json(chosen.after or {}, expanded=True)
