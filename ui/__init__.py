"""Streamlit-only helpers shared by app.py and the pages: session state, the runtime, banners. No rules here."""
