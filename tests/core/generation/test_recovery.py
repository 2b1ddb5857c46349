"""Crash safety: a process killed with SIGKILL mid-generation, then recovered: nothing lost, nothing charged twice.

The killed process (tests/core/generation/sigkill_child.py) runs a real generation against the emulator's fal
queue (the real fal-client), with the job taking a few seconds. The test waits until the attempt's provider
request id is in the database (stored before polling), kills the process, and checks what a crash leaves:
the attempt unfinished, its estimate reserved. Then `recover` (twice at once, racing) collects the finished,
paid result by its request id: the image stored and indexed, one finished attempt, the budget charged exactly
the attempt's actual cost once, nothing left reserved; a third recovery finds nothing; a repeat of the killed
request's idempotency key returns the recovered result and spends nothing. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.generation.models import GenerationRequest, GenerationResult, GenerationStatus
from core.generation.recovery import RecoveryReport, recover
from core.generation.service import generate, generate_sync
from db.models import SpendMode, UsageDailyRollup, utcnow
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer
from tests.core.generation.service_support import (
    SYSTEM,
    Figures,
    attempts,
    count,
    figures,
    generation,
    images,
    make_budget,
    open_reservations,
    running_emulator,
    seed,
)

ROOT = Path(__file__).resolve().parents[3]
KEY = "killed-mid-way"
PROMPT = "a lighthouse in a storm"


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    with running_emulator() as running:
        yield running


def _wait_for_request_id(factory: sessionmaker[Session], child: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = attempts(factory)
        if rows and rows[0].provider_request_id:
            return
        if child.poll() is not None:
            out = child.communicate()[1].decode(errors="replace")
            pytest.fail(f"the child exited ({child.returncode}) before storing a request id:\n{out[-2000:]}")
        time.sleep(0.05)
    pytest.fail("no provider request id was stored in time")


def _recover_twice_at_once(factory: sessionmaker[Session]) -> list[RecoveryReport]:
    """Two recoveries racing (threads, each with its own event loop), judging leases a minute from now."""
    later = utcnow() + timedelta(minutes=1)
    reports: list[RecoveryReport] = []
    barrier = threading.Barrier(2)

    def one() -> None:
        barrier.wait()
        reports.append(asyncio.run(recover(factory, now=later)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(reports) == 2
    return reports


def test_a_process_killed_mid_generation_is_recovered_exactly_once(
    db_url: str,
    db_session_factory: sessionmaker[Session],
    emulator_server: tuple[BackgroundServer, FaultBoard],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, board = emulator_server
    board.reset()
    board.configure("fal", latency_s=4.0)
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
    seed(db_session_factory)
    budget = make_budget(db_session_factory, limit_micro_usd=1_000_000)

    env = {**os.environ, "IMAGEGATE_EMULATOR_URL": server.url}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.core.generation.sigkill_child", db_url, KEY, PROMPT],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_request_id(db_session_factory, child, timeout_s=60)
        assert child.poll() is None, "the generation finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert b"finished" not in (child.stdout.read() if child.stdout else b"")

    # What the crash left: a running generation, an unfinished attempt with its request id, the estimate held.
    [left] = attempts(db_session_factory)
    assert left.finished_at is None and left.provider_request_id and left.mode == "emulator"
    assert generation(db_session_factory, left.generation_id).status == "running"
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(0, left.estimated_micro_usd)

    # A repeat of the key meanwhile returns the generation's state (running), never a second run.
    request = GenerationRequest(
        PROMPT,
        provider="fal-qwen",
        params={"seed": 11, "num_inference_steps": 4, "image_size": "square"},
        idempotency_key=KEY,
        allow_fallback=False,
        deadline_s=0.5,
    )
    waiting = generate_sync(request, SYSTEM, factory=db_session_factory)
    assert waiting.replayed and waiting.status is GenerationStatus.RUNNING and not waiting.images
    assert len(attempts(db_session_factory)) == 1

    reports = _recover_twice_at_once(db_session_factory)
    assert sum(r.collected for r in reports) == 1, [r.lines() for r in reports]

    [row] = attempts(db_session_factory)
    assert (row.status, row.billing) == ("recovered", "billed")
    assert row.actual_micro_usd is not None and row.actual_micro_usd > 0 and row.billed_units_micro
    gen = generation(db_session_factory, row.generation_id)
    assert (gen.status, gen.final_provider, gen.final_cost_micro_usd) == ("succeeded", "fal-qwen", row.actual_micro_usd)
    [image] = images(db_session_factory, row.generation_id)
    assert (image.width, image.height) == (512, 512)
    # Nothing lost, nothing charged twice: exactly the one actual cost, nothing left reserved, nothing live.
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(row.actual_micro_usd, 0)
    assert figures(db_session_factory, budget, SpendMode.LIVE) == Figures(0, 0)
    assert open_reservations(db_session_factory) == 0
    assert count(db_session_factory, UsageDailyRollup) == 1

    again = asyncio.run(recover(db_session_factory, now=utcnow() + timedelta(minutes=2)))
    assert again.nothing_to_do, again.lines()
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(row.actual_micro_usd, 0)

    # The killed request's key now returns the recovered result, and spends nothing.
    replay = generate_sync(request, SYSTEM, factory=db_session_factory)
    assert replay.replayed and replay.status is GenerationStatus.SUCCEEDED
    assert replay.generation_id == row.generation_id and replay.images[0].sha256 == image.sha256
    assert replay.images[0].path.exists()
    assert len(attempts(db_session_factory)) == 1
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(row.actual_micro_usd, 0)


def test_recovery_closes_what_cannot_be_collected(
    db_session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox attempt (no resume) left by a dead process is closed as abandoned with billing unknown (held),
    and a generation that died before any attempt is closed as failed."""
    from core.generation import usage
    from db.engine import transaction

    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    seed(db_session_factory)
    budget = make_budget(db_session_factory)
    past = utcnow() - timedelta(minutes=5)
    with transaction(db_session_factory) as session:
        from core import price_store
        from core.generation import budgets

        price = price_store.active_price(session, "fal-qwen")
        assert price is not None
        started = usage.start_generation(
            session, user_id=None, prompt="x", request={"prompt": "x"}, routing_policy="priority",
            requested_provider=None, mode="simulated", estimated_micro_usd=15_729, fingerprint="f1",
            lease_owner="dead:1:x", lease_expires_at=past, now=past,
        )  # fmt: skip
        held = budgets.reserve(
            session,
            budgets.applicable_budgets(session, "fal-qwen", None),
            15_729,
            SpendMode.SIMULATED,
            started.generation_id,
            timedelta(minutes=30),
            now=past,
        )
        assert held.reservation.holds
        usage.start_attempt(
            session, generation_id=started.generation_id, attempt_no=1, fallback_position=0, user_id=None,
            provider="fal-qwen", mode="sandbox", endpoint="sandbox", effective_params={"seed": 1},
            translation_notes=[], estimated_micro_usd=15_729, price_version_id=price.id, now=past,
        )  # fmt: skip
        lonely = usage.start_generation(
            session, user_id=None, prompt="y", request={"prompt": "y"}, routing_policy="priority",
            requested_provider=None, mode="simulated", estimated_micro_usd=1, fingerprint="f2",
            lease_owner="dead:1:x", lease_expires_at=past, now=past,
        )  # fmt: skip
    report = asyncio.run(recover(db_session_factory))
    [abandoned] = report.attempts
    assert abandoned.outcome == "abandoned" and abandoned.billing == "unknown"
    assert report.generations_closed == (lonely.generation_id,)
    [row] = attempts(db_session_factory)
    assert (row.status, row.error_class, row.billing) == ("cancelled", "cancelled", "unknown")
    assert generation(db_session_factory, started.generation_id).status == "failed"
    assert generation(db_session_factory, lonely.generation_id).status == "failed"
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(0, 15_729)  # held until reconciled
    assert asyncio.run(recover(db_session_factory)).nothing_to_do


