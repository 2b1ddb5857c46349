"""Imagegate console pages: first-run admin set-up, sign-in, and the pages each role may see.

Served by app.py (`streamlit run app.py`), which adds the routes that keep a sign-in across reloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from common.errors import AccountLocked, InvalidInput, PermissionDenied
from core.security import Role
from core.setup_code import setup_code_matches
from core.users import authenticate, create_first_admin, needs_first_admin
from ui import oidc_sign_in, session_routes, state

# A local image: an icon name like ":material/image:" makes the browser fetch the favicon from Google's font
# server, and the console must never need the internet.
ROOT = Path(__file__).resolve().parents[1]
FAVICON = ROOT / "ui" / "assets" / "favicon.png"

st.set_page_config(page_title="Imagegate", page_icon=str(FAVICON), layout="wide")


@dataclass(frozen=True)
class PageSpec:
    url_path: str
    script: str
    title: str
    icon: str
    roles: frozenset[Role]


# Every page, in menu order; a role's first page is its start page. (Comments, not a docstring: Streamlit would
# print a bare string.) This router lives in ui/, not beside pages/: Streamlit runs a script from a `pages/`
# folder next to the main script directly, without this file's sign-in, when the first request a server process
# gets is a link to it. Every page also checks its user itself (`state.require_user`).
PAGES = (
    PageSpec("settings", str(ROOT / "pages" / "settings.py"), "Settings", ":material/tune:", state.STAFF),
    PageSpec("providers", str(ROOT / "pages" / "providers.py"), "Providers", ":material/dns:", state.STAFF),
    PageSpec("users", str(ROOT / "pages" / "users.py"), "Users", ":material/group:", frozenset({Role.ADMIN})),
    PageSpec("audit", str(ROOT / "pages" / "audit.py"), "Audit log", ":material/history:", state.STAFF),
    PageSpec("account", str(ROOT / "pages" / "account.py"), "Account", ":material/person:", frozenset(Role)),
    PageSpec("playground", str(ROOT / "pages" / "playground.py"), "Playground", ":material/brush:", frozenset(Role)),
    PageSpec("usage", str(ROOT / "pages" / "usage.py"), "Usage", ":material/monitoring:", frozenset(Role)),
    PageSpec("budgets", str(ROOT / "pages" / "budgets.py"), "Budgets", ":material/savings:", state.STAFF),
)


def _narrow() -> DeltaGenerator:
    """Forms read better at about half the wide layout."""
    column, _ = st.columns([3, 2])
    return column


def _landing(page: str, role: Role) -> str:
    """The page to open after sign-in: the one the link named, if this role has it; else the start page."""
    return page if any(p.url_path == page and role in p.roles for p in PAGES) else ""


def first_run_form(page: str) -> None:
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
    except (InvalidInput, PermissionDenied) as exc:
        st.error(str(exc))
        return
    state.sign_in(user, page=_landing(page, user.role), flash_key="admin-created")


def sign_in_form(page: str) -> None:
    st.title("Sign in to Imagegate")
    with _narrow(), st.form("sign_in", clear_on_submit=False):
        username = st.text_input("Username")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not session_routes.served():
        st.caption("Started without its session routes (`streamlit run app.py` has them): a reload signs you out.")
    oidc_sign_in.offer(page, _landing)
    if not submitted:
        return
    try:
        user = authenticate(state.runtime().sessions, username, password)
    except AccountLocked as exc:
        st.error(str(exc).capitalize())
        return
    if user is None:
        st.error("Unknown username or wrong password (or the account is deactivated).")
        return
    state.sign_in(user, page=_landing(page, user.role))


def _form_page(form: Callable[[str], None], page: str) -> Callable[[], None]:
    def show_form() -> None:
        form(page)

    return show_form


def signed_out_navigation(form: Callable[[str], None], title: str) -> None:
    """The form at the start URL and at every page's own URL: a deep link (or a reload after the session ended)
    shows the form, not Streamlit's "Page not found", and after sign-in opens the page it named."""
    pages = [st.Page(_form_page(form, ""), title=title, icon=":material/key:", url_path="welcome", default=True)]
    pages += [st.Page(_form_page(form, p.url_path), title=title, url_path=p.url_path) for p in PAGES]
    st.navigation(pages, position="hidden").run()


def main() -> None:
    runtime = state.get_runtime_or_stop()
    state.offline_banner()
    with runtime.sessions() as session:
        fresh = needs_first_admin(session)
    if fresh:
        signed_out_navigation(first_run_form, "First run")
        return
    user = state.current_user()
    if user is None:
        signed_out_navigation(sign_in_form, "Sign in")
        return

    # A page left out of a role's list cannot be reached, by link or by URL.
    mine = [p for p in PAGES if user.role in p.roles]
    pages = [
        st.Page(p.script, title=p.title, icon=p.icon, url_path=p.url_path, default=i == 0) for i, p in enumerate(mine)
    ]
    with st.sidebar:
        st.caption(f"Signed in as **{user.username}** ({user.role.value})")
        if st.button("Sign out"):
            state.sign_out()
    state.show_flash()
    st.navigation(pages).run()


main()
