"""The provider emulator as the benchmarks run it: `python -m bench.emulator_server --port P`.

The emulator app itself (emulator.server) plus two bench-only routes, so a benchmark can state how many HTTP
requests each path really made and keep the emulator's bookkeeping small between batches:

    GET  /_bench/requests    {"requests": N}: HTTP requests served since start (control routes excluded)
    POST /_bench/prune       forget every finished fal job (the fal emulator keeps them for the life of the
                             process and walks all of them on every call, which would slow later batches)
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from emulator import fal as fal_module
from emulator.server import create_emulator_app


class _Counted:
    """ASGI wrapper: counts provider requests and answers the /_bench routes."""

    def __init__(self, app: ASGIApp, fal: Any) -> None:
        self.app = app
        self.fal = fal
        self.count = 0
        self._lock = threading.Lock()

    async def _json(self, send: Send, body: bytes) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/_bench/requests":
            await self._json(send, b'{"requests": %d}' % self.count)
            return
        if path == "/_bench/prune":
            await self._json(send, b'{"pruned": %d}' % self.prune())
            return
        if not path.startswith("/_emulator"):
            with self._lock:
                self.count += 1
        await self.app(scope, receive, send)

    def prune(self) -> int:
        if self.fal is None:
            return 0
        with self.fal._lock:
            done = [key for key, req in self.fal.requests.items() if req.state == "completed"]
            for key in done:
                del self.fal.requests[key]
            self.fal.files.clear()
        return len(done)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The fal emulator keeps its last 512 images (fal's CDN URLs expire too); a burst of 1,000 jobs must still
    # find its own images when it downloads them.
    fal_module.MAX_FILES = max(fal_module.MAX_FILES, 100_000)
    app = create_emulator_app()
    fal_app = app.state.apps.get("fal")
    fal = getattr(fal_app.state, "emulator", None) if fal_app is not None else None
    uvicorn.run(_Counted(app, fal), host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
