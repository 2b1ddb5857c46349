"""Provider and global settings, stored as immutable versions with an audit row for every change.

Rules (decided here, enforced for every caller: console, REST API, CLI, import):
- Every mutating call takes an `actor` and is refused unless that account is an active ADMIN or HERO, checked
  from the database in the transaction of the change (core.authz); versions and audit rows name the account.
- A save validates the whole settings object (core.settings), then writes a NEW version and an audit row in
  the caller's transaction. Nothing is edited in place.
- A save that changes nothing is skipped: no version, no audit row, `changed=False` in the result. History
  then lists only real changes, and an idempotent caller (seed, import, a double-click) does no harm.
- `expected_version` gives optimistic locking: a form saved over someone else's newer save is refused with a
  message naming the version now current, instead of silently overwriting it.
- At most one provider is the default; making one the default clears the previous default in the same
  transaction, with its own new version and audit row. A default provider must be active, so deactivating or
  deleting the default is refused until another provider is made the default.
- Delete writes a version marked `deleted` (holding the last settings) and marks the pointer deleted: the
  history stays, and a rollback to any earlier version restores the provider.
- Rollback writes a new version equal to the old one (re-validated against today's catalog).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy import exc, func, select
from sqlalchemy.orm import Session

from common.errors import Conflict, InvalidInput, NotFound
from core import audit
from core.authz import AuthorizedActor, authorize
from core.catalog import PROVIDERS
from core.security import SETTINGS_EDITORS, Actor
from core.settings import (
    GlobalSettings,
    ProviderSettings,
    default_provider_settings,
    validate_global_settings,
    validate_provider_settings,
)
from db.models import GlobalSettingsVersion, ProviderSettingsCurrent, ProviderSettingsVersion, utcnow

MAX_COMMENT_CHARS = 2000
HISTORY_LIMIT_MAX = 1000


@dataclass(frozen=True)
class ProviderSettingsView:
    provider: str
    version: int
    settings: ProviderSettings
    updated_at: datetime
    updated_by: str
    comment: str | None


@dataclass(frozen=True)
class GlobalSettingsView:
    version: int
    """0 = never saved: the built-in defaults."""
    settings: GlobalSettings
    updated_at: datetime | None
    updated_by: str | None
    comment: str | None


@dataclass(frozen=True)
class SettingsVersion:
    provider: str | None
    """None for global settings versions."""
    version: int
    settings: dict[str, Any]
    deleted: bool
    source_version: int | None
    created_by: int | None
    created_by_name: str
    created_at: datetime
    comment: str | None


@dataclass(frozen=True)
class FieldChange:
    field: str
    """Dotted path: `priority`, `params.num_inference_steps`."""
    before: Any
    after: Any


@dataclass(frozen=True)
class SaveResult:
    changed: bool
    version: int
    """The version now current (the new one, or the unchanged current one when nothing changed)."""
    changes: tuple[FieldChange, ...]


# --- helpers ---------------------------------------------------------------------------------------------------


def _flatten(data: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            # An empty mapping sets nothing (no params = all inherited), so it contributes no fields.
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def diff_settings(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[FieldChange]:
    """Field-by-field differences (nested mappings flattened to dotted paths), sorted by field.

    A field absent on one side shows as None there (e.g. a parameter no longer set, now inherited).
    """
    flat_before, flat_after = _flatten(before), _flatten(after)
    changes = []
    for key in sorted(set(flat_before) | set(flat_after)):
        old, new = flat_before.get(key), flat_after.get(key)
        if old != new or (key in flat_before) != (key in flat_after):
            changes.append(FieldChange(key, old, new))
    return changes


def _comment(comment: str | None) -> str | None:
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise InvalidInput("the comment must be text", {"comment": "must be text"})
    text = comment.strip()
    if len(text) > MAX_COMMENT_CHARS:
        raise InvalidInput(
            f"the comment is longer than {MAX_COMMENT_CHARS} characters",
            {"comment": f"at most {MAX_COMMENT_CHARS} characters"},
        )
    return text or None


def settings_json(settings: ProviderSettings | GlobalSettings) -> dict[str, Any]:
    """The stored form. Amounts are written canonically ("5" for 5.00) so equal settings compare equal."""
    data = settings.model_dump(mode="json")
    for key, value in settings.model_dump().items():
        if isinstance(value, Decimal):
            data[key] = format(value.normalize(), "f")
    return data


def _known_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        msg = f"unknown provider {provider!r}; known providers: {', '.join(PROVIDERS)}"
        raise InvalidInput(msg, {"provider": msg})


def validate_settings(provider: str, data: Mapping[str, Any] | ProviderSettings) -> ProviderSettings:
    raw = settings_json(data) if isinstance(data, ProviderSettings) else data
    settings = validate_provider_settings(provider, raw)
    if settings.is_default and not settings.active:
        msg = "the default provider must be active; activate it, or make another provider the default"
        raise InvalidInput(msg, {"is_default": msg})
    return settings


def _load_provider(data: Mapping[str, Any]) -> ProviderSettings:
    try:
        return ProviderSettings.model_validate(dict(data))
    except ValidationError as error:
        raise InvalidInput(
            f"stored settings for {data.get('provider')!r} no longer pass validation (the catalog changed?): "
            f"{error.error_count()} problem(s); save corrected settings to fix them",
        ) from None


def _version_view(row: ProviderSettingsVersion | GlobalSettingsVersion) -> SettingsVersion:
    return SettingsVersion(
        provider=row.provider if isinstance(row, ProviderSettingsVersion) else None,
        version=row.version,
        settings=dict(row.settings),
        deleted=row.deleted if isinstance(row, ProviderSettingsVersion) else False,
        source_version=row.source_version,
        created_by=row.created_by,
        created_by_name=row.created_by_name,
        created_at=row.created_at,
        comment=row.comment,
    )


def _flush_or_conflict(session: Session, what: str) -> None:
    try:
        session.flush()
    except exc.IntegrityError:
        raise Conflict(
            f"{what} was changed by someone else at the same moment; reload and try again",
            {"version": "changed concurrently"},
        ) from None


# --- provider settings: reading --------------------------------------------------------------------------------


def _pointer(session: Session, provider: str, *, lock: bool = False) -> ProviderSettingsCurrent | None:
    query = select(ProviderSettingsCurrent).where(ProviderSettingsCurrent.provider == provider)
    if lock:
        # PostgreSQL: serialise writers of one provider. SQLite ignores it; its single writer lock does the same.
        query = query.with_for_update()
    return session.scalar(query)


def _current_row(session: Session, pointer: ProviderSettingsCurrent) -> ProviderSettingsVersion:
    row = session.get(ProviderSettingsVersion, pointer.current_version_id)
    if row is None:  # the foreign key makes this impossible; a clear message beats an AttributeError
        raise NotFound(f"current version of {pointer.provider} is missing")
    return row


def _provider_view(session: Session, pointer: ProviderSettingsCurrent) -> ProviderSettingsView:
    row = _current_row(session, pointer)
    return ProviderSettingsView(
        provider=pointer.provider,
        version=row.version,
        settings=_load_provider(row.settings),
        updated_at=row.created_at,
        updated_by=row.created_by_name,
        comment=row.comment,
    )


def list_provider_settings(session: Session) -> list[ProviderSettingsView]:
    """Every configured (not deleted) provider's current settings, highest priority first."""
    query = (
        select(ProviderSettingsCurrent)
        .where(ProviderSettingsCurrent.deleted.is_(False))
        .order_by(ProviderSettingsCurrent.priority.desc(), ProviderSettingsCurrent.provider)
    )
    return [_provider_view(session, p) for p in session.scalars(query)]


