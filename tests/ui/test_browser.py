"""End to end in Debian's Chromium: a fresh console, the set-up code read from its terminal output, the first
admin created, the Settings page shown and kept across a reload, and a USER kept away from it even by URL.
Every browser here records its requests; any request off this machine fails the test (see `new_browser`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from tests.ui.conftest import PASSWORD, Console, RecordedContext, cli, screenshot, wait_for_app

pytestmark = pytest.mark.browser

COOKIE = "imagegate_session"


def _setup_code(console: Console) -> str:
    match = re.search(r"\b([A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4})\b", console.output())
    assert match, f"no set-up code in the console output:\n{console.output()}"
    return match.group(1)


def _fill(page: object, label: str, value: str) -> None:
    page.get_by_label(label, exact=True).fill(value)  # type: ignore[attr-defined]


def _session_cookie(context: RecordedContext) -> dict[str, object]:
    cookies = [c for c in context.context.cookies() if c["name"] == COOKIE]
    assert len(cookies) == 1, context.context.cookies()
    return dict(cookies[0])


def test_first_run_sign_in_reload_and_roles(
    console: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    admin = new_browser()
    page = admin.new_page()
    page.goto(console.url)  # type: ignore[attr-defined]
    wait_for_app(page)
    assert page.get_by_text("Welcome to Imagegate").is_visible()  # type: ignore[attr-defined]
    screenshot(page, "first-run")

    # The page waits for the set-up code; the code was printed only in the terminal.
    code = _setup_code(console)
    assert code not in page.content()  # type: ignore[attr-defined]
    _fill(page, "Set-up code", "ZZZZ-ZZZZ-ZZZZ")
    _fill(page, "Admin username", "alice")
    _fill(page, "Password", PASSWORD)
    _fill(page, "Repeat the password", PASSWORD)
    page.get_by_role("button", name="Create admin account").click()  # type: ignore[attr-defined]
    wait_for_app(page)
    assert page.get_by_text("set-up code is not right").is_visible()  # type: ignore[attr-defined]
    assert page.get_by_label("Admin username", exact=True).input_value() == "alice"  # type: ignore[attr-defined]

    _fill(page, "Set-up code", code)
    page.get_by_role("button", name="Create admin account").click()  # type: ignore[attr-defined]
    page.get_by_text("Provider settings").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    assert page.get_by_text("Your admin account was created").is_visible()  # type: ignore[attr-defined]

    # The session cookie: HttpOnly (no script can read it), SameSite=Strict, expiring in 12 hours.
    cookie = _session_cookie(admin)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert abs(float(cookie["expires"]) - (time.time() + 12 * 3600)) < 120  # type: ignore[arg-type]
    assert page.evaluate("document.cookie").find(COOKIE) == -1  # type: ignore[attr-defined]

    # A reload is a new Streamlit session: the cookie keeps alice signed in, on the same page.
    page.reload()  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_text("Provider settings").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert page.get_by_text("Sign in to Imagegate").count() == 0  # type: ignore[attr-defined]
    assert page.get_by_text("Sandbox mode").first.is_visible()  # type: ignore[attr-defined]
    page.get_by_test_id("stSelectbox").first.click()  # type: ignore[attr-defined]  # the provider picker
    option = page.get_by_role("option").filter(has_text="fal.ai Qwen-Image · $0.015729/image · sandbox")  # type: ignore[attr-defined]
    assert option.count() == 1
    page.keyboard.press("Escape")  # type: ignore[attr-defined]
    page.get_by_text("One image at these settings").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    screenshot(page, "settings-start", in_readme=False)  # the README's settings.png: the Settings browser test

    # A USER account, made with the CLI against the same database.
    cli(console.data_dir, "users", "create", "bob", "--role", "USER", "--password-stdin", stdin=PASSWORD + "\n")
    user = new_browser()
    user_page = user.new_page(height=900)
    user_page.goto(console.url)  # type: ignore[attr-defined]
    wait_for_app(user_page)
    _fill(user_page, "Username", "bob")
    _fill(user_page, "Password", PASSWORD)
    user_page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
    user_page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(user_page)
    assert user_page.get_by_role("link", name="Settings").count() == 0  # type: ignore[attr-defined]

    # By URL: bob stays signed in, and his role has no Settings page, so Streamlit says so over his own page.
    user_page.goto(f"{console.url}/settings")  # type: ignore[attr-defined]
    wait_for_app(user_page)
    user_page.get_by_text("Page not found").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    user_page.keyboard.press("Escape")  # type: ignore[attr-defined]
    user_page.get_by_text("Page not found").wait_for(state="hidden", timeout=10_000)  # type: ignore[attr-defined]
    user_page.get_by_text("Your account").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert user_page.get_by_role("heading", name="Provider settings").count() == 0  # type: ignore[attr-defined]
    screenshot(user_page, "user-account", in_readme=False)
