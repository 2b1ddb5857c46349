"""POST /api/generate, GET /api/generations/{id} and GET /api/images/{id}."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from api.deps import acting_account, job_runner, sessions
from api.problems import PROBLEM_MEDIA_TYPE
from api.runner import JobRunner
from api.schemas import GenerateBody, ImageOut, JobOut
from core import image_access
from core.generation import jobs
from core.generation.dbexec import in_transaction, run_db
from core.generation.models import GenerationRequest
from core.generation.records import load_result
from core.security import Actor

router = APIRouter(prefix="/api", tags=["generation"])

PROBLEM = {"content": {PROBLEM_MEDIA_TYPE: {}}, "description": "problem details (RFC 9457)"}
ERRORS: dict[int | str, dict[str, Any]] = {status: PROBLEM for status in (401, 403, 413, 422, 429, 503)}
"""What any authenticated route may answer besides its success: no token, not allowed, body too large, invalid,
rate limited, database unavailable."""
POLL_S = 0.05


def _job_out(factory: sessionmaker[Session], actor: Actor, job: jobs.JobView) -> JobOut:
    images: list[ImageOut] = []
    generation: dict[str, Any] | None = None
    if job.generation_id is not None:
        with factory() as session:
            result = load_result(session, job.generation_id, replayed=False).to_dict()
            files = image_access.generation_images(session, actor, job.generation_id)
        result.pop("images", None)  # server paths stay on the server: `images` below has the URLs
        generation = result
        images = [
            ImageOut(
                id=f.id,
                url=f"/api/images/{f.id}",
                media_type=f.media_type,
                width=f.width,
                height=f.height,
                size_bytes=f.size_bytes,
                sha256=f.sha256,
                seed=f.seed,
                position=f.position,
            )
            for f in files
        ]
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


def _read_job(factory: sessionmaker[Session], actor: Actor, job_id: str) -> JobOut:
    with factory() as session:
        job = jobs.get_job(session, actor, job_id)
    return _job_out(factory, actor, job)


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


def _finished_response(out: JobOut) -> Response:
    if out.status == "failed" and out.error is not None:
        body = dict(out.error)
        body["job"] = out.model_dump(mode="json")
        return JSONResponse(body, status_code=int(body.get("status", 502)), media_type=PROBLEM_MEDIA_TYPE)
    return JSONResponse(out.model_dump(mode="json"), status_code=200)


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
    actor: Annotated[Actor, Depends(acting_account)],
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
    job, created = await in_transaction(
        factory,
        functools.partial(
            jobs.enqueue, actor=actor, request=request, idempotency_key=idempotency_key, claimed_by=claimed_by
        ),
    )
    if created and claimed_by is not None:
        runner.run_claimed(job)
    elif created:
        runner.wake()
    if body.wait and not job.finished:
        job = await _wait_for(factory, runner, actor, job, body.timeout_s)
    out = await run_db(_job_out, factory, actor, job)
    if out.status in ("succeeded", "failed"):
        return _finished_response(out)
    return JSONResponse(
        out.model_dump(mode="json"), status_code=202, headers={"Location": f"/api/generations/{out.id}"}
    )


@router.get("/generations/{job_id}", response_model=JobOut, responses={404: PROBLEM, **ERRORS})
async def get_generation(
    job_id: Annotated[str, Path(max_length=36)],
    actor: Annotated[Actor, Depends(acting_account)],
    factory: Annotated[sessionmaker[Session], Depends(sessions)],
) -> JobOut:
    """A job: its status, and once it ran, its images, cost and every attempt. Its owner or staff only."""
    return await run_db(_read_job, factory, actor, job_id)


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
