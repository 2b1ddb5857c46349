"""Console sessions (the cookie that keeps a browser signed in), on SQLite and PostgreSQL: the hand-off is used
once, even by racing processes; expiry, revocation, deactivation and role changes take effect at the next check."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import PermissionDenied
from core import console_sessions
from core.console_sessions import HANDOFF_LIFETIME, RETENTION, SESSION_LIFETIME
from db.engine import make_engine, session_factory, transaction
from db.models import ConsoleSession, Role, User, utcnow
from tests.dbfixtures import *  # noqa: F403

Factory = sessionmaker[Session]


def _user(factory: Factory, name: str, role: Role = Role.ADMIN, *, active: bool = True) -> int:
    # Rows written directly: these tests are about sessions, not about how accounts are made.
    with transaction(factory) as session:
        user = User(username=name, password_hash="not-a-real-hash", role=role, active=active)
        session.add(user)
        session.flush()
        return user.id


def _set(factory: Factory, user_id: int, **values: object) -> None:
    with transaction(factory) as session:
        user = session.get(User, user_id)
        assert user is not None
        for key, value in values.items():
            setattr(user, key, value)


def _signed_in(factory: Factory, user_id: int, now: datetime | None = None) -> tuple[int, str]:
    """(session id, cookie token) after a sign-in and the browser's collection of its cookie."""
    with transaction(factory) as session:
        started = console_sessions.start(session, user_id, now=now)
    with transaction(factory) as session:
        issued = console_sessions.collect(session, started.handoff, now=now)
    assert issued is not None
    assert issued.session.session_id == started.session_id
    return started.session_id, issued.token


def _valid_token(factory: Factory, token: str, now: datetime | None = None) -> console_sessions.ValidSession | None:
    with transaction(factory) as session:
        return console_sessions.validate_token(session, token, now=now)


def _valid_id(factory: Factory, session_id: int, now: datetime | None = None) -> console_sessions.ValidSession | None:
    with transaction(factory) as session:
        return console_sessions.validate(session, session_id, now=now)


