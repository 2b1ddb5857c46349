"""Routing: which providers a request may run on, in which order, and why every other one was left out.

Pure decision logic: it reads what it is given (a settings snapshot, breaker states, recent latencies, each
provider's connection mode) and a `Preparer` that resolves, translates and prices the request for one
provider (core.generation.prepare, or a fake in tests). It writes nothing and sends nothing.

Rules, in the order they are applied to each provider of the catalog:
1. Settings deleted: not configured; stored settings that no longer validate: out, with the reason.
   Deactivated: out, even when named (an admin switched it off).
2. Not named by the request (automatic routing):
   - the sandbox renders placeholders, so it joins automatic routing only when no provider is connected at
     all (every one is served by the sandbox anyway); otherwise only when named;
   - premium providers (catalog `premium=True`, Ideogram) only when the global `premium_in_auto_routing` is on;
   - a provider whose own `auto_routing` is off only when named.
3. No price in force: out (an unpriced provider is never free, so never run).
4. The request is prepared for the provider at ITS settings: a provider that cannot serve it (a size it cannot
   render, a negative prompt it has no field for, too many images) is out with the field errors; so is one
   whose price cannot price these parameters.
5. Circuit breakers: open ones are out, unless every provider still eligible is open: then the one whose next
   probe comes first (the one most likely to have recovered) is kept as the `last_resort`, so the request still
   tries something (the service admits it with `breaker.admit(..., ignore_cooldown=True)`).
   Half-open ones stay (the breaker decides who probes); an open one whose next probe is due stays too, since
   only an attempt lets the breaker probe it.
6. Order: a named provider first; the others by the policy: priority (higher first), cheapest (each priced at
   its OWN resolved and translated parameters, never another provider's), fastest (lowest recent p50, unknown
   last). Ties: higher priority, then provider id.
7. Fallback off (the request's `allow_fallback`, else the global `fallback_enabled`): only the first runs.

Every left-out provider gets a `Skipped` with a reason a person can read; every candidate says why it is there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from common.errors import InvalidInput
from core.catalog import PROVIDERS, ProviderKind
from core.generation.prepare import PreparedRequest, prepare
from core.generation.snapshot import SettingsSnapshot
from core.money import format_usd
from core.providers.base import AdapterRequest, ConnectionMode, ProviderAdapter, Translation
from core.settings import ProviderSettings, UserPreferenceValues


class RoutingPolicy(StrEnum):
    PRIORITY = "priority"
    CHEAPEST = "cheapest"
    FASTEST = "fastest"
    EXPLICIT = "explicit"

    @classmethod
    def parse(cls, value: RoutingPolicy | str) -> RoutingPolicy:
        """A policy from its name in any case, or InvalidInput on the field `policy`."""
        if isinstance(value, RoutingPolicy):
            return value
        if isinstance(value, str):
            for policy in cls:
                if value.strip().lower() == policy.value:
                    return policy
        message = f"unknown routing policy {value!r}; policies: {', '.join(p.value for p in cls)}"
        raise InvalidInput(message, {"policy": message})


class BreakerState(StrEnum):
    """The same values as db.models.CircuitState (what core.generation.breaker reports)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerView(Protocol):
    """What routing reads of one provider's breaker: core.generation.breaker.BreakerSnapshot has it, and so
    has `BreakerStatus` below, for callers and tests without a database."""

    @property
    def state(self) -> str: ...
    @property
    def next_probe_at(self) -> datetime | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def since(self) -> datetime | None: ...


@dataclass(frozen=True)
class BreakerStatus:
    state: BreakerState = BreakerState.CLOSED
    next_probe_at: datetime | None = None
    """When an open breaker lets a probe through; None = not known."""
    reason: str | None = None
    """Why it opened, in words."""
    since: datetime | None = None


CLOSED = BreakerStatus()


def _state(breaker: BreakerView) -> BreakerState:
    return BreakerState(str(breaker.state))


@dataclass(frozen=True)
class RouteRequest:
    """What the caller asked for, before any provider's settings apply."""

    prompt: str
    negative_prompt: str | None = None
    preset: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    provider: str | None = None
    """A provider named by the caller: it goes first, whatever the policy and its automatic-routing flags."""
    policy: RoutingPolicy | str | None = None
    """None = the global settings' routing_policy."""
    allow_fallback: bool | None = None
    """None = the global settings' fallback_enabled."""
    timeout_s: float | None = None
    """Per-attempt deadline replacing the settings' one (the service passes what is left of the request's)."""