def test_recovery_never_takes_a_generation_whose_process_is_alive(
    db_session_factory: sessionmaker[Session],
    emulator_server: tuple[BackgroundServer, FaultBoard],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A generation running longer than its lease keeps renewing it: recovery running meanwhile takes nothing,
    and the request finishes normally, charged once."""
    server, board = emulator_server
    board.reset()
    board.configure("fal", latency_s=7.0)  # the job outlasts its lease twice over
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
    seed(db_session_factory)
    budget = make_budget(db_session_factory)
    request = GenerationRequest("a slow fox", provider="fal-qwen", params={"image_size": "square"})
    lease_s = 3.0  # renewed every second: a busy machine would have to stall a renewal for 2 s to lose it

    async def run_and_recover() -> tuple[object, list[RecoveryReport]]:
        task = asyncio.create_task(generate(request, SYSTEM, factory=db_session_factory, lease_ttl_s=lease_s))
        reports = []
        while not task.done():
            await asyncio.sleep(0.5)
            reports.append(await recover(db_session_factory))
        return await task, reports

    result, reports = asyncio.run(run_and_recover())
    assert isinstance(result, GenerationResult) and result.status is GenerationStatus.SUCCEEDED
    assert len(reports) >= 10 and all(r.nothing_to_do for r in reports), [r.lines() for r in reports]
    [row] = attempts(db_session_factory)
    assert row.status == "succeeded" and row.actual_micro_usd
    gen = generation(db_session_factory, row.generation_id)
    assert gen.lease_expires_at is not None and gen.created_at is not None
    assert (gen.lease_expires_at - gen.created_at).total_seconds() > lease_s + 3  # renewed while it ran
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(row.actual_micro_usd, 0)
