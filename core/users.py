"""Local user accounts: creation, sign-in, roles, passwords, deactivation, and the first admin.

Who may do what (decided here, enforced here):
- ADMIN manages users: create, change roles, reset passwords, deactivate and reactivate.
- HERO and ADMIN may list users (the audit and usage pages filter by user); HERO cannot change them.
- Anyone signed in may change their own password, with their current one.
- The last active ADMIN cannot be demoted or deactivated: the installation would have nobody to manage it.
Every change writes an audit row in the same transaction; hashes never appear in audit rows or views.
Users are never deleted, so history (audit, usage) always resolves to a person.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exc, func, select
from sqlalchemy.orm import Session, sessionmaker

from core import audit
from common.errors import AccountLocked, Conflict, InvalidInput, NotFound, PermissionDenied
from core.security import (
    Actor,
    Role,
    check_password_policy,
    hash_password,
    require_role,
    verify_dummy,
    verify_password,
)
from db.engine import transaction
from db.models import SystemFlag, User, utcnow

USERNAME_MIN = 3
USERNAME_MAX = 32
_USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
RESERVED_USERNAMES = frozenset({"system", "admin-system", "root-system"})
FIRST_ADMIN_FLAG = "first_admin_created"
MAX_FAILED_SIGN_INS = 5
"""Wrong passwords in a row before sign-in is locked for SIGN_IN_LOCK."""
SIGN_IN_LOCK = timedelta(minutes=15)


class FirstAdminAlreadyCreated(Conflict):
    """The first-run admin set-up has already happened; new accounts come from an admin."""


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    role: Role
    active: bool
    created_at: datetime
    last_login_at: datetime | None

    def actor(self) -> Actor:
        return Actor(user_id=self.id, username=self.username, role=self.role)


def _view(user: User) -> UserView:
    return UserView(
        id=user.id,
        username=user.username,
        role=user.role,
        active=user.active,
        created_at=user.created_at,
        last_login_at=user.last_login_at,
    )


def _public(user: User) -> dict[str, object]:
    """What an audit row may show about a user (never the hash)."""
    return {"username": user.username, "role": user.role.value, "active": user.active}


def normalize_username(username: str) -> str:
    """The stored form (stripped, lower-case), or InvalidInput saying what is wrong."""
    if not isinstance(username, str):
        raise InvalidInput("the username must be text", {"username": "must be text"})
    name = username.strip().lower()
    problem: str | None = None
    if not USERNAME_MIN <= len(name) <= USERNAME_MAX:
        problem = f"the username must be {USERNAME_MIN}-{USERNAME_MAX} characters long"
    elif not _USERNAME_RE.match(name):
        problem = (
            "the username may contain only letters a-z, digits, '.', '_' and '-', and must start with a letter or digit"
        )
    elif name in RESERVED_USERNAMES:
        problem = f"the username {name!r} is reserved"
    if problem is not None:
        raise InvalidInput(problem, {"username": problem})
    return name


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InvalidInput(f"unknown role {role!r}; roles are {allowed}", {"role": f"one of {allowed}"}) from None


def _get(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def _active_admins(session: Session) -> int:
    query = select(func.count()).select_from(User).where(User.role == Role.ADMIN, User.active.is_(True))
    return int(session.scalar(query) or 0)


def _username_taken(session: Session, name: str) -> bool:
    return session.scalar(select(User.id).where(User.username == name)) is not None


def _insert_user(session: Session, actor: Actor, name: str, password: str, role: Role, action: str) -> User:
    check_password_policy(password, name)
    if _username_taken(session, name):
        raise InvalidInput(f"the username {name!r} is already taken", {"username": "already taken"})
    user = User(username=name, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    try:
        session.flush()
    except exc.IntegrityError:
        # Another transaction took the name between our check and our insert.
        raise InvalidInput(f"the username {name!r} is already taken", {"username": "already taken"}) from None
    audit.record(session, actor, action, "user", str(user.id), after=_public(user))
    return user


def create_user(session: Session, actor: Actor, username: str, password: str, role: Role | str = Role.USER) -> UserView:
    require_role(actor, Role.ADMIN, action="create users")
    return _view(_insert_user(session, actor, normalize_username(username), password, _role(role), "user.create"))


def get_user(session: Session, user_id: int) -> UserView:
    return _view(_get(session, user_id))


def find_user(session: Session, username: str) -> UserView:
    """The user with this username (any spelling normalize_username accepts), or NotFound."""
    name = normalize_username(username)
    user = session.scalar(select(User).where(User.username == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return _view(user)


def list_users(session: Session, actor: Actor, *, include_inactive: bool = True) -> list[UserView]:
    require_role(actor, Role.ADMIN, Role.HERO, action="list users")
    query = select(User).order_by(User.username)
    if not include_inactive:
        query = query.where(User.active.is_(True))
    return [_view(u) for u in session.scalars(query)]


def authenticate(session: Session, username: str, password: str) -> UserView | None:
    """The user, if the username and password match an active account; else None (never says which part
    was wrong). Records the sign-in time and upgrades an outdated hash; the caller commits.

    After MAX_FAILED_SIGN_INS wrong passwords in a row, sign-in for that account raises AccountLocked for
    SIGN_IN_LOCK, so a password cannot be guessed online; the lock and its end are audited. Unknown
    usernames are not tracked (there is nothing to lock)."""
    name = username.strip().lower() if isinstance(username, str) else ""
    user = session.scalar(select(User).where(User.username == name)) if name else None
    given = password if isinstance(password, str) else ""
    if user is None:
        verify_dummy(given)
        return None
    now = utcnow()
    if user.locked_until is not None and user.locked_until > now:
        minutes = max(1, round((user.locked_until - now).total_seconds() / 60))
        raise AccountLocked(
            f"too many wrong passwords: sign-in to this account is locked for about {minutes} more "
            f"minute{'s' if minutes != 1 else ''}; an admin can reset the password to unlock it",
            user.locked_until,
        )
    ok, new_hash = verify_password(user.password_hash, given)
    if not ok:
        user.failed_sign_ins += 1
        if user.failed_sign_ins >= MAX_FAILED_SIGN_INS:
            user.locked_until = now + SIGN_IN_LOCK
            user.failed_sign_ins = 0
            audit.record(
                session, Actor.system(), "user.sign_in_locked", "user", str(user.id),
                after={"locked_until": user.locked_until.isoformat(), "after_failures": MAX_FAILED_SIGN_INS},
            )
        session.flush()
        return None
    if not user.active:
        return None
    user.last_login_at = now
    user.failed_sign_ins = 0
    user.locked_until = None
    if new_hash is not None:
        user.password_hash = new_hash
    session.flush()
    return _view(user)


def set_role(session: Session, actor: Actor, user_id: int, role: Role | str) -> UserView:
    require_role(actor, Role.ADMIN, action="change roles")
    new_role = _role(role)
    user = _get(session, user_id)
    if user.role == new_role:
        return _view(user)
    if user.role == Role.ADMIN and user.active and _active_admins(session) <= 1:
        raise InvalidInput(
            f"{user.username} is the last active admin; make someone else an admin first",
            {"role": "the last active admin cannot be demoted"},
        )
    before = _public(user)
    user.role = new_role
    session.flush()
    audit.record(session, actor, "user.set_role", "user", str(user.id), before=before, after=_public(user))
    return _view(user)


def reset_password(session: Session, actor: Actor, user_id: int, new_password: str) -> UserView:
    """An admin sets a new password for someone (who has forgotten theirs)."""
    require_role(actor, Role.ADMIN, action="reset other users' passwords")
    user = _get(session, user_id)
    check_password_policy(new_password, user.username)
    user.password_hash = hash_password(new_password)
    user.password_changed_at = utcnow()
    user.failed_sign_ins = 0
    user.locked_until = None  # the admin's reset is also how a locked account is unlocked
    session.flush()
    audit.record(session, actor, "user.reset_password", "user", str(user.id), after={"password": "reset by an admin"})
    return _view(user)


def change_own_password(session: Session, actor: Actor, current_password: str, new_password: str) -> None:
    if actor.user_id is None:
        raise PermissionDenied("the system account has no password")
    user = _get(session, actor.user_id)
    ok, _ = verify_password(user.password_hash, current_password)
    if not ok:
        raise InvalidInput("the current password is wrong", {"current_password": "wrong password"})
    check_password_policy(new_password, user.username, field="new_password")
    user.password_hash = hash_password(new_password)
    user.password_changed_at = utcnow()
    session.flush()
    audit.record(session, actor, "user.change_password", "user", str(user.id), after={"password": "changed"})


def set_active(session: Session, actor: Actor, user_id: int, active: bool) -> UserView:
    require_role(actor, Role.ADMIN, action="activate or deactivate users")
    user = _get(session, user_id)
    if user.active == active:
        return _view(user)
    if not active and user.role == Role.ADMIN and _active_admins(session) <= 1:
        raise InvalidInput(
            f"{user.username} is the last active admin and cannot be deactivated",
            {"active": "the last active admin cannot be deactivated"},
        )
    before = _public(user)
    user.active = active
    session.flush()
    action = "user.activate" if active else "user.deactivate"
    audit.record(session, actor, action, "user", str(user.id), before=before, after=_public(user))
    return _view(user)


def deactivate(session: Session, actor: Actor, user_id: int) -> UserView:
    return set_active(session, actor, user_id, False)


def needs_first_admin(session: Session) -> bool:
    """True on a fresh installation: no account exists yet, so the console offers the first-admin form."""
    return session.scalar(select(User.id).limit(1)) is None


def create_first_admin(factory: sessionmaker[Session], username: str, password: str) -> UserView:
    """Create the first ADMIN, only while no user exists. Safe under races between processes: the first
    transaction to claim the one-time flag (a primary key) wins; the others get FirstAdminAlreadyCreated."""
    name = normalize_username(username)
    check_password_policy(password, name)
    refusal = FirstAdminAlreadyCreated("the first admin already exists; ask an admin for an account")
    try:
        with transaction(factory) as session:
            # Claim first (a write): concurrent claimants wait on the key's lock, then fail on it.
            session.add(SystemFlag(key=FIRST_ADMIN_FLAG, value=name))
            session.flush()
            if not needs_first_admin(session):
                raise refusal
            user = _insert_user(session, Actor.system(), name, password, Role.ADMIN, "user.create_first_admin")
            view = _view(user)
    except exc.IntegrityError:
        raise refusal from None
    return view
