#!/usr/bin/env python3
"""The two set-up commands. Needs only Python 3.11 and pip; everything else it installs itself.

    python3 manage.py console   # venv + install + migrate + seed, then the worker and the console on :8501
    python3 manage.py test      # venv + test extras (+ Chromium where possible), then lint, types and tests

Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
}


def say(message: str) -> None:
    print(f"[imagegate] {message}", flush=True)


def run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    merged = {**os.environ, **OFFLINE_ENV, **(env or {})}
    result = subprocess.run([str(a) for a in args], cwd=ROOT, env=merged)
    if result.returncode != 0:
        raise SystemExit(result.returncode)


def ensure_venv(extras: str) -> None:
    """Create .venv and install the project; skipped when pyproject.toml has not changed since."""
    if sys.version_info[:2] != (3, 11):
        say(f"warning: Imagegate is built and tested on Python 3.11; this is {sys.version.split()[0]}")
    if not PY.exists():
        say("creating the virtual environment in .venv")
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    say(f"installing Imagegate{'[' + extras + ']' if extras else ''} and its pinned dependencies")
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    target = f".[{extras}]" if extras else "."
    run(PY, "-m", "pip", "install", "--quiet", "-e", target)
    stamp.write_text(digest)


def ensure_chromium() -> None:
    """Browser tests drive Debian's Chromium (no browser downloads here). Install it when we can."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing Chromium from Debian's packages for the browser tests")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False)
    if not Path("/usr/bin/chromium").exists():
        say("Chromium is not installed: browser tests will be skipped (and fail under CI=true)")


def console(argv: list[str]) -> None:
    ensure_venv("")
    imagegate = BIN / "imagegate"
    run(imagegate, "db", "upgrade")
    run(imagegate, "seed")
    env: dict[str, str] = {}
    # On a fresh installation the first-admin set-up code is printed now, in this terminal, and handed to the
    # console; nobody who merely reaches the port can claim the admin account without it.
    code = subprocess.run(
        [str(imagegate), "first-run-code"], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE, text=True, check=True,
    ).stdout.strip()
    if code:
        env["IMAGEGATE_SETUP_CODE"] = code
    port = os.environ.get("IMAGEGATE_PORT", "8501")
    api_port = os.environ.get("IMAGEGATE_API_PORT", "8000")
    say("starting the background worker (crash recovery, reservation expiry, health probes, alerts)")
    worker = start_worker(imagegate)
    say(f"starting the REST API on http://localhost:{api_port} (OpenAPI at /docs)")
    api = start_companion(imagegate, "api", "--port", api_port)
    say(f"starting the console on http://localhost:{port} (Ctrl+C stops it, the API and the worker)")
    try:
        run(
            BIN / "streamlit", "run", ROOT / "app.py",
            "--server.port", port,
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
            *argv,
            env=env,
        )
    finally:
        stop_worker(api)
        stop_worker(worker)


WORKER_STOP_TIMEOUT_S = 15.0


def start_worker(imagegate: Path, *extra: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    """`imagegate worker` in the background, writing to this terminal; the console's companion process."""
    return start_companion(imagegate, "worker", *extra, stdout=stdout)


def start_companion(imagegate: Path, *command: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    """An `imagegate` command in the background beside the console (the worker, the REST API)."""
    return subprocess.Popen([str(imagegate), *command], cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=stdout)


def stop_worker(worker: subprocess.Popen[bytes], timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int:
    """Stop the worker with SIGTERM (it finishes the job in progress), killing it if it does not stop in time.
    Ctrl+C in the terminal already reached it (same process group): then it is usually gone."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            say("the worker did not stop in time; killing it")
            worker.kill()
            worker.wait()
    return worker.returncode


def test(argv: list[str]) -> None:
    ensure_venv("test")
    ensure_chromium()
    say("ruff")
    run(BIN / "ruff", "check", ".")
    say("mypy")
    run(BIN / "mypy", ".")
    say("pytest")
    run(PY, "-m", "pytest", *argv)


def main() -> None:
    commands = {"console": console, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        raise SystemExit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
