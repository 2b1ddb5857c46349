"""Several API processes on one PostgreSQL: `imagegate api --workers 2` and a second `imagegate api`, each with its
own job worker, against the provider emulator. Budgets, breakers, per-provider concurrency limits and jobs must
hold across all three processes as they do in one."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.api_tokens import create_token
from core.generation import budgets
from core.security import Actor
from db import migrate
from db.engine import make_engine, session_factory, transaction
from db.models import (
    BudgetReservation,
    CircuitStateRow,
    Generation,
    GenerationJob,
    ReservationStatus,
    Role,
    SpendMode,
    UsageAttempt,
    User,
)
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, free_port, serve_in_thread
from emulator.server import create_emulator_app
from tests.core.generation.service_support import seed
from tests.dbfixtures import create_pg_database, drop_pg_database, pg_admin_dsn  # noqa: F401

SYSTEM = Actor.system("tests")
IMAGEGATE = Path(sys.executable).with_name("imagegate")


@dataclass(frozen=True)
class Cluster:
    urls: tuple[str, ...]
    """One URL per listening process (the first has two uvicorn workers behind it)."""
    factory: sessionmaker[Session]
    emulator: BackgroundServer
    headers: dict[str, str]


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the API process at {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API at {url} did not become ready")


@pytest.fixture
def cluster(pg_admin_dsn: str, tmp_path: Path) -> Iterator[Cluster]:  # noqa: F811
    name, url = create_pg_database(pg_admin_dsn, "imagegate_cluster")
    migrate.upgrade(url)
    factory = session_factory(make_engine(url))
    seed(factory, timeout_s=20)
    with transaction(factory) as session:
        admin = User(username="root", password_hash="not-a-real-hash", role=Role.ADMIN)
        session.add(admin)
        session.flush()
        token = create_token(session, SYSTEM, admin.id, "cluster").secret
    processes: list[subprocess.Popen[bytes]] = []
    with serve_in_thread(create_emulator_app(FaultBoard())) as emulator:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "IMAGEGATE_DATA_DIR": str(tmp_path / "data"),
            "IMAGEGATE_EMULATOR_URL": emulator.url,
            "IMAGEGATE_API_RATE_LIMIT": "100000",
        }
        ports = (free_port(), free_port())
        try:
            for port, workers in zip(ports, (2, 1), strict=True):
                command = [str(IMAGEGATE), "api", "--port", str(port), "--workers", str(workers)]
                processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            urls = tuple(f"http://127.0.0.1:{port}" for port in ports)
            for address, process in zip(urls, processes, strict=True):
                _wait_ready(address, process)
            yield Cluster(urls, factory, emulator, {"Authorization": f"Bearer {token}"})
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
            factory.kw["bind"].dispose()
            drop_pg_database(pg_admin_dsn, name)


def _post_everywhere(cluster: Cluster, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    def post(i: int) -> httpx.Response:
        url = cluster.urls[i % len(cluster.urls)]
        return httpx.post(f"{url}/api/generate", json=bodies[i], headers=cluster.headers, timeout=120)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


def _configure(cluster: Cluster, **knobs: object) -> None:
    answer = httpx.post(f"{cluster.emulator.url}/_emulator/config", json=knobs, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.timeout(600)
def test_budgets_limits_breakers_and_jobs_hold_across_processes(cluster: Cluster) -> None:
    factory = cluster.factory
    # A budget for exactly 5 fal requests (simulated spend: the emulator stands in for fal), raced by 12.
    one = 15_729  # fal-qwen at its default settings
    with transaction(factory) as session:
        budget = budgets.create_budget(
            session, SYSTEM, name="fal month", scope="provider", scope_id="fal-qwen", period="monthly",
            limit_micro_usd=5 * one + one // 2,
        )  # fmt: skip
    answers = _post_everywhere(cluster, [{"prompt": f"fox {i}", "provider": "fal-qwen", "allow_fallback": False}
                                         for i in range(12)])  # fmt: skip
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 5 + [402] * 7, [a.text[:200] for a in answers if a.status_code not in (200, 402)]
    with factory() as session:
        figures = budgets.current_figures(session, budget.id, SpendMode.SIMULATED)
        spent = session.scalar(
            select(func.sum(UsageAttempt.actual_micro_usd)).where(UsageAttempt.provider == "fal-qwen")
        )
        open_holds = session.scalar(
            select(func.count())
            .select_from(BudgetReservation)
            .where(BudgetReservation.status == ReservationStatus.RESERVED)
        )
    assert (figures.spent_micro_usd, figures.reserved_micro_usd, spent, open_holds) == (5 * one, 0, 5 * one, 0)

    # Ideogram allows 10 requests in flight per account: 24 at once across the processes never exceed it (the
    # emulator answers the 11th concurrent request with 429, which would show as a rate_limited attempt).
    _configure(cluster, provider="ideogram", latency_s=0.6, concurrency=10)
    answers = _post_everywhere(cluster, [{"prompt": f"owl {i}", "provider": "ideogram", "allow_fallback": False}
                                         for i in range(24)])  # fmt: skip
    assert [a.status_code for a in answers] == [200] * 24, [a.text[:200] for a in answers if a.status_code != 200]
    with factory() as session:
        limited = session.scalar(
            select(func.count()).select_from(UsageAttempt).where(UsageAttempt.error_class == "rate_limited")
        )
    assert limited == 0

    # Hugging Face failing: the breaker opens once, whichever process saw the fifth failure, and every process
    # then refuses it without calling it.
    fault = httpx.post(
        f"{cluster.emulator.url}/_emulator/faults",
        json={"provider": "hf", "fault": "server_error", "count": 1000},
        timeout=10,
    )
    assert fault.status_code == 200, fault.text
    cats = [{"prompt": f"cat {i}", "provider": "huggingface", "allow_fallback": False, "max_attempts": 1}
            for i in range(8)]  # fmt: skip
    first = _post_everywhere(cluster, cats)  # all 8 admitted at once while it was still closed
    assert {a.status_code for a in first} == {502}
    hf = UsageAttempt.provider == "huggingface"
    with factory() as session:
        row = session.get(CircuitStateRow, "huggingface")
        assert row is not None and row.state.value == "open" and row.opened_count == 1
        calls = session.scalar(select(func.count()).select_from(UsageAttempt).where(hf))
    assert calls == 8
    # Open everywhere: with no other candidate, each request may only take THE one probe (the last resort), so
    # the 8 concurrent requests of every process send their attempts one at a time, never two at once.
    second = _post_everywhere(cluster, cats)
    assert {a.status_code for a in second} <= {502, 422}
    with factory() as session:
        probes = session.execute(
            select(UsageAttempt.started_at, UsageAttempt.finished_at).where(hf).order_by(UsageAttempt.started_at)
        ).all()[calls:]
    assert len(probes) < len(cats)
    for (_, finished), (started, _) in itertools.pairwise(probes):
        assert finished is not None and finished <= started

    # Jobs queued on every process are each claimed once and finished by some process's worker.
    _configure(cluster, provider="fal", latency_s=0.1)
    with transaction(factory) as session:
        budgets.delete_budget(session, SYSTEM, budget.id)
    accepted = _post_everywhere(cluster, [{"prompt": f"job {i}", "provider": "fal-qwen", "wait": False}
                                          for i in range(16)])  # fmt: skip
    assert [a.status_code for a in accepted] == [202] * 16
    job_ids = [a.json()["id"] for a in accepted]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with factory() as session:
            done = session.scalar(
                select(func.count())
                .select_from(GenerationJob)
                .where(GenerationJob.id.in_(job_ids), GenerationJob.status.in_(("succeeded", "failed")))
            )
        if done == len(job_ids):
            break
        time.sleep(0.5)
    with factory() as session:
        jobs = session.scalars(select(GenerationJob).where(GenerationJob.id.in_(job_ids))).all()
        keys = [f"{j.user_id}:job:{j.id}" for j in jobs]
        generations = session.scalars(select(Generation).where(Generation.idempotency_key.in_(keys))).all()
    assert {j.status for j in jobs} == {"succeeded"} and {j.claims for j in jobs} == {1}
    assert len(generations) == 16 and {g.id for g in generations} == {j.generation_id for j in jobs}
