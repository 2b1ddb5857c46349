"""The `drop` fault: a response that starts, promises more body than it sends, then aborts, so the client
sees the connection closed mid-answer. Shared by every HTTP emulator."""

from __future__ import annotations

import logging

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
