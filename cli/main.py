"""`imagegate`: the operator's command line. Every command calls core; nothing here decides anything.

The CLI runs with the machine's access to the database, which already bypasses the console's roles, so it acts
as the system (core.security.Actor.system, an in-process privilege, not a role claim), audited as `cli:<os user>`.

Errors are mapped once, for every command (`_ErrorMappingGroup`), to a message and the exit code
common/errors.py documents: InvalidInput 2, PermissionDenied and AccountLocked 3, NotFound 4, Conflict 5,
DatabaseUnavailable 6, ProviderError 7, BudgetExceeded 8; anything else is 1. No command prints a traceback
for bad input; `IMAGEGATE_DEBUG=1` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.exc import SQLAlchemyError
from typer.core import TyperGroup

from cli.api import api as api_command
from cli.preferences import preferences_app
from cli.spend import alerts_app, webhooks_app
from cli.tables import echo_rows
from cli.tokens import tokens_app
from common.config import disable_telemetry
from common.errors import (
    DatabaseUnavailable,
    ImagegateError,
    InvalidInput,
    NotFound,
)
from common.problems import kind_of
from core.runtime import Runtime, open_runtime
from core.security import Actor, Role
from db.engine import transaction

DEBUG_ENV = "IMAGEGATE_DEBUG"


def exit_code_for(error: ImagegateError) -> int:
    """The exit code of common.problems.ERROR_KINDS (the one table of the error tree's outward faces)."""
    kind = kind_of(error)
    return 1 if kind is None else kind.exit_code


def _report(error: BaseException) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    if isinstance(error, InvalidInput):
        for field, message in error.field_errors.items():
            typer.secho(f"  {field}: {message}", fg=typer.colors.RED, err=True)


class _ErrorMappingGroup(TyperGroup):
    """The top-level group: every command runs inside its invoke, so errors are mapped here, once."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click privately)
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # usage errors and deliberate exits: typer prints and exits as usual
        except ImagegateError as error:
            _report(error)
            raise typer.Exit(exit_code_for(error)) from None
        except SQLAlchemyError as error:
            # Whatever db.engine did not already turn into DatabaseUnavailable (a table missing, say).
            cause = str(getattr(error, "orig", None) or error).strip().splitlines()
            unusable = DatabaseUnavailable(f"database error: {cause[0] if cause else type(error).__name__}")
            _report(unusable)
            raise typer.Exit(exit_code_for(unusable)) from None
        except OSError as error:
            # A file or network problem outside core (an output path, a port): say which, no traceback.
            where = f" ({error.filename})" if error.filename else ""
            typer.secho(f"error: {error.strerror or error}{where}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except Exception as error:
            if os.environ.get(DEBUG_ENV):
                raise
            typer.secho(
                f"error: unexpected failure ({type(error).__name__}): {error}\n"
                f"This is a bug in Imagegate; run again with {DEBUG_ENV}=1 to see where it happened.",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_ErrorMappingGroup,
    help="Imagegate: AI image providers behind one gate.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold API keys; a traceback must never print one
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
users_app = typer.Typer(help="Local user accounts.", no_args_is_help=True)
settings_app = typer.Typer(help="Provider settings and prices as JSON.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(settings_app, name="settings")
budgets_app = typer.Typer(
    help="Spending limits: global, per provider, per user; daily or monthly (UTC).", no_args_is_help=True
)
usage_app = typer.Typer(help="Usage and spend from the daily rollups.", no_args_is_help=True)
app.add_typer(budgets_app, name="budgets")
app.add_typer(usage_app, name="usage")
app.add_typer(alerts_app, name="alerts")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(tokens_app, name="tokens")
app.add_typer(preferences_app, name="preferences")
app.command("api")(api_command)


def _cli_actor() -> Actor:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Actor.system(f"cli:{who}")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _runtime(prepare: bool = False) -> Runtime:
    """The database, reachable and at the schema this code expects (or migrated there, with `prepare`).
    DatabaseUnavailable is mapped by _ErrorMappingGroup (exit 6)."""
    runtime = open_runtime(prepare=prepare)
    if not prepare:
        _require_current_schema(runtime)
    return runtime


def _require_current_schema(runtime: Runtime) -> None:
    from alembic.migration import MigrationContext

    from db import migrate
    from db.engine import check_connection

    check_connection(runtime.engine)
    with runtime.engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    head = migrate.head_revision()
    if current != head:
        raise DatabaseUnavailable(
            f"the database at {runtime.display_url} is at revision {current or 'none (empty)'}, not {head}: "
            "run `imagegate db upgrade`"
        )


def _report_field_errors(exc: InvalidInput) -> None:
    _report(exc)


def _migration_error(action: str, error: Exception) -> InvalidInput:
    return InvalidInput(f"cannot {action}: {error}", {"revision": str(error)})


# --- db -----------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database (DATABASE_URL, else the SQLite file in the data directory) to `revision`."""
    from alembic.util import CommandError

    from common.config import database_url
    from db import migrate
    from db.engine import safe_url

    try:
        migrate.upgrade(None, revision)
    except CommandError as exc:  # an unknown revision
        raise _migration_error(f"upgrade to {revision!r}", exc) from None
    typer.echo(f"database {safe_url(database_url())} is at {migrate.current_revision() or 'base'}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")]) -> None:
    """Migrate the database down to `revision`."""
    from alembic.util import CommandError

    from db import migrate

    try:
        migrate.downgrade(None, revision)
    except CommandError as exc:  # an unknown revision, or one above the current
        raise _migration_error(f"downgrade to {revision!r}", exc) from None
    typer.echo(f"database is at {migrate.current_revision() or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the newest one available."""
    from db import migrate

    typer.echo(f"current: {migrate.current_revision() or 'base (empty)'}; head: {migrate.head_revision()}")


# --- seed & debug-config ------------------------------------------------------------------------------------


@app.command()
def seed() -> None:
    """Create the default settings, presets and prices that are missing (idempotent)."""
    from core.seed import seed_defaults

    runtime = _runtime()
    report = seed_defaults(runtime.sessions)
    if not report.created_anything:
        typer.echo("nothing to seed: defaults already present")
        return
    if report.provider_settings:
        typer.echo(f"provider settings created: {', '.join(report.provider_settings)}")
    if report.global_settings:
        typer.echo("global settings created")
    if report.prices:
        typer.echo(f"prices stored: {', '.join(report.prices)}")


@app.command("debug-config")
def debug_config(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Effective settings per provider, where each value comes from, the price, and whether a key is set
    (masked: keys are never printed)."""
    from core.overview import provider_overviews

    runtime = _runtime()
    with runtime.sessions() as session:
        overviews = provider_overviews(session)
    if as_json:
        out = [
            {
                "provider": o.provider,
                "mode": o.connection.mode.value,
                "connection": o.connection.reason,
                "key": o.key.masked,
                "settings_version": o.settings_version,
                "priority": o.settings.priority if o.settings else None,
                "active": o.settings.active if o.settings else None,
                "default": o.settings.is_default if o.settings else None,
                "price": o.price_description,
                "one_image_usd": o.one_image.formatted if o.one_image else None,
                "effective": o.effective_rows(),
                "problems": o.problems,
            }
            for o in overviews
        ]
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    typer.echo(f"database: {runtime.display_url}")
    for o in overviews:
        typer.secho(f"\n{o.spec.label} ({o.provider})", bold=True)
        typer.echo(f"  mode: {o.connection.mode.value} — {o.connection.reason}")
        typer.echo(f"  key: {o.key.masked}")
        if o.settings:
            typer.echo(
                f"  settings v{o.settings_version}: priority {o.settings.priority}, "
                f"{'active' if o.settings.active else 'inactive'}, "
                f"{'default' if o.settings.is_default else 'not default'}"
            )
        typer.echo(f"  price: {o.price_description or 'none'}")
        if o.one_image:
            typer.echo(f"  one image at these settings: {o.one_image.formatted}")
        for row in o.effective_rows():
            typer.echo(f"    {row['parameter']:<24} {row['value']!s:<20} from {row['from']}")
        for problem in o.problems:
            typer.secho(f"  ! {problem}", fg=typer.colors.YELLOW)


@app.command("first-run-code", hidden=True)
def first_run_code() -> None:
    """While no account exists: print the first-run banner (stderr) and a fresh set-up code (stdout), for
    manage.py to hand to the console it starts. Prints nothing once an account exists."""
    from core.setup_code import new_setup_code, setup_banner
    from core.users import needs_first_admin

    runtime = _runtime()
    with runtime.sessions() as session:
        if not needs_first_admin(session):
            return
    code = new_setup_code()
    typer.echo(setup_banner(code), err=True)
    typer.echo(code)


# --- users --------------------------------------------------------------------------------------------------


def _find_user_id(runtime: Runtime, username: str) -> int:
    from core.users import find_user

    with runtime.sessions() as session:
        return find_user(session, username).id  # NotFound (4) and InvalidInput (2) are mapped


def _read_password(given: str | None, *, confirm: bool = True) -> str:
    if given is not None:
        return given
    if not sys.stdin.isatty():
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            message = "no password given (use --password-stdin with the password on standard input)"
            raise InvalidInput(message, {"password": message})
        return line
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=confirm))


@users_app.command("create")
def users_create(
    username: str,
    role: Annotated[Role, typer.Option(help="ADMIN, HERO or USER.", case_sensitive=False)] = Role.USER,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a local account (asks for the password; it is stored as an argon2 hash)."""
    from core.users import create_user

    runtime = _runtime()
    password = _read_password(None) if not password_stdin else sys.stdin.readline().rstrip("\n")
    with transaction(runtime.sessions) as session:
        user = create_user(session, _cli_actor(), username, password, role)
    typer.echo(f"created {user.username} ({user.role.value})")


@users_app.command("set-role")
def users_set_role(
    username: str, role: Annotated[Role, typer.Argument(help="ADMIN, HERO or USER.", case_sensitive=False)]
) -> None:
    """Change a user's role."""
    from core.users import set_role

    runtime = _runtime()
    user_id = _find_user_id(runtime, username)
    with transaction(runtime.sessions) as session:
        user = set_role(session, _cli_actor(), user_id, role)
    typer.echo(f"{user.username} is now {user.role.value}")


@users_app.command("reset-password")
def users_reset_password(
    username: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the new password from standard input.")
    ] = False,
) -> None:
    """Set a new password for a user."""
    from core.users import reset_password

    runtime = _runtime()
    user_id = _find_user_id(runtime, username)
    password = _read_password(None) if not password_stdin else sys.stdin.readline().rstrip("\n")
    with transaction(runtime.sessions) as session:
        user = reset_password(session, _cli_actor(), user_id, password)
    typer.echo(f"password of {user.username} reset")


@users_app.command("list")
def users_list() -> None:
    """List accounts."""
    from core.users import list_users

    runtime = _runtime()
    with runtime.sessions() as session:
        users = list_users(session, _cli_actor())
    for u in users:
        state = "active" if u.active else "deactivated"
        typer.echo(f"{u.username:<24} {u.role.value:<6} {state}")


# --- settings export / import -------------------------------------------------------------------------------


@settings_app.command("export")
def settings_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write; default stdout.")] = None,
) -> None:
    """Export every provider's current settings, the global settings and the prices as JSON (no secrets)."""
    from core.transfer import export_json

    runtime = _runtime()
    with runtime.sessions() as session:
        text = export_json(session, _cli_actor())
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidInput(f"cannot write {output}: {reason}", {"output": reason}) from None
    typer.echo(f"wrote {output}")


