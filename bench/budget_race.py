"""Processes racing for one budget through `generate()`: never a micro-dollar over, every reservation closed.

    python -m bench.budget_race [--processes 4] [--requests 100] [--fit 137.5] [--db sqlite|postgresql|both]

Per database (a fresh one each): one hard global daily budget whose limit fits `--fit` requests (the estimate
of one request, measured by one generate() before the budget exists, times `--fit`, rounded down). Then
`--processes` spawned processes (each its own engine and event loop) wait at a barrier and each fire
`--requests` concurrent `generate()` calls as one USER against the emulator (fal latency `--latency` s, room
for all at once). Afterwards the ledger is read back:

- the budget's period: spent <= limit, reserved = 0;
- every reservation settled or released (none left reserved or held);
- spent = the sum of the actual costs in the usage attempts = admitted x estimate (the emulator bills the
  estimate exactly);
- admitted + refused = all requests, and no other error.

The race is on the admission (one guarded UPDATE per budget) and on the settlement, across processes and
within each (the bounded DB executor runs up to IMAGEGATE_DB_THREADS transactions at once).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness

PROMPT = "a paper boat on a pond"
IMAGE_SIZE = "256x256"
BARRIER_TIMEOUT_S = 300


def _request() -> Any:
    from core.generation.models import GenerationRequest

    return GenerationRequest(
        PROMPT, provider="fal-qwen", allow_fallback=False, params={"image_size": IMAGE_SIZE, "num_images": 1}
    )


def racer(spec: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """One process: `requests` concurrent generate() calls, released together with the other processes."""
    harness.product_env(spec["emulator_url"], Path(spec["data_dir"]))
    return asyncio.run(_race(spec, barrier))


async def _race(spec: dict[str, Any], barrier: Any) -> dict[str, Any]:
    from common.errors import BudgetExceeded
    from core.generation.service import generate
    from core.runtime import open_runtime
    from core.security import Actor, Role

    runtime = open_runtime(spec["db_url"], prepare=False)
    actor = Actor(user_id=spec["user_id"], username=spec["username"], role=Role.USER)
    request = _request()
    outcomes = {"admitted": 0, "refused": 0}
    errors: dict[str, int] = {}

    async def one() -> None:
        try:
            result = await generate(request, actor, factory=runtime.sessions)
        except BudgetExceeded:
            outcomes["refused"] += 1
            return
        except Exception as exc:
            key = f"{type(exc).__name__}: {str(exc)[:160]}"
            errors[key] = errors.get(key, 0) + 1
            return
        if result.ok:
            outcomes["admitted"] += 1
        else:
            errors[f"status {result.status}"] = errors.get(f"status {result.status}", 0) + 1

    await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(spec["requests"])))
    seconds = time.perf_counter() - began
    runtime.engine.dispose()
    return {**outcomes, "errors": errors, "seconds": seconds}


def estimate_one(factory: Any, actor: Any) -> int:
    from core.generation.service import generate_sync

    result = generate_sync(_request(), actor, factory=factory)
    if not result.ok:
        raise RuntimeError(f"the probe request ended {result.status}")
    return int(result.cost.estimated_micro_usd)


def ledger(factory: Any, budget_id: int, exclude: set[str]) -> dict[str, Any]:
    from sqlalchemy import func, select

    from core.generation import budgets
    from db.models import BudgetReservation, Generation, UsageAttempt

    with factory() as session:
        figures = budgets.current_figures(session, budget_id, "simulated")
        statuses = dict(
            session.execute(select(BudgetReservation.status, func.count()).group_by(BudgetReservation.status)).all()
        )
        rows = session.execute(
            select(UsageAttempt.generation_id, UsageAttempt.actual_micro_usd, UsageAttempt.status)
        ).all()
        generations = dict(session.execute(select(Generation.status, func.count()).group_by(Generation.status)).all())
    actual = sum(r.actual_micro_usd or 0 for r in rows if r.generation_id not in exclude)
    return {
        "limit": figures.limit_micro_usd,
        "spent": figures.spent_micro_usd,
        "reserved": figures.reserved_micro_usd,
        "reservations": {str(getattr(k, "value", k)): v for k, v in statuses.items()},
        "attempt_actual": actual,
        "attempts": sum(1 for r in rows if r.generation_id not in exclude),
        "generations": {str(getattr(k, "value", k)): v for k, v in generations.items()},
    }


def race_on(kind: str, args: argparse.Namespace, emulator: harness.Emulator, workdir: Path) -> dict[str, Any]:
    from sqlalchemy import select

    from core.runtime import open_runtime
    from db.models import Generation

    with harness.fresh_database(kind, workdir) as db:
        runtime = open_runtime(db.url, prepare=False)
        actor = harness.bench_user(runtime.sessions)
        estimate = estimate_one(runtime.sessions, actor)
        with runtime.sessions() as session:
            probe = set(session.scalars(select(Generation.id)).all())
        limit = math.floor(estimate * args.fit)
        budget_id = harness.global_budget(runtime.sessions, limit)
        spec = {
            "emulator_url": emulator.url,
            "data_dir": str(workdir / "data"),
            "db_url": db.url,
            "user_id": actor.user_id,
            "username": actor.username,
            "requests": args.requests,
        }
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            barrier = manager.Barrier(args.processes)
            began = time.perf_counter()
            with context.Pool(args.processes) as pool:
                pending = [pool.apply_async(racer, (spec, barrier)) for _ in range(args.processes)]
                results = [p.get(timeout=args.timeout) for p in pending]
            wall = time.perf_counter() - began
        book = ledger(runtime.sessions, budget_id, probe)
        runtime.engine.dispose()
    admitted = sum(r["admitted"] for r in results)
    refused = sum(r["refused"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
    open_reservations = book["reservations"].get("reserved", 0) + book["reservations"].get("held", 0)
    checks = {
        "spent <= limit": book["spent"] <= book["limit"],
        "reserved = 0": book["reserved"] == 0,
        "no reservation left open": open_reservations == 0,
        "spent = sum of attempts' actual cost": book["spent"] == book["attempt_actual"],
        "spent = admitted x estimate": book["spent"] == admitted * estimate,
        "admitted + refused = all, no other error": admitted + refused == args.processes * args.requests and not errors,
    }
    return {
        "version": db.version,
        "estimate": estimate,
        "admitted": admitted,
        "refused": refused,
        "errors": errors,
        "book": book,
        "checks": checks,
        "wall_s": wall,
        "race_s": max(r["seconds"] for r in results),
        "fits": limit // estimate,
    }


def report(runs: list[tuple[str, dict[str, Any]]], facts: list[str], args: argparse.Namespace) -> str:
    total = args.processes * args.requests
    rows = []
    for _kind, r in runs:
        b = r["book"]
        rows.append(
            [
                r["version"],
                f"{r['admitted']} / {r['refused']}",
                f"{r['fits']}",
                f"{b['spent']:,} / {b['limit']:,}",
                f"{b['limit'] - b['spent']:,}",
                f"{b['reserved']}",
                ", ".join(f"{k} {v}" for k, v in sorted(b["reservations"].items())),
                f"{r['race_s']:.1f}",
                "; ".join(f"{n} x {e}" for e, n in r["errors"].items()) or "none",
            ]
        )
    header = [
        "database",
        "admitted / refused",
        "requests that fit",
        "spent / limit (micro-USD)",
        "left",
        "reserved after",
        "reservations",
        "race s",
        "other errors",
    ]
    lines = [
        f"## Budget race: {args.processes} processes x {args.requests} concurrent requests against one budget",
        "",
        f"Command: `{harness.command_line()}`",
        "",
        *[f"- {fact}" for fact in facts],
        f"- one hard global daily budget sized for {args.fit:g} requests (estimate of one request x {args.fit:g}, "
        f"rounded down; fal-ai/qwen-image {IMAGE_SIZE}); {total} generate() calls as one USER, emulator latency "
        f"{args.latency:g} s; spend is simulated (emulator mode), counted against the same limit.",
        "",
        harness.table(header, rows),
        "",
    ]
    for _kind, r in runs:
        failed = [name for name, ok in r["checks"].items() if not ok]
        verdict = "all hold" if not failed else "FAILED: " + ", ".join(failed)
        lines.append(f"- {r['version']}: " + ", ".join(r["checks"]) + f": {verdict}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.budget_race", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100, help="concurrent requests per process")
    parser.add_argument("--fit", type=float, default=137.5, help="how many requests the budget's limit fits")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds each fal job runs in the emulator")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a racing process may take")
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-budget-race-"))
    runs: list[tuple[str, dict[str, Any]]] = []
    versions: list[str] = []
    with harness.Emulator(log_dir=workdir) as emulator:
        total = args.processes * args.requests
        emulator.configure(latency_s=args.latency, queue_steps=0, concurrency=2 * total)
        harness.product_env(emulator.url, workdir / "data")
        for kind in harness.database_kinds(args.db):
            emulator.prune()
            result = race_on(kind, args, emulator, workdir)
            versions.append(result["version"])
            runs.append((kind, result))
            print(kind, result, file=sys.stderr)
        facts = harness.machine_facts(versions)
    facts = [f for f in facts if not f.startswith("pinning")] + ["pinning: none (every process uses both cores)"]
    section = report(runs, facts, args)
    harness.publish("budget_race", section, args)
    if any(not all(r["checks"].values()) for _, r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
