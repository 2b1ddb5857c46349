"""End to end in Debian's Chromium: an admin generates in the Playground (sandbox providers) and finds that
generation on the Usage page; creates a budget on the Budgets page, spends it in the Playground and sees the
refusal; a USER has Usage (their own) but no Budgets, by link or by URL. Screenshots in test-artifacts/screenshots/
(and docs/screenshots/ with IMAGEGATE_REFRESH_SCREENSHOTS=1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import create_engine, text

from tests.ui.conftest import Console, RecordedContext, screenshot, sign_in, wait_for_app, wait_for_text

pytestmark = pytest.mark.browser


SLOW_MS = 120_000
"""Room for a machine shared with other work: a page run can take many seconds."""


def _top(page: object, heading: str) -> None:
    """Scroll the page back to its title (Streamlit scrolls its main block, not the window) for a screenshot."""
    page.get_by_role("heading", name=heading).first.scroll_into_view_if_needed()  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]


def _open(page: object, url: str, heading: str) -> None:
    page.goto(url)  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    try:
        page.get_by_role("heading", name=heading).first.wait_for(timeout=120_000)  # type: ignore[attr-defined]
    except Exception:
        screenshot(page, f"failed-{heading.lower()}", in_readme=False)
        raise
    wait_for_app(page, SLOW_MS)


def _generate(page: object, console: Console, prompt: str) -> None:
    if "/playground" not in page.url:  # type: ignore[attr-defined]
        _open(page, f"{console.url}/playground", "Playground")
    page.get_by_label("Prompt", exact=True).fill(prompt)  # type: ignore[attr-defined]
    page.keyboard.press("Tab")  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    page.get_by_role("button", name="Generate").click()  # type: ignore[attr-defined]


def _generations(console: Console) -> list[str]:
    engine = create_engine(f"sqlite:///{console.data_dir / 'imagegate.db'}")
    try:
        with engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(text("SELECT id FROM generations ORDER BY created_at"))]
    finally:
        engine.dispose()


@pytest.mark.timeout(600)
def test_find_a_generation_on_usage_then_a_budget_refuses_in_the_playground(
    console_with_accounts: Console, new_browser: Callable[..., RecordedContext]
) -> None:
    console = console_with_accounts
    admin = new_browser()
    page = admin.new_page(height=1600)
    sign_in(page, f"{console.url}/playground", "alice", heading="Playground", timeout_ms=SLOW_MS)
    _generate(page, console, "a lighthouse at dusk")
    page.get_by_text("Done on fal-qwen (sandbox)").wait_for(timeout=120_000)  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    (generation,) = _generations(console)

    # Usage: the generation in the attempts, its spend in the charts (simulated: no provider is live).
    _open(page, f"{console.url}/usage", "Usage")
    page.get_by_text("Spend per day by provider: simulated spend").wait_for(timeout=120_000)  # type: ignore[attr-defined]
    page.get_by_role("heading", name="Recent attempts").scroll_into_view_if_needed()  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => [...document.querySelectorAll('[role=gridcell]')].some(c => c.innerText.includes('{generation}'))",
        timeout=20_000,
    )
    cells = page.locator("[role=gridcell]").all_inner_texts()  # type: ignore[attr-defined]
    assert "$0.015729" in cells, cells  # its cost, in the attempts and the per-provider table
    _top(page, "Usage")
    screenshot(page, "usage")

    # Budgets: a hard global budget that fits one more request, made on the page.
    _open(page, f"{console.url}/budgets", "Budgets")
    page.get_by_text("simulated", exact=True).click()  # type: ignore[attr-defined]  # the spend-mode radio
    wait_for_app(page, SLOW_MS)
    form = page.get_by_test_id("stForm").filter(has=page.get_by_role("button", name="Create budget"))  # type: ignore[attr-defined]
    form.get_by_label("Name", exact=True).fill("Everyone this month")
    form.get_by_label("Limit (USD)", exact=True).fill("0.02")
    page.get_by_role("button", name="Create budget").click()  # type: ignore[attr-defined]
    page.wait_for_timeout(800)  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    wait_for_text(page, "Budget 'Everyone this month' created.", console, name="budget-create", timeout_ms=120_000)
    page.get_by_text("spent $0.000000 + reserved $0.000000 of $0.020000").wait_for(timeout=10_000)  # type: ignore[attr-defined]

    # Spend it: the first request fits, the second is refused before anything is spent.
    _generate(page, console, "a lighthouse at dawn")
    page.get_by_text("Done on fal-qwen (sandbox)").first.wait_for(timeout=120_000)  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    # Without fallback (the free Qwen Space would take it at $0 otherwise): refused, nothing spent.
    page.get_by_text("Fall back to other providers").click()  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    _generate(page, console, "a lighthouse at night")
    try:
        page.get_by_text("Refused by a budget: nothing was spent").wait_for(timeout=120_000)  # type: ignore[attr-defined]
    except Exception:
        screenshot(page, "failed-refusal", in_readme=False)
        raise
    wait_for_app(page, SLOW_MS)
    page.get_by_text("Everyone this month").first.wait_for(timeout=10_000)  # type: ignore[attr-defined]
    screenshot(page, "playground-budget-refused", in_readme=False)

    _open(page, f"{console.url}/budgets", "Budgets")
    page.get_by_text("simulated", exact=True).click()  # type: ignore[attr-defined]
    wait_for_app(page, SLOW_MS)
    page.get_by_text("spent $0.015729 + reserved $0.000000 of $0.020000").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    _top(page, "Budgets")
    screenshot(page, "budgets")

    # A USER: Usage with their own (nothing yet), no Budgets by link or URL.
    user = new_browser()
    user_page = user.new_page(height=1000)
    sign_in(user_page, f"{console.url}/usage", "bob", heading="Usage", timeout_ms=SLOW_MS)
    user_page.get_by_role("heading", name="Usage").wait_for(timeout=120_000)  # type: ignore[attr-defined]
    user_page.get_by_text("Your own usage only.").wait_for(timeout=10_000)  # type: ignore[attr-defined]
    assert user_page.get_by_role("link", name="Budgets").count() == 0  # type: ignore[attr-defined]
    assert generation not in user_page.content()  # type: ignore[attr-defined]  # alice's generation is not his
    screenshot(user_page, "usage-user", in_readme=False)
    user_page.goto(f"{console.url}/budgets")  # type: ignore[attr-defined]
    wait_for_app(user_page, SLOW_MS)
    user_page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    assert user_page.get_by_role("heading", name="Budgets").count() == 0  # type: ignore[attr-defined]
    assert user_page.get_by_role("button", name="Create budget").count() == 0  # type: ignore[attr-defined]
