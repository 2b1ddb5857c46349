"""The `imagegate` command line, run in-process with Typer's runner against a fresh SQLite data directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.errors import Billing, ErrorClass, ProviderError
from core.audit import count_entries
from core.runtime import open_runtime
from db import migrate
from emulator.faults import BOARD
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app

PASSWORD = "correct horse battery"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    with serve_in_thread(create_emulator_app(BOARD)) as server:
        yield server


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.output


def _counts() -> tuple[int, dict[str, object]]:
    """Audit rows and the exported state: what an import that fails or a dry run must leave untouched."""
    runtime = open_runtime(prepare=False)
    with runtime.sessions() as session:
        audit_rows = count_entries(session)
    exported = json.loads(run("settings", "export")[1])
    exported.pop("exported_at")
    return audit_rows, exported


def test_upgrade_and_seed_are_idempotent(data_dir: Path) -> None:
    head = migrate.head_revision()
    code, out = run("db", "upgrade")
    assert code == 0, out
    assert f"is at {head}" in out
    code, out = run("seed")
    assert code == 0 and "provider settings created: fal-qwen" in out
    code, out = run("seed")
    assert code == 0 and "nothing to seed" in out
    code, out = run("db", "current")
    assert f"current: {head}" in out


def test_debug_config_shows_sources_and_never_a_key(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "fal-key-0123456789abcdefSECRET"
    monkeypatch.setenv("FAL_KEY", secret)
    run("db", "upgrade")
    run("seed")
    code, out = run("debug-config")
    assert code == 0, out
    assert secret not in out
    assert "fal-…CRET (30 chars)" in out
    assert "mode: live" in out  # fal-qwen, with its key
    assert "guidance_scale" in out and "from the catalog default" in out
    code, out = run("debug-config", "--json")
    rows = {row["provider"]: row for row in json.loads(out)}
    assert rows["fal-qwen"]["one_image_usd"] == "$0.015729"
    assert rows["ideogram"]["mode"] == "sandbox"
    assert secret not in out


def test_users_create_set_role_and_reset_password(data_dir: Path) -> None:
    run("db", "upgrade")
    code, out = run("users", "create", "Carol", "--role", "HERO", "--password-stdin", input=PASSWORD + "\n")
    assert code == 0, out
    assert "created carol (HERO)" in out
    code, out = run("users", "create", "carol", "--password-stdin", input=PASSWORD + "\n")
    assert code == 2 and "already taken" in out  # InvalidInput
    code, out = run("users", "create", "dave", "--password-stdin", input="short\n")
    assert code == 2 and "10" in out
    code, out = run("users", "set-role", "carol", "user")
    assert code == 0 and "carol is now USER" in out
    code, out = run("users", "set-role", "nobody", "ADMIN")
    assert code == 4 and "no user named 'nobody'" in out  # NotFound
    code, out = run("users", "reset-password", "carol", "--password-stdin", input="another good password\n")
    assert code == 0, out
    from core.users import authenticate

    runtime = open_runtime(prepare=False)
    assert authenticate(runtime.sessions, "carol", "another good password") is not None
    assert authenticate(runtime.sessions, "carol", PASSWORD) is None
    code, out = run("users", "list")
    assert "carol" in out and "USER" in out


def test_settings_export_import_round_trip_and_bad_files(data_dir: Path) -> None:
    run("db", "upgrade")
    run("seed")
    export = data_dir / "settings.json"
    code, out = run("settings", "export", "--output", str(export))
    assert code == 0, out
    document = json.loads(export.read_text())

    code, out = run("settings", "import", str(export), "--dry-run")
    assert code == 0 and "nothing would change" in out

    old_priority = document["providers"]["fal-qwen"]["priority"]
    document["providers"]["fal-qwen"]["priority"] = 42
    document["providers"]["fal-qwen"]["params"] = {"negative_prompt": "blurry"}
    document["prices"]["fal-qwen"]["usd_per_unit"] = "0.025"
    changed = data_dir / "changed.json"
    changed.write_text(json.dumps(document))
    before = _counts()
    code, out = run("settings", "import", str(changed), "--dry-run")
    assert code == 0 and "dry run" in out
    # Each changed field with its old and its new value.
    assert "update provider_settings fal-qwen\n" in out
    assert f"  priority: {old_priority} -> 42\n" in out
    assert '  params.negative_prompt: (not set) -> "blurry"\n' in out
    assert '  usd_per_unit: "0.02" -> "0.025"' in out
    assert _counts() == before  # a dry run writes nothing

    bad = data_dir / "bad.json"
    bad.write_text('{"format": "imagegate.settings", "providers": {"fal-qwen": {"priority": "high"')
    code, out = run("settings", "import", str(bad))
    assert code == 2 and "nothing was changed" in out  # InvalidInput
    assert _counts() == before

    code, out = run("settings", "import", str(changed))
    assert code == 0 and "imported" in out and f"  priority: {old_priority} -> 42" in out
    code, out = run("debug-config", "--json")
    assert {r["provider"]: r for r in json.loads(out)}["fal-qwen"]["priority"] == 42

    code, out = run("settings", "import", str(data_dir / "missing.json"))
    assert code == 2 and "there is no file" in out


def test_test_provider_in_the_sandbox(data_dir: Path) -> None:
    code, out = run("test-provider", "fal-qwen", "--param", "seed=5", "--param", "num_inference_steps=4")
    assert code == 0, out
    assert "fal-qwen: sandbox" in out
    assert "estimate: $0.015729" in out
    assert "cost: $0 (sandbox" in out
    assert "seed: 5" in out
    image = Path(out.split("image: ")[1].split(" (")[0])
    assert image.exists() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_provider_refuses_bad_parameters(data_dir: Path) -> None:
    code, out = run("test-provider", "fal-qwen", "--param", "guidance_scale=25")
    assert code == 2
    assert "guidance_scale 25 is above fal-qwen's maximum of 20" in out


def test_test_provider_against_the_emulator(data_dir: Path, emulator: BackgroundServer) -> None:
    code, out = run("test-provider", "ideogram", "--emulator", emulator.url, "--param", "rendering_speed=TURBO")
    assert code == 0, out
    assert "ideogram: emulator" in out and "estimate: $0.030000" in out
    code, out = run(
        "test-provider", "fal-qwen", "--emulator", emulator.url, "--prompt", "a fox [[fault:rate_limit]]"
    )
    assert code == 1
    assert "FAILED: rate_limited" in out
    assert "retryable: True" in out and "retry after" in out


class _LiveCallsStopped:
    """Stands in for the live fal adapter's generate(): a test must never reach fal, so it only counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        self.calls += 1
        raise ProviderError(
            ErrorClass.AUTH, "stopped by the test: no live call", provider="fal-qwen", billing=Billing.NOT_BILLED
        )


