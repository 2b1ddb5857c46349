"""End to end in Debian's Chromium: an admin moves a slider on the Settings page and sees the estimate change,
saves and finds the new version in the history, then generates in the Playground (sandbox providers) and sees the
image and its cost; a USER has the Playground but no Settings. Screenshots in test-artifacts/screenshots/ (and the
README's in docs/screenshots/ with IMAGEGATE_REFRESH_SCREENSHOTS=1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.ui.conftest import (
    Console,
    RecordedContext,
    click_as_a_person,
    screenshot,
    sign_in,
    wait_for_app,
    wait_for_text,
)

pytestmark = pytest.mark.browser


def _metric(page: object, label: str) -> str:
    metric = page.get_by_test_id("stMetric").filter(has_text=label).first  # type: ignore[attr-defined]
    return str(metric.get_by_test_id("stMetricValue").inner_text())


def _choose(page: object, label: str, option: str) -> None:
    """Pick `option` (text it starts with) in the visible selectbox labelled `label`."""
    box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True)).first  # type: ignore[attr-defined]
    box.click()
    page.get_by_role("option").filter(has_text=option).first.click()  # type: ignore[attr-defined]
    wait_for_app(page)


def test_slider_estimate_save_history_and_a_playground_run(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    console = console_with_accounts
    admin = new_browser()
    page = admin.new_page(height=1500)
    sign_in(page, console.url, "alice")
    page.get_by_role("heading", name="Provider settings").wait_for(timeout=30_000)  # type: ignore[attr-defined]

    _choose(page, "Provider", "fal.ai Qwen-Image")
    assert _metric(page, "One image at these settings") == "$0.015729"
    assert _metric(page, "A request (1 image)") == "$0.015729"
    # Move the "Number of images" slider one step with the keyboard, as a person would.
    slider = page.get_by_test_id("stSlider").filter(has_text="Number of images").get_by_role("slider")  # type: ignore[attr-defined]
    slider.focus()
    slider.press("ArrowRight")
    wait_for_app(page)
    page.get_by_text("A request (2 images)").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    assert _metric(page, "A request (2 images)") == "$0.031457"  # round(2 x 0.786432 MP x $0.02)
    steps = page.get_by_test_id("stSlider").filter(has_text="Inference steps").get_by_role("slider")  # type: ignore[attr-defined]
    steps.focus()
    for _ in range(5):
        steps.press("ArrowRight")
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_text("Not saved yet").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]  # the preview caught up with the last key press
        "() => [...document.querySelectorAll('[role=gridcell]')].some(c => c.innerText.trim() === '30')",
        timeout=10_000,
    )
    screenshot(page, "settings")

    page.get_by_label("Comment for this version").first.fill("two images, more steps")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Save as a new version").click()  # type: ignore[attr-defined]
    page.wait_for_timeout(800)  # type: ignore[attr-defined]
    wait_for_app(page)
    wait_for_text(page, "Saved fal.ai Qwen-Image settings as version 2.", console, name="settings-save")
    history = page.get_by_test_id("stDataFrame").filter(has=page.get_by_text("rollback of"))  # type: ignore[attr-defined]
    page.get_by_role("heading", name="History").first.scroll_into_view_if_needed()  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]
    assert history.count() >= 0  # the grid draws on a canvas; its cells are read below
    cells = page.locator("[role=gridcell]").all_inner_texts()  # type: ignore[attr-defined]
    assert "two images, more steps" in cells, cells
    screenshot(page, "settings-history", in_readme=False)
    for tab, name in (
        ("Global settings and presets", "settings-global"),
        ("Prices", "settings-prices"),
        ("Import and export", "settings-import"),
    ):
        page.get_by_role("tab", name=tab).click()  # type: ignore[attr-defined]
        page.wait_for_timeout(300)  # type: ignore[attr-defined]
        page.evaluate("window.scrollTo(0, 0)")  # type: ignore[attr-defined]
        screenshot(page, name, in_readme=False)

    # The Playground: the estimate before anything runs, then a generation with its image and cost.
    page.goto(f"{console.url}/playground")  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_role("heading", name="Playground").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert _metric(page, "Estimated cost") == "$0.015729"  # the count is the request's own: 1 image
    count = page.get_by_test_id("stSlider").filter(has_text="Images").get_by_role("slider")  # type: ignore[attr-defined]
    count.focus()
    count.press("ArrowRight")
    wait_for_app(page)
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.body.innerText.includes('$0.031457')", timeout=10_000
    )
    assert _metric(page, "Estimated cost") == "$0.031457"  # two images
    # As a person does it: type the prompt, then one mouse click on Generate (no Tab or Ctrl+Enter first: the
    # click itself applies the prompt, and must also run it).
    page.get_by_label("Prompt", exact=True).click()  # type: ignore[attr-defined]
    page.keyboard.type("a red fox in snow")  # type: ignore[attr-defined]
    click_as_a_person(page, page.get_by_role("button", name="Generate"))  # type: ignore[attr-defined]
    page.get_by_text("Done on fal-qwen (sandbox)").wait_for(timeout=60_000)  # type: ignore[attr-defined]
    wait_for_app(page)
    images = page.get_by_test_id("stImage")  # type: ignore[attr-defined]
    assert images.count() == 2
    page.get_by_text("cost $0.031457 (simulated)").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    assert page.get_by_role("button", name="Download image 1").count() == 1  # type: ignore[attr-defined]
    screenshot(page, "playground")

    # A USER: the Playground with their budget, no Settings.
    user = new_browser()
    user_page = user.new_page(height=1000)
    sign_in(user_page, f"{console.url}/playground", "bob")
    user_page.get_by_role("heading", name="Playground").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    assert user_page.get_by_role("link", name="Settings").count() == 0  # type: ignore[attr-defined]
    assert _metric(user_page, "Estimated cost") == "$0.015729"
    screenshot(user_page, "playground-user", in_readme=False)
