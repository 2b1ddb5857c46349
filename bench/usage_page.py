"""The Usage page at 1M and 10M usage rows: its data load from the rollups and its render, against a naive load.

    python -m bench.usage_page [--rows 1000000,10000000] [--db postgresql|sqlite|both] [--users 200] [--runs 5]
                               [--sqlite-max-rows 1000000]

Per size, a fresh database (dropped afterwards) is seeded on the server side: `rows` usage attempts (two per
generation) spread over the last 90 UTC days, four providers, `--users` accounts, 10 % of them simulated
(emulator), 5 % failed with one of four error classes, latencies spread over 2-10 s; then the matching daily
rollups, aggregated from those attempts by one INSERT ... SELECT (the same keys and latency buckets the
generation service writes). PostgreSQL fills the tables with INSERT ... SELECT FROM generate_series, SQLite with
a recursive CTE.

Timed, as an ADMIN (the page's default view: the last 30 days, live spend, every provider and user):
- **data load**: `core.usage_view.load_usage` (figures, top users, forecast, the optimizer's recommendations);
- **figures**: the five plotly figures built and serialised to JSON (what `st.plotly_chart` sends);
- **page**: the whole Usage page run by Streamlit's AppTest (sign-in check, filters, load, figures, tables,
  the first page of attempts);
- **naive baseline**: what a page without rollups does: the window's attempts read from usage_attempts into
  pandas, then grouped per day and provider with latency percentiles.
Medians of `--runs` runs after one warm-up (the baseline: fewer runs, it is slow). Targets (issue 9): the page
under 2 s at 1M rows, the load from the rollups under 1 s at 10M.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import harness

DAYS = 90
WINDOW_DAYS = 30
PROVIDERS = ("fal-qwen", "ideogram", "huggingface", "qwen")
ERRORS = ("rate_limited", "timeout", "unavailable", "bad_response")


def _bucket_case(column: str) -> str:
    from db.models import LATENCY_BUCKET_BOUNDS_MS

    whens = " ".join(f"WHEN {column} <= {bound} THEN {i}" for i, bound in enumerate(LATENCY_BUCKET_BOUNDS_MS))
    return f"CASE {whens} ELSE {len(LATENCY_BUCKET_BOUNDS_MS)} END"


def _seed_sql(kind: str, rows: int, first_user: int, users: int) -> list[str]:
    """Statements that fill generations, usage_attempts and usage_daily_rollups on the server."""
    from db.models import LATENCY_BUCKET_COLUMNS

    pg = kind == "postgresql"
    start = (datetime.now(UTC).date() - timedelta(days=DAYS - 1)).isoformat()
    providers = ", ".join(f"'{p}'" for p in PROVIDERS)
    errors = ", ".join(f"'{e}'" for e in ERRORS)
    if pg:
        series = f"generate_series(0, {rows - 1}) AS s(i)"
        gen_series = f"generate_series(0, {(rows + 1) // 2 - 1}) AS s(i)"
        provider = f"(ARRAY[{providers}])[1 + (i / {DAYS}) % 4]"
        error = f"(ARRAY[{errors}])[1 + (i / 7) % 4]"
        started = (
            f"(TIMESTAMPTZ '{start} 00:00:00+00' + ((i % {DAYS}) * INTERVAL '1 day') + ((i * 37) % 86400) * "
            "INTERVAL '1 second')"
        )
        json_obj, json_list = "'{}'::json", "'[]'::json"
        day = "(started_at AT TIME ZONE 'UTC')::date"
    else:
        series = (
            f"(WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {rows - 1}) SELECT i FROM s)"
        )
        gen_series = (
            f"(WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {(rows + 1) // 2 - 1}) "
            "SELECT i FROM s)"
        )
        provider = f"json_extract('[{providers.replace(chr(39), chr(34))}]', '$[' || ((i / {DAYS}) % 4) || ']')"
        error = f"json_extract('[{errors.replace(chr(39), chr(34))}]', '$[' || ((i / 7) % 4) || ']')"
        started = (
            f"strftime('%Y-%m-%d %H:%M:%f', '{start}', '+' || (i % {DAYS}) || ' days', "
            "'+' || ((i * 37) % 86400) || ' seconds')"
        )
        json_obj, json_list = "'{}'", "'[]'"
        day = "date(started_at)"
    failed = "((i * 31) % 100 < 5)"
    statements = [
        "INSERT INTO generations (id, mode, user_id, prompt, request, routing_policy, status, created_at, "
        "finished_at) "
        f"SELECT 'g' || i, 'live', {first_user} + (i * 13) % {users}, 'bench', {json_obj}, 'priority', 'succeeded', "
        f"{started}, NULL FROM {gen_series}",
        "INSERT INTO usage_attempts (generation_id, attempt_no, fallback_position, user_id, provider, mode, "
        "effective_params, translation_notes, estimated_micro_usd, actual_micro_usd, billing, status, error_class, "
        "images_count, megapixels_micro, total_ms, image_refs, started_at, finished_at) "
        f"SELECT 'g' || (i / 2), 1 + i % 2, i % 2, {first_user} + ((i / {DAYS * 4}) * 7919) % {users}, {provider}, "
        f"CASE WHEN (i / 7) % 10 = 0 THEN 'emulator' ELSE 'live' END, {json_obj}, {json_list}, 21000, "
        f"CASE WHEN {failed} THEN 0 ELSE 20000 + (i % 5) * 1000 END, "
        f"CASE WHEN {failed} THEN 'not_billed' ELSE 'billed' END, "
        f"CASE WHEN {failed} THEN 'failed' ELSE 'succeeded' END, CASE WHEN {failed} THEN {error} ELSE NULL END, "
        f"CASE WHEN {failed} THEN 0 ELSE 1 END, 1048576, 2000 + (i * 17) % 8000, {json_list}, {started}, {started} "
        f"FROM {series}",
    ]
    buckets = ", ".join(LATENCY_BUCKET_COLUMNS)
    bucket_sums = ", ".join(f"SUM(CASE WHEN b = {i} THEN 1 ELSE 0 END)" for i in range(len(LATENCY_BUCKET_COLUMNS)))
    statements.append(
        "INSERT INTO usage_daily_rollups (day, provider, user_id, mode, status, error_class, attempts, images, "
        "megapixels_micro, billed_units_micro, estimated_micro_usd, actual_micro_usd, unknown_billing, "
        f"latency_sum_ms, {buckets}) "
        "SELECT d, provider, u, mode, status, e, COUNT(*), SUM(images_count), SUM(megapixels_micro), 0, "
        f"SUM(estimated_micro_usd), SUM(actual_micro_usd), 0, SUM(total_ms), {bucket_sums} FROM ("
        f"SELECT {day} AS d, provider, COALESCE(user_id, 0) AS u, mode, status, COALESCE(error_class, '') AS e, "
        f"images_count, megapixels_micro, estimated_micro_usd, actual_micro_usd, total_ms, "
        f"{_bucket_case('total_ms')} AS b FROM usage_attempts) AS a GROUP BY d, provider, u, mode, status, e"
    )
    return statements


def _drop_indexes(conn: Any, kind: str, tables: tuple[str, ...]) -> list[str]:
    """Drop the tables' secondary indexes and unique constraints (a bulk insert then builds each index once, not
    row by row); returns the statements that put them back."""
    from sqlalchemy import text

    again: list[str] = []
    for table in tables:
        if kind == "postgresql":
            constraints = conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = CAST(:t AS regclass) AND contype = 'u'"
                ),
                {"t": table},
            ).all()
            for name, definition in constraints:
                conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
                again.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            indexes = conn.execute(
                text(
                    "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename = :t AND NOT EXISTS "
                    "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
                ),
                {"t": table},
            ).all()
        else:
            indexes = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL"),
                {"t": table},
            ).all()
        for name, definition in indexes:
            conn.execute(text(f'DROP INDEX "{name}"'))
            again.append(definition)
    return again


def _seed(db: harness.Database, rows: int, users: int) -> tuple[Any, Any, dict[str, float]]:
    """(runtime, admin actor, seconds per step)."""
    from sqlalchemy import text

    from core.runtime import open_runtime
    from core.security import Actor, Role
    from core.users import create_user
    from db.engine import transaction

    runtime = open_runtime(db.url, prepare=False)
    with transaction(runtime.sessions) as session:
        admin = create_user(session, Actor.system("bench"), "bench-admin", "bench-admin-password", Role.ADMIN)
        # The other accounts share the admin's password hash (argon2 per account would dominate the seeding).
        session.execute(
            text(
                "INSERT INTO users (username, password_hash, role, active, created_at, password_changed_at, "
                "failed_sign_ins) SELECT :prefix || :n, password_hash, 'USER', :yes, created_at, created_at, 0 "
                "FROM users WHERE id = :admin"
            ),
            [{"prefix": "user", "n": f"{n:04d}", "yes": True, "admin": admin.id} for n in range(users)],
        )
        ids = sorted(session.scalars(text("SELECT id FROM users WHERE role = 'USER'")))
    assert ids == list(range(ids[0], ids[0] + users)), "user ids are consecutive"
    took: dict[str, float] = {}
    with runtime.engine.begin() as conn:
        indexes = _drop_indexes(conn, db.kind, ("generations", "usage_attempts"))
    steps = ("generations", "attempts", "rollups")
    for name, statement in zip(steps, _seed_sql(db.kind, rows, ids[0], users), strict=True):
        began = time.perf_counter()
        with runtime.engine.begin() as conn:
            conn.execute(text(statement))
        took[name] = time.perf_counter() - began
    began = time.perf_counter()
    with runtime.engine.begin() as conn:
        for statement in indexes:
            conn.execute(text(statement))
    took["indexes"] = time.perf_counter() - began
    with runtime.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
        counts = {
            table: int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
            for table in ("usage_attempts", "usage_daily_rollups")
        }
    took.update({f"{k} rows": float(v) for k, v in counts.items()})
    return runtime, admin.actor(), took


def _median_s(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def _filters() -> Any:
    from core.usage_view import UsageFilters

    today = datetime.now(UTC).date()
    return UsageFilters(date_from=today - timedelta(days=WINDOW_DAYS - 1), date_to=today, spend_mode="live")


def _naive(runtime: Any) -> dict[str, int]:
    """The window's live attempts into pandas, grouped per day and provider, latency percentiles per provider."""
    import pandas as pd
    from sqlalchemy import text

    since = datetime.combine(_filters().date_from, datetime.min.time(), tzinfo=UTC)
    with runtime.engine.connect() as conn:
        frame = pd.read_sql(
            text(
                "SELECT started_at, provider, user_id, status, error_class, actual_micro_usd, images_count, total_ms "
                "FROM usage_attempts WHERE started_at >= :since AND mode = 'live'"
            ),
            conn,
            params={"since": since},
        )
    frame["day"] = pd.to_datetime(frame["started_at"], utc=True).dt.date
    per_day = frame.groupby(["day", "provider"])["actual_micro_usd"].sum()
    latency = frame.groupby("provider")["total_ms"].quantile([0.5, 0.95])
    users = frame.groupby("user_id")["actual_micro_usd"].sum().nlargest(10)
    errors = frame[frame["status"] != "succeeded"].groupby(["provider", "error_class"]).size()
    return {"rows": len(frame), "groups": len(per_day) + len(latency) + len(users) + len(errors)}


