"""POST /api/generate, GET /api/generations/{id} and GET /api/images/{id}.

What POST /api/generate costs around `generate()`, because that is the API's own overhead on every request:
- ONE transaction admits it (`api.deps.in_token_transaction`): the token checked, the job inserted (claimed by this
  process when it runs it at once, so it is durable before generate() starts and nobody else takes it) and the
  request counted against the token's limit. Core authorizes the job (`jobs.enqueue` takes the actor).
- The job runs in this process's runner; its finishing transaction also reads the image rows, so when it ends
  within the wait the answer is built from what `generate()` returned, with no read back. A job that is not at
  hand (a 202, an earlier job of the same Idempotency-Key, one finished elsewhere) is read once.
GET /api/generations/{id} is one transaction too: token, the job with its generation and images, count.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from api.deps import acting_account, bearer_token, in_token_transaction, job_runner, sessions
from api.problems import PROBLEM_MEDIA_TYPE
from api.runner import JobRunner
from api.schemas import GenerateBody, ImageOut, JobOut
from core import image_access
from core.api_tokens import TokenGrant
from core.generation import jobs
from core.generation.dbexec import run_db
from core.generation.models import GenerationRequest
from core.security import Actor

router = APIRouter(prefix="/api", tags=["generation"])

PROBLEM = {"content": {PROBLEM_MEDIA_TYPE: {}}, "description": "problem details (RFC 9457)"}
ERRORS: dict[int | str, dict[str, Any]] = {status: PROBLEM for status in (401, 403, 413, 422, 429, 503)}
"""What any authenticated route may answer besides its success: no token, not allowed, body too large, invalid,
rate limited, database unavailable."""
POLL_S = 0.05


def _job_out(job: jobs.JobView) -> JobOut:
    """The answer for `job` from what the view carries (no database): its generation and images when it has
    them (`jobs.JobView.complete`), none when it has no generation yet."""
    generation: dict[str, Any] | None = None
    if job.result is not None:
        generation = job.result.to_dict()
        generation.pop("images", None)  # server paths stay on the server: `images` below has the URLs
        generation["replayed"] = False  # the job's own generation, however many claims it took (as read back)
    images = [ImageOut(url=f"/api/images/{image.id}", **asdict(image)) for image in job.images or ()]
    return JobOut(
        id=job.id,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        generation_id=job.generation_id,
        images=images,
        generation=generation,
        error=None if job.error is None else dict(job.error),
    )


def _read_job(factory: sessionmaker[Session], actor: Actor, job_id: str) -> jobs.JobView:
    """The job with its generation and images, in one session (core authorizes: its owner or staff)."""
    with factory() as session:
        return jobs.get_job(session, actor, job_id, with_result=True)


async def _complete(factory: sessionmaker[Session], actor: Actor, job: jobs.JobView) -> jobs.JobView:
    """`job` as it is, if it carries what the answer needs (or has no generation yet); else read once."""
    if job.generation_id is None or job.complete:
        return job
    return await run_db(_read_job, factory, actor, job.id)


async def _wait_for(
    factory: sessionmaker[Session], runner: JobRunner, actor: Actor, job: jobs.JobView, timeout_s: float
) -> jobs.JobView:
    """The job once finished, or as it is when `timeout_s` runs out (it goes on in the background)."""
    task = runner.running(job.id)
    if task is not None:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return task.result()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        current = await run_db(_get_job, factory, actor, job.id)
        if current.finished or loop.time() >= deadline:
            return current
        await asyncio.sleep(min(POLL_S * 4, max(0.0, deadline - loop.time())))


def _get_job(factory: sessionmaker[Session], actor: Actor, job_id: str) -> jobs.JobView:
    with factory() as session:
        return jobs.get_job(session, actor, job_id)


def _json(out: JobOut, status_code: int, headers: dict[str, str] | None = None) -> Response:
    # pydantic's own serializer straight to bytes: no intermediate dict and no second pass through json.dumps.
    return Response(out.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")


def _finished_response(out: JobOut) -> Response:
    if out.status == "failed" and out.error is not None:
        body = dict(out.error)
        body["job"] = out.model_dump(mode="json")
        return JSONResponse(body, status_code=int(body.get("status", 502)), media_type=PROBLEM_MEDIA_TYPE)
    return _json(out, 200)


def _enqueue(
    session: Session,
    grant: TokenGrant,
    request: GenerationRequest,
    idempotency_key: str | None,
    claimed_by: str | None,
) -> tuple[Actor, jobs.JobView, bool]:
    """The job of a generation request, queued in its token's transaction: (actor, job, created)."""
    job, created = jobs.enqueue(
        session,
        grant.actor,
        request,
        idempotency_key=idempotency_key,
        token_id=grant.token_id,
        claimed_by=claimed_by,
    )
    return grant.actor, job, created