def get_provider_settings(session: Session, provider: str) -> ProviderSettingsView:
    _known_provider(provider)
    pointer = _pointer(session, provider)
    if pointer is None or pointer.deleted:
        raise NotFound(f"{provider} has no settings (never configured, or deleted)")
    return _provider_view(session, pointer)


def settings_for_routing(session: Session) -> dict[str, ProviderSettings]:
    """Every usable provider's settings: the stored current version, or the catalog defaults for a provider
    nobody has configured yet. Providers whose settings were deleted are left out."""
    pointers = {p.provider: p for p in session.scalars(select(ProviderSettingsCurrent))}
    result: dict[str, ProviderSettings] = {}
    for provider in PROVIDERS:
        pointer = pointers.get(provider)
        if pointer is None:
            result[provider] = default_provider_settings(provider)
        elif not pointer.deleted:
            result[provider] = _load_provider(_current_row(session, pointer).settings)
    return result


def is_configured(session: Session, provider: str) -> bool:
    """Settings exist for the provider, deleted or not (seed uses this not to re-create deleted ones)."""
    return _pointer(session, provider) is not None


def default_provider(session: Session) -> str | None:
    query = select(ProviderSettingsCurrent.provider).where(ProviderSettingsCurrent.is_default.is_(True))
    return session.scalar(query)


