"""Passwords (argon2id), roles and the one permission check every core service calls.

Roles:
- ADMIN: everything, including managing users (create, change roles, reset passwords, deactivate).
- HERO:  a power user: changes provider and global settings, prices, budgets; reads the audit log. Cannot
         manage users, so a HERO can never make themselves (or anyone) an ADMIN.
- USER:  generates images and sees their own usage. Every mutating core call refuses a USER.
Permission is checked in core, not in pages: the REST API, the CLI and the console get the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from common.errors import InvalidInput, PermissionDenied
from db.models import Role

__all__ = [
    "PASSWORD_MAX_LENGTH",
    "PASSWORD_MIN_LENGTH",
    "SETTINGS_EDITORS",
    "Actor",
    "Role",
    "hash_password",
    "password_problem",
    "require_role",
    "set_password_hasher",
    "verify_dummy",
    "verify_password",
]

PASSWORD_MIN_LENGTH = 10
# Hashing cost grows with length; a cap keeps a megabyte "password" from being a cheap denial of service.
PASSWORD_MAX_LENGTH = 1024

SETTINGS_EDITORS: tuple[Role, ...] = (Role.ADMIN, Role.HERO)
"""Who may change provider/global settings, prices and imports."""

# argon2-cffi's defaults follow RFC 9106's low-memory profile (argon2id, 64 MiB, 3 passes).
_hasher = PasswordHasher()
_dummy_hash: str | None = None


def set_password_hasher(hasher: PasswordHasher) -> PasswordHasher:
    """Replace the hasher (e.g. stronger parameters); returns the previous one.

    Hashes made with other parameters keep verifying and are upgraded at the next successful sign-in
    (`verify_password` reports that a rehash is due).
    """
    global _hasher, _dummy_hash
    previous, _hasher = _hasher, hasher
    _dummy_hash = None
    return previous


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> tuple[bool, str | None]:
    """(matches, new hash or None). A new hash is returned when the stored one uses outdated parameters."""
    try:
        _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, None
    if _hasher.check_needs_rehash(password_hash):
        return True, _hasher.hash(password)
    return True, None


def verify_dummy(password: str) -> None:
    """Spend the time of one verification, for an unknown username: "no such user" then takes as long as
    "wrong password", so response times do not reveal which usernames exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash("imagegate-dummy-password-for-timing")
    verify_password(_dummy_hash, password)


def password_problem(password: str, username: str) -> str | None:
    """Why a password is not acceptable, or None."""
    if not isinstance(password, str):
        return "the password must be text"
    if len(password) < PASSWORD_MIN_LENGTH:
        return f"the password must be at least {PASSWORD_MIN_LENGTH} characters long"
    if len(password) > PASSWORD_MAX_LENGTH:
        return f"the password must be at most {PASSWORD_MAX_LENGTH} characters long"
    if password.strip().casefold() == username.strip().casefold():
        return "the password must not be the same as the username"
    return None


def check_password_policy(password: str, username: str, field: str = "password") -> None:
    problem = password_problem(password, username)
    if problem is not None:
        raise InvalidInput(problem, {field: problem})


@dataclass(frozen=True)
class Actor:
    """Who is acting. `user_id` is None only for the system itself (seed, migrations, background jobs)."""

    user_id: int | None
    username: str
    role: Role

    @classmethod
    def system(cls) -> Actor:
        return cls(user_id=None, username="system", role=Role.ADMIN)

    def has_role(self, *roles: Role) -> bool:
        return self.role in roles


def require_role(actor: Actor, *roles: Role, action: str = "do this") -> None:
    """Raise PermissionDenied unless `actor` has one of `roles`."""
    if not roles:
        raise ValueError("require_role needs at least one role")
    if actor.role not in roles:
        allowed = " or ".join(r.value for r in roles)
        raise PermissionDenied(f"{actor.username} ({actor.role.value}) may not {action}: this needs the {allowed} role")
