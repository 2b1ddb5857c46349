"""The REST API's `POST /api/generate` under 100 concurrent clients, beside LiteLLM's proxy, in one run.

    python -m bench.api [--requests 500] [--concurrency 100] [--runs 3] [--warmup 50] [--profile-calls 30]

The emulator answers at once (fal latency 0, no queue steps, concurrency 1000). Each server under test runs in
its own process pinned with `taskset` to one core; the emulator and the load generator (this process: one
`httpx.AsyncClient`, `--concurrency` tasks) share the other core. PostgreSQL (127.0.0.1:5432, a fresh database
dropped afterwards) is not pinned. Variants, each timed under the same load:

- raw fal queue calls (httpx): what our fal adapter needs on the wire, straight to the emulator (submit,
  status, result, image download);
- imagegate API: `imagegate api` (one uvicorn process, as shipped), `POST /api/generate` with a USER's bearer
  token, waiting for the job (the default); provider fal-qwen, no fallback;
- raw fal sync call (httpx): what LiteLLM needs on the wire, one POST to fal's synchronous endpoint;
- LiteLLM proxy: `uvicorn litellm.proxy.proxy_server:app` (one process, master key, no database), its
  `/v1/images/generations` for `fal_ai/fal-ai/qwen-image` with `api_base` on the emulator's sync endpoint.

Added latency = p50 (p99) through the server minus p50 (p99) of its own raw calls under the same load, per run,
then the median across runs. Requests per second per core: the server is pinned to one core, so its requests per
second are per core; the CPU the server process used per request is shown too. Then, one request at a time in
this process on the same database, where an API request's time goes: its admission (token, job insert and claim,
rate count: one transaction), the job (generate() and the job's finish), and the response.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import functools
import itertools
import os
import pstats
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.harness import FAL_SYNC_PATH, Series
from bench.overhead import IMAGE_SIZE, PROMPT, raw_queue_call, raw_sync_call, wire_params
from bench.overhead import overhead_per_run as overhead
from bench.profile_generate import _count_statements

TARGET_P50_OVERHEAD_MS = 3.0
TARGET_RATIO_VS_LITELLM = 4.0
LITELLM_MASTER_KEY = "sk-imagegate-bench-" + secrets.token_hex(8)
LITELLM_MODEL = "img"
START_TIMEOUT_S = 120.0

Call = Callable[[], Awaitable[None]]


# --- the servers under test -----------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server process on a free port (pinned to `core` when given), up once `probe` answers anything."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], probe: str, core: int | None, logs: Path):
        self.name = name
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = env
        self.probe = probe
        self.core = core
        self.log_path = logs / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        command = self.argv if self.core is None else ["taskset", "-c", str(self.core), *self.argv]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=harness.ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.url + self.probe, timeout=2)
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_S:g}s; see {self.log_path}")
            time.sleep(0.2)

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid) if self.process is not None else float("nan")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(extra)
    return env


def imagegate_server(database_url: str, core: int | None, logs: Path) -> Server:
    command = [str(Path(sys.executable).parent / "imagegate"), "api", "--port", "{port}", "--workers", "1"]
    return Server("imagegate-api", command, _server_env(DATABASE_URL=database_url), "/api/health/live", core, logs)


def litellm_config(emulator_url: str, path: Path) -> Path:
    """The proxy's model list (generated: the emulator's port changes every run)."""
    path.write_text(
        "model_list:\n"
        f"  - model_name: {LITELLM_MODEL}\n"
        "    litellm_params:\n"
        "      model: fal_ai/fal-ai/qwen-image\n"
        f"      api_base: {emulator_url}{FAL_SYNC_PATH}\n"
        "      api_key: imagegate-emulator-key\n"
        "litellm_settings:\n"
        "  num_retries: 0\n"
        "  telemetry: false\n"
    )
    return path


def litellm_server(config: Path, core: int | None, logs: Path) -> Server:
    # No DATABASE_URL in its environment: the proxy would take ours for its own (Prisma) database.
    env = _server_env(CONFIG_FILE_PATH=str(config), LITELLM_MASTER_KEY=LITELLM_MASTER_KEY, LITELLM_LOG="ERROR")
    command = [sys.executable, "-m", "uvicorn", "litellm.proxy.proxy_server:app", "--port", "{port}"]
    return Server("litellm-proxy", command, env, "/health/liveliness", core, logs)


# --- the product's set-up --------------------------------------------------------------------------------------------


def api_token(factory: Any) -> tuple[Any, str]:
    """A USER and a bearer token of theirs (its rate limit far above the benchmark's load): (actor, secret)."""
    from core.api_tokens import create_token
    from core.security import Actor
    from db.engine import transaction

    actor = harness.bench_user(factory)
    with transaction(factory) as session:
        created = create_token(
            session, Actor.system("bench"), actor.user_id, "bench", expires_in_days=1, rate_limit_per_minute=100_000
        )
    return actor, created.secret


def generate_body() -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "provider": "fal-qwen",
        "allow_fallback": False,
        "params": {"image_size": IMAGE_SIZE, "num_images": 1},
    }


