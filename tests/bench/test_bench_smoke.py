"""The benchmark scripts still run: each once with tiny numbers (no timing is asserted; speed lives in bench/).

Plus fal.run's synchronous endpoint in the emulator, which the LiteLLM baseline calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.config import PROJECT_ROOT
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app

SYNC = "/fal/run/fal-ai/qwen-image"
AUTH = {"Authorization": "Key test-key"}
SCRIPT_TIMEOUT_S = 110


def run_script(module: str, results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", module, "--results", str(results), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )


def section(results: Path, name: str) -> str:
    text = results.read_text()
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    assert start in text and end in text, text
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 10)
def test_overhead_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    done = run_script("bench.overhead", results, "--calls", "3", "--runs", "1", "--warmup", "1", "--db", "sqlite")
    assert done.returncode == 0, done.stderr[-3000:]
    text = section(results, "overhead")
    for row in ("raw fal queue calls (httpx)", "fal-client alone", "fal adapter alone", "imagegate generate(), SQLite"):
        assert row in text
    # fal-client by itself makes the same four exchanges as the raw calls, so it is their floor, like for like.
    assert "| fal-client alone (one client kept alive) |" in text and "| 4 | " in text.split("fal-client alone")[1]
    assert "the floor under any generate() built on it" in text
    # Every call went through the budget and the ledger: 1 warm-up + 3 timed, all settled.
    assert "sqlite: 4 usage attempts (4 counted in the daily rollups)" in text
    assert "reserved 0, open reservations 0" in text


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 10)
def test_inflight_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    # LiteLLM's baseline (when the bench extra is installed) runs 6 requests at a time: left out here for time.
    done = run_script(
        "bench.inflight", results, "--requests", "8", "--latency", "0.2", "--db", "sqlite", "--skip-litellm"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = section(results, "inflight")
    assert "| raw fal queue calls (httpx) |" in text
    assert "| imagegate generate(), SQLite |" in text
    assert "| imagegate generate(), SQLite, sandbox provider (no HTTP) |" in text
    assert text.count("| 8/8 |") >= 3, text  # every request of every variant succeeded
    assert "The floor on this machine: the raw fal queue calls alone" in text


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 10)
def test_budget_race_runs_and_its_checks_hold(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    done = run_script(
        "bench.budget_race", results, "--processes", "2", "--requests", "6", "--fit", "4.5", "--db", "sqlite"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = section(results, "budget_race")
    assert "| 4 / 8 | 4 |" in text, text  # 4 requests fit; the other 8 were refused
    assert ": all hold." in text


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    from bench.harness import write_section

    results = tmp_path / "benchmarks.md"
    write_section("a", "first A", results)
    write_section("b", "first B", results)
    write_section("a", "second A", results)
    text = results.read_text()
    assert "second A" in text and "first B" in text and "first A" not in text
    assert text.index("second A") < text.index("first B")


# -- the emulator's synchronous fal endpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def board() -> FaultBoard:
    return FaultBoard()


@pytest.fixture(scope="module")
def server(board: FaultBoard) -> Iterator[BackgroundServer]:
    with serve_in_thread(create_emulator_app(board)) as srv:
        yield srv


def test_fal_sync_endpoint_answers_with_the_output(server: BackgroundServer, board: FaultBoard) -> None:
    board.configure("fal", latency_s=0.05, queue_steps=1)
    body = {"prompt": "p", "image_size": {"width": 64, "height": 48}}
    answer = httpx.post(server.url + SYNC, json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-fal-billable-units"] == "0.003072"
    image = answer.json()["images"][0]
    assert (image["width"], image["height"]) == (64, 48)
    assert httpx.get(image["url"], timeout=10).content.startswith(b"\x89PNG")


def test_fal_sync_endpoint_keeps_the_queue_errors(server: BackgroundServer) -> None:
    invalid = httpx.post(server.url + SYNC, json={"prompt": ""}, headers=AUTH, timeout=10)
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "prompt"]
    denied = httpx.post(server.url + SYNC, json={"prompt": "p"}, timeout=10)
    assert denied.status_code == 401
    failed = httpx.post(server.url + SYNC, json={"prompt": "p [[fault:server_error]]"}, headers=AUTH, timeout=10)
    assert failed.status_code == 503