def provider_history(session: Session, provider: str, *, limit: int = 100) -> list[SettingsVersion]:
    """Versions of one provider's settings, newest first."""
    _known_provider(provider)
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise InvalidInput(f"limit must be 1-{HISTORY_LIMIT_MAX}", {"limit": f"1-{HISTORY_LIMIT_MAX}"})
    query = (
        select(ProviderSettingsVersion)
        .where(ProviderSettingsVersion.provider == provider)
        .order_by(ProviderSettingsVersion.version.desc())
        .limit(limit)
    )
    return [_version_view(r) for r in session.scalars(query)]


def provider_version(session: Session, provider: str, version: int) -> SettingsVersion:
    row = session.scalar(
        select(ProviderSettingsVersion).where(
            ProviderSettingsVersion.provider == provider, ProviderSettingsVersion.version == version
        )
    )
    if row is None:
        raise NotFound(f"{provider} has no settings version {version}")
    return _version_view(row)


def diff_provider_versions(session: Session, provider: str, from_version: int, to_version: int) -> list[FieldChange]:
    """What changed from one version to another, field by field."""
    before = provider_version(session, provider, from_version)
    after = provider_version(session, provider, to_version)
    return diff_settings(before.settings, after.settings)


# --- provider settings: writing --------------------------------------------------------------------------------


def _next_provider_version(session: Session, provider: str) -> int:
    query = select(func.max(ProviderSettingsVersion.version)).where(ProviderSettingsVersion.provider == provider)
    return int(session.scalar(query) or 0) + 1


def _write_provider(
    session: Session,
    actor: AuthorizedActor,
    settings: ProviderSettings,
    *,
    action: str,
    comment: str | None,
    expected_version: int | None = None,
    source_version: int | None = None,
    deleted: bool = False,
) -> SaveResult:
    provider = settings.provider
    pointer = _pointer(session, provider, lock=True)
    current_version = pointer.version if pointer is not None else 0
    if expected_version is not None and expected_version != current_version:
        raise Conflict(
            f"{provider} settings changed since you loaded version {expected_version}: version "
            f"{current_version} is current now; reload and apply your change again",
            {"version": f"version {current_version} is current now"},
        )
    before = _current_row(session, pointer).settings if pointer is not None else None
    after = settings_json(settings)
    was_deleted = pointer is not None and pointer.deleted
    if before == after and was_deleted == deleted:
        return SaveResult(changed=False, version=current_version, changes=())

    if settings.is_default and not deleted:
        _clear_other_defaults(session, actor, provider)

    version = _next_provider_version(session, provider)
    row = ProviderSettingsVersion(
        provider=provider,
        version=version,
        settings=after,
        deleted=deleted,
        source_version=source_version,
        created_by=actor.user_id,
        created_by_name=actor.username,
        comment=comment,
    )
    session.add(row)
    _flush_or_conflict(session, f"{provider} settings")
    if pointer is None:
        pointer = ProviderSettingsCurrent(provider=provider)
        session.add(pointer)
    pointer.current_version_id = row.id
    pointer.version = version
    pointer.active = settings.active and not deleted
    pointer.is_default = settings.is_default and not deleted
    pointer.priority = settings.priority
    pointer.deleted = deleted
    pointer.updated_at = utcnow()
    _flush_or_conflict(session, f"{provider} settings")
    audit.record(
        session,
        actor,
        action,
        "provider_settings",
        provider,
        before=None if was_deleted else before,
        after=None if deleted else after,
        comment=comment,
    )
    return SaveResult(changed=True, version=version, changes=tuple(diff_settings(before, after)))


