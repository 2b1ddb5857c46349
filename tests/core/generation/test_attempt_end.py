"""An attempt's end when the database fails under it, and an unknown bill followed by a fallback.

- A driver error ("database is locked" after SQLite's busy timeout, a dropped PostgreSQL connection) comes out of
  core.generation.dbexec as `DatabaseUnavailable`, never as a raw SQLAlchemy `OperationalError`.
- The attempt's end (settle, finish with rollup, generation, breaker: one transaction) is retried a bounded
  number of times; it applies at most once, even when a commit went through and only its answer was lost.
- When every try fails, the request stops with `DatabaseUnavailable` and leaves the generation to recovery,
  which collects the paid result by its request id and settles it once: the billing fact is not lost.
- Billing unknown (a timeout) keeps that attempt's estimate held, and a fallback is admitted against what is
  left after it: a hard budget with room for one attempt refuses the fallback instead of letting a second
  provider charge on top of one that may have charged.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from common.errors import DatabaseUnavailable
from core.generation import dbexec
from core.generation import service as service_module
from core.generation.models import GenerationFailed, GenerationRequest, GenerationStatus
from core.generation.recovery import recover
from core.generation.service import generate_sync
from db.engine import make_engine, session_factory, transaction
from db.models import BudgetReservation, ReservationStatus, SpendMode, utcnow
from emulator.faults import Fault, FaultBoard
from emulator.runner import BackgroundServer
from tests.core.generation.service_support import (
    SYSTEM,
    Figures,
    attempts,
    figures,
    generation,
    images,
    make_budget,
    open_reservations,
    rollup_attempts,
    running_emulator,
    seed,
    update_provider,
)

FAL_ESTIMATE = 15_729  # fal-qwen at its default settings (landscape 4:3, one image) and $0.02/MP


def _locked() -> exc.OperationalError:
    """What SQLAlchemy raises when SQLite's busy timeout runs out (the driver's own error, wrapped)."""
    return exc.OperationalError("UPDATE usage_attempts ...", {}, sqlite3.OperationalError("database is locked"))


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def emulated(emulator_server: tuple[BackgroundServer, FaultBoard], monkeypatch: pytest.MonkeyPatch) -> FaultBoard:
    server, board = emulator_server
    board.reset()
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
    return board


def _reservation_statuses(factory: sessionmaker[Session]) -> list[ReservationStatus]:
    with factory() as session:
        return list(session.scalars(select(BudgetReservation.status).order_by(BudgetReservation.created_at)))


# --- dbexec ------------------------------------------------------------------------------------------------------


async def test_a_real_database_is_locked_comes_back_as_database_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    factory = session_factory(engine)
    blocker = make_engine(url, poolclass=NullPool).raw_connection()
    blocker.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock

    def write(session: Session) -> None:
        session.execute(text("PRAGMA busy_timeout = 50"))  # give up after 50 ms instead of 10 s
        session.execute(text("INSERT INTO t VALUES (1)"))

    try:
        with pytest.raises(DatabaseUnavailable, match="database is locked") as raised:
            await dbexec.in_transaction(factory, write)
        assert isinstance(raised.value.__cause__, exc.OperationalError)
        with pytest.raises(DatabaseUnavailable, match="database is locked"):
            await dbexec.run_db(lambda: dbexec._in_transaction(factory, write))
    finally:
        blocker.rollback()
        blocker.close()
        engine.dispose()


async def test_integrity_errors_are_not_mapped(db_session_factory: sessionmaker[Session]) -> None:
    def twice(session: Session) -> None:
        session.execute(text("INSERT INTO provider_slots (provider, slot_no) VALUES ('sandbox', 1)"))
        session.execute(text("INSERT INTO provider_slots (provider, slot_no) VALUES ('sandbox', 1)"))

    with pytest.raises(exc.IntegrityError):
        await dbexec.in_transaction(db_session_factory, twice)


async def test_write_once_retries_a_bounded_number_of_times(db_session_factory: sessionmaker[Session]) -> None:
    calls: list[int] = []

    def flaky(session: Session) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise _locked()
        return len(calls)

    assert await dbexec.write_once(db_session_factory, flaky) == 3
    calls.clear()

    def always(session: Session) -> None:
        calls.append(1)
        raise _locked()

    with pytest.raises(DatabaseUnavailable, match="database is locked"):
        await dbexec.write_once(db_session_factory, always)
    assert len(calls) == dbexec.WRITE_ATTEMPTS


# --- the attempt's end -------------------------------------------------------------------------------------------


def _fail_end(monkeypatch: pytest.MonkeyPatch, how: Callable[[Callable[[], None], int], None]) -> list[int]:
    """Replace the attempt end's transaction body: `how(real_body, call_number)` runs inside each try."""
    real = service_module._Run._end_transaction
    calls: list[int] = []

    def wrapped(self: Any, session: Session, **kwargs: Any) -> None:
        calls.append(1)
        how(lambda: real(self, session, **kwargs), len(calls))

    monkeypatch.setattr(service_module._Run, "_end_transaction", wrapped)
    return calls


