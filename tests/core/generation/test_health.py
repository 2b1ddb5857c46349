"""Provider health: the status rule, the report (not configured is never down), passive health from the
rollups, and the scheduled probes against the local emulator with the real client libraries, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ErrorClass
from core.catalog import PROVIDERS
from core.generation import breaker, health
from core.generation.breaker import BreakerConfig, BreakerSnapshot, CircuitState, Transition
from core.generation.health import HealthStatus, RecentOutcomes
from core.providers.base import AdapterConfig, ConnectionMode, HealthReport, ProviderAdapter
from core.providers.fal import FalQwenAdapter
from core.providers.registry import EMULATOR_URL_ENV
from db.engine import transaction
from db.models import CircuitStateRow, UsageDailyRollup
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, free_port, serve_in_thread
from emulator.server import create_emulator_app

Factory = sessionmaker[Session]
T0 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
CFG = BreakerConfig(
    consecutive_failures=4,
    failure_rate_ppm=500_000,
    min_requests=10,
    window=timedelta(seconds=60),
    cooldown=timedelta(seconds=30),
    max_cooldown=timedelta(seconds=240),
)
T = TypeVar("T")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider has a key in tests (tests/conftest.py); no emulator unless a test names one."""
    monkeypatch.delenv(EMULATOR_URL_ENV, raising=False)


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    """The whole emulator (`/fal`, `/ideogram`, `/hf`, `/qwen/`) on a free loopback port, as tests/providers
    start it."""
    with serve_in_thread(create_emulator_app(FaultBoard())) as server:
        yield server


# --- the rule -------------------------------------------------------------------------------------------------

CLOSED_SNAP = BreakerSnapshot(
    provider="fal-qwen",
    state=CircuitState.CLOSED,
    reason="",
    since=at(-3600),
    next_probe_at=None,
    consecutive_failures=0,
    window_start=at(-10),
    window_requests=20,
    window_failures=0,
    window_current=True,
    opened_count=0,
    last_error_class=None,
    probe_owner=None,
    probe_lease_until=None,
    last_probe_at=at(-5),
    last_probe_ok=True,
    updated_at=at(-5),
)
QUIET = RecentOutcomes("2026-03-14")
BUSY = RecentOutcomes("2026-03-14", succeeded=90, failed=10, other=30)