def _page(db: harness.Database, runtime: Any, actor: Any, data_dir: Path) -> Callable[[], object]:
    import os

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core import console_sessions
    from db.engine import transaction

    os.environ["DATABASE_URL"] = db.url
    os.environ["IMAGEGATE_DATA_DIR"] = str(data_dir)
    st.cache_resource.clear()
    app = str(harness.ROOT / "ui" / "console.py")

    def run() -> object:
        with transaction(runtime.sessions) as session:
            started = console_sessions.start(session, actor.user_id)
        at = AppTest.from_file(app, default_timeout=120)
        at.session_state["imagegate_console_session"] = started.session_id
        at.switch_page(str(harness.ROOT / "pages" / "usage.py"))
        at.session_state["usage.mode"] = "live"  # the page opens on simulated spend when no provider is live
        at.run()
        if at.exception:
            raise RuntimeError(str(at.exception))
        return len(at.get("plotly_chart"))

    return run


def measure(kind: str, rows: int, users: int, runs: int, workdir: Path) -> dict[str, Any]:
    from core.usage_view import load_usage
    from ui import usage_charts

    with harness.fresh_database(kind, workdir) as db:
        runtime, actor, seeded = _seed(db, rows, users)
        try:

            def load() -> object:
                with runtime.sessions() as session:
                    return load_usage(session, actor, _filters())

            load_s, view = _median_s(load, runs)

            def figures() -> object:
                return [fig.to_json() for fig in usage_charts.all_figures(view)]  # type: ignore[arg-type]

            figures_s, _ = _median_s(figures, runs)
            page_s, charts = _median_s(_page(db, runtime, actor, workdir), max(1, runs // 2))
            naive_s, naive = _median_s(lambda: _naive(runtime), 1 if rows > 2_000_000 else 2)
        finally:
            runtime.engine.dispose()
        return {
            "kind": kind,
            "version": db.version,
            "rows": rows,
            "seeded": seeded,
            "load_s": load_s,
            "figures_s": figures_s,
            "page_s": page_s,
            "charts": charts,
            "naive_s": naive_s,
            "naive": naive,
            "days": len(view.days),  # type: ignore[attr-defined]
        }


def report(results: list[dict[str, Any]], users: int, runs: int) -> str:
    rows = []
    for r in results:
        seeded = r["seeded"]
        rows.append(
            [
                r["version"],
                f"{r['rows']:,}",
                f"{int(seeded['usage_daily_rollups rows']):,}",
                f"{r['load_s'] * 1000:,.0f}",
                f"{r['figures_s'] * 1000:,.0f}",
                f"{r['page_s'] * 1000:,.0f}",
                f"{r['naive_s'] * 1000:,.0f} ({r['naive']['rows']:,} rows read)",
                f"{seeded['attempts'] + seeded['generations'] + seeded['indexes']:,.0f} + {seeded['rollups']:,.0f}",
            ]
        )
    lines = [
        "## The Usage page at 1M and 10M usage rows (`bench/usage_page.py`)",
        "",
        f"Command: `{harness.command_line()}`",
        "",
        *(f"- {line}" for line in harness.machine_facts([r["version"] for r in results[:1]])),
        f"- data: attempts over {DAYS} days, 4 providers, {users} users, 10 % simulated, 5 % failed; the page's "
        f"default view timed as an ADMIN: the last {WINDOW_DAYS} days, live spend; medians of {runs} runs after a "
        "warm-up (the page: half as many; the baseline: 1-2)",
        "",
        harness.table(
            [
                "database",
                "usage attempts",
                "rollup rows",
                "data load from the rollups (ms)",
                "5 figures built + JSON (ms)",
                "whole page, AppTest (ms)",
                "naive: attempts into pandas (ms)",
                "seeding: attempts + rollups (s)",
            ],
            rows,
        ),
        "",
        "Targets (issue 9): the page under 2 s at 1M rows; the data load from the rollups under 1 s at 10M. "
        "The data load is `core.usage_view.load_usage` (two statements over the rollups, the budgets' forecasts "
        "and the optimizer's recommendations); the naive baseline reads the window's attempts from "
        "usage_attempts and groups them in pandas, which grows with the rows while the rollups grow only with "
        "days x providers x users x modes x statuses x error classes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated sizes")
    parser.add_argument("--db", default="postgresql", choices=["sqlite", "postgresql", "both"])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sqlite-max-rows", type=int, default=1_000_000, help="larger sizes run on PostgreSQL only")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.rows.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="imagegate-usage-bench-") as tmp:
        for kind in harness.database_kinds(args.db):
            for rows in sizes:
                if kind == "sqlite" and rows > args.sqlite_max_rows:
                    continue
                print(f"{kind}: seeding {rows:,} usage rows ...", file=sys.stderr, flush=True)
                result = measure(kind, rows, args.users, args.runs, Path(tmp))
                print(
                    f"{kind} {rows:,}: load {result['load_s']:.3f} s, figures {result['figures_s']:.3f} s, "
                    f"page {result['page_s']:.3f} s, naive {result['naive_s']:.3f} s; seeded {result['seeded']}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
    path = harness.write_section("usage_page", report(results, args.users, args.runs), args.results)
    print(f"results written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
