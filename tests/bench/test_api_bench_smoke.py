"""bench/api.py still runs: once with tiny numbers against a fresh PostgreSQL database (no timing is asserted; speed
lives in docs/benchmarks.md). LiteLLM's proxy is included when it starts here (the `bench` extra); otherwise the
section says it was left out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.api import STEPS
from common.config import PROJECT_ROOT
from tests.bench.test_bench_smoke import section
from tests.dbfixtures import find_pg_admin_dsn, require_pg

SCRIPT_TIMEOUT_S = 280


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 10)
def test_api_bench_runs_and_writes_its_section(tmp_path: Path) -> None:
    require_pg(find_pg_admin_dsn())
    results = tmp_path / "benchmarks.md"
    args = ["--requests", "6", "--concurrency", "3", "--runs", "1", "--warmup", "1", "--profile-calls", "1"]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    done = subprocess.run(
        [sys.executable, "-m", "bench.api", "--results", str(results), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = section(results, "api")
    with_proxy = "LiteLLM's proxy left out" not in text  # it needs the `bench` extra
    assert "| imagegate POST /api/generate |" in text, text
    assert "| raw fal queue calls (httpx) |" in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "/7 |" in line]
    assert len(rows) == (4 if with_proxy else 2), text
    assert all("| 7/7 |" in row for row in rows), text  # 1 warm-up + 6 timed, every one succeeded
    assert "p50 added latency of `POST /api/generate`" in text
    # The step profile's counts (not timings): a request is admitted in one transaction, answered with no read.
    [admit] = [line for line in text.splitlines() if line.startswith(f"| {STEPS['admit']} |")]
    [response] = [line for line in text.splitlines() if line.startswith(f"| {STEPS['response']} |")]
    assert admit.endswith("| 1 |") and response.endswith("| 0 | 0 |"), text
    if with_proxy:
        assert "| LiteLLM proxy /v1/images/generations |" in text
        assert "requests per second per core: imagegate" in text
        assert "the floor: 4x LiteLLM's proxy leaves" in text
