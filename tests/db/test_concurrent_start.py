"""Several processes starting at once on a fresh database: each migrates and seeds at start, and all must succeed.

Four real processes (spawn) meet at a barrier, then call `open_runtime(prepare=True)` on the same fresh database
at the same moment; this repeats over several fresh databases per backend, the same four processes taking part
in every trial (tests/racing.py's harness, shared with the other races). Before the migration lock
(db.upgrade_lock), 3 of 4 starters crashed in every PostgreSQL trial (UniqueViolation on a CREATE) and about half
the SQLite trials lost one to three ("table ... already exists").

The same harness with a naive first-run seed (`_naive_seed`: check whether the database is seeded, then seed it,
two steps and no second pass) fails starts: the checks can fail. Its losers do not leave duplicate seed rows (the
versions' unique constraints refuse them), they crash the start with a Conflict; what keeps `seed_defaults`
from that is its one transaction and its second pass after a lost race.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core import price_store, settings_service
from core.catalog import provider_ids
from core.pricing import load_default_prices
from core.security import Actor
from core.seed import SEED_COMMENT
from core.settings import GlobalSettings, default_provider_settings
from db import migrate
from db.engine import make_engine, session_factory, transaction
from db.models import GlobalSettingsVersion, PriceVersion, ProviderSettingsVersion
from tests.dbfixtures import create_pg_database, drop_pg_database
from tests.racing import backend, race_trials, run_trials

PROCESSES = 4
TRIALS = 6
NAIVE_TRIALS = 2
"""Fewer than TRIALS: with its pause the naive seed loses 3 of 4 starts in every trial, and the spawn (seconds on
a loaded machine) and PostgreSQL's fresh databases cost the test its time."""
OPEN_TRIALS = 100
NAIVE_SEED_PAUSE_S = 0.5
"""The naive seed's pause between its check and its write. The starters leave the migration lock one after
another (SQLite's busy handler polls it, PostgreSQL queues them on its advisory lock), measured about 0.1 s apart
on SQLite, so without a pause the first one's seed often commits before the last one checks: with none, 3 trials
failed 0 and 2 of 12 starts on SQLite, 5 of 12 on PostgreSQL. Half a second covers the four of them on a loaded
machine: 3 of 4 starts failed in every trial (3 runs of 3 trials and 3 of 2, per database)."""


def _failure(exc: BaseException) -> str:
    """A failed start as one line: the exception, its first line, and where it was raised (our frames only)."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    where = " <- ".join(
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in reversed(traceback.extract_tb(exc.__traceback__))
        if "site-packages" not in frame.filename
    )
    return f"{type(exc).__name__}: {first_line[:300]} (at {where})"


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
            return _failure(exc)

    run_trials(len(urls), start, done, out, start_up)


# --- the naive first-run seed (test helper only: it shows the checks can fail) --------------------------------


def _naive_seed(factory: sessionmaker[Session]) -> None:
    """Check whether the database is seeded (its global settings exist), and if not, seed it: the defaults
    written as the first version of each (`expected_version=0`: what the check found), in a second transaction,
    with no second pass when that write loses. Every starter that checked before the first seed committed seeds
    too, and crashes on the versions' unique constraints (a Conflict)."""
    with factory() as session:
        seeded = settings_service.get_global_settings(session).version != 0
    if seeded:
        return
    time.sleep(NAIVE_SEED_PAUSE_S)
    actor = Actor.system()
    with transaction(factory) as session:
        for provider in provider_ids():
            settings_service.save_provider_settings(
                session, actor, provider, default_provider_settings(provider), comment=SEED_COMMENT, expected_version=0
            )
        settings_service.save_global_settings(
            session, actor, GlobalSettings(), comment=SEED_COMMENT, expected_version=0
        )
        for price in load_default_prices().prices.values():
            price_store.add_price_version(session, actor, price, comment=SEED_COMMENT)


