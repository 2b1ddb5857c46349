"""`imagegate tokens create|list|revoke`: API tokens for the REST API (core.api_tokens decides everything).

Registered in cli/main.py; errors are mapped there (InvalidInput 2, PermissionDenied 3, NotFound 4, ...).
The CLI acts as the system actor, so it may manage anyone's tokens, as an admin may in the console.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.tables import echo_rows
from core.security import Role
from db.engine import transaction

tokens_app = typer.Typer(help="API tokens for the REST API (the secret is shown once).", no_args_is_help=True)


def _when(value: object) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


@tokens_app.command("create")
def tokens_create(
    username: Annotated[str, typer.Argument(help="The account the token acts as.")],
    name: Annotated[str, typer.Option("--name", help="What uses it, e.g. 'nightly batch'.")],
    role: Annotated[
        Role | None, typer.Option(help="Act with a lesser role than the user's (never above it).", case_sensitive=False)
    ] = None,
    days: Annotated[int, typer.Option(help="Lifetime in days (0: never expires).")] = 90,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per minute (default: the installation's).")] = None,
) -> None:
    """Create a token and print its secret once (it cannot be shown again)."""
    from cli.main import _cli_actor, _find_user_id, _runtime
    from core.api_tokens import create_token

    runtime = _runtime()
    user_id = _find_user_id(runtime, username)
    with transaction(runtime.sessions) as session:
        created = create_token(
            session,
            _cli_actor(),
            user_id,
            name,
            role=role,
            expires_in_days=days or None,
            rate_limit_per_minute=rate_limit,
        )
    token = created.token
    typer.echo(
        f"created token {token.id} '{token.name}' for {token.username} ({token.effective_role.value}), "
        f"expires {_when(token.expires_at) if token.expires_at else 'never'}"
    )
    typer.echo("Copy it now; it is not stored and cannot be shown again:", err=True)
    typer.echo(created.secret)


@tokens_app.command("list")
def tokens_list(
    username: Annotated[str | None, typer.Argument(help="Only this user's tokens.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """List tokens (never their secrets): owner, name, prefix, role, status, last use, expiry."""
    from cli.main import _cli_actor, _find_user_id, _runtime
    from core.api_tokens import list_tokens

    runtime = _runtime()
    user_id = _find_user_id(runtime, username) if username else None
    with runtime.sessions() as session:
        tokens = list_tokens(session, _cli_actor(), user_id)
    echo_rows(
        tokens,
        lambda t: (
            f"{t.id:>5} {t.username:<20} {t.prefix}… {t.effective_role.value:<6} {t.status():<16} "
            f"used {_when(t.last_used_at):<16} expires {_when(t.expires_at):<16} {t.name}"
        ),
        empty="no API tokens",
        as_json=as_json,
        to_json=lambda t: {
            "id": t.id,
            "user": t.username,
            "name": t.name,
            "prefix": t.prefix,
            "role": t.effective_role.value,
            "status": t.status(),
            "rate_limit_per_minute": t.rate_limit_per_minute,
            "created_at": t.created_at.isoformat(),
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "expires_at": t.expires_at.isoformat() if t.expires_at else None,
        },
    )


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[int, typer.Argument(help="The token's id (from `tokens list`).")]) -> None:
    """Revoke a token: refused from its next request on."""
    from cli.main import _cli_actor, _runtime
    from core.api_tokens import revoke_token

    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        token = revoke_token(session, _cli_actor(), token_id)
    typer.echo(f"token {token.id} '{token.name}' of {token.username} is revoked")
