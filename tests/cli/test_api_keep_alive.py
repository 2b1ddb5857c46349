"""`imagegate api --keep-alive`: an idle HTTP connection stays open as long as it says (75 s unless told), so a load
balancer with a shorter idle timeout never sends a request on a connection the API is closing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emulator.runner import free_port

IMAGEGATE = Path(sys.executable).with_name("imagegate")
REQUEST = b"GET /api/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextmanager
def api_process(tmp_path: Path, *options: str) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
        "IMAGEGATE_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen(
        [str(IMAGEGATE), "api", "--port", str(port), *options],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                pytest.fail(f"imagegate api exited ({process.returncode}):\n{err[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("imagegate api did not listen within 60 s")
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def idle_connection_open_after(port: int, idle_s: float) -> bool:
    """One request on a fresh connection, then `idle_s` of silence: is the connection still open?"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(REQUEST)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(4096)
            assert chunk, f"the API closed the connection before answering: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        time.sleep(idle_s)
        conn.settimeout(0.5)
        try:
            return conn.recv(1) != b""  # b"": the server closed it (nothing else is sent unasked)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False


@pytest.mark.timeout(180)
def test_idle_connections_live_as_long_as_keep_alive_says(tmp_path: Path) -> None:
    with api_process(tmp_path, "--keep-alive", "1") as port:
        assert not idle_connection_open_after(port, 2.5)
    # The default outlives uvicorn's own 5 s, which load balancers' idle timeouts exceed.
    with api_process(tmp_path) as port:
        assert idle_connection_open_after(port, 6.5)
