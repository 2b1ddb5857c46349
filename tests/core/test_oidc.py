"""OIDC identities mapped to accounts, on SQLite and PostgreSQL: subject first, then the admin-set email (linked
once), unknown identities refused with a clear message."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, PermissionDenied
from core import oidc, users
from core.oidc import OidcIdentity, OidcRefused
from core.security import Actor, Role
from db.engine import transaction
from db.models import AuditLog, User
from tests.dbfixtures import *  # noqa: F403

PASSWORD = "correct horse battery"
ISSUER = "https://login.example.com"


@pytest.fixture
def people(db_session_factory: sessionmaker[Session], fast_password_hashing: None) -> dict[str, Actor]:
    admin = users.create_first_admin(db_session_factory, "alice", PASSWORD).actor()
    out = {"alice": admin}
    with transaction(db_session_factory) as session:
        for name, role in (("hero", Role.HERO), ("bob", Role.USER)):
            out[name] = users.create_user(session, admin, name, PASSWORD, role).actor()
    return out


def _set_email(factory: sessionmaker[Session], actor: Actor, who: Actor, email: str | None) -> users.UserView:
    with transaction(factory) as session:
        return oidc.set_email(session, actor, who.user_id or 0, email)


def _sign_in(factory: sessionmaker[Session], identity: OidcIdentity) -> users.UserView:
    with transaction(factory) as session:
        return oidc.sign_in_oidc(session, identity)


def _identity(sub: str, email: str | None, verified: bool | None = True) -> OidcIdentity:
    return OidcIdentity(ISSUER, sub, email, verified)


def test_claims_from_st_user() -> None:
    identity = oidc.identity_from_claims(
        {"is_logged_in": True, "iss": ISSUER, "sub": "123", "email": " Bob@Example.COM ", "email_verified": "true"}
    )
    assert identity == OidcIdentity(ISSUER, "123", "bob@example.com", True)
    assert identity.key == f"{ISSUER}|123"
    with pytest.raises(OidcRefused, match="issuer or subject"):
        oidc.identity_from_claims({"is_logged_in": True, "email": "bob@example.com"})


def test_first_sign_in_links_by_email_then_matches_by_subject(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    set_ = _set_email(db_session_factory, people["alice"], people["bob"], "  Bob@Example.com")
    assert set_.email == "bob@example.com" and not set_.oidc_linked
    user = _sign_in(db_session_factory, _identity("sub-1", "bob@example.com"))
    assert (user.username, user.role, user.oidc_linked) == ("bob", Role.USER, True)
    assert user.last_login_at is not None
    # Later: the subject decides, even if the provider now reports another email.
    again = _sign_in(db_session_factory, _identity("sub-1", "robert@elsewhere.org"))
    assert again.username == "bob"
    # Another identity with bob's email cannot take the linked account over.
    with pytest.raises(OidcRefused, match="linked to another identity"):
        _sign_in(db_session_factory, _identity("sub-2", "bob@example.com"))
    # The same subject from another issuer is another identity.
    with pytest.raises(OidcRefused):
        _sign_in(db_session_factory, OidcIdentity("https://other.example", "sub-1", None, None))
    with db_session_factory() as session:
        actions = session.scalars(select(AuditLog.action).where(AuditLog.target_type == "user")).all()
    assert actions.count("user.oidc_link") == 1 and actions.count("user.set_email") == 1


def test_unknown_identities_are_refused_with_a_clear_message(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    with pytest.raises(OidcRefused, match=r"no Imagegate account has the email eve@example\.com: ask an admin"):
        _sign_in(db_session_factory, _identity("eve", "eve@example.com"))
    with pytest.raises(OidcRefused, match="sent no email"):
        _sign_in(db_session_factory, _identity("eve", None))
    _set_email(db_session_factory, people["alice"], people["bob"], "bob@example.com")
    with pytest.raises(OidcRefused, match="not verified"):
        _sign_in(db_session_factory, _identity("sub-1", "bob@example.com", verified=False))
    # A provider that does not say whether the email is verified is trusted (it is the organisation's own).
    assert _sign_in(db_session_factory, _identity("sub-1", "bob@example.com", verified=None)).username == "bob"
    with db_session_factory() as session:
        assert session.scalar(select(User.id).where(User.username == "eve")) is None  # nobody was created


def test_a_deactivated_account_is_refused_either_way(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    _set_email(db_session_factory, people["alice"], people["bob"], "bob@example.com")
    _set_email(db_session_factory, people["alice"], people["hero"], "hero@example.com")
    _sign_in(db_session_factory, _identity("sub-bob", "bob@example.com"))
    with transaction(db_session_factory) as session:
        users.deactivate(session, people["alice"], people["bob"].user_id or 0)
        users.deactivate(session, people["alice"], people["hero"].user_id or 0)
    with pytest.raises(OidcRefused, match="deactivated"):
        _sign_in(db_session_factory, _identity("sub-bob", "bob@example.com"))  # by subject
    with pytest.raises(OidcRefused, match="deactivated"):
        _sign_in(db_session_factory, _identity("sub-hero", "hero@example.com"))  # by email


def test_only_admins_set_emails_and_a_new_email_unlinks(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    with pytest.raises(PermissionDenied):
        _set_email(db_session_factory, people["hero"], people["bob"], "bob@example.com")
    with pytest.raises(PermissionDenied):
        _set_email(db_session_factory, people["bob"], people["bob"], "bob@example.com")
    _set_email(db_session_factory, people["alice"], people["bob"], "bob@example.com")
    with pytest.raises(InvalidInput, match="already the email of bob"):
        _set_email(db_session_factory, people["alice"], people["hero"], "BOB@example.com")
    with pytest.raises(InvalidInput, match="email address"):
        _set_email(db_session_factory, people["alice"], people["hero"], "not an email")
    _sign_in(db_session_factory, _identity("sub-1", "bob@example.com"))
    # Moving the account to another identity: set the email again (a new one), the link goes.
    moved = _set_email(db_session_factory, people["alice"], people["bob"], "bob@new.example.com")
    assert not moved.oidc_linked
    with pytest.raises(OidcRefused):
        _sign_in(db_session_factory, _identity("sub-1", "bob@example.com"))
    assert _sign_in(db_session_factory, _identity("sub-9", "bob@new.example.com")).username == "bob"
    cleared = _set_email(db_session_factory, people["alice"], people["bob"], None)
    assert cleared.email is None and not cleared.oidc_linked


def test_two_identities_racing_for_one_email_link_once(
    db_session_factory: sessionmaker[Session], people: dict[str, Actor]
) -> None:
    """Two first sign-ins with bob's email and different subjects at the same moment: one links, one is refused."""
    import threading

    _set_email(db_session_factory, people["alice"], people["bob"], "bob@example.com")
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def sign_in(sub: str) -> None:
        barrier.wait()
        try:
            outcomes[sub] = _sign_in(db_session_factory, _identity(sub, "bob@example.com")).username
        except OidcRefused as exc:
            outcomes[sub] = f"refused: {exc}"

    threads = [threading.Thread(target=sign_in, args=(sub,)) for sub in ("sub-a", "sub-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(v == "bob" for v in outcomes.values()) == [False, True], outcomes
    with db_session_factory() as session:
        linked = session.scalar(select(User.oidc_subject).where(User.username == "bob"))
        links = session.scalars(select(AuditLog.id).where(AuditLog.action == "user.oidc_link")).all()
    winner = next(sub for sub, v in outcomes.items() if v == "bob")
    assert linked == f"{ISSUER}|{winner}" and len(links) == 1
