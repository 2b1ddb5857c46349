"""An API process killed (SIGKILL) while its job's provider call is in flight: the job is claimed again once its
lease runs out, the paid result the dead process left is collected, and the job finishes with that one generation,
charged once. On SQLite and PostgreSQL, with the real fal client against the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.api_tokens import create_token
from core.generation import jobs
from core.security import Actor
from db.engine import transaction
from db.models import BudgetReservation, GenerationJob, ReservationStatus, Role, SpendMode, UsageAttempt, User, utcnow
from emulator.runner import free_port
from tests.core.generation.service_support import figures, make_budget, running_emulator, seed

IMAGEGATE = Path(sys.executable).with_name("imagegate")


def _wait(condition: object, what: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            pytest.fail(f"the API process exited ({process.returncode}) before {what}:\n{err[-2000:]}")
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_job_is_finished_elsewhere_and_charged_once(
    db_url: str, db_session_factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = db_session_factory
    seed(factory)
    budget = make_budget(factory, limit_micro_usd=1_000_000)
    with transaction(factory) as session:
        user = User(username="ann", password_hash="not-a-real-hash", role=Role.USER)
        session.add(user)
        session.flush()
        token = create_token(session, Actor.system("tests"), user.id, "t").secret
    with running_emulator() as (server, board):
        board.configure("fal", latency_s=5.0)
        monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)  # this process recovers what the API ran there
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "IMAGEGATE_DATA_DIR": str(tmp_path / "data"),
            "IMAGEGATE_EMULATOR_URL": server.url,
        }
        api = subprocess.Popen(
            [str(IMAGEGATE), "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/api/health/live", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait(ready, "it answered", api)
            accepted = httpx.post(
                f"http://127.0.0.1:{port}/api/generate",
                json={"prompt": "a heron", "provider": "fal-qwen", "allow_fallback": False, "wait": False},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]

            def submitted() -> bool:
                with factory() as session:
                    return bool(session.scalar(select(UsageAttempt.provider_request_id)))

            _wait(submitted, "the provider call was submitted", api)
            os.kill(api.pid, signal.SIGKILL)
            api.wait(timeout=10)
        finally:
            if api.poll() is None:
                api.kill()
                api.wait()

        # What the kill left: the job running under the dead process's lease, the paid call in flight.
        with factory() as session:
            left = session.get(GenerationJob, job_id)
            assert left is not None and left.status == "running" and left.claims == 1
            [attempt] = session.scalars(select(UsageAttempt)).all()
            assert attempt.finished_at is None and attempt.provider_request_id

        # Another worker, once the leases have run out (judged two minutes on), claims the job and finishes it.
        later = utcnow() + timedelta(minutes=2)
        with transaction(factory) as session:
            taken = jobs.claim_next(session, "worker-b", now=later)
        assert taken is not None and taken.id == job_id and taken.claims == 2
        done = asyncio.run(jobs.run_job(factory, taken, "worker-b", now=later))

    assert done.status == "succeeded", done.error
    with factory() as session:
        attempts = session.scalars(select(UsageAttempt)).all()
        open_holds = session.scalar(
            select(func.count())
            .select_from(BudgetReservation)
            .where(BudgetReservation.status == ReservationStatus.RESERVED)
        )
    [row] = attempts  # one provider call, never a second
    assert row.generation_id == done.generation_id and (row.status, row.billing) == ("recovered", "billed")
    assert row.actual_micro_usd and figures(factory, budget, SpendMode.SIMULATED).spent == row.actual_micro_usd
    assert open_holds == 0
