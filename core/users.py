"""Local user accounts: creation, sign-in, roles, passwords, deactivation, and the first admin.

Who may do what (decided here, enforced here, from the database: see core.authz):
- ADMIN manages users: create, change roles, reset passwords, deactivate and reactivate.
- HERO and ADMIN may list users (the audit and usage pages filter by user); HERO cannot change them.
- Anyone signed in with an active account may change their own password, with their current one.
- The last active ADMIN cannot be demoted or deactivated: the installation would have nobody to manage it.
Every change writes an audit row in the same transaction; hashes never appear in audit rows or views.
Users are never deleted, so history (audit, usage) always resolves to a person.

Concurrency (any number of processes, both databases):
- User management is serialised: every change first takes `_lock_accounts` (PostgreSQL: the rows of the
  active admins, the target and the actor, in id order, FOR NO KEY UPDATE; SQLite: the write lock), then
  authorizes, then reads, counts and writes. So two demotions of the last two admins queue, and the second
  counts what the first left; and since all take the same locks in the same order, they never deadlock.
- Sign-in throttling: a guess is reserved by one atomic UPDATE before its password is checked: it counts the
  guess and, at the MAX_FAILED_SIGN_INS-th in a row, sets the lock in the same statement, and refuses while
  locked. So at most MAX_FAILED_SIGN_INS passwords are verified per lock window however many guesses run in
  parallel; a right password clears the count. Password checks run outside any transaction (they are slow).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, exc, func, literal, null, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked, Conflict, InvalidInput, NotFound, PermissionDenied
from core import audit
from core.authz import AuthorizedActor, authorize, begin_write
from core.security import (
    Actor,
    Role,
    check_password_policy,
    hash_password,
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
    email: str | None = None
    """What an OIDC sign-in is matched by (core.oidc); set by an admin."""
    oidc_linked: bool = False
    locked_until: datetime | None = None
    """Sign-in locked until then (too many wrong passwords), if that is still in the future."""

    def actor(self) -> Actor:
        """This user as the actor of a core call (core checks the account again at every call)."""
        return Actor(user_id=self.id, username=self.username, role=self.role)


def _view(user: User) -> UserView:
    return UserView(
        id=user.id,
        username=user.username,
        role=user.role,
        active=user.active,
        created_at=user.created_at,
        last_login_at=user.last_login_at,
        email=user.email,
        oidc_linked=user.oidc_subject is not None,
        locked_until=user.locked_until if user.locked_until and user.locked_until > utcnow() else None,
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
    """The user as stored now (never a copy the session loaded earlier, before it took its locks)."""
    user = session.get(User, user_id, populate_existing=True)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def _active_admins(session: Session) -> int:
    query = select(func.count()).select_from(User).where(User.role == Role.ADMIN, User.active.is_(True))
    return int(session.scalar(query) or 0)


def _lock_accounts(session: Session, *user_ids: int | None) -> None:
    """Serialise user management before anything is read: PostgreSQL locks the active admins' rows and those of
    `user_ids` (actor, target) in id order; SQLite takes its write lock. Afterwards no concurrent change can
    shrink the set of active admins or change these accounts until this transaction ends."""
    begin_write(session)
    if session.connection().dialect.name != "postgresql":
        return
    accounts = and_(User.role == Role.ADMIN, User.active.is_(True))
    ids = [i for i in user_ids if isinstance(i, int) and not isinstance(i, bool)]
    if ids:
        accounts = or_(accounts, User.id.in_(ids))
    # NO KEY UPDATE: conflicts with the FOR SHARE of authorize and with updates, not with inserts that only
    # reference these rows (audit rows, versions).
    session.scalars(select(User.id).where(accounts).order_by(User.id).with_for_update(key_share=True)).all()


def _username_taken(session: Session, name: str) -> bool:
    return session.scalar(select(User.id).where(User.username == name)) is not None


def _insert_user(
    session: Session, who: AuthorizedActor, name: str, password_hash: str, role: Role, action: str
) -> User:
    if _username_taken(session, name):
        raise InvalidInput(f"the username {name!r} is already taken", {"username": "already taken"})
    user = User(username=name, password_hash=password_hash, role=role, active=True)
    session.add(user)
    try:
        session.flush()
    except exc.IntegrityError:
        # Another transaction took the name between our check and our insert.
        raise InvalidInput(f"the username {name!r} is already taken", {"username": "already taken"}) from None
    audit.record(session, who, action, "user", str(user.id), after=_public(user))
    return user


def create_user(session: Session, actor: Actor, username: str, password: str, role: Role | str = Role.USER) -> UserView:
    action = "create users"
    authorize(session, actor, Role.ADMIN, action=action, lock=False)  # refuse before spending a hash
    name, new_role = normalize_username(username), _role(role)
    check_password_policy(password, name)
    password_hash = hash_password(password)  # slow: before the locks, not while holding them
    _lock_accounts(session, actor.user_id)
    who = authorize(session, actor, Role.ADMIN, action=action)
    return _view(_insert_user(session, who, name, password_hash, new_role, "user.create"))


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
    authorize(session, actor, Role.ADMIN, Role.HERO, action="list users", lock=False)
    query = select(User).order_by(User.username)
    if not include_inactive:
        query = query.where(User.active.is_(True))
    return [_view(u) for u in session.scalars(query)]


# --- sign-in ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Guess:
    """A sign-in attempt whose right to have its password checked was reserved (and counted) in the database."""

    user_id: int
    password_hash: str
    locked_until: datetime | None
    """Set when this guess was the MAX_FAILED_SIGN_INS-th in a row: it locked sign-in until then (unless its
    password turns out right, which clears the lock)."""


def _locked(until: datetime) -> AccountLocked:
    minutes = max(1, round((until - utcnow()).total_seconds() / 60))
    return AccountLocked(
        f"too many wrong passwords: sign-in to this account is locked for about {minutes} more "
        f"minute{'s' if minutes != 1 else ''}; an admin can reset the password to unlock it",
        until,
    )


def _reserve_guess(session: Session, name: str) -> _Guess | None:
    """Count one guess for `name` and let it be checked, in one atomic statement; None for an unknown user.

    The UPDATE refuses while the account is locked; it adds one to the count, and the guess that reaches the
    limit sets the lock (and restarts the count for the next window) in the same statement, so parallel
    guesses can neither lose a count nor slip past the limit."""
    user_id = session.scalar(select(User.id).where(User.username == name))
    if user_id is None:
        return None
    now = utcnow()
    reaches_limit = User.failed_sign_ins + 1 >= MAX_FAILED_SIGN_INS
    lock_end = literal(now + SIGN_IN_LOCK, User.locked_until.type)
    reserve = (
        update(User)
        .where(User.id == user_id, or_(User.locked_until.is_(None), User.locked_until <= now))
        .values(
            failed_sign_ins=case((reaches_limit, 0), else_=User.failed_sign_ins + 1),
            locked_until=case((reaches_limit, lock_end), else_=null()),
        )
        .returning(User.password_hash, User.locked_until)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(reserve).one_or_none()
    if row is None:
        until = session.scalar(select(User.locked_until).where(User.id == user_id))
        raise _locked(until if until is not None else now + timedelta(minutes=1))
    return _Guess(user_id, row.password_hash, row.locked_until)


def _record_sign_in(session: Session, guess: _Guess, new_hash: str | None) -> UserView | None:
    """Clear the count and the lock, note the time, upgrade the hash: only if the account is still active and its
    password is still the one just checked (an admin may have reset it meanwhile)."""
    values: dict[str, object] = {"last_login_at": utcnow(), "failed_sign_ins": 0, "locked_until": None}
    if new_hash is not None:
        values["password_hash"] = new_hash
    signed_in = session.execute(
        update(User)
        .where(User.id == guess.user_id, User.password_hash == guess.password_hash, User.active.is_(True))
        .values(values)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return None if signed_in is None else _view(_get(session, guess.user_id))


def authenticate(sessions: sessionmaker[Session], username: str, password: str) -> UserView | None:
    """The user, if the username and password match an active account; else None (never says which part
    was wrong). Records the sign-in time and upgrades an outdated hash.

    Runs its own short transactions: the guess is counted and committed before its password is checked (so
    no rollback or crash afterwards can un-count it), the check itself holds no lock, and the outcome is
    committed after. After MAX_FAILED_SIGN_INS wrong passwords in a row, sign-in for that account raises
    AccountLocked for SIGN_IN_LOCK, so a password cannot be guessed online; the lock is audited. Unknown
    usernames are not tracked (there is nothing to lock) but take as long as a wrong password."""
    name = username.strip().lower() if isinstance(username, str) else ""
    given = password if isinstance(password, str) else ""
    guess: _Guess | None = None
    if name:
        with transaction(sessions) as session:
            guess = _reserve_guess(session, name)
    if guess is None:
        verify_dummy(given)
        return None
    ok, new_hash = verify_password(guess.password_hash, given)
    with transaction(sessions) as session:
        if ok:
            return _record_sign_in(session, guess, new_hash)
        if guess.locked_until is not None:
            audit.record(
                session,
                authorize(session, Actor.system(), Role.ADMIN, action="record a sign-in lock", lock=False),
                "user.sign_in_locked",
                "user",
                str(guess.user_id),
                after={"locked_until": guess.locked_until.isoformat(), "after_failures": MAX_FAILED_SIGN_INS},
            )
    return None


# --- user management -------------------------------------------------------------------------------------------


def set_role(session: Session, actor: Actor, user_id: int, role: Role | str) -> UserView:
    new_role = _role(role)
    _lock_accounts(session, actor.user_id, user_id)
    who = authorize(session, actor, Role.ADMIN, action="change roles")
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
    audit.record(session, who, "user.set_role", "user", str(user.id), before=before, after=_public(user))
    return _view(user)


def reset_password(session: Session, actor: Actor, user_id: int, new_password: str) -> UserView:
    """An admin sets a new password for someone (who has forgotten theirs)."""
    action = "reset other users' passwords"
    authorize(session, actor, Role.ADMIN, action=action, lock=False)  # refuse before spending a hash
    check_password_policy(new_password, _get(session, user_id).username)  # usernames never change
    password_hash = hash_password(new_password)
    _lock_accounts(session, actor.user_id, user_id)
    who = authorize(session, actor, Role.ADMIN, action=action)
    user = _get(session, user_id)
    user.password_hash = password_hash
    user.password_changed_at = utcnow()
    user.failed_sign_ins = 0
    user.locked_until = None  # the admin's reset is also how a locked account is unlocked
    session.flush()
    audit.record(session, who, "user.reset_password", "user", str(user.id), after={"password": "reset by an admin"})
    return _view(user)


def change_own_password(session: Session, actor: Actor, current_password: str, new_password: str) -> None:
    """Change the acting user's own password (an active account, any role), given the current one."""
    action = "change their password"
    checked = authorize(session, actor, *Role, action=action, lock=False)
    if checked.user_id is None:
        raise PermissionDenied("the system account has no password")
    user = _get(session, checked.user_id)
    verified_hash = user.password_hash
    ok, _ = verify_password(verified_hash, current_password)  # slow: before the lock, not while holding it
    if not ok:
        raise InvalidInput("the current password is wrong", {"current_password": "wrong password"})
    check_password_policy(new_password, user.username, field="new_password")
    password_hash = hash_password(new_password)
    _lock_own_account(session, checked.user_id)
    who = authorize(session, actor, *Role, action=action)
    user = _get(session, checked.user_id)
    if user.password_hash != verified_hash:
        raise Conflict("your password was changed at the same moment; sign in again with the new one")
    user.password_hash = password_hash
    user.password_changed_at = utcnow()
    session.flush()
    audit.record(session, who, "user.change_password", "user", str(user.id), after={"password": "changed"})


