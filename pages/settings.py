"""Settings (read-only for now): every provider with its connection, key, routing settings, price and the
effective parameters a request would run with, each showing where its value comes from."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.overview import provider_overviews
from ui import state

state.require_user(state.STAFF)

st.title("Provider settings")
st.caption(
    "What each provider runs with today. Values come from the catalog defaults, the global settings, the "
    "provider's own settings and, per request, a preset and overrides; the *from* column says which."
)

with state.db_session() as session:
    overviews = provider_overviews(session)

summary = pd.DataFrame(
    [
        {
            "provider": o.spec.label,
            "id": o.provider,
            "mode": o.connection.mode.value,
            "key": o.key.masked,
            "priority": o.settings.priority if o.settings else None,
            "active": o.settings.active if o.settings else False,
            "default": o.settings.is_default if o.settings else False,
            "premium": o.spec.premium,
            "price": o.price_description or "no price",
            "one image": o.one_image.formatted if o.one_image else "—",
        }
        for o in overviews
    ]
)
st.dataframe(summary, hide_index=True, width="stretch")

for o in overviews:
    with st.expander(f"{o.spec.label} — {o.connection.mode.value}", expanded=False):
        st.markdown(f"**{o.spec.label}** (`{o.provider}`)")
        st.text(o.spec.description)
        left, right = st.columns(2)
        with left:
            st.markdown("**Connection**")
            st.text(f"mode: {o.connection.mode.value} — {o.connection.reason}")
            st.text(f"key: {o.key.masked}")
            if o.settings is not None:
                st.markdown("**Routing**")
                st.text(
                    f"priority {o.settings.priority} · "
                    f"{'active' if o.settings.active else 'inactive'} · "
                    f"{'default provider' if o.settings.is_default else 'not default'} · "
                    f"automatic routing {'on' if o.settings.auto_routing else 'off (by name only)'}"
                )
                st.text(f"settings version {o.settings_version}")
        with right:
            st.markdown("**Price**")
            st.text(o.price_description or "no price in force")
            if o.price_source:
                st.text(f"source: {o.price_source}")  # admin-entered text: shown as text, never markup
            if o.one_image is not None:
                st.metric("One image at these settings", o.one_image.formatted)
                st.caption(" · ".join(o.one_image.breakdown))
        for problem in o.problems:
            st.warning(problem)
        rows = o.effective_rows()
        if rows:
            table = pd.DataFrame(rows)
            table["value"] = table["value"].map(lambda v: "random" if v is None else str(v))
            st.dataframe(table, hide_index=True, width="stretch")
        if o.effective is not None and o.effective.notes:
            for note in o.effective.notes:
                st.info(note)
