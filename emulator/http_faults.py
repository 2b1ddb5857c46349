"""Faults at the HTTP level, shared by every HTTP emulator.

- `drop`: a response that starts, promises more body than it sends, then aborts, so the client sees the
  connection closed mid-answer.
- `hang`: the request is held open without an answer until the client gives up (or a safety limit).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EmulatedDrop(ConnectionAbortedError):
    """Raised inside a response to make the server abort it on purpose."""


class _QuietDrops(logging.Filter):
    """Keeps the server log free of tracebacks for drops we cause on purpose; real errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, EmulatedDrop)


def quiet_emulated_drops() -> None:
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in server_log.filters):
        server_log.addFilter(_QuietDrops())


class DroppedResponse(Response):
    """Sends the headers and the first bytes of `body_start`, announcing `promised_length`, then aborts."""

    def __init__(self, media_type: str, body_start: bytes, promised_length: int = 4096) -> None:
        super().__init__(status_code=200, media_type=media_type)
        self.body_start = body_start
        self.promised_length = promised_length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", self.media_type.encode() if self.media_type else b"application/octet-stream"),
            (b"content-length", str(self.promised_length).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body_start, "more_body": True})
        raise EmulatedDrop("emulator: dropped the connection mid-response (fault 'drop')")


HANG_LIMIT_S = 120.0
"""A hung request is released after this long, so a forgotten test client never pins the server."""


async def hold_open(request: Request, limit_s: float = HANG_LIMIT_S) -> None:
    """Hold the request open, without answering, until the client disconnects or `limit_s` passes."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)
