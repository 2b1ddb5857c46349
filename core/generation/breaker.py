"""Circuit breakers: one per provider, in `circuit_states`, shared by every process on the database.

States and transitions (every transition is ONE guarded statement, `UPDATE ... WHERE state = ... RETURNING`,
so however many processes race, exactly one of them makes it; the losers see no row and re-read):

    CLOSED --(N failures in a row, or failure rate >= R over a window of >= M requests)--> OPEN
    OPEN --(cooldown over: the first `admit` takes the probe, with a lease)--> HALF_OPEN
    HALF_OPEN --(the probe succeeds)--> CLOSED
    HALF_OPEN --(the probe fails: cooldown doubles, up to a cap)--> OPEN
    HALF_OPEN --(the probe is abandoned: `release_probe`, or a failure that says nothing)--> OPEN, probe-ready
    HALF_OPEN --(the probe's lease expires: its owner died)--> HALF_OPEN, another owner
    any --(`reset` by an admin, audited)--> CLOSED

Public API (times are timezone-aware UTC; `now=None` means the clock, tests inject it):

    BreakerConfig.from_settings(global_settings) -> BreakerConfig     (GlobalSettings.breaker_* fields)
    admit(session, provider, owner, now=None, config=None, *, ignore_cooldown=False) -> BreakerDecision
        May `owner` send a request to `provider`? CLOSED: yes (no write). OPEN before its next probe: no.
        OPEN after it, or HALF_OPEN with an expired lease: this owner becomes the one probe (probe=True).
        HALF_OPEN with a live lease: no, unless `owner` is the one probing (a repeated admit is idempotent).
        `ignore_cooldown=True` is the router's last resort when every candidate is open: it may take the
        probe before the cooldown ends (still only one probe at a time).
    record_success(session, provider, owner, now=None, config=None) -> Transition | None
    record_failure(session, provider, error, owner, now=None, config=None, *, message="") -> Transition | None
        `error` is a ProviderError, or an ErrorClass (or its value) with `message`. Only failures whose
        ErrorTraits.counts_against_provider is true count (not validation, safety_rejected, cancelled); a
        probe ending in one of those is released, since it proved nothing.
    release_probe(session, provider, owner, now=None) -> Transition | None
        The probe was admitted but never sent (budget refused, request cancelled): back to OPEN, probe-ready.
    note_health_probe(session, provider, ok, error_class, now=None, config=None) -> Transition | None
        A scheduled health probe's outcome (core.generation.health); see "Health probes" below.
    snapshot(session, now=None) -> dict[str, BreakerSnapshot]
        Every catalog provider's breaker (closed when it has no row yet): state, reason, since, next probe,
        consecutive failures, the window's figures, opened_count, probe owner and lease, last health probe.
        Readable by any page: no authorization, no write.
    reset(session, actor, provider, now=None, *, comment=None) -> BreakerSnapshot
        Close the breaker and clear its counters; ADMIN or HERO (core.authz), audited as `breaker.reset`.

    Transition: OPENED (closed -> open), REOPENED (a probe failed), CLOSED (a probe succeeded),
    RELEASED (a probe given back), EXTENDED (a failed health probe pushed the next probe later),
    PROBE_READY (a good health probe ended an open breaker's cooldown early).

`owner` names ONE attempt (e.g. "<host>:<pid>:<generation id>:<attempt no>", at most 64 characters), never a
whole process: a process running many requests must still send only one probe. Commit soon after each call:
on PostgreSQL the breaker's row stays locked by a write until the transaction ends, so call these in their own
short transaction (or last in one), never around a provider call.

Decisions:
- Only the probe's outcome decides a half-open breaker. A success or failure reported by an attempt admitted
  before the breaker opened, arriving while it is open or half-open, changes nothing (it says something about
  the past, and letting it close the breaker would let many requests through on one old answer).
- Failed probes grow the cooldown: the next probe waits max(cooldown, time since the breaker left CLOSED),
  capped at `max_cooldown`. From the first opening that is 30 s, 30 s, 60 s, 120 s, ... : the wait doubles with
  every failed probe, with no counter beyond `since` (which keeps the moment the breaker left CLOSED while it
  goes between OPEN and HALF_OPEN).
- `opened_count` counts closed -> open only; a failed probe re-opens the same outage and is not a new one.
- The window is fixed, not sliding: it starts at the first outcome after the previous window ended and its
  counters start again from zero then. Its figures live in the row, so no request ever scans usage_attempts.
  The rate opens the breaker at or above `failure_rate`, once the window holds `min_requests` outcomes.
- A failure in CLOSED state is one statement that counts it; only the failure that crosses a threshold runs
  the second, guarded opening statement, which then sees its own row lock (PostgreSQL) or the database's write
  lock (SQLite): the counters it decided on cannot change in between, and a racing process, which waited for
  the lock, finds the breaker no longer closed and counts nothing.

Health probes (the worker's scheduled, non-billable checks):
- CLOSED: a failed probe counts as a failure (a broken key or a dead endpoint should open the breaker even
  without traffic); a good probe changes nothing: it exercises less than a generation (Ideogram's probe is a
  request answered 400), so it may not cancel evidence from real requests.
- OPEN: a failed probe pushes the next probe to at least now + the current cooldown; a good probe ends the
  cooldown (next probe = now), so the next request becomes the half-open probe. It does not close the breaker
  by itself, for the same reason: one real request decides.
- HALF_OPEN: only recorded (`last_probe_at`, `last_probe_ok`); the real probe in flight decides.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, case, literal, or_, select, update
from sqlalchemy.orm import Session

from common.errors import ERROR_TRAITS, ErrorClass, InvalidInput, NotFound, ProviderError
from core import audit
from core.authz import authorize
from core.catalog import PROVIDERS
from core.security import Actor
from core.settings import GlobalSettings
from db.engine import dialect_insert
from db.models import CircuitState, CircuitStateRow, Role, UTCDateTime

__all__ = [
    "BREAKER_RESETTERS",
    "BreakerConfig",
    "BreakerDecision",
    "BreakerSnapshot",
    "CircuitState",
    "Transition",
    "admit",
    "counts_against_provider",
    "note_health_probe",
    "record_failure",
    "record_success",
    "release_probe",
    "reset",
    "snapshot",
]

BREAKER_RESETTERS = (Role.ADMIN, Role.HERO)
"""Who may reset a breaker: the roles that run the product day to day (as for budget resets)."""

OWNER_MAX_CHARS = 64  # circuit_states.probe_owner
_RATE_SCALE = 1_000_000  # the failure rate in parts per million: the rate test stays integer SQL

C = CircuitStateRow


class Transition(StrEnum):
    OPENED = "opened"
    REOPENED = "reopened"
    CLOSED = "closed"
    RELEASED = "released"
    EXTENDED = "extended"
    PROBE_READY = "probe_ready"


@dataclass(frozen=True)
class BreakerConfig:
    """The thresholds of every provider's breaker (from the global settings' `breaker_*` fields)."""

    consecutive_failures: int = 5
    failure_rate_ppm: int = 500_000
    """The failure share that opens the breaker, in parts per million (0.5 = 500_000)."""
    min_requests: int = 10
    window: timedelta = timedelta(seconds=60)
    cooldown: timedelta = timedelta(seconds=30)
    max_cooldown: timedelta = timedelta(seconds=600)
    probe_lease: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1:
            raise ValueError("breaker thresholds must be at least 1")
        if not 0 < self.failure_rate_ppm <= _RATE_SCALE:
            raise ValueError("the failure rate must be in (0, 1]")
        for name in ("window", "cooldown", "max_cooldown", "probe_lease"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")

    @classmethod
    def from_settings(cls, settings: GlobalSettings | None) -> BreakerConfig:
        s = settings if settings is not None else GlobalSettings()
        cooldown = timedelta(seconds=s.breaker_cooldown_s)
        return cls(
            consecutive_failures=s.breaker_consecutive_failures,
            failure_rate_ppm=max(1, round(s.breaker_failure_rate * _RATE_SCALE)),
            min_requests=s.breaker_min_requests,
            window=timedelta(seconds=s.breaker_window_s),
            cooldown=cooldown,
            max_cooldown=max(cooldown, timedelta(seconds=s.breaker_max_cooldown_s)),
            probe_lease=timedelta(seconds=s.breaker_probe_lease_s),
        )

    @property
    def failure_rate(self) -> float:
        return self.failure_rate_ppm / _RATE_SCALE

    def cooldown_after_failed_probe(self, since: datetime, now: datetime) -> timedelta:
        """How long the breaker waits before its next probe after one failed: as long as it has been out of
        CLOSED (so the waits double), at least `cooldown`, at most `max_cooldown`."""
        return min(self.max_cooldown, max(self.cooldown, now - since))


@dataclass(frozen=True)
class BreakerDecision:
    allowed: bool
    """Send the request (as an ordinary request, or as the probe when `probe`)."""
    probe: bool
    """This request is the half-open probe: report its outcome (or `release_probe`) with the same owner."""
    state: CircuitState
    """The state after this decision."""
    reason: str
    """Why, for a person: the breaker's reason when refused."""
    next_probe_at: datetime | None
    """When refused: when a probe may next be sent (None while another probe is in flight: its lease end
    is the earliest moment then)."""