@settings_app.command("import")
def settings_import(
    path: Annotated[Path, typer.Argument(help="A file made by `imagegate settings export`.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")] = False,
) -> None:
    """Import settings and prices: validated whole, applied all-or-nothing as new versions with audit rows.
    Shows each changed field with its old and new value."""
    from core.transfer import apply_import, plan_import, read_import_file

    try:
        raw = read_import_file(path)  # regular files only, never more than the limit (+1 byte) read
        runtime = _runtime()
        if dry_run:
            with runtime.sessions() as session:
                plan = plan_import(session, _cli_actor(), raw)
            typer.echo("dry run, nothing changed:")
        else:
            with transaction(runtime.sessions) as session:
                plan = apply_import(session, _cli_actor(), raw)
            typer.echo("imported:")
    except ImagegateError as exc:
        _report(exc)
        typer.secho("nothing was changed", err=True)
        raise typer.Exit(exit_code_for(exc)) from None
    typer.echo(plan.summary())


# --- emulator & test-provider ---------------------------------------------------------------------------------


@app.command()
def emulator(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8787,
) -> None:
    """Run the local provider emulator (fal, Ideogram, HF Inference, the Qwen Space) with fault injection."""
    disable_telemetry()
    from emulator.server import run

    _check_can_listen(host, port)
    run(host, port)


