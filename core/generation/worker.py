"""The background worker (`imagegate worker`; `python3 manage.py console` starts one beside the console).

Jobs, each on its own schedule, one after another in one asyncio loop (each is short, and what they share is
the database: running them in sequence keeps the worker to one connection's worth of load):
- recovery (core.generation.recovery): at start, then every `recovery_interval_s`: collects the paid results
  of generations whose process died and settles their reservations, exactly once;
- reservation expiry (`budgets.expire_stale`): every `expiry_interval_s`, until no expired one is left;
- health probes (core.generation.health.run_probes): every `GlobalSettings.health_probe_interval_s` (read
  again each round, so a change applies without a restart), feeding the circuit breakers;
- slot waiters left by dead processes (`limits.sweep_waiters`): every `sweep_interval_s`;
- alerts (core.spend.alerts.detect_alerts: budget thresholds, breakers that opened, unusual spend): every
  `alerts_interval_s`;
- webhook deliveries (core.spend.delivery.deliver_due: leased, signed, retried with backoff): every
  `delivery_interval_s`, with one HTTP client for the worker's life, so a slow receiver delays only other
  deliveries, never a generation;
- housekeeping: API rate-limit windows older than an hour are deleted, every `housekeeping_interval_s`.

Any number of workers may run on one database (each rule they apply is one guarded statement). A failing job
is logged and retried at its next turn; it never stops the others. The worker stops at SIGTERM or SIGINT
(`stop` set) after the job in progress, or, with `once=True`, after one round of every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from sqlalchemy.orm import Session, sessionmaker

from core.api_rate import forget_old_windows
from core.generation import health, limits, recovery
from core.generation.dbexec import in_transaction, run_db
from core.generation.service import AdapterFactory, default_factory, settings_cache
from core.providers.registry import build_adapter
from core.spend.alerts import detect_alerts
from core.spend.delivery import deliver_due

__all__ = ["WorkerConfig", "WorkerReport", "run_worker", "run_worker_until_signalled"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    recovery_interval_s: float = 30.0
    expiry_interval_s: float = 60.0
    sweep_interval_s: float = 60.0
    probe_interval_s: float | None = None
    """None: the global settings' health_probe_interval_s."""
    probes: bool = True
    alerts_interval_s: float = 30.0
    delivery_interval_s: float = 5.0
    housekeeping_interval_s: float = 3600.0


@dataclass
class WorkerReport:
    rounds: dict[str, int] = field(default_factory=dict)
    """How many times each job ran."""
    recovered: int = 0
    """Attempts whose paid result was collected."""
    closed: int = 0
    """Attempts and generations closed without a result (abandoned, failed)."""
    expired: int = 0
    probes: int = 0
    alerts: int = 0
    """Alerts this worker fired (0 when other processes fired them first)."""
    deliveries: int = 0
    """Webhook deliveries this worker posted (delivered or not)."""
    errors: list[str] = field(default_factory=list)


Say = Callable[[str], None]


