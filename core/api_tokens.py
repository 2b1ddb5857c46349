"""API tokens for the REST API: created (the secret shown once), listed, revoked, and checked on every request.

    created = create_token(session, actor, user_id, "ci job", role=Role.USER, expires_in_days=90)
    created.secret        # "igt_..." shown to the person once; only its SHA-256 hex is stored
    actor = authenticate_token(session, raw)   # every API request: refused at once when revoked or expired

Who may do what (core.authz, from the database):
- An ADMIN creates, lists and revokes tokens for anyone; every active user does so for their own account.
- A token acts with its own role, never above its user's *current* role: the ceiling is applied when the token is
  used, not only when it was made, so demoting a user lowers every token they hold at once.
- A revoked token, an expired one, or one whose user is deactivated is refused on its next use (the row is read
  on every request; nothing is cached).

The secret is `igt_` + 43 URL-safe random characters (256 bits), so a fast hash is enough (as for console
sessions, core.console_sessions.digest): lookups are one indexed equality. The first characters (`prefix`) are
stored so a person can tell tokens apart. Audit rows name the token by id, name and prefix, never the secret.

`last_used_at` is written at most once a minute per token (a guarded UPDATE, sent only when the row just read says
it is due), so a busy client does not turn every API read into a write, nor send a statement that writes nothing.

The token's role travels as `Actor.role_cap`, which `core.authz.authorize` applies to the role it reads from the
database at every change: a HERO-scoped token of an ADMIN is a HERO in core, whatever the endpoint checks.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound, PermissionDenied
from core import audit
from core.authz import AuthorizedActor, authorize
from core.console_sessions import digest
from core.security import Actor, Role
from db.models import ApiToken, User, utcnow

__all__ = [
    "MAX_LIFETIME_DAYS",
    "TOKEN_PREFIX",
    "CreatedToken",
    "TokenGrant",
    "TokenRefused",
    "TokenView",
    "authenticate_request",
    "authenticate_token",
    "capped_role",
    "check_token_form",
    "create_token",
    "list_tokens",
    "revoke_token",
]

TOKEN_PREFIX = "igt_"
_SECRET_BYTES = 32
_WELL_FORMED = re.compile(r"^igt_[A-Za-z0-9_-]{43}$")
_SHOWN_CHARS = 12
"""How much of the secret is stored in clear as `prefix` ("igt_" and 8 random characters: 48 bits)."""
NAME_MAX = 100
MAX_LIFETIME_DAYS = 366
RATE_LIMIT_MAX = 100_000
LAST_USED_EVERY = timedelta(minutes=1)

_RANK = {Role.USER: 0, Role.HERO: 1, Role.ADMIN: 2}


class TokenRefused(PermissionDenied):
    """An API token that may not be used (unknown, revoked, expired, or its account deactivated)."""


@dataclass(frozen=True)
class TokenView:
    id: int
    user_id: int
    username: str
    name: str
    prefix: str
    role: Role | None
    """The role asked for at creation; None = the user's role."""
    effective_role: Role
    """What it acts with now: its role, capped by the user's current role."""
    rate_limit_per_minute: int | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    user_active: bool

    def status(self, now: datetime | None = None) -> str:
        """active | revoked | expired | user deactivated."""
        moment = now or utcnow()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= moment:
            return "expired"
        if not self.user_active:
            return "user deactivated"
        return "active"


@dataclass(frozen=True)
class CreatedToken:
    token: TokenView
    secret: str
    """The whole token: show it once; it cannot be read back."""


def capped_role(token_role: Role | None, user_role: Role) -> Role:
    """The token's role, never above its user's current role."""
    if token_role is None or _RANK[token_role] > _RANK[user_role]:
        return user_role
    return token_role


def _view(token: ApiToken, user: User) -> TokenView:
    return TokenView(
        id=token.id,
        user_id=token.user_id,
        username=user.username,
        name=token.name,
        prefix=token.prefix,
        role=token.role,
        effective_role=capped_role(token.role, user.role),
        rate_limit_per_minute=token.rate_limit_per_minute,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        user_active=user.active,
    )


