"""The provider emulator: one local server speaking each provider's wire protocol, with fault injection.

Run it with `imagegate emulator` or `python -m emulator [--host H] [--port P]` (default 127.0.0.1:8787), then
point the product at it with `IMAGEGATE_EMULATOR_URL=http://127.0.0.1:8787`. Providers without a key then run
their real client library against it. Mounts:

    /fal        fal.ai queue API for fal-ai/qwen-image (fal-client)           emulator.fal
    /ideogram   Ideogram 3.0 REST API                                          emulator.ideogram
    /hf         Hugging Face Inference text-to-image                           emulator.hf
    /qwen/      the Qwen/Qwen-Image Space, a real Gradio app (gradio_client)   emulator.qwen_space
                (only when the optional `gradio` package is installed)
    /_emulator  the control API below
    /           a JSON index of what is mounted where

Faults (emulator.faults.Fault): auth, validation, safety, rate_limit, server_error, hang, drop, malformed,
image_404, not_an_image, quota (qwen), loading (hf). `GET /_emulator/state` lists which faults each provider
supports. A fault is injected in one of two ways:

1. Per request: put `[[fault:NAME]]` in the prompt, e.g. "a red fox [[fault:rate_limit]]".
2. Per provider: `POST /_emulator/faults {"provider": "fal", "fault": "server_error", "count": 2}` makes the
   next 2 fal requests fail (`count: null` = every request until cleared; `"fault": null` clears it).

Behaviour knobs per provider: `POST /_emulator/config {"provider": "fal", "latency_s": 1.5, "queue_steps": 3,
"concurrency": 2, "retry_after_s": 5}` (any subset). `POST /_emulator/reset` restores every default.
Bad input to the control API (unknown provider, fault or knob, wrong type, out of range) gets a 400 with
`{"error": ..., "field": ...}` and changes nothing.

For fal specifically: latency_s is how long a request runs, queue_steps how many status polls see IN_QUEUE
first, concurrency how many run at once (the rest wait IN_QUEUE with a growing queue_position), and
retry_after_s the Retry-After sent with a 429. See emulator.fal for where each fault strikes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message

from emulator import control
from emulator.faults import BOARD, Fault, FaultBoard

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


@dataclass(frozen=True)
class MountSpec:
    provider: str
    """The fault-board name (emulator.faults.PROVIDERS)."""
    path: str
    module: str
    protocol: str
    needs: str | None = None
    """An optional package the module needs; without it the mount is skipped and the index says why."""


MOUNTS: tuple[MountSpec, ...] = (
    MountSpec("fal", "/fal", "emulator.fal", "fal.ai queue API (fal-client)"),
    MountSpec("ideogram", "/ideogram", "emulator.ideogram", "Ideogram 3.0 REST API"),
    MountSpec("hf", "/hf", "emulator.hf", "Hugging Face Inference text-to-image (huggingface_hub)"),
    MountSpec("qwen", "/qwen", "emulator.qwen_space", "Qwen-Image Gradio Space (gradio_client)", needs="gradio"),
)


def _load(spec: MountSpec) -> tuple[ModuleType | None, str]:
    """The emulator module for a mount, or None and the reason it is not available."""
    if spec.needs is not None and importlib.util.find_spec(spec.needs) is None:
        return None, f"the optional package {spec.needs!r} is not installed (pip install 'imagegate[emulator]')"
    if importlib.util.find_spec(spec.module) is None:
        return None, f"{spec.module} does not exist in this build"
    return importlib.import_module(spec.module), ""


class _SubAppLifespans:
    """Runs the ASGI lifespan of every mounted sub-app: Starlette's Mount does not forward it, and an app
    like Gradio starts its queue there. Apps that do not speak lifespan are left alone (uvicorn's 'auto')."""

    def __init__(self, apps: Sequence[ASGIApp]) -> None:
        self.apps = apps

    @contextlib.asynccontextmanager
    async def __call__(self, _app: Starlette) -> AsyncIterator[None]:
        running: list[tuple[asyncio.Queue[Message], asyncio.Queue[Message], asyncio.Task[None]]] = []
        for app in self.apps:
            inbox: asyncio.Queue[Message] = asyncio.Queue()
            outbox: asyncio.Queue[Message] = asyncio.Queue()
            task = asyncio.create_task(self._run(app, inbox, outbox))
            await inbox.put({"type": "lifespan.startup"})
            reply = await outbox.get()
            if reply["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"emulator sub-app failed to start: {reply.get('message', '')}")
            if reply["type"] == "lifespan.startup.complete":
                running.append((inbox, outbox, task))
        try:
            yield
        finally:
            for inbox, outbox, task in reversed(running):
                await inbox.put({"type": "lifespan.shutdown"})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(outbox.get(), timeout=5)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @staticmethod
    async def _run(app: ASGIApp, inbox: asyncio.Queue[Message], outbox: asyncio.Queue[Message]) -> None:
        scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        try:
            await app(scope, inbox.get, outbox.put)
        except Exception as exc:
            # An app without lifespan support raises on the scope type; that is "no lifespan", not a failure.
            log.debug("sub-app %r has no lifespan: %s", app, exc)
        await outbox.put({"type": "lifespan.unsupported"})


def create_emulator_app(board: FaultBoard = BOARD) -> Starlette:
    """The whole emulator as one Starlette app, every provider sharing `board`."""
    routes: list[BaseRoute] = []
    mounted: dict[str, str] = {}
    skipped: dict[str, str] = {}
    modules: dict[str, ModuleType] = {}
    sub_apps: list[ASGIApp] = []
    for spec in MOUNTS:
        module, reason = _load(spec)
        if module is None:
            skipped[spec.provider] = reason
            continue
        sub_app: ASGIApp = module.create_app(board)
        modules[spec.provider] = module
        sub_apps.append(sub_app)
        # Starlette redirects /qwen to /qwen/ by itself (redirect_slashes).
        routes.append(Mount(spec.path, app=sub_app))
        mounted[spec.provider] = spec.path + ("/" if spec.provider == "qwen" else "")

    def supported_faults(provider: str) -> frozenset[Fault] | None:
        module = modules.get(provider)
        found = getattr(module, "SUPPORTED_FAULTS", None) if module is not None else None
        return frozenset(Fault(f) for f in found) if found is not None else None

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "emulator": "imagegate provider emulator",
                "mounts": {
                    spec.provider: {"path": mounted[spec.provider], "protocol": spec.protocol}
                    for spec in MOUNTS
                    if spec.provider in mounted
                },
                "not_mounted": skipped,
                "control": {
                    "state": "GET /_emulator/state",
                    "faults": "POST /_emulator/faults",
                    "config": "POST /_emulator/config",
                    "reset": "POST /_emulator/reset",
                },
                "faults": [f.value for f in Fault],
            }
        )

    control_routes = control.routes(board, supported_faults, lambda: dict(mounted))
    app = Starlette(
        routes=[Route("/", index, methods=["GET"]), Mount("/_emulator", routes=control_routes), *routes],
        lifespan=_SubAppLifespans(sub_apps),
    )
    app.state.board = board
    app.state.mounted = dict(mounted)
    app.state.apps = dict(zip(mounted, sub_apps, strict=True))
    """provider -> its mounted ASGI app, for tests and tools that need to look inside one."""
    app.state.not_mounted = dict(skipped)
    return app


def run(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the emulator in the foreground until interrupted (`imagegate emulator`)."""
    import uvicorn

    app = create_emulator_app()
    not_mounted = app.state.not_mounted
    print(f"Imagegate emulator on http://{host}:{port}  (IMAGEGATE_EMULATOR_URL=http://{host}:{port})")
    for provider, path in app.state.mounted.items():
        print(f"  {provider:<9} http://{host}:{port}{path}")
    for provider, reason in not_mounted.items():
        print(f"  {provider:<9} not mounted: {reason}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator", description="Imagegate's local provider emulator")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    run(args.host, args.port)
