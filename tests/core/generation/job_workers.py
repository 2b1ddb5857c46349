"""Worker processes for the job-claim race (spawned: they import this module, never the test module)."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from core.generation import jobs
from db.engine import make_engine, session_factory, transaction


def claim_until_empty(url: str, owner: str, barrier: Barrier, out: Queue[list[str]]) -> None:
    """Claim jobs one transaction at a time until none is left; report the ids this process got."""
    factory = session_factory(make_engine(url))
    mine: list[str] = []
    barrier.wait(60)
    while True:
        with transaction(factory) as session:
            job = jobs.claim_next(session, owner)
        if job is None:
            break
        mine.append(job.id)
        time.sleep(0.005)  # a worker does something with each job before it asks for the next
    out.put(mine)
