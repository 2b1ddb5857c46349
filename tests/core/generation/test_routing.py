"""Routing (core.generation.routing): which providers a request may run on, in which order, and why the others
are left out. Table-driven rules on a fake preparer, then the real catalog, prepare() and adapters' translate()
on both databases."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ErrorClass, InvalidInput
from core import price_store, settings_service
from core.catalog import PROVIDERS
from core.generation import breaker
from core.generation.prepare import PreparedRequest, prepare
from core.generation.routing import (
    BreakerState,
    BreakerStatus,
    BreakerView,
    RoutePlan,
    RouteRequest,
    RoutingPolicy,
    SkipReason,
    plan_route,
    snapshot_preparer,
)
from core.generation.snapshot import SettingsSnapshot, VersionVector, load_snapshot
from core.price_store import PriceVersionView
from core.pricing import CostEstimate, estimate_cost, load_default_prices
from core.providers.base import AdapterRequest, ConnectionMode, ProviderAdapter, Translation
from core.providers.registry import EMULATOR_URL_ENV, build_adapter
from core.security import Actor
from core.seed import seed_defaults
from core.settings import GlobalSettings, ProviderSettings, RoutingPolicyName
from core.settings_service import GlobalSettingsView, ProviderSettingsView
from db.engine import transaction
from tests.dbfixtures import *  # noqa: F403

NOW = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)
LIVE = {pid: ConnectionMode.LIVE for pid in PROVIDERS}
OFFLINE = {pid: ConnectionMode.SANDBOX for pid in PROVIDERS}
DEFAULT_PRICES = load_default_prices().prices
COSTS = {"fal-qwen": 20_000, "ideogram": 60_000, "huggingface": 10_000, "qwen": 0, "sandbox": 0}
PROMPT = "a red fox in snow"


# --------------------------------------------------------------------------------------------------------------
# A fake preparer and snapshot: the rules without a database


def _price(provider: str) -> PriceVersionView:
    return PriceVersionView(
        id=100 + list(PROVIDERS).index(provider),
        provider=provider,
        version=1,
        price=DEFAULT_PRICES[provider],
        created_by_name="test",
        created_at=NOW,
        comment=None,
    )


@dataclass
class FakePreparer:
    """Prepares at fixed costs; `refuse` gives providers field errors, `unpriceable` ones no estimate."""

    costs: Mapping[str, int] = field(default_factory=lambda: dict(COSTS))
    refuse: Mapping[str, dict[str, str]] = field(default_factory=dict)
    unpriceable: frozenset[str] = frozenset()
    calls: list[str] = field(default_factory=list)

    def __call__(self, provider: str, request: RouteRequest, /) -> PreparedRequest:
        self.calls.append(provider)
        errors = self.refuse.get(provider)
        estimate = None
        if provider not in self.unpriceable:
            micros = self.costs[provider]
            estimate = CostEstimate(
                provider=provider,
                micro_usd=micros,
                exact_usd=Decimal(micros) / 1_000_000,
                units=Decimal(1),
                unit="image",
                breakdown=[],
                price_source="test",
                effective_date=date(2026, 1, 1),
            )
        return PreparedRequest(
            provider=provider,
            settings=None,
            global_settings_version=1,
            effective=None,
            request=None if errors else AdapterRequest(request.prompt, dict(request.overrides)),
            translation=None if errors else Translation({"prompt": request.prompt}, (f"{provider} translated",)),
            price=_price(provider),
            estimate=estimate,
            error=f"{provider} cannot serve this request" if errors else None,
            field_errors=errors,
            problems=() if estimate else ("cannot price these settings: test",),
        )


def _snapshot(
    global_settings: Mapping[str, Any] | None = None,
    providers: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    unconfigured: tuple[str, ...] = (),
    unpriced: tuple[str, ...] = (),
    invalid: Mapping[str, str] | None = None,
) -> SettingsSnapshot:
    """A snapshot as core.generation.snapshot loads it: `unconfigured` providers deleted, `invalid` ones with
    stored settings that no longer validate, `unpriced` ones without a price."""
    changes, invalid = providers or {}, invalid or {}
    stored = {
        pid: ProviderSettingsView(pid, 1, ProviderSettings(provider=pid, **changes.get(pid, {})), NOW, "test", None)
        for pid in PROVIDERS
        if pid not in unconfigured and pid not in invalid
    }
    return SettingsSnapshot(
        vector=VersionVector(1, len(stored), len(stored), len(PROVIDERS), len(PROVIDERS), NOW.date()),
        global_settings=GlobalSettingsView(1, GlobalSettings(**(global_settings or {})), NOW, "test", None),
        stored=stored,
        deleted=frozenset(unconfigured),
        invalid=invalid,
        prices={pid: _price(pid) for pid in PROVIDERS if pid not in unpriced},
    )


def _check_every_provider_accounted_for(plan: RoutePlan) -> None:
    chosen = list(plan.providers)
    left_out = [s.provider for s in plan.skipped]
    assert sorted(chosen + left_out) == sorted(PROVIDERS), "each provider is a candidate or skipped, once"
    for s in plan.skipped:
        assert s.message.startswith(f"{s.provider} skipped: ") and len(s.detail) > 10
    for c in plan.candidates:
        assert c.why


def _plan(
    request: RouteRequest | None = None,
    snapshot: SettingsSnapshot | None = None,
    *,
    preparer: FakePreparer | None = None,
    breakers: Mapping[str, BreakerView] | None = None,
    latency: Mapping[str, float | None] | None = None,
    modes: Mapping[str, ConnectionMode] = LIVE,
) -> RoutePlan:
    plan = plan_route(
        request or RouteRequest(PROMPT),
        snapshot or _snapshot(),
        prepare=preparer or FakePreparer(),
        breakers=breakers,
        latency_p50_s=latency,
        modes=modes,
        now=NOW,
    )
    _check_every_provider_accounted_for(plan)
    return plan


def _open(in_s: float, reason: str = "5 failures in a row") -> BreakerStatus:
    return BreakerStatus(BreakerState.OPEN, next_probe_at=NOW + timedelta(seconds=in_s), reason=reason, since=NOW)


HALF_OPEN = BreakerStatus(BreakerState.HALF_OPEN)
P, S = SkipReason, None  # short names for the table
AUTO = {"ideogram": P.PREMIUM, "sandbox": P.SANDBOX}
"""What automatic routing leaves out with the default settings, in a process with live providers."""


def _case(
    name: str,
    providers: tuple[str, ...],
    skipped: Mapping[str, SkipReason],
    *,
    request: Mapping[str, Any] | None = None,
    snapshot: Mapping[str, Any] | None = None,
    preparer: Mapping[str, Any] | None = None,
    breakers: Mapping[str, BreakerView] | None = None,
    latency: Mapping[str, float | None] | None = None,
    modes: Mapping[str, ConnectionMode] = LIVE,
) -> Any:
    return pytest.param(
        request or {}, snapshot or {}, preparer or {}, breakers, latency, modes, providers, skipped, id=name
    )


# fmt: off
RULES = [
    # name, the candidates in order, the providers left out and why; then what differs from the defaults
    _case("priority: higher first; premium and sandbox left out", ("fal-qwen", "qwen", "huggingface"), AUTO),
    _case("priority ties broken by id", ("fal-qwen", "huggingface", "qwen"), AUTO,
          snapshot={"providers": {"huggingface": {"priority": 98}}}),
    _case("premium enabled globally and for the provider: routed", ("ideogram", "fal-qwen", "qwen", "huggingface"),
          {"sandbox": P.SANDBOX}, snapshot={"global_settings": {"premium_in_auto_routing": True},
                                            "providers": {"ideogram": {"auto_routing": True}}}),
    _case("premium enabled globally, the provider's auto_routing off", ("fal-qwen", "qwen", "huggingface"),
          {"ideogram": P.AUTO_ROUTING_OFF, "sandbox": P.SANDBOX},
          snapshot={"global_settings": {"premium_in_auto_routing": True}}),
    _case("premium provider's auto_routing on is not enough", ("fal-qwen", "qwen", "huggingface"), AUTO,
          snapshot={"providers": {"ideogram": {"auto_routing": True}}}),
    _case("premium named: first, the others as fallbacks", ("ideogram", "fal-qwen", "qwen", "huggingface"),
          {"sandbox": P.SANDBOX}, request={"provider": "ideogram"}),
    _case("auto_routing off: left out", ("fal-qwen", "huggingface"), {**AUTO, "qwen": P.AUTO_ROUTING_OFF},
          snapshot={"providers": {"qwen": {"auto_routing": False}}}),
    _case("auto_routing off but named: first", ("qwen", "fal-qwen", "huggingface"), AUTO,
          request={"provider": "qwen"}, snapshot={"providers": {"qwen": {"auto_routing": False}}}),
    _case("inactive: left out", ("fal-qwen", "qwen"), {**AUTO, "huggingface": P.INACTIVE},
          snapshot={"providers": {"huggingface": {"active": False}}}),
    _case("inactive even when named: the others run", ("fal-qwen", "qwen"), {**AUTO, "huggingface": P.INACTIVE},
          request={"provider": "huggingface"}, snapshot={"providers": {"huggingface": {"active": False}}}),
    _case("settings deleted: not configured", ("qwen", "huggingface"), {**AUTO, "fal-qwen": P.NOT_CONFIGURED},
          snapshot={"unconfigured": ("fal-qwen",)}),
    _case("stored settings that no longer validate", ("fal-qwen", "qwen"),
          {**AUTO, "huggingface": P.INVALID_SETTINGS},
          snapshot={"invalid": {"huggingface": "stored settings version 3 no longer pass validation"}}),
    _case("no price in force", ("fal-qwen", "qwen"), {**AUTO, "huggingface": P.NO_PRICE},
          snapshot={"unpriced": ("huggingface",)}),
    _case("cannot serve: field errors from resolve/translate", ("fal-qwen", "huggingface"),
          {**AUTO, "qwen": P.CANNOT_SERVE},
          preparer={"refuse": {"qwen": {"negative_prompt": "unknown parameter 'negative_prompt' for qwen"}}}),
    _case("cannot price these parameters", ("fal-qwen", "qwen"), {**AUTO, "huggingface": P.CANNOT_PRICE},
          preparer={"unpriceable": frozenset({"huggingface"})}),
    _case("cheapest: by each one's own estimate", ("qwen", "huggingface", "fal-qwen"), AUTO,
          request={"policy": "cheapest"}),
    _case("cheapest ties: higher priority, then id", ("fal-qwen", "huggingface", "qwen"), AUTO,
          request={"policy": "Cheapest"}, snapshot={"providers": {"huggingface": {"priority": 98}}},
          preparer={"costs": {**COSTS, "huggingface": 5, "fal-qwen": 5, "qwen": 7}}),
    _case("cheapest from the global settings", ("qwen", "huggingface", "fal-qwen"), AUTO,
          snapshot={"global_settings": {"routing_policy": "cheapest"}}),
    _case("cheapest with a provider named: it first, the rest cheapest", ("fal-qwen", "qwen", "huggingface"), AUTO,
          request={"policy": "cheapest", "provider": "fal-qwen"}),
    _case("fastest: lowest p50 first, unknown last", ("huggingface", "fal-qwen", "qwen"), AUTO,
          request={"policy": "fastest"}, latency={"huggingface": 0.8, "fal-qwen": 2.5, "qwen": None}),
    _case("fastest: unknown ones by priority", ("qwen", "fal-qwen", "huggingface"), AUTO,
          request={"policy": "fastest"}, latency={"qwen": 9.0}),
    _case("explicit: named first, others by priority", ("huggingface", "fal-qwen", "qwen"), AUTO,
          request={"provider": "huggingface", "policy": "explicit"}),
    _case("explicit without fallback: the named one only", ("huggingface",),
          {p: P.FALLBACK_OFF for p in PROVIDERS if p != "huggingface"},
          request={"provider": "huggingface", "allow_fallback": False}),
    _case("explicit, fallback off globally", ("huggingface",),
          {p: P.FALLBACK_OFF for p in PROVIDERS if p != "huggingface"},
          request={"provider": "huggingface"}, snapshot={"global_settings": {"fallback_enabled": False}}),
    _case("explicit, the request allows what the global settings do not", ("huggingface", "fal-qwen", "qwen"),
          AUTO, request={"provider": "huggingface", "allow_fallback": True},
          snapshot={"global_settings": {"fallback_enabled": False}}),
    _case("explicit policy without a name: the default provider", ("qwen", "fal-qwen", "huggingface"), AUTO,
          request={"policy": "explicit"}, snapshot={"providers": {"qwen": {"is_default": True}}}),
    _case("automatic routing with fallback off: only the first", ("fal-qwen",),
          {**AUTO, "qwen": P.FALLBACK_OFF, "huggingface": P.FALLBACK_OFF},
          snapshot={"global_settings": {"fallback_enabled": False}}),
    _case("open breaker: left out; half-open stays", ("qwen", "huggingface"), {**AUTO, "fal-qwen": P.BREAKER_OPEN},
          breakers={"fal-qwen": _open(30), "qwen": HALF_OPEN}),
    _case("open breaker due for a probe stays", ("fal-qwen", "qwen", "huggingface"), AUTO,
          breakers={"fal-qwen": _open(-1)}),
    _case("every breaker open: the earliest probe is kept", ("huggingface",),
          {**AUTO, "fal-qwen": P.BREAKER_OPEN, "qwen": P.BREAKER_OPEN},
          breakers={"fal-qwen": _open(30), "qwen": _open(20), "huggingface": _open(10)}),
    _case("every breaker open: an unknown probe time counts as latest", ("qwen",),
          {**AUTO, "fal-qwen": P.BREAKER_OPEN, "huggingface": P.BREAKER_OPEN},
          breakers={"fal-qwen": _open(30), "qwen": _open(20), "huggingface": BreakerStatus(BreakerState.OPEN)}),
    _case("every breaker open: the earliest that can serve", ("qwen",),
          {**AUTO, "fal-qwen": P.BREAKER_OPEN, "huggingface": P.CANNOT_SERVE},
          breakers={"fal-qwen": _open(30), "qwen": _open(20), "huggingface": _open(10)},
          preparer={"refuse": {"huggingface": {"image_size": "too big"}}}),
    _case("named one open, others fine: the others run", ("qwen", "huggingface"),
          {**AUTO, "fal-qwen": P.BREAKER_OPEN}, request={"provider": "fal-qwen"}, breakers={"fal-qwen": _open(30)}),
    _case("named one open without fallback: still tried", ("fal-qwen",),
          {p: P.FALLBACK_OFF for p in PROVIDERS if p != "fal-qwen"},
          request={"provider": "fal-qwen", "allow_fallback": False}, breakers={"fal-qwen": _open(30)}),
    _case("open breakers ignored by cost: cheapest of the rest", ("huggingface", "fal-qwen"),
          {**AUTO, "qwen": P.BREAKER_OPEN}, request={"policy": "cheapest"}, breakers={"qwen": _open(5)}),
    _case("no provider connected: the sandbox joins, last", ("fal-qwen", "qwen", "huggingface", "sandbox"),
          {"ideogram": P.PREMIUM}, modes=OFFLINE),
    _case("one provider on the emulator: the sandbox stays out", ("fal-qwen", "qwen", "huggingface"), AUTO,
          modes={**OFFLINE, "qwen": ConnectionMode.EMULATOR}),
    _case("the sandbox named: it runs", ("sandbox", "fal-qwen", "qwen", "huggingface"), {"ideogram": P.PREMIUM},
          request={"provider": "sandbox"}),
]
# fmt: on


@pytest.mark.parametrize(
    ("request_kw", "snapshot_kw", "preparer_kw", "breakers", "latency", "modes", "providers", "skipped"), RULES
)
def test_routing_rules(
    request_kw: dict[str, Any],
    snapshot_kw: dict[str, Any],
    preparer_kw: dict[str, Any],
    breakers: Mapping[str, BreakerView] | None,
    latency: Mapping[str, float | None] | None,
    modes: Mapping[str, ConnectionMode],
    providers: tuple[str, ...],
    skipped: Mapping[str, SkipReason],
) -> None:
    plan = _plan(
        RouteRequest(PROMPT, **request_kw),
        _snapshot(**snapshot_kw),
        preparer=FakePreparer(**preparer_kw),
        breakers=breakers,
        latency=latency,
        modes=modes,
    )
    assert plan.providers == providers
    assert {s.provider: s.reason for s in plan.skipped} == skipped


def test_reasons_are_written_for_people() -> None:
    plan = _plan(
        RouteRequest(PROMPT, policy="fastest"),
        preparer=FakePreparer(refuse={"qwen": {"num_images": "num_images 4 is above qwen's maximum of 1"}}),
        breakers={"fal-qwen": _open(30, "failure rate 60% over the last 20 requests")},
    )
    messages = {s.provider: s.message for s in plan.skipped}
    assert messages == {
        "ideogram": "ideogram skipped: premium providers are used only when named or enabled in the global settings "
        "(premium_in_auto_routing)",
        "sandbox": "sandbox skipped: the offline sandbox renders placeholders, so it runs only when named or when no "
        "provider is connected (live or emulator)",
        "qwen": "qwen skipped: cannot serve this request: num_images 4 is above qwen's maximum of 1",
        "fal-qwen": "fal-qwen skipped: its circuit breaker is open since 2026-11-05 12:00:00 UTC (failure rate 60% "
        "over the last 20 requests); next probe at 2026-11-05 12:00:30 UTC",
    }
    assert plan.providers == ("huggingface",)
    assert plan.candidates[0].why == "fastest order: no recent latency (last)"
    inactive = _plan(snapshot=_snapshot(providers={"huggingface": {"active": False}}))
    assert [s.message for s in inactive.skipped if s.provider == "huggingface"] == [
        "huggingface skipped: deactivated in its settings"
    ]
    deleted = _plan(snapshot=_snapshot(unconfigured=("huggingface",), unpriced=("qwen",)))
    assert [s.message for s in deleted.skipped if s.provider in ("huggingface", "qwen")] == [
        "huggingface skipped: not configured: its settings were deleted (roll them back to use it again)",
        "qwen skipped: no price in force (an unpriced provider is never free, so never run)",
    ]


def test_every_open_breaker_says_which_one_is_tried_and_why() -> None:
    plan = _plan(breakers={"fal-qwen": _open(30), "qwen": _open(20), "huggingface": _open(10)})
    (candidate,) = plan.candidates
    assert "kept as the most likely to have recovered" in candidate.why
    assert plan.notes == (
        "every eligible provider's circuit breaker is open; trying huggingface, the one most likely to have "
        "recovered (next probe at 2026-11-05 12:00:10 UTC)",
    )


def test_open_breakers_are_not_prepared_when_another_provider_can_run() -> None:
    preparer = FakePreparer()
    _plan(preparer=preparer, breakers={"fal-qwen": _open(30)})
    assert sorted(preparer.calls) == ["huggingface", "qwen"]


def test_providers_left_out_early_are_never_prepared() -> None:
    preparer = FakePreparer()
    _plan(
        RouteRequest(PROMPT, provider="qwen", allow_fallback=False),
        _snapshot(unpriced=("huggingface",)),
        preparer=preparer,
    )
    assert preparer.calls == ["qwen"]


def test_a_breaker_time_from_sqlite_without_a_zone_is_read_as_utc() -> None:
    naive = BreakerStatus(BreakerState.OPEN, next_probe_at=(NOW + timedelta(seconds=5)).replace(tzinfo=None))
    assert _plan(breakers={"fal-qwen": naive}).providers == ("qwen", "huggingface")
    due = BreakerStatus(BreakerState.OPEN, next_probe_at=(NOW - timedelta(seconds=5)).replace(tzinfo=None))
    assert _plan(breakers={"fal-qwen": due}).providers == ("fal-qwen", "qwen", "huggingface")


def test_half_open_and_due_breakers_say_so() -> None:
    plan = _plan(breakers={"qwen": HALF_OPEN, "huggingface": _open(-1)})
    whys = {c.provider: c.why for c in plan.candidates}
    assert whys["fal-qwen"] == "priority 98"
    assert whys["qwen"] == "priority 95; breaker half-open (runs if it gets the probe)"
    assert whys["huggingface"] == "priority 90; breaker open but due for a probe"


def test_a_candidate_carries_its_own_request_translation_price_version_and_estimate() -> None:
    plan = _plan(RouteRequest(PROMPT, policy="cheapest", overrides={"seed": 3}))
    first = plan.candidates[0]
    assert (first.provider, first.estimate_micro_usd, first.price_version_id) == ("qwen", 0, _price("qwen").id)
    assert first.request.params == {"seed": 3} and first.notes == ("qwen translated",)
    assert [c.estimate_micro_usd for c in plan.candidates] == [0, 10_000, 20_000]
    assert plan.next_after("qwen") is plan.candidates[1] and plan.next_after("fal-qwen") is None
    assert plan.candidate("ideogram") is None


def test_no_candidate_refuses_naming_every_provider_and_its_field_errors() -> None:
    refuse = {p: {"image_size": f"{p} cannot render 9000x9000"} for p in PROVIDERS}
    plan = _plan(preparer=FakePreparer(refuse=refuse))
    refusal = plan.refusal()
    assert isinstance(refusal, InvalidInput)
    assert str(refusal).startswith("no provider can run this request: ")
    for p in PROVIDERS:
        assert f"{p} skipped: " in str(refusal)
    assert refusal.field_errors["fal-qwen.image_size"] == "fal-qwen cannot render 9000x9000"
    assert "provider" in refusal.field_errors


def test_a_named_provider_alone_refuses_with_its_own_field_errors() -> None:
    plan = _plan(
        RouteRequest(PROMPT, provider="qwen", allow_fallback=False),
        preparer=FakePreparer(refuse={"qwen": {"negative_prompt": "qwen has no negative prompt"}}),
    )
    refusal = plan.refusal()
    assert refusal is not None and refusal.field_errors["negative_prompt"] == "qwen has no negative prompt"
    assert _plan().refusal() is None


@pytest.mark.parametrize(
    ("request_kw", "snapshot", "field_name", "phrase"),
    [
        ({"provider": "dall-e"}, _snapshot(), "provider", "unknown provider 'dall-e'"),
        ({"policy": "random"}, _snapshot(), "policy", "unknown routing policy 'random'"),
        ({"policy": "explicit"}, _snapshot(), "provider", "explicit routing needs a provider"),
        (
            {},
            _snapshot({"routing_policy": "explicit"}, {"qwen": {"is_default": True, "active": False}}),
            "provider",
            "explicit routing needs a provider",
        ),
    ],
    ids=["unknown provider", "unknown policy", "explicit without a default", "inactive default"],
)
def test_requests_routing_cannot_understand_are_refused(
    request_kw: dict[str, Any], snapshot: SettingsSnapshot, field_name: str, phrase: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        _plan(RouteRequest(PROMPT, **request_kw), snapshot)
    assert phrase in info.value.field_errors[field_name]


def test_the_policies_and_the_global_setting_name_the_same_values() -> None:
    assert {p.value for p in RoutingPolicy} == set(typing.get_args(RoutingPolicyName))
    assert RoutingPolicy.parse(" FASTEST ") is RoutingPolicy.FASTEST


def test_plan_names_policy_and_fallback_order() -> None:
    named = _plan(RouteRequest(PROMPT, provider="qwen", policy="cheapest"))
    assert (named.policy, named.fallback_order, named.provider) == (
        RoutingPolicy.EXPLICIT,
        RoutingPolicy.CHEAPEST,
        "qwen",
    )
    auto = _plan(RouteRequest(PROMPT, policy="fastest"))
    assert (auto.policy, auto.fallback_order, auto.provider) == (RoutingPolicy.FASTEST, RoutingPolicy.FASTEST, None)
    default = _plan(
        RouteRequest(PROMPT), _snapshot({"routing_policy": "explicit"}, {"huggingface": {"is_default": True}})
    )
    assert (default.policy, default.fallback_order, default.provider) == (
        RoutingPolicy.EXPLICIT,
        RoutingPolicy.PRIORITY,
        "huggingface",
    )
    assert default.candidates[0].why == "the default provider (explicit routing)"
    assert len(default.describe()) == len(PROVIDERS) + len(default.notes)


# --------------------------------------------------------------------------------------------------------------
# The real catalog, prepare() and the adapters' translate() on both databases

SYSTEM = Actor.system("routing-test")


@pytest.fixture
def seeded(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    seed_defaults(db_session_factory)
    return db_session_factory


@pytest.fixture
def adapters(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ProviderAdapter]]:
    """Each provider's real adapter, pointed at an emulator address nobody listens on: translate() sends
    nothing, and nothing here generates."""
    monkeypatch.setenv(EMULATOR_URL_ENV, "http://127.0.0.1:9")
    built = {pid: build_adapter(pid) for pid in PROVIDERS}
    yield built

    async def close() -> None:
        for adapter in built.values():
            await adapter.aclose()

    asyncio.run(close())


EMULATED = {pid: ConnectionMode.EMULATOR for pid in PROVIDERS if pid != "sandbox"} | {"sandbox": ConnectionMode.SANDBOX}


def _db_plan(
    factory: sessionmaker[Session],
    adapters: Mapping[str, ProviderAdapter],
    request: RouteRequest,
    breakers: Mapping[str, BreakerView] | None = None,
    *,
    on_session: bool = False,
) -> RoutePlan:
    """A plan from the database: the snapshot the service caches, and prepare() on it (or, `on_session`,
    prepare() reading the session itself, as test-provider does)."""

    with factory() as session:

        def on_the_session(provider: str, req: RouteRequest, /) -> PreparedRequest:
            return prepare(
                session,
                provider,
                prompt=req.prompt,
                preset=req.preset,
                overrides=req.overrides,
                negative_prompt=req.negative_prompt,
                adapter=adapters[provider],
            )

        snapshot = load_snapshot(session, NOW.date())
        plan = plan_route(
            request,
            snapshot,
            prepare=on_the_session if on_session else snapshot_preparer(snapshot, adapters.get),
            breakers=breakers,
            modes=EMULATED,
            now=NOW,
        )
    _check_every_provider_accounted_for(plan)
    return plan


@pytest.mark.parametrize("on_session", [False, True], ids=["snapshot", "session"])
def test_cheapest_prices_every_candidate_at_its_own_translated_parameters(
    seeded: sessionmaker[Session], adapters: dict[str, ProviderAdapter], on_session: bool
) -> None:
    with transaction(seeded) as session:
        settings_service.save_global_settings(session, SYSTEM, {"premium_in_auto_routing": True})
        settings_service.update_provider_settings(session, SYSTEM, "ideogram", {"auto_routing": True})
        settings_service.update_provider_settings(session, SYSTEM, "huggingface", {"params": {"num_images": 3}})
    request = RouteRequest(PROMPT, overrides={"image_size": "1024x768"}, policy="cheapest")
    plan = _db_plan(seeded, adapters, request, on_session=on_session)

    # Priced at the first provider's parameters (one 1024x768 image), huggingface ($0.01/MP) would come before
    # fal-qwen ($0.02/MP); at its own (three images, from its settings) it costs more.
    assert plan.providers == ("qwen", "fal-qwen", "huggingface", "ideogram")
    costs = {c.provider: c.estimate_micro_usd for c in plan.candidates}
    assert costs == {"qwen": 0, "fal-qwen": 15_729, "huggingface": 23_593, "ideogram": 60_000}
    with seeded() as session:
        prices = price_store.active_prices(session)
    for c in plan.candidates:
        own = estimate_cost(prices[c.provider].price, provider_id=c.provider, params=c.request.params)
        assert c.prepared.estimate == own and c.price_version_id == prices[c.provider].id
        assert c.translation is not None
    by = {c.provider: c for c in plan.candidates}
    assert by["huggingface"].request.params["num_images"] == 3
    assert by["qwen"].translation is not None and by["qwen"].translation.wire_params["aspect_ratio"] == "4:3"
    assert any("1024x768" in note for note in by["qwen"].notes)  # the change is said
    assert any("1024x768" in note for note in by["ideogram"].notes)

    by_priority = _db_plan(
        seeded, adapters, RouteRequest(PROMPT, overrides={"image_size": "1024x768"}), on_session=on_session
    )
    assert by_priority.providers == ("ideogram", "fal-qwen", "qwen", "huggingface")


# fmt: off
SERVE_CASES = [
    pytest.param(RouteRequest(PROMPT, negative_prompt="blurry"), {"qwen": "negative_prompt"}, id="negative prompt"),
    pytest.param(RouteRequest(PROMPT, overrides={"num_images": 4}), {"qwen": "num_images"}, id="image count"),
    pytest.param(RouteRequest(PROMPT, overrides={"num_images": 6}, provider="ideogram"),
                 {"qwen": "num_images", "fal-qwen": "num_images", "huggingface": "num_images"}, id="eight at most"),
    pytest.param(RouteRequest(PROMPT, overrides={"image_size": "4096x4096"}), {"huggingface": "image_size"},
                 id="size"),
    pytest.param(RouteRequest(PROMPT, overrides={"acceleration": "high"}),
                 {"qwen": "acceleration", "huggingface": "acceleration"}, id="a parameter only fal has"),
]
# fmt: on


@pytest.mark.parametrize(("request_", "refused"), SERVE_CASES)
def test_fallback_only_to_providers_able_to_serve_the_request(
    seeded: sessionmaker[Session],
    adapters: dict[str, ProviderAdapter],
    request_: RouteRequest,
    refused: dict[str, str],
) -> None:
    plan = _db_plan(seeded, adapters, request_)
    cannot = {s.provider: s for s in plan.skipped if s.reason is SkipReason.CANNOT_SERVE}
    assert set(cannot) == set(refused)
    for provider, field_name in refused.items():
        assert field_name in cannot[provider].field_errors
        assert cannot[provider].message.startswith(f"{provider} skipped: cannot serve this request: ")
    assert plan.candidates and not set(plan.providers) & set(refused)


def test_settings_read_from_the_database_decide(
    seeded: sessionmaker[Session], adapters: dict[str, ProviderAdapter]
) -> None:
    with transaction(seeded) as session:
        settings_service.set_provider_active(session, SYSTEM, "qwen", False)
        settings_service.delete_provider_settings(session, SYSTEM, "huggingface")
        row_id = price_store.active_prices(session)["fal-qwen"].id
        from db.models import PriceVersion

        row = session.get(PriceVersion, row_id)
        assert row is not None
        row.rule = {**row.rule, "usd_per_unit": "1E+1000"}  # a stored price that no longer validates
    plan = _db_plan(seeded, adapters, RouteRequest(PROMPT))
    reasons = {s.provider: s.reason for s in plan.skipped}
    assert reasons == {
        "qwen": SkipReason.INACTIVE,
        "huggingface": SkipReason.NOT_CONFIGURED,
        "fal-qwen": SkipReason.CANNOT_PRICE,
        "ideogram": SkipReason.PREMIUM,
        "sandbox": SkipReason.SANDBOX,
    }
    refusal = plan.refusal()
    assert refusal is not None and "fal-qwen skipped: cannot price these settings" in str(refusal)

    named = _db_plan(seeded, adapters, RouteRequest(PROMPT, provider="ideogram"))
    assert named.providers == ("ideogram",)


def test_all_open_breakers_on_the_database_keep_the_one_most_likely_to_have_recovered(
    seeded: sessionmaker[Session], adapters: dict[str, ProviderAdapter]
) -> None:
    # The real breakers, opened by one failure each, 30 s cooldown: qwen's next probe comes first, then
    # huggingface's, then fal-qwen's.
    config = breaker.BreakerConfig(consecutive_failures=1)
    with transaction(seeded) as session:
        for provider, ago in (("qwen", 29), ("huggingface", 25), ("fal-qwen", 20)):
            at = NOW - timedelta(seconds=ago)
            breaker.record_failure(session, provider, ErrorClass.UNAVAILABLE, "routing-test", at, config, message="503")
    with seeded() as session:
        breakers = breaker.snapshot(session, NOW, config)
    assert {p: str(b.state) for p, b in breakers.items() if p in ("qwen", "huggingface", "fal-qwen")} == {
        "qwen": "open",
        "huggingface": "open",
        "fal-qwen": "open",
    }
    plan = _db_plan(seeded, adapters, RouteRequest(PROMPT, negative_prompt="blurry"), breakers)
    # qwen would recover first but cannot take a negative prompt: huggingface, next; fal-qwen stays out.
    assert plan.providers == ("huggingface",) and plan.candidates[0].last_resort
    assert "next probe at 2026-11-05 12:00:05 UTC" in plan.notes[0]
    assert {s.provider: s.reason for s in plan.skipped} == {
        "fal-qwen": SkipReason.BREAKER_OPEN,
        "qwen": SkipReason.CANNOT_SERVE,
        "ideogram": SkipReason.PREMIUM,
        "sandbox": SkipReason.SANDBOX,
    }
    assert plan.candidates[0].estimate_micro_usd == 10_486  # 1024x1024 at $0.01/MP, its own default size
