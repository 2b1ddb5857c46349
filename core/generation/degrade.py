"""Soft budgets degrade a request instead of refusing it: a cheaper preset, a smaller size or a cheaper provider.

Pure: given the request as routed, the first candidate it would run on and the degrade actions of the soft
budgets it takes over their limit, say what the request becomes and what changed, in words. The service
re-plans the changed request (each provider again priced at its own parameters), runs it, tells the caller
(`AdjustmentKind.DEGRADE`) and records it on the generation (`generations.degraded`).

The actions (`core.generation.budgets.DEGRADE_ACTIONS`):
- cheaper_preset: the `fast` preset (fewest steps; Ideogram's TURBO, its cheapest tier).
- smaller_size: half the width and height of what the first candidate would render (multiples of 64, at least
  256 a side): a quarter of the megapixels, which is what per-megapixel prices charge. Providers with a fixed
  list of sizes render the nearest one they have.
- cheaper_provider: the cheapest policy, with a named provider no longer forced first.
Several soft budgets over their limit apply each distinct action once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core.generation.routing import Candidate, RouteRequest, RoutingPolicy
from core.sizes import SizeError, resolve_size

__all__ = ["CHEAPEST_PRESET", "MIN_DEGRADED_SIDE", "Degradation", "SoftBudgetOver", "degrade"]

CHEAPEST_PRESET = "fast"
MIN_DEGRADED_SIDE = 256
_SIDE_MULTIPLE = 64


@dataclass(frozen=True)
class SoftBudgetOver:
    """A soft budget this request takes over its limit."""

    budget_id: int
    name: str
    action: str
    left_micro_usd: int
    limit_micro_usd: int


@dataclass(frozen=True)
class Degradation:
    request: RouteRequest
    changed: bool
    """False when no action could make the request any cheaper (it runs as asked; the soft budget allows it)."""
    messages: tuple[str, ...]
    changes: dict[str, Any] = field(default_factory=dict)
    """What was changed: preset, image_size, policy / provider."""

    def record(self, budgets: Sequence[SoftBudgetOver]) -> dict[str, Any]:
        """What the generation row keeps (generations.degraded)."""
        return {
            "budgets": [
                {"id": b.budget_id, "name": b.name, "action": b.action, "left_micro_usd": b.left_micro_usd}
                for b in budgets
            ],
            "changes": dict(self.changes),
            "messages": list(self.messages),
        }


def _smaller_size(candidate: Candidate) -> tuple[str | None, str]:
    effective = candidate.prepared.effective
    current = effective.values().get("image_size") if effective is not None else None
    if not isinstance(current, str):
        return None, f"{candidate.provider} has no image size to make smaller"
    try:
        size = resolve_size(candidate.provider, current)
    except SizeError as exc:
        return None, f"the size {current!r} cannot be made smaller ({exc})"

    def half(side: int) -> int:
        return max(MIN_DEGRADED_SIDE, side // 2 // _SIDE_MULTIPLE * _SIDE_MULTIPLE)

    width, height = half(size.width), half(size.height)
    if (width, height) == (size.width, size.height):
        return None, f"{size.width}x{size.height} is already the smallest size this degrade uses"
    return f"{width}x{height}", f"image size {size.width}x{size.height} -> {width}x{height}"


def degrade(request: RouteRequest, first: Candidate, over: Sequence[SoftBudgetOver]) -> Degradation:
    """The request made cheaper by the actions of the soft budgets in `over` (each distinct action once)."""
    actions = list(dict.fromkeys(b.action for b in over))
    names = ", ".join(repr(b.name) for b in over)
    messages: list[str] = []
    changes: dict[str, Any] = {}
    degraded = request
    for action in actions:
        if action == "cheaper_preset":
            if (request.preset or "").strip().lower() == CHEAPEST_PRESET:
                messages.append(f"the preset is already {CHEAPEST_PRESET}, the cheapest")
                continue
            degraded = replace(degraded, preset=CHEAPEST_PRESET)
            changes["preset"] = CHEAPEST_PRESET
            messages.append(f"preset {request.preset or 'from the settings'} -> {CHEAPEST_PRESET}")
        elif action == "smaller_size":
            size, said = _smaller_size(first)
            messages.append(said)
            if size is not None:
                degraded = replace(degraded, overrides={**dict(degraded.overrides), "image_size": size})
                changes["image_size"] = size
        elif action == "cheaper_provider":
            degraded = replace(degraded, provider=None, policy=RoutingPolicy.CHEAPEST.value)
            changes["policy"] = RoutingPolicy.CHEAPEST.value
            if request.provider:
                changes["provider"] = None
                messages.append(f"{request.provider} no longer forced first; providers ordered cheapest first")
            else:
                messages.append("providers ordered cheapest first")
        else:  # pragma: no cover - budgets validates degrade actions on every write
            messages.append(f"unknown degrade action {action!r} ignored")
    head = f"soft budget(s) {names} over their limit: "
    return Degradation(
        request=degraded,
        changed=bool(changes),
        messages=tuple(head + m for m in messages),
        changes=changes,
    )
