"""Authorization from the database: every core call that changes data (or reads what only staff may see) starts
with `authorize`, in the session of the change.

    who = authorize(session, actor, Role.ADMIN, Role.HERO, action="change prices")
    ... the change ..., audit.record(session, who, ...)

`authorize` reads the acting account (it exists, is active, has one of the roles) in the same transaction as
the change and holds it until that transaction ends, so a deactivation or demotion that commits first is seen,
and one that comes later waits for the change to finish: there is no moment where a stale check lets a change
through. The role an `Actor` carries is never consulted. What it returns, an `AuthorizedActor`, is what audit
rows and versions are written with, so they name the account as stored (its username and role), not a claim.

How the check is tied to the change on each database:
- SQLite: Python 3.11's sqlite3 opens a transaction only at the first write, so a read before it is not isolated.
  `begin_write` issues BEGIN IMMEDIATE first, taking SQLite's single write lock before anything is read; the
  rest of the transaction is then serial with every other writer (they wait, up to the busy timeout).
- PostgreSQL: the account's row is read FOR SHARE, which a concurrent UPDATE of that row (deactivate, change
  role) must wait for, and which waits for such an UPDATE in flight and then reads its result.

The system actor (`Actor.system`) is an in-process privilege: it passes every role check (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from common.errors import PermissionDenied
from core.security import Actor, Role, capped
from db.models import User

__all__ = ["SYSTEM_ROLE_LABEL", "AuthorizedActor", "authorize", "begin_write"]

SYSTEM_ROLE_LABEL = "SYSTEM"
"""What audit rows show as the role of the system actor (which has no role: it is not an account)."""

_MINTED = object()


@dataclass(frozen=True)
class AuthorizedActor:
    """An actor `authorize` checked against the database. Only `authorize` makes them; services pass them to
    whatever records who did something (audit rows, versions)."""

    user_id: int | None
    """None for the system actor."""
    username: str
    """The account's username as stored (or the system actor's name)."""
    role: Role | None
    """The account's role as stored; None for the system actor."""
    _minted: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._minted is not _MINTED:
            raise TypeError("an AuthorizedActor comes only from core.authz.authorize")

    @property
    def is_system(self) -> bool:
        return self.user_id is None

    @property
    def role_label(self) -> str:
        return SYSTEM_ROLE_LABEL if self.role is None else self.role.value


def begin_write(session: Session) -> None:
    """Make the session's transaction a writer now, before it reads what it will decide on.

    SQLite: BEGIN IMMEDIATE (the database's write lock, waiting up to the busy timeout), unless a transaction is
    already open, which in Python 3.11's sqlite3 means a write already took that lock. PostgreSQL: nothing;
    callers lock the rows they decide on."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    driver_connection = connection.connection.dbapi_connection
    if not getattr(driver_connection, "in_transaction", True):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_ACCOUNT = select(User.id, User.username, User.active, User.role).where(User.id == bindparam("user_id"))
_ACCOUNT_LOCKED = _ACCOUNT.with_for_update(read=True)  # FOR SHARE on PostgreSQL; SQLite holds its write lock already


def authorize(session: Session, actor: Actor, *roles: Role, action: str, lock: bool = True) -> AuthorizedActor:
    """The acting account, checked in `session`: PermissionDenied unless it exists, is active and has one of
    `roles` (or `actor` is the system). `action` completes "<name> may not ..." in the refusal.

    `lock=True` (the default, for every change) ties the check to the session's transaction as the module
    docstring says; pass `lock=False` only where nothing is written (a read may see a deactivation a moment
    late; a change may not)."""
    if not roles:
        raise ValueError("authorize needs at least one role")
    if lock:
        begin_write(session)
    if actor.is_system:
        return AuthorizedActor(None, actor.username, None, _MINTED)
    user_id = actor.user_id
    if user_id is None or isinstance(user_id, bool) or not isinstance(user_id, int):
        raise PermissionDenied(f"{actor.username} may not {action}: no account is signed in")
    # The four columns, not the entity: every call of every request goes through here, and an ORM load (identity
    # map, instance state) cost several times the statement itself.
    query = _ACCOUNT_LOCKED if lock else _ACCOUNT
    user = session.connection().execute(query, {"user_id": user_id}).one_or_none()
    if user is None:
        raise PermissionDenied(f"nobody may {action} as user id {user_id}: there is no such account")
    if not user.active:
        raise PermissionDenied(f"{user.username} may not {action}: the account is deactivated")
    role = capped(user.role, actor.role_cap)
    if role not in roles:
        allowed = " or ".join(r.value for r in roles)
        acting = role.value if role is user.role else f"{role.value} through a token of that role"
        raise PermissionDenied(f"{user.username} ({acting}) may not {action}: this needs the {allowed} role")
    return AuthorizedActor(user.id, user.username, role, _MINTED)
