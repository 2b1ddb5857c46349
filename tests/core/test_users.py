"""Users, roles and the first admin, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked, InvalidInput, NotFound, PermissionDenied
from core import audit, security, users
from core.security import Actor, Role
from db.engine import transaction
from db.models import AuditLog, SystemFlag, User, utcnow
from tests.dbfixtures import *  # noqa: F403

PASSWORD = "correct horse battery"


@pytest.fixture
def admin(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> Actor:
    return users.create_first_admin(db_session_factory, "alice", PASSWORD).actor()


def _audit_rows(factory: sessionmaker[Session]) -> list[AuditLog]:
    with factory() as session:
        return list(session.scalars(select(AuditLog).order_by(AuditLog.id)))


def test_passwords_are_stored_as_argon2id_hashes(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    with transaction(db_session_factory) as session:
        users.create_user(session, admin, "Bob", "another long secret", Role.HERO)
    with db_session_factory() as session:
        stored = session.scalars(select(User.password_hash).where(User.username == "bob")).one()
    assert stored.startswith("$argon2id$")
    assert "another long secret" not in stored
    signed_in = users.authenticate(db_session_factory, "  BOB ", "another long secret")
    assert signed_in is not None and signed_in.role is Role.HERO and signed_in.last_login_at is not None


def test_authenticate_refuses_wrong_password_unknown_user_and_inactive_account(
    db_session_factory: sessionmaker[Session], admin: Actor
) -> None:
    with transaction(db_session_factory) as session:
        carol = users.create_user(session, admin, "carol", "carols password")
    assert users.authenticate(db_session_factory, "carol", "wrong password!") is None
    assert users.authenticate(db_session_factory, "nobody", "carols password") is None
    with transaction(db_session_factory) as session:
        users.deactivate(session, admin, carol.id)
    assert users.authenticate(db_session_factory, "carol", "carols password") is None


def test_too_many_wrong_passwords_lock_sign_in_until_it_expires_or_an_admin_resets(
    db_session_factory: sessionmaker[Session], admin: Actor
) -> None:
    with transaction(db_session_factory) as session:
        dan = users.create_user(session, admin, "dan", "dans password!")
    for _ in range(users.MAX_FAILED_SIGN_INS - 1):
        assert users.authenticate(db_session_factory, "dan", "a wrong guess") is None
    # A success before the limit starts the count again.
    assert users.authenticate(db_session_factory, "dan", "dans password!") is not None
    for _ in range(users.MAX_FAILED_SIGN_INS):
        assert users.authenticate(db_session_factory, "dan", "a wrong guess") is None
    # Locked: even the right password is refused, and the reason is given.
    with pytest.raises(AccountLocked, match="locked for about 15 more minutes") as locked:
        users.authenticate(db_session_factory, "dan", "dans password!")
    assert locked.value.until > utcnow()
    assert [r.action for r in _audit_rows(db_session_factory)].count("user.sign_in_locked") == 1

    # The lock ends by itself...
    with transaction(db_session_factory) as session:
        row = session.get(User, dan.id)
        assert row is not None
        row.locked_until = utcnow() - users.SIGN_IN_LOCK / 15
    assert users.authenticate(db_session_factory, "dan", "dans password!") is not None

    # ...or when an admin resets the password.
    for _ in range(users.MAX_FAILED_SIGN_INS):
        users.authenticate(db_session_factory, "dan", "a wrong guess")
    with transaction(db_session_factory) as session:
        users.reset_password(session, admin, dan.id, "a brand new password")
    assert users.authenticate(db_session_factory, "dan", "a brand new password") is not None


def test_outdated_hash_is_upgraded_at_sign_in(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    with db_session_factory() as session:
        old_hash = session.scalars(select(User.password_hash).where(User.username == "alice")).one()
    stronger = PasswordHasher.from_parameters(CHEAPEST)
    stronger = PasswordHasher(
        time_cost=stronger.time_cost + 1, memory_cost=stronger.memory_cost, parallelism=stronger.parallelism
    )
    previous = security.set_password_hasher(stronger)
    try:
        assert users.authenticate(db_session_factory, "alice", PASSWORD) is not None
    finally:
        security.set_password_hasher(previous)
    with db_session_factory() as session:
        new_hash = session.scalars(select(User.password_hash).where(User.username == "alice")).one()
    assert new_hash != old_hash and f"t={stronger.time_cost}" in new_hash


@pytest.mark.parametrize(
    ("username", "problem"),
    [
        ("ab", "3-32 characters"),
        ("x" * 33, "3-32 characters"),
        ("bad name", "may contain only"),
        ("-dash", "must start"),
        ("émile", "may contain only"),
        ("system", "reserved"),
    ],
)
def test_username_rules(db_session_factory: sessionmaker[Session], admin: Actor, username: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem) as caught, transaction(db_session_factory) as session:
        users.create_user(session, admin, username, "a long password")
    assert "username" in caught.value.field_errors


def test_password_policy_and_unique_usernames(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    with pytest.raises(InvalidInput, match="at least 10") as caught, transaction(db_session_factory) as session:
        users.create_user(session, admin, "dave", "short")
    assert caught.value.field_errors == {"password": "the password must be at least 10 characters long"}
    with pytest.raises(InvalidInput, match="same as the username"), transaction(db_session_factory) as session:
        users.create_user(session, admin, "davidson99", "DavidSon99")
    with transaction(db_session_factory) as session:
        users.create_user(session, admin, "dave", "a long password")
    with pytest.raises(InvalidInput, match="already taken"), transaction(db_session_factory) as session:
        users.create_user(session, admin, "DAVE", "a long password")
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 2


def test_only_admins_manage_users(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    with transaction(db_session_factory) as session:
        hero = users.create_user(session, admin, "hera", "heroic password", Role.HERO).actor()
        plain = users.create_user(session, admin, "uma", "plain password", Role.USER).actor()
    for actor in (hero, plain):
        with pytest.raises(PermissionDenied, match="needs the ADMIN role"), transaction(db_session_factory) as s:
            users.create_user(s, actor, "eve", "evil password")
        with pytest.raises(PermissionDenied), transaction(db_session_factory) as s:
            users.set_role(s, actor, actor.user_id or 0, Role.ADMIN)  # no self-promotion
        with pytest.raises(PermissionDenied), transaction(db_session_factory) as s:
            users.reset_password(s, actor, admin.user_id or 0, "taken over!!")
    with db_session_factory() as session:
        assert len(users.list_users(session, hero)) == 3
        with pytest.raises(PermissionDenied):
            users.list_users(session, plain)


def test_every_change_is_audited_without_secrets(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    with transaction(db_session_factory) as session:
        bob = users.create_user(session, admin, "bob", "bobs password")
        users.set_role(session, admin, bob.id, Role.HERO)
        users.reset_password(session, admin, bob.id, "bobs new password")
        users.deactivate(session, admin, bob.id)
    with transaction(db_session_factory) as session:
        users.change_own_password(session, admin, PASSWORD, "alices new password")
        entries = audit.list_entries(session, admin, target_type="user", target_id=str(bob.id))
    actions = [e.action for e in reversed(entries)]
    assert actions == ["user.create", "user.set_role", "user.reset_password", "user.deactivate"]
    role_change = next(e for e in entries if e.action == "user.set_role")
    assert role_change.changed_fields() == {"role": ("USER", "HERO")}
    assert all(e.actor_name == "alice" for e in entries)
    rows = _audit_rows(db_session_factory)
    assert rows[-1].action == "user.change_password"
    dumped = repr([(r.before, r.after) for r in rows])
    assert "$argon2" not in dumped and "password!" not in dumped and "bobs new password" not in dumped


def test_failed_change_leaves_no_audit_row(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    before = len(_audit_rows(db_session_factory))
    with pytest.raises(InvalidInput), transaction(db_session_factory) as session:
        users.create_user(session, admin, "frank", "short")
    with pytest.raises(NotFound), transaction(db_session_factory) as session:
        users.set_role(session, admin, 999, Role.HERO)
    assert len(_audit_rows(db_session_factory)) == before


def test_last_admin_cannot_be_demoted_or_deactivated(db_session_factory: sessionmaker[Session], admin: Actor) -> None:
    assert admin.user_id is not None
    with pytest.raises(InvalidInput, match="last active admin"), transaction(db_session_factory) as session:
        users.set_role(session, admin, admin.user_id, Role.USER)
    with pytest.raises(InvalidInput, match="last active admin"), transaction(db_session_factory) as session:
        users.deactivate(session, admin, admin.user_id)
    with transaction(db_session_factory) as session:
        second = users.create_user(session, admin, "second", "second admin pw", Role.ADMIN)
        users.set_role(session, admin, admin.user_id, Role.USER)
        assert users.get_user(session, second.id).role is Role.ADMIN


def test_first_admin_only_once(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> None:
    with db_session_factory() as session:
        assert users.needs_first_admin(session)
    first = users.create_first_admin(db_session_factory, "Root.Admin", PASSWORD)
    assert (first.username, first.role) == ("root.admin", Role.ADMIN)
    with db_session_factory() as session:
        assert not users.needs_first_admin(session)
    with pytest.raises(users.FirstAdminAlreadyCreated):
        users.create_first_admin(db_session_factory, "mallory", "mallorys password")
    with db_session_factory() as session:
        assert session.scalars(select(User.username)).all() == ["root.admin"]
        [row] = session.scalars(select(AuditLog)).all()
        assert (row.action, row.actor_name, row.after) == (
            "user.create_first_admin",
            "system",
            {"username": "root.admin", "role": "ADMIN", "active": True},
        )


def test_first_admin_refused_once_any_user_exists(
    db_session_factory: sessionmaker[Session], fast_password_hashing: None
) -> None:
    """Even without the flag (a database from before it existed), an existing user blocks the set-up."""
    with transaction(db_session_factory) as session:
        session.add(User(username="old", password_hash="x", role=Role.ADMIN))
    with pytest.raises(users.FirstAdminAlreadyCreated):
        users.create_first_admin(db_session_factory, "newcomer", PASSWORD)
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(SystemFlag)) == 0


def test_first_admin_race_between_two_sessions(
    db_session_factory: sessionmaker[Session], fast_password_hashing: None
) -> None:
    barrier = threading.Barrier(2, timeout=10)
    outcomes: dict[str, str] = {}

    def claim(name: str) -> None:
        barrier.wait()
        try:
            users.create_first_admin(db_session_factory, name, PASSWORD)
            outcomes[name] = "created"
        except users.FirstAdminAlreadyCreated:
            outcomes[name] = "refused"

    threads = [threading.Thread(target=claim, args=(n,)) for n in ("racer-one", "racer-two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes.values()) == ["created", "refused"]
    with db_session_factory() as session:
        assert session.scalars(select(User.username)).all() == [k for k, v in outcomes.items() if v == "created"]
        assert session.scalar(select(func.count()).select_from(AuditLog)) == 1
