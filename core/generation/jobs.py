"""Durable generation jobs: the REST API's queue. A job is a row before anything runs; any worker process claims it
with a lease, runs it through `generate()` and records the outcome.

    job, created = enqueue(session, actor, request, idempotency_key="order-42")   # in the API's transaction
    job = claim_next(session, owner)                 # a worker: the oldest runnable job, or None
    view = await run_job(factory, job, owner)        # generate() with the key `job:<id>`, then finish;
                                                     # view.result and view.images: the outcome, in memory
    view = get_job(session, actor, job_id, with_result=True)   # the same read back, for its owner or staff

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

Cost per job, because the API runs this on every request: each write returns the row it wrote (INSERT/UPDATE ...
RETURNING, no read-back), and the finishing transaction also reads the generation's image rows, so the worker
that ran the job hands back everything a response needs (`JobView.result`, `JobView.images`) without another
read. The statements of a request's path are Core statements on the tables, built once and run on the session's
connection: nothing here needs the ORM's identity map, and its per-statement bookkeeping cost more than the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ImagegateError, InvalidInput, NotFound
from common.problems import problem_for
from core.authz import authorize, begin_write
from core.generation.dbexec import in_transaction, run_db
from core.generation.models import GenerationFailed, GenerationRequest, GenerationResult, ImageRecord
from core.generation.records import generation_by_key, load_result
from core.generation.recovery import recover
from core.generation.service import AdapterFactory, generate
from core.generation.usage import scoped_idempotency_key
from core.image_access import media_type
from core.security import Actor, Role
from db.engine import dialect_insert
from db.models import GenerationJob, StoredImage, new_uuid, utcnow

__all__ = [
    "JOB_LEASE_S",
    "MAX_CLAIMS",
    "JobImage",
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
class JobImage:
    """One stored image of a job's generation: what a client needs to fetch it (never its server path)."""

    id: int
    media_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    seed: int | None
    position: int


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
    result: GenerationResult | None = field(default=None, compare=False, repr=False)
    """The generation's result: as `generate()` returned it when this process just ran the job (`run_job`), or
    read back from the ledger (`get_job(..., with_result=True)`); None when not at hand."""
    images: tuple[JobImage, ...] | None = field(default=None, compare=False, repr=False)
    """The generation's stored images in order (empty without a generation); None when not at hand. Set together
    with `result`: when both are there, the job, its generation and its images are complete without a read."""

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def complete(self) -> bool:
        """Whether the view carries its generation and images (or has no generation): nothing left to read."""
        return self.images is not None and (self.generation_id is None or self.result is not None)


_jobs = cast(Table, GenerationJob.__table__)
_stored_images = cast(Table, StoredImage.__table__)
_COLUMNS = tuple(_jobs.c)
"""Every column of a job: what each write returns (RETURNING) instead of reading the row back."""

_JOB_BY_ID = select(*_COLUMNS).where(_jobs.c.id == bindparam("job_id"))
_JOB_BY_KEY = select(*_COLUMNS).where(_jobs.c.idempotency_key == bindparam("key"))
_IMAGES_OF = (
    select(
        _stored_images.c.id,
        _stored_images.c.content_type,
        _stored_images.c.width,
        _stored_images.c.height,
        _stored_images.c.size_bytes,
        _stored_images.c.sha256,
        _stored_images.c.seed,
        _stored_images.c.position,
    )
    .where(_stored_images.c.generation_id == bindparam("generation_id"))
    .order_by(_stored_images.c.position)
)
_HELD_BY_OWNER = and_(
    _jobs.c.id == bindparam("job_id"), _jobs.c.lease_owner == bindparam("owner"), _jobs.c.status == "running"
)
_FINISH = (
    update(_jobs)
    .where(_HELD_BY_OWNER)
    .values(
        status=bindparam("final_status", type_=_jobs.c.status.type),
        generation_id=bindparam("final_generation_id", type_=_jobs.c.generation_id.type),
        error=bindparam("final_error", type_=_jobs.c.error.type),
        finished_at=bindparam("finished_at_value", type_=_jobs.c.finished_at.type),
        lease_owner=None,
        lease_expires_at=None,
    )
    .returning(*_COLUMNS)
)
_RENEW = (
    update(_jobs)
    .where(_HELD_BY_OWNER)
    .values(lease_expires_at=bindparam("expires_at", type_=_jobs.c.lease_expires_at.type))
    .returning(_jobs.c.id)
)
_inserts: dict[tuple[str, bool], Any] = {}


def _insert(session: Session, with_key: bool) -> Any:
    """INSERT ... RETURNING every column (ON CONFLICT on the idempotency key DO NOTHING when there is one), built
    once per database kind; the values come with the execution."""
    kind = session.get_bind().dialect.name
    statement = _inserts.get((kind, with_key))
    if statement is None:
        statement = dialect_insert(session, _jobs)
        if with_key:
            statement = statement.on_conflict_do_nothing(index_elements=["idempotency_key"])
        statement = _inserts[(kind, with_key)] = statement.returning(*_COLUMNS)
    return statement


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


def _load(session: Session, job_id: str) -> Any | None:
    """The job's row (columns only: a view is all anyone makes of it), or None."""
    return session.connection().execute(_JOB_BY_ID, {"job_id": job_id}).one_or_none()


def _job_image(image_id: int | None, content_type: str, image: ImageRecord | Row[*tuple[Any, ...]]) -> JobImage:
    """A stored image as a client fetches it: by its row id, which an image read from the ledger always has."""
    assert image_id is not None, "an image read from the ledger has its row id"
    return JobImage(
        id=image_id,
        media_type=media_type(content_type),
        width=image.width,
        height=image.height,
        size_bytes=image.size_bytes,
        sha256=image.sha256,
        seed=image.seed,
        position=image.position,
    )


