"""What `generate()` adds on top of the provider calls it makes, beside LiteLLM's Router, in one run.

    python -m bench.overhead [--calls 100] [--runs 5] [--warmup 10] [--db sqlite|postgresql|both]

The emulator runs in its own process (pinned to one core, the client to the other, when `taskset` exists) and
answers at once: fal latency 0, no queue steps, concurrency 1000. Every variant makes the same image (fal-ai/
qwen-image, 256x256, one image) against that one emulator, one call at a time:

- raw fal queue calls: what our fal adapter needs on the wire, made directly with one keep-alive httpx client:
  submit, status, result, image download (4 requests);
- fal-client alone: fal-client's AsyncClient (`submit()`, `handle.get()`) with one client kept alive across calls, the
  image through the raw variant's httpx client: the floor under any adapter built on fal-client;
- adapter only: `build_adapter("fal-qwen").generate()` (fal-client + image download, validation and storage;
  no database);
- imagegate `generate()`: the whole service as an application calls it, as a signed-in USER, with one hard
  global budget (reserve + settle) and usage writes (attempt row + daily rollup) on, per database;
- raw fal sync call: what LiteLLM needs on the wire, one POST to fal's synchronous endpoint, made directly;
- LiteLLM `Router.aimage_generation` (model `fal_ai/fal-ai/qwen-image`, api_base = that endpoint, no retries).

Overhead = through-the-system minus its own raw calls, per run (p50 - p50), then the median across runs.
Runs rotate the order of the variants so that no variant always runs first or last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.harness import FAL_KEY_HEADER, FAL_MODEL_PATH, FAL_SYNC_PATH, Series

PROMPT = "a red fox in fresh snow, morning light"
IMAGE_SIZE = "256x256"
TARGET_P50_OVERHEAD_MS = 1.0
TARGET_RATIO_VS_LITELLM = 3.0

Call = Callable[[], Awaitable[Any]]
FAL_APP = "fal-ai/qwen-image"
FAL_QUEUE_URL = "https://queue.fal.run/"


@dataclass
class Variant:
    key: str
    label: str
    call: Call
    raw: str | None = None
    """The key of the raw variant its overhead is measured against."""
    requests_per_call: float = float("nan")


def wire_params() -> tuple[dict[str, Any], Any]:
    """fal's wire parameters for the benchmark request, exactly as our adapter translates them, and the
    adapter request itself."""
    from core.providers.base import AdapterRequest
    from core.providers.registry import build_adapter
    from core.settings import resolve_effective

    effective = resolve_effective(
        "fal-qwen",
        global_settings=None,
        provider_settings=None,
        preset=None,
        overrides={"image_size": IMAGE_SIZE, "num_images": 1},
        prompt=PROMPT,
    )
    request = AdapterRequest(effective.prompt, effective.values())
    adapter = build_adapter("fal-qwen")
    return dict(adapter.translate(request).wire_params), request


def raw_queue_call(client: httpx.AsyncClient, base: str, params: dict[str, Any]) -> Call:
    async def call() -> None:
        submitted = await client.post(base + FAL_MODEL_PATH, json=params, headers=FAL_KEY_HEADER)
        submitted.raise_for_status()
        body = submitted.json()
        status = await client.get(body["status_url"], params={"logs": "true"}, headers=FAL_KEY_HEADER)
        if status.json().get("status") != "COMPLETED":
            raise RuntimeError(f"the emulator did not answer at once: {status.text[:200]}")
        result = await client.get(body["response_url"], headers=FAL_KEY_HEADER)
        result.raise_for_status()
        image = await client.get(result.json()["images"][0]["url"])
        image.raise_for_status()

    return call


def raw_sync_call(client: httpx.AsyncClient, base: str, params: dict[str, Any]) -> Call:
    async def call() -> None:
        answer = await client.post(base + FAL_SYNC_PATH, json=params, headers=FAL_KEY_HEADER)
        answer.raise_for_status()
        if not answer.json().get("images"):
            raise RuntimeError("the synchronous endpoint answered without images")

    return call


class _EmulatorQueueRoute(httpx.AsyncBaseTransport):
    """Sends fal's queue URLs to the emulator (with its Host, which the URLs in fal's answers are built from)
    over one kept-alive pool: the least a test of fal-client against the emulator needs, nothing of ours."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/"
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url.startswith(FAL_QUEUE_URL):
            target = httpx.URL(self.base + url[len(FAL_QUEUE_URL) :])
            headers = request.headers.copy()
            headers["Host"] = target.netloc.decode("ascii")
            request = httpx.Request(
                request.method, target, headers=headers, stream=request.stream, extensions=request.extensions
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def fal_client_call(downloads: httpx.AsyncClient, base: str, params: dict[str, Any]) -> Call:
    """fal-client by itself, the floor under any adapter built on it: one AsyncClient kept across calls, the same
    four exchanges as the raw variant (fal-client's documented submit() and handle.get(): submit, status, result;
    the image through httpx)."""
    import fal_client
    from asyncstdlib import cached_property

    class EmulatorFalClient(fal_client.AsyncClient):
        @cached_property(asyncio.Lock)
        async def _client(self) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=_EmulatorQueueRoute(base + "/fal"), headers=FAL_KEY_HEADER, timeout=30
            )

    fal = EmulatorFalClient(key="imagegate-emulator-key")

    async def call() -> None:
        handle = await fal.submit(FAL_APP, arguments=params)
        result = await handle.get()  # one status poll (COMPLETED at once), then the result
        image = await downloads.get(result["images"][0]["url"])
        image.raise_for_status()

    return call