def _check_can_listen(host: str, port: int) -> None:
    """Refuse an address the emulator could not serve on with a clear message (uvicorn would log an error
    and exit with its own code)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"cannot listen on {host}: {exc}", {"host": str(exc)}) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}", {"port": str(exc)}) from None


@app.command()
def health(
    name: Annotated[str | None, typer.Argument(help="One provider; default every provider.")] = None,
    emulator_url: Annotated[
        str | None, typer.Option("--emulator", help="Probe providers without a key at this emulator URL.")
    ] = None,
) -> None:
    """Run each provider's cheap health probe (nothing billable is generated) and show the result."""
    from core.catalog import provider_ids
    from core.providers.registry import EMULATOR_URL_ENV, build_adapter, connection_for

    if emulator_url:
        os.environ[EMULATOR_URL_ENV] = emulator_url
    names = [name] if name else provider_ids()

    async def probe_all() -> list[tuple[str, str, bool, str]]:
        rows = []
        for provider in names:
            adapter = build_adapter(provider)
            try:
                report = await adapter.health_probe()
            finally:
                await adapter.aclose()
            mode = connection_for(provider).mode.value
            detail = f"{report.latency_s * 1000:.0f} ms · {report.detail}"
            if report.error_class is not None:
                detail += f" ({report.error_class.value})"
            rows.append((provider, mode, report.ok, detail))
        return rows

    try:
        rows = asyncio.run(probe_all())
    except KeyError as exc:  # an unknown provider name
        raise NotFound(str(exc.args[0])) from None
    for provider, mode, ok, detail in rows:
        mark = typer.style("ok  ", fg=typer.colors.GREEN) if ok else typer.style("DOWN", fg=typer.colors.RED)
        typer.echo(f"{mark} {provider:<12} {mode:<9} {detail}")
    if not all(ok for _, _, ok, _ in rows):
        raise typer.Exit(1)


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise InvalidInput(f"--param takes NAME=VALUE, not {text!r}", {"param": "expected NAME=VALUE"})
    name, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


