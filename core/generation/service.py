"""The generation service: one `generate()` behind the console, the REST API and the CLI.

    result = await generate(GenerationRequest("a red fox in snow", preset="fast"), actor)
    result = generate_sync(request, actor)          # Streamlit, the CLI, scripts

One request, end to end (ARCHITECTURE.md):
1. Read the state it decides on, in one trip to the database executor: the acting account (it exists and is
   active; any role may generate), the cached settings snapshot (core.generation.snapshot), every breaker, and
   the first request with the same idempotency key if there is one (a repeat returns it: see "Idempotency").
2. Route (core.generation.routing.plan_route): every provider prepared at ITS settings and price, the ones that
   cannot serve the request left out with the reason. Nothing runnable: `InvalidInput` naming each provider.
3. Start the generation (core.generation.usage.start_generation): an insert on the scoped idempotency key that
   cannot race, the account authorized again in that transaction, a lease taken (renewed while it runs).
4. For each candidate, in the route's order:
   - the breaker: a breaker the route saw closed admits (that read was the admission); an open or half-open one
     goes through `breaker.admit`, which hands out the one half-open probe;
   - a provider slot (core.generation.limits: Ideogram's 10 in flight per account hold across processes);
   - ONE transaction: reserve the attempt's estimate in every budget that applies to it (global, its
     provider's, the user's; mode simulated for the emulator and the sandbox) and insert the attempt row, with
     one timestamp, so recovery can find the attempt's holds again. A hard budget without room refuses
     (`BudgetExceeded`): the next candidate is tried, or, when none is left, the first refusal is raised. A
     soft budget over its limit degrades the request once (core.generation.degrade: a cheaper preset, a smaller
     size or a cheaper provider), re-routed, told to the caller and recorded on the generation;
   - the adapter runs with `on_request_id` storing the provider's request id BEFORE it polls, and progress
     forwarded to `on_progress`;
   - ONE transaction at the attempt's end: the reservation settled by the attempt's billing facts (actual cost
     at ITS provider's price version: settlement.actual_cost; not billed: released; unknown: held), the
     attempt finished with its rollup (exactly once), its images indexed, the generation finished when this
     was the last attempt, and the breaker told (last: its row lock is held to the commit);
   - on a failure, core.generation.retries decides: the same provider after a backoff honouring Retry-After,
     the next candidate, or stop, all within the request's deadline.
5. Every attempt failed: `GenerationFailed` (a ProviderError) listing each attempt and why, with the result.

Every database call from this async code goes through core.generation.dbexec (a bounded thread pool): the
event loop never waits on the database. A task cancelled mid-attempt still writes the attempt's end (billing
unknown: the provider may have run it) before the cancellation goes on.

Idempotency: the key is scoped to the user (`<user id or 0>:<key>`) and the request's fingerprint is stored, so
a key reused for another request is refused. A repeat of a finished request returns its stored result
(`replayed=True`) or raises its stored error again (a refusal stays a refusal: use a new key after raising the
budget); a repeat of a request still running waits for it while its lease is alive, and otherwise returns its
state (status running; `imagegate recover` finishes it). Nothing is spent twice: only the first request with a
key ever reserves or runs anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, BudgetExceeded, DatabaseUnavailable, ErrorClass, InvalidInput, ProviderError
from core.authz import authorize
from core.generation import breaker, budgets, limits, records, usage
from core.generation.context import RequestContext, read_request_context
from core.generation.dbexec import in_transaction, run_db, submit, write_once_sync
from core.generation.degrade import Degradation, SoftBudgetOver, degrade
from core.generation.models import (
    Adjustment,
    AdjustmentKind,
    AttemptRecord,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    GenerationStatus,
    ImageRecord,
    ProgressUpdate,
    TimingSummary,
)
from core.generation.retries import Action, FailedAttempt, decide_after_failure, describe_attempts
from core.generation.routing import (
    BreakerState,
    BreakerView,
    Candidate,
    RoutePlan,
    RouteRequest,
    RoutingPolicy,
    Skipped,
    SkipReason,
    plan_route,
    snapshot_preparer,
)
from core.generation.settlement import Settlement, actual_cost
from core.generation.snapshot import SettingsCache, SettingsSnapshot
from core.money import format_usd
from core.providers.base import AdapterRequest, ConnectionMode, ProgressEvent, ProviderAdapter, ProviderResult
from core.providers.registry import build_adapter
from core.security import Actor, Role
from core.settings import ProviderSettings
from db.models import utcnow

__all__ = [
    "GENERATOR_ROLES",
    "LEASE_TTL_S",
    "AdapterFactory",
    "ProgressCallback",
    "default_factory",
    "generate",
    "generate_sync",
    "process_owner",
    "settings_cache",
]

log = logging.getLogger(__name__)

GENERATOR_ROLES: tuple[Role, ...] = (Role.ADMIN, Role.HERO, Role.USER)
"""Any active account may generate; what a USER may spend is what their budgets say."""
LEASE_TTL_S = 60.0
"""A running generation's lease: renewed every third of it; recovery takes over a generation only after it."""
RESERVATION_MARGIN_S = 300.0
"""An attempt's reservation expires this long after its deadline: only a crashed process leaves one that old."""
REPEAT_POLL_S = 0.2
"""How often a repeat of a request still in flight looks whether the first one finished."""

ProgressCallback = Callable[[ProgressUpdate], Awaitable[None] | None]
AdapterFactory = Callable[[str], ProviderAdapter]


# --- process-wide pieces: the default database, the settings caches, the lease owner ------------------------------

_state_lock = threading.Lock()
_default: dict[str, sessionmaker[Session]] = {}
_caches: weakref.WeakKeyDictionary[sessionmaker[Session], SettingsCache] = weakref.WeakKeyDictionary()
_owner: tuple[int, str] | None = None


