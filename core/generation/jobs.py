"""Durable generation jobs: the REST API's queue. A job is a row before anything runs; any worker process claims it
with a lease, runs it through `generate()` and records the outcome.

    job, created = enqueue(session, actor, request, idempotency_key="order-42")   # in the API's transaction
    job = claim_next(session, owner)                 # a worker: the oldest runnable job, or None
    view = await run_job(factory, job, owner)        # generate() with the key `job:<id>`, then finish

Why this holds across processes and crashes:
- Claiming is ONE statement: `UPDATE ... WHERE id = (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING`
  on PostgreSQL (workers skip each other's rows instead of queueing on them); on SQLite the same statement under
  BEGIN IMMEDIATE, which serialises it with every other writer.
- A job runs `generate()` with the idempotency key `job:<job id>` (scoped to the job's user). A worker that dies
  mid-job stops renewing its lease; another worker claims the job again, and `generate()` with the same key
  returns the first run's generation instead of starting a second one: the generation service's own recovery
  collects a paid result the dead worker left, so the job is finished elsewhere and charged once.
- Finishing is conditional on still owning the lease, so a worker that lost its job (its lease expired and
  another took over) cannot overwrite the newer outcome.
- A job claimed `MAX_CLAIMS` times without finishing (its workers keep dying) fails instead of looping forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ImagegateError, InvalidInput, NotFound
from common.problems import problem_for
from core.authz import authorize, begin_write
from core.generation.dbexec import in_transaction, run_db
from core.generation.models import GenerationRequest, GenerationResult
from core.generation.records import generation_by_key, load_result
from core.generation.recovery import recover
from core.generation.service import AdapterFactory, generate
from core.generation.usage import scoped_idempotency_key
from core.security import Actor, Role
from db.engine import dialect_insert
from db.models import GenerationJob, new_uuid, utcnow

__all__ = [
    "JOB_LEASE_S",
    "MAX_CLAIMS",
    "JobView",
    "claim",
    "claim_next",
    "enqueue",
    "finish",
    "get_job",
    "renew",
    "run_job",
]

log = logging.getLogger(__name__)

JOB_LEASE_S = 60.0
"""How long a claim lasts without renewal; the running worker renews it every third of that."""
MAX_CLAIMS = 3
STAFF = (Role.ADMIN, Role.HERO)
RUNNABLE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("succeeded", "failed")


@dataclass(frozen=True)
class JobView:
    id: str
    user_id: int
    status: str
    request: Mapping[str, Any]
    generation_id: str | None
    error: Mapping[str, Any] | None
    claims: int
    lease_owner: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


def _view(row: Any) -> JobView:
    return JobView(
        id=row.id,
        user_id=row.user_id,
        status=row.status,
        request=row.request,
        generation_id=row.generation_id,
        error=row.error,
        claims=row.claims,
        lease_owner=row.lease_owner,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _load(session: Session, job_id: str) -> GenerationJob | None:
    return session.scalar(
        select(GenerationJob).where(GenerationJob.id == job_id).execution_options(populate_existing=True)
    )


def enqueue(
    session: Session,
    actor: Actor,
    request: GenerationRequest,
    *,
    idempotency_key: str | None = None,
    token_id: int | None = None,
    claimed_by: str | None = None,
    lease_s: float = JOB_LEASE_S,
    now: datetime | None = None,
) -> tuple[JobView, bool]:
    """Queue `request` for `actor` (any active account; authorized from the database). Returns the job and
    whether it was created: a repeat of `idempotency_key` by the same user returns the first job (`False`), and
    the key reused for a different request is refused. `claimed_by`: the job starts claimed by that owner (the
    API process that will run it at once, so no other worker takes it meanwhile)."""
    who = authorize(session, actor, *Role, action="generate images")
    if who.user_id is None:
        raise InvalidInput("a generation job belongs to an account; the system actor cannot queue one")
    moment = now or utcnow()
    record = request.record()
    fingerprint = request.fingerprint()
    key = None if idempotency_key is None else scoped_idempotency_key(who.user_id, idempotency_key)
    values: dict[str, Any] = {
        "id": new_uuid(),
        "user_id": who.user_id,
        "token_id": token_id,
        "idempotency_key": key,
        "request_fingerprint": fingerprint,
        "request": record,
        "status": "queued" if claimed_by is None else "running",
        "claims": 0 if claimed_by is None else 1,
        "lease_owner": claimed_by,
        "lease_expires_at": None if claimed_by is None else moment + timedelta(seconds=lease_s),
        "started_at": None if claimed_by is None else moment,
        "created_at": moment,
    }
    statement = dialect_insert(session, GenerationJob).values(**values)
    if key is not None:
        statement = statement.on_conflict_do_nothing(index_elements=["idempotency_key"])
    created = session.execute(statement.returning(GenerationJob.id)).scalar_one_or_none() is not None
    row = (
        _load(session, values["id"])
        if created
        else session.scalar(select(GenerationJob).where(GenerationJob.idempotency_key == key))
    )
    if row is None:  # pragma: no cover - the insert or the conflicting row is there in this transaction
        raise RuntimeError("the job vanished right after it was queued")
    if not created and row.request_fingerprint != fingerprint:
        raise InvalidInput(
            f"the idempotency key {idempotency_key!r} was already used for a different request",
            {"idempotency_key": "already used for a different request"},
        )
    return _view(row), created


def _claim(session: Session, owner: str, lease_s: float, now: datetime | None, job_id: str | None) -> JobView | None:
    moment = now or utcnow()
    begin_write(session)
    _fail_exhausted(session, moment)
    runnable = or_(
        GenerationJob.status == "queued",
        and_(GenerationJob.status == "running", GenerationJob.lease_expires_at < moment),
    )
    pick = select(GenerationJob.id).where(runnable, GenerationJob.claims < MAX_CLAIMS)
    if job_id is not None:
        pick = pick.where(GenerationJob.id == job_id)
    pick = pick.order_by(GenerationJob.created_at, GenerationJob.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    statement = (
        update(GenerationJob)
        .where(GenerationJob.id == pick.scalar_subquery())
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=moment + timedelta(seconds=lease_s),
            claims=GenerationJob.claims + 1,
            started_at=func.coalesce(GenerationJob.started_at, moment),
        )
        .returning(GenerationJob.id)
        .execution_options(synchronize_session=False)
    )
    claimed = session.execute(statement).scalar_one_or_none()
    if claimed is None:
        return None
    row = _load(session, claimed)
    return None if row is None else _view(row)


def _fail_exhausted(session: Session, now: datetime) -> None:
    """Jobs whose workers died `MAX_CLAIMS` times: failed, so a poison job never loops."""
    session.execute(
        update(GenerationJob)
        .where(
            GenerationJob.status == "running",
            GenerationJob.lease_expires_at < now,
            GenerationJob.claims >= MAX_CLAIMS,
        )
        .values(
            status="failed",
            finished_at=now,
            lease_owner=None,
            error={
                "type": "urn:imagegate:problem:job-abandoned",
                "title": "The job was abandoned",
                "status": 500,
                "detail": f"the job's worker stopped {MAX_CLAIMS} times before it finished; "
                "`imagegate recover` settles anything it left with a provider",
            },
        )
        .execution_options(synchronize_session=False)
    )


def claim_next(
    session: Session, owner: str, *, lease_s: float = JOB_LEASE_S, now: datetime | None = None
) -> JobView | None:
    """Take the oldest runnable job (queued, or running with an expired lease) for `owner`, or None."""
    return _claim(session, owner, lease_s, now, None)


def claim(
    session: Session, job_id: str, owner: str, *, lease_s: float = JOB_LEASE_S, now: datetime | None = None
) -> JobView | None:
    """Take this job if it is runnable; None if another worker holds it or it is finished."""
    return _claim(session, owner, lease_s, now, job_id)


def renew(
    session: Session, job_id: str, owner: str, *, lease_s: float = JOB_LEASE_S, now: datetime | None = None
) -> bool:
    """Extend `owner`'s lease; False when the job is no longer theirs (another worker took it over)."""
    moment = now or utcnow()
    result = session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == job_id, GenerationJob.lease_owner == owner, GenerationJob.status == "running")
        .values(lease_expires_at=moment + timedelta(seconds=lease_s))
        .returning(GenerationJob.id)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none() is not None


