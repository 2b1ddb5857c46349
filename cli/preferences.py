"""`imagegate preferences show|set USER`: a user's own defaults (size, preset, negative prompt), within the
fields the admins allow (core.preferences decides everything; registered in cli/main.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from db.engine import transaction

preferences_app = typer.Typer(help="Users' own defaults (size, preset, negative prompt).", no_args_is_help=True)


def _show(view: object) -> dict[str, object]:
    from core.preferences import PreferencesView

    assert isinstance(view, PreferencesView)
    return {
        "user_id": view.user_id,
        "version": view.version,
        "preferences": view.values.model_dump(exclude_none=True),
        "allowed_fields": list(view.allowed_fields),
    }


@preferences_app.command("show")
def preferences_show(
    username: Annotated[str, typer.Argument(help="Whose preferences.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """A user's saved defaults and the fields the admins allow."""
    from cli.main import _cli_actor, _find_user_id, _runtime
    from core.preferences import get_preferences

    runtime = _runtime()
    user_id = _find_user_id(runtime, username)
    with runtime.sessions() as session:
        shown = _show(get_preferences(session, _cli_actor(), user_id))
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    values = shown["preferences"] or "none saved"
    allowed = ", ".join(str(field) for field in shown["allowed_fields"])  # type: ignore[attr-defined]
    typer.echo(f"{username}: {values} (version {shown['version']}; allowed: {allowed})")


@preferences_app.command("set")
def preferences_set(
    username: Annotated[str, typer.Argument(help="Whose preferences.")],
    image_size: Annotated[str | None, typer.Option("--size", help="e.g. square_hd, 16:9 or 1024x768.")] = None,
    preset: Annotated[str | None, typer.Option(help="fast, standard, high, ultra or none.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt")] = None,
) -> None:
    """Replace a user's defaults with the values given (anything left out is cleared)."""
    from cli.main import _cli_actor, _find_user_id, _runtime
    from core.preferences import get_preferences, save_preferences

    runtime = _runtime()
    user_id = _find_user_id(runtime, username)
    wanted = {"image_size": image_size, "preset": preset, "negative_prompt": negative_prompt}
    with transaction(runtime.sessions) as session:
        current = get_preferences(session, _cli_actor(), user_id)
        saved = save_preferences(
            session,
            _cli_actor(),
            user_id,
            {k: v for k, v in wanted.items() if v is not None},
            expected_version=current.version,
        )
    typer.echo(f"saved {username}'s preferences (version {saved.version}): {_show(saved)['preferences'] or 'none'}")
