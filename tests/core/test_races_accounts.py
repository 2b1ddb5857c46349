"""Accounts under concurrency, with real processes on SQLite and PostgreSQL.

- The last admin: two processes demote or deactivate the only two admins at the same moment, many times over.
  Before the fix, both changes passed their "is this the last admin?" count (each read its own snapshot) and the
  installation was left with no active admin: on SQLite in about half the trials, on PostgreSQL in nearly all.
- Sign-in throttling: 16 wrong passwords at once on one account (threads, and processes). Before the fix the
  counter was a read-then-write, so parallel guesses lost increments and each got its password verified; now a
  guess is reserved by one atomic statement before its password is checked, so at most MAX_FAILED_SIGN_INS are
  verified per lock window, and the account ends up locked.
- The checks can fail: the same racers with the naive versions these fixes replaced (account_racers, test code
  only) leave no active admin ("count the other admins, then write", with a pause between) and verify more than
  MAX_FAILED_SIGN_INS wrong passwords in one lock window, losing counts ("read the count, verify, write count + 1").
- Password checks are bounded per process (argon2 costs 64 MiB each).

Counts and timings are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Literal

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked
from core import security, users
from core.security import Actor, Role
from db.engine import transaction
from db.models import User
from tests.core.account_racers import WRONG, admin_racer, guesser, try_wrong_password
from tests.dbfixtures import *  # noqa: F403
from tests.racing import Report, backend, race_trials, run_threads

PASSWORD = "the right password"
ADMIN_TRIALS = 36
"""Per backend; the plans below take turns (12 trials each)."""
NAIVE_ADMIN_TRIALS = 12
"""Per backend, for the naive change (4 per plan): each trial pauses NAIVE_ADMIN_PAUSE_S in both racers."""
ADMIN_PLANS = ("demote", "deactivate", "crossed")
GUESSERS = 16

# Verification must take long enough for parallel guesses to overlap, as real argon2 (64 MiB, ~50 ms) does,
# without 16 processes needing a gigabyte between them.
RACE_HASHER = PasswordHasher(time_cost=2, memory_cost=8 * 1024, parallelism=1)


@pytest.fixture
def race_hashing() -> Iterator[None]:
    previous = security.set_password_hasher(RACE_HASHER)
    yield
    security.set_password_hasher(previous)


# --- the last admin ------------------------------------------------------------------------------------------


def _active_admins(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        query = select(func.count()).select_from(User).where(User.role == Role.ADMIN, User.active.is_(True))
        return int(session.scalar(query) or 0)


def _race_admins(
    db_url: str, factory: sessionmaker[Session], *, naive: bool, trials: int
) -> tuple[list[str], dict[int, int], dict[int, list[str]]]:
    """Two processes remove the two admins at once, `trials` times (the plans take turns); the plan of each trial,
    the active admins left after it, and the two racers' outcomes."""
    ann = users.create_first_admin(factory, "ann", PASSWORD)
    with transaction(factory) as session:
        ben = users.create_user(session, Actor.system(), "ben", PASSWORD, Role.ADMIN)
    ids = (ann.id, ben.id)
    plans = [ADMIN_PLANS[t % len(ADMIN_PLANS)] for t in range(trials)]

    def reset_admins(_trial: int) -> None:
        with transaction(factory) as session:
            session.execute(update(User).where(User.id.in_(ids)).values(role=Role.ADMIN, active=True))

    def observe(_trial: int, _set_up: None, reports: list[Report]) -> tuple[int, list[str]]:
        """Active admins left after both changes, and the two racers' outcomes."""
        return _active_admins(factory), [report["results"] for report in reports]

    facts = race_trials(
        admin_racer,
        (db_url, ids, plans, naive),
        processes=2,
        trials=trials,
        set_up=reset_admins,
        observe=observe,
        per_process=lambda index: (index,),
    )
    left = {trial: admins for trial, (admins, _) in enumerate(facts)}
    outcomes = {trial: racers for trial, (_, racers) in enumerate(facts)}
    return plans, left, outcomes


