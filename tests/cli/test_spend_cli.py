"""`imagegate alerts ...` and `imagegate webhooks ...` in-process (Typer's runner) on a fresh SQLite data
directory, with a real loopback receiver that checks the signature of what `webhooks test` sends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from core.generation.periods import period_bounds
from core.runtime import open_runtime
from core.spend.webhooks import ALLOW_PRIVATE_ENV
from db.engine import transaction
from db.models import Budget, BudgetPeriod, Role, SpendMode, User
from tests.core.spend.webhook_receiver import Receiver, serve


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    return tmp_path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve(Receiver(secret="")) as running:
        yield running


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _seed_spend(budget_name: str, spent: int) -> None:
    runtime = open_runtime(prepare=False)
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        budget = session.scalars(select(Budget).where(Budget.name == budget_name)).one()
        start, end = period_bounds(budget.period, now)
        session.add(
            BudgetPeriod(
                budget_id=budget.id, mode=SpendMode.LIVE, period_start=start, period_end=end, spent_micro_usd=spent
            )
        )
        session.add(User(username="ann", password_hash="x", role=Role.ADMIN))
        session.add(User(username="uma", password_hash="x", role=Role.USER))
    runtime.engine.dispose()


def test_alerts_and_webhooks_from_the_command_line(data_dir: Path, receiver: Receiver) -> None:
    assert run("db", "upgrade")[0] == 0
    code, out = run("budgets", "create", "team", "--limit", "10", "--period", "monthly")
    assert code == 0, out
    assert run("alerts", "thresholds", "team") == (0, "#1 team: 50% 80% 100% (the defaults)\n")
    code, out = run("alerts", "thresholds", "1", "25", "90", "--comment", "earlier warning")
    assert (code, out) == (0, "#1 team: 25% 90%\n"), out
    code, out = run("alerts", "thresholds", "1", "0")
    assert code == 2 and "whole percentage" in out

    code, out = run("webhooks", "create", "ops", receiver.url, "--events", "budget_threshold,breaker_open")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("created webhook #1 ops -> http://127.0.0.1:") and "budget_threshold" in lines[0]
    secret = lines[2]
    assert len(secret) >= 43
    receiver.secret = secret
    code, out = run("webhooks", "create", "bad", "https://user:pw@example.com/")
    assert code == 2 and "credentials" in out

    _seed_spend("team", 5_000_000)  # 50 % of $10: the 25 % threshold only
    code, out = run("alerts", "run", "--json")
    assert code == 0, out
    assert json.loads(out) == {
        "alerts": 1,
        "attempted": 1,
        "delivered": 1,
        "retrying": 0,
        "failed": 0,
        "errors": [],
    }
    (post,) = receiver.posts
    assert post.signature_ok and post.json["alert"]["details"]["threshold_percent"] == 25

    code, out = run("alerts", "list", "--json")
    (alert,) = json.loads(out)
    assert alert["title"].startswith("team: 25% of its monthly live limit reached ($5.000000 spent of $10.000000")
    assert alert["delivery_status"] == "delivered" and alert["read"] is False
    code, out = run("alerts", "list", "--unread")
    assert code == 2 and "act as a user" in out
    code, out = run("alerts", "list", "--unread", "--as", "ann")
    assert code == 0 and out.startswith(f"*#{alert['id']} ") and "[budget_threshold]" in out
    assert run("alerts", "list", "--as", "uma") == (0, "no alerts\n")  # a USER sees only their own budgets'
    assert run("alerts", "read", "--all")[0] == 2
    assert run("alerts", "read", "--all", "--as", "ann") == (0, "marked 1 alert(s) read for ann\n")
    assert run("alerts", "list", "--unread", "--as", "ann") == (0, "no unread alerts\n")
    assert run("alerts", "read", "99", "--as", "ann")[0] == 4

    code, out = run("webhooks", "test", "1")
    assert code == 0 and out.startswith("delivered (HTTP 200"), out
    assert receiver.posts[-1].headers["X-Imagegate-Event"] == "test" and receiver.posts[-1].signature_ok
    code, out = run("webhooks", "list")
    assert code == 0 and secret not in out and "[active]" in out and "secret: generated" in out
    assert "last: delivered (200)" in out
    code, out = run("webhooks", "log", "1", "--json")
    assert [d["event"] for d in json.loads(out)] == ["test", "budget_threshold"]
    assert run("webhooks", "disable", "1") == (0, "webhook #1 ops is disabled\n")
    code, out = run("webhooks", "test", "1")
    assert code == 2 and "disabled" in out
    assert run("webhooks", "delete", "1") == (0, "deleted webhook #1 ops\n")
    assert run("webhooks", "list") == (0, "no webhooks (create one with `imagegate webhooks create NAME URL`)\n")
    assert run("webhooks", "delete", "1")[0] == 4


def test_webhooks_test_says_why_nothing_was_delivered(
    data_dir: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.fail_first = 5
    receiver.fail_status = 502
    assert run("db", "upgrade")[0] == 0
    code, out = run("webhooks", "create", "ops", receiver.url, "--secret-env", "OPS_SECRET")
    assert code == 0 and "$OPS_SECRET" in out
    code, out = run("webhooks", "test", "1")
    assert code == 1 and "OPS_SECRET is not set" in out and "attempt 1 of 6" in out
    assert receiver.posts == []
    monkeypatch.setenv("OPS_SECRET", "from-the-environment")
    receiver.secret = "from-the-environment"
    code, out = run("webhooks", "test", "1")
    assert code == 1 and "HTTP 502" in out and "attempt 1 of 6" in out
    assert [(p.answered, p.signature_ok) for p in receiver.posts] == [(502, True)]