@dataclass(frozen=True)
class BreakerSnapshot:
    provider: str
    state: CircuitState
    reason: str
    since: datetime | None
    """When the breaker entered CLOSED, or left it (kept through OPEN <-> HALF_OPEN). None: never recorded."""
    next_probe_at: datetime | None
    consecutive_failures: int
    window_start: datetime | None
    window_requests: int
    window_failures: int
    window_current: bool
    """The window figures are from a window still running at the snapshot's `now` (else they are history)."""
    opened_count: int
    last_error_class: str | None
    probe_owner: str | None
    probe_lease_until: datetime | None
    last_probe_at: datetime | None
    last_probe_ok: bool | None
    updated_at: datetime | None

    @property
    def window_failure_rate(self) -> float | None:
        return self.window_failures / self.window_requests if self.window_requests else None


# --- helpers ---------------------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware (UTC) datetime")
    return now.astimezone(UTC)


def _config(config: BreakerConfig | None) -> BreakerConfig:
    return config if config is not None else BreakerConfig()


def _provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise NotFound(f"unknown provider {provider!r}")
    return provider


def _owner(owner: str) -> str:
    if not owner or len(owner) > OWNER_MAX_CHARS:
        raise ValueError(f"a breaker owner is 1 to {OWNER_MAX_CHARS} characters, not {owner!r}")
    return owner


