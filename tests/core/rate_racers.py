"""Processes counting requests against one token's limit (spawned: they import this module only)."""

from __future__ import annotations

from datetime import datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from core.api_rate import count_request
from db.engine import make_engine, session_factory, transaction


def count_many(
    url: str, token_id: int, limit: int, requests: int, at: datetime, barrier: Barrier, out: Queue[int]
) -> None:
    factory = session_factory(make_engine(url))
    allowed = 0
    barrier.wait(60)
    for _ in range(requests):
        with transaction(factory) as session:
            allowed += count_request(session, token_id, limit, now=at).allowed
    out.put(allowed)