class _Worker:
    def __init__(
        self, factory: sessionmaker[Session], config: WorkerConfig, adapters: AdapterFactory, say: Say
    ) -> None:
        self.factory = factory
        self.config = config
        self.adapters = adapters
        self.say = say
        self.report = WorkerReport()
        self.http: httpx.AsyncClient | None = None

    async def recovery(self) -> None:
        done = await recovery.recover(self.factory, adapters=self.adapters, expire=False)
        self.report.recovered += done.collected
        self.report.closed += len(done.attempts) - done.collected + len(done.generations_closed)
        if not done.nothing_to_do:
            for line in done.lines():
                self.say(f"recover: {line}")

    async def expiry(self) -> None:
        expired = await run_db(recovery.expire_stale_reservations, self.factory)
        self.report.expired += expired
        if expired:
            self.say(f"expired {expired} stale reservation(s)")

    async def probes(self) -> None:
        outcomes = await health.run_probes(self.factory, run_db=run_db, adapter_factory=self.adapters)
        self.report.probes += len(outcomes)
        down = [o for o in outcomes if not o.ok]
        if down:
            self.say(f"health: {len(down)} of {len(outcomes)} probe(s) failed")

    async def sweep(self) -> None:
        await in_transaction(self.factory, limits.sweep_waiters)

    async def alerts(self) -> None:
        fired = await run_db(detect_alerts, self.factory)
        self.report.alerts += fired
        if fired:
            self.say(f"alerts: {fired} fired")

    async def deliveries(self) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        posted = await deliver_due(self.factory, self.http)
        self.report.deliveries += posted
        if posted:
            self.say(f"webhooks: {posted} delivery attempt(s)")

    async def housekeeping(self) -> None:
        await in_transaction(self.factory, forget_old_windows)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def probe_interval(self) -> float:
        if self.config.probe_interval_s is not None:
            return self.config.probe_interval_s
        snapshot = await settings_cache(self.factory).aget()
        return float(snapshot.global_settings.settings.health_probe_interval_s)

    async def run_job(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        self.report.rounds[name] = self.report.rounds.get(name, 0) + 1
        try:
            await job()
        except Exception as exc:  # logged; the job runs again at its next turn
            log.exception("worker job %s failed", name)
            self.report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self.say(f"{name} failed: {exc}")


async def run_worker(
    factory: sessionmaker[Session] | None = None,
    *,
    once: bool = False,
    stop: asyncio.Event | None = None,
    config: WorkerConfig | None = None,
    adapters: AdapterFactory | None = None,
    say: Say | None = None,
) -> WorkerReport:
    """Run the jobs until `stop` is set (or one round of each with `once`); returns what was done."""
    sessions = factory if factory is not None else await run_db(default_factory)
    settings = config or WorkerConfig()
    worker = _Worker(sessions, settings, adapters or build_adapter, say or (lambda line: log.info("%s", line)))
    stop = stop or asyncio.Event()
    jobs: Jobs = {
        "recovery": (worker.recovery, _fixed(settings.recovery_interval_s)),
        "expiry": (worker.expiry, _fixed(settings.expiry_interval_s)),
        "sweep": (worker.sweep, _fixed(settings.sweep_interval_s)),
        "alerts": (worker.alerts, _fixed(settings.alerts_interval_s)),
        "deliveries": (worker.deliveries, _fixed(settings.delivery_interval_s)),
        "housekeeping": (worker.housekeeping, _fixed(settings.housekeeping_interval_s)),
    }
    if settings.probes:
        jobs["probes"] = (worker.probes, worker.probe_interval)
    due = dict.fromkeys(jobs, time.monotonic())  # every job runs at start, recovery first
    try:
        await _run_jobs(worker, jobs, due, stop, once)
    finally:
        await worker.close()
    return worker.report


Jobs = dict[str, tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[float]]]]


async def _run_jobs(worker: _Worker, jobs: Jobs, due: dict[str, float], stop: asyncio.Event, once: bool) -> None:
    while not stop.is_set():
        for name, (job, interval) in jobs.items():
            if stop.is_set() or time.monotonic() < due[name]:
                continue
            await worker.run_job(name, job)
            try:
                every = await interval()
            except Exception:
                log.exception("could not read the interval of %s; using 60 s", name)
                every = 60.0
            due[name] = time.monotonic() + every
        if once:
            break
        wait = max(0.0, min(due.values()) - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)


def _fixed(seconds: float) -> Callable[[], Awaitable[float]]:
    async def interval() -> float:
        return seconds

    return interval


async def run_worker_until_signalled(
    factory: sessionmaker[Session] | None = None,
    *,
    once: bool = False,
    config: WorkerConfig | None = None,
    say: Say | None = None,
) -> WorkerReport:
    """`run_worker` stopping cleanly at SIGTERM or SIGINT (the job in progress finishes first)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread; no signals here
            loop.add_signal_handler(sig, stop.set)
    if say is not None:
        say("running (SIGTERM or Ctrl+C stops it after the job in progress)")
    try:
        return await run_worker(factory, once=once, stop=stop, config=config, say=say)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