def _public(token: ApiToken) -> dict[str, object]:
    """What an audit row shows of a token (never the secret or its hash)."""
    return {
        "user_id": token.user_id,
        "name": token.name,
        "prefix": token.prefix,
        "role": token.role.value if token.role else None,
        "rate_limit_per_minute": token.rate_limit_per_minute,
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }


def _may_manage(who: AuthorizedActor, user_id: int, action: str) -> None:
    """ADMIN (or the system) for anyone; anyone else only for their own account."""
    if who.is_system or who.role is Role.ADMIN or who.user_id == user_id:
        return
    raise PermissionDenied(f"{who.username} may not {action} of another user: this needs the ADMIN role")


def _clean_name(name: str) -> str:
    text = name.strip() if isinstance(name, str) else ""
    problem = None
    if not text:
        problem = "give the token a name (what uses it, e.g. 'nightly batch')"
    elif len(text) > NAME_MAX:
        problem = f"the name may be at most {NAME_MAX} characters"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "the name may not contain control characters"
    if problem is not None:
        raise InvalidInput(problem, {"name": problem})
    return text


def _check_number(value: int | None, field: str, low: int, high: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        message = f"{what} must be a whole number from {low} to {high:,}"
        raise InvalidInput(message, {field: message})
    return value


def create_token(
    session: Session,
    actor: Actor,
    user_id: int,
    name: str,
    *,
    role: Role | str | None = None,
    expires_in_days: int | None = 90,
    rate_limit_per_minute: int | None = None,
    now: datetime | None = None,
) -> CreatedToken:
    """A new token for `user_id` (the secret is in the result, once). `role` None acts as the user's role; a
    role above the user's current one is refused. `expires_in_days` None: never expires."""
    action = "create API tokens"
    who = authorize(session, actor, *Role, action=action)
    _may_manage(who, user_id, action)
    clean = _clean_name(name)
    days = _check_number(expires_in_days, "expires_in_days", 1, MAX_LIFETIME_DAYS, "the lifetime in days")
    limit = _check_number(rate_limit_per_minute, "rate_limit_per_minute", 1, RATE_LIMIT_MAX, "the rate limit")
    try:
        wanted = Role(role) if role is not None else None
    except ValueError:
        raise InvalidInput(f"unknown role {role!r}", {"role": "one of ADMIN, HERO, USER"}) from None
    user = session.get(User, user_id, populate_existing=True)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    if not user.active:
        raise InvalidInput(f"{user.username} is deactivated: no token can be made for them", {"user": "deactivated"})
    if wanted is not None and _RANK[wanted] > _RANK[user.role]:
        message = f"a token cannot have a role above its user's: {user.username} is {user.role.value}"
        raise InvalidInput(message, {"role": message})
    moment = now or utcnow()
    secret = TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
    token = ApiToken(
        user_id=user.id,
        name=clean,
        token_hash=digest(secret),
        prefix=secret[:_SHOWN_CHARS],
        scopes=[],
        role=wanted,
        rate_limit_per_minute=limit,
        created_at=moment,
        expires_at=moment + timedelta(days=days) if days is not None else None,
    )
    session.add(token)
    session.flush()
    audit.record(session, who, "api_token.create", "api_token", str(token.id), after=_public(token))
    return CreatedToken(_view(token, user), secret)


def list_tokens(session: Session, actor: Actor, user_id: int | None = None) -> list[TokenView]:
    """Tokens, newest first: an ADMIN sees anyone's (`user_id` None: everyone's); others only their own."""
    who = authorize(session, actor, *Role, action="list API tokens", lock=False)
    if user_id is None and not (who.is_system or who.role is Role.ADMIN):
        user_id = who.user_id
    if user_id is not None:
        _may_manage(who, user_id, "list the API tokens")
    query = select(ApiToken, User).join(User, User.id == ApiToken.user_id)
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    query = query.order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
    return [_view(token, user) for token, user in session.execute(query).tuples()]


def revoke_token(session: Session, actor: Actor, token_id: int, *, now: datetime | None = None) -> TokenView:
    """Revoke a token: refused from its next use on. Revoking a revoked token changes nothing."""
    action = "revoke API tokens"
    who = authorize(session, actor, *Role, action=action)
    token = session.get(ApiToken, token_id, populate_existing=True)
    if token is None:
        raise NotFound(f"no API token with id {token_id}")
    _may_manage(who, token.user_id, action)
    user = session.get(User, token.user_id)
    assert user is not None  # a foreign key
    if token.revoked_at is None:
        before = _public(token)
        token.revoked_at = now or utcnow()
        session.flush()
        audit.record(session, who, "api_token.revoke", "api_token", str(token.id), before=before, after=_public(token))
    return _view(token, user)


@dataclass(frozen=True)
class TokenGrant:
    """What a request's bearer token grants: the actor, and the token itself for rate limiting."""

    actor: Actor
    token_id: int
    rate_limit_per_minute: int | None
    """The token's own limit; None: the installation's default."""


def authenticate_token(session: Session, raw: str, *, now: datetime | None = None) -> Actor:
    """`authenticate_request(...).actor`."""
    return authenticate_request(session, raw, now=now).actor


_tokens = cast(Table, ApiToken.__table__)
_users = cast(Table, User.__table__)
_GRANT = (
    select(
        _tokens.c.id,
        _tokens.c.prefix,
        _tokens.c.role,
        _tokens.c.rate_limit_per_minute,
        _tokens.c.expires_at,
        _tokens.c.revoked_at,
        _tokens.c.last_used_at,
        _users.c.id.label("user_id"),
        _users.c.username,
        _users.c.role.label("user_role"),
        _users.c.active,
    )
    .join(_users, _users.c.id == _tokens.c.user_id)
    .where(_tokens.c.token_hash == bindparam("token_hash"))
)
"""What a request's token grants, and whether it may be used: one indexed read (built once; columns, not ORM
objects: every API request runs it)."""


def check_token_form(raw: str) -> str:
    """`raw` stripped, if it can be an Imagegate API token at all (TokenRefused otherwise): a check without the
    database, so a request with a malformed token costs nothing more."""
    token = raw.strip() if isinstance(raw, str) else ""
    if not _WELL_FORMED.match(token):
        raise TokenRefused("not an Imagegate API token (it starts with igt_ followed by 43 characters)")
    return token


def authenticate_request(session: Session, raw: str, *, now: datetime | None = None) -> TokenGrant:
    """The actor a REST request acts as, from its bearer token; TokenRefused unless the token exists, is not
    revoked or expired, and its user is active. The actor's role is the token's, capped by the user's current
    role. Notes the use in `last_used_at` (at most once a minute).

    One indexed read (`_GRANT`), and the `last_used_at` write only when that read says it is due."""
    secret = check_token_form(raw)
    moment = now or utcnow()
    connection = session.connection()
    token = connection.execute(_GRANT, {"token_hash": digest(secret)}).one_or_none()
    if token is None:
        raise TokenRefused("unknown API token")
    if token.revoked_at is not None:
        raise TokenRefused(f"this API token ({token.prefix}…) was revoked")
    if token.expires_at is not None and token.expires_at <= moment:
        raise TokenRefused(f"this API token ({token.prefix}…) expired on {token.expires_at:%Y-%m-%d %H:%M} UTC")
    if not token.active:
        raise TokenRefused(f"the account of this API token ({token.username}) is deactivated")
    due = moment - LAST_USED_EVERY
    if token.last_used_at is None or token.last_used_at < due:
        # Still guarded: another process may have noted the use since the read.
        connection.execute(
            update(_tokens)
            .where(_tokens.c.id == token.id, or_(_tokens.c.last_used_at.is_(None), _tokens.c.last_used_at < due))
            .values(last_used_at=moment)
        )
    # role_cap: core.authz applies the token's role at every change, against the user's role as it is then.
    actor = Actor(
        user_id=token.user_id,
        username=token.username,
        role=capped_role(token.role, token.user_role),
        role_cap=token.role,
    )
    return TokenGrant(actor, token.id, token.rate_limit_per_minute)