def _none_left_by_plan(plans: list[str], left: dict[int, int]) -> tuple[list[int], dict[str, int]]:
    none_left = sorted(t for t, n in left.items() if n == 0)
    return none_left, {p: sum(1 for t in none_left if plans[t] == p) for p in ADMIN_PLANS}


@pytest.mark.timeout(300)
def test_two_processes_racing_to_remove_the_two_admins_never_leave_none(
    db_url: str, db_session_factory: sessionmaker[Session], race_hashing: None
) -> None:
    plans, left, outcomes = _race_admins(db_url, db_session_factory, naive=False, trials=ADMIN_TRIALS)
    none_left, by_plan = _none_left_by_plan(plans, left)
    assert not none_left, f"no active admin left in {len(none_left)}/{ADMIN_TRIALS} trials {by_plan}"
    errors = [o for os in outcomes.values() for o in os if o.startswith("error")]
    assert not errors, errors[:5]
    # Exactly one of the two changes goes through each time: the other is refused, not lost or doubled.
    assert all(sorted(os)[0] == "changed" and os.count("changed") == 1 for os in outcomes.values()), outcomes


@pytest.mark.timeout(120)
def test_a_naive_count_then_write_would_remove_the_last_admin(
    db_url: str, db_session_factory: sessionmaker[Session], race_hashing: None
) -> None:
    """The check above can fail: "count the other active admins, then write if there is one", raced the same
    way, lets both changes through (each counted the other admin) and leaves no active admin."""
    began = time.perf_counter()
    plans, left, outcomes = _race_admins(db_url, db_session_factory, naive=True, trials=NAIVE_ADMIN_TRIALS)
    none_left, by_plan = _none_left_by_plan(plans, left)
    print(
        f"[{backend(db_url)}] naive count-then-write: no active admin left in {len(none_left)}/{NAIVE_ADMIN_TRIALS} "
        f"trials {by_plan}, in {time.perf_counter() - began:.1f} s"
    )
    errors = [o for os in outcomes.values() for o in os if o.startswith("error")]
    assert not errors, errors[:5]
    assert none_left, f"the naive change never left the installation without an admin: {outcomes}"
    assert all(outcomes[t] == ["changed", "changed"] for t in none_left), outcomes


# --- sign-in throttling --------------------------------------------------------------------------------------


def _target(factory: sessionmaker[Session]) -> str:
    users.create_first_admin(factory, "root", "the root password")
    with transaction(factory) as session:
        users.create_user(session, Actor.system(), "target", PASSWORD, Role.USER)
    return "target"


def _check_throttled(factory: sessionmaker[Session], username: str, outcomes: list[str]) -> None:
    verified = outcomes.count("verified, wrong")
    assert len(outcomes) == GUESSERS and not [o for o in outcomes if o.startswith(("error", "signed"))], outcomes
    assert verified <= users.MAX_FAILED_SIGN_INS, (
        f"{verified} of {GUESSERS} parallel wrong passwords were verified (at most {users.MAX_FAILED_SIGN_INS})"
    )
    assert outcomes.count("locked") == GUESSERS - verified
    # The account is locked now: even the right password is refused.
    with pytest.raises(AccountLocked):
        users.authenticate(factory, username, PASSWORD)


def _guess_in_processes(db_url: str, username: str, *, naive: bool) -> list[str]:
    """GUESSERS processes each try one wrong password at the same moment; their outcomes."""
    (outcomes,) = race_trials(
        guesser,
        (db_url, username, naive),
        processes=GUESSERS,
        trials=1,
        observe=lambda _trial, _set_up, reports: [report["results"] for report in reports],
    )
    return list(outcomes)


@pytest.mark.timeout(300)
def test_sixteen_parallel_wrong_passwords_in_threads_lock_the_account(
    db_session_factory: sessionmaker[Session], race_hashing: None
) -> None:
    username = _target(db_session_factory)
    outcomes = run_threads(GUESSERS, lambda _thread: try_wrong_password(db_session_factory, username))
    _check_throttled(db_session_factory, username, outcomes)


