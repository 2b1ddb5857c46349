"""A real webhook receiver for tests: an HTTP server on a free loopback port, in a thread.

It does what the README tells receivers to do (`core.spend.webhooks.verify_signature` on the raw body, the
timestamp and signature headers, 5 minutes' tolerance), records every post, answers `fail_first` posts with
`fail_status`, then 200; `delay_s` holds each answer (to make workers overlap)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common.errors import InvalidInput
from core.spend.webhooks import verify_signature


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    signature_error: str | None
    answered: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: str
    fail_first: int = 0
    fail_status: int = 500
    delay_s: float = 0.0
    posts: list[Post] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/imagegate"


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            error: str | None = None
            try:
                verify_signature(
                    receiver.secret,
                    self.headers.get("X-Imagegate-Timestamp", ""),
                    body,
                    self.headers.get("X-Imagegate-Signature", ""),
                )
            except InvalidInput as refused:
                error = str(refused)
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            with receiver.lock:
                failing = len(receiver.posts) < receiver.fail_first
                status = 401 if error else (receiver.fail_status if failing else 200)
                receiver.posts.append(Post(self.path, dict(self.headers.items()), body, error is None, error, status))
            payload = b'{"ok": true}' if status == 200 else b'{"error": "try later"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog (5) refuses connections when many workers post at once
    daemon_threads = True


@contextmanager
def serve(receiver: Receiver) -> Iterator[Receiver]:
    """Serve on a free port picked at random in 20000-40000 (the machine is shared)."""
    server: _Server | None = None
    for _ in range(50):
        port = random.randint(20000, 40000)
        try:
            server = _Server(("127.0.0.1", port), _handler(receiver))
            break
        except OSError:
            continue
    assert server is not None, "no free port in 20000-40000"
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