def test_a_locked_database_at_the_attempt_end_is_retried_and_counted_once(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = make_budget(factory)

    def locked_once(body: Callable[[], None], call: int) -> None:
        body()
        if call == 1:
            raise _locked()  # the whole first try rolls back

    calls = _fail_end(monkeypatch, locked_once)
    result = generate_sync(GenerationRequest("a red fox", provider="fal-qwen"), SYSTEM, factory=factory)

    assert result.status is GenerationStatus.SUCCEEDED and len(calls) == 2
    [row] = attempts(factory)
    assert (row.status, row.billing, row.actual_micro_usd) == ("succeeded", "billed", FAL_ESTIMATE)
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(FAL_ESTIMATE, 0)
    assert rollup_attempts(factory) == 1 and len(images(factory, result.generation_id)) == 1
    assert generation(factory, result.generation_id).status == "succeeded"


def test_a_commit_whose_answer_was_lost_is_not_applied_twice(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try's work reached the database (committed on its own here), then the connection broke
    before the answer came: the retry finds the attempt finished and changes nothing."""
    budget = make_budget(factory)
    real = service_module._Run._end_transaction

    def committed_then_dropped(self: Any, session: Session, **kwargs: Any) -> None:
        if not committed:
            committed.append(1)
            with transaction(factory) as own:
                real(self, own, **kwargs)
            raise exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        real(self, session, **kwargs)

    committed: list[int] = []
    monkeypatch.setattr(service_module._Run, "_end_transaction", committed_then_dropped)
    result = generate_sync(GenerationRequest("a red fox", provider="fal-qwen"), SYSTEM, factory=factory)

    assert result.status is GenerationStatus.SUCCEEDED
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(FAL_ESTIMATE, 0)
    assert rollup_attempts(factory) == 1 and len(images(factory, result.generation_id)) == 1
    assert _reservation_statuses(factory) == [ReservationStatus.SETTLED]


def test_an_end_that_cannot_be_written_is_left_to_recovery_which_keeps_the_bill(
    factory: sessionmaker[Session], emulated: FaultBoard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try fails: the request stops with DatabaseUnavailable (not a raw OperationalError), nothing else is
    attempted or written, the attempt and its reservation stay open, and recovery later collects the paid fal
    job by its request id and settles it once at its actual cost."""
    budget = make_budget(factory)
    failing = [True]

    def locked_while_failing(body: Callable[[], None], call: int) -> None:
        if failing[0]:
            raise _locked()
        body()

    calls = _fail_end(monkeypatch, locked_while_failing)
    request = GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=True)
    with pytest.raises(DatabaseUnavailable, match="left for recovery"):
        generate_sync(request, SYSTEM, factory=factory)
    assert len(calls) == dbexec.WRITE_ATTEMPTS

    [row] = attempts(factory)  # no fallback ran after the lost end
    assert row.finished_at is None and row.provider_request_id
    gen_id = row.generation_id
    assert generation(factory, gen_id).finished_at is None
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(0, FAL_ESTIMATE)
    assert _reservation_statuses(factory) == [ReservationStatus.RESERVED]

    failing[0] = False  # the database is back; the lease has expired a minute later
    report = asyncio.run(recover(factory, now=utcnow() + timedelta(minutes=2)))
    assert [a.outcome for a in report.attempts] == ["collected"]
    [row] = attempts(factory)
    assert (row.status, row.billing) == ("recovered", "billed") and row.actual_micro_usd is not None
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(row.actual_micro_usd, 0)
    assert generation(factory, gen_id).status == "succeeded"
    assert rollup_attempts(factory) == 1 and open_reservations(factory) == 0
    assert _reservation_statuses(factory) == [ReservationStatus.SETTLED]


# --- billing unknown, then a fallback ----------------------------------------------------------------------------


def test_an_unknown_bill_stays_held_and_a_fallback_must_fit_beside_it(
    factory: sessionmaker[Session], emulated: FaultBoard
) -> None:
    """fal times out (billing unknown: the job may have run and been charged). Its estimate stays held and
    counts against the hard budget, so the fallback to Hugging Face, which would fit alone, is refused: the
    budget can never be overspent by an unknown charge plus a fallback's."""
    seed(factory, timeout_s=1.5)
    update_provider(factory, "qwen", active=False)  # free: it would fit any budget
    emulated.set_fault("fal", Fault.HANG)
    budget = make_budget(factory, limit_micro_usd=FAL_ESTIMATE + FAL_ESTIMATE // 2)
    request = GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=True)
    with pytest.raises(GenerationFailed) as failed:
        generate_sync(request, SYSTEM, factory=factory)

    rows = attempts(factory)
    assert [(a.provider, a.error_class, a.billing) for a in rows] == [("fal-qwen", "timeout", "unknown")]
    held = rows[0].estimated_micro_usd
    refusals = [s for s in failed.value.result.attempts if s.provider != "fal-qwen"]
    assert refusals == []  # nothing ran after fal
    assert "huggingface" in str(failed.value) and "hard budget refused" in str(failed.value)
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(0, held)
    assert _reservation_statuses(factory) == [ReservationStatus.HELD]
    assert generation(factory, rows[0].generation_id).final_cost_micro_usd is None  # unknown until reconciled
