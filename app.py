"""Imagegate console server: `streamlit run app.py` serves the pages (ui/console.py) and the two routes that set
and clear the session cookie (ui/session_routes.py), which Streamlit pages cannot do themselves."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui.session_routes import routes

# An absolute path, so the console starts from any working directory.
app = st.App(str(Path(__file__).resolve().parent / "ui" / "console.py"), routes=routes())
