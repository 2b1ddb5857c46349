"""Worker processes for the provider-slot races (spawned: they import this module, never the test module).

Each worker is a separate process with its own engine and event loop, running many asyncio tasks that compete
for one provider's slots through `core.generation.limits.provider_slot`, as several API workers would.
`naive_take` is the count-then-take version the one guarded UPDATE replaces (a test helper only): raced by the
same processes, it shows the race's checks can fail.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core.generation import dbexec, limits
from db.engine import make_engine, session_factory, transaction
from db.models import ProviderSlot, utcnow
from tests.racing import run_trials

PROVIDER = "ideogram"
NAIVE_POLL_S = 0.005
"""How often a naive taker that found the provider full counts again: as often as the real head of the line."""


def factory_for(url: str) -> sessionmaker[Session]:
    return session_factory(make_engine(url))


# --- the naive version this design replaces (test helper only: it shows the checks can fail) -------------------


def naive_take(factory: sessionmaker[Session], holder: str, user_id: int, limit: int) -> int | None:
    """Count the slots in use and note the lowest free one (one read), then, if under the limit, write the
    holder into that slot (a second step, unguarded); returns the slot number, or None when the count said full.
    Every taker that counted before the first write takes the same slot and goes ahead: more than `limit` are in
    flight, although the table never shows more than `limit` holders (its rows are the slots). The slots must
    exist (`limits.ensure_slots`)."""
    with factory() as session:
        in_use = {slot_no for slot_no, _holder, _user, _until in limits.holders(session, PROVIDER)}
    if len(in_use) >= limit:
        return None
    slot_no = min(set(range(limit)) - in_use)
    # No pause between the count and the write: the 32 takers of a round released at once already count
    # before the first write lands, every round on both databases (see the naive test).
    now = utcnow()
    with transaction(factory) as session:
        session.execute(
            update(ProviderSlot)
            .where(ProviderSlot.provider == PROVIDER, ProviderSlot.slot_no == slot_no)
            .values(
                holder=holder,
                user_id=user_id,
                lease_until=now + timedelta(seconds=limits.DEFAULT_LEASE_S),
                acquired_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    return slot_no


@asynccontextmanager
async def naive_slot(
    factory: sessionmaker[Session], holder: str, user_id: int, limit: int, deadline: float
) -> AsyncIterator[int]:
    """`naive_take` until it says yes (or `deadline` passes: TimeoutError), then hold the slot for the block and
    give it back with the real `limits.release` (only the take is naive)."""
    while (slot_no := await dbexec.run_db(naive_take, factory, holder, user_id, limit)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{holder}: the naive count never found {PROVIDER} under its limit of {limit}")
        await asyncio.sleep(NAIVE_POLL_S * random.uniform(0.8, 1.2))
    try:
        yield slot_no
    finally:
        await dbexec.in_transaction(factory, lambda session: limits.release(session, PROVIDER, holder))


# --- the workers ----------------------------------------------------------------------------------------------


@asynccontextmanager
async def real_slot(
    factory: sessionmaker[Session], holder: str, user_id: int, limit: int, deadline: float
) -> AsyncIterator[int]:
    """`limits.provider_slot`, yielding the slot number (the shape `naive_slot` has)."""
    async with limits.provider_slot(factory, PROVIDER, holder, user_id, limit, deadline) as slot:
        assert slot is not None
        yield slot.slot_no


def compete(
    url: str,
    tasks: int,
    limit: int,
    rounds: int,
    naive: bool,
    worker: int,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """One trial per round: `tasks` tasks each take a slot (user = task number mod 3, so users interleave
    across processes), hold it 40-120 ms and give it back; each reports its own (taken, given back, slot number)
    on `time.monotonic()`, which is one clock for every process on the machine. A round that fails reports
    {"error": ...} instead, so the parent hears of it at once rather than after a timeout. With `naive` the
    tasks take their slots with `naive_slot` instead of `limits.provider_slot`."""
    factory = factory_for(url)
    if naive:  # the real first attempt creates the slots; the naive take only counts and writes
        with transaction(factory) as session:
            limits.ensure_slots(session, PROVIDER, limit)

    take = naive_slot if naive else real_slot

    async def one(round_no: int, task: int) -> tuple[float, float, int]:
        holder = f"w{worker}-r{round_no}-t{task}"
        async with take(factory, holder, task % 3 + 1, limit, time.monotonic() + 60) as slot_no:
            taken = time.monotonic()
            await asyncio.sleep(random.uniform(0.040, 0.120))
            given_back = time.monotonic()
        return taken, given_back, slot_no

    async def run_round(round_no: int) -> list[tuple[float, float, int]]:
        return list(await asyncio.gather(*(one(round_no, t) for t in range(tasks))))

    def trial(round_no: int) -> dict[str, Any]:
        try:
            return {"intervals": asyncio.run(run_round(round_no))}
        except Exception as error:
            return {"error": repr(error)}

    run_trials(rounds, start, done, out, trial)


def hold_until_killed(url: str, lease_s: float, out: Queue[Any]) -> None:
    """Take a slot of a limit-1 provider, say so, and keep it (renewing its lease) until SIGKILL arrives."""
    factory = factory_for(url)

    async def run() -> None:
        async with limits.provider_slot(
            factory, PROVIDER, "doomed", 1, 1, time.monotonic() + 30, lease_s=lease_s
        ) as slot:
            assert slot is not None
            out.put({"held": slot.slot_no})
            await asyncio.sleep(3600)

    asyncio.run(run())


def wait_in_queue_until_killed(url: str, out: Queue[Any]) -> None:
    """Register as a waiter of a full limit-1 provider, say so, then keep polling until SIGKILL arrives."""
    factory = factory_for(url)

    async def run() -> None:
        task = asyncio.create_task(limits.acquire(factory, PROVIDER, "doomed-waiter", 7, 1, time.monotonic() + 3600))
        while True:
            with factory() as session:
                if any(h == "doomed-waiter" for h, _ in limits.waiters(session, PROVIDER)):
                    break
            await asyncio.sleep(0.01)
        out.put({"waiting": True})
        await task

    asyncio.run(run())


def queue_then_hold(url: str, user: int, count: int, limit: int, out: Queue[Any]) -> None:
    """`count` tasks of `user` wait for a slot; each reports the moment it got one, holds it until the parent
    releases everything (it watches the table), and gives it back."""
    factory = factory_for(url)

    async def one(i: int) -> None:
        holder = f"u{user}-{i}"
        async with limits.provider_slot(factory, PROVIDER, holder, user, limit, time.monotonic() + 60):
            out.put({"acquired": holder, "user": user, "at": time.monotonic()})
            await asyncio.sleep(0.05)

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(run())
    out.put({"done": user})