def adapter_call(request: Any) -> Call:
    from core.providers.registry import build_adapter

    adapter = build_adapter("fal-qwen")

    async def call() -> None:
        result = await adapter.generate(request)
        if not result.images:
            raise RuntimeError("the adapter returned no image")

    return call


def generate_call(factory: Any, actor: Any) -> Call:
    from core.generation.models import GenerationRequest
    from core.generation.service import generate

    request = GenerationRequest(
        PROMPT, provider="fal-qwen", allow_fallback=False, params={"image_size": IMAGE_SIZE, "num_images": 1}
    )

    async def call() -> None:
        result = await generate(request, actor, factory=factory)
        if not result.ok or result.mode != "emulator":
            raise RuntimeError(f"generate() did not succeed in emulator mode: {result.status} {result.mode}")

    return call


def litellm_call(base: str, params: dict[str, Any]) -> Call:
    from litellm import Router  # type: ignore[attr-defined,unused-ignore]

    router = Router(
        model_list=[
            {
                "model_name": "img",
                "litellm_params": {
                    "model": "fal_ai/fal-ai/qwen-image",
                    "api_base": base + FAL_SYNC_PATH,
                    "api_key": "imagegate-emulator-key",
                },
            }
        ],
        num_retries=0,
    )
    extra = {k: v for k, v in params.items() if k != "prompt"}

    async def call() -> None:
        response = await router.aimage_generation(model="img", prompt=PROMPT, **extra)
        if not response.data:
            raise RuntimeError("LiteLLM returned no image")

    return call


def litellm_available() -> bool:
    try:
        import litellm  # noqa: F401
    except ImportError:
        return False
    return True


async def measure(
    variants: list[Variant], emulator: harness.Emulator, calls: int, runs: int, warmup: int, series: dict[str, Series]
) -> None:
    for run in range(runs):
        shift = run % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            emulator.prune()
            for _ in range(warmup):
                await variant.call()
            before = emulator.requests()
            batch = await harness.timed_calls(variant.call, calls)
            variant.requests_per_call = (emulator.requests() - before) / calls
            series.setdefault(variant.key, Series(variant.label)).batches.append(batch)
            print(
                f"run {run + 1}/{runs} {variant.label}: p50 {batch.p50_ms:.2f} ms, p99 {batch.p99_ms:.2f} ms, "
                f"{batch.calls_per_s:.1f} calls/s",
                file=sys.stderr,
            )


def overhead_per_run(series: dict[str, Series], key: str, raw: str, figure: str = "p50_ms") -> float:
    pairs = zip(series[key].batches, series[raw].batches, strict=True)
    return float(statistics.median(float(getattr(a, figure)) - float(getattr(b, figure)) for a, b in pairs))