@app.command("test-provider")
def test_provider(
    name: Annotated[str, typer.Argument(help="fal-qwen, ideogram, huggingface, qwen or sandbox.")],
    prompt: Annotated[str, typer.Option(help="The prompt.")] = "a lighthouse on a cliff at dawn, watercolor",
    preset: Annotated[str | None, typer.Option(help="Fast, Standard, High or Ultra.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE override.")] = None,
    emulator_url: Annotated[
        str | None, typer.Option("--emulator", help="Run against this emulator URL (no key needed).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Deadline in seconds for the whole attempt.")] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Make the call even though the provider is live and it costs money.")
    ] = False,
) -> None:
    """One call to one provider through the generation service (no retry, no fallback): progress, timings,
    cost, and the error class on failure. It is recorded like any request: a usage row, and its cost against
    the budgets (simulated for the sandbox and the emulator).

    With a key in the environment this reaches the real provider and costs money: it shows the estimate and
    runs only with --yes. Sandbox and emulator runs need none."""
    from core.catalog import PROVIDERS
    from core.generation.models import GenerationFailed, GenerationRequest, ProgressUpdate
    from core.generation.prepare import prepare
    from core.generation.service import generate_sync
    from core.providers.base import ConnectionMode
    from core.providers.registry import EMULATOR_URL_ENV, build_adapter, connection_for

    if emulator_url:
        os.environ[EMULATOR_URL_ENV] = emulator_url
    runtime = _runtime(prepare=True)
    overrides = dict(_parse_param(p) for p in (param or []))
    # An unknown name gets no adapter; the preparation step reports it as a field error.
    adapter = build_adapter(name) if name in PROVIDERS else None
    try:
        with runtime.sessions() as session:
            prepared = prepare(
                session, name, prompt=prompt, preset=preset, overrides=overrides, adapter=adapter, timeout_s=timeout
            )
    finally:
        if adapter is not None:  # only for the preview: the service builds the adapter it runs
            asyncio.run(adapter.aclose())
    refusal = prepared.refusal()
    if refusal is not None or adapter is None or prepared.request is None or prepared.effective is None:
        _report_field_errors(refusal or InvalidInput(f"cannot prepare a request for {name}"))
        raise typer.Exit(2)

    connection = connection_for(name)
    typer.echo(f"{name}: {connection.mode.value} ({connection.reason})")
    for note in prepared.effective.notes:
        typer.echo(f"  note: {note}")
    estimate = prepared.estimate
    if estimate is not None:
        typer.echo(f"estimate: {estimate.formatted}  ({'; '.join(estimate.breakdown)})")
    else:
        for problem in prepared.problems:
            typer.secho(f"no estimate: {problem}", fg=typer.colors.YELLOW)
    if prepared.translation is not None:
        typer.echo(f"wire parameters: {json.dumps(prepared.translation.wire_params, default=str)}")
        for note in prepared.translation.notes:
            typer.echo(f"  changed: {note}")

    if connection.mode is ConnectionMode.LIVE and not yes:
        cost = f"about {estimate.formatted}" if estimate is not None else "an unknown amount (no usable price)"
        raise _fail(
            f"{name} is live ({connection.reason}): this call goes to the real provider and costs {cost}. "
            "Run again with --yes to make it (without the key in the environment it runs free, in the sandbox "
            "or with --emulator URL).",
            code=2,
        )

    def on_progress(update: ProgressUpdate) -> None:
        event = update.event
        if event is not None and event.kind.value == "submitted" and event.provider_request_id:
            typer.echo(f"  provider request id: {event.provider_request_id}")
        if update.kind != "attempt":
            typer.echo(f"  {update.message}")

    request = GenerationRequest(
        prompt,
        provider=name,
        preset=preset,
        params=overrides,
        deadline_s=timeout,
        allow_fallback=False,
        max_attempts=1,
    )
    try:
        result = generate_sync(request, _cli_actor(), factory=runtime.sessions, on_progress=on_progress)
    except GenerationFailed as exc:
        failed = exc.errors[-1] if exc.errors else None
        message = failed.message if failed is not None else exc.message
        typer.secho(f"FAILED: {exc.error_class.value}: {message}", fg=typer.colors.RED, err=True)
        typer.echo(
            f"  retryable: {exc.traits.retryable}; billing: {exc.billing.value}"
            + (f" ({exc.billed_units} units)" if exc.billed_units is not None else "")
            + (f"; retry after {exc.retry_after_s:g}s" if exc.retry_after_s is not None else "")
            + (f"; quota back at {exc.reset_at.isoformat()}" if exc.reset_at is not None else "")
        )
        typer.echo(f"  recorded: generation {exc.result.generation_id}, {len(exc.result.attempts)} usage row(s)")
        raise typer.Exit(1) from None
    t = result.timings
    typer.echo(
        f"timings: submit {t.submit_s:.3f}s, queue {t.queue_s:.3f}s, run {t.run_s:.3f}s, "
        f"download {t.download_s:.3f}s, total {t.total_s:.3f}s"
    )
    typer.echo(f"seed: {result.seed}; mode: {result.mode}")
    if result.cost.billed_units is not None:
        typer.echo(f"billed units reported by the provider: {result.cost.billed_units}")
    from core.money import format_usd

    if result.cost.live:
        estimated = format_usd(result.cost.estimated_micro_usd)
        typer.echo(f"cost: {format_usd(result.cost.actual_micro_usd)} (estimate {estimated})")
    else:
        typer.echo(
            f"cost: $0 ({result.mode}; live, this would be about {format_usd(result.cost.actual_micro_usd)}, "
            "counted as simulated spend)"
        )
    for image in result.images:
        typer.echo(f"image: {image.path} ({image.width}x{image.height} {image.format}, {image.size_bytes} bytes)")
    typer.echo(f"recorded: generation {result.generation_id}, {len(result.attempts)} usage row(s)")


