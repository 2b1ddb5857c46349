"""UI test fixtures: a real console process and Debian's Chromium driven by Playwright.

Under CI=true a missing Chromium fails the run instead of skipping it. Screenshots go to the ignored
test-artifacts/screenshots/; with IMAGEGATE_REFRESH_SCREENSHOTS=1 they also replace the README's images in
docs/screenshots/ (only then, so an ordinary test run leaves the work tree clean).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from emulator.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
README_SCREENSHOTS = ROOT / "docs" / "screenshots"
REFRESH_SCREENSHOTS_ENV = "IMAGEGATE_REFRESH_SCREENSHOTS"
PASSWORD = "correct horse battery"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = "Debian's Chromium (/usr/bin/chromium) is not installed: apt-get install chromium"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class Console:
    def __init__(self, url: str, log: Path, data_dir: Path) -> None:
        self.url = url
        self.log = log
        self.data_dir = data_dir

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def cli(data_dir: Path, *args: str, stdin: str | None = None) -> None:
    """The imagegate CLI against a console's data directory (the machine's own access, as an operator has)."""
    env = {**os.environ, "IMAGEGATE_DATA_DIR": str(data_dir)}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], input=stdin, text=True, check=False, cwd=ROOT, env=env,
        capture_output=True,
    )
    assert done.returncode == 0, f"imagegate {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """`streamlit run app.py` on a fresh data directory (SQLite), sandbox providers, output to a file."""
    yield from _run_console(tmp_path_factory.mktemp("console-data"))


@pytest.fixture(scope="module")
def console_with_accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A console whose database already has alice (ADMIN) and bob (USER), made with the CLI before it starts."""
    data_dir = tmp_path_factory.mktemp("console-data")
    cli(data_dir, "db", "upgrade")
    cli(data_dir, "users", "create", "alice", "--role", "ADMIN", "--password-stdin", stdin=PASSWORD + "\n")
    cli(data_dir, "users", "create", "bob", "--role", "USER", "--password-stdin", stdin=PASSWORD + "\n")
    yield from _run_console(data_dir)


def _run_console(data_dir: Path, env_overrides: dict[str, str] | None = None) -> Iterator[Console]:
    log = data_dir / "console.log"
    port = free_port()
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(data_dir),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DATABASE_URL", None)
    env.pop("IMAGEGATE_EMULATOR_URL", None)
    env.update(env_overrides or {})
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "streamlit"), "run", str(ROOT / "app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.headless", "true", "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"console did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.3)
        yield Console(url, log, data_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    # Pages and routes handle what they meet: nothing escaped as a traceback in the server's output.
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def wait_for_app(page: object, timeout_ms: int = 30_000) -> None:
    """Wait until Streamlit has finished its run (after a goto or a click)."""
    page.wait_for_timeout(300)  # type: ignore[attr-defined]
    page.wait_for_selector(  # type: ignore[attr-defined]
        "[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms
    )
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0", timeout=timeout_ms
    )


def wait_for_text(page: object, text: str, console: Console, *, name: str, timeout_ms: int = 30_000) -> None:
    """Wait for `text` to show; if it does not, fail with what the page showed instead (its alerts), the tail of
    the console's output and a screenshot, so a failure in CI says why without a rerun."""
    try:
        page.get_by_text(text).first.wait_for(timeout=timeout_ms)  # type: ignore[attr-defined]
    except Exception as exc:
        shot = screenshot(page, f"failed-{name}", in_readme=False)
        alerts = page.get_by_test_id("stAlert").all_inner_texts()  # type: ignore[attr-defined]
        tail = "\n".join(console.output().splitlines()[-40:])
        pytest.fail(
            f"{text!r} did not show within {timeout_ms} ms ({type(exc).__name__}); the page's alerts: {alerts!r};"
            f" screenshot {shot}; the console's last output:\n{tail}"
        )


def click_as_a_person(page: object, target: object, hold_ms: int = 150) -> None:
    """Press the mouse on `target` where it is now and release it `hold_ms` later, as a hand does: no waiting for
    the target to be enabled, and the press blurs the focused field first (which applies a typed value and reruns
    the page while the button is held), unlike Playwright's click."""
    box = target.bounding_box()  # type: ignore[attr-defined]
    assert box is not None, "the target is not on the page"
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # type: ignore[attr-defined]
    page.mouse.down()  # type: ignore[attr-defined]
    page.wait_for_timeout(hold_ms)  # type: ignore[attr-defined]
    page.mouse.up()  # type: ignore[attr-defined]


def sign_in(page: object, url: str, username: str, *, heading: str | None = None, timeout_ms: int = 30_000) -> None:
    """Open `url`, sign in as `username` with the tests' password, and wait for the run (and, when given, for the
    page's `heading`: the sign-in redirects through the session route to the page the link named)."""
    page.goto(url)  # type: ignore[attr-defined]
    wait_for_app(page, timeout_ms)
    page.get_by_label("Username", exact=True).fill(username)  # type: ignore[attr-defined]
    page.get_by_label("Password", exact=True).fill(PASSWORD)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    wait_for_app(page, timeout_ms)
    if heading is not None:
        page.get_by_role("heading", name=heading).first.wait_for(timeout=timeout_ms)  # type: ignore[attr-defined]


def screenshot(page: object, name: str, *, in_readme: bool = True) -> Path:
    """A PNG of the page in test-artifacts/screenshots/ (ignored by git); with IMAGEGATE_REFRESH_SCREENSHOTS=1
    also the README's copy in docs/screenshots/ (`in_readme`: the images the README shows)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    if in_readme and os.environ.get(REFRESH_SCREENSHOTS_ENV, "").strip() == "1":
        README_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SCREENSHOTS / path.name)
    return path


def is_loopback(url: str) -> bool:
    """True for URLs that never leave this machine (and for data:/blob: URLs, which are no requests at all)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RecordedContext:
    """A browser context (its own cookies: one "browser") that records every request any of its pages makes."""

    def __init__(self, browser: object, **options: object) -> None:
        self.context = browser.new_context(**options)  # type: ignore[attr-defined]
        self.requests: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))

    def new_page(self, width: int = 1400, height: int = 1000) -> object:
        page = self.context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        return page

    def external_requests(self) -> list[str]:
        return [url for url in self.requests if not is_loopback(url)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def new_browser(browser: object) -> Iterator[Callable[..., RecordedContext]]:
    """Opens separate browsers (contexts); at the end, fails if any of them asked for anything off this machine."""
    opened: list[RecordedContext] = []

    def open_context(**options: object) -> RecordedContext:
        context = RecordedContext(browser, **options)
        opened.append(context)
        return context

    yield open_context
    external = [url for context in opened for url in context.external_requests()]
    for context in opened:
        context.close()
    assert not external, f"the console made requests off this machine: {external}"