class Preparer(Protocol):
    """Prepares the request for one provider at that provider's own settings and price."""

    def __call__(self, provider: str, request: RouteRequest, /) -> PreparedRequest: ...


def snapshot_preparer(
    snapshot: SettingsSnapshot,
    adapter_for: Callable[[str], ProviderAdapter | None] | None = None,
    *,
    units_this_month: Mapping[str, Decimal] | None = None,
    user_preferences: UserPreferenceValues | None = None,
) -> Preparer:
    """A Preparer on core.generation.prepare with the settings and prices of `snapshot` (no database), translating
    with `adapter_for(provider)`: the adapter that would run it (live, emulator or sandbox). `units_this_month`
    (provider -> live units so far this month) places each estimate on its price's volume tiers;
    `user_preferences` are the requesting user's own defaults."""
    units = units_this_month or {}

    def _prepare(provider: str, request: RouteRequest, /) -> PreparedRequest:
        return prepare(
            None,
            provider,
            prompt=request.prompt,
            preset=request.preset,
            overrides=request.overrides,
            negative_prompt=request.negative_prompt,
            adapter=None if adapter_for is None else adapter_for(provider),
            timeout_s=request.timeout_s,
            snapshot=snapshot,
            units_used_this_month=units.get(provider, Decimal(0)),
            user_preferences=user_preferences,
        )

    return _prepare


class SkipReason(StrEnum):
    NOT_CONFIGURED = "not_configured"
    INVALID_SETTINGS = "invalid_settings"
    INACTIVE = "inactive"
    SANDBOX = "sandbox"
    PREMIUM = "premium"
    AUTO_ROUTING_OFF = "auto_routing_off"
    NO_PRICE = "no_price"
    CANNOT_SERVE = "cannot_serve"
    CANNOT_PRICE = "cannot_price"
    BREAKER_OPEN = "breaker_open"
    FALLBACK_OFF = "fallback_off"


@dataclass(frozen=True)
class Skipped:
    """A provider left out of the route, and why."""

    provider: str
    reason: SkipReason
    detail: str
    """The why, in words, without the provider's name."""
    field_errors: Mapping[str, str] = field(default_factory=dict)
    """CANNOT_SERVE: what this provider cannot take, per field (parameter name, `prompt`, `preset`)."""

    @property
    def message(self) -> str:
        return f"{self.provider} skipped: {self.detail}"


@dataclass(frozen=True)
class Candidate:
    """A provider the request may run on, prepared at its own settings, translation and price."""

    provider: str
    prepared: PreparedRequest
    why: str
    """Why it is in the route at this place, in words."""
    breaker: BreakerView = CLOSED
    p50_s: float | None = None
    last_resort: bool = False
    """Its breaker is open but every eligible provider's is: the service admits it with
    `breaker.admit(..., ignore_cooldown=True)`, the one probe that may go out before the cooldown ends."""

    @property
    def request(self) -> AdapterRequest:
        assert self.prepared.request is not None  # candidates are runnable by construction
        return self.prepared.request

    @property
    def translation(self) -> Translation | None:
        return self.prepared.translation

    @property
    def price_version_id(self) -> int:
        assert self.prepared.price is not None
        return self.prepared.price.id

    @property
    def estimate_micro_usd(self) -> int:
        assert self.prepared.estimate is not None
        return self.prepared.estimate.micro_usd

    @property
    def notes(self) -> tuple[str, ...]:
        """What changed on the way to this provider: settings fitted to its limits, the translation's notes."""
        effective = self.prepared.effective.notes if self.prepared.effective is not None else ()
        translated = self.translation.notes if self.translation is not None else ()
        return tuple(dict.fromkeys((*effective, *translated)))