# --- generate, recover, worker ------------------------------------------------------------------------------


def _acting(runtime: Runtime, as_user: str | None) -> Actor:
    """The CLI's own system actor, or `--as USER`: that account, authorized from the database by the service
    (exists, active; a USER within their budgets)."""
    if as_user is None:
        return _cli_actor()
    from core.users import find_user

    with runtime.sessions() as session:
        return find_user(session, as_user).actor()


def _progress_printer(err: bool) -> Any:
    from core.generation.models import ProgressUpdate

    def on_progress(update: ProgressUpdate) -> None:
        typer.echo(f"  {update.line}", err=err)

    return on_progress


def _print_result(result: Any) -> None:
    from core.generation.models import GenerationResult
    from core.money import format_usd

    assert isinstance(result, GenerationResult)
    where = f" at {result.provider} ({result.mode})" if result.provider else ""
    replay = " (a repeat: the stored result of the first request with this key)" if result.replayed else ""
    typer.echo(f"generation {result.generation_id}: {result.status.value}{where}{replay}")
    for image in result.images:
        typer.echo(
            f"image: {image.path} ({image.width}x{image.height} {image.format}, {image.size_bytes} bytes, "
            f"seed {image.seed})"
        )
    cost = result.cost
    if cost.live:
        spend = f"{format_usd(cost.actual_micro_usd)} live"
    else:
        spend = f"$0 live; {format_usd(cost.actual_micro_usd)} simulated (the would-be cost, sandbox/emulator)"
    unknown = cost.unknown_billing_micro_usd
    held = f"; {format_usd(unknown)} held (billing unknown)" if unknown else ""
    units = f"; billed units {cost.billed_units}" if cost.billed_units is not None else ""
    typer.echo(f"cost: {spend} (estimate {format_usd(cost.estimated_micro_usd)}){units}{held}")
    t = result.timings
    typer.echo(
        f"latency: total {t.total_s:.3f}s (admission {t.admission_s:.3f}s, submit {t.submit_s:.3f}s, "
        f"queue {t.queue_s:.3f}s, run {t.run_s:.3f}s, download {t.download_s:.3f}s)"
    )
    typer.echo(f"attempts: {len(result.attempts)}")
    for a in result.attempts:
        cost_text = "unknown" if a.actual_micro_usd is None else format_usd(a.actual_micro_usd)
        typer.echo(
            f"  {a.attempt_no}. {a.provider} ({a.mode}, fallback {a.fallback_position}): {a.status}"
            + (f" {a.error_class}" if a.error_class else "")
            + f" [{a.billing}, {cost_text}, {a.total_ms if a.total_ms is not None else '?'} ms]"
        )
    for adjustment in result.adjustments:
        typer.echo(f"  {adjustment.kind.value}: {adjustment.message}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    provider: Annotated[str | None, typer.Option("--provider", help="Run on this provider first.")] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="priority, cheapest, fastest or explicit (default: settings).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Fast, Standard, High or Ultra.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE override.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to avoid.")] = None,
    as_user: Annotated[str | None, typer.Option("--as", help="Act as this account (its budgets apply).")] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Idempotency key: a repeat returns the first result, pays nothing.")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option("--deadline", help="Seconds for the whole request, retries and fallbacks.")
    ] = None,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Only the first provider runs.")] = False,
    emulator_url: Annotated[
        str | None, typer.Option("--emulator", help="Providers without a key use this emulator URL.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The result as JSON (progress on stderr).")] = False,
) -> None:
    """Generate images through the service: routing, fallback, budgets and a usage row per attempt. Prints
    progress, then the images, the cost, the latency and every attempt."""
    from core.generation.models import GenerationFailed, GenerationRequest
    from core.generation.service import generate_sync
    from core.providers.registry import EMULATOR_URL_ENV

    if emulator_url:
        os.environ[EMULATOR_URL_ENV] = emulator_url
    runtime = _runtime()
    overrides = dict(_parse_param(p) for p in (param or []))
    actor = _acting(runtime, as_user)
    request = GenerationRequest(
        prompt,
        negative_prompt=negative_prompt,
        provider=provider,
        policy=policy,
        preset=preset,
        params=overrides,
        idempotency_key=key,
        deadline_s=deadline,
        allow_fallback=False if no_fallback else None,
    )
    try:
        result = generate_sync(request, actor, factory=runtime.sessions, on_progress=_progress_printer(as_json))
    except GenerationFailed as exc:
        if as_json:
            typer.echo(json.dumps(exc.result.to_dict(), indent=2, default=str))
        raise
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print_result(result)
    if not result.status.finished:
        raise _fail(
            f"generation {result.generation_id} is still {result.status.value} (the first request with this key "
            "has not finished; if its process died, `imagegate recover` finishes it)",
            code=5,
        )


