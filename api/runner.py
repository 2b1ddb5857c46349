"""The API process's own job worker: jobs this process accepted run here at once, and queued jobs (from any API
process, or left by a dead worker) are claimed from the database as slots free up. Every API process runs one,
so more processes mean more workers, all sharing the queue through the database."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from sqlalchemy.orm import Session, sessionmaker

from common.errors import ImagegateError
from core.generation import jobs
from core.generation.dbexec import in_transaction
from core.generation.service import AdapterFactory, process_owner

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        concurrency: int = 64,
        poll_s: float = 1.0,
        adapters: AdapterFactory | None = None,
        lease_s: float = jobs.JOB_LEASE_S,
    ) -> None:
        self.factory = factory
        self.owner = process_owner()
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.adapters = adapters
        self.lease_s = lease_s
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[jobs.JobView]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._claim_loop(), name="imagegate-job-claims")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; give running jobs `grace_s` to finish. Unfinished ones keep their rows: their leases
        expire and another worker finishes them (generate()'s idempotency keeps them charged once)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def wake(self) -> None:
        self._wake.set()

    def running(self, job_id: str) -> asyncio.Task[jobs.JobView] | None:
        return self._running.get(job_id)

    def run_claimed(self, job: jobs.JobView) -> asyncio.Task[jobs.JobView]:
        """Run a job this process holds the lease of (it accepted it with `claimed_by=self.owner`)."""
        existing = self._running.get(job.id)
        if existing is not None:
            return existing
        task = asyncio.create_task(self._run(job), name=f"imagegate-job-{job.id}")
        self._running[job.id] = task
        task.add_done_callback(lambda _: self._running.pop(job.id, None))
        return task

    async def _run(self, job: jobs.JobView) -> jobs.JobView:
        async with self._slots:
            return await jobs.run_job(self.factory, job, self.owner, adapters=self.adapters, lease_s=self.lease_s)

    async def _claim_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            self._wake.clear()
            try:
                await self._claim_while_free()
            except ImagegateError as error:
                log.warning("could not claim jobs: %s", error)
            except Exception:
                log.exception("claiming jobs failed; trying again")

    async def _claim_while_free(self) -> None:
        while len(self._running) < self.concurrency:
            job = await in_transaction(
                self.factory, functools.partial(jobs.claim_next, owner=self.owner, lease_s=self.lease_s)
            )
            if job is None:
                return
            self.run_claimed(job)