@dataclass(frozen=True)
class RoutePlan:
    policy: RoutingPolicy
    """EXPLICIT when a provider was named (by the request, or as the default provider); else the policy used."""
    fallback_order: RoutingPolicy
    """The policy that ordered the candidates after a named one (priority under EXPLICIT)."""
    provider: str | None
    """The provider named (by the request, or the default provider under the explicit policy)."""
    fallback_allowed: bool
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]
    notes: tuple[str, ...] = ()

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(c.provider for c in self.candidates)

    def candidate(self, provider: str) -> Candidate | None:
        return next((c for c in self.candidates if c.provider == provider), None)

    def next_after(self, provider: str) -> Candidate | None:
        """The candidate after `provider` (what a fallback tries), or None."""
        names = self.providers
        if provider not in names:
            return None
        index = names.index(provider) + 1
        return self.candidates[index] if index < len(self.candidates) else None

    def describe(self) -> list[str]:
        """The plan in words: each candidate in order with why, then each provider left out and why."""
        lines = [f"{i}. {c.provider}: {c.why}" for i, c in enumerate(self.candidates, 1)]
        lines += [s.message for s in self.skipped]
        lines += list(self.notes)
        return lines

    def refusal(self) -> InvalidInput | None:
        """When no provider can run the request: the error to raise, naming every provider and why."""
        if self.candidates:
            return None
        reasons = "; ".join(s.message for s in self.skipped) or "no provider is known"
        message = f"no provider can run this request: {reasons}"
        errors: dict[str, str] = {"provider": message}
        considered = [s for s in self.skipped if s.reason is not SkipReason.FALLBACK_OFF]
        if len(considered) == 1:  # one provider was asked for: its own field errors are the answer
            errors.update(considered[0].field_errors)
        else:
            for s in considered:
                errors.update({f"{s.provider}.{name}": msg for name, msg in s.field_errors.items()})
        return InvalidInput(message, errors)


# --------------------------------------------------------------------------------------------------------------


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time stored here is UTC.
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _time(moment: datetime | None) -> str:
    moment = _utc(moment)
    return "an unknown time" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _open_detail(breaker: BreakerView) -> str:
    since = f" since {_time(breaker.since)}" if breaker.since is not None else ""
    why = f" ({breaker.reason})" if breaker.reason else ""
    return f"its circuit breaker is open{since}{why}; next probe at {_time(breaker.next_probe_at)}"


def _is_open(breaker: BreakerView, now: datetime) -> bool:
    """Open and not yet due for a probe (an open breaker past its next probe lets the next attempt probe it)."""
    if _state(breaker) is not BreakerState.OPEN:
        return False
    due = _utc(breaker.next_probe_at)
    return due is None or now < due


def _probe_order(breaker: BreakerView) -> tuple[bool, datetime]:
    """Sooner next probe first; an unknown one last."""
    due = _utc(breaker.next_probe_at)
    return (due is None, due or datetime.max.replace(tzinfo=UTC))


def _breaker_note(breaker: BreakerView, now: datetime) -> str:
    state = _state(breaker)
    if state is BreakerState.HALF_OPEN:
        return "; breaker half-open (runs if it gets the probe)"
    if state is BreakerState.OPEN and not _is_open(breaker, now):
        return "; breaker open but due for a probe"
    return ""


def _all_offline(modes: Mapping[str, ConnectionMode]) -> bool:
    """No provider reaches anything but the sandbox in this process: the product is in sandbox mode."""
    return all(
        modes.get(pid, ConnectionMode.SANDBOX) is ConnectionMode.SANDBOX
        for pid, spec in PROVIDERS.items()
        if spec.kind is not ProviderKind.SANDBOX
    )


def _current_modes() -> dict[str, ConnectionMode]:
    from core.providers.registry import connection_for

    return {pid: connection_for(pid).mode for pid in PROVIDERS}


@dataclass(frozen=True)
class _Inputs:
    """Everything one plan reads, gathered once."""

    request: RouteRequest
    snapshot: SettingsSnapshot
    providers: Mapping[str, ProviderSettings]
    prepare: Preparer
    breakers: Mapping[str, BreakerView]
    latency: Mapping[str, float | None]
    modes: Mapping[str, ConnectionMode]
    now: datetime

    def breaker(self, provider: str) -> BreakerView:
        return self.breakers.get(provider, CLOSED)

    def priority(self, provider: str) -> int:
        return self.providers[provider].priority


def _static_skip(provider: str, named: bool, inputs: _Inputs) -> Skipped | None:
    """Why `provider` is out before the request is even prepared for it, or None."""
    spec = PROVIDERS[provider]
    settings = inputs.providers.get(provider)
    if settings is None:
        if provider in inputs.snapshot.invalid:
            return Skipped(provider, SkipReason.INVALID_SETTINGS, inputs.snapshot.invalid[provider])
        return Skipped(
            provider,
            SkipReason.NOT_CONFIGURED,
            "not configured: its settings were deleted (roll them back to use it again)",
        )
    if not settings.active:
        return Skipped(provider, SkipReason.INACTIVE, "deactivated in its settings")
    if not named:
        if spec.kind is ProviderKind.SANDBOX and not _all_offline(inputs.modes):
            return Skipped(
                provider,
                SkipReason.SANDBOX,
                "the offline sandbox renders placeholders, so it runs only when named or when no provider is "
                "connected (live or emulator)",
            )
        if spec.premium and not inputs.snapshot.global_settings.settings.premium_in_auto_routing:
            return Skipped(
                provider,
                SkipReason.PREMIUM,
                "premium providers are used only when named or enabled in the global settings "
                "(premium_in_auto_routing)",
            )
        if not settings.auto_routing:
            return Skipped(
                provider,
                SkipReason.AUTO_ROUTING_OFF,
                "automatic routing is off in its settings; it runs only when named",
            )
    if inputs.snapshot.price(provider) is None:
        return Skipped(
            provider, SkipReason.NO_PRICE, "no price in force (an unpriced provider is never free, so never run)"
        )
    return None


