"""Worker processes for the budget races (spawned: they import this module, never the test module).

Each worker is a separate process with its own engine, running many threads with a session each, so the
reservations race across processes AND within one, as under several API workers (the scaffolding is
tests/racing.py's, shared with the other races).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, BudgetExceeded
from core.generation import budgets
from core.generation.budgets import Reservation, SpendMode
from db.engine import make_engine, session_factory, transaction
from db.models import BudgetPeriod
from tests.racing import run_threads, run_trials

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Trial:
    budget_id: int
    period_id: int
    amounts: tuple[int, ...]
    """This worker's share: one reservation per amount, each in its own thread, all released at once."""


def _factory(url: str, threads: int) -> sessionmaker[Session]:
    # A bounded pool, as in production: the threads still race, on at most `threads` connections per process.
    if url.startswith("postgresql"):
        return session_factory(make_engine(url, pool_size=min(threads, 8), max_overflow=0, pool_timeout=120))
    return session_factory(make_engine(url, pool_size=threads, max_overflow=0, pool_timeout=120))


def naive_reserve(session: Session, period_id: int, limit: int, amount: int) -> bool:
    """The read-then-write version this design replaces (test helper only): check in Python, then write the
    total back. Two requests that read the same figures both "fit", and one write overwrites the other."""
    spent, reserved = session.execute(
        select(BudgetPeriod.spent_micro_usd, BudgetPeriod.reserved_micro_usd).where(BudgetPeriod.id == period_id)
    ).one()
    if spent + reserved + amount > limit:
        return False
    time.sleep(0.002)  # any work between the read and the write: a network hop, a GC pause
    session.execute(
        update(BudgetPeriod)
        .where(BudgetPeriod.id == period_id)
        .values(reserved_micro_usd=reserved + amount)
        .execution_options(synchronize_session=False)
    )
    return True


def reserve_then_settle(
    url: str, trials: list[Trial], naive: bool, start: Barrier, done: Barrier, out: Queue[Any]
) -> None:
    """Two harness trials per budget trial. Even ones (phase 1): every thread reserves its amount at once; the
    parent checks the figures. Odd ones (phase 2): every winner of phase 1 settles (most) or releases (every
    fourth) at once, while the parent samples the figures (the naive version stops after phase 1)."""
    threads = max(len(t.amounts) for t in trials)
    factory = _factory(url, threads)
    with factory() as session:
        budget_views = {t.budget_id: budgets.get_budget(session, t.budget_id) for t in trials}
    won: list[tuple[int, Any]] = []
    """Phase 1's winners, as (index of the amount, reservation), for phase 2 to close."""

    def reserve_one(trial: Trial, i: int) -> tuple[Any, float]:
        amount, budget = trial.amounts[i], budget_views[trial.budget_id]
        began = time.perf_counter()
        try:
            with transaction(factory) as session:
                if naive:
                    reserved: Reservation | bool | None = naive_reserve(
                        session, trial.period_id, budget.limit_micro_usd, amount
                    )
                else:
                    reserved = budgets.reserve(session, [budget], amount, SpendMode.LIVE, None, HOUR).reservation
        except BudgetExceeded:
            reserved = None
        return reserved, time.perf_counter() - began

    def close_one(trial: Trial, k: int) -> int:
        i, reservation = won[k]
        with transaction(factory) as session:
            if k % 4 == 3:
                budgets.release(session, reservation)
                return 0
            actual = trial.amounts[i] - (i % 3)  # at most the estimate: the limit must then hold throughout
            budgets.settle(session, reservation, actual, Billing.BILLED)
            return actual

    def phase(number: int) -> dict[str, Any]:
        trial = trials[number // 2]
        if number % 2 == 0:
            phase1 = run_threads(len(trial.amounts), functools.partial(reserve_one, trial))
            won[:] = [(i, r) for i, (r, _) in enumerate(phase1) if r]
            return {
                "won": [trial.amounts[i] for i, _ in won],
                "refused": sum(1 for r, _ in phase1 if not r),
                "latencies": [s for _, s in phase1],
            }
        settled = [] if naive else run_threads(len(won), functools.partial(close_one, trial))
        return {"settled_actuals": settled}

    run_trials(2 * len(trials), start, done, out, phase)


def settle_all(
    url: str,
    reservations: list[Reservation],
    actuals: list[int],
    action: str,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """Close the same reservations as another process at the same moment: `settle` (billed), `release`, or
    `expire` (sweeps with a clock past every expiry, until nothing is left); one trial, reporting
    {"action", "closed"}."""
    factory = _factory(url, 1)

    def close_all(_trial: int) -> dict[str, Any]:
        if action == "expire":
            later = datetime.now(UTC) + 2 * HOUR
            total = 0
            while True:
                with transaction(factory) as session:
                    count = budgets.expire_stale(session, later, limit=5)
                total += count
                if count == 0:
                    return {"action": action, "closed": [total]}
        closed: list[int] = []
        for reservation, actual in zip(reservations, actuals, strict=True):
            with transaction(factory) as session:
                if action == "settle":
                    outcome = budgets.settle(session, reservation, actual, Billing.BILLED)
                else:
                    outcome = budgets.release(session, reservation)
            closed.append(outcome.closed)
        return {"action": action, "closed": closed}

    run_trials(1, start, done, out, close_all)
