"""User preferences: a user's own defaults (size, preset, negative prompt), within what the admins allow.

Stored in `user_preferences`, one row per user, with a compare-and-set `version` (0 = nothing saved yet): a save
names the version it was edited from and is refused with Conflict when someone saved in between. Values pass the
same validation as the global settings (core.settings.UserPreferenceValues: sizes parse, presets exist, negative
prompts follow the prompt rules, no API key anywhere) plus the admins' list of what users may set
(`GlobalSettings.user_preference_fields`); each refused value gets its field error.

Resolution: `resolve_effective(..., user_preferences=preferences_for_request(session, user_id))` places them
between provider settings and preset; every value they set names its source ("user preference"). The admins'
list is applied again there, so withdrawing a field takes effect at once, without rewriting anyone's row.

Authorization (in core, from the database): a user reads and edits only their own preferences; an ADMIN may
read anyone's but edit only their own; the system actor (CLI, jobs) may do both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from common.errors import Conflict, InvalidInput, PermissionDenied
from core import audit, settings_service
from core.authz import AuthorizedActor, authorize
from core.keys import keys_in
from core.security import Actor, Role
from core.settings import USER_PREFERENCE_FIELDS, UserPreferenceValues, field_errors_from_validation
from db.engine import dialect_insert
from db.models import UserPreferences, utcnow

__all__ = [
    "PreferencesView",
    "get_preferences",
    "preferences_for_request",
    "save_preferences",
    "validate_preferences",
]

_ANY_ROLE = (Role.ADMIN, Role.HERO, Role.USER)


@dataclass(frozen=True)
class PreferencesView:
    user_id: int
    values: UserPreferenceValues
    version: int
    """0 when the user has saved nothing yet; pass it back as `expected_version` to save."""
    updated_at: datetime | None
    allowed_fields: tuple[str, ...]
    """What the admins allow users to set now."""


def _stored(values: UserPreferenceValues) -> dict[str, Any]:
    return values.model_dump(exclude_none=True)


def _load(data: Mapping[str, Any]) -> UserPreferenceValues:
    try:
        return UserPreferenceValues.model_validate(dict(data))
    except ValidationError:
        # A stored value that no longer validates (a preset removed, say) is dropped, never fatal: the user's
        # requests run on the layers below, and the page shows what is left to correct.
        kept = {}
        for name, value in data.items():
            try:
                UserPreferenceValues.model_validate({name: value})
            except ValidationError:
                continue
            kept[name] = value
        return UserPreferenceValues.model_validate(kept)


def _allowed_fields(session: Session) -> tuple[str, ...]:
    return settings_service.get_global_settings(session).settings.user_preference_fields


def validate_preferences(
    data: Mapping[str, Any], *, allowed: tuple[str, ...] = USER_PREFERENCE_FIELDS
) -> UserPreferenceValues:
    """UserPreferenceValues from user data, or InvalidInput with a field error for every refused value (one the
    admins do not allow included). None or "" clears a field (a blank negative prompt is a value: "")."""
    if not isinstance(data, Mapping):
        raise InvalidInput("preferences must be a mapping", {"preferences": "expected a mapping of fields to values"})
    errors: dict[str, str] = dict(keys_in(dict(data)))
    cleaned = {k: v for k, v in data.items() if v is not None and not (k != "negative_prompt" and v == "")}
    for name in cleaned:
        if name in USER_PREFERENCE_FIELDS and name not in allowed:
            errors[name] = f"{name} is not something users may set: the admins allow {', '.join(allowed) or 'nothing'}"
    try:
        values = UserPreferenceValues.model_validate(cleaned)
    except ValidationError as exc:
        errors.update(field_errors_from_validation(exc, allowed=USER_PREFERENCE_FIELDS))
        values = None
    if errors or values is None:
        raise InvalidInput(f"the preferences are not valid ({len(errors)} problem(s))", dict(sorted(errors.items())))
    return values


def _row(session: Session, user_id: int) -> UserPreferences | None:
    return session.scalar(
        select(UserPreferences).where(UserPreferences.user_id == user_id).execution_options(populate_existing=True)
    )


def _view(session: Session, user_id: int) -> PreferencesView:
    row = _row(session, user_id)
    allowed = _allowed_fields(session)
    if row is None:
        return PreferencesView(user_id, UserPreferenceValues(), 0, None, allowed)
    return PreferencesView(user_id, _load(row.preferences or {}), row.version, row.updated_at, allowed)


def _check_owner(who: AuthorizedActor, user_id: int, *, reading: bool) -> None:
    if who.is_system or who.user_id == user_id:
        return
    if reading and who.role is Role.ADMIN:
        return
    verb = "read" if reading else "change"
    raise PermissionDenied(f"{who.username} may not {verb} another user's preferences")


def get_preferences(session: Session, actor: Actor, user_id: int) -> PreferencesView:
    """The user's saved preferences (empty, version 0, when none): their own, or anyone's for an ADMIN."""
    who = authorize(session, actor, *_ANY_ROLE, action="read preferences", lock=False)
    _check_owner(who, user_id, reading=True)
    return _view(session, user_id)


def save_preferences(
    session: Session, actor: Actor, user_id: int, data: Mapping[str, Any], *, expected_version: int
) -> PreferencesView:
    """Replace the user's preferences with `data` (fields left out are cleared), if the stored version is still
    `expected_version` (0: none saved yet); Conflict otherwise. One audit row per change; nothing written when
    nothing changed."""
    who = authorize(session, actor, *_ANY_ROLE, action="change preferences")
    _check_owner(who, user_id, reading=False)
    if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 0:
        raise InvalidInput("expected_version is the version the form was loaded with", {"version": "0 or more"})
    values = validate_preferences(data, allowed=_allowed_fields(session))
    stored = _stored(values)
    before = _row(session, user_id)
    if before is not None and before.version == expected_version and dict(before.preferences or {}) == stored:
        return _view(session, user_id)
    now = utcnow()
    if expected_version == 0:
        table: Any = UserPreferences.__table__
        statement = (
            dialect_insert(session, table)
            .values(user_id=user_id, preferences=stored, version=1, updated_at=now)
            .on_conflict_do_nothing(index_elements=["user_id"])
            .returning(table.c.user_id)
        )
        written = session.execute(statement).first() is not None
    else:
        written = (
            session.execute(
                update(UserPreferences)
                .where(UserPreferences.user_id == user_id, UserPreferences.version == expected_version)
                .values(preferences=stored, version=UserPreferences.version + 1, updated_at=now)
                .returning(UserPreferences.user_id)
                .execution_options(synchronize_session=False)
            ).first()
            is not None
        )
    if not written:
        raise Conflict("these preferences were changed elsewhere since they were loaded; reload and try again")
    audit.record(
        session,
        who,
        "user_preferences.update",
        "user",
        str(user_id),
        before=None if before is None else dict(before.preferences or {}),
        after=stored,
    )
    return _view(session, user_id)


_PREFERENCES_OF = select(UserPreferences.preferences).where(UserPreferences.user_id == bindparam("user_id"))


def preferences_for_request(session: Session, user_id: int | None) -> UserPreferenceValues | None:
    """The requesting user's preferences for `resolve_effective(user_preferences=...)`; None without a user or
    without saved preferences. No authorization: the generation path reads the requester's own row."""
    if user_id is None:
        return None
    row = session.connection().execute(_PREFERENCES_OF, {"user_id": user_id}).scalar()
    if not row:
        return None
    return _load(row)
