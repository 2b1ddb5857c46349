"""`imagegate api`: the REST API on uvicorn (api.app.create_app). Registered in cli/main.py."""

from __future__ import annotations

from typing import Annotated

import typer

from common.config import disable_telemetry

DEFAULT_API_PORT = 8000


def api(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = DEFAULT_API_PORT,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes (about one per core).")] = 1,
) -> None:
    """Serve the REST API (OpenAPI at /docs and /openapi.json). Every process migrates and seeds the database if
    needed, runs its own job worker, and shares budgets, breakers and the job queue with the others through it."""
    import uvicorn

    from cli.main import _check_can_listen
    from db import migrate

    disable_telemetry()
    _check_can_listen(host, port)  # a clear refusal instead of uvicorn's log line and exit code
    migrate.upgrade()  # once here, so the worker processes find the schema ready
    typer.echo(f"imagegate api on http://{host}:{port} ({workers} worker process{'es' if workers > 1 else ''})")
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")
