"""The database executor: work runs off the event loop, bounded, in transactions; cancellation gives back."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.generation import dbexec
from db.engine import make_engine, session_factory
from db.models import ProviderSlot

Factory = sessionmaker[Session]
WAIT_S = 20
"""Bound on every wait for another thread: a test that breaks fails instead of hanging."""


@pytest.fixture(autouse=True)
def fresh_executor() -> Iterator[None]:
    dbexec.configure(None)
    yield
    dbexec.shutdown(wait=True)
    dbexec.configure(None)


async def test_work_runs_on_a_database_thread_not_the_loop() -> None:
    loop_thread = threading.get_ident()
    ident, name = await dbexec.run_db(lambda: (threading.get_ident(), threading.current_thread().name))
    assert ident != loop_thread
    assert name.startswith(dbexec.THREAD_NAME_PREFIX)


async def test_arguments_results_and_exceptions_pass_through() -> None:
    def add(a: int, b: int, *, times: int = 1) -> int:
        return (a + b) * times

    assert await dbexec.run_db(add, 2, 3, times=4) == 20

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await dbexec.run_db(fail)


async def test_context_variables_follow_the_work() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    request_id.set("req-42")
    assert await dbexec.run_db(request_id.get) == "req-42"


async def test_the_loop_keeps_running_while_database_work_blocks() -> None:
    """The work waits for an event only the event loop sets: if it ran on the loop, it could never be set."""
    loop_ran = threading.Event()

    async def loop_side() -> None:
        await asyncio.sleep(0.01)
        loop_ran.set()

    ticker = asyncio.create_task(loop_side())
    assert await dbexec.run_db(loop_ran.wait, WAIT_S)
    await ticker


async def test_at_most_max_workers_run_at_once_and_the_rest_queue() -> None:
    dbexec.configure(2)
    gate = threading.Event()
    lock = threading.Lock()
    running = 0
    deepest = 0

    def work() -> int:
        nonlocal running, deepest
        with lock:
            running += 1
            deepest = max(deepest, running)
        try:
            gate.wait(WAIT_S)
        finally:
            with lock:
                running -= 1
        return 1

    tasks = [asyncio.create_task(dbexec.run_db(work)) for _ in range(6)]
    for _ in range(100):  # give the other four every chance to start, if the pool let them
        await asyncio.sleep(0.005)
    with lock:
        assert running == 2
    gate.set()
    assert sum(await asyncio.gather(*tasks)) == 6
    assert deepest == 2


def test_size_from_the_environment_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbexec.ENV_THREADS, "7")
    dbexec.configure(None)
    assert dbexec.max_workers() == 7
    for bad in ("0", "33", "lots"):
        monkeypatch.setenv(dbexec.ENV_THREADS, bad)
        with pytest.raises(ValueError, match=dbexec.ENV_THREADS):
            dbexec.configure(None)
    for size in (0, dbexec.MAX_THREADS + 1):
        with pytest.raises(ValueError):
            dbexec.configure(size)


def test_pool_capacity_sizes_the_executor(tmp_path: Path) -> None:
    sqlite = make_engine(f"sqlite:///{tmp_path / 'x.db'}", pool_size=4, max_overflow=3)
    assert dbexec.pool_capacity(sqlite) == 7
    assert dbexec.pool_capacity(make_engine(f"sqlite:///{tmp_path / 'y.db'}", poolclass=NullPool)) is None
    pg = make_engine("postgresql://nobody@127.0.0.1:1/none")  # never connects
    assert dbexec.pool_capacity(pg) == 15  # db.engine: 5 + 10 overflow
    dbexec.configure(min(dbexec.MAX_THREADS, dbexec.pool_capacity(pg) or dbexec.DEFAULT_THREADS))
    assert dbexec.max_workers() == 15


async def test_in_transaction_commits_or_rolls_back(db_session_factory: Factory) -> None:
    def add(session: Session, slot_no: int) -> int:
        session.add(ProviderSlot(provider="sandbox", slot_no=slot_no))
        session.flush()
        return slot_no

    assert await dbexec.in_transaction(db_session_factory, lambda s: add(s, 1)) == 1

    def add_then_fail(session: Session) -> None:
        add(session, 2)
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        await dbexec.in_transaction(db_session_factory, add_then_fail)
    with db_session_factory() as session:
        assert session.scalars(select(ProviderSlot.slot_no)).all() == [1]


async def test_a_write_waiting_for_the_sqlite_lock_does_not_block_the_loop(tmp_path: Path) -> None:
    """Another connection holds SQLite's write lock; our write waits for it in a thread while the loop goes on
    and is the one that lets the lock go."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    factory = session_factory(engine)
    blocker = make_engine(url, poolclass=NullPool).raw_connection()
    blocker.execute("BEGIN IMMEDIATE")
    entered = threading.Event()

    def write(session: Session) -> int:
        entered.set()
        session.execute(text("INSERT INTO t VALUES (1)"))
        return 1

    waiting = asyncio.create_task(dbexec.in_transaction(factory, write))
    assert await dbexec.run_db(entered.wait, WAIT_S)
    for _ in range(10):  # the loop runs on while the write waits for the lock
        await asyncio.sleep(0.01)
    assert not waiting.done()
    blocker.rollback()
    blocker.close()
    assert await asyncio.wait_for(waiting, WAIT_S) == 1
    engine.dispose()


async def test_a_cancelled_waiter_has_what_the_work_took_given_back() -> None:
    started = threading.Event()
    finish = threading.Event()
    given_back: Future[str] = Future()

    def take() -> str:
        started.set()
        finish.wait(WAIT_S)
        return "slot-7"

    future = dbexec.submit(take)
    waiter = asyncio.create_task(dbexec.finish_even_if_cancelled(future, given_back.set_result))
    assert await dbexec.run_db(started.wait, WAIT_S)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not given_back.done()  # the work is still running: nothing to give back yet
    finish.set()
    assert await asyncio.wait_for(asyncio.wrap_future(given_back), WAIT_S) == "slot-7"


async def test_queued_work_still_runs_and_gives_back_while_failed_work_gives_nothing() -> None:
    dbexec.configure(1)
    gate = threading.Event()
    cleanups: list[object] = []
    blocker = dbexec.submit(gate.wait, WAIT_S)  # holds the only thread: what follows queues

    def fail() -> str:
        raise RuntimeError("took nothing")

    queued = dbexec.submit(lambda: "taken later")
    failing = dbexec.submit(fail)
    waiters = [
        asyncio.create_task(dbexec.finish_even_if_cancelled(queued, cleanups.append)),
        asyncio.create_task(dbexec.finish_even_if_cancelled(failing, cleanups.append)),
    ]
    await asyncio.sleep(0.01)
    for waiter in waiters:
        waiter.cancel()
    for waiter in waiters:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    gate.set()
    blocker.result(WAIT_S)
    await dbexec.run_db(lambda: None)  # the queue has drained ...
    await dbexec.run_db(lambda: None)  # ... and the give-back it submitted has run
    assert not queued.cancelled()  # cancelling the waiter never abandons the work
    assert cleanups == ["taken later"]