def _lock_own_account(session: Session, user_id: int) -> None:
    """Only the actor's own row: PostgreSQL FOR NO KEY UPDATE (before authorize's FOR SHARE, so two changes of
    one account queue instead of both holding a share lock and deadlocking on the update); SQLite its write lock."""
    begin_write(session)
    session.scalars(select(User.id).where(User.id == user_id).with_for_update(key_share=True)).all()


def unlock(session: Session, actor: Actor, user_id: int) -> UserView:
    """An admin ends a sign-in lock (and the count of wrong passwords) without changing the password."""
    _lock_accounts(session, actor.user_id, user_id)
    who = authorize(session, actor, Role.ADMIN, action="unlock sign-in")
    user = _get(session, user_id)
    if user.locked_until is None and user.failed_sign_ins == 0:
        return _view(user)
    before = {"locked_until": user.locked_until.isoformat() if user.locked_until else None}
    user.failed_sign_ins = 0
    user.locked_until = None
    session.flush()
    audit.record(session, who, "user.unlock", "user", str(user.id), before=before, after={"locked_until": None})
    return _view(user)


def set_active(session: Session, actor: Actor, user_id: int, active: bool) -> UserView:
    _lock_accounts(session, actor.user_id, user_id)
    who = authorize(session, actor, Role.ADMIN, action="activate or deactivate users")
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
    audit.record(session, who, action, "user", str(user.id), before=before, after=_public(user))
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
    password_hash = hash_password(password)
    refusal = FirstAdminAlreadyCreated("the first admin already exists; ask an admin for an account")
    try:
        with transaction(factory) as session:
            # Claim first (a write): concurrent claimants wait on the key's lock, then fail on it.
            session.add(SystemFlag(key=FIRST_ADMIN_FLAG, value=name))
            session.flush()
            if not needs_first_admin(session):
                raise refusal
            who = authorize(session, Actor.system(), Role.ADMIN, action="create the first admin")
            user = _insert_user(session, who, name, password_hash, Role.ADMIN, "user.create_first_admin")
            view = _view(user)
    except exc.IntegrityError:
        raise refusal from None
    return view