def ledger_check(factory: Any, budget_id: int) -> str:
    """What the runs left in the database: attempts and rollups written, the budget settled, nothing held."""
    from sqlalchemy import func, select

    from core.generation import budgets
    from db.models import BudgetReservation, UsageAttempt, UsageDailyRollup

    with factory() as session:
        attempts = session.scalar(select(func.count()).select_from(UsageAttempt)) or 0
        rollup = session.scalar(select(func.sum(UsageDailyRollup.attempts))) or 0
        open_holds = (
            session.scalar(
                select(func.count())
                .select_from(BudgetReservation)
                .where(BudgetReservation.status.in_(["reserved", "held"]))
            )
            or 0
        )
        figures = budgets.current_figures(session, budget_id, "simulated")
    return (
        f"{attempts} usage attempts ({rollup} counted in the daily rollups), budget spent "
        f"{figures.spent_micro_usd} micro-USD simulated, reserved {figures.reserved_micro_usd}, "
        f"open reservations {open_holds}"
    )


def report(
    variants: list[Variant], series: dict[str, Series], facts: list[str], ledgers: list[str], args: argparse.Namespace
) -> str:
    rows = []
    for v in variants:
        s = series[v.key]
        over = f"{overhead_per_run(series, v.key, v.raw):.2f}" if v.raw else "-"
        over99 = f"{overhead_per_run(series, v.key, v.raw, 'p99_ms'):.2f}" if v.raw else "-"
        label = v.label
        rows.append(
            [
                label,
                harness.fmt_ms(s.median("p50_ms")),
                harness.fmt_ms(s.median("p99_ms")),
                f"{s.median('calls_per_s'):.1f}",
                f"{v.requests_per_call:g}",
                over,
                over99,
            ]
        )
    header = [
        "variant",
        "p50 ms",
        "p99 ms",
        "calls/s (one at a time)",
        "HTTP requests per call",
        "p50 overhead ms",
        "p99 overhead ms",
    ]
    lines = [
        "## Overhead of generate() beside LiteLLM's Router",
        "",
        f"Command: `{harness.command_line()}`",
        "",
        *[f"- {fact}" for fact in facts],
        f"- {args.calls} calls per variant and run after {args.warmup} warm-up calls, {args.runs} runs, one call "
        f"at a time; medians across runs. Image: fal-ai/qwen-image {IMAGE_SIZE}, one image; emulator latency 0.",
        "",
        harness.table(header, rows),
        "",
    ]
    verdicts = []
    litellm = "litellm" in series and "raw_sync" in series
    for v in variants:
        if not v.key.startswith("generate_"):
            continue
        ours = overhead_per_run(series, v.key, "raw_queue")
        verdict = f"- {v.label}: p50 overhead {ours:.2f} ms"
        if v.key == "generate_sqlite":
            met = "met" if ours <= TARGET_P50_OVERHEAD_MS else "NOT met"
            verdict += f" (target at most {TARGET_P50_OVERHEAD_MS:g} ms: {met})"
        if litellm:
            theirs = overhead_per_run(series, "litellm", "raw_sync")
            ratio = theirs / ours if ours > 0 else float("inf")
            relation = f"{ratio:.1f}x lower" if ratio >= 1 else f"{1 / ratio:.1f}x higher" if ratio > 0 else "n/a"
            met = "met" if ratio >= TARGET_RATIO_VS_LITELLM else "NOT met"
            verdict += (
                f"; LiteLLM's Router adds {theirs:.2f} ms over its raw call, so ours is {relation} "
                f"(target: at least {TARGET_RATIO_VS_LITELLM:g}x lower: {met})"
            )
        verdicts.append(verdict + ".")
    if verdicts:
        lines += ["Against the targets of issue 7:", "", *verdicts, ""]
    if "adapter" in series:
        where = []
        if "fal_client" in series:
            floor = overhead_per_run(series, "fal_client", "raw_queue")
            if floor > TARGET_P50_OVERHEAD_MS:
                left = f"already over the {TARGET_P50_OVERHEAD_MS:g} ms target"
            else:
                rest = TARGET_P50_OVERHEAD_MS - max(floor, 0.0)
                left = f"leaving {rest:.2f} ms of the target to the adapter and the service"
            where.append(
                f"- fal-client by itself (one client kept alive, no code of ours) differs from the raw calls by "
                f"{floor:+.2f} ms: the floor under any generate() built on it, {left}"
            )
            where.append(
                f"- the fal adapter adds {overhead_per_run(series, 'adapter', 'fal_client'):.2f} ms over fal-client by "
                "itself (a client and connections of its own per attempt, the transport that watches billing, "
                "validation, the deadline, the image's checks and storage)"
            )
        where.append(
            f"- the fal adapter alone adds {overhead_per_run(series, 'adapter', 'raw_queue'):.2f} ms over its raw calls"
        )
        for v in variants:
            if v.key.startswith("generate_"):
                where.append(f"- {v.label} adds {overhead_per_run(series, v.key, 'adapter'):.2f} ms over the adapter")
        lines += [
            "Where it goes (p50, per-run differences, medians; over the adapter is the service's own work: "
            "authorization, routing, the budget's reserve and settle, the generation, attempt, rollup and image rows, "
            "the breaker, and the hops to the database threads):",
            "",
            *[w + ";" for w in where[:-1]],
            where[-1] + ".",
            "",
        ]
    lines += ["Ledger after the runs (every generate() call reserved, settled and wrote its usage row):", ""]
    lines += [f"- {line}" for line in ledgers]
    return "\n".join(lines) + "\n"


