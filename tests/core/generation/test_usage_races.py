"""The usage ledger's races across real processes, on SQLite and PostgreSQL.

- Idempotent start: 4 processes x 4 threads start a generation with the same key at the same moment, for each
  of 12 keys: exactly one generation per key, and every caller is handed that one.
- Exactly-once finish: 2 processes finish the same attempts at the same moment (one as succeeded, the other as
  failed, 10 at once, 6 rounds): each attempt is finished by exactly one, its row holds the winner's outcome,
  and the rollups count it once.
- Rollup totals: 4 processes x 8 threads finish distinct attempts that share a few rollup rows (new rows each
  round, so the first inserts race too), 3 rounds: every rollup row equals the sum of its attempts.
- Lease take-over: 4 processes try to take over each of 16 generations whose lease expired, at the same
  moment: each is taken over by exactly one, and its row names that owner.
- Each race also runs a naive read-then-write version of the same step, which fails the same checks: the tests
  can fail.

Timings are printed (`pytest -s`) for the record; nothing here asserts a speed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing
from core.generation.usage import AttemptOutcome
from db.engine import transaction
from db.models import Generation, UsageAttempt, UsageDailyRollup
from tests.core.generation import usage_race_workers
from tests.core.generation.usage_fixtures import (
    assert_rollups_match_attempts,
    new_attempt,
    new_generation,
    seeded_price_ids,
)
from tests.racing import backend, race_trials, thread_results

Factory = sessionmaker[Session]


def _race(
    target: Callable[..., None],
    args: tuple[Any, ...],
    *,
    processes: int,
    trials: int,
    per_process: Callable[[int], tuple[Any, ...]] = lambda _worker: (),
) -> tuple[list[Any], float]:
    """Every thread's result of every trial (the workers report one result per thread), and the seconds the
    trials took (the slowest process's, per trial)."""
    per_trial = race_trials(
        target,
        args,
        processes=processes,
        trials=trials,
        observe=lambda _trial, _set_up, reports: (thread_results(reports), max(r["seconds"] for r in reports)),
        per_process=per_process,
    )
    return [result for results, _ in per_trial for result in results], sum(seconds for _, seconds in per_trial)


# --- idempotent start -----------------------------------------------------------------------------------------

START_PROCESSES, START_THREADS, START_KEYS = 4, 4, 12


def _start_race(db_url: str, naive: bool) -> list[tuple[str, Any]]:
    keys = [f"race-{i}" for i in range(START_KEYS)]
    results, _seconds = _race(
        usage_race_workers.start_same_keys,
        (db_url, keys, START_THREADS, naive),
        processes=START_PROCESSES,
        trials=START_KEYS,
    )
    return results


def test_concurrent_requests_with_one_key_make_one_generation(db_url: str, db_session_factory: Factory) -> None:
    results = _start_race(db_url, naive=False)
    errors = [r for _, r in results if isinstance(r, str)]
    assert errors == []
    created = Counter(key for key, (was_created, _) in results if was_created)
    handed_out: dict[str, set[str]] = {}
    for key, (_, generation_id) in results:
        handed_out.setdefault(key, set()).add(generation_id)
    assert len(results) == START_PROCESSES * START_THREADS * START_KEYS
    assert created == dict.fromkeys(handed_out, 1)  # exactly one creator per key
    assert all(len(ids) == 1 for ids in handed_out.values())  # and everyone got that generation
    with db_session_factory() as session:
        rows = dict(session.execute(select(Generation.idempotency_key, Generation.id)).tuples().all())
    assert rows == {f"0:{key}": ids.pop() for key, ids in handed_out.items()}
    print(f"[{backend(db_url)}] {len(results)} starts on {START_KEYS} keys: {len(rows)} generations")


def test_a_naive_look_then_insert_start_fails_the_same_race(db_url: str, db_session_factory: Factory) -> None:
    results = _start_race(db_url, naive=True)
    errors = [r for _, r in results if isinstance(r, str)]
    created = Counter(key for key, r in results if not isinstance(r, str) and r[0])
    print(f"[{backend(db_url)}] naive start: {len(errors)} callers crashed, {sum(created.values())} created")
    # Both looked, both inserted: the unique index stops the second, which crashes instead of getting the first.
    assert errors or any(count > 1 for count in created.values())


# --- exactly-once finish --------------------------------------------------------------------------------------

FINISH_ROUNDS, FINISH_PER_ROUND = 6, 10


def _outcome_of(worker: int, i: int) -> AttemptOutcome:
    if worker == 0:
        return AttemptOutcome(
            status="succeeded", billing=Billing.BILLED, actual_micro_usd=1_000 + i, images_count=1, total_ms=900 + i
        )
    return AttemptOutcome(
        status="failed", billing=Billing.NOT_BILLED, actual_micro_usd=0, error_class="timeout", total_ms=30_000 + i
    )


def _same_attempts_race(db_url: str, factory: Factory, finisher: str) -> tuple[list[Any], float, list[int]]:
    prices = seeded_price_ids(factory)
    with transaction(factory) as session:
        gen = new_generation(session)
        ids = [
            new_attempt(session, gen.generation_id, prices["fal-qwen"], attempt_no=n)
            for n in range(1, FINISH_ROUNDS * FINISH_PER_ROUND + 1)
        ]
    rounds = [ids[r * FINISH_PER_ROUND : (r + 1) * FINISH_PER_ROUND] for r in range(FINISH_ROUNDS)]
    results, seconds = _race(
        usage_race_workers.finish_rounds,
        (db_url,),
        processes=2,
        trials=FINISH_ROUNDS,
        per_process=lambda w: ([[(a, _outcome_of(w, i)) for i, a in enumerate(chunk)] for chunk in rounds], finisher),
    )
    return results, seconds, ids


def test_two_processes_finishing_the_same_attempts_finish_each_exactly_once(
    db_url: str, db_session_factory: Factory
) -> None:
    results, seconds, ids = _same_attempts_race(db_url, db_session_factory, "ledger")
    wins: Counter[int] = Counter()
    winner: dict[int, str] = {}
    for attempt_id, won, status in results:
        assert won in (True, False), won  # no errors
        if won:
            wins[attempt_id] += 1
            winner[attempt_id] = status
    assert wins == dict.fromkeys(ids, 1)
    with db_session_factory() as session:
        rows = {a.id: a for a in session.execute(select(UsageAttempt)).scalars()}
    for attempt_id in ids:  # the row holds the winner's outcome, not a mix
        assert rows[attempt_id].status == winner[attempt_id]
        assert (rows[attempt_id].error_class is None) == (winner[attempt_id] == "succeeded")
    assert_rollups_match_attempts(db_session_factory)
    with db_session_factory() as session:
        counted = session.scalar(select(func.sum(UsageDailyRollup.attempts)))
    assert counted == len(ids)
    split = Counter(winner.values())
    print(
        f"[{backend(db_url)}] {len(ids)} attempts raced by 2 processes: won {split['succeeded']} / {split['failed']}, "
        f"{seconds:.2f} s"
    )


def test_a_naive_check_then_finish_counts_attempts_twice(db_url: str, db_session_factory: Factory) -> None:
    results, _seconds, ids = _same_attempts_race(db_url, db_session_factory, "naive_guard")
    wins = sum(1 for _, won, _ in results if won is True)
    with db_session_factory() as session:
        counted = session.scalar(select(func.sum(UsageDailyRollup.attempts)))
    print(f"[{backend(db_url)}] naive finish: {wins} finishes of {len(ids)} attempts, rollups count {counted}")
    assert wins > len(ids) and counted is not None and counted > len(ids)


# --- rollup totals under concurrent finishes ------------------------------------------------------------------

ROLLUP_PROCESSES, ROLLUP_THREADS, ROLLUP_ROUNDS = 4, 8, 3


def _random_outcome(rng: random.Random) -> AttemptOutcome:
    kind = rng.choice(["ok", "ok", "unknown", "not_billed"])
    total_ms = rng.randint(1, 200_000)
    if kind == "ok":
        return AttemptOutcome(
            status="succeeded", billing=Billing.BILLED, actual_micro_usd=rng.randint(0, 90_000),
            images_count=rng.randint(1, 4), megapixels_micro=rng.randint(0, 4_000_000), total_ms=total_ms,
        )  # fmt: skip
    if kind == "unknown":
        return AttemptOutcome(
            status="failed", billing=Billing.UNKNOWN, actual_micro_usd=None, error_class="timeout", total_ms=total_ms
        )
    return AttemptOutcome(
        status="failed", billing=Billing.NOT_BILLED, actual_micro_usd=0, error_class="rate_limited", total_ms=total_ms
    )


def _distinct_attempts_race(db_url: str, factory: Factory, finisher: str) -> tuple[list[Any], float, int]:
    """Every attempt of a round started on that round's own day: its rollup rows do not exist yet."""
    prices = seeded_price_ids(factory)
    rng = random.Random(20261130)
    per_worker: list[list[list[tuple[int, AttemptOutcome]]]] = [[] for _ in range(ROLLUP_PROCESSES)]
    with transaction(factory) as session:
        for r in range(ROLLUP_ROUNDS):
            day = datetime(2026, 11, 10 + r, 12, tzinfo=UTC)
            gen = new_generation(session, now=day)
            n = 0
            for w in range(ROLLUP_PROCESSES):
                work = []
                for _ in range(ROLLUP_THREADS):
                    n += 1
                    attempt = new_attempt(
                        session, gen.generation_id, prices["fal-qwen"], attempt_no=n,
                        estimated_micro_usd=rng.randint(0, 90_000), now=day + timedelta(seconds=n),
                    )  # fmt: skip
                    work.append((attempt, _random_outcome(rng)))
                per_worker[w].append(work)
    results, seconds = _race(
        usage_race_workers.finish_rounds,
        (db_url,),
        processes=ROLLUP_PROCESSES,
        trials=ROLLUP_ROUNDS,
        per_process=lambda w: (per_worker[w], finisher),
    )
    return results, seconds, ROLLUP_PROCESSES * ROLLUP_THREADS * ROLLUP_ROUNDS


def test_rollups_equal_the_sum_of_attempts_finished_concurrently(db_url: str, db_session_factory: Factory) -> None:
    results, seconds, total = _distinct_attempts_race(db_url, db_session_factory, "ledger")
    outcomes = [won for _, won, _ in results]
    assert outcomes == [True] * total
    assert_rollups_match_attempts(db_session_factory)
    with db_session_factory() as session:
        rows = session.scalar(select(func.count()).select_from(UsageDailyRollup))
        counted = session.scalar(select(func.sum(UsageDailyRollup.attempts)))
    assert counted == total
    print(
        f"[{backend(db_url)}] {ROLLUP_PROCESSES}x{ROLLUP_THREADS} concurrent finishes x {ROLLUP_ROUNDS} rounds "
        f"into {rows} rollup rows: totals exact; {seconds:.2f} s"
    )


def _ledger_checks_hold(factory: Factory, outcomes: list[Any], total: int) -> bool:
    """What the ledger test asserts: every finish went through and every rollup equals its attempts."""
    if outcomes != [True] * total:
        return False
    try:
        assert_rollups_match_attempts(factory)
    except AssertionError:
        return False
    return True


def test_a_naive_read_then_write_rollup_fails_the_same_race(db_url: str, db_session_factory: Factory) -> None:
    results, _seconds, total = _distinct_attempts_race(db_url, db_session_factory, "naive_rollup")
    outcomes = [won for _, won, _ in results]
    errors = [won for won in outcomes if isinstance(won, str)]
    with db_session_factory() as session:
        counted = session.scalar(select(func.sum(UsageDailyRollup.attempts))) or 0
    print(f"[{backend(db_url)}] naive rollup: {total} finishes, rollups count {counted}, {len(errors)} crashed")
    print(sorted(Counter(e[:90] for e in errors).items()))
    assert not _ledger_checks_hold(db_session_factory, outcomes, total)


def test_the_naive_rollup_is_exact_without_concurrency(db_session_factory: Factory) -> None:
    """So the failure above is the race's doing, not a bookkeeping slip in the naive version."""
    prices = seeded_price_ids(db_session_factory)
    rng = random.Random(5)
    with transaction(db_session_factory) as session:
        gen = new_generation(session)
        ids = [new_attempt(session, gen.generation_id, prices["fal-qwen"], attempt_no=n) for n in range(1, 41)]
    outcomes = []
    for attempt_id in ids:
        with transaction(db_session_factory) as session:
            outcomes.append(usage_race_workers.naive_rollup_finish(session, attempt_id, _random_outcome(rng)))
    assert _ledger_checks_hold(db_session_factory, outcomes, len(ids))


# --- lease take-over ------------------------------------------------------------------------------------------

TAKEOVER_PROCESSES, TAKEOVER_GENERATIONS = 4, 16


def _take_over_race(db_url: str, factory: Factory, naive: bool) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Per expired generation, the owners that won its take-over (and the errors of racers that crashed), and
    its owner afterwards."""
    past = datetime.now(UTC) - timedelta(minutes=5)
    with transaction(factory) as session:
        ids = [
            new_generation(session, lease_owner="dead", lease_expires_at=past).generation_id
            for _ in range(TAKEOVER_GENERATIONS)
        ]
    results, _seconds = _race(
        usage_race_workers.take_over_all,
        (db_url, ids, naive),
        processes=TAKEOVER_PROCESSES,
        trials=1,
        per_process=lambda w: (f"recoverer-{w}",),
    )
    winners: dict[str, list[str]] = {gid: [] for gid in ids}
    for gid, owner, won in results:
        if won is not False:
            winners[gid].append(owner if won is True else won)
    with factory() as session:
        owners = dict(session.execute(select(Generation.id, Generation.lease_owner)).tuples().all())
    return winners, owners


def test_recovering_processes_take_over_each_expired_generation_exactly_once(
    db_url: str, db_session_factory: Factory
) -> None:
    winners, owners = _take_over_race(db_url, db_session_factory, naive=False)
    assert all(len(names) == 1 and names[0].startswith("recoverer-") for names in winners.values()), winners
    assert owners == {gid: names[0] for gid, names in winners.items()}


def test_a_naive_check_then_take_over_fails_the_same_race(db_url: str, db_session_factory: Factory) -> None:
    winners, _owners = _take_over_race(db_url, db_session_factory, naive=True)
    taken_twice = [names for names in winners.values() if sum(n.startswith("recoverer-") for n in names) > 1]
    errors = [n for names in winners.values() for n in names if not n.startswith("recoverer-")]
    print(
        f"[{backend(db_url)}] naive take-over: {len(taken_twice)} of {len(winners)} generations taken by more than "
        f"one owner, {len(errors)} racers crashed"
    )
    # Several racers saw the lease expired and each wrote itself in: more than one owner believes it holds it.
    assert taken_twice
