"""The circuit breaker's state machine on SQLite and PostgreSQL, with an injected clock.

Each scenario is a table of steps (time offset, operation, expected result, expected state afterwards), run in
one transaction per step as the service would. The races between real processes are in
test_breaker_processes.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, ErrorClass, InvalidInput, NotFound, PermissionDenied, ProviderError
from core.catalog import PROVIDERS
from core.generation import breaker
from core.generation.breaker import BreakerConfig, BreakerDecision, CircuitState, Transition
from core.security import Actor
from core.settings import GlobalSettings, validate_global_settings
from db.engine import transaction
from db.models import AuditLog, CircuitStateRow, Role, User

Factory = sessionmaker[Session]
T0 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
P = "fal-qwen"

# Small numbers so the tables stay short: 3 failures in a row open it (the rate needs 1,000 requests here: the
# rate has its own config below); cooldown 30 s doubling to at most 240 s; a probe's lease is 60 s.
CFG = BreakerConfig(
    consecutive_failures=3,
    failure_rate_ppm=500_000,
    min_requests=1000,
    window=timedelta(seconds=60),
    cooldown=timedelta(seconds=30),
    max_cooldown=timedelta(seconds=240),
    probe_lease=timedelta(seconds=60),
)
# Only the rate can open this one.
RATE_ONLY = BreakerConfig(
    consecutive_failures=1000,
    failure_rate_ppm=500_000,
    min_requests=4,
    window=timedelta(seconds=60),
    cooldown=timedelta(seconds=30),
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the steps of a scenario ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    t: float
    """Seconds after T0."""
    op: str
    """fail | ok | admit | admit! (ignore the cooldown) | release | probe_ok | probe_fail."""
    owner: str | None = None
    error: ErrorClass = ErrorClass.UNAVAILABLE
    expect: Any = None
    """fail/ok/release/probe_*: the Transition (or None). admit: "probe", "pass" or "refused"."""
    state: CircuitState | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    """Row fields after the step (next_probe_at as seconds after T0)."""


def F(t: float, expect: Any = None, state: CircuitState | None = None, owner: str | None = None, **kw: Any) -> Step:
    return Step(t, "fail", owner=owner, expect=expect, state=state, **kw)


def S(t: float, expect: Any = None, state: CircuitState | None = None, owner: str | None = None, **kw: Any) -> Step:
    return Step(t, "ok", owner=owner, expect=expect, state=state, **kw)


def A(t: float, owner: str, expect: str, state: CircuitState | None = None, **kw: Any) -> Step:
    return Step(t, "admit", owner=owner, expect=expect, state=state, **kw)


def _decision_kind(decision: BreakerDecision) -> str:
    if not decision.allowed:
        assert not decision.probe
        return "refused"
    return "probe" if decision.probe else "pass"


def _apply(session: Session, step: Step, config: BreakerConfig) -> Any:
    now = at(step.t)
    if step.op == "fail":
        return breaker.record_failure(session, P, step.error, step.owner, now, config, message="boom")
    if step.op == "ok":
        return breaker.record_success(session, P, step.owner, now, config)
    if step.op in ("admit", "admit!"):
        assert step.owner is not None
        decision = breaker.admit(session, P, step.owner, now, config, ignore_cooldown=step.op == "admit!")
        return _decision_kind(decision)
    if step.op == "release":
        assert step.owner is not None
        return breaker.release_probe(session, P, step.owner, now)
    if step.op in ("probe_ok", "probe_fail"):
        ok = step.op == "probe_ok"
        return breaker.note_health_probe(session, P, ok, None if ok else step.error, now, config, detail="x")
    raise AssertionError(step.op)


def _row(factory: Factory) -> CircuitStateRow | None:
    with factory() as session:
        row = session.scalar(select(CircuitStateRow).where(CircuitStateRow.provider == P))
        if row is not None:
            session.expunge(row)
        return row


def run_scenario(factory: Factory, steps: list[Step], config: BreakerConfig = CFG) -> None:
    for i, step in enumerate(steps):
        with transaction(factory) as session:
            got = _apply(session, step, config)
        where = f"step {i} ({step})"
        assert got == step.expect, f"{where}: got {got!r}"
        row = _row(factory)
        if step.state is not None:
            state = CircuitState.CLOSED if row is None else row.state
            assert state is step.state, f"{where}: state {state}"
        for name, want in step.checks.items():
            assert row is not None, where
            value = getattr(row, name)
            if name in ("next_probe_at", "since", "probe_lease_until", "window_start", "last_probe_at") and isinstance(
                want, (int, float)
            ):
                want = at(want)
            assert value == want, f"{where}: {name} = {value!r}, want {want!r}"


OPEN, CLOSED, HALF = CircuitState.OPEN, CircuitState.CLOSED, CircuitState.HALF_OPEN


def _open_at(t: float) -> list[Step]:
    """Three failures in a row at `t`: the breaker opens, next probe at t + 30."""
    return [
        F(t, None, CLOSED),
        F(t, None, CLOSED),
        F(t, Transition.OPENED, OPEN, checks={"next_probe_at": t + 30, "since": t, "opened_count": 1}),
    ]


SCENARIOS: dict[str, tuple[list[Step], BreakerConfig]] = {
    "no row: admitted without a write": ([A(0, "a", "pass", CLOSED)], CFG),
    "N failures in a row open it; only the probe closes it": (
        [
            *_open_at(0),
            A(10, "a", "refused", OPEN),
            A(29.9, "a", "refused", OPEN),
            A(30, "a", "probe", HALF, checks={"probe_owner": "a", "probe_lease_until": 90}),
            A(31, "b", "refused", HALF),
            A(32, "a", "probe", HALF),  # the owner asking again: idempotent
            S(33, None, HALF, owner="b"),  # a success that is not the probe's decides nothing
            S(33, None, HALF),
            F(34, None, HALF, owner="b"),  # nor does a failure
            S(35, Transition.CLOSED, CLOSED, owner="a", checks={"consecutive_failures": 0, "probe_owner": None}),
            A(36, "b", "pass", CLOSED),
        ],
        CFG,
    ),
    "a success ends the run of failures": (
        [F(0), F(1), S(2, checks={"consecutive_failures": 0}), F(3), F(4, None, CLOSED), F(5, Transition.OPENED)],
        CFG,
    ),
    "failed probes double the cooldown up to the cap": (
        [
            *_open_at(0),
            A(30, "p1", "probe", HALF),
            F(30, Transition.REOPENED, OPEN, owner="p1", checks={"next_probe_at": 60, "since": 0}),
            A(59, "p2", "refused", OPEN),
            A(60, "p2", "probe", HALF),
            F(60, Transition.REOPENED, OPEN, owner="p2", checks={"next_probe_at": 120}),
            A(120, "p3", "probe", HALF),
            F(120, Transition.REOPENED, OPEN, owner="p3", checks={"next_probe_at": 240}),
            A(240, "p4", "probe", HALF),
            F(240, Transition.REOPENED, OPEN, owner="p4", checks={"next_probe_at": 480}),
            A(480, "p5", "probe", HALF),
            F(480, Transition.REOPENED, OPEN, owner="p5", checks={"next_probe_at": 720, "opened_count": 1}),
            A(720, "p6", "probe", HALF),
            S(721, Transition.CLOSED, CLOSED, owner="p6", checks={"since": 721, "next_probe_at": None}),
            *[F(722), F(722), F(722, Transition.OPENED, checks={"opened_count": 2, "next_probe_at": 752})],
        ],
        CFG,
    ),
    "a probe whose owner died: another takes it when the lease expires": (
        [
            *_open_at(0),
            A(30, "dead", "probe", HALF, checks={"probe_lease_until": 90}),
            A(89.9, "b", "refused", HALF),
            A(90, "b", "probe", HALF, checks={"probe_owner": "b", "probe_lease_until": 150}),
            A(91, "c", "refused", HALF),
            S(92, None, HALF, owner="dead"),  # the first owner, late: no longer the probe
            F(92, None, HALF, owner="dead"),
            S(93, Transition.CLOSED, CLOSED, owner="b"),
        ],
        CFG,
    ),
    "an abandoned probe is released: the next request probes at once": (
        [
            *_open_at(0),
            A(30, "a", "probe", HALF),
            Step(31, "release", owner="b", expect=None, state=HALF),  # not the owner
            Step(31, "release", owner="a", expect=Transition.RELEASED, state=OPEN, checks={"next_probe_at": 31}),
            A(31, "b", "probe", HALF),
        ],
        CFG,
    ),
    "failures that say nothing about the provider never count": (
        [
            *[Step(0, "fail", error=e, expect=None, state=CLOSED) for e in (ErrorClass.VALIDATION,) * 4],
            *[Step(0, "fail", error=e, expect=None, state=CLOSED) for e in (ErrorClass.SAFETY_REJECTED,) * 4],
            Step(0, "fail", error=ErrorClass.CANCELLED, expect=None, state=CLOSED),
            F(1),
            Step(2, "fail", error=ErrorClass.SAFETY_REJECTED, checks={"consecutive_failures": 1, "window_requests": 1}),
            F(3),
            F(4, Transition.OPENED),
            A(34, "a", "probe", HALF),
            # the probe's request was refused for its content: it proved nothing, the probe goes back
            Step(35, "fail", owner="a", error=ErrorClass.SAFETY_REJECTED, expect=Transition.RELEASED, state=OPEN),
            A(35, "b", "probe", HALF),
            Step(36, "fail", owner="b", error=ErrorClass.CANCELLED, expect=Transition.RELEASED, state=OPEN),
        ],
        CFG,
    ),
    "every counting class counts": (
        [
            Step(0, "fail", error=ErrorClass.AUTH, state=CLOSED),
            Step(0, "fail", error=ErrorClass.TIMEOUT, state=CLOSED),
            Step(0, "fail", error=ErrorClass.RATE_LIMITED, expect=Transition.OPENED, state=OPEN),
        ],
        CFG,
    ),
    "late outcomes while open change nothing": (
        [
            *_open_at(0),
            S(5, None, OPEN, owner="x"),
            S(5, None, OPEN),
            F(6, None, OPEN, owner="x", checks={"consecutive_failures": 3, "next_probe_at": 30}),
        ],
        CFG,
    ),
    "the router's last resort takes the probe before the cooldown ends": (
        [*_open_at(0), A(1, "a", "refused", OPEN), Step(1, "admit!", owner="a", expect="probe", state=HALF)],
        CFG,
    ),
    "rate: no opening below the minimum number of requests, even at 100 %": (
        [
            F(0, None, CLOSED),
            F(1, None, CLOSED),
            F(2, None, CLOSED, checks={"window_requests": 3, "window_failures": 3}),
            F(
                3,
                Transition.OPENED,
                OPEN,
                checks={"reason": "4 of 4 requests failed within 60 s (last: unavailable: boom)"},
            ),
        ],
        RATE_ONLY,
    ),
    "rate: below the threshold stays closed; at it, it opens": (
        [
            S(0),
            S(1),
            F(2),
            S(3),
            F(4, None, CLOSED, checks={"window_requests": 5, "window_failures": 2}),  # 2/5 < 1/2
            F(5, Transition.OPENED, OPEN, checks={"window_requests": 6, "window_failures": 3}),  # 3/6 = 1/2
        ],
        RATE_ONLY,
    ),
    "rate: a new window starts its counters again": (
        [
            F(0, checks={"window_start": 0}),
            F(10),
            F(20, None, CLOSED, checks={"window_requests": 3}),
            F(60, None, CLOSED, checks={"window_start": 60, "window_requests": 1, "window_failures": 1}),
            S(70, None, CLOSED, checks={"window_requests": 2, "window_failures": 1}),
            S(130, None, CLOSED, checks={"window_start": 130, "window_requests": 1, "window_failures": 0}),
            F(131),
            F(132),
            F(133, Transition.OPENED, OPEN, checks={"window_requests": 4, "window_failures": 3}),
        ],
        RATE_ONLY,
    ),
    "health probes: a failure counts when closed, extends an open cooldown, a pass ends it": (
        [
            Step(0, "probe_ok", expect=None, state=CLOSED, checks={"last_probe_ok": True, "last_probe_at": 0}),
            F(1),
            F(1),
            Step(2, "probe_ok", expect=None, state=CLOSED, checks={"consecutive_failures": 2}),  # proves nothing
            Step(3, "probe_fail", expect=Transition.OPENED, state=OPEN, checks={"next_probe_at": 33}),
            Step(13, "probe_fail", expect=Transition.EXTENDED, state=OPEN, checks={"next_probe_at": 43}),
            Step(14, "probe_ok", expect=Transition.PROBE_READY, state=OPEN, checks={"next_probe_at": 14}),
            A(15, "a", "probe", HALF),
            Step(16, "probe_fail", expect=None, state=HALF, checks={"last_probe_ok": False}),  # the real probe decides
            S(17, Transition.CLOSED, CLOSED, owner="a"),
            Step(18, "probe_fail", error=ErrorClass.VALIDATION, expect=None, checks={"consecutive_failures": 0}),
        ],
        CFG,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_state_machine(name: str, db_session_factory: Factory) -> None:
    steps, config = SCENARIOS[name]
    run_scenario(db_session_factory, steps, config)


# --- the rest of the API --------------------------------------------------------------------------------------


def test_a_provider_error_object_counts_by_its_class(db_session_factory: Factory) -> None:
    def err(klass: ErrorClass) -> ProviderError:
        return ProviderError(klass, "msg", provider=P, billing=Billing.NOT_BILLED)

    with transaction(db_session_factory) as session:
        assert breaker.record_failure(session, P, err(ErrorClass.SAFETY_REJECTED), None, T0, CFG) is None
        for _ in range(2):
            assert breaker.record_failure(session, P, err(ErrorClass.BAD_RESPONSE), None, T0, CFG) is None
        assert breaker.record_failure(session, P, err(ErrorClass.BAD_RESPONSE), None, T0, CFG) is Transition.OPENED
    row = _row(db_session_factory)
    assert row is not None and row.last_error_class == "bad_response"
    assert row.reason == "3 failures in a row (last: bad_response: msg)"
    assert breaker.counts_against_provider(ErrorClass.TIMEOUT)
    assert not breaker.counts_against_provider("validation")


def test_bad_arguments_are_refused(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        with pytest.raises(NotFound):
            breaker.admit(session, "nope", "a", T0, CFG)
        with pytest.raises(InvalidInput):
            breaker.record_failure(session, P, "melted", None, T0, CFG)
        with pytest.raises(ValueError, match="owner"):
            breaker.admit(session, P, "x" * 65, T0, CFG)
        with pytest.raises(ValueError, match="naive"):
            breaker.admit(session, P, "a", datetime(2026, 1, 1), CFG)  # a naive time: refused


def test_the_decision_says_why_and_when(db_session_factory: Factory) -> None:
    run_scenario(db_session_factory, _open_at(0))
    with transaction(db_session_factory) as session:
        refused = breaker.admit(session, P, "a", at(5), CFG)
    assert not refused.allowed and refused.state is OPEN and refused.next_probe_at == at(30)
    assert "fal-qwen is open: 3 failures in a row" in refused.reason
    with transaction(db_session_factory) as session:
        probe = breaker.admit(session, P, "a", at(30), CFG)
        busy = breaker.admit(session, P, "b", at(31), CFG)
    assert probe.allowed and probe.probe and probe.state is HALF
    assert not busy.allowed and busy.next_probe_at == at(90) and "being probed" in busy.reason


def test_snapshot_lists_every_provider_without_writing(db_session_factory: Factory) -> None:
    run_scenario(db_session_factory, [*_open_at(0), F(0, None, OPEN)])
    with db_session_factory() as session:
        snaps = breaker.snapshot(session, at(10), CFG)
        assert session.scalar(select(CircuitStateRow).where(CircuitStateRow.provider == "ideogram")) is None
    assert list(snaps) == list(PROVIDERS)
    fal = snaps[P]
    assert (fal.state, fal.since, fal.next_probe_at, fal.consecutive_failures, fal.opened_count) == (
        OPEN,
        at(0),
        at(30),
        3,
        1,
    )
    assert (fal.window_requests, fal.window_failures, fal.window_current, fal.window_failure_rate) == (3, 3, True, 1.0)
    other = snaps["ideogram"]
    assert (other.state, other.since, other.window_requests, other.window_failure_rate) == (CLOSED, None, 0, None)
    with db_session_factory() as session:
        assert not breaker.snapshot(session, at(61), CFG)[P].window_current


def _account(factory: Factory, name: str, role: Role) -> Actor:
    with transaction(factory) as session:
        row = User(username=name, password_hash="not-a-real-hash", role=role)
        session.add(row)
        session.flush()
        return Actor(row.id, row.username, role)


def test_reset_is_for_admins_and_heroes_and_audited(db_session_factory: Factory) -> None:
    run_scenario(db_session_factory, [*_open_at(0), A(30, "a", "probe", HALF)])
    user = _account(db_session_factory, "user", Role.USER)
    with pytest.raises(PermissionDenied), transaction(db_session_factory) as session:
        breaker.reset(session, user, P, at(31), config=CFG)
    assert (row := _row(db_session_factory)) is not None and row.state is HALF
    hero = _account(db_session_factory, "hero", Role.HERO)
    with transaction(db_session_factory) as session:
        snap = breaker.reset(session, hero, P, at(31), comment="provider fixed", config=CFG)
    assert (snap.state, snap.reason, snap.since, snap.consecutive_failures, snap.probe_owner) == (
        CLOSED,
        "reset by hero",
        at(31),
        0,
        None,
    )
    assert snap.opened_count == 1  # history stays
    run_scenario(db_session_factory, [S(32, None, CLOSED, owner="a")])  # the old probe's outcome is ignored
    with db_session_factory() as session:
        entry = session.scalars(select(AuditLog).where(AuditLog.action == "breaker.reset")).one()
    assert (entry.actor_name, entry.target_id, entry.comment) == ("hero", P, "provider fixed")
    assert entry.before is not None and entry.before["state"] == "half_open"
    assert entry.after is not None and entry.after["state"] == "closed"
    admin = _account(db_session_factory, "admin", Role.ADMIN)
    with transaction(db_session_factory) as session:  # a provider with no row yet can be reset too
        assert breaker.reset(session, admin, "ideogram", at(40), config=CFG).state is CLOSED
    with transaction(db_session_factory) as session:
        assert breaker.reset(session, Actor.system("cli"), "qwen", at(40), config=CFG).reason == "reset by cli"


def test_config_comes_from_the_global_settings() -> None:
    assert BreakerConfig.from_settings(None) == BreakerConfig()
    settings = GlobalSettings(
        breaker_consecutive_failures=7,
        breaker_failure_rate=0.25,
        breaker_min_requests=20,
        breaker_window_s=120,
        breaker_cooldown_s=45,
        breaker_max_cooldown_s=10,  # below the cooldown: the cooldown wins
        breaker_probe_lease_s=90,
    )
    cfg = BreakerConfig.from_settings(settings)
    assert cfg == BreakerConfig(
        consecutive_failures=7,
        failure_rate_ppm=250_000,
        min_requests=20,
        window=timedelta(seconds=120),
        cooldown=timedelta(seconds=45),
        max_cooldown=timedelta(seconds=45),
        probe_lease=timedelta(seconds=90),
    )
    assert cfg.failure_rate == 0.25
    for bad in (
        {"breaker_consecutive_failures": 0},
        {"breaker_failure_rate": 0},
        {"breaker_failure_rate": 1.5},
        {"breaker_window_s": "60"},
        {"breaker_cooldown_s": True},
        {"health_probe_interval_s": 1},
    ):
        with pytest.raises(InvalidInput) as caught:
            validate_global_settings(bad)
        assert set(caught.value.field_errors) == set(bad)
    with pytest.raises(ValueError):
        BreakerConfig(failure_rate_ppm=0)
    with pytest.raises(ValueError):
        BreakerConfig(cooldown=timedelta(0))


def test_cooldown_growth_is_bounded() -> None:
    grow: Callable[[float], timedelta] = lambda s: CFG.cooldown_after_failed_probe(T0, at(s))  # noqa: E731
    assert [grow(s).total_seconds() for s in (0, 10, 30, 60, 200, 10_000)] == [30, 30, 30, 60, 200, 240]