def default_factory() -> sessionmaker[Session]:
    """The sessions of the configured database (DATABASE_URL, else the SQLite file in the data directory),
    opened once per process and URL. The schema must be current (the console, the CLI and the worker migrate
    at start)."""
    from common.config import database_url
    from core.runtime import open_runtime

    url = database_url()
    with _state_lock:
        factory = _default.get(url)
        if factory is None:
            factory = open_runtime(url, prepare=False).sessions
            _default[url] = factory
        return factory


def settings_cache(factory: sessionmaker[Session]) -> SettingsCache:
    """The process's settings cache for this database (one per session factory)."""
    with _state_lock:
        cache = _caches.get(factory)
        if cache is None:
            cache = SettingsCache(factory)
            _caches[factory] = cache
        return cache


def process_owner() -> str:
    """This process as a lease owner: `host:pid:random`, at most 64 characters (a forked child gets its own)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        host = socket.gethostname()[:40] or "host"
        _owner = (pid, f"{host}:{pid}:{secrets.token_hex(4)}")
    return _owner[1]


# --- small pieces ------------------------------------------------------------------------------------------------


class _Adapters:
    """The adapters one request uses, built on first use (live, emulator or sandbox by the registry's rules),
    closed when the request ends."""

    def __init__(self, factory: AdapterFactory) -> None:
        self._factory = factory
        self._built: dict[str, ProviderAdapter] = {}
        self._lock = threading.Lock()  # the route is planned on the loop; recovery may build from a thread

    def get(self, provider: str) -> ProviderAdapter:
        with self._lock:
            adapter = self._built.get(provider)
            if adapter is None:
                adapter = self._factory(provider)
                self._built[provider] = adapter
            return adapter

    async def aclose(self) -> None:
        for provider, adapter in list(self._built.items()):
            try:
                await adapter.aclose()
            except Exception:
                log.warning("closing the %s adapter failed", provider, exc_info=True)
        self._built.clear()


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))


def endpoint_of(adapter: ProviderAdapter, provider: str) -> str:
    """Where an attempt is sent (never a key): the emulator's or an endpoint's base URL, or the real API."""
    if adapter.mode is ConnectionMode.SANDBOX:
        return f"sandbox (offline, standing in for {provider})" if provider != "sandbox" else "sandbox (offline)"
    if adapter.config.base_url:
        return adapter.config.base_url
    return _LIVE_ENDPOINTS.get(provider, f"{provider} (its default API)")


_LIVE_ENDPOINTS = {
    "fal-qwen": "https://queue.fal.run/fal-ai/qwen-image",
    "ideogram": "https://api.ideogram.ai/v1/ideogram-v3/generate",
    "huggingface": "https://router.huggingface.co (HF Inference)",
    "qwen": "https://huggingface.co/spaces/Qwen/Qwen-Image",
}


def _route_request(request: GenerationRequest) -> RouteRequest:
    return RouteRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        preset=request.preset,
        overrides=dict(request.params),
        provider=request.provider,
        policy=request.policy,
        allow_fallback=request.allow_fallback,
    )


def _budget_refusal(record: Mapping[str, Any]) -> BudgetExceeded:
    return BudgetExceeded(
        budget_id=int(record["budget_id"]),
        budget_name=str(record["budget_name"]),
        mode=str(record["mode"]),
        limit_micro_usd=int(record["limit_micro_usd"]),
        spent_micro_usd=int(record["spent_micro_usd"]),
        reserved_micro_usd=int(record["reserved_micro_usd"]),
        requested_micro_usd=int(record["requested_micro_usd"]),
    )


def _refusal_record(error: BudgetExceeded) -> dict[str, Any]:
    return {
        "refused": {
            "budget_id": error.budget_id,
            "budget_name": error.budget_name,
            "mode": error.mode,
            "limit_micro_usd": error.limit_micro_usd,
            "spent_micro_usd": error.spent_micro_usd,
            "reserved_micro_usd": error.reserved_micro_usd,
            "requested_micro_usd": error.requested_micro_usd,
        }
    }


def describe_event(event: ProgressEvent) -> str:
    parts = [event.kind.value]
    if event.provider_request_id and event.kind.value == "submitted":
        parts.append(f"request {event.provider_request_id}")
    if event.queue_position is not None:
        parts.append(f"position {event.queue_position}")
    if event.progress is not None:
        parts.append(f"{event.progress:.0%}")
    if event.message:
        parts.append(event.message)
    parts.extend(event.logs)
    return " · ".join(parts)


class _Degrade(Exception):
    """Raised inside the first admission's transaction (rolling it back): soft budgets are over their limit."""

    def __init__(self, over: list[SoftBudgetOver]) -> None:
        super().__init__("soft budgets over their limit")
        self.over = over


class _AlreadyFinished(Exception):
    """Another process (recovery) finished this attempt first: this process's end is rolled back."""


@dataclass(frozen=True)
class _State:
    user_id: int | None
    snapshot: SettingsSnapshot
    breakers: Mapping[str, BreakerView]
    p50_s: dict[str, float | None]
    existing: str | None
    """The generation an earlier request with the same key made."""
    context: RequestContext = field(default_factory=RequestContext)
    """Volume-tier units this month and the user's preferences (core.generation.context)."""


@dataclass(frozen=True)
class _Begun:
    attempt_id: int
    reservation: budgets.Reservation | None
    soft_over: tuple[SoftBudgetOver, ...]
    started_at: datetime


@dataclass(frozen=True)
class _Admitted:
    """The first attempt's admission, made in the generation's own transaction: begun, or refused by a hard
    budget (then `begun` is None)."""

    begun: _Begun | None
    request: AdapterRequest
    refusal: BudgetExceeded | None


@dataclass(frozen=True)
class _Where:
    """One attempt: what it ran at and how far into the request it is."""

    candidate: Candidate
    adapter: ProviderAdapter
    begun: _Begun
    attempt_no: int
    position: int
    owner: str
    config: breaker.BreakerConfig


@dataclass
class _AttemptEnd:
    record: AttemptRecord
    result: ProviderResult | None = None
    error: ProviderError | None = None


@dataclass
class _Timing:
    started: float = field(default_factory=time.monotonic)
    first_attempt: float | None = None


# --- one request -------------------------------------------------------------------------------------------------


class _Run:
    def __init__(
        self,
        request: GenerationRequest,
        actor: Actor,
        factory: sessionmaker[Session],
        adapters: _Adapters,
        on_progress: ProgressCallback | None,
        lease_ttl_s: float,
    ) -> None:
        self.request = request
        self.actor = actor
        self.factory = factory
        self.adapters = adapters
        self.on_progress = on_progress
        self.lease_ttl = timedelta(seconds=lease_ttl_s)
        self.timing = _Timing()
        self.deadline = None if request.deadline_s is None else self.timing.started + request.deadline_s
        self.owner = process_owner()
        self.generation_id = ""
        self.user_id: int | None = None
        self.units_this_month: Mapping[str, Decimal] = {}
        self.attempts: list[AttemptRecord] = []
        self.failures: list[FailedAttempt] = []
        self.skipped: list[Skipped] = []
        self.adjustments: list[Adjustment] = []
        self.refusals: list[BudgetExceeded] = []
        self.degraded: dict[str, Any] | None = None
        self.lease_lost = False

    # -- helpers --

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def progress(self, update: ProgressUpdate) -> None:
        if self.on_progress is None:
            return
        try:
            outcome = self.on_progress(update)
            if asyncio.iscoroutine(outcome) or isinstance(outcome, Awaitable):
                await outcome
        except Exception:  # a failing display never stops a paid run
            log.exception("on_progress failed (%s); the request goes on", update.kind)

    def _read_state(self) -> _State:
        snapshot = settings_cache(self.factory).get()
        user_id = self.actor.user_id
        with self.factory() as session:
            if not self.actor.is_system and type(user_id) is not int:  # no account signed in (None, a bool, ...)
                authorize(session, self.actor, *GENERATOR_ROLES, action="generate images", lock=False)  # raises
            # A new request is authorized where it writes (`_start`, with the account locked), before anything
            # is written; only a replay returns something without `_start`, so only a replay is checked here.
            existing = None
            if self.request.idempotency_key is not None:
                key = usage.scoped_idempotency_key(user_id, self.request.idempotency_key)
                row = records.generation_by_key(session, key)
                if row is not None:
                    authorize(session, self.actor, *GENERATOR_ROLES, action="generate images", lock=False)
                if row is not None and row.request_fingerprint != self.request.fingerprint():
                    raise InvalidInput(
                        f"the idempotency key {self.request.idempotency_key!r} was already used for a different "
                        "request; a repeated request must be identical, and a new request needs a new key",
                        {"idempotency_key": "already used for a different request"},
                    )
                existing = row.id if row is not None else None
            breakers = breaker.snapshot(session) if existing is None else {}
            p50: dict[str, float | None] = {}
            policy = self.request.policy or snapshot.global_settings.settings.routing_policy
            if existing is None and str(policy).strip().lower() == RoutingPolicy.FASTEST.value:
                since = (utcnow() - timedelta(days=7)).date()
                p50 = {
                    p: (None if ms is None else ms / 1000)
                    for p, ms in usage.provider_latency_p50(session, since).items()
                }
            context = RequestContext() if existing is not None else read_request_context(session, snapshot, user_id)
        return _State(user_id, snapshot, breakers, p50, existing, context)

    def plan(self, route: RouteRequest, state: _State) -> RoutePlan:
        snapshot = state.snapshot
        modes = {p: self.adapters.get(p).mode for p in snapshot.routing_settings()}
        self.units_this_month = state.context.units_this_month
        return plan_route(
            route,
            snapshot,
            prepare=snapshot_preparer(
                snapshot,
                self.adapters.get,
                units_this_month=state.context.units_this_month,
                user_preferences=state.context.preferences,
            ),
            breakers=state.breakers,
            latency_p50_s=state.p50_s,
            modes=modes,
        )

    # -- the request --

    async def run(self) -> GenerationResult:
        state = await run_db(self._read_state)
        self.user_id = state.user_id
        if state.existing is not None:
            return await self.replay(state.existing)
        route = _route_request(self.request)
        plan = self.plan(route, state)
        refusal = plan.refusal()
        if refusal is not None:
            raise refusal
        self.skipped.extend(plan.skipped)
        for note in plan.notes:
            self.adjustments.append(Adjustment(AdjustmentKind.ROUTING, note))
        admitted: _Admitted | None = None
        if self._admits_at_start(plan.candidates[0], state):
            try:
                start, admitted = await in_transaction(
                    self.factory, lambda session: self._start_and_begin(session, plan, state)
                )
            except _Degrade:  # rolled back whole; the route's loop degrades as for any other first attempt
                start = await in_transaction(self.factory, lambda session: self._start(session, plan))
        else:
            start = await in_transaction(self.factory, lambda session: self._start(session, plan))
        if not start.created:
            return await self.replay(start.generation_id)
        self.generation_id = start.generation_id
        lease = asyncio.create_task(self._keep_lease(), name=f"lease {self.generation_id}")
        try:
            return await self._run_route(route, plan, state, admitted)
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # renewal failures were logged
                await lease

    def _start(self, session: Session, plan: RoutePlan) -> usage.GenerationStart:
        who = authorize(session, self.actor, *GENERATOR_ROLES, action="generate images")
        first = plan.candidates[0]
        now = utcnow()
        return usage.start_generation(
            session,
            user_id=who.user_id,
            prompt=self.request.prompt,
            request=self.request.record(),
            routing_policy=plan.policy.value,
            requested_provider=self.request.provider,
            mode=usage.spend_mode_of(self.adapters.get(first.provider).mode).value,
            estimated_micro_usd=first.estimate_micro_usd,
            idempotency_key=self.request.idempotency_key,
            fingerprint=self.request.fingerprint(),
            lease_owner=self.owner,
            lease_expires_at=now + self.lease_ttl,
            now=now,
        )

    def _admits_at_start(self, candidate: Candidate, state: _State) -> bool:
        """The first attempt's admission can go in the generation's own transaction (one commit less): its
        breaker was closed in this request's snapshot (no probe to take) and its provider has no concurrency
        limit (no slot to wait for before reserving)."""
        if BreakerState(str(candidate.breaker.state)) is not BreakerState.CLOSED:
            return False
        settings = state.snapshot.routing_settings().get(candidate.provider)
        return limits.effective_limit(settings, candidate.provider) is None

    def _start_and_begin(
        self, session: Session, plan: RoutePlan, state: _State
    ) -> tuple[usage.GenerationStart, _Admitted | None]:
        """One transaction: the generation (`_start`) and its first attempt's admission (`_begin`: reserve and
        the attempt row). A hard budget's refusal leaves the generation alone to commit (reserve gave back what
        it held) and is handed to the route's loop; `_Degrade` rolls the whole transaction back."""
        start = self._start(session, plan)
        if not start.created:
            return start, None
        self.generation_id = start.generation_id
        first = plan.candidates[0]
        request, _timeout = self._attempt_request(first)
        settings = state.snapshot.routing_settings().get(first.provider)
        adapter = self.adapters.get(first.provider)
        try:
            begun = self._begin(session, first, adapter, 1, 0, request, True, settings)
        except BudgetExceeded as refusal:
            return start, _Admitted(None, request, refusal)
        return start, _Admitted(begun, request, None)

    def _attempt_request(self, candidate: Candidate) -> tuple[AdapterRequest, float]:
        """The candidate's request with its timeout cut to what is left of the request's deadline."""
        remaining = self.remaining()
        timeout = candidate.request.timeout_s if remaining is None else min(candidate.request.timeout_s, remaining)
        return replace(candidate.request, timeout_s=max(0.001, timeout)), timeout

    async def _keep_lease(self) -> None:
        interval = self.lease_ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                held = await in_transaction(
                    self.factory,
                    lambda session: usage.renew_lease(
                        session, self.generation_id, lease_owner=self.owner, lease_expires_at=utcnow() + self.lease_ttl
                    ),
                )
            except Exception:  # a database blip: two more renewals before the lease lapses
                log.warning("could not renew the lease of generation %s", self.generation_id, exc_info=True)
                continue
            if not held:
                self.lease_lost = True
                log.warning("generation %s: its lease was taken over (this process stalled?)", self.generation_id)
                return

    async def _run_route(
        self, route: RouteRequest, plan: RoutePlan, state: _State, admitted: _Admitted | None = None
    ) -> GenerationResult:
        settings = state.snapshot.global_settings.settings
        if self.request.max_attempts is not None:
            settings = settings.model_copy(update={"max_attempts": self.request.max_attempts})
        config = breaker.BreakerConfig.from_settings(settings)
        candidates = list(plan.candidates)
        index, retries_here, attempt_no = 0, 0, 0
        may_degrade = True
        while index < len(candidates):
            candidate = candidates[index]
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                self._skip(candidate, SkipReason.FALLBACK_OFF, "the request's deadline passed before it was tried")
                break
            first_admission, admitted = admitted, None  # the first attempt's, admitted with the generation
            try:
                end = await self._attempt(
                    candidate, attempt_no + 1, index, config, state, may_degrade=may_degrade, admitted=first_admission
                )
            except _Degrade as soft:
                may_degrade = False
                plan = self._degraded_plan(route, candidates[0], soft.over, state) or plan
                candidates, index, retries_here = list(plan.candidates), 0, 0
                continue
            except BudgetExceeded as refusal:
                self.refusals.append(refusal)
                self._skip(candidate, SkipReason.CANNOT_PRICE, f"a hard budget refused it: {refusal}")
                await self.progress(ProgressUpdate("skipped", str(refusal), candidate.provider))
                index, retries_here = index + 1, 0
                continue
            except limits.SlotTimeout as busy:
                self._skip(candidate, SkipReason.BREAKER_OPEN, str(busy))
                await self.progress(ProgressUpdate("skipped", str(busy), candidate.provider))
                index, retries_here = index + 1, 0
                continue
            except _BreakerRefused as refused:
                self._skip(candidate, SkipReason.BREAKER_OPEN, refused.reason)
                await self.progress(ProgressUpdate("skipped", refused.reason, candidate.provider))
                index, retries_here = index + 1, 0
                continue
            attempt_no += 1
            may_degrade = False
            if end.error is None:
                return self._success(end)
            following = candidates[index + 1].provider if index + 1 < len(candidates) else None
            decision = decide_after_failure(
                end.error,
                attempts_so_far=attempt_no,
                retries_of_provider=retries_here,
                remaining_s=self.remaining(),
                settings=settings,
                next_provider=following,
                min_attempt_s=(candidate.p50_s or 0.0),
            )
            self.failures.append(FailedAttempt(candidate.provider, end.error, decision))
            if decision.action is Action.RETRY:
                self.adjustments.append(Adjustment(AdjustmentKind.RETRY, decision.reason, candidate.provider))
                await self.progress(ProgressUpdate("retry", decision.reason, candidate.provider, attempt_no))
                await asyncio.sleep(decision.delay_s)
                retries_here += 1
                continue
            if decision.action is Action.FALLBACK:
                self.adjustments.append(Adjustment(AdjustmentKind.RETRY, decision.reason, candidate.provider))
                await self.progress(ProgressUpdate("fallback", decision.reason, candidate.provider, attempt_no))
                index, retries_here = index + 1, 0
                continue
            break
        return await self._give_up(attempt_no)

    def _skip(self, candidate: Candidate, reason: SkipReason, detail: str) -> None:
        self.skipped.append(Skipped(candidate.provider, reason, detail))
        self.adjustments.append(Adjustment(AdjustmentKind.ROUTING, f"{candidate.provider} skipped: {detail}"))

    def _degraded_plan(
        self, route: RouteRequest, first: Candidate, over: list[SoftBudgetOver], state: _State
    ) -> RoutePlan | None:
        change: Degradation = degrade(route, first, over)
        self.degraded = change.record(over)
        for message in change.messages:
            self.adjustments.append(Adjustment(AdjustmentKind.DEGRADE, message, detail=change.changes))
        if not change.changed:
            return None
        try:
            plan = self.plan(change.request, state)
        except InvalidInput as exc:
            note = f"the degraded request cannot be routed ({exc}); it runs as asked (the soft budget allows it)"
            self.adjustments.append(Adjustment(AdjustmentKind.DEGRADE, note))
            self.degraded["messages"].append(note)
            return None
        if plan.refusal() is not None:
            note = "no provider can serve the degraded request; it runs as asked (the soft budget allows it)"
            self.adjustments.append(Adjustment(AdjustmentKind.DEGRADE, note))
            self.degraded["messages"].append(note)
            return None
        before, after = first.estimate_micro_usd, plan.candidates[0].estimate_micro_usd
        after_provider = plan.candidates[0].provider
        note = f"estimate {format_usd(before)} at {first.provider} -> {format_usd(after)} at {after_provider}"
        self.adjustments.append(Adjustment(AdjustmentKind.DEGRADE, note, detail=change.changes))
        self.degraded["messages"].append(note)
        return plan

    # -- one attempt --

    async def _admit(self, candidate: Candidate, owner: str, config: breaker.BreakerConfig) -> bool:
        """The breaker's word: True when this attempt is the half-open probe. A breaker the route saw closed
        admits without another read (that snapshot, taken for this request, was the admission)."""
        state = BreakerState(str(candidate.breaker.state))
        if state is BreakerState.CLOSED:
            return False
        rescue = candidate.last_resort
        decision = await in_transaction(
            self.factory,
            lambda session: breaker.admit(session, candidate.provider, owner, config=config, ignore_cooldown=rescue),
        )
        if not decision.allowed:
            raise _BreakerRefused(decision.reason)
        return decision.probe

    async def _release_probe(self, provider: str, owner: str) -> None:
        try:
            await in_transaction(self.factory, lambda session: breaker.release_probe(session, provider, owner))
        except Exception:  # the probe lease expires by itself
            log.warning("could not give back the %s probe", provider, exc_info=True)

    async def _attempt(
        self,
        candidate: Candidate,
        attempt_no: int,
        position: int,
        config: breaker.BreakerConfig,
        state: _State,
        *,
        may_degrade: bool,
        admitted: _Admitted | None = None,
    ) -> _AttemptEnd:
        provider = candidate.provider
        owner = f"{self.generation_id}:{attempt_no}"
        adapter = self.adapters.get(provider)
        if admitted is not None:  # admitted with the generation: closed breaker, no slot to hold
            if admitted.refusal is not None:
                raise admitted.refusal
            assert admitted.begun is not None
            return await self._run_attempt(
                candidate, adapter, admitted.request, admitted.begun, attempt_no, position, owner, config
            )
        probe = await self._admit(candidate, owner, config)
        settings = state.snapshot.routing_settings().get(provider)
        limit = limits.effective_limit(settings, provider)
        request, timeout = self._attempt_request(candidate)
        try:
            async with limits.provider_slot(
                self.factory, provider, owner, self.user_id, limit, time.monotonic() + timeout
            ):
                begun = await in_transaction(
                    self.factory,
                    lambda s: self._begin(s, candidate, adapter, attempt_no, position, request, may_degrade, settings),
                )
                return await self._run_attempt(candidate, adapter, request, begun, attempt_no, position, owner, config)
        except (_Degrade, BudgetExceeded, limits.SlotTimeout):
            if probe:
                await self._release_probe(provider, owner)
            raise

    def _begin(
        self,
        session: Session,
        candidate: Candidate,
        adapter: ProviderAdapter,
        attempt_no: int,
        position: int,
        request: AdapterRequest,
        may_degrade: bool,
        settings: ProviderSettings | None = None,
    ) -> _Begun:
        """The attempt's admission, one transaction: reserve its estimate, insert its row (one timestamp).
        `settings` are the provider's settings from this request's snapshot (current when it started): its
        daily cost limit is not read again."""
        moment = utcnow()
        provider = candidate.provider
        applicable = budgets.applicable_budgets(session, provider, self.user_id, provider_settings=settings, now=moment)
        reservation: budgets.Reservation | None = None
        over: list[SoftBudgetOver] = []
        if applicable:
            admission = budgets.reserve(
                session,
                applicable,
                candidate.estimate_micro_usd,
                usage.spend_mode_of(adapter.mode),
                self.generation_id,
                timedelta(seconds=request.timeout_s + RESERVATION_MARGIN_S),
                now=moment,
            )
            reservation = admission.reservation
            actions = {b.id: b.degrade_action for b in applicable}
            over = [
                SoftBudgetOver(
                    f.budget_id, f.budget_name, actions.get(f.budget_id) or "", f.left_micro_usd, f.limit_micro_usd
                )
                for f in admission.soft_exceeded
            ]
            if over and may_degrade:
                raise _Degrade(over)  # rolls this transaction back: nothing reserved, no attempt row
        attempt_id = usage.start_attempt(
            session,
            generation_id=self.generation_id,
            attempt_no=attempt_no,
            fallback_position=position,
            user_id=self.user_id,
            provider=provider,
            mode=adapter.mode.value,
            endpoint=endpoint_of(adapter, provider),
            effective_params=dict(request.params),
            translation_notes=list(candidate.notes),
            estimated_micro_usd=candidate.estimate_micro_usd,
            price_version_id=candidate.price_version_id,
            preset=candidate.prepared.effective.preset if candidate.prepared.effective is not None else None,
            now=moment,
        )
        return _Begun(attempt_id, reservation, tuple(over), moment)

    async def _run_attempt(
        self,
        candidate: Candidate,
        adapter: ProviderAdapter,
        request: AdapterRequest,
        begun: _Begun,
        attempt_no: int,
        position: int,
        owner: str,
        config: breaker.BreakerConfig,
    ) -> _AttemptEnd:
        provider = candidate.provider
        if self.timing.first_attempt is None:
            self.timing.first_attempt = time.monotonic()
        for over in begun.soft_over:
            note = f"soft budget {over.name!r} is over its limit; the request runs as already adjusted"
            self.adjustments.append(Adjustment(AdjustmentKind.DEGRADE, note, provider))
        for note in candidate.notes:
            self.adjustments.append(Adjustment(AdjustmentKind.TRANSLATION, note, provider))
        where = "" if position == 0 else f" (fallback {position})"
        said = f"attempt {attempt_no} at {provider}{where}"
        await self.progress(ProgressUpdate("attempt", said, provider, attempt_no))
        request_id: list[str] = []

        async def on_request_id(value: str) -> None:
            request_id.append(value)
            stored = await in_transaction(
                self.factory, lambda session: usage.record_request_id(session, begun.attempt_id, value)
            )
            if not stored:
                log.warning("attempt %s was finished elsewhere before its request id was stored", begun.attempt_id)

        async def on_event(event: ProgressEvent) -> None:
            await self.progress(ProgressUpdate(event.kind.value, describe_event(event), provider, attempt_no, event))

        started = time.monotonic()
        at = _Where(candidate, adapter, begun, attempt_no, position, owner, config)
        try:
            result = await adapter.generate(request, on_event=on_event, on_request_id=on_request_id)
        except ProviderError as error:
            return await self._end_failed(at, error, started)
        except asyncio.CancelledError:
            await self._end_cancelled(at, started, request_id)
            raise
        return await self._end_succeeded(at, result)

    def _record(self, where: _Where, outcome: usage.AttemptOutcome, request_id: str | None) -> AttemptRecord:
        candidate = where.candidate
        return AttemptRecord(
            attempt_no=where.attempt_no,
            provider=candidate.provider,
            fallback_position=where.position,
            mode=where.adapter.mode.value,
            status=outcome.status,
            error_class=outcome.error_class,
            error_message=outcome.error_message,
            billing=Billing(outcome.billing).value,
            billed_units=outcome.billed_units,
            estimated_micro_usd=candidate.estimate_micro_usd,
            actual_micro_usd=outcome.actual_micro_usd,
            price_version_id=candidate.price_version_id,
            translation_notes=candidate.notes,
            provider_request_id=request_id,
            submit_ms=outcome.submit_ms,
            queue_ms=outcome.queue_ms,
            run_ms=outcome.run_ms,
            download_ms=outcome.download_ms,
            total_ms=outcome.total_ms,
            started_at=where.begun.started_at,
            finished_at=utcnow(),
        )

    def _final_cost(self, settlement: Settlement) -> int | None:
        """Every attempt's actual cost, this one's included; None while one of them is unknown (reconciled
        later)."""
        if settlement.billing is Billing.UNKNOWN:
            return None
        total = settlement.actual_micro_usd or 0
        for a in self.attempts:
            if a.billing == Billing.UNKNOWN.value:
                return None
            total += a.actual_micro_usd or 0
        return total

    def _settle(self, where: _Where, billing: Billing, units: Decimal | None) -> Settlement:
        candidate = where.candidate
        assert candidate.prepared.price is not None  # candidates are priced by construction
        return actual_cost(
            price=candidate.prepared.price.price,
            billing=billing,
            billed_units=units,
            estimated_micro_usd=candidate.estimate_micro_usd,
            params=candidate.request.params,
            mode=where.adapter.mode.value,
            units_used_this_month=self.units_this_month.get(candidate.provider, Decimal(0)),
        )

    def _end_transaction(
        self,
        session: Session,
        begun: _Begun,
        settlement: Settlement,
        outcome: usage.AttemptOutcome,
        breaker_call: Callable[[Session], object],
        images: list[usage.ImageRecord] | None,
        finish: dict[str, Any] | None,
    ) -> None:
        """The attempt's end, one transaction, in the lock order every writer keeps: budget periods (settle),
        the attempt and its rollup, images, the generation, the breaker last. Applies at most once: the
        attempt's guarded finish decides, and a finish that finds it done rolls everything back."""
        if begun.reservation is not None:
            budgets.settle(session, begun.reservation, settlement.actual_micro_usd or 0, settlement.billing)
        if not usage.finish_attempt(session, begun.attempt_id, outcome):
            raise _AlreadyFinished
        if images:
            usage.record_images(session, self.generation_id, begun.attempt_id, self.user_id, images, read_back=False)
        if finish is not None:
            usage.finish_generation(session, self.generation_id, **finish)
        breaker_call(session)

    def _write_end(self, fn: Callable[[Session], None], attempt_no: int) -> None:
        """On a database thread: the end's transaction, retried while the database is unavailable (it applies
        at most once: a retry after a commit whose answer was lost finds the attempt finished)."""
        try:
            write_once_sync(self.factory, fn)
        except _AlreadyFinished:
            log.warning("attempt %s of %s was already finished (by recovery, or by a lost commit's retry)",
                        attempt_no, self.generation_id)  # fmt: skip

    async def _commit_attempt_end(
        self,
        where: _Where,
        outcome: usage.AttemptOutcome,
        settlement: Settlement,
        request_id: str | None,
        breaker_call: Callable[[Session], object],
        *,
        images: list[usage.ImageRecord] | None = None,
        finish: dict[str, Any] | None = None,
        cancelling: bool = False,
    ) -> AttemptRecord:
        """Write an attempt's end (settle, finish with its rollup, images, the generation, the breaker) in one
        transaction, on a database thread that finishes it even when this task is cancelled meanwhile.

        The database unavailable even after the retries: the end is not written, and nothing else may be
        (a fallback would be admitted against a budget that still holds this attempt's reservation, and this
        attempt's billing fact is known only here). The request stops with `DatabaseUnavailable`; its lease is
        no longer renewed, so `imagegate recover` (or the worker) takes the generation over when the lease
        expires, collects the attempt by its request id and settles it once. `cancelling`: the caller is
        already cancelled; a failure is logged and the cancellation goes on."""
        record = self._record(where, outcome, request_id)
        fn = functools.partial(
            self._end_transaction,
            begun=where.begun,
            settlement=settlement,
            outcome=outcome,
            breaker_call=breaker_call,
            images=images,
            finish=finish,
        )
        future = submit(self._write_end, fn, where.attempt_no)
        try:
            await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if not cancelling:
                raise  # the write goes on in its thread
        except DatabaseUnavailable as error:
            log.error(
                "the end of attempt %s of generation %s could not be written (%s); the generation is left for "
                "recovery once its lease expires",
                where.attempt_no,
                self.generation_id,
                error,
            )
            if not cancelling:
                raise DatabaseUnavailable(
                    f"the end of attempt {where.attempt_no} at {where.candidate.provider} could not be written "
                    f"({error}); generation {self.generation_id} is left for recovery: `imagegate recover` (or "
                    "the worker) settles it once its lease expires"
                ) from error
        self.attempts.append(record)
        return record

    async def _end_succeeded(self, where: _Where, result: ProviderResult) -> _AttemptEnd:
        settlement = self._settle(where, Billing.BILLED, result.billed_units)
        images = [
            usage.ImageRecord(i.sha256, i.format, i.width, i.height, i.size_bytes, result.seed) for i in result.images
        ]
        t = result.timings
        outcome = usage.AttemptOutcome(
            status="succeeded",
            billing=settlement.billing,
            actual_micro_usd=settlement.actual_micro_usd,
            billed_units=settlement.billed_units,
            images_count=len(images),
            megapixels_micro=sum(i.width * i.height for i in result.images),
            submit_ms=_ms(t.submit_s),
            queue_ms=_ms(t.queue_s),
            run_ms=_ms(t.run_s),
            download_ms=_ms(t.download_s),
            total_ms=_ms(t.total_s),
            image_refs=[i.ref for i in images],
        )
        finish = {
            "status": GenerationStatus.SUCCEEDED.value,
            "final_provider": where.candidate.provider,
            "final_cost_micro_usd": self._final_cost(settlement),
            "degraded": self.degraded,
        }
        provider, owner, config = where.candidate.provider, where.owner, where.config
        record = await self._commit_attempt_end(
            where,
            outcome,
            settlement,
            result.provider_request_id,
            lambda s: breaker.record_success(s, provider, owner, config=config),
            images=images,
            finish=finish,
        )
        return _AttemptEnd(record, result=result)

    async def _end_failed(self, where: _Where, error: ProviderError, started: float) -> _AttemptEnd:
        settlement = self._settle(where, error.billing, error.billed_units)
        outcome = usage.AttemptOutcome(
            status="cancelled" if error.error_class is ErrorClass.CANCELLED else "failed",
            billing=settlement.billing,
            actual_micro_usd=settlement.actual_micro_usd,
            billed_units=settlement.billed_units,
            error_class=error.error_class.value,
            error_message=error.message,
            total_ms=_ms(time.monotonic() - started),
        )
        provider, owner, config = where.candidate.provider, where.owner, where.config
        record = await self._commit_attempt_end(
            where,
            outcome,
            settlement,
            error.provider_request_id,
            lambda s: breaker.record_failure(s, provider, error, owner, config=config),
        )
        await self.progress(
            ProgressUpdate("failed", f"{error.error_class.value}: {error.message}", provider, where.attempt_no)
        )
        return _AttemptEnd(record, error=error)

    async def _end_cancelled(self, where: _Where, started: float, request_id: list[str]) -> None:
        """The caller cancelled mid-attempt: the provider may have run it (billing unknown, held), so the end is
        written before the cancellation goes on, whatever happens to this task meanwhile."""
        settlement = self._settle(where, Billing.UNKNOWN, None)
        outcome = usage.AttemptOutcome(
            status="cancelled",
            billing=settlement.billing,
            actual_micro_usd=settlement.actual_micro_usd,
            error_class=ErrorClass.CANCELLED.value,
            error_message="the request was cancelled by its caller while this attempt ran",
            total_ms=_ms(time.monotonic() - started),
        )
        finish = {
            "status": GenerationStatus.CANCELLED.value,
            "final_provider": None,
            "final_cost_micro_usd": self._final_cost(settlement),
            "error_class": ErrorClass.CANCELLED.value,
            "error_message": outcome.error_message,
            "degraded": self.degraded,
        }
        provider, owner, config = where.candidate.provider, where.owner, where.config
        cancelled = ProviderError(
            ErrorClass.CANCELLED, outcome.error_message or "", provider=provider, billing=settlement.billing
        )
        try:
            await self._commit_attempt_end(
                where,
                outcome,
                settlement,
                request_id[-1] if request_id else None,
                lambda s: breaker.record_failure(s, provider, cancelled, owner, config=config),
                finish=finish,
                cancelling=True,
            )
        except Exception:
            log.exception("could not record the cancelled attempt %s of %s", where.attempt_no, self.generation_id)

    # -- the end --

    def _result(self, status: GenerationStatus, served: _AttemptEnd | None) -> GenerationResult:
        images: tuple[ImageRecord, ...] = ()
        seed = None
        provider = mode = None
        timings = TimingSummary(total_s=time.monotonic() - self.timing.started)
        if served is not None and served.result is not None:
            result = served.result
            images = tuple(
                ImageRecord(i.path, i.sha256, i.width, i.height, i.size_bytes, i.format, result.seed, n)
                for n, i in enumerate(result.images)
            )
            seed, provider, mode = result.seed, served.record.provider, served.record.mode
            t = result.timings
            timings = replace(timings, submit_s=t.submit_s, queue_s=t.queue_s, run_s=t.run_s, download_s=t.download_s)
        if self.timing.first_attempt is not None:
            timings = replace(timings, admission_s=self.timing.first_attempt - self.timing.started)
        return GenerationResult(
            generation_id=self.generation_id,
            status=status,
            provider=provider,
            mode=mode,
            images=images,
            seed=seed,
            attempts=tuple(self.attempts),
            cost=records.cost_summary(self.attempts, served.record if served is not None else None),
            timings=timings,
            adjustments=tuple(self.adjustments),
        )

    def _success(self, end: _AttemptEnd) -> GenerationResult:
        return self._result(GenerationStatus.SUCCEEDED, end)

    async def _give_up(self, attempts_made: int) -> GenerationResult:
        if attempts_made == 0 and self.refusals:
            refusal = self.refusals[0]
            await self._finish(
                status=GenerationStatus.REFUSED.value,
                error_class="budget_exceeded",
                error_message=str(refusal),
                degraded={**(self.degraded or {}), **_refusal_record(refusal)},
            )
            raise refusal
        message = describe_attempts(self.failures, skipped=self.skipped)
        last = self.attempts[-1] if self.attempts else None
        await self._finish(
            status=GenerationStatus.FAILED.value,
            error_class=(last.error_class if last is not None else ErrorClass.UNAVAILABLE.value),
            error_message=message,
            degraded=self.degraded,
        )
        result = replace(
            self._result(GenerationStatus.FAILED, None),
            error_class=last.error_class if last is not None else ErrorClass.UNAVAILABLE.value,
            error_message=message,
        )
        await self.progress(ProgressUpdate("finished", "every attempt failed"))
        raise GenerationFailed(message, result, tuple(f.error for f in self.failures))

    async def _finish(self, **values: Any) -> None:
        unknown = any(a.billing == Billing.UNKNOWN.value for a in self.attempts)
        cost = None if unknown else sum(a.actual_micro_usd or 0 for a in self.attempts)
        await in_transaction(
            self.factory,
            lambda session: usage.finish_generation(
                session, self.generation_id, final_provider=None, final_cost_micro_usd=cost, **values
            ),
        )

    # -- repeats of an idempotency key --

    async def replay(self, generation_id: str) -> GenerationResult:
        """The first request with this key: its result (or its error) once finished; while it runs, wait as long
        as its lease is alive (and the deadline allows), then return its state."""
        announced = False
        while True:
            start = await run_db(self._generation, generation_id)
            alive = start.lease_expires_at is not None and start.lease_expires_at > datetime.now(UTC)
            remaining = self.remaining()
            if start.finished or not alive or (remaining is not None and remaining <= 0):
                break
            if not announced:
                announced = True
                await self.progress(
                    ProgressUpdate("waiting", "a request with this idempotency key is running; waiting for it")
                )
            await asyncio.sleep(REPEAT_POLL_S if remaining is None else min(REPEAT_POLL_S, max(0.0, remaining)))
        result = await run_db(self._load, generation_id)
        if result.status is GenerationStatus.FAILED or result.status is GenerationStatus.CANCELLED:
            raise GenerationFailed(result.error_message or f"generation {generation_id} {result.status.value}", result)
        if result.status is GenerationStatus.REFUSED:
            refused = (await run_db(self._degraded_record, generation_id)).get("refused")
            if isinstance(refused, Mapping):
                raise _budget_refusal(refused)
            raise GenerationFailed(result.error_message or "refused", result)
        return result

    def _generation(self, generation_id: str) -> usage.GenerationStart:
        with self.factory() as session:
            return usage.get_generation(session, generation_id)

    def _load(self, generation_id: str) -> GenerationResult:
        with self.factory() as session:
            return records.load_result(session, generation_id)

    def _degraded_record(self, generation_id: str) -> dict[str, Any]:
        from db.models import Generation

        with self.factory() as session:
            row = session.get(Generation, generation_id)
            return dict(row.degraded or {}) if row is not None else {}


class _BreakerRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the entry points --------------------------------------------------------------------------------------------


async def generate(
    request: GenerationRequest,
    actor: Actor,
    *,
    factory: sessionmaker[Session] | None = None,
    on_progress: ProgressCallback | None = None,
    adapters: AdapterFactory | None = None,
    lease_ttl_s: float = LEASE_TTL_S,
) -> GenerationResult:
    """Run one request: route, admit, run with fallback and retries, settle. See the module docstring.

    `actor`: a signed-in account (`UserView.actor()`) or the system (`Actor.system("cli:alice")`); authorized
    from the database. `factory`: the database's sessions (default: the configured database). `on_progress`:
    called (sync or async) with each `ProgressUpdate`; its failures are logged, never raised. `adapters`: how a
    provider's adapter is built (default: core.providers.registry.build_adapter: live, emulator or sandbox).

    Raises `InvalidInput` (no provider can serve the request, or it is malformed), `PermissionDenied`,
    `BudgetExceeded` (a hard budget refused every candidate; names it and what is left) and `GenerationFailed`
    (a ProviderError: every attempt failed, each listed with why; `.result` has them all)."""
    if not isinstance(request, GenerationRequest):
        raise InvalidInput("generate takes a GenerationRequest", {"request": "not a GenerationRequest"})
    if lease_ttl_s <= 0:
        raise ValueError("lease_ttl_s must be positive")
    pool = _Adapters(adapters or build_adapter)
    sessions = factory if factory is not None else await run_db(default_factory)
    run = _Run(request, actor, sessions, pool, on_progress, lease_ttl_s)
    try:
        return await run.run()
    finally:
        await pool.aclose()


def generate_sync(
    request: GenerationRequest,
    actor: Actor,
    *,
    factory: sessionmaker[Session] | None = None,
    on_progress: ProgressCallback | None = None,
    adapters: AdapterFactory | None = None,
    lease_ttl_s: float = LEASE_TTL_S,
) -> GenerationResult:
    """`generate()` for synchronous callers (Streamlit scripts, the CLI). From a thread with no event loop it
    runs one; called where a loop is already running (a notebook), it runs on a fresh loop in a helper thread."""

    def run() -> GenerationResult:
        return asyncio.run(
            generate(
                request, actor, factory=factory, on_progress=on_progress, adapters=adapters, lease_ttl_s=lease_ttl_s
            )
        )

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegate-generate") as helper:
        return helper.submit(run).result()
