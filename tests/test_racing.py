"""The race harness itself (tests/racing.py): a worker that dies fails the race at once, naming its exit code,
instead of leaving the parent to wait out a barrier or a report (BARRIER_TIMEOUT_S, JOIN_TIMEOUT_S); and a race
whose workers all finish is not taken for one whose workers died.

The workers are the functions below: spawned processes import this module (light: no database, no fixtures).
"""

from __future__ import annotations

import os
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest

from tests.racing import BARRIER_TIMEOUT_S, JOIN_TIMEOUT_S, Report, WorkerDied, race_trials, run_trials

CRASH_CODE = 3
FAST_FAIL_S = 10.0
"""A dead worker must fail the race well within this (spawning the workers included); the harness's own
timeouts are more than five times longer, so a race that waited one out cannot pass."""
assert min(BARRIER_TIMEOUT_S, JOIN_TIMEOUT_S) > FAST_FAIL_S * 5
IN_TRIAL_CRASH_DELAY_S = 1.0
"""How long a worker crashing in a trial lives past the start barrier (well within FAST_FAIL_S)."""


def reporter(trials: int, crash: str, start: Barrier, done: Barrier, out: Queue[Any]) -> None:
    """Report its pid each trial; with `crash` "before_start" exit with CRASH_CODE before the first start barrier,
    with "in_trial" exit with CRASH_CODE during the last trial, before its report."""
    if crash == "before_start":
        os._exit(CRASH_CODE)  # a hard exit, as a crash: no clean-up, no report

    def trial(number: int) -> int:
        if crash == "in_trial" and number == trials - 1:
            # Past the start barrier, so the parent is waiting for reports: exiting at once could beat the parent
            # out of the barrier it was released from, and the exit would then be seen "at the start" (CI saw it).
            time.sleep(IN_TRIAL_CRASH_DELAY_S)
            os._exit(CRASH_CODE)
        return os.getpid()

    run_trials(trials, start, done, out, trial)


def _pids(_trial: int, _set_up: None, reports: list[Report]) -> list[int]:
    return sorted(report["results"] for report in reports)


@pytest.mark.parametrize("crash", ["before_start", "in_trial"])
@pytest.mark.parametrize("watching", [False, True], ids=["plain", "watching"])
def test_a_worker_that_exits_before_reporting_fails_the_race_at_once(crash: str, watching: bool) -> None:
    trials = 2
    began = time.monotonic()
    with pytest.raises(WorkerDied) as failure:
        race_trials(
            reporter,
            (trials,),
            processes=3,
            trials=trials,
            observe=_pids,
            # Worker 1 crashes; the others are healthy and must be released (not left at a barrier).
            per_process=lambda worker: ("none" if worker != 1 else crash,),
            watch=(lambda _trial, _set_up: None) if watching else None,
        )
    seconds = time.monotonic() - began
    message = str(failure.value)
    print(f"{crash}, {'watching' if watching else 'plain'}: failed in {seconds:.2f} s: {message}")
    assert message.startswith("worker 1 (pid "), message
    assert f"exited with code {CRASH_CODE}" in message
    where = "at the start of trial 0" if crash == "before_start" else f"before reporting trial {trials - 1}"
    assert where in message
    assert seconds < FAST_FAIL_S


def test_a_race_whose_workers_all_finish_returns_every_trial() -> None:
    """The workers' exits after the last trial are on time: no `WorkerDied`, every fact returned."""
    trials = 3
    facts = race_trials(
        reporter, (trials,), processes=3, trials=trials, observe=_pids, per_process=lambda _worker: ("none",)
    )
    assert len(facts) == trials
    assert len(set(facts[0])) == 3 and all(fact == facts[0] for fact in facts)  # the same three workers each trial