def _read_for(session: Session, grant: TokenGrant, job_id: str) -> jobs.JobView:
    return jobs.get_job(session, grant.actor, job_id, with_result=True)


@router.post(
    "/generate",
    response_model=JobOut,
    status_code=200,
    responses={
        202: {"model": JobOut, "description": "accepted: poll GET /api/generations/{id}"},
        402: PROBLEM,
        502: PROBLEM,
        **ERRORS,
    },
)
async def post_generate(
    body: GenerateBody,
    raw_token: Annotated[str, Depends(bearer_token)],
    factory: Annotated[sessionmaker[Session], Depends(sessions)],
    runner: Annotated[JobRunner, Depends(job_runner)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Response:
    """Generate images. With `wait` (the default) the answer is the finished job (200), or the job still running
    when `timeout_s` runs out (202). A retried request with the same `Idempotency-Key` returns the first job."""
    request = GenerationRequest(
        body.prompt,
        negative_prompt=body.negative_prompt,
        provider=body.provider,
        policy=body.policy,
        preset=body.preset,
        params=body.params,
        deadline_s=body.deadline_s,
        allow_fallback=body.allow_fallback,
        max_attempts=body.max_attempts,
    )
    claimed_by = runner.owner if body.wait else None
    actor, job, created = await in_token_transaction(
        factory,
        raw_token,
        functools.partial(_enqueue, request=request, idempotency_key=idempotency_key, claimed_by=claimed_by),
    )
    if created and claimed_by is not None:
        runner.run_claimed(job)
    elif created:
        runner.wake()
    if body.wait and not job.finished:
        job = await _wait_for(factory, runner, actor, job, body.timeout_s)
    out = _job_out(await _complete(factory, actor, job))
    if out.status in ("succeeded", "failed"):
        return _finished_response(out)
    return _json(out, 202, {"Location": f"/api/generations/{out.id}"})


@router.get("/generations/{job_id}", response_model=JobOut, responses={404: PROBLEM, **ERRORS})
async def get_generation(
    job_id: Annotated[str, Path(max_length=36)],
    raw_token: Annotated[str, Depends(bearer_token)],
    factory: Annotated[sessionmaker[Session], Depends(sessions)],
) -> Response:
    """A job: its status, and once it ran, its images, cost and every attempt. Its owner or staff only."""
    job = await in_token_transaction(factory, raw_token, functools.partial(_read_for, job_id=job_id))
    return _json(_job_out(job), 200)


def _image(factory: sessionmaker[Session], actor: Actor, image_id: int) -> image_access.ImageFile:
    with factory() as session:
        return image_access.image_file(session, actor, image_id)


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, 404: PROBLEM, **ERRORS},
)
async def get_image(
    image_id: Annotated[int, Path(ge=1, le=2**62)],
    actor: Annotated[Actor, Depends(acting_account)],
    factory: Annotated[sessionmaker[Session], Depends(sessions)],
) -> FileResponse:
    """A stored image's bytes, for its owner or staff."""
    found = await run_db(_image, factory, actor, image_id)
    return FileResponse(
        found.path,
        media_type=found.media_type,
        headers={"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{found.sha256}"'},
    )
