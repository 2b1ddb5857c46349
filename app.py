"""Imagegate console server: `streamlit run app.py` serves the pages (console.py) and the two routes that set
and clear the session cookie (ui/session_routes.py), which Streamlit pages cannot do themselves."""

from __future__ import annotations

import streamlit as st

from ui.session_routes import routes

app = st.App("console.py", routes=routes())
