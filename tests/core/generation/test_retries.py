"""The decision after a failed attempt (core.generation.retries): retry here, fall back, or stop, and why.

Table-driven; the jitter's random source is injected, so every delay is exact."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest

from common.errors import Billing, ErrorClass, ProviderError
from core.generation.retries import (
    Action,
    FailedAttempt,
    RetryDecision,
    backoff_delay,
    decide_after_failure,
    describe_attempts,
)
from core.generation.routing import Skipped, SkipReason
from core.settings import GlobalSettings, validate_global_settings

# Backoff 1 s doubling to 8 s; equal jitter with random() = 0.5 gives 3/4 of the ceiling.
SETTINGS = GlobalSettings(max_attempts=4, retries_per_provider=2, retry_backoff_s=1.0, retry_backoff_max_s=8.0)
HALF = 0.5


def _err(cls: ErrorClass, *, provider: str = "fal-qwen", retry_after_s: float | None = None) -> ProviderError:
    billing = Billing.UNKNOWN if cls is ErrorClass.TIMEOUT else Billing.NOT_BILLED
    return ProviderError(cls, f"{cls.value} happened", provider=provider, billing=billing, retry_after_s=retry_after_s)


def _decide(error: ProviderError, **kw: Any) -> RetryDecision:
    args: dict[str, Any] = {
        "attempts_so_far": 1,
        "retries_of_provider": 0,
        "remaining_s": 100.0,
        "settings": SETTINGS,
        "next_provider": "huggingface",
        "random": lambda: HALF,
    }
    args.update(kw)
    return decide_after_failure(error, **args)


def _case(
    name: str, error: ProviderError, action: Action, provider: str | None, delay: float, phrase: str, **kw: Any
) -> Any:
    return pytest.param(error, kw, action, provider, delay, phrase, id=name)


R, F, S = Action.RETRY, Action.FALLBACK, Action.STOP
UNAVAILABLE, TIMEOUT, AUTH = _err(ErrorClass.UNAVAILABLE), _err(ErrorClass.TIMEOUT), _err(ErrorClass.AUTH)
SAFETY = _err(ErrorClass.SAFETY_REJECTED)
NEXT = "huggingface"

# fmt: off
CASES = [
    # name, error, action, who runs next, delay, a phrase of the reason, decide_after_failure's arguments
    _case("unavailable: retry after backoff", UNAVAILABLE, R, "fal-qwen", 0.75,
          "retrying it in 0.75 s (backoff; retry 1 of 2)"),
    _case("second retry backs off twice as long", UNAVAILABLE, R, "fal-qwen", 1.5,
          "retrying it in 1.50 s (backoff; retry 2 of 2)", retries_of_provider=1),
    _case("bad response: retry", _err(ErrorClass.BAD_RESPONSE), R, "fal-qwen", 0.75, "may pass"),
    _case("retries used up: fall back", UNAVAILABLE, F, NEXT, 0.0,
          "its 2 retries are used up (retries_per_provider); falling back to huggingface", retries_of_provider=2),
    _case("retries used up, nobody left: stop", UNAVAILABLE, S, None, 0.0, "no other provider is left",
          retries_of_provider=2, next_provider=None),
    _case("no retries configured: fall back at once", UNAVAILABLE, F, NEXT, 0.0,
          "retries are off (retries_per_provider is 0)",
          settings=SETTINGS.model_copy(update={"retries_per_provider": 0})),
    _case("Retry-After honoured when longer than the backoff", _err(ErrorClass.RATE_LIMITED, retry_after_s=5),
          R, "fal-qwen", 5.0, "retrying it in 5.00 s (Retry-After 5 s; retry 1 of 2)"),
    _case("backoff kept when longer than Retry-After", _err(ErrorClass.RATE_LIMITED, retry_after_s=0.1),
          R, "fal-qwen", 0.75, "(backoff;"),
    _case("Retry-After beyond the deadline: fall back", _err(ErrorClass.RATE_LIMITED, retry_after_s=6),
          F, NEXT, 0.0, "waiting 6.00 s as asked (Retry-After) would not fit in the 5.00 s left", remaining_s=5.0),
    _case("Retry-After beyond the deadline, nobody left: stop", _err(ErrorClass.RATE_LIMITED, retry_after_s=6),
          S, None, 0.0, "would not fit", remaining_s=5.0, next_provider=None),
    _case("Retry-After longer than the longest backoff: fall back at once",
          _err(ErrorClass.RATE_LIMITED, retry_after_s=30), F, NEXT, 0.0, "longer than the longest backoff (8 s)"),
    _case("long Retry-After waited when it fits and nobody else is left",
          _err(ErrorClass.RATE_LIMITED, retry_after_s=30), R, "fal-qwen", 30.0, "Retry-After 30 s",
          next_provider=None),
    _case("no deadline: any Retry-After fits", _err(ErrorClass.RATE_LIMITED, retry_after_s=6), R, "fal-qwen", 6.0,
          "Retry-After 6 s", remaining_s=None),
    _case("backoff plus the attempt's time must fit", UNAVAILABLE, F, NEXT, 0.0,
          "plus 2.50 s for the attempt would not fit", remaining_s=3.0, min_attempt_s=2.5),
    _case("timeout prefers the next provider", TIMEOUT, F, NEXT, 0.0, "used a whole attempt's time"),
    _case("timeout retried when nobody else is left", TIMEOUT, R, "fal-qwen", 0.75, "retry 1 of 2",
          next_provider=None),
    _case("auth falls back, never retried", AUTH, F, NEXT, 0.0, "its key was refused"),
    _case("auth with nobody left stops", AUTH, S, None, 0.0, "no other provider is left", next_provider=None),
    _case("quota falls back, never retried", _err(ErrorClass.QUOTA_EXCEEDED, retry_after_s=1), F, NEXT, 0.0,
          "its quota is spent"),
    _case("safety does not fall back by default", SAFETY, S, None, 0.0,
          "safety rejections do not fall back unless an admin enables fallback_on_safety"),
    _case("safety falls back when the admin enabled it", SAFETY, F, NEXT, 0.0,
          "would refuse the same prompt again", settings=SETTINGS.model_copy(update={"fallback_on_safety": True})),
    _case("validation stops", _err(ErrorClass.VALIDATION), S, None, 0.0, "refused the request as invalid"),
    _case("cancelled stops", _err(ErrorClass.CANCELLED), S, None, 0.0, "cancelled"),
    _case("max_attempts reached stops", UNAVAILABLE, S, None, 0.0,
          "the 4 attempt(s) allowed (max_attempts) are used up", attempts_so_far=4),
    _case("deadline passed stops", UNAVAILABLE, S, None, 0.0, "deadline has passed", remaining_s=0.0),
]
# fmt: on


@pytest.mark.parametrize(("error", "overrides", "action", "provider", "delay", "phrase"), CASES)
def test_decision_after_a_failure(
    error: ProviderError, overrides: dict[str, Any], action: Action, provider: str | None, delay: float, phrase: str
) -> None:
    decision = _decide(error, **overrides)
    assert (decision.action, decision.provider) == (action, provider)
    assert decision.delay_s == pytest.approx(delay)
    assert phrase in decision.reason


def test_backoff_doubles_is_capped_and_jittered_between_half_and_the_ceiling() -> None:
    low, high = (lambda: 0.0), (lambda: 0.999999)
    assert [backoff_delay(n, base_s=1.0, max_s=8.0, random=low) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff_delay(3, base_s=1.0, max_s=8.0, random=high) == pytest.approx(8.0, abs=1e-5)
    rng = random.Random(7)
    delays = [backoff_delay(2, base_s=0.5, max_s=8.0, random=rng.random) for _ in range(200)]
    assert all(1.0 <= d < 2.0 for d in delays)
    assert len(set(delays)) > 100  # jittered: clients failing together do not come back together


def test_the_defaults_retry_once_then_fall_back() -> None:
    defaults = GlobalSettings()
    first = decide_after_failure(
        _err(ErrorClass.UNAVAILABLE),
        attempts_so_far=1,
        retries_of_provider=0,
        remaining_s=60.0,
        settings=defaults,
        next_provider="qwen",
        random=lambda: 0.0,
    )
    assert (first.action, first.delay_s) == (Action.RETRY, 0.25)
    second = decide_after_failure(
        _err(ErrorClass.UNAVAILABLE),
        attempts_so_far=2,
        retries_of_provider=1,
        remaining_s=60.0,
        settings=defaults,
        next_provider="qwen",
        random=lambda: 0.0,
    )
    assert (second.action, second.provider) == (Action.FALLBACK, "qwen")
    third = decide_after_failure(
        _err(ErrorClass.UNAVAILABLE, provider="qwen"),
        attempts_so_far=3,
        retries_of_provider=0,
        remaining_s=60.0,
        settings=defaults,
        next_provider="huggingface",
        random=lambda: 0.0,
    )
    assert third.action is Action.STOP and "max_attempts" in third.reason


def test_new_global_settings_validate_and_default_safely() -> None:
    defaults = GlobalSettings()
    assert (defaults.routing_policy, defaults.premium_in_auto_routing, defaults.fallback_on_safety) == (
        "priority",
        False,
        False,
    )
    assert validate_global_settings({"routing_policy": " Cheapest "}).routing_policy == "cheapest"
    with pytest.raises(Exception) as info:
        validate_global_settings({"routing_policy": "random", "retry_backoff_s": 0, "fallback_on_safety": "yes"})
    errors = getattr(info.value, "field_errors", {})
    assert set(errors) == {"routing_policy", "retry_backoff_s", "fallback_on_safety"}


def test_the_all_failed_text_lists_every_attempt_why_and_what_was_not_tried() -> None:
    e1 = ProviderError(
        ErrorClass.UNAVAILABLE, "upstream down", provider="fal-qwen", billing=Billing.NOT_BILLED, status_code=503
    )
    e2 = ProviderError(ErrorClass.TIMEOUT, "no answer in 30 s", provider="fal-qwen", billing=Billing.UNKNOWN)
    e3 = ProviderError(
        ErrorClass.BAD_RESPONSE,
        "not an image",
        provider="huggingface",
        billing=Billing.BILLED,
        billed_units=Decimal("1.05"),
    )
    d1 = _decide(e1)
    d2 = _decide(e2, attempts_so_far=2, retries_of_provider=1)
    d3 = _decide(e3, attempts_so_far=3, next_provider=None, remaining_s=0.0)
    text = describe_attempts(
        [FailedAttempt("fal-qwen", e1, d1), FailedAttempt("fal-qwen", e2, d2), FailedAttempt("huggingface", e3, d3)],
        skipped=[Skipped("ideogram", SkipReason.PREMIUM, "premium providers are used only when named")],
    )
    lines = text.splitlines()
    assert lines[0] == "all 3 attempt(s) failed:"
    assert lines[1] == (
        "  1. fal-qwen: unavailable (HTTP 503): upstream down [not billed] -> fal-qwen failed (unavailable), "
        "which may pass: retrying it in 0.75 s (backoff; retry 1 of 2)"
    )
    assert lines[2].startswith("  2. fal-qwen: timeout: no answer in 30 s [billing unknown until reconciled] -> ")
    assert lines[2].endswith("falling back to huggingface")
    assert lines[3].startswith("  3. huggingface: bad_response: not an image [billed, 1.05 units] -> stopped: ")
    assert "deadline has passed" in lines[3]
    assert lines[4:] == ["  not tried:", "  - ideogram skipped: premium providers are used only when named"]
    assert describe_attempts([]) == "no provider was tried"
    assert describe_attempts([FailedAttempt("fal-qwen", e1)]).startswith("the only attempt failed:\n  1. fal-qwen:")
