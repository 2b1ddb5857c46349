"""Provider slots across real processes, on SQLite and PostgreSQL.

- 4 processes x 8 asyncio tasks, 3 rounds, compete for a limit of 3: a sampler reading the table never sees more
  than 3 live holders, the holders' own intervals never overlap more than 3 deep (and do reach 3: the limit
  was contended), every task got its slot, and at the end every slot is free and no waiter is left.
- A holder killed with SIGKILL keeps its slot until its lease lapses, then the slot comes back by itself.
- A waiter killed with SIGKILL stops blocking the queue once its waiter lease lapses.
- Fairness across processes: user A holds all 3 slots with 20 more requests queued in one process, user B has 1
  queued in another; the next free slot goes to B.
- The same race with a naive take (count the slots in use, then write a free one if under the limit: two steps,
  limits_workers.naive_take) lets more than 3 holders be in flight at once: the checks can fail. Its table
  samples never exceed 3 (the rows are the slots); the holders' own intervals are what catch it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.generation import limits
from db.engine import transaction
from tests.core.generation import limits_workers
from tests.core.generation.limits_workers import PROVIDER
from tests.racing import JOIN_TIMEOUT_S, SPAWN, Report, backend, race_trials, stop

Factory = sessionmaker[Session]
PROCESSES = 4
TASKS = 8
ROUNDS = 3
LIMIT = 3


def _get(queue: Any, timeout: float = JOIN_TIMEOUT_S) -> dict[str, Any]:
    try:
        message: dict[str, Any] = queue.get(timeout=timeout)
    except Empty:
        pytest.fail(f"no message from a worker within {timeout} s")
    return message


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    depth = deepest = 0
    for _, step in events:  # at equal times the end (-1) sorts first: touching intervals do not overlap
        depth += step
        deepest = max(deepest, depth)
    return deepest


@dataclass(frozen=True)
class Round:
    """What one round of the race showed."""

    intervals: list[tuple[float, float]]
    """Every task's hold: (taken, given back) on `time.monotonic()`."""
    slot_numbers: set[int]
    samples: list[int]
    """How many live holders the table showed, sampled while the round ran."""

    @property
    def overlap(self) -> int:
        return _max_overlap(self.intervals)


def _race(db_url: str, factory: Factory, *, naive: bool) -> list[Round]:
    """ROUNDS rounds of PROCESSES x TASKS tasks competing for LIMIT slots (with `naive_take` when `naive`); every
    task must get its slot, without an error."""
    label = f"{backend(db_url)}{' naive' if naive else ''}"

    def sample(_round_no: int, samples: list[int]) -> None:
        """While the round runs: how many live holders the table shows."""
        with factory() as session:
            samples.append(len(limits.holders(session, PROVIDER)))

    def observe(round_no: int, samples: list[int], reports: list[Report]) -> Round:
        errors = [r["results"]["error"] for r in reports if "error" in r["results"]]
        assert not errors, errors
        held = Round(
            intervals=[(taken, back) for r in reports for taken, back, _ in r["results"]["intervals"]],
            slot_numbers={n for r in reports for _, _, n in r["results"]["intervals"]},
            samples=samples,
        )
        print(
            f"[{label}] round {round_no}: {len(held.intervals)} holds, {len(samples)} table samples, "
            f"max sampled {max(samples)}, max overlap {held.overlap}"
        )
        assert len(held.intervals) == PROCESSES * TASKS
        return held

    return race_trials(
        limits_workers.compete,
        (db_url, TASKS, LIMIT, ROUNDS, naive),
        processes=PROCESSES,
        trials=ROUNDS,
        set_up=lambda _round_no: [],  # the round's samples of the table
        observe=observe,
        per_process=lambda worker: (worker,),
        watch=sample,
    )


def test_four_processes_never_hold_more_than_the_limit(db_url: str, db_session_factory: Factory) -> None:
    began = time.monotonic()
    rounds = _race(db_url, db_session_factory, naive=False)
    for held in rounds:
        assert max(held.samples) <= LIMIT
        assert held.overlap <= LIMIT
        assert held.slot_numbers <= set(range(LIMIT))
    assert max(held.overlap for held in rounds) == LIMIT  # the limit was really contended: the checks could fail
    with db_session_factory() as session:
        assert limits.holders(session, PROVIDER) == []
        assert limits.waiters(session, PROVIDER) == []
        rows = session.execute(limits._slots.select().where(limits._slots.c.provider == PROVIDER)).all()
    assert len(rows) == LIMIT
    assert all(row.holder is None for row in rows)
    print(f"[{backend(db_url)}] {ROUNDS} rounds in {time.monotonic() - began:.1f} s")