# --- the variants ----------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    call: Call
    raw: str | None = None
    server: Server | None = None
    failures: list[str] = field(default_factory=list)
    requests_per_call: float = float("nan")
    cpu_ms_per_request: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def checked(call: Callable[[], Awaitable[None]], failures: list[str]) -> Call:
    """A call whose failure is counted (its first few kept) instead of stopping the batch."""

    async def wrapped() -> None:
        try:
            await call()
        except Exception as error:  # a benchmark counts failures, whatever they are
            failures.append(f"{type(error).__name__}: {str(error)[:300]}")

    return wrapped


def api_call(client: httpx.AsyncClient, url: str, secret: str) -> Callable[[], Awaitable[None]]:
    headers = {"Authorization": f"Bearer {secret}"}
    body = generate_body()

    async def call() -> None:
        answer = await client.post(url + "/api/generate", json=body, headers=headers)
        if answer.status_code != 200 or answer.json().get("status") != "succeeded":
            raise RuntimeError(f"POST /api/generate answered {answer.status_code}: {answer.text[:300]}")
        if not answer.json()["images"]:
            raise RuntimeError("POST /api/generate succeeded without an image")

    return call


def litellm_proxy_call(client: httpx.AsyncClient, url: str, params: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    headers = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
    body = {"model": LITELLM_MODEL, **params}

    async def call() -> None:
        answer = await client.post(url + "/v1/images/generations", json=body, headers=headers)
        if answer.status_code != 200 or not answer.json().get("data"):
            raise RuntimeError(f"LiteLLM proxy answered {answer.status_code}: {answer.text[:300]}")

    return call


async def measure(
    variants: list[Variant],
    emulator: harness.Emulator,
    args: argparse.Namespace,
    series: dict[str, Series],
) -> None:
    for run in range(args.runs):
        shift = run % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            emulator.prune()
            await harness.timed_calls(variant.call, args.warmup, args.concurrency)
            variant.loads.append(os.getloadavg()[0])
            failed_before = len(variant.failures)
            requests_before = emulator.requests()
            cpu_before = variant.server.cpu_seconds() if variant.server else float("nan")
            batch = await harness.timed_calls(variant.call, args.requests, args.concurrency)
            if variant.server is not None:
                cpu = variant.server.cpu_seconds() - cpu_before
                variant.cpu_ms_per_request.append(cpu / args.requests * 1000)
            variant.requests_per_call = (emulator.requests() - requests_before) / args.requests
            series.setdefault(variant.key, Series(variant.label)).batches.append(batch)
            failed = len(variant.failures) - failed_before
            print(
                f"run {run + 1}/{args.runs} {variant.label}: p50 {batch.p50_ms:.2f} ms, p99 {batch.p99_ms:.2f} ms, "
                f"{batch.calls_per_s:.1f} requests/s, {failed} failed, load {variant.loads[-1]:.2f}",
                file=sys.stderr,
            )


# --- where one API request's time goes -----------------------------------------------------------------------------


STEPS = {
    "admit": "bearer token checked, job row inserted and claimed by this process, request counted (one transaction)",
    "job": "the job: generate() (the fal adapter's HTTP requests included) and the job's finish with its image rows",
    "response": "the response from the finished job in memory, JSON",
    "raw": "for comparison: the raw fal queue calls (httpx, 4 requests)",
}


@dataclass
class Phases:
    wall: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in STEPS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in STEPS})
    statements: dict[str, list[int]] = field(default_factory=lambda: {key: [] for key in STEPS})
    commits: dict[str, list[int]] = field(default_factory=lambda: {key: [] for key in STEPS})

    def add(self, key: str, wall: float, cpu: float, statements: int, commits: int) -> None:
        self.wall[key].append(wall)
        self.cpu[key].append(cpu)
        self.statements[key].append(statements)
        self.commits[key].append(commits)

    def rows(self) -> list[list[str]]:
        def med(values: list[float]) -> str:
            return f"{statistics.median(values) * 1000:.2f}" if values else "n/a"

        def count(values: list[int]) -> str:
            return f"{statistics.median(values):g}" if values else "n/a"

        return [
            [label, med(self.wall[key]), med(self.cpu[key]), count(self.statements[key]), count(self.commits[key])]
            for key, label in STEPS.items()
        ]


