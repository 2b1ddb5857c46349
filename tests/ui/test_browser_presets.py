"""End to end in Debian's Chromium: an admin edits a quality preset on the Settings page (a slider, the unsaved
diff, save as a new global version, the table marking the edit) and sees what a provider change costs per month
before saving. Screenshots in test-artifacts/screenshots/
(settings-presets.png, settings-change-cost.png)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.ui.conftest import Console, RecordedContext, screenshot, sign_in, wait_for_app, wait_for_text
from tests.ui.test_browser_settings_playground import _choose, _metric

pytestmark = pytest.mark.browser


def test_edit_a_preset_and_see_the_monthly_cost_of_a_change(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    page = new_browser().new_page(height=1600)
    sign_in(page, console_with_accounts.url, "alice")
    page.get_by_role("heading", name="Provider settings").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    # The provider tab's preview: the monthly cost of the (untouched) form, no history in a new install.
    page.get_by_text("What this change costs per month").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    assert _metric(page, "What this change costs per month") == "no history"
    page.get_by_text("What this change costs per month").first.scroll_into_view_if_needed()  # type: ignore[attr-defined]
    screenshot(page, "settings-change-cost", in_readme=False)

    page.get_by_role("tab", name="Global settings and presets").click()  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_role("heading", name="Quality presets").scroll_into_view_if_needed()  # type: ignore[attr-defined]
    _choose(page, "Presets for provider", "fal.ai Qwen-Image")
    sliders = page.get_by_test_id("stSlider").filter(has_text="Inference steps").get_by_role("slider")  # type: ignore[attr-defined]
    fast = sliders.first  # the Fast column comes first
    fast.focus()
    fast.press("ArrowRight")
    fast.press("ArrowRight")
    page.wait_for_timeout(800)  # type: ignore[attr-defined]
    wait_for_app(page)
    page.get_by_role("button", name="Save presets").scroll_into_view_if_needed()  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]
    screenshot(page, "settings-presets", in_readme=False)
    page.get_by_role("button", name="Save presets").click()  # type: ignore[attr-defined]
    page.wait_for_timeout(800)  # type: ignore[attr-defined]
    wait_for_app(page)
    wait_for_text(page, "Saved fal.ai Qwen-Image's presets", console_with_accounts, name="presets-save")
