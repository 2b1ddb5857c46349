"""Budgets (ADMIN and HERO): being written."""

from __future__ import annotations

import streamlit as st

from ui import state

user = state.require_user(state.STAFF)
st.title("Budgets")
