"""Durable generation jobs (core.generation.jobs): queueing with an idempotency key, claims that never hand one
job to two workers (several processes, SQLite and PostgreSQL), leases, ownership, and a job run end to end."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, NotFound, PermissionDenied
from core.generation import jobs
from core.generation.models import GenerationRequest
from core.security import Actor
from db.engine import transaction
from db.models import Generation, GenerationJob, Role, UsageAttempt
from tests.core.generation.job_workers import claim_until_empty
from tests.core.generation.service_support import make_user, seed
from tests.dbfixtures import recorded_statements

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("sandbox_only")


def _enqueue(
    factory: sessionmaker[Session], actor: Actor, prompt: str = "a red fox", **kwargs: object
) -> tuple[jobs.JobView, bool]:
    with transaction(factory) as session:
        return jobs.enqueue(session, actor, GenerationRequest(prompt, provider="sandbox"), **kwargs)  # type: ignore[arg-type]


def test_a_repeated_key_returns_the_first_job_and_a_reused_key_is_refused(factory: sessionmaker[Session]) -> None:
    ann, bob = make_user(factory, "ann"), make_user(factory, "bob")
    first, created = _enqueue(factory, ann, idempotency_key="order-42")
    again, created_again = _enqueue(factory, ann, idempotency_key="order-42")
    assert created and not created_again and again.id == first.id and first.status == "queued"
    # Keys are per user: bob's "order-42" is his own job.
    bobs, bob_created = _enqueue(factory, bob, idempotency_key="order-42")
    assert bob_created and bobs.id != first.id
    with pytest.raises(InvalidInput, match="already used for a different request") as refused:
        _enqueue(factory, ann, prompt="a blue fox", idempotency_key="order-42")
    assert refused.value.field_errors == {"idempotency_key": "already used for a different request"}
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(GenerationJob)) == 2


def test_only_active_accounts_queue_jobs(factory: sessionmaker[Session]) -> None:
    with pytest.raises(PermissionDenied, match="no such account"):
        _enqueue(factory, Actor(user_id=999, username="ghost"))
    with pytest.raises(InvalidInput, match="belongs to an account"):
        _enqueue(factory, Actor.system("tests"))


def test_a_claim_is_exclusive_until_its_lease_expires(factory: sessionmaker[Session]) -> None:
    ann = make_user(factory, "ann")
    queued, _ = _enqueue(factory, ann, now=T0)
    with transaction(factory) as session:
        taken = jobs.claim_next(session, "worker-a", lease_s=30, now=T0)
    assert taken is not None and taken.id == queued.id and taken.claims == 1 and taken.lease_owner == "worker-a"
    with transaction(factory) as session:
        assert jobs.claim_next(session, "worker-b", lease_s=30, now=T0 + timedelta(seconds=29)) is None
    # worker-a died: after its lease, worker-b takes the job over, and worker-a can no longer finish it.
    with transaction(factory) as session:
        over = jobs.claim_next(session, "worker-b", lease_s=30, now=T0 + timedelta(seconds=31))
    assert over is not None and over.id == queued.id and over.claims == 2
    with transaction(factory) as session:
        assert not jobs.finish(session, queued.id, "worker-a", status="succeeded", generation_id=None)
        assert not jobs.renew(session, queued.id, "worker-a")
        assert jobs.finish(session, queued.id, "worker-b", status="failed", generation_id=None, error={"detail": "x"})
    with factory() as session:
        row = session.get(GenerationJob, queued.id)
        assert row is not None and (row.status, row.error, row.lease_owner) == ("failed", {"detail": "x"}, None)


def test_a_job_whose_workers_keep_dying_fails_instead_of_looping(factory: sessionmaker[Session]) -> None:
    ann = make_user(factory, "ann")
    queued, _ = _enqueue(factory, ann, now=T0)
    moment = T0
    for claim_no in range(1, jobs.MAX_CLAIMS + 1):
        with transaction(factory) as session:
            taken = jobs.claim_next(session, f"worker-{claim_no}", lease_s=10, now=moment)
        assert taken is not None and taken.claims == claim_no
        moment += timedelta(seconds=11)
    with transaction(factory) as session:
        assert jobs.claim_next(session, "worker-last", lease_s=10, now=moment) is None
    with factory() as session:
        row = session.get(GenerationJob, queued.id)
        assert row is not None and row.status == "failed" and row.error is not None
        assert row.error["type"] == "urn:imagegate:problem:job-abandoned"


def test_a_job_is_visible_to_its_owner_and_staff_only(factory: sessionmaker[Session]) -> None:
    ann, bob = make_user(factory, "ann"), make_user(factory, "bob")
    hero = make_user(factory, "hero", Role.HERO)
    job, _ = _enqueue(factory, ann)
    with factory() as session:
        assert jobs.get_job(session, ann, job.id).id == job.id
        assert jobs.get_job(session, hero, job.id).id == job.id
        with pytest.raises(NotFound):
            jobs.get_job(session, bob, job.id)
        with pytest.raises(NotFound):
            jobs.get_job(session, ann, "no-such-job")


def test_a_claimed_job_runs_through_generate_and_a_second_run_spends_nothing(factory: sessionmaker[Session]) -> None:
    ann = make_user(factory, "ann")
    queued, _ = _enqueue(factory, ann)
    with transaction(factory) as session:
        taken = jobs.claim_next(session, "worker-a")
    assert taken is not None
    done = asyncio.run(jobs.run_job(factory, taken, "worker-a"))
    assert done.status == "succeeded" and done.generation_id and done.finished_at is not None
    with factory() as session:
        generation = session.get(Generation, done.generation_id)
        assert generation is not None and generation.user_id == ann.user_id and generation.status == "succeeded"
        assert generation.idempotency_key == f"{ann.user_id}:job:{queued.id}"
        with recorded_statements(session.get_bind()) as sent:  # type: ignore[arg-type]
            read = jobs.get_job(session, ann, queued.id, with_result=True)
    image_reads = [s for s in sent if s.lstrip().upper().startswith("SELECT") and re.search(r"\bFROM images\b", s)]
    assert len(image_reads) == 1, image_reads  # the result's images carry their row ids: no second read
    # The worker hands back what generate() returned and the stored images: the same the ledger has.
    assert done.complete and done.result is not None and done.result.generation_id == done.generation_id
    assert done.images is not None and len(done.images) == 1 and done.images == read.images
    assert read.result is not None
    assert [a.to_dict() for a in read.result.attempts] == [a.to_dict() for a in done.result.attempts]
    # A worker that ran the same job again (it lost its lease after generate() returned): the generation is
    # replayed by its key, nothing runs or is charged twice, and the stale worker's finish writes nothing, so
    # it reports the job as stored, without a result of its own.
    again = asyncio.run(jobs.run_job(factory, taken, "worker-a"))
    assert again.generation_id == done.generation_id and not again.complete
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == 1
        assert session.scalar(select(func.count()).select_from(UsageAttempt)) == 1


def test_a_refused_job_fails_with_its_problem(factory: sessionmaker[Session]) -> None:
    ann = make_user(factory, "ann")
    with transaction(factory) as session:
        job, _ = jobs.enqueue(
            session, ann, GenerationRequest("a fox", provider="fal-qwen", params={"guidance_scale": 99})
        )
        taken = jobs.claim(session, job.id, "worker-a")
    assert taken is not None
    done = asyncio.run(jobs.run_job(factory, taken, "worker-a"))
    assert done.status == "failed" and done.error is not None
    assert done.error["status"] == 422 and done.error["type"] == "urn:imagegate:problem:invalid-input"
    assert "guidance_scale" in done.error["detail"]


@pytest.mark.parametrize("processes", [4])
def test_processes_racing_for_jobs_never_take_one_twice(
    db_url: str, db_session_factory: sessionmaker[Session], processes: int
) -> None:
    seed(db_session_factory)
    ann = make_user(db_session_factory, "ann")
    queued = {_enqueue(db_session_factory, ann, prompt=f"fox {i}")[0].id for i in range(60)}
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    out: multiprocessing.Queue[list[str]] = context.Queue()
    workers = [
        context.Process(target=claim_until_empty, args=(db_url, f"worker-{n}", barrier, out)) for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    got = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    claimed = [job_id for mine in got for job_id in mine]
    assert sorted(claimed) == sorted(queued)  # every job taken, none twice
    assert sum(1 for mine in got if mine) >= 2  # the claims really interleaved across processes
    with db_session_factory() as session:
        claims = session.scalars(select(GenerationJob.claims)).all()
    assert set(claims) == {1}