def _unrunnable(prepared: PreparedRequest) -> Skipped | None:
    """Why the prepared request cannot run at its provider, or None."""
    provider = prepared.provider
    if not prepared.valid:
        errors = dict(prepared.field_errors or {})
        said = "; ".join(errors.values()) or prepared.error or "the request does not resolve"
        return Skipped(provider, SkipReason.CANNOT_SERVE, f"cannot serve this request: {said}", errors)
    if prepared.price is None:
        return Skipped(provider, SkipReason.NO_PRICE, "no price in force (an unpriced provider is never run)")
    if prepared.estimate is None:
        said = "; ".join(p for p in prepared.problems if "price" in p) or "its price cannot price these parameters"
        return Skipped(provider, SkipReason.CANNOT_PRICE, said)
    return None


def _prepare_all(providers: list[str], inputs: _Inputs, skipped: list[Skipped]) -> dict[str, PreparedRequest]:
    """The runnable prepared requests of `providers`; the others are added to `skipped`."""
    ready: dict[str, PreparedRequest] = {}
    for provider in providers:
        prepared = inputs.prepare(provider, inputs.request)
        problem = _unrunnable(prepared)
        if problem is not None:
            skipped.append(problem)
        else:
            ready[provider] = prepared
    return ready


def _order_key(policy: RoutingPolicy, provider: str, prepared: PreparedRequest, inputs: _Inputs) -> tuple[Any, ...]:
    priority = -inputs.priority(provider)
    if policy is RoutingPolicy.CHEAPEST:
        assert prepared.estimate is not None
        return (prepared.estimate.micro_usd, priority, provider)
    if policy is RoutingPolicy.FASTEST:
        p50 = inputs.latency.get(provider)
        return (p50 is None, p50 if p50 is not None else 0.0, priority, provider)
    return (priority, provider)


def _why(policy: RoutingPolicy, provider: str, prepared: PreparedRequest, inputs: _Inputs) -> str:
    if policy is RoutingPolicy.CHEAPEST:
        assert prepared.estimate is not None
        return f"cheapest order: {format_usd(prepared.estimate.micro_usd)} at its own parameters"
    if policy is RoutingPolicy.FASTEST:
        p50 = inputs.latency.get(provider)
        return "fastest order: " + (f"recent p50 {p50:.2f} s" if p50 is not None else "no recent latency (last)")
    return f"priority {inputs.priority(provider)}"


def _policy_and_name(inputs: _Inputs, notes: list[str]) -> tuple[RoutingPolicy, str | None]:
    request, settings = inputs.request, inputs.snapshot.global_settings.settings
    raw = request.provider
    named = raw.strip() if isinstance(raw, str) and raw.strip() else None
    if named is not None and named not in PROVIDERS:
        message = f"unknown provider {named!r}; known providers: {', '.join(PROVIDERS)}"
        raise InvalidInput(message, {"provider": message})
    policy = RoutingPolicy.parse(request.policy if request.policy is not None else settings.routing_policy)
    if policy is RoutingPolicy.EXPLICIT and named is None:
        named = next((pid for pid, s in inputs.providers.items() if s.is_default and s.active), None)
        if named is None:
            message = "explicit routing needs a provider: name one, or make one the default provider"
            raise InvalidInput(message, {"provider": message})
        notes.append(f"{named} runs first as the default provider (explicit routing)")
    return policy, named