def _at(value: datetime) -> ColumnElement[Any]:
    """A timestamp as a typed SQL value (for CASE branches, which do not infer the column's type)."""
    return literal(value, UTCDateTime())


def counts_against_provider(error: ProviderError | ErrorClass | str) -> bool:
    """Does this failure say something about the provider's health? (not validation, safety, cancelled)"""
    return ERROR_TRAITS[_error_class(error)].counts_against_provider


def _error_class(error: ProviderError | ErrorClass | str) -> ErrorClass:
    if isinstance(error, ProviderError):
        return error.error_class
    try:
        return ErrorClass(error)
    except ValueError:
        raise InvalidInput(f"unknown error class {error!r}", {"error_class": "unknown"}) from None


def _describe(error: ProviderError | ErrorClass | str, message: str) -> str:
    if isinstance(error, ProviderError):
        return f"{error.error_class.value}: {error.message}"[:500]
    text = _error_class(error).value
    return f"{text}: {message}"[:500] if message else text


def _ensure_row(session: Session, provider: str, now: datetime) -> None:
    """Create the provider's row (CLOSED) unless it exists: an INSERT that cannot race."""
    values = {
        "provider": provider,
        "state": CircuitState.CLOSED,
        "reason": "",
        "since": now,
        "consecutive_failures": 0,
        "window_requests": 0,
        "window_failures": 0,
        "opened_count": 0,
        "updated_at": now,
    }
    session.execute(dialect_insert(session, C).values(**values).on_conflict_do_nothing())


