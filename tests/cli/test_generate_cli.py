"""`imagegate generate`, `recover`, `worker`, `budgets`, `usage summary` and `test-provider` end to end, in the
sandbox and against the emulator, on a fresh SQLite data directory (the commands run in-process with Typer's
runner, except where a real process must be killed or stopped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import manage
from cli.main import app
from core.runtime import open_runtime
from emulator.faults import Fault, FaultBoard
from emulator.runner import BackgroundServer
from tests.core.generation.service_support import attempts, running_emulator

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    for name in ("DATABASE_URL", "IMAGEGATE_EMULATOR_URL", "IMAGEGATE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    assert run("db", "upgrade")[0] == 0
    assert run("seed")[0] == 0
    return tmp_path


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def emulated(emulator_server: tuple[BackgroundServer, FaultBoard]) -> tuple[str, FaultBoard]:
    server, board = emulator_server
    board.reset()
    return server.url, board


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.output


def test_generate_in_the_sandbox_prints_images_cost_latency_and_attempts(data_dir: Path) -> None:
    code, out = run("generate", "a red fox", "--provider", "fal-qwen", "--param", "seed=4", "--key", "fox")
    assert code == 0, out
    assert "[1] fal-qwen: attempt 1 at fal-qwen" in out and "completed" in out  # progress lines
    assert "succeeded at fal-qwen (sandbox)" in out
    image = Path(out.split("image: ")[1].split(" (")[0])
    assert image.exists() and "seed 4" in out
    assert "cost: $0 live; $0.015729 simulated" in out
    assert "latency: total" in out and "attempts: 1" in out and "1. fal-qwen (sandbox, fallback 0): succeeded" in out

    code, again = run("generate", "a red fox", "--provider", "fal-qwen", "--param", "seed=4", "--key", "fox", "--json")
    assert code == 0, again
    body = json.loads(again[again.index("{") :])
    assert body["replayed"] is True and body["cost"]["live"] is False
    assert body["cost"]["simulated_actual_micro_usd"] == 15_729 and body["cost"]["live_actual_micro_usd"] == 0
    assert body["images"][0]["path"] == str(image)

    code, out = run("usage", "summary", "--json")
    rows = json.loads(out)
    assert [(r["spend_mode"], r["provider"], r["attempts"], r["actual_micro_usd"]) for r in rows] == [
        ("simulated", "fal-qwen", 1, 15_729)
    ]


def test_budgets_refuse_list_and_reset(data_dir: Path) -> None:
    code, out = run("budgets", "create", "team", "--limit", "0.02", "--period", "daily")
    assert code == 0 and "created budget #1 team: global, daily, hard, limit $0.020000" in out
    assert run("generate", "a red fox", "--provider", "fal-qwen", "--no-fallback")[0] == 0
    code, out = run("generate", "a red fox", "--provider", "fal-qwen", "--no-fallback")
    assert code == 8, out  # BudgetExceeded
    assert "budget 'team' (simulated) has $0.004271 left of $0.020000" in out and "needs $0.015729" in out

    code, out = run("budgets", "list")
    assert code == 0
    assert "#1 team: global, daily, hard, limit $0.020000" in out
    assert "live      spent $0.000000, reserved $0.000000, left $0.020000" in out
    assert "simulated spent $0.015729, reserved $0.000000, left $0.004271" in out
    listed = json.loads(run("budgets", "list", "--json")[1])
    assert listed[0]["simulated"]["spent_micro_usd"] == 15_729 and listed[0]["live"]["spent_micro_usd"] == 0

    code, out = run("budgets", "reset", "team", "--mode", "simulated", "--comment", "new sprint")
    assert code == 0 and "it had spent $0.015729" in out
    assert run("generate", "a red fox", "--provider", "fal-qwen", "--no-fallback")[0] == 0  # room again
    code, out = run("budgets", "create", "soft", "--limit", "1", "--soft", "--degrade", "smaller_size")
    assert code == 0 and "soft, smaller_size" in out


def test_generate_as_a_user_counts_against_their_budget(data_dir: Path) -> None:
    assert run("users", "create", "erin", "--role", "USER", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    code, out = run("budgets", "create", "erin's", "--limit", "0.015729", "--user", "erin")
    assert code == 0 and "user, monthly" in out
    assert run("generate", "a fox", "--as", "erin", "--provider", "fal-qwen", "--no-fallback")[0] == 0
    code, out = run("generate", "a fox", "--as", "erin", "--provider", "fal-qwen", "--no-fallback")
    assert code == 8 and "erin's" in out
    assert run("generate", "a fox", "--provider", "fal-qwen", "--no-fallback")[0] == 0  # the CLI's own budget-free
    code, out = run("usage", "summary", "--by", "user")
    assert "SIMULATED erin: 1 attempt(s)" in out and "SIMULATED system/CLI: 1 attempt(s)" in out


def test_generate_against_the_emulator_falls_back_and_fails_with_every_attempt(
    data_dir: Path, emulated: tuple[str, FaultBoard]
) -> None:
    url, board = emulated
    board.set_fault("fal", Fault.AUTH)
    code, out = run("generate", "a red fox", "--provider", "fal-qwen", "--emulator", url, "-p", "num_inference_steps=4")
    assert code == 0, out
    assert "1. fal-qwen (emulator, fallback 0): failed auth [not_billed" in out
    assert "2. " in out and "(emulator, fallback 1): succeeded" in out
    assert "falling back to" in out

    board.set_fault("fal", Fault.VALIDATION)
    code, out = run("generate", "a grey wolf", "--provider", "fal-qwen", "--emulator", url, "--no-fallback")
    assert code == 7, out  # ProviderError: every attempt failed
    assert "the only attempt failed" in out and "fal-qwen: validation" in out and "billing unknown" in out


def test_test_provider_goes_through_the_service_and_writes_its_usage_row(data_dir: Path) -> None:
    code, out = run("test-provider", "fal-qwen", "--param", "seed=5")
    assert code == 0, out
    assert "recorded: generation" in out and "1 usage row(s)" in out
    rows = json.loads(run("usage", "summary", "--json")[1])
    assert [(r["spend_mode"], r["provider"], r["attempts"]) for r in rows] == [("simulated", "fal-qwen", 1)]


def test_a_killed_cli_generation_is_recovered_by_the_cli(data_dir: Path, emulated: tuple[str, FaultBoard]) -> None:
    """`imagegate generate` killed with SIGKILL after its request id is stored; `imagegate recover` (twice)
    collects the paid image once; the budget is charged the one actual cost."""
    url, board = emulated
    board.configure("fal", latency_s=4.0)
    assert run("budgets", "create", "team", "--limit", "5")[0] == 0
    env = {**os.environ, "IMAGEGATE_EMULATOR_URL": url}
    command = [sys.executable, "-m", "cli.main", "generate", "a lighthouse", "--provider", "fal-qwen",
               "--no-fallback", "-p", "image_size=square", "-p", "num_inference_steps=4"]  # fmt: skip
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    factory = open_runtime(prepare=False).sessions
    try:
        deadline = time.monotonic() + 60
        while not any(a.provider_request_id for a in attempts(factory)):
            assert time.monotonic() < deadline and child.poll() is None, "no request id stored in time"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    code, out = run("recover", "--emulator", url)
    assert code == 0
    # The lease (60 s) has not expired yet: nothing is taken from a process that may still be alive.
    assert "nothing to recover" in out
    from datetime import timedelta

    from core.generation.recovery import recover_sync
    from db.models import utcnow

    report = recover_sync(factory, now=utcnow() + timedelta(minutes=2))
    assert report.collected == 1
    [row] = attempts(factory)
    assert (row.status, row.billing) == ("recovered", "billed")
    listed = json.loads(run("budgets", "list", "--json")[1])
    assert listed[0]["simulated"]["spent_micro_usd"] == row.actual_micro_usd
    assert listed[0]["simulated"]["reserved_micro_usd"] == 0
    code, out = run("recover", "--emulator", url, "--json")
    assert code == 0 and json.loads(out)["collected"] == 0


def test_worker_once_and_a_worker_stopped_by_sigterm(data_dir: Path) -> None:
    code, out = run("worker", "--once")
    assert code == 0, out
    rounds = "recovery x1, expiry x1, sweep x1, alerts x1, deliveries x1, housekeeping x1, probes x1"
    assert f"[worker] stopped: {rounds}" in out
    assert "errors 0" in out

    imagegate = Path(sys.executable).parent / "imagegate"
    worker = manage.start_worker(imagegate, stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "running" not in seen:
            assert time.monotonic() < deadline, seen
            seen += worker.stdout.readline().decode()
        assert manage.stop_worker(worker) == 0  # SIGTERM: a clean stop after the job in progress
        assert "[worker] stopped" in worker.stdout.read().decode()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_stop_worker_kills_a_worker_that_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30"])
    time.sleep(0.2)
    assert manage.stop_worker(stubborn, timeout_s=0.5) == -signal.SIGKILL
