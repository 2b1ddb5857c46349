"""Provider health: scheduled cheap probes (active) and recent outcomes (passive), one status per provider.

Public API:

    async run_probes(session_factory, providers=None, now=None, *, config=None, run_db=None,
                     timeout_s=PROBE_TIMEOUT_S, adapter_factory=build_adapter) -> list[ProbeOutcome]
        The worker's scheduled job (every `GlobalSettings.health_probe_interval_s`). Runs each provider's
        non-billable `health_probe()` (core.providers.base) concurrently, each in its current connection mode
        (live, emulator or sandbox, as `registry.build_adapter` decides), bounded by `timeout_s`, and records
        each outcome in `circuit_states` (`last_probe_at`, `last_probe_ok`) in its own short transaction,
        feeding the breaker through `breaker.note_health_probe` (a failed probe of a closed breaker counts as a
        failure; of an open one it extends the cooldown; a good probe of an open breaker ends its cooldown so
        the next real request is the half-open probe, without closing it by itself). Database work runs through
        `run_db` (the service's bounded executor, core.generation.dbexec; `asyncio.to_thread` by default): the
        event loop never waits on the database. `now=None` takes the clock when each probe ends.
    health_report(session, now=None, config=None) -> list[ProviderHealth]
        Every catalog provider, in catalog order: `status` healthy | degraded | down | not_configured with the
        `reason`, its connection `mode`, whether it is `configured` (has its key), the breaker's snapshot, the
        last probe and the recent outcomes. Reads one breaker query and one rollup query; never writes.
    classify(breaker, recent, config, now) -> (HealthStatus, reason)
        The rule alone (pure), for pages that already hold a snapshot.

Status, decided in this order:
- not_configured: a real provider without its key. Never "down": nobody broke anything, it is not set up. It
  still runs in its `mode` (the emulator or the sandbox stands in) and `observed` says how that stand-in does.
- down: the breaker is open or half-open (requests are refused but the probe); `reason` is the breaker's, with
  its next probe.
- degraded: the breaker is closed but halfway to opening (half its failures in a row, or half its failure rate
  in the current window with enough requests), or the last health probe failed, or the recent attempts in the
  rollups failed at the breaker's rate; also an open breaker whose last health probe has passed (recovering:
  the next request will confirm).
- healthy: none of the above (including "no traffic and no probe yet", which the reason says).

Passive health reads only the breaker's window figures and the daily rollups (`usage_daily_rollups`) of the
UTC day(s) that overlap the last hour, in the provider's current connection mode: never a scan of
usage_attempts. The rollups are per day, so "recent" means today (and yesterday in the first hour after
midnight); the breaker window is the minute-scale signal. Only failures that count against a provider
(ErrorTraits.counts_against_provider) count as failures; cancelled attempts count neither way.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ERROR_TRAITS, ErrorClass
from core.catalog import PROVIDERS, ProviderKind, get_provider
from core.generation import breaker
from core.generation.breaker import BreakerConfig, BreakerSnapshot, CircuitState, Transition
from core.providers.base import ConnectionMode, HealthReport, ProviderAdapter
from core.providers.registry import build_adapter, connection_for
from db.engine import transaction
from db.models import UsageDailyRollup

__all__ = [
    "PROBE_TIMEOUT_S",
    "HealthStatus",
    "ProbeOutcome",
    "ProviderHealth",
    "RecentOutcomes",
    "classify",
    "health_report",
    "load_config",
    "run_probes",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 15.0
"""The longest one health probe may take (the adapters bound their own probes; this bounds a stuck one)."""
RECENT = timedelta(hours=1)

T = TypeVar("T")
DbRunner = Callable[[Callable[[], T]], Awaitable[T]]


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    NOT_CONFIGURED = "not_configured"


@dataclass(frozen=True)
class RecentOutcomes:
    """Attempts of the last UTC day(s) from the rollups, in one connection mode."""

    since_day: str
    """The first UTC day counted (ISO date)."""
    succeeded: int = 0
    failed: int = 0
    """Failures that count against the provider."""
    other: int = 0
    """Failures that say nothing about it (validation, safety) and cancelled attempts."""

    @property
    def counted(self) -> int:
        return self.succeeded + self.failed


@dataclass(frozen=True)
class ProviderHealth:
    provider: str
    label: str
    status: HealthStatus
    reason: str
    mode: ConnectionMode
    """How the provider is reached now: live, or the emulator/sandbox standing in."""
    configured: bool
    """It has its key (the sandbox needs none)."""
    observed: HealthStatus
    """Healthy, degraded or down as measured on what serves it now (for a configured provider: `status`)."""
    breaker: BreakerSnapshot
    recent: RecentOutcomes

    @property
    def last_probe_at(self) -> datetime | None:
        return self.breaker.last_probe_at

    @property
    def last_probe_ok(self) -> bool | None:
        return self.breaker.last_probe_ok


@dataclass(frozen=True)
class ProbeOutcome:
    provider: str
    mode: ConnectionMode
    ok: bool
    latency_s: float
    detail: str
    error_class: ErrorClass | None
    transition: Transition | None
    """What the probe did to the breaker, if anything."""


# --- the rule -------------------------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return "never" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def classify(
    snap: BreakerSnapshot, recent: RecentOutcomes, config: BreakerConfig, now: datetime
) -> tuple[HealthStatus, str]:
    """healthy | degraded | down (never not_configured: that is about keys, not measurements), with why."""
    probe_passed_since_open = (
        snap.last_probe_ok is True
        and snap.last_probe_at is not None
        and (snap.since is None or snap.last_probe_at >= snap.since)
    )
    if snap.state is CircuitState.OPEN:
        if probe_passed_since_open:
            return HealthStatus.DEGRADED, (
                f"recovering: open since {_when(snap.since)} ({snap.reason}); the health probe passed at "
                f"{_when(snap.last_probe_at)}, the next request will confirm"
            )
        return HealthStatus.DOWN, (
            f"open since {_when(snap.since)}: {snap.reason}; next probe at {_when(snap.next_probe_at)}"
        )
    if snap.state is CircuitState.HALF_OPEN:
        return HealthStatus.DOWN, f"being probed (open since {_when(snap.since)}: {snap.reason})"
    problems: list[str] = []
    if snap.last_probe_ok is False:
        problems.append(f"the last health probe failed at {_when(snap.last_probe_at)}")
    halfway = max(1, math.ceil(config.consecutive_failures / 2))
    if snap.consecutive_failures >= halfway:
        problems.append(f"{snap.consecutive_failures} failures in a row (it opens at {config.consecutive_failures})")
    if (
        snap.window_current
        and snap.window_requests >= config.min_requests
        and 2 * snap.window_failures * 1_000_000 >= config.failure_rate_ppm * snap.window_requests
    ):
        problems.append(f"{snap.window_failures} of {snap.window_requests} requests failed in the current window")
    if recent.counted >= config.min_requests and recent.failed * 1_000_000 >= config.failure_rate_ppm * recent.counted:
        problems.append(f"{recent.failed} of {recent.counted} attempts failed since {recent.since_day}")
    if problems:
        return HealthStatus.DEGRADED, "; ".join(problems)
    if snap.last_probe_at is None and recent.counted == 0 and not snap.window_current:
        return HealthStatus.HEALTHY, "no failures seen (no recent requests and no health probe yet)"
    probe = f"; health probe ok at {_when(snap.last_probe_at)}" if snap.last_probe_ok else ""
    return HealthStatus.HEALTHY, f"closed; {recent.succeeded} of {recent.counted} recent attempts succeeded{probe}"


# --- the report -----------------------------------------------------------------------------------------------


def load_config(session: Session) -> BreakerConfig:
    """The breaker thresholds from the current global settings."""
    from core.settings_service import get_global_settings  # heavier module; only this path needs it

    return BreakerConfig.from_settings(get_global_settings(session).settings)


def _recent(session: Session, modes: dict[str, str], now: datetime) -> dict[str, RecentOutcomes]:
    """One grouped read of the rollups of the UTC day(s) overlapping the last hour."""
    first_day = (now - RECENT).date()
    rows = session.execute(
        select(
            UsageDailyRollup.provider,
            UsageDailyRollup.mode,
            UsageDailyRollup.status,
            UsageDailyRollup.error_class,
            func.sum(UsageDailyRollup.attempts),
        )
        .where(UsageDailyRollup.day >= first_day)
        .group_by(
            UsageDailyRollup.provider, UsageDailyRollup.mode, UsageDailyRollup.status, UsageDailyRollup.error_class
        )
    ).all()
    counts: dict[str, list[int]] = {p: [0, 0, 0] for p in modes}
    for provider, mode, status, error_class, attempts in rows:
        if provider not in counts or mode != modes[provider]:
            continue
        n = int(attempts or 0)
        if status in ("succeeded", "recovered"):
            counts[provider][0] += n
        elif status == "failed" and _counts(error_class):
            counts[provider][1] += n
        else:
            counts[provider][2] += n
    day = first_day.isoformat()
    return {p: RecentOutcomes(day, c[0], c[1], c[2]) for p, c in counts.items()}


def _counts(error_class: str | None) -> bool:
    if not error_class:
        return True  # a failure without a class is the provider's until shown otherwise
    try:
        return ERROR_TRAITS[ErrorClass(error_class)].counts_against_provider
    except ValueError:
        return True  # a failure we cannot classify is the provider's until shown otherwise


def health_report(
    session: Session, now: datetime | None = None, config: BreakerConfig | None = None
) -> list[ProviderHealth]:
    """Every provider's health, in catalog order (see the module docstring). Reads only."""
    moment = datetime.now(UTC) if now is None else now.astimezone(UTC)
    cfg = config if config is not None else load_config(session)
    connections = {p: connection_for(p) for p in PROVIDERS}
    snaps = breaker.snapshot(session, moment, cfg)
    recent = _recent(session, {p: c.mode.value for p, c in connections.items()}, moment)
    report = []
    for provider, conn in connections.items():
        spec = get_provider(provider)
        observed, why = classify(snaps[provider], recent[provider], cfg, moment)
        configured = spec.kind is ProviderKind.SANDBOX or conn.mode is ConnectionMode.LIVE
        if configured:
            status, reason = observed, why
        else:
            status = HealthStatus.NOT_CONFIGURED
            reason = f"not configured: {conn.reason} ({conn.mode.value} {observed.value}: {why})"
        report.append(
            ProviderHealth(
                provider=provider,
                label=spec.label,
                status=status,
                reason=reason,
                mode=conn.mode,
                configured=configured,
                observed=observed,
                breaker=snaps[provider],
                recent=recent[provider],
            )
        )
    return report


