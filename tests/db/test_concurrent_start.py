"""Several processes starting at once on a fresh database: each migrates and seeds at start, and all must succeed.

Four real processes (spawn) meet at a barrier, then call `open_runtime(prepare=True)` on the same fresh database
at the same moment; this repeats over several fresh databases per backend, the same four processes taking part
in every trial (tests/racing.py's harness, shared with the other races). Before the migration lock
(db.upgrade_lock), 3 of 4 starters crashed in every PostgreSQL trial (UniqueViolation on a CREATE) and about half
the SQLite trials lost one to three ("table ... already exists").
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.catalog import provider_ids
from core.pricing import load_default_prices
from db import migrate
from db.engine import make_engine
from db.models import GlobalSettingsVersion, PriceVersion, ProviderSettingsVersion
from tests.dbfixtures import create_pg_database, drop_pg_database
from tests.racing import race_trials, run_trials

PROCESSES = 4
TRIALS = 6
OPEN_TRIALS = 100


def _starter(urls: list[str], start: Any, done: Any, out: Any) -> None:
    """One process, one trial per database: wait for the others, then start up on it (migrate + seed); report
    None, or the error."""
    from core.runtime import open_runtime  # imported before the barrier, so only the start itself races

    def start_up(trial: int) -> str | None:
        try:
            runtime = open_runtime(urls[trial], prepare=True)
            runtime.engine.dispose()
            return None
        except BaseException as exc:  # reported to the parent, which fails the test with it
            first_line = (str(exc).strip().splitlines() or [""])[0]
            where = " <- ".join(
                f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                for frame in reversed(traceback.extract_tb(exc.__traceback__))
                if "site-packages" not in frame.filename
            )
            return f"{type(exc).__name__}: {first_line[:300]} (at {where})"

    run_trials(len(urls), start, done, out, start_up)


def _opener(urls: list[str], start: Any, done: Any, out: Any) -> None:
    """One process, one trial per database: wait for the others, then open a first connection to it; report
    None, or what went wrong."""

    def open_first(trial: int) -> str | None:
        engine = make_engine(urls[trial])
        try:
            with engine.connect() as connection:
                mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            return None if mode == "wal" else f"journal mode {mode!r}, not wal"
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        finally:
            engine.dispose()

    run_trials(len(urls), start, done, out, open_first)


def _start_all_at_once(urls: list[str], target: Any = _starter) -> dict[int, list[str]]:
    """Run PROCESSES `target`s over `urls`; the errors per trial (empty lists when every start succeeded)."""
    errors = race_trials(
        target,
        (urls,),
        processes=PROCESSES,
        trials=len(urls),
        observe=lambda _trial, _set_up, reports: [r["results"] for r in reports if r["results"] is not None],
    )
    return dict(enumerate(errors))


def _check_started_once(url: str) -> None:
    """Schema at head and matching the models; the defaults seeded exactly once (one version of each)."""
    assert migrate.current_revision(url) == migrate.head_revision()
    assert migrate.schema_diff(url) == []
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            settings_versions = dict(
                session.execute(
                    select(ProviderSettingsVersion.provider, func.count()).group_by(ProviderSettingsVersion.provider)
                ).all()
            )
            price_versions = dict(
                session.execute(select(PriceVersion.provider, func.count()).group_by(PriceVersion.provider)).all()
            )
            global_versions = session.scalar(select(func.count()).select_from(GlobalSettingsVersion))
    finally:
        engine.dispose()
    assert settings_versions == {provider: 1 for provider in provider_ids()}
    assert price_versions == {provider: 1 for provider in load_default_prices().prices}
    assert global_versions == 1


def _assert_all_started(urls: list[str]) -> None:
    errors = _start_all_at_once(urls)
    failed = {trial: errs for trial, errs in errors.items() if errs}
    crashed = sum(len(errs) for errs in failed.values())
    assert not failed, f"{crashed} of {PROCESSES * len(urls)} starts failed: {failed}"
    for url in urls:
        _check_started_once(url)


def test_four_processes_open_a_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    """The first connections to a new file all switch it to WAL; SQLite does not wait for that lock, so before
    db.engine retried the switch about one start in 70 failed with "database is locked"."""
    errors = _start_all_at_once([f"sqlite:///{tmp_path / f'open-{trial}.db'}" for trial in range(OPEN_TRIALS)], _opener)
    failed = {trial: errs for trial, errs in errors.items() if errs}
    assert not failed, f"{sum(map(len, failed.values()))} of {PROCESSES * OPEN_TRIALS} opens failed: {failed}"


def test_four_processes_start_at_once_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    _assert_all_started([f"sqlite:///{tmp_path / f'fresh-{trial}.db'}" for trial in range(TRIALS)])


@pytest.fixture
def fresh_pg_urls(pg_admin_dsn: str) -> Iterator[list[str]]:
    """TRIALS empty PostgreSQL databases, never migrated; dropped afterwards."""
    created = [create_pg_database(pg_admin_dsn, prefix="imagegate_start") for _ in range(TRIALS)]
    try:
        yield [url for _, url in created]
    finally:
        for name, _ in created:
            drop_pg_database(pg_admin_dsn, name)


@pytest.mark.postgres
def test_four_processes_start_at_once_on_a_fresh_postgresql_database(fresh_pg_urls: list[str]) -> None:
    _assert_all_started(fresh_pg_urls)
