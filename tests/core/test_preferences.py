"""User preferences: stored with compare-and-set, validated like settings within what the admins allow, authorized
in core, and placed by the one resolver between provider settings and preset, each value naming its source."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Conflict, InvalidInput, PermissionDenied
from core import settings_service
from core.preferences import get_preferences, preferences_for_request, save_preferences, validate_preferences
from core.security import Actor, Role
from core.seed import seed_defaults
from core.settings import (
    SOURCE_USER,
    GlobalSettings,
    ProviderSettings,
    UserPreferenceValues,
    describe_source,
    resolve_effective,
)
from db.engine import transaction
from db.models import AuditLog
from tests.core.spend.rollup_seed import add_user
from tests.dbfixtures import *  # noqa: F403

SYSTEM = Actor.system("test")


@pytest.fixture
def people(db_session_factory: sessionmaker[Session]) -> tuple[sessionmaker[Session], Actor, Actor, Actor]:
    seed_defaults(db_session_factory)
    with transaction(db_session_factory) as s:
        alice = Actor(add_user(s, "alice"), "alice")
        bob = Actor(add_user(s, "bob"), "bob")
        admin = Actor(add_user(s, "root", Role.ADMIN), "root")
    return db_session_factory, alice, bob, admin


People = tuple[sessionmaker[Session], Actor, Actor, Actor]


def test_save_with_compare_and_set_and_audit(people: People) -> None:
    factory, alice, _, _ = people
    assert alice.user_id is not None
    with factory() as s:
        empty = get_preferences(s, alice, alice.user_id)
    assert empty.version == 0 and empty.values == UserPreferenceValues()
    with transaction(factory) as s:
        saved = save_preferences(s, alice, alice.user_id, {"image_size": "16:9", "preset": "FAST"}, expected_version=0)
    assert saved.version == 1 and saved.values.preset == "fast" and saved.values.image_size == "16:9"
    with transaction(factory) as s, pytest.raises(Conflict):
        save_preferences(s, alice, alice.user_id, {"preset": "high"}, expected_version=0)  # a second first save
    with transaction(factory) as s:
        again = save_preferences(s, alice, alice.user_id, {"image_size": "16:9", "preset": "fast"}, expected_version=1)
    assert again.version == 1  # nothing changed: nothing written
    with transaction(factory) as s:
        second = save_preferences(s, alice, alice.user_id, {"negative_prompt": " blurry "}, expected_version=1)
    assert second.version == 2 and second.values == UserPreferenceValues(negative_prompt="blurry")
    with transaction(factory) as s, pytest.raises(Conflict):
        save_preferences(s, alice, alice.user_id, {"preset": "high"}, expected_version=1)  # a stale form
    with factory() as s:
        assert preferences_for_request(s, alice.user_id) == UserPreferenceValues(negative_prompt="blurry")
        assert preferences_for_request(s, None) is None
        actions = list(s.scalars(select(AuditLog.action).where(AuditLog.target_id == str(alice.user_id))))
    assert actions.count("user_preferences.update") == 2


def test_authorization(people: People) -> None:
    factory, alice, bob, admin = people
    assert alice.user_id is not None and admin.user_id is not None
    with transaction(factory) as s:
        save_preferences(s, alice, alice.user_id, {"preset": "high"}, expected_version=0)
    with factory() as s:
        assert get_preferences(s, admin, alice.user_id).values.preset == "high"  # admins may read
        with pytest.raises(PermissionDenied):
            get_preferences(s, bob, alice.user_id)
    for someone_else in (bob, admin):
        with transaction(factory) as s, pytest.raises(PermissionDenied):
            save_preferences(s, someone_else, alice.user_id, {"preset": "fast"}, expected_version=1)
    with transaction(factory) as s:
        save_preferences(s, admin, admin.user_id, {"preset": "fast"}, expected_version=0)  # their own


def test_validation_within_what_the_admins_allow(people: People) -> None:
    factory, alice, _, _ = people
    assert alice.user_id is not None
    with transaction(factory) as s, pytest.raises(InvalidInput) as refused:
        save_preferences(s, alice, alice.user_id, {"image_size": "huge", "preset": "Turbo", "seed": 3},
                         expected_version=0)  # fmt: skip
    assert set(refused.value.field_errors) == {"image_size", "preset", "seed"}
    with transaction(factory) as s:
        settings_service.save_global_settings(s, SYSTEM, {"user_preference_fields": ["preset"]})
    with transaction(factory) as s, pytest.raises(InvalidInput) as not_allowed:
        save_preferences(s, alice, alice.user_id, {"image_size": "16:9", "preset": "fast"}, expected_version=0)
    assert list(not_allowed.value.field_errors) == ["image_size"]
    assert "admins allow preset" in not_allowed.value.field_errors["image_size"]
    with pytest.raises(InvalidInput):
        validate_preferences({"negative_prompt": "bad\x00char"})
    with transaction(factory) as s, pytest.raises(InvalidInput) as bad_field:
        settings_service.save_global_settings(s, SYSTEM, {"user_preference_fields": ["seed"]})
    assert "user_preference_fields" in bad_field.value.field_errors


def test_the_resolver_places_them_between_provider_and_preset() -> None:
    provider = ProviderSettings(provider="fal-qwen", params={"image_size": "square_hd", "num_inference_steps": 40})
    prefs = UserPreferenceValues(image_size="16:9", negative_prompt="blurry", preset="fast")
    effective = resolve_effective(
        "fal-qwen", global_settings=GlobalSettings(), provider_settings=provider, preset=None, overrides=None,
        prompt="a fox", user_preferences=prefs,
    )  # fmt: skip
    assert effective.source_of("image_size") == SOURCE_USER == "user preference"
    assert effective.value_of("image_size") == "16:9"
    assert effective.source_of("negative_prompt") == SOURCE_USER
    assert effective.preset == "fast"  # the user's preset, as no request named one
    assert effective.source_of("num_inference_steps") == "preset:fast"  # the preset sits above the user layer
    assert any("from your preferences" in note for note in effective.notes)
    assert describe_source(SOURCE_USER) == "your preferences"

    request = resolve_effective(
        "fal-qwen", global_settings=GlobalSettings(), provider_settings=provider, preset="high",
        overrides={"image_size": "1:1"}, prompt="a fox", user_preferences=prefs,
    )  # fmt: skip
    assert request.source_of("image_size") == "request" and request.preset == "high"

    # The admins withdraw a field: ignored at once. A size this provider cannot render: left out with a note.
    narrow = GlobalSettings(user_preference_fields=("negative_prompt",), default_preset="standard")
    withdrawn = resolve_effective(
        "fal-qwen", global_settings=narrow, provider_settings=provider, preset=None, overrides=None,
        prompt="a fox", user_preferences=UserPreferenceValues(image_size="32x32", preset="fast"),
    )  # fmt: skip
    assert withdrawn.source_of("image_size") == "provider" and withdrawn.preset == "standard"
    too_big = resolve_effective(
        "fal-qwen", global_settings=GlobalSettings(), provider_settings=provider, preset=None, overrides=None,
        prompt="a fox", user_preferences=UserPreferenceValues(image_size="32x32"),
    )  # fmt: skip
    assert too_big.source_of("image_size") == "provider"
    assert any("your preferred image_size" in note for note in too_big.notes)
    # "none" as the user's preset: no preset, even over the global default one.
    no_preset = resolve_effective(
        "fal-qwen", global_settings=GlobalSettings(default_preset="high"), provider_settings=None, preset=None,
        overrides=None, prompt="a fox", user_preferences=UserPreferenceValues(preset="none"),
    )  # fmt: skip
    assert no_preset.preset is None


def test_concurrent_saves_from_one_version_let_exactly_one_through(people: People) -> None:
    """Eight sessions save from version 1 at once: one wins (version 2), the others get Conflict, none is lost
    silently. Threads, each with its own connection, on both databases."""
    import threading

    factory, alice, _, _ = people
    assert alice.user_id is not None
    user_id = alice.user_id
    with transaction(factory) as s:
        save_preferences(s, alice, user_id, {"preset": "fast"}, expected_version=0)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def save(size: str) -> None:
        barrier.wait()
        try:
            with transaction(factory) as s:
                save_preferences(s, alice, user_id, {"image_size": size}, expected_version=1)
            result = size
        except Conflict:
            result = "conflict"
        with lock:
            outcomes.append(result)

    sizes = [f"{64 * (i + 8)}x{64 * (i + 8)}" for i in range(8)]
    threads = [threading.Thread(target=save, args=(size,)) for size in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "conflict"]
    assert len(outcomes) == 8 and len(winners) == 1
    with factory() as s:
        final = get_preferences(s, alice, user_id)
    assert final.version == 2 and final.values.image_size == winners[0]