async def profile_phases(factory: Any, secret: str, calls: int, raw: Call, counts: collections.Counter[str]) -> Phases:
    """The route's steps one request at a time in this process (the API server is idle meanwhile); `counts` is
    bench.profile_generate's live statement counter on the engine."""
    from api.deps import in_token_transaction
    from api.routes_generate import _complete, _enqueue, _job_out
    from api.schemas import GenerateBody
    from core.generation import jobs
    from core.generation.models import GenerationRequest
    from core.generation.service import process_owner

    owner = process_owner()
    phases = Phases()

    def mark() -> tuple[float, float, int, int]:
        statements = sum(n for head, n in counts.items() if head != "(commit)")
        return time.perf_counter(), time.process_time(), statements, counts["(commit)"]

    for _ in range(calls):
        marks = [mark()]
        body = GenerateBody.model_validate(generate_body())
        request = GenerationRequest(
            body.prompt, provider=body.provider, params=body.params, allow_fallback=body.allow_fallback
        )
        actor, job, _created = await in_token_transaction(
            factory, secret, functools.partial(_enqueue, request=request, idempotency_key=None, claimed_by=owner)
        )
        marks.append(mark())
        finished = await jobs.run_job(factory, job, owner)
        marks.append(mark())
        out = _job_out(await _complete(factory, actor, finished))
        out.model_dump_json()
        marks.append(mark())
        await raw()
        marks.append(mark())
        if out.status != "succeeded":
            raise RuntimeError(f"the profiled job did not succeed: {out.status} {out.error}")
        for key, (before, after) in zip(STEPS, itertools.pairwise(marks), strict=True):
            phases.add(key, after[0] - before[0], after[1] - before[1], after[2] - before[2], after[3] - before[3])
    return phases


async def cprofile_phases(
    factory: Any, secret: str, calls: int, raw: Call, counts: collections.Counter[str], path: Path
) -> None:
    """The same steps under cProfile, the database executor's work run inline so the profile sees it (as
    bench.profile_generate does); the raw stats to `path`, the top functions to stderr."""
    from bench.profile_generate import _inline_executor

    _inline_executor()
    profile = cProfile.Profile()
    profile.enable()
    await profile_phases(factory, secret, calls, raw, counts)
    profile.disable()
    profile.dump_stats(path)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(60)


# --- the report ------------------------------------------------------------------------------------------------------


