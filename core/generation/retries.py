"""After a failed attempt: retry the same provider, fall back to the next candidate, or stop. Pure logic.

The decision, in this order (the first rule that applies wins):
1. cancelled: stop (the caller asked for it).
2. validation: stop. Every candidate's translate() accepted the request before it ran, so a provider refusing
   it says the request is wrong as sent; another attempt would send the same thing.
3. safety rejection: stop, unless the admin turned on `fallback_on_safety` (then fall back, never retry the
   same provider: it would refuse the same prompt again).
4. `max_attempts` reached, or the request's deadline passed: stop.
5. Retry the same provider, for transient failures only (rate limited, unavailable, bad response, timeout),
   at most `retries_per_provider` times, after an exponential backoff with jitter (`retry_backoff_s` doubling
   up to `retry_backoff_max_s`) that is never shorter than the provider's Retry-After, and only when the wait
   plus the least time an attempt needs still fits before the deadline. A timeout prefers the next provider
   when there is one (the provider just spent a whole attempt's deadline), and so does a Retry-After longer
   than the longest backoff (another provider now beats waiting).
6. Otherwise fall back to the next candidate of the route (the plan holds only providers fallback may use:
   none when fallback is off). Auth and quota failures go straight here: that provider's key or quota is spent,
   another provider's is not.
7. Otherwise stop, saying why.

`describe_attempts` writes the final "all failed" text: every attempt, what went wrong and what was decided.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from common.errors import Billing, ErrorClass, ProviderError
from core.generation.routing import Skipped
from core.settings import GlobalSettings

RETRY_HERE: frozenset[ErrorClass] = frozenset(
    {ErrorClass.RATE_LIMITED, ErrorClass.UNAVAILABLE, ErrorClass.BAD_RESPONSE, ErrorClass.TIMEOUT}
)
"""Failures that may pass if the same provider is asked again a moment later."""

PREFER_FALLBACK: frozenset[ErrorClass] = frozenset({ErrorClass.TIMEOUT})
"""Retried at the same provider only when no other candidate is left."""


class Action(StrEnum):
    RETRY = "retry"
    FALLBACK = "fallback"
    STOP = "stop"


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    reason: str
    """Why, in words a person can read."""
    provider: str | None = None
    """Who runs next: the same provider (retry), the next candidate (fallback); None when stopping."""
    delay_s: float = 0.0
    """How long to wait before the next attempt (retries only)."""

    @property
    def summary(self) -> str:
        """The reason, saying what happens next (retry and fallback reasons say it already)."""
        return f"stopped: {self.reason}" if self.action is Action.STOP else self.reason


def backoff_delay(
    retry_number: int, *, base_s: float, max_s: float, random: Callable[[], float] = _random.random
) -> float:
    """The wait before retry `retry_number` (0 = the first): base x 2^n capped at max, with "equal jitter"
    (half fixed, half random), so clients failing together do not come back together and never at once."""
    ceiling = min(max_s, base_s * 2.0 ** max(0, retry_number))
    return ceiling / 2 + random() * ceiling / 2


def _fits(delay_s: float, min_attempt_s: float, remaining_s: float | None) -> bool:
    return remaining_s is None or delay_s + min_attempt_s < remaining_s


def decide_after_failure(
    error: ProviderError,
    *,
    attempts_so_far: int,
    retries_of_provider: int,
    remaining_s: float | None,
    settings: GlobalSettings,
    next_provider: str | None,
    min_attempt_s: float = 0.0,
    random: Callable[[], float] = _random.random,
) -> RetryDecision:
    """What to do after `error` (one attempt at `error.provider` failed).

    `attempts_so_far`: attempts this request made, the failed one included. `retries_of_provider`: retries this
    provider already had in this request (0 after its first failure). `remaining_s`: time left before the
    request's deadline (None = none). `next_provider`: the route's next candidate (RoutePlan.next_after), None
    when there is none or fallback is off. `min_attempt_s`: the least time an attempt at this provider needs
    (its recent p50, say): a retry is planned only when its wait and that time fit before the deadline.
    `random` returns floats in [0, 1) and drives the jitter (inject a fixed one in tests)."""
    provider = error.provider
    cls = error.error_class
    what = f"{provider} failed ({cls.value})"

    if cls is ErrorClass.CANCELLED:
        return RetryDecision(Action.STOP, "the request was cancelled")
    if cls is ErrorClass.VALIDATION:
        return RetryDecision(
            Action.STOP,
            f"{provider} refused the request as invalid; another attempt would send the same request",
        )
    if cls is ErrorClass.SAFETY_REJECTED and not settings.fallback_on_safety:
        return RetryDecision(
            Action.STOP,
            f"{provider} rejected it on safety grounds; safety rejections do not fall back unless an admin "
            "enables fallback_on_safety in the global settings",
        )
    if attempts_so_far >= settings.max_attempts:
        return RetryDecision(
            Action.STOP, f"{what}; the {settings.max_attempts} attempt(s) allowed (max_attempts) are used up"
        )
    if remaining_s is not None and remaining_s <= 0:
        return RetryDecision(Action.STOP, f"{what}; the request's deadline has passed")

    why_not_here: str
    if cls not in RETRY_HERE:
        why_not_here = {
            ErrorClass.AUTH: "its key was refused, and asking again would not change that",
            ErrorClass.QUOTA_EXCEEDED: "its quota is spent",
            ErrorClass.SAFETY_REJECTED: "it would refuse the same prompt again",
        }.get(cls, "this failure does not pass by asking again")
    elif settings.retries_per_provider == 0:
        why_not_here = "retries are off (retries_per_provider is 0)"
    elif retries_of_provider >= settings.retries_per_provider:
        n = settings.retries_per_provider
        why_not_here = f"its {n} retr{'y is' if n == 1 else 'ies are'} used up (retries_per_provider)"
    else:
        delay = backoff_delay(
            retries_of_provider, base_s=settings.retry_backoff_s, max_s=settings.retry_backoff_max_s, random=random
        )
        asked = error.retry_after_s
        if asked is not None and asked > delay:
            delay = asked
        if cls in PREFER_FALLBACK and next_provider is not None:
            why_not_here = "it used a whole attempt's time, so another provider is tried first"
        elif asked is not None and asked > settings.retry_backoff_max_s and next_provider is not None:
            why_not_here = (
                f"it asked to wait {asked:g} s (Retry-After), longer than the longest backoff "
                f"({settings.retry_backoff_max_s:g} s)"
            )
        elif not _fits(delay, min_attempt_s, remaining_s):
            assert remaining_s is not None
            wait = f"waiting {delay:.2f} s" + (
                " as asked (Retry-After)" if asked is not None and delay == asked else ""
            )
            need = f" plus {min_attempt_s:.2f} s for the attempt" if min_attempt_s > 0 else ""
            why_not_here = f"{wait}{need} would not fit in the {remaining_s:.2f} s left before the deadline"
        else:
            source = f"Retry-After {asked:g} s" if asked is not None and delay == asked else "backoff"
            return RetryDecision(
                Action.RETRY,
                f"{what}, which may pass: retrying it in {delay:.2f} s ({source}; retry "
                f"{retries_of_provider + 1} of {settings.retries_per_provider})",
                provider=provider,
                delay_s=delay,
            )

    if next_provider is not None:
        return RetryDecision(
            Action.FALLBACK,
            f"{what} and is not retried there: {why_not_here}; falling back to {next_provider}",
            provider=next_provider,
        )
    return RetryDecision(
        Action.STOP, f"{what} and is not retried there: {why_not_here}; no other provider is left to fall back to"
    )


# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedAttempt:
    """One failed attempt and what was decided after it, for the final error text."""

    provider: str
    error: ProviderError
    decision: RetryDecision | None = None


def _billing(error: ProviderError) -> str:
    if error.billing is Billing.BILLED:
        units = f", {error.billed_units} units" if error.billed_units is not None else ""
        return f"billed{units}"
    if error.billing is Billing.UNKNOWN:
        return "billing unknown until reconciled"
    return "not billed"


def describe_attempts(attempts: Sequence[FailedAttempt], *, skipped: Sequence[Skipped] = ()) -> str:
    """The "all failed" text: each attempt in order (provider, what failed, whether it was billed, what was
    decided next), then the providers that were not tried and why."""
    if not attempts:
        head = "no provider was tried"
    else:
        head = f"all {len(attempts)} attempt(s) failed" if len(attempts) > 1 else "the only attempt failed"
    lines = [head + ":"] if attempts or skipped else [head]
    for number, attempt in enumerate(attempts, 1):
        err = attempt.error
        code = f" (HTTP {err.status_code})" if err.status_code is not None else ""
        line = f"  {number}. {attempt.provider}: {err.error_class.value}{code}: {err.message} [{_billing(err)}]"
        if attempt.decision is not None:
            line += f" -> {attempt.decision.summary}"
        lines.append(line)
    if skipped:
        lines.append("  not tried:")
        lines.extend(f"  - {s.message}" for s in skipped)
    return "\n".join(lines)