# --- the probes -----------------------------------------------------------------------------------------------


async def _to_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def _probe(adapter: ProviderAdapter, provider: str, timeout_s: float) -> HealthReport:
    """The adapter's report; a probe that overruns is a timeout, and one that raises is ours to fix (logged,
    reported as failed without an error class, so it does not count against the provider)."""
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(timeout_s):
            return await adapter.health_probe()
    except TimeoutError:
        elapsed = asyncio.get_running_loop().time() - started
        return HealthReport(provider, False, elapsed, f"no answer within {timeout_s:g} s", ErrorClass.TIMEOUT)
    except Exception as exc:  # an adapter's probe must report, never raise: this is a bug on our side
        log.exception("health probe of %s raised", provider)
        elapsed = asyncio.get_running_loop().time() - started
        return HealthReport(provider, False, elapsed, f"the probe itself failed: {type(exc).__name__}", None)
    finally:
        try:
            await adapter.aclose()
        except Exception:
            log.exception("closing the %s adapter after its health probe failed", provider)


async def run_probes(
    session_factory: sessionmaker[Session],
    providers: Sequence[str] | None = None,
    now: datetime | None = None,
    *,
    config: BreakerConfig | None = None,
    run_db: DbRunner[Any] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    adapter_factory: Callable[[str], ProviderAdapter] = build_adapter,
) -> list[ProbeOutcome]:
    """Probe `providers` (default: every catalog provider) concurrently and record each outcome; see the module
    docstring. Returns the outcomes in the order asked."""
    names = list(PROVIDERS) if providers is None else list(providers)
    for name in names:
        get_provider(name)  # KeyError for an unknown provider, before anything runs
    runner: DbRunner[Any] = run_db if run_db is not None else _to_thread

    def read_config() -> BreakerConfig:
        with transaction(session_factory) as session:
            return load_config(session)

    cfg: BreakerConfig = config if config is not None else await runner(read_config)

    async def one(provider: str) -> ProbeOutcome:
        mode = connection_for(provider).mode
        try:
            adapter = adapter_factory(provider)
        except Exception as exc:  # a provider we cannot even build an adapter for: ours to fix, logged
            log.exception("building the %s adapter for its health probe failed", provider)
            report = HealthReport(provider, False, 0.0, f"no adapter: {type(exc).__name__}", None)
        else:
            report = await _probe(adapter, provider, timeout_s)
        moment = datetime.now(UTC) if now is None else now

        def record() -> Transition | None:
            with transaction(session_factory) as session:
                if report.ok or report.error_class is not None:
                    return breaker.note_health_probe(
                        session, provider, report.ok, report.error_class, moment, cfg, detail=report.detail
                    )
                # our own failure: recorded as a failed probe, not fed to the breaker
                breaker.note_health_probe(session, provider, False, ErrorClass.CANCELLED, moment, cfg)
                return None

        transition = await runner(record)
        return ProbeOutcome(provider, mode, report.ok, report.latency_s, report.detail, report.error_class, transition)

    return list(await asyncio.gather(*(one(p) for p in names)))
