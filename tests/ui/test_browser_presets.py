"""End to end in Debian's Chromium: an admin edits a quality preset on the Settings page (a slider, the unsaved
diff, save as a new global version, the table marking the edit) and sees what a provider change costs per month
before saving. Screenshots in test-artifacts/screenshots/
(settings-presets.png, settings-change-cost.png)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from core import settings_service
from tests.ui.conftest import (
    Console,
    RecordedContext,
    click_as_a_person,
    screenshot,
    sign_in,
    wait_for_app,
    wait_for_text,
)
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


def test_a_typed_value_is_saved_by_one_click_on_save(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    """As a person edits: type into a text field and click Save straight away, with no Tab or Enter first. The
    click applies the typed value and saves it (a Save button enabled only once the value applied would ignore
    that click, and the edit would look saved when it was not)."""
    page = new_browser().new_page(height=1600)
    sign_in(page, console_with_accounts.url, "alice")
    page.get_by_role("heading", name="Provider settings").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    _choose(page, "Provider", "fal.ai Qwen-Image")
    page.get_by_label("Daily cost limit (USD)", exact=True).click()  # type: ignore[attr-defined]
    page.keyboard.type("5")  # type: ignore[attr-defined]
    click_as_a_person(page, page.get_by_role("button", name="Save as a new version"))  # type: ignore[attr-defined]
    wait_for_app(page)
    wait_for_text(page, "Saved fal.ai Qwen-Image settings as version 2.", console_with_accounts, name="typed-save")
    engine = create_engine(f"sqlite:///{console_with_accounts.data_dir / 'imagegate.db'}")
    try:
        with Session(engine) as session:
            saved = settings_service.get_provider_settings(session, "fal-qwen").settings
    finally:
        engine.dispose()
    assert saved.daily_cost_limit_usd == Decimal("5")