async def run_all(args: argparse.Namespace) -> str:
    server_core, client_core = harness.core_plan()
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    with harness.Emulator(core=server_core, log_dir=workdir) as emulator:
        emulator.configure(latency_s=0, queue_steps=0, concurrency=1000)
        harness.product_env(emulator.url, workdir / "data")
        pin_self = harness.pin_self
        pin_self(client_core)
        params, adapter_request = wire_params()
        kinds = harness.database_kinds(args.db)
        variants: list[Variant] = []
        series: dict[str, Series] = {}
        ledgers: list[str] = []
        db_versions: list[str] = []
        async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as stack:
            variants.append(
                Variant("raw_queue", "raw fal queue calls (httpx)", raw_queue_call(client, emulator.url, params))
            )
            variants.append(
                Variant(
                    "fal_client",
                    "fal-client alone (one client kept alive)",
                    fal_client_call(client, emulator.url, params),
                    "raw_queue",
                )
            )
            variants.append(
                Variant("adapter", "fal adapter alone (no database)", adapter_call(adapter_request), "raw_queue")
            )
            budgets: dict[str, tuple[Any, int]] = {}
            for kind in kinds:
                db = stack.enter_context(harness.fresh_database(kind, workdir))
                db_versions.append(db.version)
                from core.runtime import open_runtime

                runtime = open_runtime(db.url, prepare=False)
                stack.callback(runtime.engine.dispose)
                actor = harness.bench_user(runtime.sessions)
                budget_id = harness.global_budget(runtime.sessions, 10**12)
                budgets[kind] = (runtime.sessions, budget_id)
                name = "SQLite" if kind == "sqlite" else "PostgreSQL"
                variants.append(
                    Variant(
                        f"generate_{kind}",
                        f"imagegate generate(), {name}",
                        generate_call(runtime.sessions, actor),
                        "raw_queue",
                    )
                )
            if litellm_available():
                variants.append(
                    Variant("raw_sync", "raw fal sync call (httpx)", raw_sync_call(client, emulator.url, params))
                )
                variants.append(
                    Variant(
                        "litellm", "LiteLLM Router.aimage_generation", litellm_call(emulator.url, params), "raw_sync"
                    )
                )
            else:
                print("LiteLLM is not installed (pip install -e '.[bench]'): its baseline is left out", file=sys.stderr)
            await measure(variants, emulator, args.calls, args.runs, args.warmup, series)
            for kind, (factory, budget_id) in budgets.items():
                ledgers.append(f"{kind}: " + ledger_check(factory, budget_id))
        facts = harness.machine_facts(db_versions, server_core, client_core)
    return report(variants, series, facts, ledgers, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="timed calls per variant and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before each batch")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("IMAGEGATE_DB_THREADS", "16")
    section = asyncio.run(run_all(args))
    harness.publish("overhead", section, args)


if __name__ == "__main__":
    main()