@app.command()
def recover(
    emulator_url: Annotated[
        str | None, typer.Option("--emulator", help="Providers without a key use this emulator URL.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Collect the paid results of generations whose process died (by their provider request id) and settle
    or release their reservations, exactly once; close what cannot be collected; expire stale reservations."""
    from core.generation.recovery import recover_sync
    from core.providers.registry import EMULATOR_URL_ENV

    if emulator_url:
        os.environ[EMULATOR_URL_ENV] = emulator_url
    runtime = _runtime()
    report = recover_sync(runtime.sessions)
    if as_json:
        out = {
            "attempts": [a.__dict__ for a in report.attempts],
            "generations_closed": list(report.generations_closed),
            "reservations_expired": report.reservations_expired,
            "collected": report.collected,
        }
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    for line in report.lines():
        typer.echo(line)


@app.command()
def worker(
    once: Annotated[bool, typer.Option("--once", help="One round of every job, then exit.")] = False,
    emulator_url: Annotated[
        str | None, typer.Option("--emulator", help="Providers without a key use this emulator URL.")
    ] = None,
) -> None:
    """The background jobs: recovery (at start and every 30 s), expiry of stale reservations, health probes
    (every health_probe_interval_s), clean-up of dead slot waiters. Stops at SIGTERM or Ctrl+C."""
    from core.generation.worker import run_worker_until_signalled
    from core.providers.registry import EMULATOR_URL_ENV

    if emulator_url:
        os.environ[EMULATOR_URL_ENV] = emulator_url
    disable_telemetry()
    runtime = _runtime()

    def say(line: str) -> None:
        typer.echo(f"[worker] {line}")

    say(f"started on {runtime.display_url}" + (" (one round)" if once else ""))
    report = asyncio.run(run_worker_until_signalled(runtime.sessions, once=once, say=say))
    rounds = ", ".join(f"{job} x{n}" for job, n in report.rounds.items())
    say(
        f"stopped: {rounds}; collected {report.recovered}, closed {report.closed}, expired {report.expired}, "
        f"probes {report.probes}, alerts {report.alerts}, webhook posts {report.deliveries}, "
        f"errors {len(report.errors)}"
    )
    if once and report.errors:
        raise typer.Exit(1)


# --- budgets ------------------------------------------------------------------------------------------------


def _usd_micros(text: str, field: str) -> int:
    from core.money import money_limit, usd_to_micros

    try:
        return usd_to_micros(money_limit(text.strip().lstrip("$"), f"--{field}"))
    except ValueError as exc:  # the money gate says what is wrong with the amount
        raise InvalidInput(str(exc), {field: str(exc)}) from None


def _find_budget(session: Any, ref: str) -> Any:
    from core.generation.budgets import get_budget, list_budgets

    if ref.isdigit():
        return get_budget(session, int(ref))
    matches = [b for b in list_budgets(session) if b.name.lower() == ref.strip().lower()]
    if not matches:
        raise NotFound(f"no budget named {ref!r} (give its name or its id; `imagegate budgets list` shows both)")
    if len(matches) > 1:
        ids = ", ".join(str(b.id) for b in matches)
        raise InvalidInput(f"several budgets are named {ref!r} (ids {ids}); give the id", {"budget": "ambiguous"})
    return matches[0]


@budgets_app.command("list")
def budgets_list(
    include_deleted: Annotated[bool, typer.Option("--all", help="Include deleted budgets.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every budget with this period's figures, live and simulated apart (they never add up)."""
    from core.generation.budgets import SpendMode, current_figures, list_budgets
    from core.money import format_usd

    runtime = _runtime()
    rows: list[dict[str, Any]] = []
    with runtime.sessions() as session:
        for budget in list_budgets(session, include_deleted=include_deleted):
            figures = {mode.value: current_figures(session, budget.id, mode) for mode in SpendMode}
            rows.append(
                {
                    "id": budget.id,
                    "name": budget.name,
                    "scope": budget.scope.value,
                    "scope_id": budget.scope_id,
                    "period": budget.period.value,
                    "limit_micro_usd": budget.limit_micro_usd,
                    "hard": budget.hard,
                    "degrade_action": budget.degrade_action,
                    "active": budget.active,
                    "deleted": budget.deleted_at is not None,
                    "from_settings": budget.settings_provider,
                    **{
                        mode: {
                            "period_start": f.period_start.isoformat(),
                            "spent_micro_usd": f.spent_micro_usd,
                            "reserved_micro_usd": f.reserved_micro_usd,
                            "left_micro_usd": f.left_micro_usd,
                        }
                        for mode, f in figures.items()
                    },
                }
            )

    def lines(row: dict[str, Any]) -> str:
        """The budget, then its figures in each spend mode on lines of their own."""
        scope = row["scope"] + (f":{row['scope_id']}" if row["scope_id"] else "")
        kind = "hard" if row["hard"] else f"soft ({row['degrade_action']})"
        state = "" if row["active"] else (" [deleted]" if row["deleted"] else " [inactive]")
        source = " (from the provider's settings)" if row["from_settings"] else ""
        limit_text = format_usd(row["limit_micro_usd"])
        out = [f"#{row['id']} {row['name']}: {scope}, {row['period']}, {kind}, limit {limit_text}{state}{source}"]
        for mode in ("live", "simulated"):
            f = row[mode]
            spent, held = format_usd(f["spent_micro_usd"]), format_usd(f["reserved_micro_usd"])
            out.append(f"    {mode:<9} spent {spent}, reserved {held}, left {format_usd(f['left_micro_usd'])}")
        return "\n".join(out)

    echo_rows(rows, lines, empty="no budgets (create one with `imagegate budgets create`)", as_json=as_json)


@budgets_app.command("create")
def budgets_create(
    name: Annotated[str, typer.Argument(help="A name people recognise.")],
    limit: Annotated[str, typer.Option("--limit", help="The limit in USD, e.g. 25 or 2.50.")],
    period: Annotated[str, typer.Option("--period", help="daily or monthly (UTC calendar).")] = "monthly",
    provider: Annotated[str | None, typer.Option("--provider", help="A provider's budget.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="A user's budget (username).")] = None,
    soft: Annotated[bool, typer.Option("--soft", help="Degrade instead of refusing (needs --degrade).")] = False,
    degrade: Annotated[
        str | None, typer.Option("--degrade", help="cheaper_preset, smaller_size or cheaper_provider.")
    ] = None,
) -> None:
    """Create a budget: global (default), a provider's (--provider) or a user's (--user). Hard budgets refuse;
    soft ones degrade requests. A provider's DAILY budget is its settings' daily_cost_limit_usd."""
    from core.generation.budgets import create_budget
    from core.users import find_user
    from db.models import BudgetScope

    if provider and user:
        raise InvalidInput("a budget is for one provider or one user, not both", {"scope": "--provider or --user"})
    runtime = _runtime()
    micros = _usd_micros(limit, "limit")
    with transaction(runtime.sessions) as session:
        scope_id: str | int | None = None
        scope = BudgetScope.GLOBAL
        if provider:
            scope, scope_id = BudgetScope.PROVIDER, provider
        elif user:
            scope, scope_id = BudgetScope.USER, find_user(session, user).id
        view = create_budget(
            session,
            _cli_actor(),
            name=name,
            scope=scope,
            period=period.strip().lower(),
            limit_micro_usd=micros,
            scope_id=scope_id,
            hard=not soft,
            degrade_action=degrade,
        )
    from core.money import format_usd

    kind = "hard" if view.hard else f"soft, {view.degrade_action}"
    typer.echo(
        f"created budget #{view.id} {view.name}: {view.scope.value}, {view.period.value}, {kind}, "
        f"limit {format_usd(view.limit_micro_usd)}"
    )


@budgets_app.command("reset")
def budgets_reset(
    budget: Annotated[str, typer.Argument(help="The budget's id or name.")],
    mode: Annotated[str, typer.Option("--mode", help="live or simulated.")] = "live",
    comment: Annotated[str | None, typer.Option("--comment", help="Why (kept in the audit log).")] = None,
) -> None:
    """Start the budget's current period afresh; the closed figures are kept as history."""
    from core.generation.budgets import reset_period
    from core.money import format_usd

    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        view = _find_budget(session, budget)
        closed = reset_period(session, _cli_actor(), view.id, mode.strip().lower(), comment=comment)
    typer.echo(
        f"reset {closed.mode.value} period of #{view.id} {view.name} starting {closed.period_start.date()}: it had "
        f"spent {format_usd(closed.spent_micro_usd)} and reserved {format_usd(closed.reserved_micro_usd)} "
        "(kept as history)"
    )


# --- usage --------------------------------------------------------------------------------------------------


def _day(text: str | None, field: str) -> Any:
    from datetime import date

    if text is None:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--{field} takes a date like 2026-01-31, not {text!r}", {field: "YYYY-MM-DD"}) from None


@usage_app.command("summary")
def usage_summary(
    date_from: Annotated[
        str | None, typer.Option("--from", help="First UTC day (default: the 1st of this month).")
    ] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="Last UTC day, inclusive (default: today).")] = None,
    by: Annotated[
        list[str] | None, typer.Option("--by", help="provider, user or day (repeat to combine); default provider.")
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="live or simulated only.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Attempts, images and spend from the daily rollups, live and simulated always apart."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from core.generation.usage import UsageSummaryRow
    from core.generation.usage import usage_summary as summarize
    from core.money import format_usd
    from db.models import User

    today = datetime.now(UTC).date()
    start = _day(date_from, "from") or today.replace(day=1)
    end = _day(date_to, "to") or today
    dimensions = [d.strip().lower() for d in (by or ["provider"])]
    allowed = ("provider", "user", "day")
    if any(d not in allowed for d in dimensions):
        raise InvalidInput(f"--by takes {', '.join(allowed)}, not {', '.join(dimensions)}", {"by": "/".join(allowed)})
    runtime = _runtime()
    with runtime.sessions() as session:
        rows = summarize(session, date_from=start, date_to=end, by=dimensions, mode=mode)
        names = {u.id: u.username for u in session.scalars(select(User))} if "user" in dimensions else {}

    def label(group: dict[str, Any]) -> str:
        parts = []
        for d in dimensions:
            value = group.get(d)
            if d == "user":
                parts.append(names.get(int(value or 0), "system/CLI") if value else "system/CLI")
            else:
                parts.append(str(value))
        return " · ".join(parts)

    def line(r: UsageSummaryRow) -> str:
        p50 = "-" if r.p50_ms is None else f"{r.p50_ms:.0f} ms"
        p95 = "-" if r.p95_ms is None else f"{r.p95_ms:.0f} ms"
        unknown = f", {r.unknown_billing} with billing unknown" if r.unknown_billing else ""
        return (
            f"{r.spend_mode.upper():<9} {label(r.group)}: {r.attempts} attempt(s), {r.succeeded} succeeded, "
            f"{r.images} image(s); actual {format_usd(r.actual_micro_usd)} (estimated "
            f"{format_usd(r.estimated_micro_usd)}){unknown}; p50 {p50}, p95 {p95}"
        )

    echo_rows(
        rows,
        line,
        header=f"usage {start} .. {end} by {', '.join(dimensions)} (live and simulated spend never add up)",
        empty="no attempts in this range",
        as_json=as_json,
        to_json=lambda r: {
            "spend_mode": r.spend_mode,
            **{d: (str(r.group.get(d)) if d == "day" else r.group.get(d)) for d in dimensions},
            "attempts": r.attempts,
            "succeeded": r.succeeded,
            "images": r.images,
            "estimated_micro_usd": r.estimated_micro_usd,
            "actual_micro_usd": r.actual_micro_usd,
            "unknown_billing": r.unknown_billing,
            "p50_ms": r.p50_ms,
            "p95_ms": r.p95_ms,
        },
    )


from cli.reports import register as _register_reports  # noqa: E402 (after app and its helpers exist)

_register_reports(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
