"""End to end in Debian's Chromium: a Playground generation whose provider runs against the emulator (the real
fal client speaking fal's queue API to the local copy), showing the image, the mode and the cost."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from emulator.faults import FaultBoard
from emulator.runner import serve_in_thread
from emulator.server import create_emulator_app
from tests.ui.conftest import PASSWORD, Console, RecordedContext, _run_console, cli, screenshot, wait_for_app

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def emulated_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with serve_in_thread(create_emulator_app(FaultBoard())) as emulator:
        data_dir = tmp_path_factory.mktemp("console-data")
        cli(data_dir, "db", "upgrade")
        cli(data_dir, "users", "create", "alice", "--role", "ADMIN", "--password-stdin", stdin=PASSWORD + "\n")
        yield from _run_console(data_dir, {"IMAGEGATE_EMULATOR_URL": emulator.url})


def test_a_playground_generation_through_the_emulator_shows_its_image_and_cost(
    emulated_console: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    page = new_browser().new_page(height=1300)
    page.goto(f"{emulated_console.url}/playground")  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_label("Username", exact=True).fill("alice")  # type: ignore[attr-defined]
    page.get_by_label("Password", exact=True).fill(PASSWORD)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
    page.get_by_role("heading", name="Playground").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_label("Prompt", exact=True).fill("a heron at dawn")  # type: ignore[attr-defined]
    page.keyboard.press("Tab")  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_text("on fal-qwen (emulator").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Generate").click()  # type: ignore[attr-defined]
    page.get_by_text("Done on fal-qwen (emulator)").wait_for(timeout=90_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    assert page.get_by_test_id("stImage").count() == 1  # type: ignore[attr-defined]
    page.get_by_text("cost $0.015729 (simulated)").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    screenshot(page, "playground-emulator", in_readme=False)