@pytest.mark.timeout(300)
def test_sixteen_parallel_wrong_passwords_in_processes_lock_the_account(
    db_url: str, db_session_factory: sessionmaker[Session], race_hashing: None
) -> None:
    username = _target(db_session_factory)
    outcomes = _guess_in_processes(db_url, username, naive=False)
    _check_throttled(db_session_factory, username, outcomes)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("guessers", ["threads", "processes"])
def test_a_naive_read_verify_write_throttle_would_verify_every_parallel_guess(
    db_url: str, db_session_factory: sessionmaker[Session], race_hashing: None, guessers: str
) -> None:
    """The checks above can fail: "read the count, compare it with the limit, verify, write count + 1", with the
    same guessers, verifies more than MAX_FAILED_SIGN_INS wrong passwords in one lock window (every guess that
    read a count below the limit is checked), and its writes overwrite each other's counts, so the account is
    locked late (after more guesses) or not at all."""
    began = time.perf_counter()
    username = _target(db_session_factory)
    if guessers == "threads":
        outcomes = run_threads(GUESSERS, lambda _thread: try_wrong_password(db_session_factory, username, naive=True))
    else:
        outcomes = _guess_in_processes(db_url, username, naive=True)
    verified = outcomes.count("verified, wrong")
    with db_session_factory() as session:
        row = session.scalars(select(User).where(User.username == username)).one()
        count, locked = row.failed_sign_ins, row.locked_until is not None
    print(
        f"[{backend(db_url)}] naive throttle, {GUESSERS} {guessers}: {verified} wrong passwords verified "
        f"(limit {users.MAX_FAILED_SIGN_INS}), count {count}, {'locked' if locked else 'not locked'}, "
        f"in {time.perf_counter() - began:.1f} s"
    )
    assert not [o for o in outcomes if o.startswith(("error", "signed"))], outcomes
    assert verified > users.MAX_FAILED_SIGN_INS or not locked, outcomes


def test_a_success_among_parallel_guesses_resets_the_count(
    db_session_factory: sessionmaker[Session], race_hashing: None
) -> None:
    """The reservation counts a guess before it is checked; a right password then clears the count again."""
    username = _target(db_session_factory)
    for _ in range(users.MAX_FAILED_SIGN_INS - 1):
        assert users.authenticate(db_session_factory, username, WRONG) is None
    assert users.authenticate(db_session_factory, username, PASSWORD) is not None
    with db_session_factory() as session:
        row = session.scalars(select(User).where(User.username == username)).one()
        assert (row.failed_sign_ins, row.locked_until) == (0, None)


# --- bounded password checks ---------------------------------------------------------------------------------


class _CountingHasher(PasswordHasher):
    """Records how many hashes/verifications run at the same moment (each one lasts a little while)."""

    def __init__(self) -> None:
        cheap = RACE_HASHER
        super().__init__(time_cost=cheap.time_cost, memory_cost=cheap.memory_cost, parallelism=cheap.parallelism)
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _enter(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def _leave(self) -> None:
        with self._lock:
            self.running -= 1

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self._enter()
        try:
            time.sleep(0.02)
            return super().verify(hash, password)
        finally:
            self._leave()

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self._enter()
        try:
            time.sleep(0.02)
            return super().hash(password, salt=salt)
        finally:
            self._leave()


def test_password_checks_run_at_most_a_few_at_a_time_in_a_process() -> None:
    counting = _CountingHasher()
    previous = security.set_password_hasher(counting)
    try:
        stored = security.hash_password(PASSWORD)

        def check(n: int) -> None:
            if n % 4 == 0:
                security.hash_password(PASSWORD)
            elif n % 4 == 1:
                security.verify_dummy(WRONG)
            else:
                security.verify_password(stored, WRONG if n % 2 else PASSWORD)

        run_threads(GUESSERS, check)
    finally:
        security.set_password_hasher(previous)
    assert 1 <= counting.peak <= security.MAX_CONCURRENT_PASSWORD_CHECKS, counting.peak
