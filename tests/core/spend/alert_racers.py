"""Worker processes for the alert races (spawned: they import this module, never the test module).

Each process has its own engine and several threads with a session each. Per trial, every thread starts at once
(the scaffolding is tests/racing.py's, shared with the other races), adds its share of spend to the trial's
period (one atomic UPDATE, as settlement does) unless the parent already filled it, then runs a detection pass,
and reports the alert ids its pass created (or the error it met).
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.spend import alerts
from db.engine import transaction
from db.models import AlertEvent, BudgetPeriod
from tests.racing import run_threads, run_trials, worker_sessions

NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def naive_detect(session: Session, period_id: int, thresholds: tuple[int, ...]) -> list[int]:
    """Check whether the alert exists, then insert it (no ON CONFLICT): the way this design replaces. Two
    processes that both find nothing both insert, and the unique index fails the later pass."""
    created: list[int] = []
    for threshold in thresholds:
        key = f"budget:{period_id}:{threshold}"
        if session.scalar(select(AlertEvent.id).where(AlertEvent.dedupe_key == key)) is not None:
            continue
        time.sleep(0.05)  # any work between the check and the insert
        event = AlertEvent(kind="budget_threshold", dedupe_key=key, title=key, fired_at=NOW)
        session.add(event)
        session.flush()
        created.append(event.id)
    return created


def race(
    url: str,
    trials: int,
    threads: int,
    shares: tuple[int, ...],
    naive: bool,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """In trial t each thread adds `shares[t]` micro-dollars to the trial's period (0: the parent filled it),
    then detects."""
    with worker_sessions(url, threads) as factory:

        def work(share: int, _thread: int) -> dict[str, Any]:
            try:
                with factory() as session:
                    period_id = int(session.scalar(select(func.max(BudgetPeriod.id))) or 0)
                if share:
                    with transaction(factory) as session:
                        session.execute(
                            update(BudgetPeriod)
                            .where(BudgetPeriod.id == period_id)
                            .values(spent_micro_usd=BudgetPeriod.spent_micro_usd + share)
                            .execution_options(synchronize_session=False)
                        )
                with transaction(factory) as session:
                    if naive:
                        created = naive_detect(session, period_id, alerts.DEFAULT_THRESHOLDS)
                    else:
                        created = alerts.detect_budget_alerts(session, NOW)
                return {"created": created, "error": None}
            except Exception as error:  # reported to the parent, which asserts on it
                return {"created": [], "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}

        run_trials(trials, start, done, out, lambda trial: run_threads(threads, functools.partial(work, shares[trial])))


def deliver(url: str, passes: int, start: Barrier, done: Barrier, out: Queue[Any]) -> None:
    """`passes` delivery passes running at once in this process (as several worker loops would), in one trial;
    reports {"attempted": how many deliveries each pass attempted, "error"}."""
    import asyncio

    import httpx

    from core.spend.delivery import deliver_due

    with worker_sessions(url, 4, max_overflow=4) as factory:

        async def run() -> list[int]:
            async with httpx.AsyncClient(trust_env=False) as client:
                return list(await asyncio.gather(*(deliver_due(factory, client, limit=7) for _ in range(passes))))

        def passes_at_once(_trial: int) -> dict[str, Any]:
            try:
                return {"attempted": asyncio.run(run()), "error": None}
            except Exception as error:  # reported to the parent, which asserts on it
                return {"attempted": [], "error": f"{type(error).__name__}: {error}"}

        run_trials(1, start, done, out, passes_at_once)
