"""Sessions in Debian's Chromium: a deep link signed out, signing out (the old cookie is dead), a deactivation
ending a session at the next page load, and not a single request off this machine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import update

from core.runtime import open_runtime
from db.engine import transaction
from db.models import User
from tests.ui.conftest import PASSWORD, Console, RecordedContext, is_loopback, screenshot, wait_for_app

pytestmark = pytest.mark.browser

COOKIE = "imagegate_session"


def _sign_in(page: object, username: str) -> None:
    page.get_by_label("Username", exact=True).fill(username)  # type: ignore[attr-defined]
    page.get_by_label("Password", exact=True).fill(PASSWORD)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]


def _page_not_found_shown(page: object) -> bool:
    return bool(page.get_by_text("Page not found").count())  # type: ignore[attr-defined]


def _set_active(console: Console, username: str, active: bool) -> None:
    """Done in the database directly, as another admin's console or the CLI would."""
    runtime = open_runtime(f"sqlite:///{console.data_dir / 'imagegate.db'}", prepare=False)
    with transaction(runtime.sessions) as session:
        session.execute(update(User).where(User.username == username).values(active=active))
    runtime.engine.dispose()


def test_a_deep_link_shows_the_sign_in_form_and_then_opens_its_page(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    # /account: not alice's start page (that is Settings, which Streamlit shows at the bare URL).
    page = new_browser().new_page()
    page.goto(f"{console_with_accounts.url}/account")  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_text("Sign in to Imagegate").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]  # a dialog would have opened by now
    assert not _page_not_found_shown(page)
    screenshot(page, "sign-in", in_readme=False)

    _sign_in(page, "alice")
    page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    assert page.url == f"{console_with_accounts.url}/account"  # type: ignore[attr-defined]
    assert not _page_not_found_shown(page)
    assert page.get_by_role("heading", name="Provider settings").count() == 0  # type: ignore[attr-defined]


def test_signing_out_ends_the_session_and_the_old_cookie_no_longer_works(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    first = new_browser()
    page = first.new_page()
    page.goto(f"{console_with_accounts.url}/account")  # type: ignore[attr-defined]
    wait_for_app(page)
    _sign_in(page, "alice")
    page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    stolen = [c for c in first.context.cookies() if c["name"] == COOKIE]
    assert len(stolen) == 1

    # The same cookie in another browser works while the session is open...
    second = new_browser()
    second.context.add_cookies(stolen)
    other = second.new_page()
    other.goto(f"{console_with_accounts.url}/account")  # type: ignore[attr-defined]
    other.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]

    page.get_by_role("button", name="Sign out").click()  # type: ignore[attr-defined]
    page.get_by_text("Sign in to Imagegate").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    assert [c for c in first.context.cookies() if c["name"] == COOKIE] == []  # deleted from this browser

    # ...and not after the sign-out: the copy elsewhere is revoked in the database, at its next page load.
    other.reload()  # type: ignore[attr-defined]
    wait_for_app(other)
    other.get_by_text("Sign in to Imagegate").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert other.get_by_text("Your account").count() == 0  # type: ignore[attr-defined]


def test_deactivation_ends_a_session_at_the_next_page_load(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    bob = new_browser()
    page = bob.new_page()
    page.goto(console_with_accounts.url)  # type: ignore[attr-defined]
    wait_for_app(page)
    _sign_in(page, "bob")
    page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    _set_active(console_with_accounts, "bob", False)
    try:
        page.reload()  # type: ignore[attr-defined]
        wait_for_app(page)
        page.get_by_text("Sign in to Imagegate").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    finally:
        _set_active(console_with_accounts, "bob", True)
    # Reactivated, bob signs in again: the session from before the deactivation stays ended.
    page.reload()  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_text("Sign in to Imagegate").wait_for(timeout=30_000)  # type: ignore[attr-defined]


def test_nothing_the_console_shows_needs_the_internet(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    """Every request of the sign-in page, the settings page (all expanders open), the account page and a
    sign-out stays on this machine; the favicon is the console's own image."""
    browser = new_browser()
    page = browser.new_page()
    page.goto(console_with_accounts.url)  # type: ignore[attr-defined]
    wait_for_app(page)
    _sign_in(page, "alice")
    page.get_by_text("Provider settings").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    for expander in page.get_by_test_id("stExpander").all():  # type: ignore[attr-defined]
        expander.locator("summary").click()
    wait_for_app(page)
    page.get_by_role("link", name="Account").click()  # type: ignore[attr-defined]
    page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    page.wait_for_timeout(1500)  # type: ignore[attr-defined]  # late fetches (fonts, icons) get their chance

    icons = page.eval_on_selector_all(  # type: ignore[attr-defined]
        "link[rel~='icon']", "links => links.map(link => link.href)"
    )
    assert icons and all(is_loopback(href) for href in icons), icons
    assert any("/media/" in href for href in icons), icons  # served by this console, not a font server
    assert len(browser.requests) > 10  # the recorder saw the page's own traffic
    assert browser.external_requests() == []