def report(
    variants: list[Variant],
    series: dict[str, Series],
    facts: list[str],
    phases: Phases | None,
    notes: list[str],
    args: argparse.Namespace,
) -> str:
    header = [
        "variant",
        "p50 ms",
        "p99 ms",
        "requests/s",
        "requests/s per core",
        "server CPU ms per request",
        "requests per server CPU-second",
        "added p50 ms",
        "added p99 ms",
        "emulator requests per request",
        "ok",
        "load (1 min) at each batch",
    ]
    rows = []
    per_core: dict[str, float] = {}
    for v in variants:
        s = series[v.key]
        rps = s.median("calls_per_s")
        total = args.requests * args.runs + args.warmup * args.runs
        ok = f"{total - len(v.failures)}/{total}"
        if v.server is not None:
            per_core[v.key] = rps  # pinned to one core
        rows.append(
            [
                v.label,
                harness.fmt_ms(s.median("p50_ms")),
                harness.fmt_ms(s.median("p99_ms")),
                f"{rps:.1f}",
                f"{rps:.1f}" if v.server is not None else "-",
                f"{statistics.median(v.cpu_ms_per_request):.1f}" if v.cpu_ms_per_request else "-",
                f"{1000 / statistics.median(v.cpu_ms_per_request):.1f}" if v.cpu_ms_per_request else "-",
                f"{overhead(series, v.key, v.raw):.2f}" if v.raw else "-",
                f"{overhead(series, v.key, v.raw, 'p99_ms'):.2f}" if v.raw else "-",
                f"{v.requests_per_call:g}",
                ok,
                ", ".join(f"{load:.2f}" for load in v.loads),
            ]
        )
    lines = [
        "## The REST API beside LiteLLM's proxy",
        "",
        f"Command: `{harness.command_line()}`",
        "",
        *[f"- {fact}" for fact in facts],
        f"- {args.requests} requests per variant and run after {args.warmup} warm-up requests, {args.concurrency} "
        f"concurrent clients (one httpx.AsyncClient in the benchmark process), {args.runs} runs rotating the order; "
        f"medians across runs. Image: fal-ai/qwen-image {IMAGE_SIZE}, one image; emulator latency 0.",
        "- each server is one process pinned to its own core (imagegate: `imagegate api --workers 1`; LiteLLM: "
        "`uvicorn litellm.proxy.proxy_server:app`, both uvicorn on asyncio's loop with its access log); the "
        "emulator and the load generator share the other core; PostgreSQL is not pinned (its CPU is not in "
        "'server CPU ms').",
        *[f"- {note}" for note in notes],
        "",
        harness.table(header, rows),
        "",
    ]
    verdicts = []
    if "api" in series:
        ours = overhead(series, "api", "raw_queue")
        met = "met" if ours <= TARGET_P50_OVERHEAD_MS else "NOT met"
        verdicts.append(
            f"- p50 added latency of `POST /api/generate` under {args.concurrency} clients: {ours:.2f} ms "
            f"(target at most {TARGET_P50_OVERHEAD_MS:g} ms: {met})."
        )
        if "litellm" in per_core:
            ratio = per_core["api"] / per_core["litellm"]
            met = "met" if ratio >= TARGET_RATIO_VS_LITELLM else "NOT met"
            verdicts.append(
                f"- requests per second per core: imagegate {per_core['api']:.1f}, LiteLLM's proxy "
                f"{per_core['litellm']:.1f}: {ratio:.2f}x (target at least {TARGET_RATIO_VS_LITELLM:g}x: {met})."
            )
            cpu = {v.key: statistics.median(v.cpu_ms_per_request) for v in variants if v.cpu_ms_per_request}
            verdicts.append(
                f"- by the servers' own CPU (what a fully busy core would serve): imagegate "
                f"{1000 / cpu['api']:.1f}, LiteLLM's proxy {1000 / cpu['litellm']:.1f} requests per CPU-second: "
                f"{cpu['litellm'] / cpu['api']:.2f}x."
            )
            if phases is not None and phases.cpu["raw"]:
                allowed = cpu["litellm"] / TARGET_RATIO_VS_LITELLM
                floor = statistics.median(phases.cpu["raw"]) * 1000
                verdicts.append(
                    f"- the floor: {TARGET_RATIO_VS_LITELLM:g}x LiteLLM's proxy leaves {allowed:.1f} ms of server CPU "
                    f"per request, and the raw fal queue calls alone (httpx, no fal-client, no server, no database; "
                    f"the table below) take {floor:.1f} ms of CPU: "
                    + (
                        "no server that speaks fal's queue protocol through httpx can meet the target on this machine."
                        if floor > allowed
                        else f"{allowed - floor:.1f} ms would be left for the server, fal-client and the database."
                    )
                )
        else:
            verdicts.append("- LiteLLM's proxy did not run (see above): no ratio.")
    if verdicts:
        lines += ["Against the targets of issue 10:", "", *verdicts, ""]
    if phases is not None:
        lines += [
            f"Where one API request's time goes: the route's steps run one request at a time in the benchmark process "
            f"on the same database and emulator ({len(phases.wall['job'])} requests, medians; the "
            "HTTP server, routing and validation are not in it; CPU: this process's, every thread's):",
            "",
            harness.table(["step", "p50 wall ms", "p50 CPU ms", "SQL statements", "commits"], phases.rows()),
            "",
        ]
    return "\n".join(lines) + "\n"


