"""`imagegate tokens create|list|revoke` against a fresh SQLite data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.api_tokens import TokenRefused, authenticate_token
from core.runtime import open_runtime
from db.engine import transaction
from tests.cli.test_cli import data_dir

__all__ = ["data_dir"]

PASSWORD = "correct horse battery"


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_tokens_create_list_revoke(data_dir: Path) -> None:
    assert run("db", "upgrade")[0] == 0
    assert run("users", "create", "bob", "--role", "HERO", "--password-stdin", input=PASSWORD + "\n")[0] == 0
    code, out, err = run("tokens", "create", "bob", "--name", "nightly batch", "--role", "user", "--days", "30")
    assert code == 0, out + err
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("igt_") and "cannot be shown again" in err
    assert "for bob (USER)" in out
    runtime = open_runtime(prepare=False)
    with transaction(runtime.sessions) as session:
        assert authenticate_token(session, secret).username == "bob"

    code, out, _ = run("tokens", "list", "--json")
    (listed,) = json.loads(out)
    assert (listed["user"], listed["name"], listed["role"], listed["status"]) == (
        "bob",
        "nightly batch",
        "USER",
        "active",
    )
    assert secret not in out and listed["prefix"] == secret[:12]

    assert run("tokens", "revoke", str(listed["id"]))[0] == 0
    with pytest.raises(TokenRefused), transaction(runtime.sessions) as session:
        authenticate_token(session, secret)
    assert "revoked" in run("tokens", "list", "bob")[1]
    # Bad input maps to the documented exit codes.
    assert run("tokens", "create", "bob", "--name", "x", "--role", "ADMIN")[0] == 2  # above bob's role
    assert run("tokens", "create", "nobody", "--name", "x")[0] == 4
    assert run("tokens", "revoke", "999")[0] == 4