def _clear_other_defaults(session: Session, actor: AuthorizedActor, new_default: str) -> None:
    query = select(ProviderSettingsCurrent).where(
        ProviderSettingsCurrent.is_default.is_(True), ProviderSettingsCurrent.provider != new_default
    )
    for other in list(session.scalars(query)):
        current = _load_provider(_current_row(session, other).settings)
        cleared = current.model_copy(update={"is_default": False})
        _write_provider(
            session,
            actor,
            cleared,
            action="provider_settings.default_cleared",
            comment=f"{new_default} became the default provider",
        )


def save_provider_settings(
    session: Session,
    actor: Actor,
    provider: str,
    data: Mapping[str, Any] | ProviderSettings,
    *,
    comment: str | None = None,
    expected_version: int | None = None,
) -> SaveResult:
    """Create or update a provider's settings (the whole object; missing fields take their defaults)."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action=f"change {provider} settings")
    settings = validate_settings(provider, data)
    pointer = _pointer(session, provider)
    action = "provider_settings.update" if pointer is not None and not pointer.deleted else "provider_settings.create"
    return _write_provider(
        session, who, settings, action=action, comment=_comment(comment), expected_version=expected_version
    )


def update_provider_settings(
    session: Session,
    actor: Actor,
    provider: str,
    changes: Mapping[str, Any],
    *,
    comment: str | None = None,
    expected_version: int | None = None,
) -> SaveResult:
    """Change some fields of the current settings; `params` given here replace the params mapping whole."""
    authorize(session, actor, *SETTINGS_EDITORS, action=f"change {provider} settings")
    current = get_provider_settings(session, provider).settings
    merged = {**settings_json(current), **dict(changes)}
    return save_provider_settings(session, actor, provider, merged, comment=comment, expected_version=expected_version)


def _modify(
    session: Session, who: AuthorizedActor, provider: str, update: dict[str, Any], action: str, comment: str | None
) -> SaveResult:
    current = get_provider_settings(session, provider).settings
    settings = validate_settings(provider, {**settings_json(current), **update})
    return _write_provider(session, who, settings, action=action, comment=_comment(comment))


def set_provider_active(
    session: Session, actor: Actor, provider: str, active: bool, *, comment: str | None = None
) -> SaveResult:
    who = authorize(session, actor, *SETTINGS_EDITORS, action=f"change {provider} settings")
    if not active and default_provider(session) == provider:
        msg = f"{provider} is the default provider; make another provider the default before deactivating it"
        raise InvalidInput(msg, {"active": msg})
    action = "provider_settings.activate" if active else "provider_settings.deactivate"
    return _modify(session, who, provider, {"active": active}, action, comment)


def set_default_provider(session: Session, actor: Actor, provider: str, *, comment: str | None = None) -> SaveResult:
    """Make `provider` the default; the previous default is cleared in the same transaction."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action=f"change {provider} settings")
    return _modify(session, who, provider, {"is_default": True}, "provider_settings.set_default", comment)


