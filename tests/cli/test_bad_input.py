"""No `imagegate` command prints a traceback for bad input: every command in Typer's tree is run with bad
arguments, bad files and a bad database, and each answers with a clear message and the documented exit code
(common/errors.py: InvalidInput 2, PermissionDenied/AccountLocked 3, NotFound 4, Conflict 5,
DatabaseUnavailable 6, ProviderError 7; usage errors are Typer's 2)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from cli.main import app
from common.errors import (
    AccountLocked,
    Billing,
    BudgetExceeded,
    Conflict,
    DatabaseUnavailable,
    ErrorClass,
    ImagegateError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ProviderError,
)
from core.runtime import open_runtime
from core.transfer import MAX_IMPORT_BYTES
from db.engine import transaction
from db.models import PriceVersion

PASSWORD = "correct horse battery"
UNREACHABLE_DB = "postgresql://root@127.0.0.1:1/imagegate"  # nothing listens on port 1


def _command_paths() -> list[tuple[str, ...]]:
    def walk(command: object, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                yield from walk(child, (*path, name))
        else:
            yield path

    return list(walk(typer.main.get_command(app), ()))


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]
    code: int
    says: str
    stdin: str | None = None


def _bad_files(root: Path) -> dict[str, Path]:
    """Files an import must refuse before reading them whole (or at all)."""
    fifo = root / "pipe.json"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever without O_NONBLOCK
    sparse = root / "sparse.json"
    with sparse.open("wb") as f:
        f.truncate(10 * 1024**3)  # reports 10 GB; must be refused from its size, not read
    oversized = root / "oversized.json"
    oversized.write_bytes(b" " * (MAX_IMPORT_BYTES + 1))
    not_json = root / "not.json"
    not_json.write_text("format = imagegate")
    huge_price = root / "huge-price.json"
    huge_price.write_text(
        json.dumps(
            {
                "format": "imagegate.settings",
                "format_version": 1,
                "prices": {
                    "fal-qwen": {
                        "provider": "fal-qwen",
                        "unit": "megapixel",
                        "usd_per_unit": "1E+100000000",
                        "source": "s",
                        "effective_date": "2026-01-01",
                    }
                },
            }
        )
    )
    return {
        "directory": root,
        "dev-zero": Path("/dev/zero"),
        "fifo": fifo,
        "sparse": sparse,
        "oversized": oversized,
        "not-json": not_json,
        "huge-price": huge_price,
        "missing": root / "missing.json",
    }


def _cases(root: Path, busy_port: int) -> dict[tuple[str, ...], list[Bad]]:
    files = _bad_files(root)
    return {
        ("seed",): [Bad(("seed", "extra"), 2, "unexpected extra argument")],
        ("debug-config",): [Bad(("debug-config", "--json=yes"), 2, "does not take a value")],
        ("first-run-code",): [Bad(("first-run-code", "extra"), 2, "unexpected extra argument")],
        ("emulator",): [
            Bad(("emulator", "--port", "70000"), 2, "65535"),
            Bad(("emulator", "--port", "zero"), 2, "valid integer"),
            Bad(("emulator", "--port", str(busy_port)), 2, f"cannot listen on 127.0.0.1:{busy_port}"),
        ],
        ("health",): [Bad(("health", "dall-e"), 4, "unknown provider 'dall-e'")],
        ("test-provider",): [
            Bad(("test-provider", "dall-e"), 2, "unknown provider 'dall-e'"),
            Bad(("test-provider", "sandbox", "--param", "seed"), 2, "--param takes NAME=VALUE"),
            Bad(("test-provider", "sandbox", "--param", "seed=-1"), 2, "seed -1 is below"),
            Bad(("test-provider", "sandbox", "--preset", "Ludicrous"), 2, "preset"),
            Bad(("test-provider",), 2, "Missing argument"),
        ],
        ("generate",): [
            Bad(("generate",), 2, "Missing argument"),
            Bad(("generate", "x", "--provider", "dall-e"), 2, "unknown provider 'dall-e'"),
            Bad(("generate", "x", "--param", "seed"), 2, "--param takes NAME=VALUE"),
            Bad(("generate", "x", "--policy", "random"), 2, "unknown routing policy 'random'"),
            Bad(("generate", "x", "--as", "nobody"), 4, "no user named 'nobody'"),
            Bad(("generate", "x", "--deadline", "-1"), 2, "deadline"),
            Bad(("generate", "x", "--key", ""), 2, "idempotency key"),
            Bad(("generate", "x", "--provider", "fal-qwen", "--param", "guidance_scale=99"), 2, "guidance_scale 99"),
        ],
        ("recover",): [Bad(("recover", "extra"), 2, "unexpected extra argument")],
        ("worker",): [Bad(("worker", "extra"), 2, "unexpected extra argument")],
        ("budgets", "list"): [Bad(("budgets", "list", "--json=yes"), 2, "does not take a value")],
        ("budgets", "create"): [
            Bad(("budgets", "create", "x"), 2, "Missing option"),
            Bad(("budgets", "create", "x", "--limit", "abc"), 2, "not a plain decimal"),
            Bad(("budgets", "create", "x", "--limit", "1", "--period", "weekly"), 2, "period must be one of"),
            Bad(("budgets", "create", "x", "--limit", "1", "--soft"), 2, "needs a degrade action"),
            Bad(("budgets", "create", "x", "--limit", "1", "--user", "nobody"), 4, "no user named 'nobody'"),
            Bad(("budgets", "create", "x", "--limit", "1", "--provider", "dall-e"), 2, "unknown provider"),
        ],
        ("budgets", "reset"): [Bad(("budgets", "reset", "nope"), 4, "no budget named 'nope'")],
        ("usage", "summary"): [
            Bad(("usage", "summary", "--from", "yesterday"), 2, "--from takes a date"),
            Bad(("usage", "summary", "--by", "color"), 2, "--by takes"),
            Bad(("usage", "summary", "--from", "2026-02-01", "--to", "2026-01-01"), 2, "ends before it starts"),
            Bad(("usage", "summary", "--mode", "cash"), 2, "live or simulated"),
        ],
        ("db", "upgrade"): [Bad(("db", "upgrade", "nonsense"), 2, "Can't locate revision")],
        ("db", "downgrade"): [
            Bad(("db", "downgrade", "nonsense"), 2, "Can't locate revision"),
            Bad(("db", "downgrade"), 2, "Missing argument"),
        ],
        ("db", "current"): [Bad(("db", "current", "extra"), 2, "unexpected extra argument")],
        ("users", "create"): [
            Bad(("users", "create", "x", "--password-stdin"), 2, "3-32 characters", PASSWORD + "\n"),
            Bad(("users", "create", "walter", "--password-stdin"), 2, "at least 10", "short\n"),
            Bad(("users", "create", "walter", "--password-stdin"), 2, "password", "\n"),
            Bad(("users", "create", "walter", "--role", "GOD"), 2, "Invalid value"),
        ],
        ("users", "set-role"): [
            Bad(("users", "set-role", "nobody", "ADMIN"), 4, "no user named 'nobody'"),
            Bad(("users", "set-role", "nobody", "EMPEROR"), 2, "Invalid value"),
        ],
        ("users", "reset-password"): [
            Bad(("users", "reset-password", "nobody", "--password-stdin"), 4, "no user named", PASSWORD + "\n"),
            Bad(("users", "reset-password", "erin", "--password-stdin"), 2, "at least 10", "short\n"),
        ],
        ("users", "list"): [Bad(("users", "list", "--all"), 2, "No such option")],
        ("settings", "export"): [
            Bad(("settings", "export", "-o", str(root)), 2, "cannot write"),
            Bad(("settings", "export", "-o", str(root / "no" / "such" / "dir.json")), 2, "cannot write"),
        ],
        ("api",): [
            Bad(("api", "--port", "0"), 2, "greater than or equal to 1"),
            Bad(("api", "--workers", "0"), 2, "greater than or equal to 1"),
            Bad(("api", "--keep-alive", "0"), 2, "greater than or equal to 1"),
            Bad(("api", "--port", str(busy_port)), 2, f"cannot listen on 127.0.0.1:{busy_port}"),
        ],
        ("tokens", "create"): [
            Bad(("tokens", "create", "nobody", "--name", "x"), 4, "no user named 'nobody'"),
            Bad(("tokens", "create", "erin", "--name", "x", "--days", "9999"), 2, "lifetime"),
        ],
        ("tokens", "list"): [Bad(("tokens", "list", "nobody"), 4, "no user named 'nobody'")],
        ("tokens", "revoke"): [
            Bad(("tokens", "revoke", "999"), 4, "no API token with id 999"),
            Bad(("tokens", "revoke", "x"), 2, "valid integer"),
        ],
        ("alerts", "list"): [Bad(("alerts", "list", "--kind", "bogus"), 2, "--kind is one of")],
        ("alerts", "read"): [Bad(("alerts", "read", "1"), 2, "name it with --as USER")],
        ("alerts", "thresholds"): [Bad(("alerts", "thresholds", "999", "50"), 4, "budget 999 does not exist")],
        ("alerts", "run"): [Bad(("alerts", "run", "extra"), 2, "unexpected extra argument")],
        ("webhooks", "create"): [Bad(("webhooks", "create", "x", "ftp://x"), 2, "must start with http")],
        ("webhooks", "list"): [Bad(("webhooks", "list", "extra"), 2, "unexpected extra argument")],
        ("webhooks", "test"): [Bad(("webhooks", "test", "999"), 4, "webhook 999 does not exist")],
        ("webhooks", "disable"): [Bad(("webhooks", "disable", "999"), 4, "webhook 999 does not exist")],
        ("webhooks", "enable"): [Bad(("webhooks", "enable", "999"), 4, "webhook 999 does not exist")],
        ("webhooks", "delete"): [Bad(("webhooks", "delete", "999"), 4, "webhook 999 does not exist")],
        ("webhooks", "log"): [Bad(("webhooks", "log", "x"), 2, "valid integer")],
        ("report",): [
            Bad(("report", "--from", "2026-02-30"), 2, "--from takes a date"),
            Bad(("report", "--by", "nonsense"), 2, "cannot report by 'nonsense'"),
        ],
        ("preferences", "show"): [Bad(("preferences", "show", "nobody"), 4, "no user named 'nobody'")],
        ("preferences", "set"): [
            Bad(("preferences", "set", "nobody", "--size", "square"), 4, "no user named 'nobody'"),
            Bad(("preferences", "set", "erin", "--preset", "bogus"), 2, "preset"),
        ],
        ("recommend",): [Bad(("recommend", "--mode", "bogus"), 2, "live or simulated")],
        ("forecast",): [Bad(("forecast", "--mode", "bogus"), 2, "live or simulated")],
        ("settings", "import"): [
            Bad(("settings", "import", str(files["directory"])), 2, "is a directory"),
            Bad(("settings", "import", str(files["dev-zero"])), 2, "is a character device"),
            Bad(("settings", "import", str(files["fifo"])), 2, "is a named pipe"),
            Bad(("settings", "import", str(files["sparse"])), 2, "the limit is 1,048,576 bytes"),
            Bad(("settings", "import", str(files["oversized"]), "--dry-run"), 2, "the limit is 1,048,576 bytes"),
            Bad(("settings", "import", str(files["not-json"])), 2, "not valid JSON"),
            Bad(("settings", "import", str(files["huge-price"])), 2, "uses an exponent"),
            Bad(("settings", "import", str(files["missing"])), 2, "there is no file"),
            Bad(("settings", "import", str(root / "nul\x00.json")), 2, "embedded null byte"),
        ],
    }


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path))
    for name in ("DATABASE_URL", "IMAGEGATE_EMULATOR_URL", "IMAGEGATE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    for name in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "IDEOGRAM_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # no provider is live: nothing here may reach one
    return tmp_path


@pytest.fixture
def ready(data_dir: Path) -> Path:
    """A migrated, seeded database with one user (erin)."""
    assert run("db", "upgrade")[0] == 0
    assert run("seed")[0] == 0
    assert run("users", "create", "erin", "--role", "ADMIN", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    return data_dir


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.output


def _assert_clean_refusal(args: tuple[str, ...], code: int, out: str, expected_code: int, says: str) -> None:
    shown = " ".join(args).replace("\x00", "\\0")
    assert "Traceback" not in out, f"{shown}: {out}"
    assert "unexpected failure" not in out, f"{shown} was not handled as bad input: {out}"
    assert code == expected_code, f"{shown}: exit {code}, expected {expected_code}: {out}"
    assert says in out, f"{shown}: {out!r} does not say {says!r}"


def test_every_command_refuses_bad_arguments_and_files_cleanly(ready: Path, busy_port: int) -> None:
    (ready / "bad").mkdir()
    cases = _cases(ready / "bad", busy_port)
    commands = _command_paths()
    assert set(cases) == set(commands), "every command needs bad-input cases here"
    for path in commands:
        unknown = (*path, "--no-such-option")
        code, out = run(*unknown)
        _assert_clean_refusal(unknown, code, out, 2, "No such option")
        for bad in cases[path]:
            code, out = run(*bad.args, stdin=bad.stdin)
            _assert_clean_refusal(bad.args, code, out, bad.code, bad.says)


DATABASE_COMMANDS: list[tuple[str, ...]] = [
    ("seed",),
    ("debug-config",),
    ("first-run-code",),
    ("db", "upgrade"),
    ("db", "downgrade", "base"),
    ("db", "current"),
    ("users", "create", "walter", "--password-stdin"),
    ("users", "set-role", "erin", "USER"),
    ("users", "reset-password", "erin", "--password-stdin"),
    ("users", "list"),
    ("settings", "export"),
    ("test-provider", "sandbox"),
    ("generate", "x"),
    ("recover",),
    ("worker", "--once"),
    ("budgets", "list"),
    ("budgets", "create", "x", "--limit", "1"),
    ("budgets", "reset", "x"),
    ("usage", "summary"),
    ("api", "--port", "1"),
    ("tokens", "list"),
    ("tokens", "create", "erin", "--name", "x"),
    ("tokens", "revoke", "1"),
    ("alerts", "list"),
    ("alerts", "read", "1", "--as", "erin"),
    ("alerts", "thresholds", "1"),
    ("alerts", "run"),
    ("webhooks", "create", "x", "https://example.com/hook"),
    ("webhooks", "list"),
    ("webhooks", "test", "1"),
    ("webhooks", "disable", "1"),
    ("webhooks", "enable", "1"),
    ("webhooks", "delete", "1"),
    ("webhooks", "log"),
    ("report",),
    ("recommend",),
    ("forecast",),
    ("preferences", "show", "erin"),
    ("preferences", "set", "erin", "--size", "square"),
]


def test_every_command_that_needs_the_database_says_when_it_cannot_reach_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grouped = ("db", "users", "settings", "budgets", "usage", "tokens", "alerts", "webhooks", "preferences")
    database_paths = {args[: 2 if args[0] in grouped else 1] for args in DATABASE_COMMANDS}
    assert database_paths | {("emulator",), ("health",), ("settings", "import")} == set(_command_paths())
    importable = data_dir / "ok.json"
    importable.write_text('{"format": "imagegate.settings", "format_version": 1}')
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DB)
    for args in [*DATABASE_COMMANDS, ("settings", "import", str(importable))]:
        code, out = run(*args, stdin=PASSWORD + "\n")
        _assert_clean_refusal(args, code, out, 6, "127.0.0.1")


def test_commands_on_a_database_never_migrated_say_how_to_fix_it(data_dir: Path) -> None:
    for args in (("seed",), ("users", "list"), ("settings", "export"), ("debug-config",)):
        code, out = run(*args)
        _assert_clean_refusal(args, code, out, 6, "run `imagegate db upgrade`")


def _raiser(error: BaseException) -> Callable[..., object]:
    def raise_it(*args: object, **kwargs: object) -> object:
        raise error

    return raise_it


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("bad value", {"field": "what is wrong"}), 2),
        (PermissionDenied("not allowed"), 3),
        (AccountLocked("locked for now", until=datetime(2030, 1, 1, tzinfo=UTC)), 3),
        (NotFound("no such thing"), 4),
        (Conflict("changed by someone else"), 5),
        (DatabaseUnavailable("database gone"), 6),
        (ProviderError(ErrorClass.UNAVAILABLE, "provider down", provider="x", billing=Billing.NOT_BILLED), 7),
        (
            BudgetExceeded(
                budget_id=1,
                budget_name="team",
                mode="live",
                limit_micro_usd=5_000_000,
                spent_micro_usd=4_990_000,
                reserved_micro_usd=0,
                requested_micro_usd=52_429,
            ),
            8,
        ),
    ],
)
def test_the_error_tree_maps_to_the_documented_exit_codes(
    ready: Path, monkeypatch: pytest.MonkeyPatch, error: ImagegateError, code: int
) -> None:
    import core.users

    monkeypatch.setattr(core.users, "list_users", _raiser(error))
    got, out = run("users", "list")
    assert got == code and str(error) in out and "Traceback" not in out
    if isinstance(error, InvalidInput):
        assert "field: what is wrong" in out


def test_every_class_of_the_error_tree_has_its_own_exit_code() -> None:
    import common.errors
    from common.problems import ERROR_KINDS

    tree = {
        cls
        for cls in vars(common.errors).values()
        if isinstance(cls, type) and issubclass(cls, ImagegateError) and cls is not ImagegateError
    }
    assert tree == {kind.error for kind in ERROR_KINDS}, "map a new error class in common.problems.ERROR_KINDS"


def test_an_unexpected_error_is_one_line_unless_debugging(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.users

    monkeypatch.setattr(core.users, "list_users", _raiser(RuntimeError("a bug")))
    code, out = run("users", "list")
    assert code == 1 and "unexpected failure (RuntimeError): a bug" in out and "Traceback" not in out
    assert "IMAGEGATE_DEBUG=1" in out
    monkeypatch.setenv("IMAGEGATE_DEBUG", "1")
    result = CliRunner().invoke(app, ["users", "list"])
    assert isinstance(result.exception, RuntimeError)  # the real traceback, for whoever debugs


def test_a_bad_stored_price_breaks_neither_debug_config_nor_the_other_providers(ready: Path) -> None:
    """A price stored before the bounds existed (or edited in the database) fails only its own estimates."""
    today = datetime.now(UTC).date()  # in force from today: newer than the seeded price
    runtime = open_runtime(prepare=False)
    with transaction(runtime.sessions) as session:
        session.add(
            PriceVersion(
                provider="fal-qwen",
                version=99,
                rule={
                    "provider": "fal-qwen",
                    "unit": "megapixel",
                    "usd_per_unit": "1E+1000",
                    "source": "s",
                    "effective_date": today.isoformat(),
                },
                source="s",
                effective_date=today,
                created_by_name="old",
            )
        )
    code, out = run("debug-config")
    assert code == 0, out
    assert "unusable stored price, enter a new one: version 99 does not validate" in out
    assert "the stored price of fal-qwen cannot be used" in out
    code, out = run("debug-config", "--json")
    rows = {row["provider"]: row for row in json.loads(out)}
    assert rows["fal-qwen"]["one_image_usd"] is None
    assert rows["ideogram"]["one_image_usd"] == "$0.060000"
    code, out = run("settings", "export")
    assert code == 0 and json.loads(out)["prices"]["fal-qwen"]["usd_per_unit"] == "1E+1000"  # shown to be fixed


def test_an_import_with_a_configured_key_never_prints_it(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_0123456789abcdefSECRET"
    monkeypatch.setenv("HF_TOKEN", secret)
    leaky = ready / "leaky.json"
    leaky.write_text(
        json.dumps({"format": "imagegate.settings", "format_version": 1, "providers": {"sandbox": {secret: 1}}})
    )
    code, out = run("settings", "import", str(leaky), "--dry-run")
    assert code == 2 and "configured API key HF_TOKEN" in out and secret not in out