def finish(
    session: Session,
    job_id: str,
    owner: str,
    *,
    status: str,
    generation_id: str | None,
    error: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Record the outcome if `owner` still holds the job; False (nothing written) when it does not."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"a job finishes as succeeded or failed, not {status!r}")
    result = session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == job_id, GenerationJob.lease_owner == owner, GenerationJob.status == "running")
        .values(
            status=status,
            generation_id=generation_id,
            error=None if error is None else dict(error),
            finished_at=now or utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(GenerationJob.id)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none() is not None


def get_job(session: Session, actor: Actor, job_id: str) -> JobView:
    """A job as its owner or staff sees it. Anyone else gets NotFound, so ids of others' jobs reveal nothing."""
    who = authorize(session, actor, *Role, action="read generation jobs", lock=False)
    row = _load(session, job_id)
    if row is None or (who.user_id is not None and who.role not in STAFF and row.user_id != who.user_id):
        raise NotFound(f"there is no generation job {job_id!r}")
    return _view(row)


async def _keep_lease(factory: sessionmaker[Session], job_id: str, owner: str, lease_s: float) -> None:
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            if not await in_transaction(factory, functools.partial(renew, job_id=job_id, owner=owner, lease_s=lease_s)):
                log.warning("job %s was taken over by another worker", job_id)
                return
        except ImagegateError:
            log.warning("could not renew the lease of job %s; trying again", job_id)


def _outcome(result: GenerationResult) -> tuple[str, dict[str, Any] | None]:
    if result.status.value == "succeeded":
        return "succeeded", None
    return "failed", {
        "type": "urn:imagegate:problem:provider-failed",
        "title": "The image provider failed",
        "status": 502,
        "detail": result.error_message or f"the generation ended {result.status.value}",
        "generation_id": result.generation_id,
    }


async def run_job(
    factory: sessionmaker[Session],
    job: JobView,
    owner: str,
    *,
    adapters: AdapterFactory | None = None,
    lease_s: float = JOB_LEASE_S,
    now: datetime | None = None,
) -> JobView:
    """Run a claimed job through `generate()` as its user, keep its lease alive meanwhile, and record the
    outcome. A generation left by a dead worker is recovered first (its paid result collected, settled once); one
    still running elsewhere leaves the job claimed: its lease runs out and a later claim finds the result."""
    request = GenerationRequest.from_record(job.request, idempotency_key=f"job:{job.id}")
    actor = Actor(user_id=job.user_id, username=f"user {job.user_id}")
    if await run_db(_left_unfinished, factory, scoped_idempotency_key(job.user_id, f"job:{job.id}")):
        # An earlier claim's worker died mid-generation: collect and settle what it left before asking again, so
        # generate() replays that generation instead of waiting on a lease nobody renews. `now` judges leases.
        await recover(factory, adapters=adapters, now=now)
    keeper = asyncio.create_task(_keep_lease(factory, job.id, owner, lease_s))
    status: str
    error: dict[str, Any] | None
    generation_id: str | None
    try:
        try:
            result = await generate(request, actor, factory=factory, adapters=adapters)
        except ImagegateError as failure:
            problem = problem_for(failure).body()
            generation_id = problem.get("generation_id")
            status, error = "failed", problem
        else:
            generation_id = result.generation_id
            if not result.status.finished:
                # A dead worker's generation: collect what it left with the provider (recovery takes over only
                # generations whose lease ran out), then read the outcome again.
                await recover(factory, adapters=adapters, now=now)
                result = await run_db(_load_result, factory, generation_id)
            if not result.status.finished:
                log.info("job %s: generation %s is still running elsewhere", job.id, generation_id)
                return job
            status, error = _outcome(result)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    await in_transaction(
        factory,
        functools.partial(finish, job_id=job.id, owner=owner, status=status, generation_id=generation_id, error=error),
    )
    row = await run_db(_read, factory, job.id)
    return row


def _left_unfinished(factory: sessionmaker[Session], scoped_key: str) -> bool:
    with factory() as session:
        generation = generation_by_key(session, scoped_key)
        return generation is not None and generation.status in ("pending", "running")


def _load_result(factory: sessionmaker[Session], generation_id: str) -> GenerationResult:
    with factory() as session:
        return load_result(session, generation_id)


def _read(factory: sessionmaker[Session], job_id: str) -> JobView:
    with factory() as session:
        row = _load(session, job_id)
        if row is None:
            raise NotFound(f"there is no generation job {job_id!r}")
        return _view(row)