def _read(session: Session, provider: str) -> CircuitStateRow | None:
    return session.scalar(select(C).where(C.provider == provider).execution_options(populate_existing=True))


def _guarded(session: Session, provider: str, *conditions: Any, **values: Any) -> Any:
    """One guarded UPDATE of the provider's row: the RETURNING row if the guard held, else None."""
    return session.execute(
        update(C)
        .where(C.provider == provider, *conditions)
        .values(**values)
        .returning(C.state, C.reason, C.next_probe_at, C.since)
        .execution_options(synchronize_session=False)
    ).first()


def _fresh_window(now: datetime, config: BreakerConfig) -> ColumnElement[bool]:
    """The row's window has ended (or never began): this outcome starts a new one."""
    return or_(C.window_start.is_(None), C.window_start <= now - config.window)


@functools.cache
def _count_statement(failed: bool) -> Any:
    """`_count`'s UPDATE, built once per outcome kind: the moment, the window's cutoff and the error class are
    bound at execution."""
    t = cast(Table, C.__table__)
    now = bindparam("now", type_=UTCDateTime())
    fresh = or_(t.c.window_start.is_(None), t.c.window_start <= bindparam("cutoff", type_=UTCDateTime()))
    values: dict[str, Any] = {
        "window_start": case((fresh, now), else_=t.c.window_start),
        "window_requests": case((fresh, 1), else_=t.c.window_requests + 1),
        "updated_at": now,
    }
    if failed:
        values["consecutive_failures"] = t.c.consecutive_failures + 1
        values["window_failures"] = case((fresh, 1), else_=t.c.window_failures + 1)
        values["last_error_class"] = bindparam("error", type_=t.c.last_error_class.type)
    else:
        values["consecutive_failures"] = 0
        values["window_failures"] = case((fresh, 0), else_=t.c.window_failures)
    return (
        update(t)
        .where(t.c.provider == bindparam("p"), t.c.state == CircuitState.CLOSED)
        .values(**values)
        .returning(t.c.consecutive_failures, t.c.window_requests, t.c.window_failures)
    )


def _count(
    session: Session, provider: str, now: datetime, config: BreakerConfig, failed: bool, error: str | None
) -> Any:
    """Count one outcome in a CLOSED breaker (one statement): (consecutive, window requests, window failures)
    after it, or None if the breaker is not closed (or has no row)."""
    params: dict[str, Any] = {"p": provider, "now": now, "cutoff": now - config.window}
    if failed:
        params["error"] = error
    return session.connection().execute(_count_statement(failed), params).first()


def _open_reason(consecutive: int, requests: int, failures: int, config: BreakerConfig, detail: str) -> str | None:
    """Why the breaker must open after these figures, or None if it stays closed."""
    if consecutive >= config.consecutive_failures:
        return f"{consecutive} failures in a row (last: {detail})"
    if requests >= config.min_requests and failures * _RATE_SCALE >= config.failure_rate_ppm * requests:
        seconds = int(config.window.total_seconds())
        return f"{failures} of {requests} requests failed within {seconds} s (last: {detail})"
    return None


# --- admission ------------------------------------------------------------------------------------------------


