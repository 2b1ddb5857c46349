"""The Playground through AppTest: every role reaches it; the estimate and budgets left follow the widgets before
anything is spent; Generate runs through the generation service (sandbox providers) with progress in a status box;
the gallery, a same-seed rerun, a budget's refusal, side by side across providers, and text never rendered as
markup."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import settings_service
from core.generation.budgets import create_budget
from core.security import Actor, Role
from db.engine import transaction
from emulator.faults import Fault, FaultBoard
from emulator.runner import serve_in_thread
from emulator.server import create_emulator_app
from tests.ui.apptest_helpers import Console, by_key, console, console_any_db, pg_admin_dsn, pg_session_database, texts

__all__ = ["console", "console_any_db", "pg_admin_dsn", "pg_session_database"]


def _estimate(at: AppTest) -> str:
    return next(m.value for m in at.metric if m.label == "Estimated cost")


def _generate(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception, at.exception


def _results(at: AppTest) -> list[str]:
    return [t for t in texts(at) if " · seed " in t]


@pytest.mark.parametrize("role", [Role.ADMIN, Role.HERO, Role.USER])
def test_every_role_reaches_the_playground(console: Console, role: Role) -> None:
    at = console.app(role, "playground")
    assert at.title[0].value == "Playground"
    assert _estimate(at) == "$0.015729"  # fal-qwen (priority 98) at its default 1024x768, before any prompt
    # Generate stays enabled without a prompt (a typed prompt is applied by the click on it); a click with none
    # says so at the prompt and runs nothing.
    _generate(at)
    assert [e.value for e in at.error] == ["prompt is empty; describe the image to generate"]
    assert not _results(at) and not at.get("status")


def test_the_estimate_and_budget_follow_the_widgets_before_anything_is_spent(console: Console) -> None:
    with transaction(console.runtime.sessions) as session:
        create_budget(
            session,
            Actor.system("test"),
            name="bob monthly",
            scope="user",
            scope_id=console.users[Role.USER].id,
            period="monthly",
            limit_micro_usd=1_000_000,
        )
    at = console.app(Role.USER, "playground")
    bars = [p.proto.text for p in at.get("progress")]
    assert bars == ["bob monthly (you, monthly, hard, simulated): $1.000000 left of $1.000000"]
    by_key(at.slider, "pg.count").set_value(3).run()  # type: ignore[attr-defined]
    assert _estimate(at) == "$0.047186"
    by_key(at.text_input, "pg.size").input("16:9").run()  # type: ignore[attr-defined]
    assert _estimate(at) != "$0.047186"
    by_key(at.selectbox, "pg.route").set_value("ideogram").run()  # type: ignore[attr-defined]
    assert _estimate(at) == "$0.180000"  # 3 images at Ideogram's DEFAULT speed, $0.06 each
    by_key(at.selectbox, "pg.preset").set_value("fast").run()  # type: ignore[attr-defined]
    assert _estimate(at) == "$0.090000"  # the Fast preset renders TURBO: $0.03
    assert _results(at) == []  # nothing ran


def test_bad_values_are_told_at_their_field(console: Console) -> None:
    at = console.app(Role.USER, "playground")
    by_key(at.text_input, "pg.size").input("huge").run()  # type: ignore[attr-defined]
    assert any("huge" in e.value for e in at.error)
    by_key(at.text_input, "pg.size").input("").run()  # type: ignore[attr-defined]
    by_key(at.text_input, "pg.seed").input("-4").run()  # type: ignore[attr-defined]
    assert any("seed" in e.value for e in at.error)
    assert by_key(at.text_input, "pg.seed").value == "-4"  # type: ignore[attr-defined]
    # Generate stays enabled; a click on a request nothing can run is refused by the service, which says why,
    # and nothing is generated or lost.
    by_key(at.text_area, "pg.prompt").input("a red fox").run()  # type: ignore[attr-defined]
    before = [e.value for e in at.error]
    _generate(at)
    after = [e.value for e in at.error]
    assert len(after) == len(before) + 1 and not _results(at), (before, after)
    refusals = [e for e in after if e.startswith("no provider can run this request")]
    assert len(refusals) == len([e for e in before if e.startswith("no provider can run this request")]) + 1
    assert "seed must be a whole number" in refusals[-1]
    assert by_key(at.text_area, "pg.prompt").value == "a red fox"  # type: ignore[attr-defined]
    assert by_key(at.text_input, "pg.seed").value == "-4"  # type: ignore[attr-defined]


def test_generate_shows_progress_then_the_image_with_its_cost_and_runs_again_with_the_same_seed(
    console_any_db: Console,
) -> None:
    console = console_any_db
    at = console.app(Role.USER, "playground")
    by_key(at.text_area, "pg.prompt").input("a red fox in snow").run()  # type: ignore[attr-defined]
    _generate(at)
    lines = texts(at)
    assert any("queued · position" in line for line in lines)  # the service's progress, live in the status box
    assert any(line.endswith("completed · 100%") for line in lines)
    assert len(at.get("image")) == 1 and len(at.get("download_button")) == 1
    (summary,) = _results(at)
    assert summary.startswith("fal-qwen (sandbox) · seed ")
    assert "cost $0.015729 (simulated)" in summary and "1 attempt(s) · succeeded" in summary
    seed = summary.split(" · seed ")[1].split(" ")[0]

    next(b for b in at.button if b.label == "Run again with the same seed").click().run()
    at.run()  # the rerun the button asked for
    assert not at.exception, at.exception
    results = _results(at)
    assert len(results) == 2 and all(f" · seed {seed} · " in r for r in results)


def test_a_hard_budget_refuses_and_nothing_is_spent(console_any_db: Console) -> None:
    console = console_any_db
    with transaction(console.runtime.sessions) as session:
        create_budget(
            session,
            Actor.system("test"),
            name="tiny",
            scope="user",
            scope_id=console.users[Role.USER].id,
            period="daily",
            limit_micro_usd=10_000,
        )
    at = console.app(Role.USER, "playground")
    by_key(at.text_area, "pg.prompt").input("a red fox").run()  # type: ignore[attr-defined]
    by_key(at.toggle, "pg.fallback").set_value(False).run()  # type: ignore[attr-defined]  # else the free Space runs it
    assert any("tiny has $0.010000 left" in w.value for w in at.warning), [w.value for w in at.warning]
    _generate(at)
    assert any("tiny" in e.value for e in at.error)
    assert [s.label for s in at.get("status")] == ["Refused by a budget: nothing was spent"]  # type: ignore[union-attr]
    assert _results(at) == []

    by_key(at.toggle, "pg.fallback").set_value(True).run()  # type: ignore[attr-defined]
    _generate(at)  # the next provider of the route (the free Qwen Space) takes it
    assert [r.split(" ")[0] for r in _results(at)] == ["qwen"]


def test_side_by_side_on_several_providers(console: Console) -> None:
    at = console.app(Role.HERO, "playground")
    by_key(at.text_area, "pg.prompt").input("a lighthouse").run()  # type: ignore[attr-defined]
    by_key(at.multiselect, "pg.compare.providers").select("sandbox").select("qwen").run()  # type: ignore[attr-defined]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sandbox (offline)"] == "$0.000000" and metrics["Qwen-Image Space (free)"] == "$0.000000"
    by_key(at.button, "pg.compare.go").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    results = _results(at)
    assert [r.split(" ")[0] for r in results] == ["sandbox", "qwen"]
    assert len(at.get("image")) == 2


def test_prompts_are_text_never_markup(console: Console) -> None:
    at = console.app(Role.USER, "playground")
    evil = "<img src=x onerror=alert(1)> **bold**"
    by_key(at.text_area, "pg.prompt").input(evil).run()  # type: ignore[attr-defined]
    _generate(at)
    assert f"prompt: {evil}" in texts(at)
    assert not any("onerror" in m.value for m in at.markdown)
    assert not any("onerror" in str(h.proto) for h in at.get("html"))


def test_through_the_emulator_a_failing_provider_falls_back_and_the_status_box_shows_it(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real client libraries against the local emulator: fal answers 500s, the service retries it once, falls
    back, and every step is written live into the status box."""
    with transaction(console.runtime.sessions) as session:
        data = settings_service.settings_json(settings_service.get_global_settings(session).settings)
        data.update({"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2})
        settings_service.save_global_settings(session, Actor.system("test"), data)
    board = FaultBoard()
    board.set_fault("fal", Fault.SERVER_ERROR, count=10)
    with serve_in_thread(create_emulator_app(board)) as server:
        monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
        at = console.app(Role.USER, "playground")
        by_key(at.text_area, "pg.prompt").input("a lighthouse at dusk").run()  # type: ignore[attr-defined]
        by_key(at.selectbox, "pg.route").set_value("fal-qwen").run()  # type: ignore[attr-defined]
        assert "emulator" in next(c.value for c in at.caption if c.value.startswith("on fal-qwen"))
        _generate(at)
    lines = texts(at)
    assert any("fal-qwen" in line and "retry" in line.lower() for line in lines), lines
    assert any("fallback" in line.lower() or "next provider" in line.lower() for line in lines), lines
    (summary,) = _results(at)
    served = summary.split(" ")[0]
    assert served != "fal-qwen" and "(emulator)" in summary
    assert "2 attempt(s)" in summary or "3 attempt(s)" in summary
