"""An admin unlocks a locked sign-in without resetting the password (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked, PermissionDenied
from core import users
from core.security import Role
from db.engine import transaction
from db.models import AuditLog
from tests.dbfixtures import *  # noqa: F403

PASSWORD = "correct horse battery"


def test_admin_unlocks_a_locked_account(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> None:
    admin = users.create_first_admin(db_session_factory, "alice", PASSWORD).actor()
    with transaction(db_session_factory) as session:
        bob = users.create_user(session, admin, "bob", PASSWORD, Role.USER)
    for _ in range(users.MAX_FAILED_SIGN_INS):
        assert users.authenticate(db_session_factory, "bob", "wrong password") is None
    with pytest.raises(AccountLocked):
        users.authenticate(db_session_factory, "bob", PASSWORD)
    with db_session_factory() as session:
        assert users.get_user(session, bob.id).locked_until is not None
    with pytest.raises(PermissionDenied), transaction(db_session_factory) as session:
        users.unlock(session, bob.actor(), bob.id)
    with transaction(db_session_factory) as session:
        assert users.unlock(session, admin, bob.id).locked_until is None
    signed_in = users.authenticate(db_session_factory, "bob", PASSWORD)
    assert signed_in is not None and signed_in.username == "bob"
    with db_session_factory() as session:
        assert "user.unlock" in session.scalars(select(AuditLog.action)).all()
