"""The Settings page through AppTest: who reaches it, editing one provider with errors at the field and a live
preview (with what the change costs per month), saving versions, the side-by-side diff and rollback, deleting a
provider's settings, global settings, editable presets, prices, import and export."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from streamlit.testing.v1 import AppTest

from core import price_store, settings_service, transfer
from core.security import Actor, Role
from tests.core.spend.rollup_seed import add_rollup
from tests.ui.apptest_helpers import ROOT, Console, by_key, console, console_any_db, pg_admin_dsn, pg_session_database
from ui.widgets import NOT_SAVED_PROBLEMS, NOT_SAVED_UNCHANGED

__all__ = ["console", "console_any_db", "pg_admin_dsn", "pg_session_database"]


def _version(console: Console, provider: str) -> int:
    with console.runtime.sessions() as session:
        return settings_service.get_provider_settings(session, provider).version


def _pick(at: AppTest, provider: str) -> None:
    by_key(at.selectbox, "settings.provider").set_value(provider).run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@pytest.mark.parametrize("role", [Role.ADMIN, Role.HERO])
def test_staff_reach_settings(console: Console, role: Role) -> None:
    at = console.app(role, "settings")
    assert at.title[0].value == "Provider settings"
    assert {"Provider", "Global settings and presets", "Prices", "Import and export"} <= {t.label for t in at.tabs}


def test_a_user_cannot_reach_settings_by_link_or_url(console: Console) -> None:
    at = console.app(Role.USER)
    assert at.title[0].value != "Provider settings"
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(str(ROOT / "pages" / "settings.py"))


def test_the_picker_shows_price_mode_and_health(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    picker = by_key(at.selectbox, "settings.provider")
    labels = picker.options  # type: ignore[attr-defined]
    fal = next(label for label in labels if label.startswith("fal.ai Qwen-Image"))
    assert fal == "fal.ai Qwen-Image · $0.015729/image · sandbox · not configured"
    summary = at.dataframe[0].value.set_index("id")
    assert summary.loc["sandbox", "health"] in {"healthy", "degraded", "down"}


def test_sliders_move_within_the_catalog_range_and_the_preview_follows(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    _pick(at, "fal-qwen")
    v = _version(console, "fal-qwen")
    steps = by_key(at.slider, f"ps.fal-qwen.{v}.num_inference_steps")
    assert (steps.min, steps.max) == (1, 50)  # type: ignore[attr-defined]
    guidance = by_key(at.slider, f"ps.fal-qwen.{v}.guidance_scale")
    assert (guidance.min, guidance.max) == (0.0, 20.0)  # type: ignore[attr-defined]
    assert _metric(at, "One image at these settings") == "$0.015729"
    assert _metric(at, "A request (1 image)") == "$0.015729"

    steps.set_value(37).run()  # type: ignore[attr-defined]
    by_key(at.slider, f"ps.fal-qwen.{v}.num_images").set_value(3).run()  # type: ignore[attr-defined]
    assert _metric(at, "A request (3 images)") == "$0.047186"  # round(3 x 0.786432 MP x $0.02), once
    preview = next(df.value for df in at.dataframe if "parameter" in df.value.columns).set_index("parameter")
    assert preview.loc["num_inference_steps", "value"] == "37"
    assert preview.loc["num_inference_steps", "from"] == "the provider settings"
    assert preview.loc["negative_prompt", "from"] in {"the catalog default", "the global settings"}
    # Not saved: the page says what would change, and the database is untouched.
    unsaved = next(df.value for df in at.dataframe if "this form" in df.value.columns).set_index("field")
    assert unsaved.loc["params.num_inference_steps", "this form"] == "37"
    assert _version(console, "fal-qwen") == v


def test_errors_show_at_the_field_and_the_form_keeps_its_input(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    _pick(at, "fal-qwen")
    v = _version(console, "fal-qwen")
    by_key(at.text_input, f"ps.fal-qwen.{v}.image_size").input("huge").run()  # type: ignore[attr-defined]
    by_key(at.text_input, f"ps.fal-qwen.{v}.daily").input("1.0000001").run()  # type: ignore[attr-defined]
    by_key(at.number_input, f"ps.fal-qwen.{v}.priority").set_value(5000).run()  # type: ignore[attr-defined]
    errors = [e.value for e in at.error]
    assert any(e.startswith("image_size") and "huge" in e for e in errors), errors
    assert any("priority 5000 is above the maximum of 1000" in e for e in errors), errors
    assert any("daily_cost_limit_usd" in e for e in errors), errors
    by_key(at.button, f"ps.fal-qwen.{v}.save").click().run()  # type: ignore[attr-defined]
    assert NOT_SAVED_PROBLEMS in [e.value for e in at.error]  # a click on an invalid form says so, saves nothing
    assert _version(console, "fal-qwen") == v
    assert by_key(at.text_input, f"ps.fal-qwen.{v}.image_size").value == "huge"  # type: ignore[attr-defined]
    # Fixing one field clears its message only.
    by_key(at.text_input, f"ps.fal-qwen.{v}.image_size").input("16:9").run()  # type: ignore[attr-defined]
    errors = [e.value for e in at.error]
    assert not any(e.startswith("image_size") for e in errors)
    assert any("priority 5000" in e for e in errors)


def test_save_makes_a_version_then_diff_and_rollback(console_any_db: Console) -> None:
    console = console_any_db
    at = console.app(Role.HERO, "settings")
    _pick(at, "huggingface")
    v = _version(console, "huggingface")
    by_key(at.slider, f"ps.huggingface.{v}.guidance_scale").set_value(7.5).run()  # type: ignore[attr-defined]
    by_key(at.number_input, f"ps.huggingface.{v}.priority").set_value(42).run()  # type: ignore[attr-defined]
    by_key(at.text_input, f"ps.huggingface.{v}.comment").input("sharper, lower").run()  # type: ignore[attr-defined]
    by_key(at.button, f"ps.huggingface.{v}.save").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    assert _version(console, "huggingface") == v + 1
    assert any(f"version {v + 1}" in s.value for s in at.success)
    with console.runtime.sessions() as session:
        saved = settings_service.get_provider_settings(session, "huggingface")
    assert saved.settings.priority == 42 and saved.settings.params["guidance_scale"] == 7.5
    assert saved.comment == "sharper, lower" and saved.updated_by == "hero"
    # Saving did not pin everything else: parameters left alone still inherit.
    assert set(saved.settings.params) == {"guidance_scale"}

    history = next(df.value for df in at.dataframe if "rollback of" in df.value.columns)
    assert list(history["version"])[:2] == [v + 1, v]
    diff = next(df.value for df in at.dataframe if f"version {v + 1}" in df.value.columns).set_index("field")
    assert diff.loc["priority", f"version {v}"] == "90" and diff.loc["priority", f"version {v + 1}"] == "42"
    assert diff.loc["params.guidance_scale", f"version {v + 1}"] == "7.5"

    by_key(at.selectbox, "ph.huggingface.rollback").set_value(v).run()  # type: ignore[attr-defined]
    by_key(at.button, "ph.huggingface.rollback.go").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    assert _version(console, "huggingface") == v + 2
    with console.runtime.sessions() as session:
        rolled = settings_service.get_provider_settings(session, "huggingface")
    assert rolled.settings.priority == 90 and "guidance_scale" not in rolled.settings.params
    # The form reloads from the new version.
    assert by_key(at.number_input, f"ps.huggingface.{v + 2}.priority").value == 90  # type: ignore[attr-defined]


def test_a_stale_form_is_refused_and_keeps_its_input(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    _pick(at, "sandbox")
    v = _version(console, "sandbox")
    by_key(at.number_input, f"ps.sandbox.{v}.priority").set_value(11).run()  # type: ignore[attr-defined]
    with console.runtime.sessions.begin() as session:  # someone else saves first
        settings_service.update_provider_settings(
            session,
            Actor(user_id=console.users[Role.HERO].id, username="hero", role=Role.HERO),
            "sandbox",
            {"priority": 12},
        )
    by_key(at.button, f"ps.sandbox.{v}.save").click().run()  # type: ignore[attr-defined]
    assert any("changed since you loaded" in e.value for e in at.error), [e.value for e in at.error] + [
        s.value for s in at.success
    ]
    assert by_key(at.number_input, f"ps.sandbox.{v}.priority").value == 11  # type: ignore[attr-defined]


def test_global_settings_edit_with_errors_at_the_field_and_presets_shown(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    with console.runtime.sessions() as session:
        g = settings_service.get_global_settings(session).version
    by_key(at.text_input, f"gs.{g}.max_attempts").input("99").run()  # type: ignore[attr-defined]
    assert any("max_attempts 99 is above the maximum of 10" in e.value for e in at.error)
    by_key(at.button, f"gs.{g}.save").click().run()  # type: ignore[attr-defined]
    assert NOT_SAVED_PROBLEMS in [e.value for e in at.error]
    assert _global_version(console) == g
    by_key(at.text_input, f"gs.{g}.max_attempts").input("2").run()  # type: ignore[attr-defined]
    by_key(at.selectbox, f"gs.{g}.routing_policy").set_value("cheapest").run()  # type: ignore[attr-defined]
    by_key(at.button, f"gs.{g}.save").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        now = settings_service.get_global_settings(session)
    assert now.version == g + 1 and now.settings.max_attempts == 2 and now.settings.routing_policy == "cheapest"
    presets = next(df.value for df in at.dataframe if "Ultra" in df.value.columns)
    assert "rendering_speed=TURBO" in presets.loc["ideogram", "Fast"]


def test_prices_list_versions_and_add_one(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    by_key(at.selectbox, "prices.provider").set_value("fal-qwen").run()  # type: ignore[attr-defined]
    table = next(df.value for df in at.dataframe if "effective from" in df.value.columns)
    assert list(table["in force"]) == [True] and "0.02" in table["price"][0]
    with console.runtime.sessions() as session:
        latest = price_store.latest_price_version(session, "fal-qwen")
    assert latest is not None
    key = f"pv.fal-qwen.{latest.version}."
    by_key(at.text_input, key + "usd").input("abc").run()  # type: ignore[attr-defined]
    assert any("usd_per_unit" in e.value for e in at.error)
    by_key(at.button, key + "save").click().run()  # type: ignore[attr-defined]
    assert NOT_SAVED_PROBLEMS in [e.value for e in at.error]
    with console.runtime.sessions() as session:
        unchanged = price_store.latest_price_version(session, "fal-qwen")
    assert unchanged is not None and unchanged.version == latest.version
    by_key(at.text_input, key + "usd").input("0.025").run()  # type: ignore[attr-defined]
    by_key(at.text_input, key + "source").input("fal pricing page, December").run()  # type: ignore[attr-defined]
    by_key(at.button, key + "save").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        active = price_store.active_price(session, "fal-qwen")
    assert active is not None and active.version == latest.version + 1
    assert str(active.price.usd_per_unit) == "0.025" and active.price.source == "fal pricing page, December"
    table = next(df.value for df in at.dataframe if "effective from" in df.value.columns)
    assert list(table["version"]) == [latest.version + 1, latest.version]


def test_import_shows_the_dry_run_diff_before_applying(console_any_db: Console) -> None:
    console = console_any_db
    admin = Actor(user_id=console.users[Role.ADMIN].id, username="alice", role=Role.ADMIN)
    with console.runtime.sessions() as session:
        document = json.loads(transfer.export_json(session, admin))
    document["providers"]["fal-qwen"]["priority"] = 7
    at = console.app(Role.ADMIN, "settings")
    assert any(getattr(b, "label", None) == "Download settings and prices (JSON)" for b in at.get("download_button"))
    v = _version(console, "fal-qwen")
    by_key(at.text_area, "import.text").input(json.dumps(document)).run()  # type: ignore[attr-defined]
    plan = next(df.value for df in at.dataframe if "after import" in df.value.columns).set_index("field")
    assert plan.loc["priority", "now"] == "98" and plan.loc["priority", "after import"] == "7"
    assert _version(console, "fal-qwen") == v  # a dry run writes nothing
    by_key(at.button, "import.apply").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    assert _version(console, "fal-qwen") == v + 1
    assert any("1 updated" in s.value for s in at.success)

    by_key(at.text_area, "import.text").input('{"format": "nope"').run()  # type: ignore[attr-defined]
    assert any("Nothing can be imported" in e.value for e in at.error)


def _global_version(console: Console) -> int:
    with console.runtime.sessions() as session:
        return settings_service.get_global_settings(session).version


def test_presets_are_edited_saved_as_a_global_version_and_reset_to_built_in(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    g = _global_version(console)
    by_key(at.selectbox, "presets.provider").set_value("fal-qwen").run()  # type: ignore[attr-defined]
    key = f"presets.{g}.fal-qwen."
    steps = by_key(at.slider, key + "fast.num_inference_steps")
    assert steps.value == 12 and (steps.min, steps.max) == (1, 50)  # type: ignore[attr-defined]
    by_key(at.button, key + "save").click().run()  # type: ignore[attr-defined]  # nothing changed yet
    assert NOT_SAVED_UNCHANGED in [i.value for i in at.info]
    assert _global_version(console) == g
    assert by_key(at.button, key + "reset").disabled  # type: ignore[attr-defined]  # nothing to reset
    by_key(at.slider, key + "fast.num_inference_steps").set_value(14).run()  # type: ignore[attr-defined]
    unsaved = next(df.value for df in at.dataframe if "this form" in df.value.columns).set_index("field")
    assert unsaved.loc["preset_overrides.fast.fal-qwen.num_inference_steps", "this form"] == "14"
    assert _global_version(console) == g  # not saved before the button
    by_key(at.text_input, key + "comment").input("quicker drafts").run()  # type: ignore[attr-defined]
    by_key(at.button, key + "save").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        now = settings_service.get_global_settings(session)
    assert now.version == g + 1 and now.comment == "quicker drafts"
    assert now.settings.preset_overrides == {"fast": {"fal-qwen": {"num_inference_steps": 14}}}
    table = next(df.value for df in at.dataframe if "Ultra" in df.value.columns)
    assert "num_inference_steps=14 (edited)" in table.loc["fal-qwen", "Fast"]
    assert "(edited)" not in table.loc["huggingface", "Fast"]
    # The global settings form keeps the edits when it saves something else.
    by_key(at.text_input, f"gs.{g + 1}.max_attempts").input("2").run()  # type: ignore[attr-defined]
    by_key(at.button, f"gs.{g + 1}.save").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        now = settings_service.get_global_settings(session)
    assert now.version == g + 2 and now.settings.max_attempts == 2
    assert now.settings.preset_overrides == {"fast": {"fal-qwen": {"num_inference_steps": 14}}}
    # Reset to built-in is a new version too (so it can be rolled back).
    by_key(at.button, f"presets.{g + 2}.fal-qwen.reset").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        now = settings_service.get_global_settings(session)
    assert now.version == g + 3 and now.settings.preset_overrides == {} and now.settings.max_attempts == 2
    assert by_key(at.slider, f"presets.{g + 3}.fal-qwen.fast.num_inference_steps").value == 12  # type: ignore[attr-defined]


def test_a_refused_preset_save_shows_the_reason(console: Console) -> None:
    at = console.app(Role.ADMIN, "settings")
    g = _global_version(console)
    by_key(at.selectbox, "presets.provider").set_value("ideogram").run()  # type: ignore[attr-defined]
    by_key(at.selectbox, f"presets.{g}.ideogram.fast.rendering_speed").set_value("QUALITY").run()  # type: ignore[attr-defined]
    with console.runtime.sessions.begin() as session:  # someone else saves the global settings first
        settings_service.save_global_settings(
            session, Actor(user_id=console.users[Role.HERO].id, username="hero", role=Role.HERO), {"max_attempts": 4}
        )
    by_key(at.button, f"presets.{g}.ideogram.save").click().run()  # type: ignore[attr-defined]
    assert any("changed since you loaded" in e.value for e in at.error), [e.value for e in at.error]
    with console.runtime.sessions() as session:
        assert settings_service.get_global_settings(session).settings.preset_overrides == {}


def test_the_preview_says_what_the_change_costs_per_month(console: Console) -> None:
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    with console.runtime.sessions.begin() as session:  # the sandbox providers' volume is simulated
        add_rollup(session, yesterday, "ideogram", mode="sandbox", attempts=100, images=100)
    at = console.app(Role.ADMIN, "settings")
    _pick(at, "ideogram")
    v = _version(console, "ideogram")
    assert _metric(at, "What this change costs per month") == "no change"  # an untouched form
    by_key(at.selectbox, f"ps.ideogram.{v}.rendering_speed").set_value("QUALITY").run()  # type: ignore[attr-defined]
    # Ideogram DEFAULT $0.06 -> QUALITY $0.09 per image, x 100 images last month = +$3.00 a month.
    assert _metric(at, "What this change costs per month") == "+$3.000000/month"
    assert any("100 image(s)" in c.value and "simulated" in c.value for c in at.caption)
    by_key(at.selectbox, f"ps.ideogram.{v}.rendering_speed").set_value("TURBO").run()  # type: ignore[attr-defined]
    assert _metric(at, "What this change costs per month") == "-$3.000000/month"
    assert _version(console, "ideogram") == v  # nothing saved
    # No history: the page says so instead of a figure.
    _pick(at, "huggingface")
    assert _metric(at, "What this change costs per month") == "no history"
    assert any("no simulated images in the last 30 days" in c.value for c in at.caption)


def test_delete_a_providers_settings_after_confirming_never_the_default(console: Console) -> None:
    hero = Actor(user_id=console.users[Role.HERO].id, username="hero", role=Role.HERO)
    with console.runtime.sessions.begin() as session:
        settings_service.update_provider_settings(session, hero, "sandbox", {"is_default": True})
    at = console.app(Role.ADMIN, "settings")
    _pick(at, "sandbox")
    v = _version(console, "sandbox")
    assert by_key(at.button, f"ps.sandbox.{v}.delete").disabled  # type: ignore[attr-defined]
    assert any("is the default provider" in i.value for i in at.info)
    _pick(at, "huggingface")
    v = _version(console, "huggingface")
    delete = by_key(at.button, f"ps.huggingface.{v}.delete")
    assert delete.disabled  # type: ignore[attr-defined]  # not before confirming
    by_key(at.checkbox, f"ps.huggingface.{v}.delete.confirm").check().run()  # type: ignore[attr-defined]
    by_key(at.button, f"ps.huggingface.{v}.delete").click().run()  # type: ignore[attr-defined]
    assert not at.exception, at.exception
    with console.runtime.sessions() as session:
        history = settings_service.provider_history(session, "huggingface", limit=5)
    assert history[0].version == v + 1 and history[0].deleted
    assert any("Deleted" in s.value for s in at.success)


def test_each_editor_is_a_fragment_so_a_change_reruns_only_that_editor() -> None:
    """Streamlit reruns a fragment alone when one of its widgets changes; without it every keystroke reruns the
    whole page (its table, health and history reads). Each editor, not a helper it calls, carries the decorator."""
    import ast

    tree = ast.parse((ROOT / "pages" / "settings.py").read_text())
    fragments = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(decorator) == "st.fragment" for decorator in node.decorator_list)
    }
    assert fragments == {"_provider_editor", "_global_editor", "_prices_editor", "_transfer_panel"}