def _images(session: Session, generation_id: str | None) -> tuple[JobImage, ...]:
    """A generation's stored images in order; the caller has already authorized reading the job they belong to."""
    if generation_id is None:
        return ()
    rows = session.connection().execute(_IMAGES_OF, {"generation_id": generation_id})
    return tuple(_job_image(row.id, row.content_type, row) for row in rows)


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
    connection = session.connection()
    inserted = connection.execute(_insert(session, key is not None), values).one_or_none()
    if inserted is not None:
        return _view(inserted), True
    row = connection.execute(_JOB_BY_KEY, {"key": key}).one_or_none()
    if row is None:  # pragma: no cover - the conflicting row is there in this transaction
        raise RuntimeError("the job vanished right after it was queued")
    if row.request_fingerprint != fingerprint:
        raise InvalidInput(
            f"the idempotency key {idempotency_key!r} was already used for a different request",
            {"idempotency_key": "already used for a different request"},
        )
    return _view(row), False


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
        .returning(*_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    claimed = session.execute(statement).one_or_none()
    return None if claimed is None else _view(claimed)


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
    result = session.connection().execute(
        _RENEW, {"job_id": job_id, "owner": owner, "expires_at": moment + timedelta(seconds=lease_s)}
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
) -> JobView | None:
    """Record the outcome if `owner` still holds the job: the finished job (as written); None (nothing written)
    when it does not."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"a job finishes as succeeded or failed, not {status!r}")
    written = (
        session.connection()
        .execute(
            _FINISH,
            {
                "job_id": job_id,
                "owner": owner,
                "final_status": status,
                "final_generation_id": generation_id,
                "final_error": None if error is None else dict(error),
                "finished_at_value": now or utcnow(),
            },
        )
        .one_or_none()
    )
    return None if written is None else _view(written)


def get_job(session: Session, actor: Actor, job_id: str, *, with_result: bool = False) -> JobView:
    """A job as its owner or staff sees it. Anyone else gets NotFound, so ids of others' jobs reveal nothing.
    `with_result`: also its generation's result and stored images (`JobView.result`, `.images`), read in this
    session; the generation is the job's user's, so whoever may see the job may see them."""
    who = authorize(session, actor, *Role, action="read generation jobs", lock=False)
    row = _load(session, job_id)
    if row is None or (who.user_id is not None and who.role not in STAFF and row.user_id != who.user_id):
        raise NotFound(f"there is no generation job {job_id!r}")
    view = _view(row)
    if not with_result:
        return view
    if view.generation_id is None:
        return replace(view, images=())
    result = load_result(session, view.generation_id, replayed=False)
    return replace(view, result=result, images=tuple(_job_image(i.stored_id, i.format, i) for i in result.images))


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
    still running elsewhere leaves the job claimed: its lease runs out and a later claim finds the result.

    The finished job comes back with what `generate()` returned (`result`) and the generation's image rows
    (`images`, read in the finishing transaction), so whoever waits on it answers without reading it back; when
    the outcome is not in memory (an error without its result) or another worker took the job over, they are
    None and the reader reads them (`get_job(..., with_result=True)`)."""
    request = GenerationRequest.from_record(job.request, idempotency_key=f"job:{job.id}")
    actor = Actor(user_id=job.user_id, username=f"user {job.user_id}")
    # Only a job claimed before (claims > 1) can have a generation a dead worker left: a first claim skips the read.
    if job.claims > 1 and await run_db(_left_unfinished, factory, scoped_idempotency_key(job.user_id, f"job:{job.id}")):
        # An earlier claim's worker died mid-generation: collect and settle what it left before asking again, so
        # generate() replays that generation instead of waiting on a lease nobody renews. `now` judges leases.
        await recover(factory, adapters=adapters, now=now)
    keeper = asyncio.create_task(_keep_lease(factory, job.id, owner, lease_s))
    status: str
    error: dict[str, Any] | None
    generation_id: str | None
    outcome: GenerationResult | None
    try:
        try:
            result = await generate(request, actor, factory=factory, adapters=adapters)
        except ImagegateError as failure:
            problem = problem_for(failure).body()
            generation_id = problem.get("generation_id")
            status, error = "failed", problem
            outcome = failure.result if isinstance(failure, GenerationFailed) else None
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
            outcome = result
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    if outcome is not None and outcome.generation_id != generation_id:
        outcome = None  # not this job's generation's result: let the reader read it
    finished = await in_transaction(
        factory,
        functools.partial(
            _finish_with_images,
            job_id=job.id,
            owner=owner,
            status=status,
            generation_id=generation_id,
            error=error,
            result=outcome,
        ),
    )
    if finished is None:  # another worker took the job over: report it as it is now
        return await run_db(_read, factory, job.id)
    return finished


def _finish_with_images(
    session: Session,
    job_id: str,
    owner: str,
    *,
    status: str,
    generation_id: str | None,
    error: Mapping[str, Any] | None,
    result: GenerationResult | None,
) -> JobView | None:
    """`finish`, and in the same transaction the generation's image rows when its result is at hand (the ids
    clients fetch the images by are only in the database)."""
    view = finish(session, job_id, owner, status=status, generation_id=generation_id, error=error)
    if view is None or (generation_id is not None and result is None):
        return view
    return replace(view, result=result, images=_images(session, generation_id))


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
