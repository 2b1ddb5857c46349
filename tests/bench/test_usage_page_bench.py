"""bench/usage_page.py still runs: once with tiny numbers on SQLite (no timing is asserted; speed lives in bench/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_bench_smoke import SCRIPT_TIMEOUT_S, run_script, section


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 10)
def test_usage_page_bench_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    done = run_script("bench.usage_page", results, "--rows", "2000", "--db", "sqlite", "--users", "5", "--runs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    text = section(results, "usage_page")
    assert "| SQLite" in text and "| 2,000 |" in text
    assert "Command: `python -m bench.usage_page" in text
    assert "load average" in text