def test_a_naive_count_then_take_would_hold_more_than_the_limit(db_url: str, db_session_factory: Factory) -> None:
    """The checks above can fail: takers that count the slots in use and then write a free one in a second step,
    raced the same way, are more than LIMIT in flight at once in at least one round."""
    began = time.monotonic()
    rounds = _race(db_url, db_session_factory, naive=True)
    over = [held.overlap for held in rounds if held.overlap > LIMIT]
    print(
        f"[{backend(db_url)}] naive count-then-take: {len(over)} of {ROUNDS} rounds over the limit of {LIMIT} "
        f"(max overlaps {[held.overlap for held in rounds]}), {time.monotonic() - began:.1f} s"
    )
    assert over, [held.overlap for held in rounds]


def test_a_killed_holder_frees_its_slot_after_its_lease(db_url: str, db_session_factory: Factory) -> None:
    lease_s = 4.0
    out = SPAWN.Queue()
    doomed = SPAWN.Process(target=limits_workers.hold_until_killed, args=(db_url, lease_s, out))
    doomed.start()
    try:
        assert _get(out) == {"held": 0}
        time.sleep(lease_s / 2)  # its renewal keeps the slot past the first lease term ...
        os.kill(doomed.pid or 0, signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.join(timeout=10)
    finally:
        if doomed.is_alive():
            doomed.kill()
    with transaction(db_session_factory) as session:  # ... and its dead lease still counts
        assert limits.try_acquire(session, PROVIDER, "survivor", 2, 1) is None

    async def take() -> limits.HeldSlot | None:
        async with limits.provider_slot(
            db_session_factory, PROVIDER, "survivor", 2, 1, time.monotonic() + 3 * lease_s
        ) as slot:
            return slot

    slot = asyncio.run(take())
    assert slot is not None and slot.slot_no == 0
    print(f"slot back {time.monotonic() - killed_at:.2f} s after the kill (lease {lease_s} s)")
    with db_session_factory() as session:
        assert limits.holders(session, PROVIDER) == []


def test_a_killed_waiter_stops_blocking_after_its_waiter_lease(db_url: str, db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        limits.ensure_slots(session, PROVIDER, 1)
        assert limits.try_acquire(session, PROVIDER, "busy", 1, 1) == 0
    out = SPAWN.Queue()
    doomed = SPAWN.Process(target=limits_workers.wait_in_queue_until_killed, args=(db_url, out))
    doomed.start()
    try:
        assert _get(out) == {"waiting": True}
        # A later waiter of the same standing (user 7 holds nothing, never got a slot) queues behind it.
        with transaction(db_session_factory) as session:
            assert limits.try_acquire(session, PROVIDER, "patient", 8, 1) is None
        os.kill(doomed.pid or 0, signal.SIGKILL)
        doomed.join(timeout=10)
    finally:
        if doomed.is_alive():
            doomed.kill()
    with transaction(db_session_factory) as session:
        assert limits.release(session, PROVIDER, "busy")
    with transaction(db_session_factory) as session:
        assert limits.try_acquire(session, PROVIDER, "patient", 8, 1) is None  # the dead waiter is still ahead
    deadline = time.monotonic() + limits.WAITER_LEASE_S * 4
    taken = None
    while taken is None and time.monotonic() < deadline:
        time.sleep(0.1)
        with transaction(db_session_factory) as session:
            taken = limits.try_acquire(session, PROVIDER, "patient", 8, 1)
    assert taken == 0


def test_the_next_free_slot_goes_to_the_user_holding_fewest_across_processes(
    db_url: str, db_session_factory: Factory
) -> None:
    user_a, user_b = 1, 2
    with transaction(db_session_factory) as session:
        limits.ensure_slots(session, PROVIDER, LIMIT)
        for i in range(LIMIT):
            assert limits.try_acquire(session, PROVIDER, f"a-running-{i}", user_a, LIMIT) == i
    out = SPAWN.Queue()
    queue_a = SPAWN.Process(target=limits_workers.queue_then_hold, args=(db_url, user_a, 20, LIMIT, out))
    queue_a.start()
    processes = [queue_a]
    try:
        _wait_for_waiters(db_session_factory, 20)
        queue_b = SPAWN.Process(target=limits_workers.queue_then_hold, args=(db_url, user_b, 1, LIMIT, out))
        queue_b.start()
        processes.append(queue_b)
        _wait_for_waiters(db_session_factory, 21)
        with transaction(db_session_factory) as session:
            assert limits.release(session, PROVIDER, "a-running-0")
        first = _get(out, timeout=30)
        assert first.get("acquired") == "u2-0", first  # B, not the first of A's 20 older requests
        for i in range(1, LIMIT):
            with transaction(db_session_factory) as session:
                assert limits.release(session, PROVIDER, f"a-running-{i}")
        done: set[int] = set()
        while len(done) < 2:
            message = _get(out)
            if "done" in message:
                done.add(message["done"])
    finally:
        stop(processes)
    with db_session_factory() as session:
        assert limits.holders(session, PROVIDER) == []
        assert limits.waiters(session, PROVIDER) == []


def _wait_for_waiters(factory: Factory, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with factory() as session:
            if len(limits.waiters(session, PROVIDER)) >= count:
                return
        time.sleep(0.02)
    pytest.fail(f"fewer than {count} waiters registered within 60 s")
