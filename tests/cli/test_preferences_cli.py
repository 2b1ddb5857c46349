"""`imagegate preferences show|set`: a user's own defaults through core.preferences, validated like settings."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from tests.cli.test_cli import data_dir

__all__ = ["data_dir"]

PASSWORD = "correct horse battery"


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.output


def test_preferences_show_set_and_refuse(data_dir: Path) -> None:
    assert run("db", "upgrade")[0] == 0
    assert run("users", "create", "erin", "--role", "USER", "--password-stdin", input=PASSWORD + "\n")[0] == 0
    code, out = run("preferences", "show", "erin")
    assert code == 0 and "none saved (version 0" in out
    code, out = run("preferences", "set", "erin", "--size", "square", "--preset", "Fast")
    assert code == 0 and "version 1" in out, out
    code, out = run("preferences", "show", "erin", "--json")
    shown = json.loads(out)
    assert shown["version"] == 1 and shown["preferences"] == {"image_size": "square", "preset": "fast"}
    code, out = run("preferences", "set", "erin", "--preset", "bogus")
    assert code == 2 and "preset" in out
    assert json.loads(run("preferences", "show", "erin", "--json")[1])["version"] == 1  # nothing written