@pytest.fixture
def live_fal(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> _LiveCallsStopped:
    """fal-qwen in LIVE mode (a fake key in the environment) with its generate() replaced: no network."""
    from core.providers.fal import FalQwenAdapter

    stopped = _LiveCallsStopped()
    monkeypatch.setattr(FalQwenAdapter, "generate", stopped)
    monkeypatch.setenv("FAL_KEY", "fake-fal-key-0000-for-tests-only")
    return stopped


def test_test_provider_live_shows_the_estimate_and_refuses_without_yes(live_fal: _LiveCallsStopped) -> None:
    code, out = run("test-provider", "fal-qwen", "--param", "num_inference_steps=4")
    assert code == 2, out
    assert "fal-qwen: live" in out
    assert "estimate: $0.015729" in out
    assert "costs about $0.015729" in out and "--yes" in out
    assert "fake-fal-key" not in out  # the key is never shown, not even in the refusal
    assert live_fal.calls == 0


def test_test_provider_live_runs_only_with_yes(live_fal: _LiveCallsStopped) -> None:
    code, out = run("test-provider", "fal-qwen", "--yes")
    assert live_fal.calls == 1  # --yes lets the call through (to the stand-in, never to fal)
    assert code == 1 and "stopped by the test" in out


def test_test_provider_needs_no_yes_in_the_emulator(data_dir: Path, emulator: BackgroundServer) -> None:
    code, out = run("test-provider", "fal-qwen", "--emulator", emulator.url, "--param", "num_inference_steps=4")
    assert code == 0, out
    assert "fal-qwen: emulator" in out and "cost: $0 (emulator" in out


def test_health_probes(data_dir: Path, emulator: BackgroundServer) -> None:
    code, out = run("health")
    assert code == 0, out
    assert out.count("ok  ") == 5 and "sandbox" in out
    code, out = run("health", "--emulator", emulator.url)
    assert code == 0, out
    assert "fal-qwen     emulator" in out and "qwen         emulator" in out
    BOARD.set_fault("ideogram", None)
    code, out = run("health", "ideogram", "--emulator", "http://127.0.0.1:9")  # nothing listens on port 9
    assert code == 1 and "DOWN" in out and "unavailable" in out
    code, out = run("health", "nope")
    assert code == 4 and "unknown provider" in out  # NotFound


def test_first_run_code_only_while_no_account_exists(data_dir: Path) -> None:
    run("db", "upgrade")
    result = CliRunner().invoke(app, ["first-run-code"])
    assert result.exit_code == 0
    code = result.stdout.strip().splitlines()[-1]
    assert len(code) == 14 and code.count("-") == 2
    assert "first run" in result.stderr
    run("users", "create", "erin", "--role", "ADMIN", "--password-stdin", input=PASSWORD + "\n")
    result = CliRunner().invoke(app, ["first-run-code"])
    assert result.exit_code == 0 and result.stdout.strip() == ""