def admit(
    session: Session,
    provider: str,
    owner: str,
    now: datetime | None = None,
    config: BreakerConfig | None = None,
    *,
    ignore_cooldown: bool = False,
) -> BreakerDecision:
    """May `owner` send one request to `provider` now? See the module docstring."""
    provider, owner, moment, cfg = _provider(provider), _owner(owner), _now(now), _config(config)
    row = _read(session, provider)
    if row is None or row.state is CircuitState.CLOSED:
        return BreakerDecision(True, False, CircuitState.CLOSED, "closed", None)
    if row.state is CircuitState.HALF_OPEN and row.probe_owner == owner:
        return BreakerDecision(True, True, CircuitState.HALF_OPEN, "this request is the probe", None)
    lease = moment + cfg.probe_lease
    if row.state is CircuitState.OPEN:
        due = row.next_probe_at is None or row.next_probe_at <= moment
        if due or ignore_cooldown:
            guard = [C.state == CircuitState.OPEN]
            if not ignore_cooldown:
                guard.append(or_(C.next_probe_at.is_(None), C.next_probe_at <= moment))
            won = _guarded(
                session,
                provider,
                *guard,
                state=CircuitState.HALF_OPEN,
                probe_owner=owner,
                probe_lease_until=lease,
                updated_at=moment,
            )
            if won is not None:
                return BreakerDecision(True, True, CircuitState.HALF_OPEN, f"probing after: {won.reason}", None)
            row = _read(session, provider)  # someone else took the probe (or closed it) first
            if row is None or row.state is CircuitState.CLOSED:
                return BreakerDecision(True, False, CircuitState.CLOSED, "closed", None)
    if row.state is CircuitState.HALF_OPEN:
        expired = row.probe_lease_until is None or row.probe_lease_until <= moment
        if expired:
            won = _guarded(
                session,
                provider,
                C.state == CircuitState.HALF_OPEN,
                or_(C.probe_lease_until.is_(None), C.probe_lease_until <= moment),
                probe_owner=owner,
                probe_lease_until=lease,
                updated_at=moment,
            )
            if won is not None:
                return BreakerDecision(
                    True,
                    True,
                    CircuitState.HALF_OPEN,
                    f"probing (the previous probe's lease expired): {won.reason}",
                    None,
                )
            row = _read(session, provider)
            if row is None or row.state is CircuitState.CLOSED:
                return BreakerDecision(True, False, CircuitState.CLOSED, "closed", None)
        if row.state is CircuitState.HALF_OPEN:
            return BreakerDecision(
                False,
                False,
                CircuitState.HALF_OPEN,
                f"{provider} is being probed by another request (open: {row.reason})",
                row.probe_lease_until,
            )
    return BreakerDecision(False, False, CircuitState.OPEN, f"{provider} is open: {row.reason}", row.next_probe_at)


# --- outcomes -------------------------------------------------------------------------------------------------


def record_success(
    session: Session,
    provider: str,
    owner: str | None = None,
    now: datetime | None = None,
    config: BreakerConfig | None = None,
) -> Transition | None:
    """A request admitted by the breaker succeeded. The probe's success closes the breaker; any other success
    counts in a closed breaker's window and ends its run of failures."""
    provider, moment, cfg = _provider(provider), _now(now), _config(config)
    for _ in range(2):
        if _count(session, provider, moment, cfg, failed=False, error=None) is not None:
            return None
        if owner is not None:
            closed = _guarded(
                session,
                provider,
                C.state == CircuitState.HALF_OPEN,
                C.probe_owner == owner,
                state=CircuitState.CLOSED,
                reason="the probe succeeded",
                since=moment,
                next_probe_at=None,
                probe_owner=None,
                probe_lease_until=None,
                consecutive_failures=0,
                window_start=moment,
                window_requests=1,
                window_failures=0,
                updated_at=moment,
            )
            if closed is not None:
                return Transition.CLOSED
        if _read(session, provider) is not None:
            return None  # open, or half-open with someone else's probe: only the probe's outcome decides
        _ensure_row(session, provider, moment)
    return None


