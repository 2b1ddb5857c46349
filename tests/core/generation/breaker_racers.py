"""Worker processes for the breaker races (spawned: they import this module, never the test module).

Each worker is a separate process with its own engine and several threads with a session each, so the breaker
row is fought over across processes AND within one, as under several API workers. Per trial, every thread
starts at once and reports what it got (the scaffolding is tests/racing.py's, shared with the other races).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.errors import ErrorClass
from core.generation import breaker
from core.generation.breaker import BreakerConfig, CircuitState, Transition
from db.engine import transaction
from db.models import CircuitStateRow
from tests.racing import run_threads, run_trials, worker_sessions

PROVIDER = "fal-qwen"
NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)

CONSECUTIVE = BreakerConfig(consecutive_failures=5, min_requests=100_000)
RATE = BreakerConfig(consecutive_failures=100_000, failure_rate_ppm=500_000, min_requests=8)
CONFIGS = {"consecutive": CONSECUTIVE, "rate": RATE}


# --- the naive versions this design replaces (test helpers only: they show the checks can fail) ---------------


def naive_record_failure(session: Session, config: BreakerConfig) -> Transition | None:
    """Read the count, decide in Python, write the result back: two failures that read the same count both
    "cross" the threshold and both open the breaker."""
    row = session.execute(
        select(CircuitStateRow.state, CircuitStateRow.consecutive_failures).where(CircuitStateRow.provider == PROVIDER)
    ).one()
    if row.state is not CircuitState.CLOSED:
        return None
    count = row.consecutive_failures + 1
    # Any work between the read and the write (a network hop, a GC pause); wide, so the race shows every run.
    time.sleep(0.05)
    opens = count >= config.consecutive_failures
    session.execute(
        update(CircuitStateRow)
        .where(CircuitStateRow.provider == PROVIDER)
        .values(consecutive_failures=count, state=CircuitState.OPEN if opens else CircuitState.CLOSED)
        .execution_options(synchronize_session=False)
    )
    return Transition.OPENED if opens else None


def naive_admit(session: Session, owner: str, now: datetime) -> str:
    """Read the state, and if a probe is due, take it with an unguarded write: every reader of the same state
    believes it is the one probe."""
    row = session.execute(
        select(CircuitStateRow.state, CircuitStateRow.next_probe_at, CircuitStateRow.probe_lease_until).where(
            CircuitStateRow.provider == PROVIDER
        )
    ).one()
    due = (row.state is CircuitState.OPEN and row.next_probe_at <= now) or (
        row.state is CircuitState.HALF_OPEN and row.probe_lease_until <= now
    )
    if not due:
        return "refused"
    time.sleep(0.05)
    session.execute(
        update(CircuitStateRow)
        .where(CircuitStateRow.provider == PROVIDER)
        .values(state=CircuitState.HALF_OPEN, probe_owner=owner, probe_lease_until=now + timedelta(minutes=1))
        .execution_options(synchronize_session=False)
    )
    return "probe"


# --- the worker -----------------------------------------------------------------------------------------------


def race(
    url: str,
    kind: str,
    trials: int,
    threads: int,
    per_thread: int,
    naive: bool,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """`kind`: "consecutive" / "rate" (each thread reports `per_thread` failures, judged by that config) or
    "admit" (each thread asks for the probe once)."""
    pid = os.getpid()
    config = CONFIGS.get(kind, CONSECUTIVE)
    with worker_sessions(url, threads) as factory:

        def outcomes(i: int) -> list[str | None]:
            got: list[str | None] = []
            for _k in range(per_thread):
                with transaction(factory) as session:
                    if naive:
                        result = naive_record_failure(session, config)
                    else:
                        result = breaker.record_failure(session, PROVIDER, ErrorClass.UNAVAILABLE, None, NOW, config)
                got.append(None if result is None else result.value)
            return got

        def admit(i: int) -> str:
            owner = f"{pid}:{i}"
            with transaction(factory) as session:
                if naive:
                    return naive_admit(session, owner, NOW)
                decision = breaker.admit(session, PROVIDER, owner, NOW, config)
            if decision.probe:
                return f"probe {owner}"
            return "pass" if decision.allowed else "refused"

        work: Callable[[int], Any] = admit if kind == "admit" else outcomes
        run_trials(trials, start, done, out, lambda _trial: run_threads(threads, work))
