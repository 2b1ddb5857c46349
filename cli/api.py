"""`imagegate api`: the REST API on uvicorn (api.app.create_app). Registered in cli/main.py."""

from __future__ import annotations

from typing import Annotated

import typer

from common.config import disable_telemetry

DEFAULT_API_PORT = 8000
DEFAULT_KEEP_ALIVE_S = 75
"""How long an idle HTTP connection stays open. Above the idle timeouts of the usual load balancers (nginx 75 s
by default on the client side, 60 s for cloud ones): a backend that closes first races the balancer's next
request on that connection, which the balancer answers with a 502. uvicorn's own default is 5 s."""


def api(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = DEFAULT_API_PORT,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes (about one per core).")] = 1,
    keep_alive: Annotated[
        int,
        typer.Option(
            min=1,
            max=3600,
            help="Seconds an idle connection stays open; keep it above your load balancer's idle timeout.",
        ),
    ] = DEFAULT_KEEP_ALIVE_S,
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
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_keep_alive=keep_alive,
        log_level="info",
    )