def record_failure(
    session: Session,
    provider: str,
    error: ProviderError | ErrorClass | str,
    owner: str | None = None,
    now: datetime | None = None,
    config: BreakerConfig | None = None,
    *,
    message: str = "",
) -> Transition | None:
    """A request admitted by the breaker failed with `error`. Failures that say nothing about the provider are
    not counted (a probe ending in one is released); a counted failure of the probe re-opens the breaker with a
    longer cooldown; in a closed breaker it counts, and the one crossing a threshold opens it."""
    provider, moment, cfg = _provider(provider), _now(now), _config(config)
    error_class = _error_class(error)
    if not ERROR_TRAITS[error_class].counts_against_provider:
        return release_probe(session, provider, owner, moment) if owner is not None else None
    detail = _describe(error, message)
    for _ in range(2):
        counted = _count(session, provider, moment, cfg, failed=True, error=error_class.value)
        if counted is not None:
            reason = _open_reason(int(counted[0]), int(counted[1]), int(counted[2]), cfg, detail)
            if reason is None:
                return None
            opened = _guarded(
                session,
                provider,
                C.state == CircuitState.CLOSED,
                state=CircuitState.OPEN,
                reason=reason,
                since=moment,
                next_probe_at=moment + cfg.cooldown,
                probe_owner=None,
                probe_lease_until=None,
                opened_count=C.opened_count + 1,
                updated_at=moment,
            )
            return Transition.OPENED if opened is not None else None
        if owner is not None:
            row = _read(session, provider)
            if row is not None and row.state is CircuitState.HALF_OPEN and row.probe_owner == owner:
                since = row.since or moment
                wait = cfg.cooldown_after_failed_probe(since, moment)
                reopened = _guarded(
                    session,
                    provider,
                    C.state == CircuitState.HALF_OPEN,
                    C.probe_owner == owner,
                    state=CircuitState.OPEN,
                    reason=f"the probe failed: {detail}",
                    next_probe_at=moment + wait,
                    probe_owner=None,
                    probe_lease_until=None,
                    consecutive_failures=C.consecutive_failures + 1,
                    last_error_class=error_class.value,
                    updated_at=moment,
                )
                if reopened is not None:
                    return Transition.REOPENED
        if _read(session, provider) is not None:
            return None  # open or someone else's probe: a late failure says nothing new
        _ensure_row(session, provider, moment)
    return None


def release_probe(session: Session, provider: str, owner: str, now: datetime | None = None) -> Transition | None:
    """Give back a probe that was admitted but proved nothing (never sent, or ended in a failure that says
    nothing about the provider): the breaker returns to OPEN with its cooldown over, so the next request
    probes at once."""
    provider, owner, moment = _provider(provider), _owner(owner), _now(now)
    released = _guarded(
        session,
        provider,
        C.state == CircuitState.HALF_OPEN,
        C.probe_owner == owner,
        state=CircuitState.OPEN,
        next_probe_at=moment,
        probe_owner=None,
        probe_lease_until=None,
        updated_at=moment,
    )
    return Transition.RELEASED if released is not None else None


def note_health_probe(
    session: Session,
    provider: str,
    ok: bool,
    error_class: ErrorClass | str | None = None,
    now: datetime | None = None,
    config: BreakerConfig | None = None,
    *,
    detail: str = "",
) -> Transition | None:
    """Record a scheduled health probe (`last_probe_at`, `last_probe_ok`) and feed it to the breaker as the
    module docstring's "Health probes" says. A failed probe without an error class counts as `unavailable`."""
    provider, moment, cfg = _provider(provider), _now(now), _config(config)
    _ensure_row(session, provider, moment)
    session.execute(
        update(C)
        .where(C.provider == provider)
        .values(last_probe_at=moment, last_probe_ok=ok, updated_at=moment)
        .execution_options(synchronize_session=False)
    )
    if ok:
        ready = _guarded(
            session,
            provider,
            C.state == CircuitState.OPEN,
            C.next_probe_at > moment,
            next_probe_at=moment,
            updated_at=moment,
        )
        return Transition.PROBE_READY if ready is not None else None
    klass = ErrorClass.UNAVAILABLE if error_class is None else _error_class(error_class)
    if not ERROR_TRAITS[klass].counts_against_provider:
        return None
    text = f"health probe: {detail}" if detail else "health probe failed"
    row = _read(session, provider)
    if row is not None and row.state is CircuitState.OPEN:
        later = moment + cfg.cooldown_after_failed_probe(row.since or moment, moment)
        pushed = _guarded(
            session,
            provider,
            C.state == CircuitState.OPEN,
            or_(C.next_probe_at.is_(None), C.next_probe_at < later),
            next_probe_at=later,
            last_error_class=klass.value,
            updated_at=moment,
        )
        return Transition.EXTENDED if pushed is not None else None
    if row is not None and row.state is CircuitState.CLOSED:
        return record_failure(session, provider, klass, None, moment, cfg, message=text)
    return None


