"""OIDC sign-in (`st.login`): mapping an identity from the organisation's identity provider to an Imagegate account.

Nobody gets an account by signing in: an admin creates the account (with its role) and sets its email on the
Users page (`set_email`). Then:

1. An identity already linked to an account (`users.oidc_subject` = "<issuer>|<sub>") signs in as that account.
2. Otherwise, an identity whose email (verified, unless the provider does not say) matches an account's email,
   and that account is not linked to another identity yet, is linked to it now (one guarded UPDATE, audited as
   `user.oidc_link`) and signs in. Later sign-ins match on the subject, so a changed email at the provider does
   not lose the account, and a reused email cannot take over an account linked to someone else.
3. Anything else is refused with a message saying what to ask an admin for (`OidcRefused`). A deactivated
   account is refused whichever way it matched.

An admin changing an account's email also removes its link (`oidc_subject`), so the next sign-in is matched by
the new email: that is how an account is moved to another identity.

The role always comes from the account (from the database, on every run of the console), never from claims.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc, select, update
from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound, PermissionDenied
from core import audit
from core.authz import authorize
from core.security import Actor, Role
from core.users import UserView, _lock_accounts, get_user  # _lock_accounts: the one serialisation of user management
from db.models import User, utcnow

__all__ = ["OidcIdentity", "OidcRefused", "identity_from_claims", "normalize_email", "set_email", "sign_in_oidc"]

EMAIL_MAX = 255
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class OidcRefused(PermissionDenied):
    """An OIDC identity that does not map to an active account."""


@dataclass(frozen=True)
class OidcIdentity:
    issuer: str
    subject: str
    email: str | None
    email_verified: bool | None
    """None when the provider does not say."""
    name: str | None = None

    @property
    def key(self) -> str:
        """What `users.oidc_subject` stores: the subject is unique only within its issuer."""
        return f"{self.issuer}|{self.subject}"


def normalize_email(email: str) -> str:
    """The stored form (stripped, lower-case), or InvalidInput."""
    value = email.strip().lower() if isinstance(email, str) else ""
    if not value or len(value) > EMAIL_MAX or not _EMAIL_RE.match(value):
        message = "enter an email address like name@example.com"
        raise InvalidInput(message, {"email": message})
    return value


def identity_from_claims(claims: Mapping[str, Any]) -> OidcIdentity:
    """The identity in an ID token's claims (`st.user`): `iss` and `sub` are required."""
    issuer, subject = claims.get("iss"), claims.get("sub")
    if not isinstance(issuer, str) or not issuer or not isinstance(subject, str) or not subject:
        raise OidcRefused("the identity provider's answer has no issuer or subject: sign-in cannot be matched")
    email = claims.get("email")
    verified = claims.get("email_verified")
    if isinstance(verified, str):  # some providers send "true"/"false"
        verified = verified.strip().lower() == "true"
    name = claims.get("name")
    return OidcIdentity(
        issuer=issuer,
        subject=subject,
        email=email.strip().lower() if isinstance(email, str) and email.strip() else None,
        email_verified=verified if isinstance(verified, bool) else None,
        name=name if isinstance(name, str) else None,
    )


def _refuse_inactive(user: User) -> None:
    if not user.active:
        raise OidcRefused(f"the account {user.username} is deactivated: ask an admin to reactivate it")


def sign_in_oidc(session: Session, identity: OidcIdentity) -> UserView:
    """The account this identity signs in as (linking it on first use, see the module docstring), or
    OidcRefused. Notes the sign-in time. Run inside a transaction."""
    key = identity.key
    linked = session.scalar(select(User).where(User.oidc_subject == key).execution_options(populate_existing=True))
    if linked is not None:
        _refuse_inactive(linked)
        linked.last_login_at = utcnow()
        session.flush()
        return get_user(session, linked.id)
    if identity.email is None:
        raise OidcRefused(
            "no Imagegate account is linked to this identity, and the identity provider sent no email to match: "
            "ask an admin"
        )
    if identity.email_verified is False:
        raise OidcRefused(
            f"the identity provider says {identity.email} is not verified, so it cannot be matched to an account"
        )
    user = session.scalar(select(User).where(User.email == identity.email))
    if user is None:
        raise OidcRefused(
            f"no Imagegate account has the email {identity.email}: ask an admin to set it on your account"
        )
    _refuse_inactive(user)
    if user.oidc_subject is not None:
        raise OidcRefused(
            f"the account with the email {identity.email} is linked to another identity: ask an admin to set "
            "the email again to re-link it"
        )
    try:
        linked_now = session.execute(
            update(User)
            .where(User.id == user.id, User.oidc_subject.is_(None), User.email == identity.email)
            .values(oidc_subject=key, last_login_at=utcnow())
            .returning(User.id)
            .execution_options(synchronize_session=False)
        ).one_or_none()
    except exc.IntegrityError:  # the same identity linked to another account at the same moment
        linked_now = None
    if linked_now is None:
        raise OidcRefused("the account changed while signing in: try again")
    who = authorize(session, Actor.system("oidc"), Role.ADMIN, action="link an OIDC identity")
    audit.record(
        session,
        who,
        "user.oidc_link",
        "user",
        str(user.id),
        after={"oidc_subject": key, "email": identity.email},
    )
    return get_user(session, user.id)


def set_email(session: Session, actor: Actor, user_id: int, email: str | None) -> UserView:
    """An admin sets (or, with None or "", clears) the email an OIDC sign-in is matched by. A new email also
    removes the account's link to an identity. Audited as `user.set_email`."""
    value = normalize_email(email) if email else None
    _lock_accounts(session, actor.user_id, user_id)
    who = authorize(session, actor, Role.ADMIN, action="set users' emails")
    user = session.get(User, user_id, populate_existing=True)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    if user.email == value:
        return get_user(session, user.id)
    if value is not None:
        taken = session.scalar(select(User.username).where(User.email == value, User.id != user.id))
        if taken is not None:
            message = f"{value} is already the email of {taken}"
            raise InvalidInput(message, {"email": message})
    before = {"email": user.email, "oidc_linked": user.oidc_subject is not None}
    user.email = value
    user.oidc_subject = None
    try:
        session.flush()
    except exc.IntegrityError:
        message = f"{value} was just given to another account"
        raise InvalidInput(message, {"email": message}) from None
    audit.record(
        session,
        who,
        "user.set_email",
        "user",
        str(user.id),
        before=before,
        after={"email": value, "oidc_linked": False},
    )
    return get_user(session, user.id)
