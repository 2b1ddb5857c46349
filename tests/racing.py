"""Races between real processes on one database (SQLite or PostgreSQL): the scaffolding the race tests share.

The rules under test (one breaker opening, one alert per threshold, ...) are decided by the database, so the
races are between separate processes, each with its own engine and several threads with a session each, as
under several API workers. Per trial every thread of every process starts at once: a barrier across the
processes, then an event across one process's threads.

Parent side (the test): `race_trials` spawns the workers (each with its own arguments where they differ), sets up
each trial, releases them, collects one report per process (sampling the database meanwhile, if the race asks)
and lets the test read the database before the next trial. `stop` joins (or kills) workers a test runs itself.

Worker side (a module of worker functions; spawned processes import it, never the test module):
`worker_sessions` for the process's engine, `run_trials` for the per-trial loop, `run_threads` to release a
process's threads at once.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from queue import Empty
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory

BARRIER_TIMEOUT_S = 90
"""How long a process waits at a barrier for the others (a stuck one fails the race instead of hanging it)."""
JOIN_TIMEOUT_S = 120
"""How long the parent waits for a report, and for each process to exit before it is killed."""
WATCH_POLL_S = 0.002
"""How long the parent waits for a report between two `watch` samples (short: the samples are the point)."""
SPAWN = multiprocessing.get_context("spawn")
"""Spawned, not forked: a fresh interpreter per worker, with no engine or connection inherited from the test."""

SetUp = TypeVar("SetUp")
Fact = TypeVar("Fact")
Report = dict[str, Any]
"""What a worker puts on the queue per trial (see `run_trials`)."""


# --- parent side ------------------------------------------------------------------------------------------------


def race_trials(
    target: Callable[..., None],
    args: tuple[Any, ...],
    *,
    processes: int,
    trials: int,
    # Without a set-up SetUp is None; mypy cannot tie a default to the type variable, hence the ignore.
    set_up: Callable[[int], SetUp] = lambda _trial: None,  # type: ignore[assignment,return-value]
    observe: Callable[[int, SetUp, list[Report]], Fact],
    per_process: Callable[[int], tuple[Any, ...]] = lambda _worker: (),
    watch: Callable[[int, SetUp], None] | None = None,
) -> list[Fact]:
    """Run `processes` spawned workers `target(*args, *per_process(worker), start, done, out)` (which call
    `run_trials` with `trials`) and return `observe`'s fact per trial.

    Per trial: `set_up(trial)` prepares the database while the workers wait; the start barrier releases them all
    at once; the parent takes one report per process (calling `watch(trial, what set_up returned)` between polls
    of the queue, when given, to sample the database while the race runs), then `observe(trial, what set_up
    returned, reports)` reads the outcome before the done barrier lets the workers on to the next trial. On any
    failure both barriers are aborted, so no worker waits forever; every worker is joined (or killed after
    JOIN_TIMEOUT_S) and a worker that did not exit cleanly fails the race."""
    start, done = SPAWN.Barrier(processes + 1), SPAWN.Barrier(processes + 1)
    queue = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=target, args=(*args, *per_process(worker), start, done, queue))
        for worker in range(processes)
    ]
    for worker in workers:
        worker.start()
    facts: list[Fact] = []
    try:
        for trial in range(trials):
            prepared = set_up(trial)
            start.wait(BARRIER_TIMEOUT_S)
            if watch is None:
                reports = [queue.get(timeout=JOIN_TIMEOUT_S) for _ in range(processes)]
            else:
                reports = _collect_watching(queue, processes, functools.partial(watch, trial, prepared))
            facts.append(observe(trial, prepared, reports))
            done.wait(BARRIER_TIMEOUT_S)
    except BaseException:
        start.abort()
        done.abort()
        raise
    finally:
        stop(workers)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return facts


def _collect_watching(queue: Queue[Any], count: int, watch: Callable[[], None]) -> list[Report]:
    """`count` reports, calling `watch()` before each poll of the queue; at most JOIN_TIMEOUT_S in all."""
    reports: list[Report] = []
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while len(reports) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(reports)} of {count} workers reported within {JOIN_TIMEOUT_S} s")
        watch()
        try:
            reports.append(queue.get(timeout=WATCH_POLL_S))
        except Empty:
            continue
    return reports


def stop(workers: Sequence[BaseProcess]) -> None:
    """Join every worker, killing one that has not exited after JOIN_TIMEOUT_S (the caller checks exit codes
    where a clean exit is part of the race)."""
    for worker in workers:
        worker.join(JOIN_TIMEOUT_S)
        if worker.exitcode is None:
            worker.kill()
            worker.join()


def backend(db_url: str) -> str:
    """The database's name, for the lines a race prints and its failure messages."""
    return "postgresql" if db_url.startswith("postgresql") else "sqlite"


def thread_results(reports: list[Report]) -> list[Any]:
    """Every thread's result of one trial, all processes together."""
    return [result for report in reports for result in report["results"]]


# --- worker side ------------------------------------------------------------------------------------------------


@contextmanager
def worker_sessions(url: str, pool_size: int, *, max_overflow: int = 0) -> Iterator[sessionmaker[Session]]:
    """The worker process's own engine, disposed at the end. A bounded pool, as in production: with one
    connection per thread the threads race in the database, not for a connection."""
    engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=120)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def run_trials(trials: int, start: Barrier, done: Barrier, out: Queue[Any], trial: Callable[[int], Any]) -> None:
    """The worker's loop, in step with `race_trials`: per trial wait for the start barrier, run `trial(number)`
    and report {"trial", "pid", "results": what it returned, "seconds"}, then wait for the done barrier."""
    pid = os.getpid()
    for number in range(trials):
        start.wait(BARRIER_TIMEOUT_S)
        began = time.perf_counter()
        outcome = trial(number)
        out.put({"trial": number, "pid": pid, "results": outcome, "seconds": time.perf_counter() - began})
        done.wait(BARRIER_TIMEOUT_S)


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` in `count` threads released at once by one event; their results in thread order."""
    outcomes: list[Any] = [None] * count
    go = threading.Event()

    def run(i: int) -> None:
        go.wait()
        outcomes[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()
    return outcomes