# --- reading and admin ----------------------------------------------------------------------------------------


def _snapshot(provider: str, row: Any, now: datetime, config: BreakerConfig) -> BreakerSnapshot:
    if row is None:
        return BreakerSnapshot(
            provider, CircuitState.CLOSED, "", None, None, 0, None, 0, 0, False, 0, None, None, None, None, None, None
        )
    current = row.window_start is not None and row.window_start > now - config.window
    return BreakerSnapshot(
        provider=provider,
        state=row.state,
        reason=row.reason,
        since=row.since,
        next_probe_at=row.next_probe_at,
        consecutive_failures=row.consecutive_failures,
        window_start=row.window_start,
        window_requests=row.window_requests,
        window_failures=row.window_failures,
        window_current=current,
        opened_count=row.opened_count,
        last_error_class=row.last_error_class,
        probe_owner=row.probe_owner,
        probe_lease_until=row.probe_lease_until,
        last_probe_at=row.last_probe_at,
        last_probe_ok=row.last_probe_ok,
        updated_at=row.updated_at,
    )


def snapshot(
    session: Session, now: datetime | None = None, config: BreakerConfig | None = None
) -> dict[str, BreakerSnapshot]:
    """Every catalog provider's breaker, in catalog order (one query; no write)."""
    moment, cfg = _now(now), _config(config)
    # Core rows (the same attribute names), not entities: this runs on every request.
    rows: Mapping[str, Any] = {r.provider: r for r in session.connection().execute(_all_states())}
    return {p: _snapshot(p, rows.get(p), moment, cfg) for p in PROVIDERS}


@functools.cache
def _all_states() -> Any:
    return select(cast(Table, C.__table__))


def _public(snap: BreakerSnapshot) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "state": snap.state.value,
        "reason": snap.reason,
        "since": iso(snap.since),
        "next_probe_at": iso(snap.next_probe_at),
        "consecutive_failures": snap.consecutive_failures,
        "window_requests": snap.window_requests,
        "window_failures": snap.window_failures,
        "opened_count": snap.opened_count,
    }


def reset(
    session: Session,
    actor: Actor,
    provider: str,
    now: datetime | None = None,
    *,
    comment: str | None = None,
    config: BreakerConfig | None = None,
) -> BreakerSnapshot:
    """Close `provider`'s breaker by hand and clear its counters (an in-flight probe's outcome is then
    ignored). ADMIN or HERO; audited as `breaker.reset` with the state before and after."""
    who = authorize(session, actor, *BREAKER_RESETTERS, action="reset circuit breakers")
    provider, moment, cfg = _provider(provider), _now(now), _config(config)
    _ensure_row(session, provider, moment)
    before = _snapshot(provider, _read(session, provider), moment, cfg)
    _guarded(
        session,
        provider,
        state=CircuitState.CLOSED,
        reason=f"reset by {who.username}",
        since=moment,
        next_probe_at=None,
        probe_owner=None,
        probe_lease_until=None,
        consecutive_failures=0,
        window_start=None,
        window_requests=0,
        window_failures=0,
        updated_at=moment,
    )
    after = _snapshot(provider, _read(session, provider), moment, cfg)
    audit.record(
        session,
        who,
        "breaker.reset",
        "provider",
        provider,
        before=_public(before),
        after=_public(after),
        comment=comment,
    )
    return after
