"""What the benchmarks share: the emulator process, fresh databases, the product's set-up, statistics, machine
facts and the results file.

Nothing here is timed: the scripts time only their own loops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")
FAL_MODEL_PATH = "/fal/fal-ai/qwen-image"
"""The fal emulator's queue endpoint (submit), under the emulator's /fal mount."""
FAL_SYNC_PATH = "/fal/run/fal-ai/qwen-image"
"""fal.run's synchronous endpoint as the emulator serves it (one POST, the output in the answer)."""
FAL_KEY_HEADER = {"Authorization": "Key imagegate-emulator-key"}

_KEY_VARS = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "IDEOGRAM_API_KEY", "HF_TOKEN")


# --- cores -------------------------------------------------------------------------------------------------------


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def core_plan() -> tuple[int | None, int | None]:
    """(server core, client core): different cores when there are two and `taskset` exists, else (None, None)."""
    available = cores()
    if len(available) < 2 or shutil.which("taskset") is None:
        return None, None
    return available[-1], available[0]


def pin_self(core: int | None) -> None:
    """Pin this process (and the threads it starts from now on) to one core."""
    if core is not None:
        os.sched_setaffinity(0, {core})


# --- the emulator process ----------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    """`python -m bench.emulator_server` in its own process (on its own core when given), on a free port."""

    def __init__(self, core: int | None = None, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.core = core
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-emulator-"))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> Emulator:
        command = [sys.executable, "-m", "bench.emulator_server", "--port", str(self.port)]
        if self.core is not None:
            command = ["taskset", "-c", str(self.core), *command]
        env = {k: v for k, v in os.environ.items() if k not in _KEY_VARS}
        env["GRADIO_ANALYTICS_ENABLED"] = "False"
        log = (self._log_dir / f"emulator-{self.port}.log").open("wb")
        self._process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"the emulator exited at start; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/_bench/requests", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the emulator did not answer within {timeout_s:g}s; see {log.name}")
            time.sleep(0.1)

    def configure(self, **knobs: float | int) -> None:
        reply = httpx.post(self.url + "/_emulator/config", json={"provider": "fal", **knobs}, timeout=10)
        reply.raise_for_status()

    def prune(self) -> None:
        httpx.post(self.url + "/_bench/prune", timeout=30).raise_for_status()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the emulator process has used so far."""
        if self._process is None:
            return float("nan")
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> int:
        return int(httpx.get(self.url + "/_bench/requests", timeout=10).json()["requests"])

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
        self._process = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the product's environment -----------------------------------------------------------------------------------


def product_env(emulator_url: str, data_dir: Path) -> None:
    """Point this process at the emulator (no provider key, so every provider runs in emulator mode), a
    throw-away data directory, and keep LiteLLM off the network."""
    for name in _KEY_VARS:
        os.environ.pop(name, None)
    os.environ["IMAGEGATE_EMULATOR_URL"] = emulator_url
    os.environ["IMAGEGATE_DATA_DIR"] = str(data_dir)
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    os.environ.setdefault("DO_NOT_TRACK", "1")


# --- databases ---------------------------------------------------------------------------------------------------


def pg_admin_dsn() -> str | None:
    """A DSN for PostgreSQL's maintenance database, or None when no server answers."""
    import psycopg

    for user in PG_USERS:
        dsn = f"host={PG_HOST} port={PG_PORT} user={user} dbname=postgres connect_timeout=3"
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return dsn
        except psycopg.Error:
            continue
    return None


@dataclass
class Database:
    kind: str
    """sqlite | postgresql"""
    url: str
    version: str
    _drop: Any = None

    def close(self) -> None:
        if self._drop is not None:
            self._drop()
            self._drop = None


@contextlib.contextmanager
def fresh_database(kind: str, directory: Path) -> Iterator[Database]:
    """A new, empty database of `kind`, migrated to head and seeded with the defaults; dropped afterwards."""
    from core.runtime import open_runtime

    if kind == "sqlite":
        path = directory / f"bench-{secrets.token_hex(3)}.db"
        db = Database("sqlite", f"sqlite:///{path}", f"SQLite {sqlite3.sqlite_version}")
    elif kind == "postgresql":
        import psycopg
        from psycopg import sql

        dsn = pg_admin_dsn()
        if dsn is None:
            raise RuntimeError(f"PostgreSQL does not answer at {PG_HOST}:{PG_PORT}")
        name = f"imagegate_bench_{os.getpid()}_{secrets.token_hex(3)}"
        user = dict(part.split("=", 1) for part in dsn.split())["user"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            row = conn.execute("SHOW server_version").fetchone()
            version = f"PostgreSQL {row[0] if row else '?'}"

        def drop() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

        db = Database("postgresql", f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}", version, drop)
    else:
        raise ValueError(f"unknown database kind {kind!r}")
    try:
        runtime = open_runtime(db.url, prepare=True)  # migrate + seed, as the console does at start
        runtime.engine.dispose()
        yield db
    finally:
        db.close()


def database_kinds(choice: str) -> list[str]:
    """`sqlite`, `postgresql` or `both` (PostgreSQL only when a server answers, with a note otherwise)."""
    if choice == "both":
        if pg_admin_dsn() is None:
            print(f"PostgreSQL does not answer at {PG_HOST}:{PG_PORT}: SQLite only", file=sys.stderr)
            return ["sqlite"]
        return ["sqlite", "postgresql"]
    return [choice]


def bench_user(factory: Any, name: str = "bench-user") -> Any:
    """A USER account to generate as (its actor): authorization reads it from the database on every request."""
    from core.security import Actor, Role
    from core.users import create_user
    from db.engine import transaction

    with transaction(factory) as session:
        view = create_user(session, Actor.system("bench"), name, "bench-" + secrets.token_hex(16), Role.USER)
    return view.actor()


def global_budget(factory: Any, limit_micro_usd: int, *, period: str = "daily", name: str = "bench global") -> int:
    """One hard global budget; its id."""
    from core.generation import budgets
    from core.security import Actor
    from db.engine import transaction

    with transaction(factory) as session:
        view = budgets.create_budget(
            session,
            Actor.system("bench"),
            name=name,
            scope="global",
            period=period,
            limit_micro_usd=limit_micro_usd,
            hard=True,
        )
    return view.id


# --- statistics --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5 - 1e-9)))
    return ordered[rank - 1]


@dataclass
class Batch:
    """One timed batch of calls: per-call latencies (s) and the batch's wall time (s)."""

    latencies: list[float]
    wall_s: float

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    @property
    def calls_per_s(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class Series:
    """Several batches of one variant: the median of each figure across batches."""

    name: str
    batches: list[Batch] = field(default_factory=list)

    def median(self, figure: str) -> float:
        return statistics.median(getattr(b, figure) for b in self.batches) if self.batches else float("nan")


async def timed_calls(call: Any, count: int, concurrency: int = 1) -> Batch:
    """`count` awaits of `call()`, at most `concurrency` at once; every call's latency and the wall time."""
    latencies: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for _ in queue:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Batch(latencies, time.perf_counter() - began)


# --- machine facts and the results file ----------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "core", "db", "emulator", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    return "unknown"


def load_average() -> str:
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"
    return "unknown"


def machine_facts(
    databases: Sequence[str] = (), server_core: int | None = None, client_core: int | None = None
) -> list[str]:
    """Bullet lines: date, machine, Python, databases, pinning, load, commit."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"date: {now}; commit {_git_commit()}",
        f"machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}; httpx {pkg('httpx')}, fal-client {pkg('fal-client')}, "
        f"SQLAlchemy {pkg('sqlalchemy')}, psycopg {pkg('psycopg')}, LiteLLM {pkg('litellm')}",
    ]
    if databases:
        lines.append("databases: " + "; ".join(databases))
    if server_core is not None and client_core is not None:
        lines.append(f"pinning: emulator on core {server_core}, benchmark client on core {client_core} (taskset)")
    else:
        lines.append("pinning: none (taskset missing or a single core)")
    lines.append(
        f"load average (1/5/15 min) at the start: {load_average()} "
        "(the machine is shared: other work running at the same time shows in the numbers)"
    )
    return lines


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "?"
    return f"python -m bench.{module}{' ' + args if args else ''}"


_HEADER = """# Benchmarks

Numbers measured by the scripts in `bench/` (scripts, not tests: `pip install -e '.[bench]'` adds LiteLLM for
the side-by-side baseline). Each script runs its whole comparison in one run against the local provider
emulator and rewrites its own section below; the date, machine and command are in each section. Medians of
several runs. The machine has 2 cores shared with other work, so absolute numbers move from run to run; the
comparisons within one section were measured together.

"""


def write_section(name: str, markdown: str, path: Path | None = None) -> Path:
    """Replace (or append) the section between `<!-- bench:name -->` markers in the results file."""
    target = path or RESULTS
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = target.read_text() if target.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--results and --no-write: where a benchmark's section goes, and whether it goes anywhere."""
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not update the file")


def publish(name: str, section: str, args: argparse.Namespace) -> None:
    """Print the section and, unless --no-write, rewrite it in the results file."""
    print(section)
    if not args.no_write:
        print(f"written to {write_section(name, section, args.results)}", file=sys.stderr)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value == value else "n/a"
