"""`imagegate report`, `recommend` and `forecast`: text, JSON and CSV output on seeded rollups (SQLite file)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.generation.budgets import create_budget
from core.runtime import open_runtime
from core.security import Actor
from db.engine import transaction
from tests.core.spend.rollup_seed import add_rollup, add_user


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert run("db", "upgrade")[0] == 0
    assert run("seed")[0] == 0
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    runtime = open_runtime(prepare=False)
    with transaction(runtime.sessions) as s:
        alice = add_user(s, "alice")
        add_rollup(s, yesterday, "ideogram", user_id=alice, attempts=3, images=2, actual_micro_usd=120_000,
                   latencies={2000: 3})  # fmt: skip
        add_rollup(s, yesterday, "ideogram", user_id=alice, status="failed", error_class="safety_rejected")
        add_rollup(s, yesterday, "fal-qwen", mode="emulator", images=4, actual_micro_usd=40_000)
        create_budget(s, Actor.system("test"), name="monthly", scope="global", period="monthly",
                      limit_micro_usd=50_000_000)  # fmt: skip
    return tmp_path


def _range() -> list[str]:
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    return ["--from", str(yesterday), "--to", str(yesterday)]


def test_report_json_csv_and_text(data_dir: Path) -> None:
    code, out = run("report", *_range(), "--by", "user", "--json")
    assert code == 0, out
    data = json.loads(out)
    live = [r for r in data["rows"] if r["spend_mode"] == "live"]
    # alice: $0.12 for 2 images = $0.06 per image, over the $0.02 target; 3 of 4 attempts succeeded.
    assert [(r["label"], r["actual_micro_usd"], r["cost_per_image_micro_usd"], r["over_target"]) for r in live] == [
        ("alice", 120_000, 60_000, True)
    ]
    assert live[0]["success_rate"] == 0.75
    assert data["error_classes"][0]["error_class"] == "safety_rejected"
    assert {t["spend_mode"] for t in data["totals"]} == {"live", "simulated"}

    code, out = run("report", *_range(), "--csv")
    assert code == 0, out
    records = list(csv.DictReader(io.StringIO(out)))
    assert [(r["spend_mode"], r["key"], r["actual_micro_usd"]) for r in records] == [
        ("live", "ideogram", "120000"),
        ("simulated", "fal-qwen", "40000"),
        ("live", "total", "120000"),
        ("simulated", "total", "40000"),
    ]

    code, out = run("report", *_range())
    assert code == 0, out
    assert "LIVE      ideogram: $0.120000 for 2 image(s), $0.060000/image OVER target" in out
    assert "SIMULATED fal-qwen" in out and "safety_rejected x1" in out

    code, out = run("report", *_range(), "--by", "preset", "--json")
    assert code == 0 and {row["key"] for row in json.loads(out)["rows"]} == {""}  # the seeded rows name no preset
    code, out = run("report", "--from", "2026-13-01")
    assert code == 2


def test_recommend_and_forecast(data_dir: Path) -> None:
    code, out = run("recommend", "--json")
    assert code == 0, out
    data = json.loads(out)
    # Ideogram at DEFAULT ($0.06) vs Hugging Face 1024x1024 ($0.010486): (60,000 - 10,486) x 2 images.
    ids = {r["id"]: r["monthly_saving_micro_usd"] for r in data["recommendations"]}
    assert ids["provider:ideogram:huggingface"] == 99_028
    code, out = run("recommend")
    assert code == 0 and "huggingface instead of ideogram" in out

    code, out = run("forecast", "--json")
    assert code == 0, out
    (budget,) = json.loads(out)
    assert budget["budget_name"] == "monthly" and budget["limit_micro_usd"] == 50_000_000
    code, out = run("forecast")
    assert code == 0 and "monthly (global, monthly, live)" in out
