"""End to end in Debian's Chromium: the Users page (create a user, the last-admin rule shown), the Providers page in
emulator mode (inject a fault, watch generations fall back and the breaker open) and the Audit page.

The emulator runs in this process on a free port; the console (a real `streamlit run app.py`) and the CLI that
generates get IMAGEGATE_EMULATOR_URL, so fal-qwen, ideogram, huggingface and qwen run through their real client
libraries against it. Any request off this machine fails the test (`new_browser`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest

from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app
from tests.ui.conftest import (
    PASSWORD,
    ROOT,
    Console,
    RecordedContext,
    _run_console,
    cli,
    screenshot,
    wait_for_app,
    wait_for_text,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    with serve_in_thread(create_emulator_app(FaultBoard())) as server:
        yield server


@pytest.fixture(scope="module")
def emulated_console(tmp_path_factory: pytest.TempPathFactory, emulator: BackgroundServer) -> Iterator[Console]:
    """A console with alice (ADMIN) whose providers run against the emulator."""
    data_dir = tmp_path_factory.mktemp("console-data")
    cli(data_dir, "db", "upgrade")
    cli(data_dir, "users", "create", "alice", "--role", "ADMIN", "--password-stdin", stdin=PASSWORD + "\n")
    yield from _run_console(data_dir, {"IMAGEGATE_EMULATOR_URL": emulator.url})


def _generate(console: Console, emulator: BackgroundServer) -> dict[str, object]:
    env = {**os.environ, "IMAGEGATE_DATA_DIR": str(console.data_dir), "IMAGEGATE_EMULATOR_URL": emulator.url}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "generate", "a red fox in snow", "--json"],
        text=True, capture_output=True, check=False, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _fill(page: object, label: str, value: str) -> None:
    page.get_by_label(label, exact=True).fill(value)  # type: ignore[attr-defined]


def _open(page: object, url: str) -> None:
    page.goto(url)  # type: ignore[attr-defined]
    wait_for_app(page)


@pytest.mark.timeout(400)  # three or four generations through the CLI, each falling back after fal's retry
def test_users_providers_faults_and_audit(
    emulated_console: Console, emulator: BackgroundServer, new_browser: Callable[..., RecordedContext]
) -> None:
    console = emulated_console
    admin = new_browser()
    page = admin.new_page(height=1300)
    _open(page, console.url)
    _fill(page, "Username", "alice")
    _fill(page, "Password", PASSWORD)
    page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
    page.get_by_text("Provider settings").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)

    # Users: alice is the only admin, so her role and deactivate controls are disabled, with the reason.
    _open(page, f"{console.url}/users")
    page.get_by_role("heading", name="Users").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert page.get_by_text("alice is the only active admin, so").is_visible()  # type: ignore[attr-defined]
    assert page.get_by_role("button", name="Deactivate").is_disabled()  # type: ignore[attr-defined]
    assert page.get_by_role("button", name="Change role").is_disabled()  # type: ignore[attr-defined]
    assert page.get_by_text("Role and deactivation are disabled").is_visible()  # type: ignore[attr-defined]
    screenshot(page, "users-last-admin", in_readme=False)
    page.get_by_text("Create a user").click()  # type: ignore[attr-defined]
    wait_for_app(page)
    for label, value in (("Username", "carol"), ("Password", PASSWORD), ("Repeat the password", PASSWORD)):
        _fill(page, label, value)
        assert page.get_by_label(label, exact=True).input_value() == value  # type: ignore[attr-defined]
    page.get_by_role("button", name="Create user").click()  # type: ignore[attr-defined]
    wait_for_app(page)
    wait_for_text(page, "Created carol (USER).", console, name="users-create")
    # The new user is selected for management, and nothing about her is disabled.
    page.get_by_text("carol has no API tokens.").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert page.get_by_role("button", name="Deactivate").is_enabled()  # type: ignore[attr-defined]
    screenshot(page, "users")

    # Providers: emulator mode, breakers closed; inject a server error at fal (the first provider by priority).
    _open(page, f"{console.url}/providers")
    page.get_by_role("heading", name="Fault injection").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    fal = page.get_by_text("fal.ai Qwen-Image — emulator, breaker closed")  # type: ignore[attr-defined]
    assert fal.is_visible()
    form = page.get_by_test_id("stForm")  # type: ignore[attr-defined]
    form.get_by_test_id("stSelectbox").nth(1).click()
    page.keyboard.type("server_e")  # type: ignore[attr-defined]  # the list is virtual: filter it to the option
    page.get_by_role("option", name="server_error", exact=True).click()  # type: ignore[attr-defined]
    form.get_by_role("button", name="Inject fault").click()
    wait_for_app(page)
    wait_for_text(page, "fal-qwen: server_error.", console, name="providers-inject")
    assert httpx.get(f"{emulator.url}/_emulator/state").json()["providers"]["fal"]["fault"] == "server_error"
    screenshot(page, "providers-fault", in_readme=False)

    # Generations fall back from fal-qwen to the next provider; fal's failures open its breaker.
    for _ in range(4):
        result = _generate(console, emulator)
        attempts = result["attempts"]
        assert isinstance(attempts, list)
        assert result["status"] == "succeeded" and result["provider"] != "fal-qwen", result
        at_fal = [a for a in attempts if a["provider"] == "fal-qwen"]
        assert all(a["status"] == "failed" for a in at_fal), attempts
        if not at_fal:
            break  # fal is no longer tried: its breaker is open
    _open(page, f"{console.url}/providers")
    opened = page.get_by_text("fal.ai Qwen-Image — emulator, breaker open")  # type: ignore[attr-defined]
    opened.wait_for(timeout=30_000)
    opened.click()
    page.get_by_text("reason:").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    assert page.get_by_text("failures in a row").first.is_visible()  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]
    screenshot(page, "providers-breaker-open")

    # Clear the fault again from the page.
    page.get_by_role("button", name="Clear fal-qwen").click()  # type: ignore[attr-defined]
    wait_for_app(page)
    wait_for_text(page, "fal-qwen: faults cleared.", console, name="providers-clear")
    assert httpx.get(f"{emulator.url}/_emulator/state").json()["providers"]["fal"]["fault"] is None

    # Audit: the user created and the faults injected are in the log.
    _open(page, f"{console.url}/audit")
    page.get_by_role("heading", name="Audit log").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    page.get_by_text("Show the change").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    screenshot(page, "audit")
