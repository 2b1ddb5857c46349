"""Budget races across real processes, on SQLite and PostgreSQL.

- 4 processes x 25, 50 and 100 threads reserve at the same moment against one budget whose limit fits only some of them,
  several trials: never one micro-dollar over the limit; after every winner settles or releases (again all at
  once), reserved is 0 and spent is the sum of the settled actual costs.
- The same harness with a naive read-then-write reservation overspends: the checks can fail.
- Two processes settling (or releasing / expiring) the same reservations count each exactly once.

Timings and counts are printed (`pytest -s`) for the record; nothing here asserts a speed.
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.generation import budgets
from core.generation.budgets import BudgetView, Reservation, SpendMode
from core.security import Actor
from db.engine import transaction
from db.models import BudgetReservation, ReservationStatus, Role, User
from tests.core.generation import race_workers
from tests.core.generation.race_workers import Trial
from tests.racing import Report, backend, race_trials

PROCESSES = 4
TRIAL_THREADS = (25, 50, 100)
"""Concurrent reservations per process, one trial each."""
Factory = sessionmaker[Session]


def _admin(factory: Factory) -> Actor:
    with transaction(factory) as session:
        row = User(username="admin", password_hash="not-a-real-hash", role=Role.ADMIN)
        session.add(row)
        session.flush()
        return Actor(row.id, row.username, Role.ADMIN)


def _budget(factory: Factory, actor: Actor, name: str, limit: int) -> tuple[BudgetView, int]:
    """A budget and the id of its current period (opened by a zero reservation, for the naive helper)."""
    with transaction(factory) as session:
        budget = budgets.create_budget(
            session, actor, name=name, scope="global", period="monthly", limit_micro_usd=limit
        )
        opened = budgets.reserve(session, [budget], 0, SpendMode.LIVE, None, timedelta(hours=1))
        budgets.release(session, opened.reservation)
    return budget, opened.reservation.holds[0].period_id


def _figures(factory: Factory, budget: BudgetView) -> tuple[int, int]:
    with factory() as session:
        figures = budgets.current_figures(session, budget.id)
    return figures.spent_micro_usd, figures.reserved_micro_usd


def _race(db_url: str, factory: Factory, *, naive: bool, trial_threads: tuple[int, ...]) -> list[dict[str, Any]]:
    """Run the reserve-then-settle race; return per-trial facts for the checks and the record.

    Each budget trial is two harness trials (see `race_workers.reserve_then_settle`): phase 1 reserves, phase 2
    settles or releases the winners while the parent samples the figures."""
    actor = _admin(factory)
    rng = random.Random(20261128)
    plans: list[tuple[BudgetView, int, list[list[int]]]] = []
    for t, threads in enumerate(trial_threads):
        shares = [[rng.randint(1_000, 50_000) for _ in range(threads)] for _ in range(PROCESSES)]
        limit = sum(map(sum, shares)) * 2 // 5  # room for about 40 % of what is asked
        budget, period_id = _budget(factory, actor, f"race {t}", limit)
        plans.append((budget, period_id, shares))
    facts: list[dict[str, Any]] = []

    def sample(number: int, peak: list[int]) -> None:
        """While the winners settle and release: spent + reserved never passes the limit."""
        if number % 2:
            spent, reserved = _figures(factory, plans[number // 2][0])
            peak[:] = [max(peak[0], spent + reserved), peak[1] + 1]

    def observe(number: int, peak: list[int], reports: list[Report]) -> None:
        budget, _period_id, shares = plans[number // 2]
        if number % 2 == 0:
            spent, reserved = _figures(factory, budget)
            won = [a for r in reports for a in r["results"]["won"]]
            facts.append(
                {
                    "limit": budget.limit_micro_usd,
                    "asked": PROCESSES * len(shares[0]),
                    "won": len(won),
                    "refused": sum(r["results"]["refused"] for r in reports),
                    "won_sum": sum(won),
                    "spent": spent,
                    "reserved": reserved,
                    "phase1_s": max(r["seconds"] for r in reports),
                    "p50_ms": statistics.median(s for r in reports for s in r["results"]["latencies"]) * 1000,
                    "max_ms": max(s for r in reports for s in r["results"]["latencies"]) * 1000,
                }
            )
            return
        fact = facts[-1]
        fact["phase2_peak"], fact["phase2_samples"] = peak
        fact["phase2_s"] = max(r["seconds"] for r in reports)
        fact["settled_sum"] = sum(a for r in reports for a in r["results"]["settled_actuals"])
        fact["final"] = _figures(factory, budget)

    race_trials(
        race_workers.reserve_then_settle,
        (db_url,),
        processes=PROCESSES,
        trials=2 * len(plans),
        set_up=lambda _number: [0, 0],  # phase 2's peak of spent + reserved, and how many samples it took
        observe=observe,
        per_process=lambda w: ([Trial(b.id, p, tuple(shares[w])) for b, p, shares in plans], naive),
        watch=sample,
    )
    return facts


def test_concurrent_reservations_never_overspend_and_settle_exactly(db_url: str, db_session_factory: Factory) -> None:
    began = time.perf_counter()
    facts = _race(db_url, db_session_factory, naive=False, trial_threads=TRIAL_THREADS)
    for fact in facts:
        print(
            f"[{backend(db_url)}] {PROCESSES}x{fact['asked'] // PROCESSES} reservations: {fact['won']} won, "
            f"{fact['refused']} refused; "
            f"held {fact['reserved']} of limit {fact['limit']} (left {fact['limit'] - fact['reserved']}); "
            f"phase 1 {fact['phase1_s']:.2f} s (p50 {fact['p50_ms']:.1f} ms, max {fact['max_ms']:.0f} ms), "
            f"settle/release {fact['phase2_s']:.2f} s (peak spent+reserved {fact['phase2_peak']} in "
            f"{fact['phase2_samples']} samples)"
        )
        # Phase 1: exactly what the winners asked for is held, and it is within the limit.
        assert fact["spent"] == 0
        assert fact["reserved"] == fact["won_sum"] <= fact["limit"]
        assert fact["won"] + fact["refused"] == fact["asked"]
        assert 0 < fact["won"] < fact["asked"]  # the limit fitted only some of them
        # Phase 2: within the limit throughout; then nothing left held, and spent is exactly what was settled.
        assert fact["phase2_peak"] <= fact["limit"]
        assert fact["final"] == (fact["settled_sum"], 0)
    with db_session_factory() as session:
        open_rows = session.scalar(
            select(func.count())
            .select_from(BudgetReservation)
            .where(BudgetReservation.status.in_([ReservationStatus.RESERVED, ReservationStatus.HELD]))
        )
    assert open_rows == 0
    print(f"[{backend(db_url)}] {len(TRIAL_THREADS)} trials in {time.perf_counter() - began:.1f} s")


def test_a_naive_read_then_write_reservation_would_overspend(db_url: str, db_session_factory: Factory) -> None:
    """The checks above can fail: a read-then-write reservation, raced the same way, holds more than the limit
    or loses holds (the figures no longer add up)."""
    (fact,) = _race(db_url, db_session_factory, naive=True, trial_threads=(25,))
    print(
        f"[{backend(db_url)}] naive read-then-write: {fact['won']} won for {fact['won_sum']} against limit "
        f"{fact['limit']} (over by {max(0, fact['won_sum'] - fact['limit'])}); the row says {fact['reserved']} "
        f"reserved, {fact['won_sum'] - fact['reserved']} lost"
    )
    assert fact["won_sum"] > fact["limit"] or fact["reserved"] != fact["won_sum"]


def _reservations(factory: Factory, count: int) -> tuple[BudgetView, list[Reservation], list[int]]:
    actor = _admin(factory)
    budget, _ = _budget(factory, actor, "exactly once", 10**9)
    reservations = []
    with transaction(factory) as session:
        for i in range(count):
            admission = budgets.reserve(session, [budget], 1_000 + i, SpendMode.LIVE, None, timedelta(hours=1))
            reservations.append(admission.reservation)
    return budget, reservations, [900 + i for i in range(count)]


def _two_processes(db_url: str, jobs: list[tuple[str, list[Reservation], list[int]]]) -> list[dict[str, Any]]:
    """One process per job (action, reservations, actuals), all closing at the same moment; their reports,
    by action."""
    (reports,) = race_trials(
        race_workers.settle_all,
        (db_url,),
        processes=len(jobs),
        trials=1,
        observe=lambda _trial, _set_up, reports: [{**r["results"], "seconds": r["seconds"]} for r in reports],
        per_process=lambda w: (jobs[w][1], jobs[w][2], jobs[w][0]),
    )
    return sorted(reports, key=lambda r: str(r["action"]))


def test_two_processes_settling_the_same_reservations_count_each_once(db_url: str, db_session_factory: Factory) -> None:
    count = 60
    budget, reservations, actuals = _reservations(db_session_factory, count)
    first, second = _two_processes(db_url, [("settle", reservations, actuals)] * 2)
    per_reservation = [a + b for a, b in zip(first["closed"], second["closed"], strict=True)]
    print(
        f"[{backend(db_url)}] settle x2 on {count} reservations: {sum(first['closed'])} + "
        f"{sum(second['closed'])} closed in {max(first['seconds'], second['seconds']):.2f} s"
    )
    assert per_reservation == [1] * count
    assert _figures(db_session_factory, budget) == (sum(actuals), 0)


def test_release_racing_the_expiry_sweep_gives_back_each_estimate_once(
    db_url: str, db_session_factory: Factory
) -> None:
    count = 60
    budget, reservations, actuals = _reservations(db_session_factory, count)
    expire, release = _two_processes(db_url, [("release", reservations, actuals), ("expire", [], [])])
    print(
        f"[{backend(db_url)}] release vs expiry sweep on {count} reservations: {sum(release['closed'])} released, "
        f"{expire['closed'][0]} expired"
    )
    assert sum(release["closed"]) + expire["closed"][0] == count
    assert _figures(db_session_factory, budget) == (0, 0)
    with db_session_factory() as session:
        statuses = session.scalars(select(BudgetReservation.status).where(BudgetReservation.amount_micro_usd > 0)).all()
    assert set(statuses) <= {ReservationStatus.EXPIRED, ReservationStatus.RELEASED}
    assert len(statuses) == count