def delete_provider_settings(
    session: Session, actor: Actor, provider: str, *, comment: str | None = None
) -> SaveResult:
    """Remove a provider's configuration (history kept; a rollback restores it). Refused for the default."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action=f"delete {provider} settings")
    current = get_provider_settings(session, provider).settings
    if current.is_default:
        msg = f"{provider} is the default provider; make another provider the default before deleting it"
        raise InvalidInput(msg, {"provider": msg})
    return _write_provider(
        session, who, current, action="provider_settings.delete", comment=_comment(comment), deleted=True
    )


def rollback_provider_settings(
    session: Session, actor: Actor, provider: str, to_version: int, *, comment: str | None = None
) -> SaveResult:
    """Make an old version current again, as a new version (re-validated against today's rules)."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action=f"roll back {provider} settings")
    target = provider_version(session, provider, to_version)
    if target.deleted:
        msg = f"version {to_version} records a deletion; roll back to a version before it"
        raise InvalidInput(msg, {"version": msg})
    settings = validate_settings(provider, target.settings)
    return _write_provider(
        session,
        who,
        settings,
        action="provider_settings.rollback",
        comment=_comment(comment) or f"rollback to version {to_version}",
        source_version=to_version,
    )


# --- global settings -------------------------------------------------------------------------------------------


def _latest_global(session: Session) -> GlobalSettingsVersion | None:
    query = select(GlobalSettingsVersion).order_by(GlobalSettingsVersion.version.desc()).limit(1)
    return session.scalar(query)


def get_global_settings(session: Session) -> GlobalSettingsView:
    """The current global settings; the built-in defaults (version 0) before the first save."""
    row = _latest_global(session)
    if row is None:
        return GlobalSettingsView(0, GlobalSettings(), None, None, None)
    return GlobalSettingsView(
        version=row.version,
        settings=validate_global_settings(row.settings),
        updated_at=row.created_at,
        updated_by=row.created_by_name,
        comment=row.comment,
    )


def global_history(session: Session, *, limit: int = 100) -> list[SettingsVersion]:
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise InvalidInput(f"limit must be 1-{HISTORY_LIMIT_MAX}", {"limit": f"1-{HISTORY_LIMIT_MAX}"})
    query = select(GlobalSettingsVersion).order_by(GlobalSettingsVersion.version.desc()).limit(limit)
    return [_version_view(r) for r in session.scalars(query)]


def global_version(session: Session, version: int) -> SettingsVersion:
    row = session.scalar(select(GlobalSettingsVersion).where(GlobalSettingsVersion.version == version))
    if row is None:
        raise NotFound(f"there is no global settings version {version}")
    return _version_view(row)


def diff_global_versions(session: Session, from_version: int, to_version: int) -> list[FieldChange]:
    return diff_settings(global_version(session, from_version).settings, global_version(session, to_version).settings)


def _write_global(
    session: Session,
    actor: AuthorizedActor,
    settings: GlobalSettings,
    *,
    action: str,
    comment: str | None,
    expected_version: int | None = None,
    source_version: int | None = None,
) -> SaveResult:
    latest = _latest_global(session)
    current_version = latest.version if latest is not None else 0
    if expected_version is not None and expected_version != current_version:
        raise Conflict(
            f"global settings changed since you loaded version {expected_version}: version {current_version} "
            "is current now; reload and apply your change again",
            {"version": f"version {current_version} is current now"},
        )
    before = latest.settings if latest is not None else None
    after = settings_json(settings)
    if before == after:
        return SaveResult(changed=False, version=current_version, changes=())
    version = current_version + 1
    session.add(
        GlobalSettingsVersion(
            version=version,
            settings=after,
            source_version=source_version,
            created_by=actor.user_id,
            created_by_name=actor.username,
            comment=comment,
        )
    )
    _flush_or_conflict(session, "the global settings")
    audit.record(session, actor, action, "global_settings", "global", before=before, after=after, comment=comment)
    return SaveResult(changed=True, version=version, changes=tuple(diff_settings(before, after)))


def save_global_settings(
    session: Session,
    actor: Actor,
    data: Mapping[str, Any] | GlobalSettings,
    *,
    comment: str | None = None,
    expected_version: int | None = None,
) -> SaveResult:
    who = authorize(session, actor, *SETTINGS_EDITORS, action="change the global settings")
    settings = validate_global_settings(settings_json(data) if isinstance(data, GlobalSettings) else data)
    action = "global_settings.update" if _latest_global(session) is not None else "global_settings.create"
    return _write_global(
        session, who, settings, action=action, comment=_comment(comment), expected_version=expected_version
    )


def rollback_global_settings(
    session: Session, actor: Actor, to_version: int, *, comment: str | None = None
) -> SaveResult:
    who = authorize(session, actor, *SETTINGS_EDITORS, action="roll back the global settings")
    target = global_version(session, to_version)
    settings = validate_global_settings(target.settings)
    return _write_global(
        session,
        who,
        settings,
        action="global_settings.rollback",
        comment=_comment(comment) or f"rollback to version {to_version}",
        source_version=to_version,
    )
