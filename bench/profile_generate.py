"""Where one `generate()` spends its CPU: a profile of sequential calls, statements and transactions counted.

    python -m bench.profile_generate [--calls 200] [--db sqlite|postgresql] [--top 40] [--sort tottime]

Not a benchmark (nothing here goes into docs/benchmarks.md): a tool for finding what to cut. The emulator runs
in its own process (fal answering at once), as in bench.overhead. To profile the database threads' work too,
the database executor runs each job inline on the event loop's thread while profiling (`--inline`, the
default), so cProfile sees it; `--threads` keeps the real executor and profiles only the loop's thread.

Prints: CPU ms per call (process CPU: every thread), SQL statements and commits per call (by the first words of
each statement), and the cProfile table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import pstats
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bench import harness
from bench.overhead import IMAGE_SIZE, PROMPT


def _inline_executor() -> None:
    """Make core.generation.dbexec run every job at once on the calling thread (profiling only)."""
    from core.generation import dbexec

    def submit(fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(dbexec._mapped(lambda: fn(*args, **kwargs)))
        except BaseException as error:  # handed back as the real executor would
            future.set_exception(error)
        return future

    dbexec.submit = submit


def _count_statements(engine: Any) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()

    @event.listens_for(engine, "before_cursor_execute")
    def statement(conn: Any, cursor: Any, sql: str, params: Any, context: Any, executemany: bool) -> None:
        words = sql.split()
        head = " ".join(words[:3]) if words else "?"
        seen[head] += 1

    @event.listens_for(engine, "commit")
    def commit(conn: Any) -> None:
        seen["(commit)"] += 1

    return seen


async def run(args: argparse.Namespace) -> None:
    from core.generation.models import GenerationRequest
    from core.generation.service import generate
    from core.runtime import open_runtime

    server_core, client_core = harness.core_plan()
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    with harness.Emulator(core=server_core, log_dir=workdir) as emulator:
        emulator.configure(latency_s=0, queue_steps=0, concurrency=1000)
        harness.product_env(emulator.url, workdir / "data")
        harness.pin_self(client_core)
        with harness.fresh_database(args.db, workdir) as db:
            runtime = open_runtime(db.url, prepare=False)
            actor = harness.bench_user(runtime.sessions)
            harness.global_budget(runtime.sessions, 10**12)
            request = GenerationRequest(PROMPT, provider="fal-qwen", params={"image_size": IMAGE_SIZE})
            if args.inline:
                _inline_executor()
            for _ in range(args.warmup):
                await generate(request, actor, factory=runtime.sessions)
            counts = _count_statements(runtime.engine)
            profile = cProfile.Profile()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            profile.enable()
            for _ in range(args.calls):
                await generate(request, actor, factory=runtime.sessions)
            profile.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            runtime.engine.dispose()
    n = args.calls
    print(f"{n} calls on {args.db}: CPU {cpu / n * 1000:.2f} ms per call, wall {wall / n * 1000:.2f} ms per call")
    print(f"statements per call: {sum(v for k, v in counts.items() if k != '(commit)') / n:.1f}; "
          f"commits per call: {counts['(commit)'] / n:.1f}")  # fmt: skip
    for head, number in counts.most_common():
        print(f"  {number / n:5.1f}  {head}")
    if args.save:
        profile.dump_stats(args.save)
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--save", help="also write the raw profile to this file (pstats)")
    parser.add_argument("--threads", dest="inline", action="store_false", help="keep the real executor")
    args = parser.parse_args(argv)
    os.environ.setdefault("IMAGEGATE_DB_THREADS", "16")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
