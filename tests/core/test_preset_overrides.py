"""Editable presets: the global setting `preset_overrides` validated by the one parameter validator, applied over
the built-in values by the resolver (the source still names the preset), versioned, diffed, rolled back, audited
and carried by export/import with the global settings (on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput
from core import audit, settings_service, transfer
from core.presets import PRESETS, presets_for
from core.security import Actor
from core.seed import seed_defaults
from core.settings import (
    GlobalSettings,
    describe_source,
    resolve_effective,
    validate_global_settings,
)
from core.settings_editor import global_draft_with, global_fields, preset_overrides_draft, preset_param_names
from db.engine import transaction
from tests.dbfixtures import *  # noqa: F403

ADMIN = Actor.system("ada")
EDIT = {"fast": {"fal-qwen": {"num_inference_steps": 14}}}


def _resolve(g: GlobalSettings, preset: str | None = "fast", overrides: dict[str, Any] | None = None, pid="fal-qwen"):
    return resolve_effective(
        pid, global_settings=g, provider_settings=None, preset=preset, overrides=overrides, prompt="a lighthouse"
    )


def test_an_edited_value_replaces_the_built_in_one_and_its_source_names_the_preset() -> None:
    g = validate_global_settings({"preset_overrides": EDIT})
    eff = _resolve(g)
    assert (eff.value_of("num_inference_steps"), eff.source_of("num_inference_steps")) == (14, "preset:fast (edited)")
    assert describe_source(eff.source_of("num_inference_steps")) == "the Fast preset (edited)"
    # Values the admins did not edit keep their built-in value and plain source.
    assert (eff.value_of("acceleration"), eff.source_of("acceleration")) == ("high", "preset:fast")
    assert eff.preset == "fast"
    # Other presets and other providers are untouched; the built-in table itself is unchanged.
    assert _resolve(g, preset="high").source_of("num_inference_steps") == "preset:high"
    assert _resolve(g, pid="huggingface").source_of("num_inference_steps") == "preset:fast"
    assert PRESETS["fast"]["fal-qwen"]["num_inference_steps"] == 12
    # No preset asked for: the edit does not apply; a request's own value still wins over it.
    assert _resolve(g, preset="none").source_of("num_inference_steps") == "catalog"
    assert _resolve(g, overrides={"num_inference_steps": 9}).source_of("num_inference_steps") == "request"


def test_the_default_preset_applies_its_edits_too() -> None:
    g = validate_global_settings({"default_preset": "fast", "preset_overrides": EDIT})
    assert _resolve(g, preset=None).source_of("num_inference_steps") == "preset:fast (edited)"


def test_values_are_normalised_like_every_parameter() -> None:
    g = validate_global_settings(
        {"preset_overrides": {" Fast ": {"fal-qwen": {"num_inference_steps": 14.0, "acceleration": "NONE"}}}}
    )
    assert g.preset_overrides == {"fast": {"fal-qwen": {"acceleration": "none", "num_inference_steps": 14}}}
    assert presets_for("fal-qwen", g.preset_overrides)["fast"]["num_inference_steps"] == 14
    assert presets_for("fal-qwen")["fast"]["num_inference_steps"] == 12


def test_invalid_edits_are_refused_with_an_error_at_each_field() -> None:
    with pytest.raises(InvalidInput) as info:
        validate_global_settings(
            {
                "preset_overrides": {
                    "turbo": {"fal-qwen": {"num_inference_steps": 10}},
                    "fast": {
                        "nope": {"num_inference_steps": 10},
                        "fal-qwen": {"num_inference_steps": 99, "guidance_scale": "strong", "style": "x"},
                        "ideogram": {"rendering_speed": "WARP", "image_size": "1:1", "num_images": 2},
                    },
                },
                "max_attempts": 99,
            }
        )
    errors = info.value.field_errors
    p = "preset_overrides."
    assert set(errors) == {
        p + "turbo",
        p + "fast.nope",
        p + "fast.fal-qwen.num_inference_steps",
        p + "fast.fal-qwen.guidance_scale",
        p + "fast.fal-qwen.style",
        p + "fast.ideogram.rendering_speed",
        p + "fast.ideogram.image_size",
        p + "fast.ideogram.num_images",
        "max_attempts",
    }
    assert "Fast, Standard, High, Ultra" in errors[p + "turbo"]
    assert errors[p + "fast.fal-qwen.num_inference_steps"] == "num_inference_steps 99 is above fal-qwen's maximum of 50"
    assert "never sets image_size" in errors[p + "fast.ideogram.image_size"]
    assert "never sets num_images" in errors[p + "fast.ideogram.num_images"]
    assert "TURBO, DEFAULT, QUALITY" in errors[p + "fast.ideogram.rendering_speed"]


@pytest.mark.parametrize("name", ["image_size", "num_images"])
def test_never_size_or_count_even_when_loaded_directly(name: str) -> None:
    value = "square" if name == "image_size" else 1
    with pytest.raises(ValidationError, match=f"never sets {name}"):
        GlobalSettings.model_validate({"preset_overrides": {"high": {"fal-qwen": {name: value}}}})
    with pytest.raises(InvalidInput):
        validate_global_settings({"preset_overrides": "fast=12"})


def test_no_edits_leave_the_stored_form_as_before() -> None:
    assert "preset_overrides" not in settings_service.settings_json(GlobalSettings())
    assert "preset_overrides" not in settings_service.settings_json(validate_global_settings({"preset_overrides": {}}))
    assert "preset_overrides" not in {f.name for f in global_fields()}  # its own editor, not a form field


def test_the_editor_stores_only_what_differs_from_the_built_in_values() -> None:
    current: dict[str, dict[str, dict[str, Any]]] = {
        "fast": {"ideogram": {"rendering_speed": "DEFAULT"}, "fal-qwen": {"num_inference_steps": 14}}
    }
    shown = {
        "fast": {"num_inference_steps": 12, "guidance_scale": 2.5, "acceleration": "high", "output_format": "jpeg"},
        "high": {"num_inference_steps": 45, "guidance_scale": 4.0, "acceleration": "none", "output_format": "png"},
    }
    draft = preset_overrides_draft(current, "fal-qwen", shown)
    # fal-qwen's fast edit set back to the built-in value is gone; Ideogram's edit is kept; high's new one added.
    assert draft == {
        "fast": {"ideogram": {"rendering_speed": "DEFAULT"}},
        "high": {"fal-qwen": {"num_inference_steps": 45}},
    }
    assert preset_overrides_draft(draft, "ideogram", {}) == {"high": {"fal-qwen": {"num_inference_steps": 45}}}
    assert preset_param_names("fal-qwen") == ["num_inference_steps", "guidance_scale", "acceleration", "output_format"]
    assert preset_param_names("ideogram") == ["rendering_speed"]


def test_edits_are_versioned_diffed_audited_rolled_back_and_exported(db_session_factory: sessionmaker[Session]) -> None:
    seed_defaults(db_session_factory)
    with transaction(db_session_factory) as s:
        before = settings_service.get_global_settings(s)
        saved = settings_service.save_global_settings(
            s, ADMIN, global_draft_with(before.settings, preset_overrides=EDIT), comment="faster drafts"
        )
    with db_session_factory() as s:
        now = settings_service.get_global_settings(s)
        assert now.version == before.version + 1 == saved.version
        assert now.settings.preset_overrides == EDIT
        diff = settings_service.diff_global_versions(s, before.version, now.version)
        assert [(c.field, c.before, c.after) for c in diff] == [
            ("preset_overrides.fast.fal-qwen.num_inference_steps", None, 14)
        ]
        entries = audit.list_entries(s, ADMIN, target_type="global_settings", limit=5)
        assert entries and entries[0].action == "global_settings.update"
        document = json.loads(transfer.export_json(s, ADMIN))
    assert document["global_settings"]["preset_overrides"] == EDIT
    with transaction(db_session_factory) as s:
        settings_service.rollback_global_settings(s, ADMIN, before.version)
    with db_session_factory() as s:
        assert settings_service.get_global_settings(s).settings.preset_overrides == {}
        plan = transfer.plan_import(s, ADMIN, json.dumps(document))
        item = next(i for i in plan.changed if i.kind == "global_settings")
        assert [c.field for c in item.changes] == ["preset_overrides.fast.fal-qwen.num_inference_steps"]
    with transaction(db_session_factory) as s:
        transfer.apply_import(s, ADMIN, json.dumps(document))
    with db_session_factory() as s:
        assert settings_service.get_global_settings(s).settings.preset_overrides == EDIT
    document["global_settings"]["preset_overrides"] = {"fast": {"fal-qwen": {"num_images": 4}}}
    with db_session_factory() as s, pytest.raises(InvalidInput) as refused:
        transfer.plan_import(s, ADMIN, json.dumps(document))
    assert any("num_images" in k for k in refused.value.field_errors), refused.value.field_errors
