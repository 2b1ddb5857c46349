"""Reading the settings and prices a request needs: the old read path beside the cached snapshot.

    python -m bench.snapshot_read [--db sqlite|postgresql|both] [--reads 2000] [--write]

Per database (a fresh one each, migrated and seeded): statements per call (a SQLAlchemy event counter) and the
median / p99 time per call of
- the old read path: global settings, every provider's settings for routing, the prices in force (what
  a request read before core.generation.snapshot);
- the old `prepare()` of one provider on a session (global, pointer, version row, price);
- a cold snapshot read (the vector, 3 data queries, the vector again);
- a warm snapshot read (the version vector only), and with `recheck_after_s` (no query at all);
- `prepare()` from a warm snapshot (the vector read plus the preparation itself).
`--write` replaces the `snapshot` section of docs/benchmarks.md with the table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness


def _measure(fn: Callable[[], Any], reads: int, count: Callable[[], int]) -> tuple[int, float, float]:
    """(statements per call, median ms, p99 ms) over `reads` calls, after 50 warm-up calls."""
    for _ in range(50):
        fn()
    times: list[float] = []
    statements: list[int] = []
    for _ in range(reads):
        before = count()
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
        statements.append(count() - before)
    return max(set(statements), key=statements.count), harness.percentile(times, 50), harness.percentile(times, 99)


def run(kind: str, reads: int) -> tuple[str, list[list[Any]]]:
    from sqlalchemy import event

    from core import price_store, settings_service
    from core.generation.prepare import prepare
    from core.generation.snapshot import SettingsCache
    from db.engine import make_engine, session_factory

    with tempfile.TemporaryDirectory() as directory, harness.fresh_database(kind, Path(directory)) as db:
        engine = make_engine(db.url)
        factory = session_factory(engine)
        seen = [0]

        def counted(*_args: object) -> None:
            seen[0] += 1

        event.listen(engine, "before_cursor_execute", counted)

        def old_path() -> None:
            with factory() as session:
                settings_service.get_global_settings(session)
                settings_service.settings_for_routing(session)
                price_store.active_prices(session)

        def old_prepare() -> None:
            with factory() as session:
                prepare(session, "fal-qwen", prompt="a fox")

        cache = SettingsCache(factory)

        def cold() -> None:
            cache.invalidate()
            cache.get()

        relaxed = SettingsCache(factory, recheck_after_s=60.0)
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("old read path (global + routing + prices)", old_path),
            ("old prepare() of one provider", old_prepare),
            ("snapshot, cold", cold),
            ("snapshot, warm", cache.get),
            ("snapshot, warm, recheck_after_s=60", relaxed.get),
            ("prepare() from a warm snapshot", lambda: prepare(None, "fal-qwen", prompt="a fox", snapshot=cache.get())),
        ]
        rows = []
        for name, fn in cases:
            statements, p50, p99 = _measure(fn, reads, lambda: seen[0])
            rows.append([name, statements, harness.fmt_ms(p50), harness.fmt_ms(p99)])
        engine.dispose()
        return db.version, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--write", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()
    sections = []
    versions = []
    for kind in harness.database_kinds(args.db):
        version, rows = run(kind, args.reads)
        versions.append(version)
        table = harness.table(("read", "statements per call", "p50 ms", "p99 ms"), rows)
        print(f"\n{version}\n{table}")
        sections.append(f"**{version}**\n\n{table}")
    if args.write:
        facts = "\n".join(f"- {line}" for line in harness.machine_facts(versions))
        markdown = (
            "## Settings and prices per request (core.generation.snapshot)\n\n"
            f"`{harness.command_line()}`, {args.reads} reads per case after 50 warm-up reads.\n\n"
            f"{facts}\n\n" + "\n\n".join(sections)
        )
        print(f"written to {harness.write_section('snapshot', markdown)}")


if __name__ == "__main__":
    main()
