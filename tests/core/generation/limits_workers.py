"""Worker processes for the provider-slot races (spawned: they import this module, never the test module).

Each worker is a separate process with its own engine and event loop, running many asyncio tasks that compete
for one provider's slots through `core.generation.limits.provider_slot`, as several API workers would.
"""

from __future__ import annotations

import asyncio
import random
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core.generation import limits
from db.engine import make_engine, session_factory
from tests.racing import run_trials

PROVIDER = "ideogram"


def factory_for(url: str) -> sessionmaker[Session]:
    return session_factory(make_engine(url))


def compete(
    url: str, tasks: int, limit: int, rounds: int, worker: int, start: Barrier, done: Barrier, out: Queue[Any]
) -> None:
    """One trial per round: `tasks` tasks each take a slot (user = task number mod 3, so users interleave
    across processes), hold it 40-120 ms and give it back; each reports its own (taken, given back, slot number)
    on `time.monotonic()`, which is one clock for every process on the machine. A round that fails reports
    {"error": ...} instead, so the parent hears of it at once rather than after a timeout."""
    factory = factory_for(url)

    async def one(round_no: int, task: int) -> tuple[float, float, int]:
        holder = f"w{worker}-r{round_no}-t{task}"
        async with limits.provider_slot(factory, PROVIDER, holder, task % 3 + 1, limit, time.monotonic() + 60) as slot:
            assert slot is not None
            taken = time.monotonic()
            await asyncio.sleep(random.uniform(0.040, 0.120))
            given_back = time.monotonic()
        return taken, given_back, slot.slot_no

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
