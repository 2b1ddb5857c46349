"""The settings service: versions, audit rows, defaults, delete, diff, rollback and permissions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from core import audit, users
from core import settings_service as svc
from core.security import Actor, Role
from core.settings import default_provider_settings
from db.engine import transaction
from db.models import AuditLog, GlobalSettingsVersion, ProviderSettingsCurrent, ProviderSettingsVersion
from tests.dbfixtures import *  # noqa: F403

ADMIN = Actor.system("ada")  # the process itself; core checks people's accounts (the `staff` fixture)


@pytest.fixture
def staff(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> tuple[Actor, Actor]:
    """A HERO (hugo) and a USER (ursula) with accounts: core reads their roles from the database."""
    with transaction(db_session_factory) as session:
        hero = users.create_user(session, Actor.system(), "hugo", "a hero password", Role.HERO).actor()
        user = users.create_user(session, Actor.system(), "ursula", "a user password", Role.USER).actor()
    return hero, user


def _counts(factory: sessionmaker[Session]) -> tuple[int, int, int]:
    with factory() as session:
        return (
            session.scalar(select(func.count()).select_from(ProviderSettingsVersion)) or 0,
            session.scalar(select(func.count()).select_from(GlobalSettingsVersion)) or 0,
            session.scalar(select(func.count()).select_from(AuditLog)) or 0,
        )


def _save(
    factory: sessionmaker[Session], provider: str, data: dict[str, object], actor: Actor = ADMIN
) -> svc.SaveResult:
    with transaction(factory) as session:
        return svc.save_provider_settings(session, actor, provider, data)


def test_save_writes_a_new_version_and_an_audit_row(db_session_factory: sessionmaker[Session]) -> None:
    first = _save(db_session_factory, "fal-qwen", {"params": {"num_inference_steps": 30}})
    second = _save(db_session_factory, "fal-qwen", {"params": {"num_inference_steps": 40}, "priority": 70})
    assert (first.version, second.version) == (1, 2)
    assert {c.field for c in second.changes} == {"params.num_inference_steps", "priority"}
    with db_session_factory() as session:
        view = svc.get_provider_settings(session, "fal-qwen")
        assert view.version == 2 and view.settings.params == {"num_inference_steps": 40}
        assert view.settings.priority == 70 and view.updated_by == "ada"
        entries = audit.list_entries(session, ADMIN, target_type="provider_settings", target_id="fal-qwen")
        assert [e.action for e in entries] == ["provider_settings.update", "provider_settings.create"]
        assert entries[0].before is not None and entries[0].before["params"] == {"num_inference_steps": 30}
        assert entries[0].after is not None and entries[0].after["params"] == {"num_inference_steps": 40}
        pointer = session.get(ProviderSettingsCurrent, "fal-qwen")
        assert pointer is not None and (pointer.version, pointer.priority, pointer.active) == (2, 70, True)


def test_versions_are_immutable_history(db_session_factory: sessionmaker[Session]) -> None:
    for steps in (10, 20, 30):
        _save(db_session_factory, "sandbox", {"params": {"num_inference_steps": steps}})
    with db_session_factory() as session:
        history = svc.provider_history(session, "sandbox")
    assert [v.version for v in history] == [3, 2, 1]
    assert [v.settings["params"]["num_inference_steps"] for v in history] == [30, 20, 10]


def test_a_save_that_changes_nothing_is_skipped(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "ideogram", {"params": {"rendering_speed": "TURBO"}})
    counts = _counts(db_session_factory)
    # Same settings, spelled differently (enum case): normalised first, so still no change.
    again = _save(db_session_factory, "ideogram", {"params": {"rendering_speed": "turbo"}})
    assert (again.changed, again.version, again.changes) == (False, 1, ())
    assert _counts(db_session_factory) == counts


def test_invalid_settings_are_refused_with_field_errors_and_change_nothing(
    db_session_factory: sessionmaker[Session],
) -> None:
    counts = _counts(db_session_factory)
    with pytest.raises(InvalidInput) as caught:
        _save(db_session_factory, "fal-qwen", {"params": {"num_inference_steps": 500, "bogus": 1}, "priority": -3})
    assert set(caught.value.field_errors) == {"params.num_inference_steps", "params.bogus", "priority"}
    with pytest.raises(InvalidInput, match="unknown provider"):
        _save(db_session_factory, "dall-e", {})
    assert _counts(db_session_factory) == counts


def test_a_user_is_refused_and_hero_and_admin_are_allowed(
    db_session_factory: sessionmaker[Session], staff: tuple[Actor, Actor]
) -> None:
    hero, user = staff
    _save(db_session_factory, "sandbox", {})
    counts = _counts(db_session_factory)
    refused = [
        lambda s: svc.save_provider_settings(s, user, "sandbox", {"priority": 1}),
        lambda s: svc.update_provider_settings(s, user, "sandbox", {"priority": 1}),
        lambda s: svc.set_provider_active(s, user, "sandbox", False),
        lambda s: svc.set_default_provider(s, user, "sandbox"),
        lambda s: svc.delete_provider_settings(s, user, "sandbox"),
        lambda s: svc.rollback_provider_settings(s, user, "sandbox", 1),
        lambda s: svc.save_global_settings(s, user, {"num_images": 2}),
        lambda s: svc.rollback_global_settings(s, user, 1),
    ]
    for call in refused:
        with pytest.raises(PermissionDenied, match=r"ursula \(USER\)"), transaction(db_session_factory) as session:
            call(session)
    assert _counts(db_session_factory) == counts
    assert _save(db_session_factory, "sandbox", {"priority": 11}, hero).changed
    assert _save(db_session_factory, "sandbox", {"priority": 12}, ADMIN).changed
    with db_session_factory() as session:
        assert [v.created_by_name for v in svc.provider_history(session, "sandbox")][:2] == ["ada", "hugo"]


def test_setting_a_default_clears_the_previous_one_with_versions_and_audit(
    db_session_factory: sessionmaker[Session], staff: tuple[Actor, Actor]
) -> None:
    hero, _ = staff
    _save(db_session_factory, "sandbox", {"is_default": True})
    _save(db_session_factory, "qwen", {})
    with transaction(db_session_factory) as session:
        result = svc.set_default_provider(session, hero, "qwen", comment="free first")
    assert result.changed and [(c.field, c.before, c.after) for c in result.changes] == [("is_default", False, True)]
    with db_session_factory() as session:
        assert svc.default_provider(session) == "qwen"
        assert not svc.get_provider_settings(session, "sandbox").settings.is_default
        assert svc.provider_history(session, "sandbox")[0].comment == "qwen became the default provider"
        actions = {(e.target_id, e.action) for e in audit.list_entries(session, ADMIN, limit=2)}
        assert actions == {("sandbox", "provider_settings.default_cleared"), ("qwen", "provider_settings.set_default")}
        defaults = session.scalars(select(ProviderSettingsCurrent.provider).where(ProviderSettingsCurrent.is_default))
        assert list(defaults) == ["qwen"]


def test_the_default_must_stay_active_and_cannot_be_deleted(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "sandbox", {"is_default": True})
    counts = _counts(db_session_factory)
    with pytest.raises(InvalidInput, match="make another provider the default"), transaction(db_session_factory) as s:
        svc.set_provider_active(s, ADMIN, "sandbox", False)
    with pytest.raises(InvalidInput, match="make another provider the default"), transaction(db_session_factory) as s:
        svc.delete_provider_settings(s, ADMIN, "sandbox")
    with pytest.raises(InvalidInput) as caught:
        _save(db_session_factory, "qwen", {"is_default": True, "active": False})
    assert "is_default" in caught.value.field_errors
    assert _counts(db_session_factory) == counts


def test_activate_and_deactivate(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "huggingface", {})
    with transaction(db_session_factory) as session:
        svc.set_provider_active(session, ADMIN, "huggingface", False)
    with transaction(db_session_factory) as session:
        assert not svc.get_provider_settings(session, "huggingface").settings.active
        assert session.get(ProviderSettingsCurrent, "huggingface").active is False  # type: ignore[union-attr]
        svc.set_provider_active(session, ADMIN, "huggingface", True)
        entries = audit.list_entries(session, ADMIN, target_id="huggingface")
    assert [e.action for e in entries][:2] == ["provider_settings.activate", "provider_settings.deactivate"]


def test_delete_keeps_history_and_rollback_restores(
    db_session_factory: sessionmaker[Session], staff: tuple[Actor, Actor]
) -> None:
    hero, _ = staff
    _save(db_session_factory, "ideogram", {"params": {"style_type": "DESIGN"}})
    with transaction(db_session_factory) as session:
        deleted = svc.delete_provider_settings(session, ADMIN, "ideogram", comment="not renewing")
    assert deleted.version == 2
    with db_session_factory() as session:
        with pytest.raises(NotFound):
            svc.get_provider_settings(session, "ideogram")
        assert "ideogram" not in [v.provider for v in svc.list_provider_settings(session)]
        history = svc.provider_history(session, "ideogram")
        assert [(v.version, v.deleted) for v in history] == [(2, True), (1, False)]
        assert svc.is_configured(session, "ideogram")
    with pytest.raises(InvalidInput, match="records a deletion"), transaction(db_session_factory) as session:
        svc.rollback_provider_settings(session, ADMIN, "ideogram", 2)
    with transaction(db_session_factory) as session:
        restored = svc.rollback_provider_settings(session, hero, "ideogram", 1)
    assert restored.version == 3
    with db_session_factory() as session:
        view = svc.get_provider_settings(session, "ideogram")
        assert view.settings.params == {"style_type": "DESIGN"} and view.comment == "rollback to version 1"
        assert svc.provider_version(session, "ideogram", 3).source_version == 1


def test_diff_between_two_versions_field_by_field(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "fal-qwen", {"params": {"num_inference_steps": 30, "acceleration": "high"}})
    _save(
        db_session_factory,
        "fal-qwen",
        {"params": {"num_inference_steps": 35, "seed": 7}, "daily_cost_limit_usd": "5.25", "priority": 99},
    )
    with db_session_factory() as session:
        diff = svc.diff_provider_versions(session, "fal-qwen", 1, 2)
        assert svc.diff_provider_versions(session, "fal-qwen", 2, 2) == []
    assert [(c.field, c.before, c.after) for c in diff] == [
        ("daily_cost_limit_usd", None, "5.25"),
        ("params.acceleration", "high", None),
        ("params.num_inference_steps", 30, 35),
        ("params.seed", None, 7),
        ("priority", 98, 99),
    ]


def test_rollback_is_a_new_version_equal_to_the_old_one(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "sandbox", {"params": {"guidance_scale": 2.0}, "daily_cost_limit_usd": "1.5"})
    _save(db_session_factory, "sandbox", {"params": {"guidance_scale": 9.0}})
    with transaction(db_session_factory) as session:
        result = svc.rollback_provider_settings(session, ADMIN, "sandbox", 1)
    with db_session_factory() as session:
        v1, v3 = svc.provider_version(session, "sandbox", 1), svc.provider_version(session, "sandbox", 3)
        current = svc.get_provider_settings(session, "sandbox").settings
        [entry] = audit.list_entries(session, ADMIN, action="provider_settings.rollback")
    assert result.version == 3 and v3.settings == v1.settings
    assert current.daily_cost_limit_usd == Decimal("1.5")
    assert entry.changed_fields()["params"] == ({"guidance_scale": 9.0}, {"guidance_scale": 2.0})
    with transaction(db_session_factory) as session:  # 1.50 is the amount already set: no new version
        assert not svc.update_provider_settings(session, ADMIN, "sandbox", {"daily_cost_limit_usd": "1.50"}).changed
    with transaction(db_session_factory) as session:  # rolling back to what is already current changes nothing
        assert not svc.rollback_provider_settings(session, ADMIN, "sandbox", 1).changed


def test_expected_version_refuses_a_stale_form(db_session_factory: sessionmaker[Session]) -> None:
    _save(db_session_factory, "qwen", {})
    _save(db_session_factory, "qwen", {"priority": 60})
    with pytest.raises(Conflict, match="version 2 is current"), transaction(db_session_factory) as s:
        svc.save_provider_settings(s, ADMIN, "qwen", {"priority": 61}, expected_version=1)
    with transaction(db_session_factory) as session:
        assert svc.save_provider_settings(session, ADMIN, "qwen", {"priority": 61}, expected_version=2).version == 3


def test_global_settings_are_versioned_too(
    db_session_factory: sessionmaker[Session], staff: tuple[Actor, Actor]
) -> None:
    hero, _ = staff
    with db_session_factory() as session:
        assert svc.get_global_settings(session).version == 0
    with transaction(db_session_factory) as session:
        assert svc.save_global_settings(session, ADMIN, {"num_images": 2}).version == 1
        assert svc.save_global_settings(session, hero, {"num_images": 3, "max_attempts": 2}).version == 2
        assert not svc.save_global_settings(session, hero, {"num_images": 3, "max_attempts": 2}).changed
    with pytest.raises(InvalidInput) as caught, transaction(db_session_factory) as session:
        svc.save_global_settings(session, ADMIN, {"num_images": 0, "colour": "red"})
    assert set(caught.value.field_errors) == {"num_images", "colour"}
    with transaction(db_session_factory) as session:
        diff = svc.diff_global_versions(session, 1, 2)
        assert [(c.field, c.before, c.after) for c in diff] == [("max_attempts", 3, 2), ("num_images", 2, 3)]
        svc.rollback_global_settings(session, ADMIN, 1)
    with db_session_factory() as session:
        current = svc.get_global_settings(session)
        assert (current.version, current.settings.num_images, current.settings.max_attempts) == (3, 2, 3)
        assert [v.version for v in svc.global_history(session)] == [3, 2, 1]
        actions = [e.action for e in audit.list_entries(session, ADMIN, target_type="global_settings")]
    assert actions == ["global_settings.rollback", "global_settings.update", "global_settings.create"]


def test_audit_log_is_for_admins_and_heroes(
    db_session_factory: sessionmaker[Session], staff: tuple[Actor, Actor]
) -> None:
    hero, user = staff
    _save(db_session_factory, "sandbox", {})
    with db_session_factory() as session:
        assert len(audit.list_entries(session, hero, target_type="provider_settings")) == 1
        with pytest.raises(PermissionDenied):
            audit.list_entries(session, user)


def test_settings_for_routing_fill_in_catalog_defaults_and_skip_deleted(
    db_session_factory: sessionmaker[Session],
) -> None:
    _save(db_session_factory, "fal-qwen", {"priority": 5})
    _save(db_session_factory, "ideogram", {})
    with transaction(db_session_factory) as session:
        svc.delete_provider_settings(session, ADMIN, "ideogram")
    with db_session_factory() as session:
        routing = svc.settings_for_routing(session)
    assert set(routing) == {"fal-qwen", "huggingface", "qwen", "sandbox"}
    assert routing["fal-qwen"].priority == 5
    assert routing["sandbox"] == default_provider_settings("sandbox")
