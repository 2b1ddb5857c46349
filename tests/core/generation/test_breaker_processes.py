"""One breaker shared by real processes, on SQLite and PostgreSQL.

- Failures reported at once by every thread of several processes open the breaker exactly once, by the failure
  that crossed the threshold (consecutive, or the window's rate), and nothing is counted after it opened.
- Requests asking at once for the half-open probe (cooldown over, or the previous owner's lease expired): exactly
  one gets it.
- The same harness with naive read-then-write versions opens twice and hands out several probes: the checks can
  fail.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from core.generation.breaker import CircuitState
from db.engine import transaction
from db.models import CircuitStateRow
from tests.core.generation import breaker_racers
from tests.core.generation.breaker_racers import NOW, PROVIDER
from tests.racing import backend, race_trials, thread_results

PROCESSES = 3
THREADS = 6
TRIALS = 12
Factory = sessionmaker[Session]
C = CircuitStateRow


def _prepare(factory: Factory, kind: str, trial: int) -> None:
    """The breaker's state before a trial."""
    with transaction(factory) as session:
        session.execute(delete(C).where(C.provider == PROVIDER))
        if kind == "rate":  # a window holding 8 successes: 8 failures more make half of 16, which opens it
            session.add(
                C(
                    provider=PROVIDER,
                    state=CircuitState.CLOSED,
                    since=NOW - timedelta(hours=1),
                    window_start=NOW - timedelta(seconds=1),
                    window_requests=8,
                    window_failures=0,
                )
            )
            return
        if kind in ("consecutive", "naive-consecutive"):
            if trial % 2 or kind.startswith("naive"):  # every other trial races on creating the row too
                session.add(C(provider=PROVIDER, state=CircuitState.CLOSED, since=NOW - timedelta(hours=1)))
            return
        row = C(
            provider=PROVIDER,
            state=CircuitState.OPEN,
            reason="test",
            since=NOW - timedelta(minutes=5),
            next_probe_at=NOW - timedelta(seconds=1),
            opened_count=1,
        )
        if trial % 2:  # a probe whose owner died: its lease ran out a second ago
            row.state = CircuitState.HALF_OPEN
            row.probe_owner = "dead"
            row.probe_lease_until = NOW - timedelta(seconds=1)
        session.add(row)


def _row(factory: Factory) -> CircuitStateRow:
    with factory() as session:
        row = session.get(C, PROVIDER)
        assert row is not None
        session.expunge(row)
        return row


def _race(
    db_url: str, factory: Factory, kind: str, *, trials: int = TRIALS, per_thread: int = 2
) -> list[tuple[list[Any], CircuitStateRow]]:
    """Run `trials` trials of `kind` across PROCESSES processes; return per trial (results, row after)."""
    naive = kind.startswith("naive")
    return race_trials(
        breaker_racers.race,
        (db_url, kind.removeprefix("naive-"), trials, THREADS, per_thread, naive),
        processes=PROCESSES,
        trials=trials,
        set_up=lambda trial: _prepare(factory, kind, trial),
        observe=lambda _trial, _set_up, reports: (thread_results(reports), _row(factory)),
    )


@pytest.mark.parametrize("kind", ["consecutive", "rate"])
def test_failures_from_every_process_open_the_breaker_exactly_once(
    kind: str, db_url: str, db_session_factory: Factory
) -> None:
    began = time.monotonic()
    facts = _race(db_url, db_session_factory, kind)
    for trial, (results, row) in enumerate(facts):
        outcomes = Counter(r for per_thread in results for r in per_thread)
        where = f"[{backend(db_url)} {kind} trial {trial}] {dict(outcomes)}"
        assert outcomes["opened"] == 1, where
        assert row.state is CircuitState.OPEN and row.opened_count == 1, where
        assert row.next_probe_at == NOW + timedelta(seconds=30), where
        if kind == "consecutive":
            # Counting stops at the threshold: every later failure found the breaker open and counted nothing.
            assert (row.consecutive_failures, row.window_failures, row.window_requests) == (5, 5, 5), where
        else:
            # The window started with 8 successes: the 8th failure makes it half, and opens it; no outcome was
            # counted after that.
            assert (row.window_requests, row.window_failures) == (16, 8), where
    seconds = time.monotonic() - began
    print(f"[{backend(db_url)}] {kind}: {len(facts)} trials x {PROCESSES * THREADS} threads, {seconds:.1f} s")


def test_requests_asking_for_the_probe_at_once_get_exactly_one(db_url: str, db_session_factory: Factory) -> None:
    facts = _race(db_url, db_session_factory, "admit", per_thread=1)
    for trial, (results, row) in enumerate(facts):
        where = f"[{backend(db_url)} trial {trial} ({'lease expired' if trial % 2 else 'cooldown over'})]"
        probes = [r for r in results if r.startswith("probe")]
        assert len(probes) == 1, f"{where} {Counter(results)}"
        assert results.count("refused") == PROCESSES * THREADS - 1, where
        assert row.state is CircuitState.HALF_OPEN and f"probe {row.probe_owner}" == probes[0], where
        assert row.probe_lease_until == NOW + timedelta(seconds=60), where


def test_the_naive_read_then_write_versions_would_open_twice_and_probe_twice(
    db_url: str, db_session_factory: Factory
) -> None:
    """The same harness, the decision taken in Python between a read and a write: the checks above fail. With
    work between the read and the write, failures overwrite each other's counts (lost updates), so the breaker
    does not open exactly once (it never opens, or opens twice); and every reader of a due probe takes it."""
    opened = _race(db_url, db_session_factory, "naive-consecutive", trials=4)
    assert any(Counter(r for t in results for r in t)["opened"] != 1 for results, _row in opened), opened
    probed = _race(db_url, db_session_factory, "naive-admit", trials=4, per_thread=1)
    assert any(sum(r.startswith("probe") for r in results) > 1 for results, _row in probed), probed
