"""End to end in Debian's Chromium: a fresh console, the set-up code read from its terminal output, the first
admin created, the Settings page shown, and a USER kept away from it even by URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ui.conftest import Console, wait_for_app

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "correct horse battery"


def _setup_code(console: Console) -> str:
    match = re.search(r"\b([A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4})\b", console.output())
    assert match, f"no set-up code in the console output:\n{console.output()}"
    return match.group(1)


def _fill(page: object, label: str, value: str) -> None:
    page.get_by_label(label, exact=True).fill(value)  # type: ignore[attr-defined]


def test_first_run_sign_in_and_roles(console: Console, browser: object) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page.goto(console.url)
    wait_for_app(page)
    assert page.get_by_text("Welcome to Imagegate").is_visible()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "first-run.png"))

    # The page waits for the set-up code; the code was printed only in the terminal.
    code = _setup_code(console)
    assert code not in page.content()
    _fill(page, "Set-up code", "ZZZZ-ZZZZ-ZZZZ")
    _fill(page, "Admin username", "alice")
    _fill(page, "Password", PASSWORD)
    _fill(page, "Repeat the password", PASSWORD)
    page.get_by_role("button", name="Create admin account").click()
    wait_for_app(page)
    assert page.get_by_text("set-up code is not right").is_visible()
    assert page.get_by_label("Admin username", exact=True).input_value() == "alice"

    _fill(page, "Set-up code", code)
    page.get_by_role("button", name="Create admin account").click()
    wait_for_app(page)
    page.get_by_text("Provider settings").first.wait_for(timeout=30_000)
    assert page.get_by_text("Sandbox mode").first.is_visible()
    page.get_by_text("fal.ai Qwen-Image — sandbox").click()
    fal = page.get_by_test_id("stExpander").filter(has_text="fal.ai Qwen-Image — sandbox")
    fal.get_by_text("One image at these settings").wait_for(timeout=10_000)
    assert fal.get_by_text("$0.015729").first.is_visible()
    page.set_viewport_size({"width": 1400, "height": 1900})
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "settings.png"))

    # A USER account, made with the CLI against the same database.
    env_cli = [sys.executable, "-m", "cli.main", "users", "create", "bob", "--role", "USER", "--password-stdin"]
    subprocess.run(
        env_cli, input=PASSWORD + "\n", text=True, check=True, cwd=ROOT,
        env={**os.environ, "IMAGEGATE_DATA_DIR": str(console.data_dir)},
    )
    user_page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    user_page.goto(console.url)
    wait_for_app(user_page)
    _fill(user_page, "Username", "bob")
    _fill(user_page, "Password", PASSWORD)
    user_page.get_by_role("button", name="Sign in").click()
    wait_for_app(user_page)
    user_page.get_by_text("Your account").first.wait_for(timeout=30_000)
    assert user_page.get_by_role("link", name="Settings").count() == 0

    # By URL: a reload is a new session, so bob signs in again right on /settings; his role has no such page,
    # so he lands on his own page instead.
    user_page.goto(f"{console.url}/settings")
    wait_for_app(user_page)
    assert user_page.get_by_text("Page not found").is_visible()
    user_page.keyboard.press("Escape")
    user_page.get_by_text("Page not found").wait_for(state="hidden", timeout=10_000)
    _fill(user_page, "Username", "bob")
    _fill(user_page, "Password", PASSWORD)
    user_page.get_by_role("button", name="Sign in").click()
    wait_for_app(user_page)
    user_page.get_by_text("Your account").first.wait_for(timeout=30_000)
    assert user_page.get_by_text("Provider settings").count() == 0
    user_page.screenshot(path=str(SHOTS / "user-account.png"))
