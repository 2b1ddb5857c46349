"""The audit log: who changed what, when, with the state before and after.

`record` adds a row to the caller's session, so it commits or rolls back together with the change it
describes: there is never a change without its audit row, nor an audit row for a change that did not happen.
It takes the `AuthorizedActor` that core.authz.authorize returned for that change, so every row names the
account as stored in the database (the system actor's role shows as "SYSTEM").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.authz import AuthorizedActor, authorize
from core.security import SETTINGS_EDITORS, Actor
from db.models import AuditLog

MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor_id: int | None
    actor_name: str
    actor_role: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    comment: str | None

    def changed_fields(self) -> dict[str, tuple[Any, Any]]:
        """Top-level keys whose value differs between before and after: {key: (before, after)}."""
        before = self.before or {}
        after = self.after or {}
        return {
            key: (before.get(key), after.get(key))
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        }


def _entry(row: AuditLog) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor_id=row.actor_id,
        actor_name=row.actor_name,
        actor_role=row.actor_role,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        before=row.before,
        after=row.after,
        comment=row.comment,
    )


def record(
    session: Session,
    who: AuthorizedActor,
    action: str,
    target_type: str,
    target_id: str,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    comment: str | None = None,
) -> AuditLog:
    """Add an audit row to `session` (flushed, not committed: the caller's transaction decides)."""
    row = AuditLog(
        actor_id=who.user_id,
        actor_name=who.username,
        actor_role=who.role_label,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        before=dict(before) if before is not None else None,
        after=dict(after) if after is not None else None,
        comment=comment,
    )
    session.add(row)
    session.flush()
    return row


def list_entries(
    session: Session,
    actor: Actor,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor_id: int | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AuditEntry]:
    """Audit rows, newest first, filtered. ADMIN and HERO only: the log shows every user's changes."""
    authorize(session, actor, *SETTINGS_EDITORS, action="read the audit log", lock=False)
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be 1-{MAX_PAGE_SIZE}", {"limit": f"must be 1-{MAX_PAGE_SIZE}"})
    if offset < 0:
        raise InvalidInput("offset must not be negative", {"offset": "must not be negative"})
    query = select(AuditLog)
    if since is not None:
        query = query.where(AuditLog.at >= since)
    if until is not None:
        query = query.where(AuditLog.at < until)
    if actor_id is not None:
        query = query.where(AuditLog.actor_id == actor_id)
    if action is not None:
        query = query.where(AuditLog.action == action)
    if target_type is not None:
        query = query.where(AuditLog.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditLog.target_id == target_id)
    query = query.order_by(AuditLog.at.desc(), AuditLog.id.desc()).limit(limit).offset(offset)
    return [_entry(row) for row in session.scalars(query)]


def count_entries(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditLog)) or 0)