# --- the run ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def run_all(args: argparse.Namespace) -> str:
    server_core, client_core = harness.core_plan()
    workdir = Path(tempfile.mkdtemp(prefix="bench-api-"))
    notes: list[str] = []
    with harness.Emulator(core=client_core, log_dir=workdir) as emulator:
        emulator.configure(latency_s=0, queue_steps=0, concurrency=1000)
        harness.product_env(emulator.url, workdir / "data")
        harness.pin_self(client_core)
        params, _ = wire_params()
        if args.no_litellm:
            notes.append("LiteLLM's proxy left out (--no-litellm)")
        # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them: with httpx's default
        # (also 5 s) a request could go out on a connection the server was closing, a ReadError that is the load
        # generator's race, not the server's failure.
        limits = httpx.Limits(
            max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2, keepalive_expiry=2.0
        )
        with (
            harness.fresh_database("postgresql", workdir) as db,
            contextlib.ExitStack() as servers,
        ):
            from core.runtime import open_runtime

            runtime = open_runtime(db.url, prepare=False)
            servers.callback(runtime.engine.dispose)
            _actor, secret = api_token(runtime.sessions)
            api = servers.enter_context(running(imagegate_server(db.url, server_core, workdir)))
            proxy = None
            if not args.no_litellm:
                config = litellm_config(emulator.url, workdir / "litellm_proxy_config.yaml")
                try:
                    proxy = servers.enter_context(running(litellm_server(config, server_core, workdir)))
                except RuntimeError as failed:
                    last = (str(failed).strip().splitlines() or ["?"])[-1]
                    notes.append(
                        f"LiteLLM's proxy left out: it did not start here ({last}; `pip install -e '.[bench]'`)"
                    )
            series: dict[str, Series] = {}
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                variants = [
                    Variant("raw_queue", "raw fal queue calls (httpx)", raw_queue_call(client, emulator.url, params)),
                    Variant("api", "imagegate POST /api/generate", api_call(client, api.url, secret), "raw_queue", api),
                ]
                if proxy is not None:
                    variants += [
                        Variant("raw_sync", "raw fal sync call (httpx)", raw_sync_call(client, emulator.url, params)),
                        Variant(
                            "litellm",
                            "LiteLLM proxy /v1/images/generations",
                            litellm_proxy_call(client, proxy.url, params),
                            "raw_sync",
                            proxy,
                        ),
                    ]
                for variant in variants:
                    variant.call = checked(variant.call, variant.failures)
                facts = [
                    (
                        f"pinning (taskset): the server under test on core {server_core}; the emulator and the "
                        f"load generator on core {client_core}"
                    )
                    if fact.startswith("pinning") and server_core is not None
                    else fact
                    for fact in harness.machine_facts([db.version], server_core, client_core)
                ]
                await measure(variants, emulator, args, series)
            for variant in variants:
                for failure in variant.failures[:3]:
                    notes.append(f"{variant.label} failure: {failure}")
            phases = None
            if args.profile_calls > 0:
                servers.close()
                async with httpx.AsyncClient(timeout=60) as client:
                    raw = raw_queue_call(client, emulator.url, params)
                    counts = _count_statements(runtime.engine)
                    phases = await profile_phases(runtime.sessions, secret, args.profile_calls, raw, counts)
                    if args.cprofile is not None:
                        await cprofile_phases(runtime.sessions, secret, args.profile_calls, raw, counts, args.cprofile)
            runtime.engine.dispose()
    return report(variants, series, facts, phases, notes, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="timed requests per variant and run")
    parser.add_argument("--concurrency", type=int, default=100, help="concurrent clients")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests before each batch")
    parser.add_argument("--profile-calls", type=int, default=30, help="requests of the step-by-step profile (0: none)")
    parser.add_argument("--cprofile", type=Path, help="also profile the steps (cProfile) into this pstats file")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    if harness.pg_admin_dsn() is None:
        parser.error(f"PostgreSQL does not answer at {harness.PG_HOST}:{harness.PG_PORT}")
    section = asyncio.run(run_all(args))
    harness.publish("api", section, args)


if __name__ == "__main__":
    main()
