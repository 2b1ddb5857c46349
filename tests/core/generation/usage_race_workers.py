"""Worker processes for the usage ledger's races (spawned: they import this module, never the test module).

Each worker is a separate process with its own engine and several threads with a session each, so the ledger's
writes race across processes AND within one, as under several API workers. Every round is a trial of
tests/racing.py's harness: it starts at a barrier shared with the other workers, and every thread of a round is
released at once.

The `naive` variants are the read-then-write versions the ledger's single statements replace (test helpers
only): they show that the race tests can fail.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing
from core.generation import usage
from core.generation.usage import AttemptOutcome
from db.engine import make_engine, session_factory, transaction
from db.models import LATENCY_BUCKET_COLUMNS, Generation, UsageAttempt, UsageDailyRollup
from tests.racing import run_threads, run_trials

NAIVE_PAUSE_S = 0.002
"""Any work between a read and the write that depends on it: a network hop, a GC pause."""


def _factory(url: str, threads: int) -> sessionmaker[Session]:
    if url.startswith("postgresql"):
        return session_factory(make_engine(url, pool_size=min(threads, 8), max_overflow=0, pool_timeout=120))
    return session_factory(make_engine(url, pool_size=threads, max_overflow=0, pool_timeout=120))


def _run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """tests.racing.run_threads, with a thread's error as its result (reported to the parent, which fails the
    test with it)."""

    def guarded(i: int) -> Any:
        try:
            return work(i)
        except Exception as exc:
            return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    return run_threads(count, guarded)


# --- idempotent start -----------------------------------------------------------------------------------------


def naive_start(session: Session, key: str, fingerprint: str) -> tuple[bool, str]:
    """Look for the key, and insert when it is not there: two requests that both look first both insert."""
    scoped = usage.scoped_idempotency_key(None, key)
    existing = session.scalar(select(Generation.id).where(Generation.idempotency_key == scoped))
    if existing is not None:
        return False, existing
    time.sleep(NAIVE_PAUSE_S)
    row = Generation(
        idempotency_key=scoped, request_fingerprint=fingerprint, mode="live", prompt="p", request={},
        routing_policy="explicit", status="pending",
    )  # fmt: skip
    session.add(row)
    session.flush()
    return True, row.id


def start_same_keys(
    url: str, keys: list[str], threads: int, naive: bool, start: Barrier, done: Barrier, out: Queue[Any]
) -> None:
    """One trial per key: every thread of every worker starts a generation with that key at the same moment;
    each reports (key, (created, generation id) or an error)."""
    factory = _factory(url, threads)
    request = {"prompt": "a fox", "provider": "fal-qwen"}
    fingerprint = usage.request_fingerprint(request)

    def start_one(key: str, _thread: int) -> tuple[bool, str]:
        with transaction(factory) as session:
            if naive:
                return naive_start(session, key, fingerprint)
            started = usage.start_generation(
                session, user_id=None, prompt="a fox", request=request, routing_policy="explicit",
                requested_provider="fal-qwen", mode="live", estimated_micro_usd=20_972, idempotency_key=key,
                fingerprint=fingerprint, lease_owner=f"worker:{key}",
                lease_expires_at=datetime.now(UTC) + timedelta(hours=1),
            )  # fmt: skip
            return started.created, started.generation_id

    def trial(number: int) -> list[tuple[str, Any]]:
        key = keys[number]
        return [(key, r) for r in _run_threads(threads, functools.partial(start_one, key))]

    run_trials(len(keys), start, done, out, trial)


# --- finishing attempts ---------------------------------------------------------------------------------------


def naive_finish(session: Session, attempt_id: int, outcome: AttemptOutcome) -> bool:
    """Check that the attempt is unfinished, then write it and its rollup: both racers see it unfinished."""
    row = session.execute(
        select(UsageAttempt.finished_at, UsageAttempt.provider, UsageAttempt.user_id, UsageAttempt.mode,
               UsageAttempt.started_at, UsageAttempt.estimated_micro_usd).where(UsageAttempt.id == attempt_id)
    ).one()  # fmt: skip
    if row.finished_at is not None:
        return False
    time.sleep(NAIVE_PAUSE_S)
    session.execute(
        update(UsageAttempt)
        .where(UsageAttempt.id == attempt_id)
        .values(status=outcome.status, billing=Billing(outcome.billing).value,
                actual_micro_usd=outcome.actual_micro_usd, finished_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    keys = {
        "day": row.started_at.date(), "provider": row.provider, "user_id": row.user_id or 0, "mode": row.mode,
        "status": outcome.status, "error_class": outcome.error_class or "",
    }  # fmt: skip
    usage._add_to_rollup(
        session, keys, {"attempts": 1, "estimated_micro_usd": row.estimated_micro_usd,
                        "actual_micro_usd": outcome.actual_micro_usd or 0}
    )  # fmt: skip
    return True


def naive_rollup_finish(session: Session, attempt_id: int, outcome: AttemptOutcome) -> bool:
    """Read the attempt's rollup row, finish the attempt (with its guard), then write the row's new totals back
    (inserting it when it was missing): concurrent finishes overwrite each other's counts, or collide on the
    insert."""
    attempt = session.execute(
        select(UsageAttempt.provider, UsageAttempt.user_id, UsageAttempt.mode, UsageAttempt.started_at,
               UsageAttempt.estimated_micro_usd).where(UsageAttempt.id == attempt_id)
    ).one()  # fmt: skip
    key = {
        "day": attempt.started_at.date(), "provider": attempt.provider, "user_id": attempt.user_id or 0,
        "mode": attempt.mode, "status": outcome.status, "error_class": outcome.error_class or "",
    }  # fmt: skip
    rollup = session.execute(
        select(UsageDailyRollup).filter_by(**key).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    time.sleep(NAIVE_PAUSE_S)
    finished = session.execute(
        update(UsageAttempt)
        .where(UsageAttempt.id == attempt_id, UsageAttempt.finished_at.is_(None))
        .values(status=outcome.status, billing=Billing(outcome.billing).value, error_class=outcome.error_class,
                actual_micro_usd=outcome.actual_micro_usd, total_ms=outcome.total_ms,
                images_count=outcome.images_count, megapixels_micro=outcome.megapixels_micro,
                finished_at=datetime.now(UTC))
        .returning(UsageAttempt.id)
        .execution_options(synchronize_session=False)
    ).first()  # fmt: skip
    if finished is None:
        return False
    if rollup is None:
        rollup = UsageDailyRollup(**key, **{c: 0 for c in usage._COUNTER_COLUMNS})
        session.add(rollup)
    rollup.attempts += 1
    rollup.images += outcome.images_count
    rollup.megapixels_micro += outcome.megapixels_micro
    rollup.estimated_micro_usd += attempt.estimated_micro_usd
    rollup.actual_micro_usd += outcome.actual_micro_usd or 0
    rollup.unknown_billing += Billing(outcome.billing) is Billing.UNKNOWN
    if outcome.total_ms is not None:
        rollup.latency_sum_ms += outcome.total_ms
        column = LATENCY_BUCKET_COLUMNS[usage.latency_bucket(outcome.total_ms)]
        setattr(rollup, column, getattr(rollup, column) + 1)
    session.flush()
    return True


FINISHERS: dict[str, Callable[[Session, int, AttemptOutcome], bool]] = {
    "ledger": usage.finish_attempt,
    "naive_guard": naive_finish,
    "naive_rollup": naive_rollup_finish,
}


def finish_rounds(
    url: str,
    rounds: list[list[tuple[int, AttemptOutcome]]],
    finisher: str,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """One trial per round: one thread per (attempt, outcome), all finishing at once (the other workers are
    given the same attempts to race on them, or other attempts with the same rollup keys). Each thread reports
    (attempt id, True/False or an error, the status this worker would have written)."""
    finish = FINISHERS[finisher]
    factory = _factory(url, max(len(r) for r in rounds))

    def finish_one(work: list[tuple[int, AttemptOutcome]], i: int) -> bool:
        attempt_id, outcome = work[i]
        with transaction(factory) as session:
            return finish(session, attempt_id, outcome)

    def trial(number: int) -> list[tuple[int, Any, str]]:
        work = rounds[number]
        outcomes = _run_threads(len(work), functools.partial(finish_one, work))
        return [(a, won, outcome.status) for (a, outcome), won in zip(work, outcomes, strict=True)]

    run_trials(len(rounds), start, done, out, trial)


# --- lease take-over ------------------------------------------------------------------------------------------

NAIVE_TAKEOVER_PAUSE_S = 0.5
"""The naive take-over's pause between its check and its write: far wider than NAIVE_PAUSE_S because one
generation's racers are single threads in separate processes (one per process) and there is one trial, so the
window must cover how far apart the processes' reads land: each process starts 16 threads and runs 16 reads,
which on a loaded machine (2 cores, load average 8) spreads the processes over a hundred milliseconds and more;
on PostgreSQL half the threads also wait for a pooled connection. Measured (6 runs each): with 2 ms the
check-then-write take-over passed the test on both databases; with 50 ms one run took no generation twice on
PostgreSQL; with 100 ms one run took only 1 of 16 twice on SQLite."""


def _fill_pool(factory: sessionmaker[Session], threads: int) -> None:
    """Open the pool's connections before the race (the race has one trial): connecting inside it spreads the
    racers' start over tens of milliseconds, which the guarded take-over is not tested by and which lets the naive
    one pass."""
    pool_size = factory.kw["bind"].pool.size()
    sessions = [factory() for _ in range(min(threads, pool_size))]
    try:
        for session in sessions:
            session.execute(select(1))
    finally:
        for session in sessions:
            session.close()


def naive_take_over(session: Session, generation_id: str, *, lease_owner: str, lease_expires_at: datetime) -> bool:
    """Check that the generation is unfinished and its lease expired, then write the new owner: every racer that
    checked before the first write takes it over too."""
    row = session.execute(
        select(Generation.finished_at, Generation.lease_expires_at).where(Generation.id == generation_id)
    ).one()
    expires = row.lease_expires_at
    if row.finished_at is not None or (expires is not None and expires >= datetime.now(UTC)):
        return False
    time.sleep(NAIVE_TAKEOVER_PAUSE_S)
    session.execute(
        update(Generation)
        .where(Generation.id == generation_id)
        .values(lease_owner=lease_owner, lease_expires_at=lease_expires_at)
        .execution_options(synchronize_session=False)
    )
    return True


def take_over_all(
    url: str, generation_ids: list[str], naive: bool, owner: str, start: Barrier, done: Barrier, out: Queue[Any]
) -> None:
    """One trial: every thread tries to take over one of the (expired) generations at the same moment (with
    `naive_take_over` when `naive`); each reports (generation id, owner, True/False or an error)."""
    factory = _factory(url, len(generation_ids))
    _fill_pool(factory, len(generation_ids))
    take_over = naive_take_over if naive else usage.take_over_generation

    def take(i: int) -> bool:
        with transaction(factory) as session:
            return take_over(
                session, generation_ids[i], lease_owner=owner, lease_expires_at=datetime.now(UTC) + timedelta(hours=1)
            )

    def trial(_number: int) -> list[tuple[str, str, Any]]:
        return [
            (gid, owner, won) for gid, won in zip(generation_ids, _run_threads(len(generation_ids), take), strict=True)
        ]

    run_trials(1, start, done, out, trial)
