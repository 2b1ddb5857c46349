"""Races between real processes on one database (SQLite or PostgreSQL): the scaffolding the race tests share.

The rules under test (one breaker opening, one alert per threshold, ...) are decided by the database, so the
races are between separate processes, each with its own engine and several threads with a session each, as
under several API workers. Per trial every thread of every process starts at once: a barrier across the
processes, then an event across one process's threads.

Parent side (the test): `race_trials` spawns the workers (each with its own arguments where they differ), sets up
each trial, releases them, collects one report per process (sampling the database meanwhile, if the race asks)
and lets the test read the database before the next trial; a worker that dies meanwhile fails the race at once
(`WorkerDied`, with its exit code). `stop` joins (or kills) workers a test runs itself.

Worker side (a module of worker functions; spawned processes import it, never the test module):
`worker_sessions` for the process's engine, `run_trials` for the per-trial loop, `run_threads` to release a
process's threads at once.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
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
REPORT_POLL_S = 0.05
"""How long the parent waits for a report before it checks that no worker has died."""
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
    returned, reports)` reads the outcome before the done barrier lets the workers on to the next trial.

    A worker that exits before the trials are over (it crashed, or its trial raised) fails the race at once with
    `WorkerDied`, naming its exit code: the parent does not wait out a barrier or a report that will never come.
    On any failure both barriers are aborted, so no worker waits forever; every worker is joined (or killed after
    JOIN_TIMEOUT_S) and a worker that did not exit cleanly fails the race."""
    start, done = SPAWN.Barrier(processes + 1), SPAWN.Barrier(processes + 1)
    queue = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=target, args=(*args, *per_process(worker), start, done, queue))
        for worker in range(processes)
    ]
    for worker in workers:
        worker.start()
    watchdog = _Watchdog(workers, (start, done))
    facts: list[Fact] = []
    try:
        for trial in range(trials):
            prepared = set_up(trial)
            watchdog.wait_at(start, f"at the start of trial {trial}")
            watching = None if watch is None else functools.partial(watch, trial, prepared)
            reports = _collect(queue, processes, watchdog, trial, watching)
            facts.append(observe(trial, prepared, reports))
            watchdog.wait_at(done, f"at the end of trial {trial}")
    except BaseException:
        start.abort()
        done.abort()
        raise
    finally:
        watchdog.close()
        stop(workers)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return facts


class WorkerDied(AssertionError):
    """A race's worker process exited while the trials were still running."""


class _Watchdog:
    """Watches the workers' exits from a thread of the parent. The first exit aborts the barriers (a dead worker
    never reaches them: the parent and the other workers would otherwise wait BARRIER_TIMEOUT_S); the parent,
    woken by the broken barrier or between polls of the report queue, then raises `WorkerDied`."""

    def __init__(self, workers: Sequence[BaseProcess], barriers: Sequence[Barrier]) -> None:
        self._workers = workers
        self._barriers = barriers
        self._wake, self._waker = multiprocessing.Pipe(duplex=False)
        self.first_dead: int | None = None
        """The index of the first worker seen to exit, once one has."""
        self._thread = threading.Thread(target=self._run, name="race-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sentinels = {worker.sentinel: index for index, worker in enumerate(self._workers)}
        ready = multiprocessing.connection.wait([self._wake, *sentinels])
        dead = [sentinels[s] for s in ready if isinstance(s, int) and s in sentinels]
        if not dead:
            return  # closed: the trials are over, workers exiting now are exiting on time
        self.first_dead = dead[0]
        for barrier in self._barriers:
            barrier.abort()

    def check(self, when: str) -> None:
        """Raise `WorkerDied` if a worker has exited."""
        if self.first_dead is None:
            return
        first = self._workers[self.first_dead]
        first.join(5)  # its sentinel fired: it is gone, let its exit code be collected
        others = [
            f"worker {index} {_how_it_exited(worker.exitcode)}"
            for index, worker in enumerate(self._workers)
            if index != self.first_dead and worker.exitcode is not None
        ]
        raise WorkerDied(
            f"worker {self.first_dead} (pid {first.pid}) {_how_it_exited(first.exitcode)} {when}"
            + (f"; then {', '.join(others)}" if others else "")
        )

    def wait_at(self, barrier: Barrier, when: str) -> None:
        """The parent's wait at a barrier; a worker's exit (which aborts the barrier) raises `WorkerDied`."""
        try:
            barrier.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            self.check(when)
            raise

    def close(self) -> None:
        self._waker.close()  # the watchdog's wait returns on the pipe's end
        self._thread.join()
        self._wake.close()


def _how_it_exited(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped responding"  # not expected: the caller names workers whose sentinel fired
    if exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _collect(
    queue: Queue[Any], count: int, watchdog: _Watchdog, trial: int, watch: Callable[[], None] | None
) -> list[Report]:
    """`count` reports, calling `watch()` (if any) before each poll of the queue; at most JOIN_TIMEOUT_S in all.
    The queue is polled in short waits so that a worker's exit fails the trial at once."""
    reports: list[Report] = []
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while len(reports) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(reports)} of {count} workers reported within {JOIN_TIMEOUT_S} s")
        if watch is not None:
            watch()
        try:
            reports.append(queue.get(timeout=REPORT_POLL_S if watch is None else WATCH_POLL_S))
        except Empty:
            watchdog.check(f"before reporting trial {trial} ({len(reports)} of {count} reports in)")
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
