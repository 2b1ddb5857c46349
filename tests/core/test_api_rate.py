"""Per-token rate limits (core.api_rate): one upsert per request, so the limit holds across processes."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput
from core.api_rate import count_request, default_rate_limit, forget_old_windows
from core.api_tokens import create_token
from core.security import Actor
from db.engine import transaction
from db.models import ApiRateWindow, Role, User
from tests.core.rate_racers import count_many
from tests.dbfixtures import *  # noqa: F403

T0 = datetime(2026, 11, 30, 12, 0, 10, tzinfo=UTC)


def _token(factory: sessionmaker[Session]) -> int:
    with transaction(factory) as session:
        user = User(username="ann", password_hash="x", role=Role.USER)
        session.add(user)
        session.flush()
        return create_token(session, Actor.system("tests"), user.id, "t").token.id


def test_the_limit_counts_per_minute_and_says_when_to_come_back(db_session_factory: sessionmaker[Session]) -> None:
    token = _token(db_session_factory)
    with transaction(db_session_factory) as session:
        decisions = [count_request(session, token, 3, now=T0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert (decisions[-1].used, decisions[-1].remaining, decisions[-1].retry_after_s) == (4, 0, 50)
    with transaction(db_session_factory) as session:
        assert count_request(session, token, 3, now=T0 + timedelta(seconds=50)).allowed  # the next minute
        assert forget_old_windows(session, now=T0 + timedelta(hours=2)) == 2
        assert session.scalar(select(func.count()).select_from(ApiRateWindow)) == 0


def test_the_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGATE_API_RATE_LIMIT", "120")
    assert default_rate_limit() == 120
    monkeypatch.setenv("IMAGEGATE_API_RATE_LIMIT", "lots")
    with pytest.raises(InvalidInput, match="IMAGEGATE_API_RATE_LIMIT"):
        default_rate_limit()


def test_processes_racing_on_one_token_let_exactly_the_limit_through(
    db_url: str, db_session_factory: sessionmaker[Session]
) -> None:
    token = _token(db_session_factory)
    context = multiprocessing.get_context("spawn")
    processes, each, limit = 4, 30, 50
    barrier = context.Barrier(processes)
    out: multiprocessing.Queue[int] = context.Queue()
    workers = [
        context.Process(target=count_many, args=(db_url, token, limit, each, T0, barrier, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    allowed = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(allowed) == limit  # 120 requests, exactly 50 let through
    with db_session_factory() as session:
        assert session.scalar(select(ApiRateWindow.requests)) == processes * each
