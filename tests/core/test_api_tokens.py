"""API tokens on SQLite and PostgreSQL: shown once, stored hashed, revoked at once, expiring, role-capped."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, NotFound, PermissionDenied
from core import api_tokens, users
from core.api_tokens import TokenRefused
from core.security import Actor, Role
from db.engine import transaction
from db.models import ApiToken, AuditLog, utcnow
from tests.dbfixtures import *  # noqa: F403
from tests.dbfixtures import recorded_statements

PASSWORD = "correct horse battery"


@pytest.fixture
def people(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> dict[str, Actor]:
    admin = users.create_first_admin(db_session_factory, "alice", PASSWORD).actor()
    out = {"alice": admin}
    with transaction(db_session_factory) as session:
        for name, role in (("hero", Role.HERO), ("bob", Role.USER), ("carol", Role.USER)):
            out[name] = users.create_user(session, admin, name, PASSWORD, role).actor()
    return out


def _create(factory: sessionmaker[Session], actor: Actor, owner: Actor, **kwargs: object) -> api_tokens.CreatedToken:
    with transaction(factory) as session:
        return api_tokens.create_token(session, actor, owner.user_id or 0, "test token", **kwargs)  # type: ignore[arg-type]


def _auth(factory: sessionmaker[Session], raw: str, **kwargs: object) -> Actor:
    with transaction(factory) as session:
        return api_tokens.authenticate_token(session, raw, **kwargs)  # type: ignore[arg-type]


def test_the_secret_is_shown_once_and_stored_as_its_sha256(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    created = _create(db_session_factory, people["bob"], people["bob"])
    assert created.secret.startswith("igt_") and len(created.secret) == 47
    assert created.token.prefix == created.secret[:12]
    with db_session_factory() as session:
        row = session.scalars(select(ApiToken)).one()
        audit_rows = session.scalars(select(AuditLog).where(AuditLog.target_type == "api_token")).all()
    assert row.token_hash == hashlib.sha256(created.secret.encode()).hexdigest()
    assert created.secret not in repr(vars(row))
    # The audit row names the token, never its secret or hash.
    assert [a.action for a in audit_rows] == ["api_token.create"]
    assert created.secret not in str(audit_rows[0].after) and row.token_hash not in str(audit_rows[0].after)
    # Listing never shows the secret again.
    with db_session_factory() as session:
        listed = api_tokens.list_tokens(session, people["bob"])
    assert [t.id for t in listed] == [created.token.id]
    assert not hasattr(listed[0], "secret")


def test_authenticate_gives_the_user_and_notes_the_use(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    created = _create(db_session_factory, people["bob"], people["bob"])
    actor = _auth(db_session_factory, created.secret)
    assert (actor.user_id, actor.username, actor.role) == (people["bob"].user_id, "bob", Role.USER)
    assert not actor.is_system
    with db_session_factory() as session:
        first_use = session.scalars(select(ApiToken.last_used_at)).one()
    assert first_use is not None
    # Within a minute the use is not written again; later it is.
    _auth(db_session_factory, created.secret, now=first_use + timedelta(seconds=30))
    with db_session_factory() as session:
        assert session.scalars(select(ApiToken.last_used_at)).one() == first_use
    later = first_use + timedelta(minutes=5)
    _auth(db_session_factory, created.secret, now=later)
    with db_session_factory() as session:
        assert session.scalars(select(ApiToken.last_used_at)).one() == later


def test_a_use_within_the_minute_is_one_read_and_no_write(
    db_engine: Engine, db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    """Every API request authenticates: when the use was noted less than a minute ago, not even a guarded UPDATE
    that would change nothing is sent."""
    created = _create(db_session_factory, people["bob"], people["bob"])
    _auth(db_session_factory, created.secret)  # notes the first use
    with recorded_statements(db_engine) as seen:
        _auth(db_session_factory, created.secret)
        _auth(db_session_factory, created.secret, now=utcnow() + timedelta(minutes=2))
    sent = [statement.split()[0].upper() for statement in seen if "api_tokens" in statement]
    assert sent == ["SELECT", "SELECT", "UPDATE"]


def test_revocation_takes_effect_at_once(db_session_factory: sessionmaker[Session], people: dict[str, Actor]) -> None:
    created = _create(db_session_factory, people["bob"], people["bob"])
    assert _auth(db_session_factory, created.secret).username == "bob"
    with transaction(db_session_factory) as session:
        revoked = api_tokens.revoke_token(session, people["bob"], created.token.id)
    assert revoked.status() == "revoked"
    with pytest.raises(TokenRefused, match="revoked"):
        _auth(db_session_factory, created.secret)
    # Revoking again changes nothing and writes no second audit row.
    with transaction(db_session_factory) as session:
        api_tokens.revoke_token(session, people["alice"], created.token.id)
    with db_session_factory() as session:
        actions = session.scalars(select(AuditLog.action).where(AuditLog.target_type == "api_token")).all()
    assert sorted(actions) == ["api_token.create", "api_token.revoke"]


def test_expiry(db_session_factory: sessionmaker[Session], people: dict[str, Actor]) -> None:
    created = _create(db_session_factory, people["bob"], people["bob"], expires_in_days=1)
    expires = created.token.expires_at
    assert expires is not None
    assert _auth(db_session_factory, created.secret, now=expires - timedelta(seconds=1)).username == "bob"
    with pytest.raises(TokenRefused, match="expired"):
        _auth(db_session_factory, created.secret, now=expires)
    forever = _create(db_session_factory, people["bob"], people["bob"], expires_in_days=None)
    assert forever.token.expires_at is None
    assert _auth(db_session_factory, forever.secret, now=utcnow() + timedelta(days=3650)).username == "bob"
    for bad in (0, 367, True):
        with pytest.raises(InvalidInput, match="lifetime"):
            _create(db_session_factory, people["bob"], people["bob"], expires_in_days=bad)


def test_the_role_is_capped_by_the_users_current_role(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    admin, hero = people["alice"], people["hero"]
    # An ADMIN may make a lesser token for themselves.
    as_hero = _create(db_session_factory, admin, admin, role=Role.HERO)
    assert _auth(db_session_factory, as_hero.secret).role is Role.HERO
    # Nobody gets a token above the user's role, not even from an admin.
    with pytest.raises(InvalidInput, match="above"):
        _create(db_session_factory, admin, people["bob"], role=Role.ADMIN)
    with pytest.raises(InvalidInput, match="above"):
        _create(db_session_factory, hero, hero, role="ADMIN")
    hero_default = _create(db_session_factory, hero, hero)
    hero_token = _create(db_session_factory, hero, hero, role=Role.HERO)
    assert _auth(db_session_factory, hero_default.secret).role is Role.HERO
    # Demoting the user lowers every token they hold, at once.
    with transaction(db_session_factory) as session:
        users.set_role(session, admin, hero.user_id or 0, Role.USER)
    assert _auth(db_session_factory, hero_default.secret).role is Role.USER
    assert _auth(db_session_factory, hero_token.secret).role is Role.USER
    with db_session_factory() as session:
        views = {t.id: t for t in api_tokens.list_tokens(session, admin, hero.user_id)}
    assert views[hero_token.token.id].role is Role.HERO
    assert views[hero_token.token.id].effective_role is Role.USER


def test_a_deactivated_users_token_is_refused(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    created = _create(db_session_factory, people["bob"], people["bob"])
    with transaction(db_session_factory) as session:
        users.deactivate(session, people["alice"], people["bob"].user_id or 0)
    with pytest.raises(TokenRefused, match="deactivated"):
        _auth(db_session_factory, created.secret)
    with db_session_factory() as session:
        (view,) = api_tokens.list_tokens(session, people["alice"], people["bob"].user_id)
    assert view.status() == "user deactivated"
    with pytest.raises(InvalidInput, match="deactivated"):
        _create(db_session_factory, people["alice"], people["bob"])
    # ... and the deactivated user can no longer manage their tokens either.
    with pytest.raises(PermissionDenied), transaction(db_session_factory) as session:
        api_tokens.revoke_token(session, people["bob"], created.token.id)


def test_unknown_and_malformed_tokens(db_session_factory: sessionmaker[Session], people: dict[str, Actor]) -> None:
    for raw in ("", "Bearer x", "igt_short", "igt_" + "!" * 43, "x" * 5000):
        with pytest.raises(TokenRefused, match="not an Imagegate API token"):
            _auth(db_session_factory, raw)
    with pytest.raises(TokenRefused, match="unknown"):
        _auth(db_session_factory, "igt_" + "A" * 43)


def test_who_may_manage_whose_tokens(db_session_factory: sessionmaker[Session], people: dict[str, Actor]) -> None:
    admin, bob, carol, hero = people["alice"], people["bob"], people["carol"], people["hero"]
    bobs = _create(db_session_factory, bob, bob)
    by_admin = _create(db_session_factory, admin, carol)  # an admin makes one for someone else
    assert by_admin.token.username == "carol"
    with pytest.raises(PermissionDenied, match="ADMIN"):
        _create(db_session_factory, carol, bob)
    with pytest.raises(PermissionDenied, match="ADMIN"):
        _create(db_session_factory, hero, bob)  # HERO is not an admin for tokens either
    with db_session_factory() as session:
        assert [t.username for t in api_tokens.list_tokens(session, carol)] == ["carol"]
        assert {t.username for t in api_tokens.list_tokens(session, admin)} == {"bob", "carol"}
        with pytest.raises(PermissionDenied):
            api_tokens.list_tokens(session, carol, bob.user_id)
    with pytest.raises(PermissionDenied), transaction(db_session_factory) as session:
        api_tokens.revoke_token(session, carol, bobs.token.id)
    with transaction(db_session_factory) as session:
        assert api_tokens.revoke_token(session, admin, bobs.token.id).status() == "revoked"
    with pytest.raises(NotFound), transaction(db_session_factory) as session:
        api_tokens.revoke_token(session, admin, 999_999)
    with pytest.raises(InvalidInput, match="name"), transaction(db_session_factory) as session:
        api_tokens.create_token(session, bob, bob.user_id or 0, "  ")
    with pytest.raises(InvalidInput, match="rate limit"):
        _create(db_session_factory, bob, bob, rate_limit_per_minute=0)
    limited = _create(db_session_factory, bob, bob, rate_limit_per_minute=30)
    assert limited.token.rate_limit_per_minute == 30