CASES: list[tuple[str, BreakerSnapshot, RecentOutcomes, HealthStatus, str]] = [
    ("all good", CLOSED_SNAP, BUSY, HealthStatus.HEALTHY, "90 of 100 recent attempts succeeded; health probe ok"),
    (
        "nothing seen yet",
        replace(
            CLOSED_SNAP, since=None, window_current=False, window_requests=0, last_probe_at=None, last_probe_ok=None
        ),
        QUIET,
        HealthStatus.HEALTHY,
        "no failures seen",
    ),
    ("one failure is not degraded", replace(CLOSED_SNAP, consecutive_failures=1), BUSY, HealthStatus.HEALTHY, ""),
    (
        "halfway to N in a row",
        replace(CLOSED_SNAP, consecutive_failures=2),
        BUSY,
        HealthStatus.DEGRADED,
        "2 failures in a row (it opens at 4)",
    ),
    (
        "halfway to the window's rate",
        replace(CLOSED_SNAP, window_requests=20, window_failures=5),
        BUSY,
        HealthStatus.DEGRADED,
        "5 of 20 requests failed in the current window",
    ),
    (
        "a rate from an old window is history",
        replace(CLOSED_SNAP, window_requests=20, window_failures=20, window_current=False),
        BUSY,
        HealthStatus.HEALTHY,
        "",
    ),
    (
        "too few requests in the window to judge",
        replace(CLOSED_SNAP, window_requests=4, window_failures=3),
        BUSY,
        HealthStatus.HEALTHY,
        "",
    ),
    (
        "the last health probe failed",
        replace(CLOSED_SNAP, last_probe_ok=False),
        BUSY,
        HealthStatus.DEGRADED,
        "the last health probe failed at 2026-03-14 11:59:55 UTC",
    ),
    (
        "recent attempts fail at the breaker's rate",
        CLOSED_SNAP,
        RecentOutcomes("2026-03-14", succeeded=5, failed=5, other=50),
        HealthStatus.DEGRADED,
        "5 of 10 attempts failed since 2026-03-14",
    ),
    (
        "open",
        replace(
            CLOSED_SNAP,
            state=CircuitState.OPEN,
            since=at(-20),
            next_probe_at=at(10),
            reason="4 failures",
            last_probe_ok=False,
        ),
        BUSY,
        HealthStatus.DOWN,
        "open since 2026-03-14 11:59:40 UTC: 4 failures; next probe at 2026-03-14 12:00:10 UTC",
    ),
    (
        "open, and the health probe passed since",
        replace(CLOSED_SNAP, state=CircuitState.OPEN, since=at(-20), last_probe_at=at(-1)),
        BUSY,
        HealthStatus.DEGRADED,
        "recovering",
    ),
    (
        "half open",
        replace(CLOSED_SNAP, state=CircuitState.HALF_OPEN, since=at(-20), probe_owner="x"),
        BUSY,
        HealthStatus.DOWN,
        "being probed",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_status_rule(case: tuple[str, BreakerSnapshot, RecentOutcomes, HealthStatus, str]) -> None:
    _name, snap, recent, want, reason = case
    status, why = health.classify(snap, recent, CFG, T0)
    assert status is want, why
    assert reason in why


# --- the report -----------------------------------------------------------------------------------------------


def _report(factory: Factory, now: datetime = T0) -> dict[str, health.ProviderHealth]:
    with factory() as session:
        return {h.provider: h for h in health.health_report(session, now, CFG)}


def _open(factory: Factory, provider: str, t: float = 0) -> None:
    with transaction(factory) as session:
        for _ in range(CFG.consecutive_failures):
            breaker.record_failure(session, provider, ErrorClass.UNAVAILABLE, None, at(t), CFG, message="down")


def test_a_provider_without_a_key_is_not_configured_never_down(db_session_factory: Factory) -> None:
    _open(db_session_factory, "fal-qwen")
    report = _report(db_session_factory, at(1))
    assert list(report) == list(PROVIDERS)
    for provider in ("fal-qwen", "ideogram", "huggingface", "qwen"):
        row = report[provider]
        assert (row.status, row.configured, row.mode) == (HealthStatus.NOT_CONFIGURED, False, ConnectionMode.SANDBOX)
        assert row.reason.startswith("not configured: no "), row.reason
    assert report["fal-qwen"].observed is HealthStatus.DOWN  # what the sandbox standing in saw, said apart
    assert "sandbox down: open since" in report["fal-qwen"].reason
    assert report["ideogram"].observed is HealthStatus.HEALTHY
    sandbox = report["sandbox"]
    assert (sandbox.status, sandbox.configured, sandbox.mode) == (HealthStatus.HEALTHY, True, ConnectionMode.SANDBOX)


def test_with_a_key_the_status_is_what_was_observed(
    db_session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", "fal-test-key-not-real-0000")  # nothing here sends it: the report only reads
    report = _report(db_session_factory)
    fal = report["fal-qwen"]
    assert (fal.status, fal.configured, fal.mode) == (HealthStatus.HEALTHY, True, ConnectionMode.LIVE)
    _open(db_session_factory, "fal-qwen")
    fal = _report(db_session_factory, at(1))["fal-qwen"]
    assert fal.status is HealthStatus.DOWN and fal.reason.startswith("open since 2026-03-14 12:00:00 UTC: 4 failures")
    assert fal.breaker.next_probe_at == at(30)


def _rollup(session: Session, day: date, mode: str, status: str, error_class: str, attempts: int) -> None:
    session.add(
        UsageDailyRollup(
            day=day,
            provider="fal-qwen",
            user_id=0,
            mode=mode,
            status=status,
            error_class=error_class,
            attempts=attempts,
        )
    )


def test_passive_health_reads_the_rollups_of_the_last_hour_in_the_current_mode(
    db_session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", "fal-test-key-not-real-0000")
    today, yesterday = T0.date(), T0.date() - timedelta(days=1)
    with transaction(db_session_factory) as session:
        _rollup(session, today, "live", "succeeded", "", 4)
        _rollup(session, today, "live", "failed", "unavailable", 3)
        _rollup(session, today, "live", "failed", "timeout", 3)
        _rollup(session, today, "live", "failed", "validation", 40)  # says nothing about the provider
        _rollup(session, today, "live", "cancelled", "cancelled", 7)
        _rollup(session, today, "sandbox", "succeeded", "", 1000)  # another mode: not this connection's health
        _rollup(session, yesterday, "live", "succeeded", "", 1000)  # more than an hour ago
    fal = _report(db_session_factory)["fal-qwen"]
    assert (fal.recent.succeeded, fal.recent.failed, fal.recent.other, fal.recent.since_day) == (4, 6, 47, "2026-03-14")
    assert fal.status is HealthStatus.DEGRADED and "6 of 10 attempts failed since 2026-03-14" in fal.reason
    # Just after midnight, the last hour reaches into yesterday's rollup.
    fal = _report(db_session_factory, datetime(2026, 3, 14, 0, 30, tzinfo=UTC))["fal-qwen"]
    assert (fal.recent.succeeded, fal.recent.since_day, fal.status) == (1004, "2026-03-13", HealthStatus.HEALTHY)


def test_the_report_never_writes(db_session_factory: Factory) -> None:
    _report(db_session_factory)
    with db_session_factory() as session:
        assert session.scalars(select(CircuitStateRow)).all() == []


# --- the probes -----------------------------------------------------------------------------------------------


class Counting:
    """A database runner that counts the work handed to it (the service passes its bounded executor)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.calls += 1
        return await asyncio.to_thread(fn)


def _probe_row(factory: Factory, provider: str) -> CircuitStateRow:
    with factory() as session:
        row = session.get(CircuitStateRow, provider)
        assert row is not None
        session.expunge(row)
        return row


def test_probes_against_the_emulator_record_each_provider(
    db_session_factory: Factory, emulator: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EMULATOR_URL_ENV, emulator.url)
    runner = Counting()
    outcomes = asyncio.run(health.run_probes(db_session_factory, None, at(0), config=CFG, run_db=runner))
    assert [o.provider for o in outcomes] == list(PROVIDERS)
    for outcome in outcomes:
        assert outcome.ok, outcome
        assert outcome.transition is None
        want = ConnectionMode.SANDBOX if outcome.provider == "sandbox" else ConnectionMode.EMULATOR
        assert outcome.mode is want
        row = _probe_row(db_session_factory, outcome.provider)
        assert (row.last_probe_at, row.last_probe_ok, row.state) == (at(0), True, CircuitState.CLOSED)
    assert runner.calls == len(PROVIDERS)  # every write went through the runner (config was given)
    report = _report(db_session_factory, at(1))
    for provider in ("fal-qwen", "ideogram", "huggingface", "qwen"):
        seen = report[provider]
        assert (seen.status, seen.mode, seen.observed) == (
            HealthStatus.NOT_CONFIGURED,
            ConnectionMode.EMULATOR,
            HealthStatus.HEALTHY,
        ), seen.reason
        assert "using the local emulator" in seen.reason and "health probe ok" in seen.reason


def _fal(base_url: str, key: str = "imagegate-emulator-key") -> Callable[[str], ProviderAdapter]:
    def build(provider: str) -> ProviderAdapter:
        assert provider == "fal-qwen"
        return FalQwenAdapter(AdapterConfig(api_key=key, base_url=base_url, mode=ConnectionMode.EMULATOR))

    return build


def test_failed_probes_open_the_breaker_extend_it_and_a_good_one_ends_the_cooldown(
    db_session_factory: Factory, emulator: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EMULATOR_URL_ENV, emulator.url)
    refused_key = _fal(emulator.url + "/fal", key="invalid-key")  # the emulator answers 401: auth counts
    dead_port = _fal(f"http://127.0.0.1:{free_port()}/fal")  # nothing listens: unavailable

    def probe(t: float, factory: Callable[[str], ProviderAdapter]) -> health.ProbeOutcome:
        (outcome,) = asyncio.run(
            health.run_probes(db_session_factory, ["fal-qwen"], at(t), config=CFG, adapter_factory=factory)
        )
        return outcome

    first = probe(0, refused_key)
    assert (first.ok, first.error_class, first.transition) == (False, ErrorClass.AUTH, None)
    assert _probe_row(db_session_factory, "fal-qwen").consecutive_failures == 1
    assert probe(1, dead_port).error_class is ErrorClass.UNAVAILABLE
    probe(2, refused_key)
    opened = probe(3, refused_key)
    assert opened.transition is Transition.OPENED
    row = _probe_row(db_session_factory, "fal-qwen")
    assert (row.state, row.next_probe_at, row.last_probe_ok) == (CircuitState.OPEN, at(33), False)
    assert row.reason == "4 failures in a row (last: auth: health probe: " + opened.detail + ")"
    # Open: a failed probe pushes the next probe back (by the cooldown grown with the outage's length).
    assert probe(20, dead_port).transition is Transition.EXTENDED
    assert _probe_row(db_session_factory, "fal-qwen").next_probe_at == at(50)
    assert probe(21, dead_port).transition is Transition.EXTENDED
    assert _probe_row(db_session_factory, "fal-qwen").next_probe_at == at(51)
    # A good probe ends the cooldown: the next request is the half-open probe; it does not close the breaker.
    good = probe(22, _fal(emulator.url + "/fal"))
    assert (good.ok, good.transition) == (True, Transition.PROBE_READY)
    row = _probe_row(db_session_factory, "fal-qwen")
    assert (row.state, row.next_probe_at, row.last_probe_ok) == (CircuitState.OPEN, at(22), True)
    assert _report(db_session_factory, at(23))["fal-qwen"].observed is HealthStatus.DEGRADED  # recovering
    with transaction(db_session_factory) as session:
        assert breaker.admit(session, "fal-qwen", "request-1", at(23), CFG).probe


class Stuck(ProviderAdapter):
    provider_id = "huggingface"

    def __init__(self, behaviour: str) -> None:
        super().__init__(AdapterConfig(mode=ConnectionMode.EMULATOR))
        self.behaviour = behaviour
        self.closed = False

    async def health_probe(self) -> HealthReport:
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        raise RuntimeError("a bug in the probe")

    async def aclose(self) -> None:
        self.closed = True

    def translate(self, request: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError

    async def generate(self, request: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError


def test_a_hanging_probe_times_out_and_counts_a_raising_one_is_ours_and_does_not(
    db_session_factory: Factory,
) -> None:
    built: list[Stuck] = []

    def factory(behaviour: str) -> Callable[[str], ProviderAdapter]:
        def build(provider: str) -> ProviderAdapter:
            built.append(Stuck(behaviour))
            return built[-1]

        return build

    (hung,) = asyncio.run(
        health.run_probes(
            db_session_factory, ["huggingface"], at(0), config=CFG, timeout_s=0.2, adapter_factory=factory("hang")
        )
    )
    assert (hung.ok, hung.error_class) == (False, ErrorClass.TIMEOUT)
    assert _probe_row(db_session_factory, "huggingface").consecutive_failures == 1
    (bug,) = asyncio.run(
        health.run_probes(db_session_factory, ["huggingface"], at(1), config=CFG, adapter_factory=factory("raise"))
    )
    assert (bug.ok, bug.error_class, bug.transition) == (False, None, None)
    row = _probe_row(db_session_factory, "huggingface")
    assert (row.last_probe_at, row.last_probe_ok, row.consecutive_failures) == (at(1), False, 1)
    assert all(adapter.closed for adapter in built) and len(built) == 2


def test_probes_read_the_breaker_config_from_the_global_settings(
    db_session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hanging(provider: str) -> ProviderAdapter:
        return Stuck("hang")

    for t in range(5):  # the default config opens at 5 in a row
        (outcome,) = asyncio.run(
            health.run_probes(db_session_factory, ["huggingface"], at(t), timeout_s=0.05, adapter_factory=hanging)
        )
    assert outcome.transition is Transition.OPENED
    with pytest.raises(KeyError):
        asyncio.run(health.run_probes(db_session_factory, ["nope"], at(0), config=CFG))
