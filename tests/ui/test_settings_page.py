"""The Settings page through AppTest: who reaches it, editing one provider with errors at the field and a live
preview, saving versions, the side-by-side diff and rollback, global settings, prices, import and export."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from core import price_store, settings_service, transfer
from core.security import Actor, Role
from tests.ui.apptest_helpers import ROOT, Console, by_key, console, console_any_db, pg_admin_dsn, pg_session_database

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
    save = by_key(at.button, f"ps.fal-qwen.{v}.save")
    assert save.disabled  # type: ignore[attr-defined]
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
    assert by_key(at.button, f"gs.{g}.save").disabled  # type: ignore[attr-defined]
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
    assert by_key(at.button, key + "save").disabled  # type: ignore[attr-defined]
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