def plan_route(
    request: RouteRequest,
    snapshot: SettingsSnapshot,
    *,
    prepare: Preparer,
    breakers: Mapping[str, BreakerView] | None = None,
    latency_p50_s: Mapping[str, float | None] | None = None,
    modes: Mapping[str, ConnectionMode] | None = None,
    now: datetime | None = None,
) -> RoutePlan:
    """The ordered providers this request may run on, each prepared at its own settings and price, and every
    other provider with the reason it was left out. See the module doc for the rules.

    `snapshot`: the settings and prices (core.generation.snapshot, cached by the service). `prepare`: prepares
    the request for one provider (`snapshot_preparer`, or prepare() on a session, or a fake). `breakers`
    (core.generation.breaker.snapshot() or `BreakerStatus`) and `latency_p50_s` (seconds) are keyed by provider;
    missing means closed / unknown. `modes`: each provider's connection mode in this process (default: the
    registry's). Raises InvalidInput for an unknown provider or policy, or the explicit policy with no provider
    named and no active default provider."""
    inputs = _Inputs(
        request=request,
        snapshot=snapshot,
        providers=snapshot.routing_settings(),
        prepare=prepare,
        breakers=breakers or {},
        latency=latency_p50_s or {},
        modes=_current_modes() if modes is None else modes,
        now=_utc(now) or datetime.now(UTC),
    )
    notes: list[str] = []
    policy, named = _policy_and_name(inputs, notes)
    order_policy = RoutingPolicy.PRIORITY if policy is RoutingPolicy.EXPLICIT else policy
    fallback_allowed = (
        request.allow_fallback
        if request.allow_fallback is not None
        else snapshot.global_settings.settings.fallback_enabled
    )
    fallback_off = "fallback is off " + (
        "for this request" if request.allow_fallback is not None else "in the global settings"
    )

    # 1-3: settings, flags and prices, without preparing anything.
    skipped: list[Skipped] = []
    eligible: list[str] = []
    for provider in PROVIDERS:
        if named is not None and provider != named and not fallback_allowed:
            skipped.append(Skipped(provider, SkipReason.FALLBACK_OFF, f"{fallback_off}; only {named} runs"))
            continue
        reason = _static_skip(provider, provider == named, inputs)
        if reason is not None:
            skipped.append(reason)
        else:
            eligible.append(provider)

    # 4-5: prepare the providers whose breakers let requests through; the open ones only if none of those can run.
    open_ones = [p for p in eligible if _is_open(inputs.breaker(p), inputs.now)]
    ready = _prepare_all([p for p in eligible if p not in open_ones], inputs, skipped)
    last_resort: str | None = None
    if ready:
        skipped.extend(Skipped(p, SkipReason.BREAKER_OPEN, _open_detail(inputs.breaker(p))) for p in open_ones)
    else:
        runnable_open = _prepare_all(open_ones, inputs, skipped)
        if runnable_open:
            last_resort = min(runnable_open, key=lambda p: (*_probe_order(inputs.breaker(p)), p))
            ready[last_resort] = runnable_open[last_resort]
            notes.append(
                f"every eligible provider's circuit breaker is open; trying {last_resort}, the one most likely to "
                f"have recovered (next probe at {_time(inputs.breaker(last_resort).next_probe_at)})"
            )
        skipped.extend(
            Skipped(p, SkipReason.BREAKER_OPEN, _open_detail(inputs.breaker(p)))
            for p in runnable_open
            if p != last_resort
        )

    # 6-7: order, the named provider first; without fallback only the first runs.
    ordered = sorted(ready, key=lambda p: _order_key(order_policy, p, ready[p], inputs))
    if named in ready:
        ordered.remove(named)
        ordered.insert(0, named)
    elif named is not None and ordered:
        why_not = next((s.detail for s in skipped if s.provider == named), "it cannot run")
        notes.append(f"{named} was named but is left out ({why_not}); the others run in its place")
    if not fallback_allowed and len(ordered) > 1:
        skipped.extend(
            Skipped(p, SkipReason.FALLBACK_OFF, f"{fallback_off}; only {ordered[0]} runs") for p in ordered[1:]
        )
        ordered = ordered[:1]

    candidates: list[Candidate] = []
    for provider in ordered:
        breaker = inputs.breaker(provider)
        if provider == named:
            why = "named in the request" if request.provider else "the default provider (explicit routing)"
        else:
            why = _why(order_policy, provider, ready[provider], inputs)
        if provider == last_resort:
            why += f"; breaker open, kept as the most likely to have recovered: {_open_detail(breaker)}"
        else:
            why += _breaker_note(breaker, inputs.now)
        candidates.append(
            Candidate(
                provider,
                ready[provider],
                why,
                breaker,
                inputs.latency.get(provider),
                last_resort=provider == last_resort,
            )
        )

    return RoutePlan(
        policy=order_policy if named is None else RoutingPolicy.EXPLICIT,
        fallback_order=order_policy,
        provider=named,
        fallback_allowed=fallback_allowed,
        candidates=tuple(candidates),
        skipped=tuple(skipped),
        notes=tuple(notes),
    )