def _naive_starter(urls: list[str], start: Any, done: Any, out: Any) -> None:
    """`_starter` with `open_runtime`'s seed replaced by `_naive_seed` (the migration is the real, locked one)."""

    def start_up(trial: int) -> str | None:
        try:
            migrate.upgrade(urls[trial])
            engine = make_engine(urls[trial])
            try:
                _naive_seed(session_factory(engine))
            finally:
                engine.dispose()
            return None
        except BaseException as exc:  # reported to the parent, which counts it
            return _failure(exc)

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


def _failed_starts(errors: dict[int, list[str]]) -> tuple[dict[int, list[str]], int]:
    """The trials in which some start failed, with their errors, and how many starts failed in all."""
    failed = {trial: errs for trial, errs in errors.items() if errs}
    return failed, sum(len(errs) for errs in failed.values())


def _assert_all_started(urls: list[str]) -> None:
    failed, crashed = _failed_starts(_start_all_at_once(urls))
    assert not failed, f"{crashed} of {PROCESSES * len(urls)} starts failed: {failed}"
    for url in urls:
        _check_started_once(url)


def _assert_naive_starts_fail(urls: list[str]) -> None:
    """The checks `_assert_all_started` makes fail for `_naive_starter` in at least one trial; each database still
    holds its seed once (the unique constraints refused the losers' rows: what broke is their start)."""
    began = time.monotonic()
    errors = _start_all_at_once(urls, _naive_starter)
    failed, crashed = _failed_starts(errors)
    print(
        f"[{backend(urls[0])}] naive check-then-seed: {crashed} of {PROCESSES * len(urls)} starts failed, in "
        f"{len(failed)} of {len(urls)} trials ({[len(errs) for errs in errors.values()]} per trial), "
        f"{time.monotonic() - began:.1f} s; first: {next(iter(failed.values()), [None])[0]}"
    )
    assert failed
    for url in urls:
        _check_started_once(url)


def test_four_processes_open_a_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    """The first connections to a new file all switch it to WAL; SQLite does not wait for that lock, so before
    db.engine retried the switch about one start in 70 failed with "database is locked"."""
    urls = [f"sqlite:///{tmp_path / f'open-{trial}.db'}" for trial in range(OPEN_TRIALS)]
    failed, crashed = _failed_starts(_start_all_at_once(urls, _opener))
    assert not failed, f"{crashed} of {PROCESSES * OPEN_TRIALS} opens failed: {failed}"


def test_four_processes_start_at_once_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    _assert_all_started([f"sqlite:///{tmp_path / f'fresh-{trial}.db'}" for trial in range(TRIALS)])


def test_a_naive_check_then_seed_start_would_fail_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    _assert_naive_starts_fail([f"sqlite:///{tmp_path / f'naive-{trial}.db'}" for trial in range(NAIVE_TRIALS)])


@pytest.fixture
def fresh_pg_databases(pg_admin_dsn: str) -> Iterator[Callable[[int], list[str]]]:
    """Makes `count` empty PostgreSQL databases, never migrated, and gives their URLs; all dropped afterwards."""
    created: list[tuple[str, str]] = []

    def make(count: int) -> list[str]:
        batch = [create_pg_database(pg_admin_dsn, prefix="imagegate_start") for _ in range(count)]
        created.extend(batch)
        return [url for _, url in batch]

    try:
        yield make
    finally:
        for name, _ in created:
            drop_pg_database(pg_admin_dsn, name)


@pytest.mark.postgres
def test_four_processes_start_at_once_on_a_fresh_postgresql_database(
    fresh_pg_databases: Callable[[int], list[str]],
) -> None:
    _assert_all_started(fresh_pg_databases(TRIALS))


@pytest.mark.postgres
def test_a_naive_check_then_seed_start_would_fail_on_a_fresh_postgresql_database(
    fresh_pg_databases: Callable[[int], list[str]],
) -> None:
    _assert_naive_starts_fail(fresh_pg_databases(NAIVE_TRIALS))