def test_a_cookie_token_signs_its_user_in_and_only_its_hash_is_stored(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    session_id, token = _signed_in(db_session_factory, alice)
    valid = _valid_token(db_session_factory, token)
    assert valid is not None
    assert (valid.session_id, valid.user_id, valid.username, valid.role) == (
        session_id, alice, "alice", Role.ADMIN,
    )
    with db_session_factory() as session:
        row = session.get(ConsoleSession, session_id)
        assert row is not None
        assert row.token_hash == console_sessions.digest(token) and token not in (row.token_hash or "")
        assert row.handoff_hash is None and row.handoff_expires_at is None
        assert row.expires_at - row.created_at == SESSION_LIFETIME
    assert _valid_token(db_session_factory, token[:-1] + ("A" if token[-1] != "A" else "B")) is None


def test_the_hand_off_code_works_once_and_only_for_a_minute(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    with transaction(db_session_factory) as session:
        started = console_sessions.start(session, alice)
    # The tab that signed in is signed in already (by id), before any cookie exists.
    assert _valid_id(db_session_factory, started.session_id) is not None
    with transaction(db_session_factory) as session:
        too_late = utcnow() + HANDOFF_LIFETIME + timedelta(seconds=1)
        assert console_sessions.collect(session, started.handoff, now=too_late) is None
    with transaction(db_session_factory) as session:
        assert console_sessions.collect(session, started.handoff) is not None
    with transaction(db_session_factory) as session:
        assert console_sessions.collect(session, started.handoff) is None


def test_sessions_expire_after_their_lifetime(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    signed_in_at = utcnow()
    session_id, token = _signed_in(db_session_factory, alice, now=signed_in_at)
    just_before = signed_in_at + SESSION_LIFETIME - timedelta(seconds=1)
    assert _valid_token(db_session_factory, token, now=just_before) is not None
    assert _valid_id(db_session_factory, session_id, now=just_before) is not None
    at_expiry = signed_in_at + SESSION_LIFETIME
    assert _valid_token(db_session_factory, token, now=at_expiry) is None
    assert _valid_id(db_session_factory, session_id, now=at_expiry) is None


def test_signing_out_revokes_the_session_for_every_tab_and_the_old_cookie(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    session_id, token = _signed_in(db_session_factory, alice)
    other_id, other_token = _signed_in(db_session_factory, alice)  # another browser of the same person
    with transaction(db_session_factory) as session:
        assert console_sessions.revoke(session, session_id)
    with transaction(db_session_factory) as session:
        assert not console_sessions.revoke(session, session_id)  # already ended
    assert _valid_token(db_session_factory, token) is None
    assert _valid_id(db_session_factory, session_id) is None
    assert _valid_token(db_session_factory, other_token) is not None

    with transaction(db_session_factory) as session:
        assert console_sessions.revoke_token(session, other_token)
    assert _valid_token(db_session_factory, other_token) is None
    assert _valid_id(db_session_factory, other_id) is None


def test_a_revoked_session_cannot_collect_its_cookie(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    with transaction(db_session_factory) as session:
        started = console_sessions.start(session, alice)
    with transaction(db_session_factory) as session:
        console_sessions.revoke(session, started.session_id)
    with transaction(db_session_factory) as session:
        assert console_sessions.collect(session, started.handoff) is None


def test_deactivation_ends_sessions_at_once_and_reactivation_does_not_revive_them(
    db_session_factory: Factory,
) -> None:
    alice = _user(db_session_factory, "alice")
    bob = _user(db_session_factory, "bob", Role.USER)
    session_id, token = _signed_in(db_session_factory, bob)
    alice_id, alice_token = _signed_in(db_session_factory, alice)
    _set(db_session_factory, bob, active=False)
    assert _valid_token(db_session_factory, token) is None
    assert _valid_id(db_session_factory, session_id) is None
    _set(db_session_factory, bob, active=True)
    assert _valid_token(db_session_factory, token) is None
    assert _valid_token(db_session_factory, alice_token) is not None  # nobody else is affected

    # An inactive account cannot start a session, nor collect a cookie for one started before.
    with transaction(db_session_factory) as session:
        started = console_sessions.start(session, bob)
    _set(db_session_factory, bob, active=False)
    with transaction(db_session_factory) as session:
        assert console_sessions.collect(session, started.handoff) is None
    with transaction(db_session_factory) as session, pytest.raises(PermissionDenied):
        console_sessions.start(session, bob)
    with transaction(db_session_factory) as session, pytest.raises(PermissionDenied):
        console_sessions.start(session, 999_999)
    assert _valid_id(db_session_factory, alice_id) is not None


def test_revoke_user_sessions_ends_every_session_of_that_user_only(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    bob = _user(db_session_factory, "bob", Role.USER)
    bob_tokens = [_signed_in(db_session_factory, bob)[1] for _ in range(3)]
    _, alice_token = _signed_in(db_session_factory, alice)
    with transaction(db_session_factory) as session:
        assert console_sessions.revoke_user_sessions(session, bob) == 3
    assert all(_valid_token(db_session_factory, t) is None for t in bob_tokens)
    assert _valid_token(db_session_factory, alice_token) is not None


def test_the_role_comes_from_the_database_at_every_check(db_session_factory: Factory) -> None:
    carol = _user(db_session_factory, "carol", Role.ADMIN)
    session_id, token = _signed_in(db_session_factory, carol)
    _set(db_session_factory, carol, role=Role.USER)
    by_token = _valid_token(db_session_factory, token)
    by_id = _valid_id(db_session_factory, session_id)
    assert by_token is not None and by_token.role is Role.USER
    assert by_id is not None and by_id.role is Role.USER


@pytest.mark.parametrize("junk", ["", "x", "a" * 42, "a" * 44, "a" * 100_000, "é" * 43, "a" * 42 + "=", None, 42])
def test_malformed_cookies_are_refused_without_a_lookup(db_session_factory: Factory, junk: object) -> None:
    with transaction(db_session_factory) as session:
        assert console_sessions.validate_token(session, junk) is None  # type: ignore[arg-type]
        assert console_sessions.collect(session, junk) is None  # type: ignore[arg-type]
        assert not console_sessions.revoke_token(session, junk)  # type: ignore[arg-type]


def test_long_ended_sessions_are_deleted_at_the_next_sign_in(db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    bob = _user(db_session_factory, "bob")
    long_ago = utcnow() - RETENTION - SESSION_LIFETIME - timedelta(days=1)
    _signed_in(db_session_factory, alice, now=long_ago)
    _signed_in(db_session_factory, bob, now=long_ago)
    recent_id, _ = _signed_in(db_session_factory, alice, now=utcnow() - timedelta(days=1))
    with transaction(db_session_factory) as session:
        console_sessions.revoke(session, recent_id)
    _signed_in(db_session_factory, alice)
    with db_session_factory() as session:
        per_user = dict(
            session.execute(select(ConsoleSession.user_id, func.count()).group_by(ConsoleSession.user_id)).all()
        )
    # Alice's session from long ago is gone; her recently ended one is kept; Bob's are not hers to clean.
    assert per_user == {alice: 2, bob: 1}


# --- the hand-off under concurrency ---------------------------------------------------------------------------

RACERS = 4
TRIALS = 12


def _collector(url: str, inbox: Queue[str | None], outbox: Queue[str | None], barrier: Barrier) -> None:
    """A separate process that, in each trial, waits for the others and then tries the same hand-off code."""
    engine = make_engine(url)
    factory = session_factory(engine)
    try:
        while (handoff := inbox.get(timeout=120)) is not None:
            barrier.wait(timeout=60)
            try:
                with transaction(factory) as session:
                    issued = console_sessions.collect(session, handoff)
                outbox.put(issued.token if issued is not None else None)
            except Exception as exc:  # reported to the test, which fails on it
                outbox.put(f"error: {exc!r}")
    finally:
        engine.dispose()


def test_racing_processes_collect_one_hand_off_exactly_once(db_url: str, db_session_factory: Factory) -> None:
    alice = _user(db_session_factory, "alice")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS)
    inboxes: list[Queue[str | None]] = [ctx.Queue() for _ in range(RACERS)]
    outbox: Queue[str | None] = ctx.Queue()
    workers = [ctx.Process(target=_collector, args=(db_url, inbox, outbox, barrier)) for inbox in inboxes]
    for worker in workers:
        worker.start()
    try:
        for _ in range(TRIALS):
            with transaction(db_session_factory) as session:
                started = console_sessions.start(session, alice)
            for inbox in inboxes:
                inbox.put(started.handoff)
            results = [outbox.get(timeout=120) for _ in range(RACERS)]
            assert not [r for r in results if r is not None and r.startswith("error")], results
            tokens = [r for r in results if r is not None]
            assert len(tokens) == 1, results
            valid = _valid_token(db_session_factory, tokens[0])
            assert valid is not None and valid.session_id == started.session_id
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
