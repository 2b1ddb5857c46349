"""Passwords (argon2id), roles and who is acting.

Roles:
- ADMIN: everything, including managing users (create, change roles, reset passwords, deactivate).
- HERO:  a power user: changes provider and global settings, prices, budgets; reads the audit log. Cannot
         manage users, so a HERO can never make themselves (or anyone) an ADMIN.
- USER:  generates images and sees their own usage. Every mutating core call refuses a USER.
Permission is checked in core (core.authz.authorize), from the database, not in pages: the REST API, the CLI and
the console get the same answer, and the role an `Actor` carries is never what grants access.

Password checks are bounded per process: argon2 with these parameters needs 64 MiB for each hash or
verification, so at most MAX_CONCURRENT_PASSWORD_CHECKS run at once (about 256 MiB) and the rest wait their
turn; 16 parallel sign-ins would otherwise take about 1 GB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from common.errors import InvalidInput
from db.models import Role

__all__ = [
    "MAX_CONCURRENT_PASSWORD_CHECKS",
    "PASSWORD_MAX_LENGTH",
    "PASSWORD_MIN_LENGTH",
    "ROLE_RANK",
    "SETTINGS_EDITORS",
    "Actor",
    "ActorKind",
    "Role",
    "capped",
    "hash_password",
    "password_problem",
    "set_password_hasher",
    "verify_dummy",
    "verify_password",
]

PASSWORD_MIN_LENGTH = 10
# Hashing cost grows with length; a cap keeps a megabyte "password" from being a cheap denial of service.
PASSWORD_MAX_LENGTH = 1024

SETTINGS_EDITORS: tuple[Role, ...] = (Role.ADMIN, Role.HERO)
ROLE_RANK: dict[Role, int] = {Role.USER: 0, Role.HERO: 1, Role.ADMIN: 2}
"""What each role may do, in order: a cap lowers an account to at most its rank."""


def capped(role: Role, cap: Role | None) -> Role:
    """`role`, or `cap` when the cap is lower (an API token acting below its user's role)."""
    return role if cap is None or ROLE_RANK[cap] >= ROLE_RANK[role] else cap


"""Who may change provider/global settings, prices and imports."""

MAX_CONCURRENT_PASSWORD_CHECKS = 4
"""Hashes and verifications running at once in one process; each needs the hasher's memory (64 MiB)."""

# argon2-cffi's defaults follow RFC 9106's low-memory profile (argon2id, 64 MiB, 3 passes).
_hasher = PasswordHasher()
_dummy_hash: str | None = None
_check_slots = threading.BoundedSemaphore(MAX_CONCURRENT_PASSWORD_CHECKS)


@contextmanager
def _check_slot() -> Iterator[None]:
    """Wait for one of the process's password-check slots (memory, not time, is what runs out first)."""
    with _check_slots:
        yield


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
    with _check_slot():
        return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> tuple[bool, str | None]:
    """(matches, new hash or None). A new hash is returned when the stored one uses outdated parameters."""
    try:
        with _check_slot():
            _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, None
    if _hasher.check_needs_rehash(password_hash):
        return True, hash_password(password)
    return True, None


def verify_dummy(password: str) -> None:
    """Spend the time of one verification, for an unknown username: "no such user" then takes as long as
    "wrong password", so response times do not reveal which usernames exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password("imagegate-dummy-password-for-timing")
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


class ActorKind(StrEnum):
    USER = "user"
    """A person with an account: authorized from the users table at every change."""
    SYSTEM = "system"
    """The process itself: an in-process privilege, never a role claim (see Actor.system)."""


@dataclass(frozen=True)
class Actor:
    """Who says they are acting: a claim that core.authz.authorize checks against the database at every call.

    - A person: `user_id` of their account (`UserView.actor()`). `username` and `role` are what the caller last
      saw, for messages only: authorization reads the account (exists, active, role) in the transaction of the
      change, so a stale or forged role grants nothing, and an Actor without a user_id is refused.
    - The system: `Actor.system(name)`, for code that runs with the database's own credentials and no person
      behind a request (seed, migrations, the `imagegate` CLI as `cli:<os user>`, background jobs). It may do
      everything, because whoever runs that code can already write to the database directly. Never build one
      from anything a request supplies (the console and the REST API act only as signed-in users).
    """

    user_id: int | None
    username: str
    role: Role | None = None
    kind: ActorKind = ActorKind.USER
    role_cap: Role | None = None
    """An upper bound on the account's stored role (an API token's own role). It only ever lowers what the
    account may do, so unlike `role` it is safe to take from a claim: authorize applies it to the role it reads."""

    def __post_init__(self) -> None:
        if self.kind is ActorKind.SYSTEM and self.user_id is not None:
            raise ValueError("a system actor has no user id")

    @classmethod
    def system(cls, name: str = "system") -> Actor:
        """The process itself, audited under `name` (e.g. "cli:alice" for the CLI run by OS user alice)."""
        return cls(user_id=None, username=name, role=None, kind=ActorKind.SYSTEM)

    @property
    def is_system(self) -> bool:
        return self.kind is ActorKind.SYSTEM
