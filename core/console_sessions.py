"""Console sessions: what keeps a browser signed in across reloads and deep links, and what ends it.

The browser holds an opaque random token in an HttpOnly cookie; the database holds only the token's SHA-256,
so a copy of the database signs nobody in, and the token is long and random enough that a fast hash is safe.
The cookie is not a signed payload: whether it is valid is decided by its row, at every page load, which
makes it revocable at once (a signature alone could not be withdrawn before it expired).

Life of a session:
1. `start(user_id)` right after a password sign-in: a row with a one-time hand-off code valid for
   HANDOFF_LIFETIME. The console tab that signed in keeps the row's id in its server-side session state.
2. `collect(handoff)`: the browser trades the code, once, for a fresh token that becomes its cookie. One atomic
   UPDATE, so two requests with the same code can never both get a cookie (on SQLite and PostgreSQL).
3. `validate_token(token)` when a new browser session arrives with a cookie (a reload, a deep link), and
   `validate(session_id)` on every run after that: the row is not revoked, not expired, and its user exists
   and is active. The user, and so the role, is read from the database each time.
4. `revoke(session_id)` at sign-out; `revoke_user_sessions(user_id)` when an account is deactivated or its
   password reset. A session found with an inactive user is revoked too, so a reactivation does not revive it.

Expiry is absolute, SESSION_LIFETIME after sign-in, not sliding: a stolen cookie is worth at most a working
day, and renewing an HttpOnly cookie would need another round trip through the browser on a timer.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, delete, or_, select, update
from sqlalchemy.orm import Session

from common.errors import PermissionDenied
from db.models import ConsoleSession, Role, User, utcnow

SESSION_LIFETIME = timedelta(hours=12)
HANDOFF_LIFETIME = timedelta(minutes=1)
"""Time for the browser to follow the redirect that trades the hand-off code for its cookie."""
RETENTION = timedelta(days=30)
"""Ended sessions are kept this long (who was signed in when), then deleted at the user's next sign-in."""
_SECRET_BYTES = 32
# What token_urlsafe(_SECRET_BYTES) produces; anything else is refused before it is hashed or looked up.
_WELL_FORMED = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class StartedSession:
    session_id: int
    handoff: str
    """One-time code the browser trades for its cookie (`collect`); never stored, only its hash."""
    expires_at: datetime


@dataclass(frozen=True)
class ValidSession:
    session_id: int
    user_id: int
    username: str
    role: Role
    """As the database has it at this check: never from the cookie or the browser."""
    expires_at: datetime


@dataclass(frozen=True)
class IssuedToken:
    token: str
    """The cookie's value; never stored, only its hash."""
    session: ValidSession


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _well_formed(secret: object) -> bool:
    return isinstance(secret, str) and _WELL_FORMED.match(secret) is not None


def start(session: Session, user_id: int, *, now: datetime | None = None) -> StartedSession:
    """A new session for an active user who has just proven who they are; the caller commits."""
    now = now or utcnow()
    user = session.get(User, user_id)
    if user is None or not user.active:
        raise PermissionDenied("only an active account can be signed in")
    handoff = secrets.token_urlsafe(_SECRET_BYTES)
    row = ConsoleSession(
        user_id=user_id,
        handoff_hash=digest(handoff),
        handoff_expires_at=now + HANDOFF_LIFETIME,
        created_at=now,
        expires_at=now + SESSION_LIFETIME,
    )
    session.add(row)
    session.flush()
    _forget_ended(session, user_id, now)
    return StartedSession(session_id=row.id, handoff=handoff, expires_at=row.expires_at)


def collect(session: Session, handoff: str, *, now: datetime | None = None) -> IssuedToken | None:
    """Trade a hand-off code for the cookie's token, once; None for an unknown, used or expired code."""
    if not _well_formed(handoff):
        return None
    now = now or utcnow()
    token = secrets.token_urlsafe(_SECRET_BYTES)
    # One statement checks and consumes the code: of two concurrent requests, exactly one matches the row.
    consumed = _rows_changed(
        session,
        update(ConsoleSession)
        .where(
            ConsoleSession.handoff_hash == digest(handoff),
            ConsoleSession.handoff_expires_at > now,
            ConsoleSession.revoked_at.is_(None),
            ConsoleSession.expires_at > now,
        )
        .values(token_hash=digest(token), handoff_hash=None, handoff_expires_at=None),
    )
    if consumed != 1:
        return None
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.token_hash == digest(token)))
    valid = _check(session, row, now)
    return IssuedToken(token=token, session=valid) if valid is not None else None


def validate(session: Session, session_id: int, *, now: datetime | None = None) -> ValidSession | None:
    """The session with this id if it still holds (not revoked, not expired, its user active); else None."""
    return _check(session, session.get(ConsoleSession, session_id), now or utcnow())


def validate_token(session: Session, token: str, *, now: datetime | None = None) -> ValidSession | None:
    """The session a cookie's token belongs to, if it still holds; else None."""
    if not _well_formed(token):
        return None
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.token_hash == digest(token)))
    return _check(session, row, now or utcnow())


def revoke(session: Session, session_id: int, *, now: datetime | None = None) -> bool:
    """End one session (sign-out). True if it was still open."""
    return _rows_changed(
        session,
        update(ConsoleSession)
        .where(ConsoleSession.id == session_id, ConsoleSession.revoked_at.is_(None))
        .values(revoked_at=now or utcnow()),
    ) > 0


def revoke_token(session: Session, token: str, *, now: datetime | None = None) -> bool:
    """End the session a cookie's token belongs to. True if it was still open."""
    if not _well_formed(token):
        return False
    return _rows_changed(
        session,
        update(ConsoleSession)
        .where(ConsoleSession.token_hash == digest(token), ConsoleSession.revoked_at.is_(None))
        .values(revoked_at=now or utcnow()),
    ) > 0


def revoke_user_sessions(session: Session, user_id: int, *, now: datetime | None = None) -> int:
    """End every open session of one user (deactivation, a password reset); how many were open."""
    return _rows_changed(
        session,
        update(ConsoleSession)
        .where(ConsoleSession.user_id == user_id, ConsoleSession.revoked_at.is_(None))
        .values(revoked_at=now or utcnow()),
    )


def _rows_changed(session: Session, statement: Update) -> int:
    # synchronize_session=False: nothing loaded in this session is edited in place by these statements.
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast("CursorResult[Any]", result).rowcount)


def _check(session: Session, row: ConsoleSession | None, now: datetime) -> ValidSession | None:
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    user = session.get(User, row.user_id)
    if user is None or not user.active:
        # Ended for good: reactivating the account must not bring back a session from before.
        revoke(session, row.id, now=now)
        return None
    return ValidSession(
        session_id=row.id, user_id=user.id, username=user.username, role=user.role, expires_at=row.expires_at
    )


def _forget_ended(session: Session, user_id: int, now: datetime) -> None:
    """Delete this user's sessions that ended more than RETENTION ago, so the table stays small."""
    cutoff = now - RETENTION
    session.execute(
        delete(ConsoleSession)
        .where(
            ConsoleSession.user_id == user_id,
            or_(ConsoleSession.expires_at < cutoff, ConsoleSession.revoked_at < cutoff),
        )
        .execution_options(synchronize_session=False)
    )
