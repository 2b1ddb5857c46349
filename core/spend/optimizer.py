"""The cost optimizer: recommendations with the money attached, and "what would this change cost".

Inputs: the last WINDOW_DAYS complete UTC days of rollups (images and spend per provider, in one spend mode: live
by default, simulated to rehearse offline; never both), the current global and provider settings, and the prices
in force. Every amount is priced through the one preparation step (core.generation.prepare: the resolver and
core.pricing, which prices the size each provider really renders) at each provider's own effective parameters,
from one settings snapshot (a proposed edit replaces its provider's settings in a copy of it), per image, then
multiplied by the images of the window: the window is 30 days, so the figure is a monthly one at that volume.
Money is integer micro-USD.

Recommendations (each: id, kind, title, detail, monthly saving in micro-USD, basis):

- provider: the same images (the source provider's effective size, handed to the candidate as a request would)
  at the cheapest other active, paid provider. Free providers (the Qwen Space) are not proposed: their quota
  cannot carry paid volume. One recommendation per source provider, the cheapest candidate.
- preset: the next cheaper preset below the one in effect (Fast < Standard < High < Ultra), where the price
  depends on it (Ideogram's rendering speed; GPU-time prices through steps).
- size: the largest of the provider's own size presets with the same aspect ratio and fewer megapixels, for
  providers priced per megapixel.
- steps: the rule of diminishing returns: inference steps above 80 % of the catalog's maximum for that provider
  (fal-qwen and Hugging Face: 40 of 50) add time, and money where time is billed, without a visible gain; the
  recommendation is to come down to that point. Its saving is 0 where the price does not depend on steps.
- tier: a volume tier the month will reach at its current pace (core.spend.tiers): the units past the threshold
  cost less by themselves; the saving is that difference for the rest of this month.

"What would this change cost" (`change_cost`): a proposed provider-settings edit, validated like a save but not
stored, priced per image before and after, times that provider's images over the last 30 days.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.catalog import PROVIDERS
from core.generation.periods import as_utc
from core.generation.prepare import PreparedRequest, prepare
from core.generation.snapshot import SettingsSnapshot, load_snapshot
from core.money import format_usd, round_half_up_micros
from core.presets import PRESET_NAMES
from core.pricing import PriceUnit, ProviderPrice
from core.settings import EffectiveParams, ProviderSettings, validate_provider_settings
from core.sizes import SizeError, resolve_size
from core.spend.reports import cost_per_image_micros, target_cost_per_image_micros
from core.spend.tiers import month_to_date_units, tier_position
from db.models import UsageDailyRollup, utcnow

__all__ = [
    "STEPS_RULE_SHARE",
    "WINDOW_DAYS",
    "ChangeCost",
    "OptimizerReport",
    "Recommendation",
    "change_cost",
    "recommend",
]

WINDOW_DAYS = 30
STEPS_RULE_SHARE = Fraction(4, 5)
"""Steps above this share of the catalog's maximum are past the point of diminishing returns."""
_PROMPT = "optimizer estimate"


class Basis(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    images: int
    """Images the provider returned in the period (the volume the saving is computed at)."""
    requests: int
    """Attempts counted in the period."""
    date_from: date
    date_to: date
    spend_mode: str


class Recommendation(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """Stable for the same advice: kind:provider[:target], so a page can remember a dismissal."""
    kind: str
    title: str
    detail: str
    monthly_saving_micro_usd: int
    basis: Basis


class OptimizerReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    spend_mode: str
    date_from: date
    date_to: date
    target_cost_per_image_micro_usd: int
    cost_per_image_micro_usd: int | None
    """Actual spend over images in the window (None without images)."""
    spend_micro_usd: int
    images: int
    recommendations: list[Recommendation]
    """Largest saving first."""


class ChangeCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    per_image_before_micro_usd: int
    per_image_after_micro_usd: int
    images_last_30_days: int
    monthly_before_micro_usd: int
    monthly_after_micro_usd: int
    monthly_change_micro_usd: int
    """after - before: positive costs more."""
    notes: list[str]


# --- the facts the advice rests on ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Usage:
    images: int
    attempts: int
    actual: int


@dataclass(frozen=True)
class _Context:
    snapshot: SettingsSnapshot
    settings: dict[str, ProviderSettings]
    prices: dict[str, ProviderPrice]
    """Usable prices in force."""


def _window(now: datetime) -> tuple[date, date]:
    today = as_utc(now).date()
    return today - timedelta(days=WINDOW_DAYS), today - timedelta(days=1)


def _usage(session: Session, start: date, end: date, spend_mode: str) -> dict[str, _Usage]:
    rollup = UsageDailyRollup
    mode_condition = rollup.mode == "live" if spend_mode == "live" else rollup.mode != "live"
    rows = session.execute(
        select(rollup.provider, func.sum(rollup.images), func.sum(rollup.attempts), func.sum(rollup.actual_micro_usd))
        .where(rollup.day >= start, rollup.day <= end, mode_condition)
        .group_by(rollup.provider)
    ).all()
    return {str(p): _Usage(int(i or 0), int(a or 0), int(c or 0)) for p, i, a, c in rows}


def _context(session: Session, on: date) -> _Context:
    snapshot = load_snapshot(session, on)
    prices = {p: v.price for p, v in snapshot.prices.items() if v.price.problem is None}
    return _Context(snapshot, snapshot.routing_settings(), prices)


def _prepared(
    ctx: _Context,
    provider: str,
    *,
    settings: ProviderSettings | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PreparedRequest:
    """One image at the provider's effective parameters, through the one preparation step (resolve + price)."""
    snapshot = ctx.snapshot
    if settings is not None:  # a proposed edit: in place of the stored settings, in a copy (nothing is stored)
        snapshot = snapshot.with_provider_settings(provider, settings, updated_by="proposed")
    return prepare(
        None, provider, prompt=_PROMPT, preset=preset, overrides=overrides, priced_images=1, snapshot=snapshot
    )


def _per_image(
    ctx: _Context,
    provider: str,
    *,
    settings: ProviderSettings | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> int | None:
    """One image's estimate (None: unpriced, unusable price or not servable)."""
    if provider not in ctx.prices:
        return None
    prepared = _prepared(ctx, provider, settings=settings, preset=preset, overrides=overrides)
    return prepared.estimate.micro_usd if prepared.valid and prepared.estimate is not None else None


def _effective(ctx: _Context, provider: str) -> EffectiveParams | None:
    return _prepared(ctx, provider).effective


def _usd(micros: int) -> str:
    return format_usd(micros)


# --- the kinds of advice --------------------------------------------------------------------------------------


def _provider_advice(ctx: _Context, source: str, use: _Usage, basis: Basis) -> Recommendation | None:
    effective = _effective(ctx, source)
    here = _per_image(ctx, source)
    if effective is None or here is None or "image_size" not in effective.params:
        return None
    size = effective.value_of("image_size")
    best: tuple[int, str] | None = None
    for candidate, settings in ctx.settings.items():
        price = ctx.prices.get(candidate)
        if candidate in (source, "sandbox") or not settings.active or price is None or price.unit is PriceUnit.FREE:
            continue
        there = _per_image(ctx, candidate, overrides={"image_size": size})
        if there is not None and there < here and (best is None or there < best[0]):
            best = (there, candidate)
    if best is None:
        return None
    there, candidate = best
    saving = (here - there) * use.images
    return Recommendation(
        id=f"provider:{source}:{candidate}",
        kind="provider",
        title=f"{candidate} instead of {source} for the same images: -{_usd(saving)}/month",
        detail=(
            f"{use.images} image(s) on {source} in the last {WINDOW_DAYS} days at {_usd(here)} each ({size}, its "
            f"current settings); {candidate} renders the same size for {_usd(there)} at its own settings."
        ),
        monthly_saving_micro_usd=saving,
        basis=basis,
    )


def _preset_advice(ctx: _Context, source: str, use: _Usage, basis: Basis) -> Recommendation | None:
    effective = _effective(ctx, source)
    here = _per_image(ctx, source)
    if effective is None or here is None:
        return None
    current = effective.preset
    lower = list(PRESET_NAMES) if current is None else list(PRESET_NAMES[: PRESET_NAMES.index(current)])
    for name in reversed(lower):  # the nearest cheaper preset below the current one
        there = _per_image(ctx, source, preset=name)
        if there is not None and there < here:
            saving = (here - there) * use.images
            was = "no preset" if current is None else f"the {current.title()} preset"
            return Recommendation(
                id=f"preset:{source}:{name}",
                kind="preset",
                title=f"{source} at {name.title()} instead of {was}: -{_usd(saving)}/month",
                detail=f"{use.images} image(s) in the last {WINDOW_DAYS} days at {_usd(here)} each; at "
                f"{name.title()}: {_usd(there)} each.",
                monthly_saving_micro_usd=saving,
                basis=basis,
            )
    return None


def _size_advice(ctx: _Context, source: str, use: _Usage, basis: Basis) -> Recommendation | None:
    price = ctx.prices.get(source)
    effective = _effective(ctx, source)
    here = _per_image(ctx, source)
    if price is None or price.unit is not PriceUnit.MEGAPIXEL or effective is None or here is None:
        return None
    spec = PROVIDERS[source]
    try:
        rendered = resolve_size(spec, effective.value_of("image_size"))
    except (SizeError, KeyError):
        return None
    ratio = Fraction(rendered.width, rendered.height)
    options = [
        (w * h, name)
        for name, (w, h) in spec.sizes.presets.items()
        if abs(Fraction(w, h) - ratio) <= ratio / 100 and w * h < rendered.width * rendered.height
    ]
    if not options:
        return None
    _, name = max(options)
    there = _per_image(ctx, source, overrides={"image_size": name})
    if there is None or there >= here:
        return None
    saving = (here - there) * use.images
    w, h = spec.sizes.presets[name]
    return Recommendation(
        id=f"size:{source}:{name}",
        kind="size",
        title=f"{source} at {name} ({w}x{h}) instead of {rendered.width}x{rendered.height}: -{_usd(saving)}/month",
        detail=f"Same aspect ratio, fewer megapixels: {_usd(there)} instead of {_usd(here)} per image, over "
        f"{use.images} image(s) in the last {WINDOW_DAYS} days.",
        monthly_saving_micro_usd=saving,
        basis=basis,
    )


def _steps_advice(ctx: _Context, source: str, use: _Usage, basis: Basis) -> Recommendation | None:
    effective = _effective(ctx, source)
    spec = PROVIDERS[source].params.get("num_inference_steps")
    if effective is None or spec is None or spec.maximum is None or "num_inference_steps" not in effective.params:
        return None
    steps = int(effective.value_of("num_inference_steps"))
    point = int(Fraction(int(spec.maximum)) * STEPS_RULE_SHARE)
    if steps <= point:
        return None
    here = _per_image(ctx, source)
    there = _per_image(ctx, source, overrides={"num_inference_steps": point})
    saving = 0 if here is None or there is None else max(0, here - there) * use.images
    return Recommendation(
        id=f"steps:{source}:{point}",
        kind="steps",
        title=f"{source}: {point} inference steps instead of {steps}"
        + (f": -{_usd(saving)}/month" if saving else " (faster, same price)"),
        detail=(
            f"Past {point} steps (80 % of {source}'s maximum of {int(spec.maximum)}) more steps add time"
            + (" and money" if saving else "")
            + f" without a visible gain; set by {effective.source_of('num_inference_steps')}."
        ),
        monthly_saving_micro_usd=saving,
        basis=basis,
    )


def _tier_advice(session: Session, ctx: _Context, source: str, now: datetime, basis: Basis) -> Recommendation | None:
    price = ctx.prices.get(source)
    if price is None or not price.tiers:
        return None
    used = month_to_date_units(session, source, now, price=price)
    position = tier_position(price, used)
    if position is None or position.next_tier_from_units is None or position.next_tier_usd_per_unit is None:
        return None
    moment = as_utc(now)
    elapsed_days = moment.day - 1 + Fraction(moment.hour * 3600 + moment.minute * 60 + moment.second, 86_400)
    month_end = (moment.replace(day=28) + timedelta(days=4)).replace(day=1)
    days_in_month = (month_end.date() - moment.date().replace(day=1)).days
    if elapsed_days <= 0:
        return None
    projected = Fraction(used) / elapsed_days * days_in_month
    threshold = Fraction(position.next_tier_from_units)
    if projected < threshold:
        return None
    past = projected - threshold
    saving = round_half_up_micros(
        past * (Fraction(position.current_usd_per_unit) - Fraction(position.next_tier_usd_per_unit))
    )
    unit = price.unit.value
    return Recommendation(
        id=f"tier:{source}:{position.next_tier_from_units}",
        kind="tier",
        title=f"{source} reaches its {position.next_tier_usd_per_unit} $/{unit} tier this month: -{_usd(saving)}",
        detail=(
            f"{Decimal(used):f} {unit}(s) so far this month, on pace for {float(projected):.1f}; from "
            f"{position.next_tier_from_units} the price drops from ${position.current_usd_per_unit} to "
            f"${position.next_tier_usd_per_unit}. Keeping volume on {source} keeps this saving."
        ),
        monthly_saving_micro_usd=saving,
        basis=basis,
    )


def recommend(session: Session, *, now: datetime | None = None, spend_mode: str = "live") -> OptimizerReport:
    """Recommendations from the last 30 complete days, largest monthly saving first."""
    if spend_mode not in ("live", "simulated"):
        raise InvalidInput(f"the spend mode is live or simulated, not {spend_mode!r}", {"mode": "live or simulated"})
    moment = as_utc(now or utcnow())
    start, end = _window(moment)
    usage = _usage(session, start, end, spend_mode)
    ctx = _context(session, moment.date())
    advice: list[Recommendation] = []

    def basis(provider: str) -> Basis:
        use = usage.get(provider, _Usage(0, 0, 0))
        return Basis(provider=provider, images=use.images, requests=use.attempts, date_from=start, date_to=end,
                     spend_mode=spend_mode)  # fmt: skip

    for provider in sorted(usage):
        use = usage[provider]
        if provider not in PROVIDERS or use.images <= 0:
            continue
        for advise in (_provider_advice, _preset_advice, _size_advice, _steps_advice):
            found = advise(ctx, provider, use, basis(provider))
            if found is not None:
                advice.append(found)
    for provider in sorted(ctx.prices):
        if spend_mode != "live":
            break  # tiers count live units only
        found = _tier_advice(session, ctx, provider, moment, basis(provider))
        if found is not None:
            advice.append(found)
    advice.sort(key=lambda r: (-r.monthly_saving_micro_usd, r.id))
    spend = sum(u.actual for u in usage.values())
    images = sum(u.images for u in usage.values())
    return OptimizerReport(
        spend_mode=spend_mode,
        date_from=start,
        date_to=end,
        target_cost_per_image_micro_usd=target_cost_per_image_micros(session),
        cost_per_image_micro_usd=cost_per_image_micros(spend, images),
        spend_micro_usd=spend,
        images=images,
        recommendations=advice,
    )


def change_cost(
    session: Session,
    provider: str,
    proposed: Mapping[str, Any],
    *,
    now: datetime | None = None,
    spend_mode: str = "live",
) -> ChangeCost:
    """The effect of a proposed provider-settings edit (before it is saved) on monthly spend at the volume of
    the last 30 days. `proposed` is the whole settings form, as `save_provider_settings` takes it; it is
    validated the same way (InvalidInput with field errors) and nothing is stored."""
    settings = validate_provider_settings(provider, proposed)
    moment = as_utc(now or utcnow())
    start, end = _window(moment)
    ctx = _context(session, moment.date())
    if provider not in ctx.prices:
        raise InvalidInput(f"{provider} has no usable price to estimate with", {"provider": "no usable price"})
    before = _per_image(ctx, provider)
    after = _per_image(ctx, provider, settings=settings)
    notes: list[str] = []
    if before is None or after is None:
        raise InvalidInput(
            f"cannot price {provider} at its {'current' if before is None else 'proposed'} settings",
            {"settings": "these settings cannot be priced"},
        )
    images = _usage(session, start, end, spend_mode).get(provider, _Usage(0, 0, 0)).images
    if images == 0:
        notes.append(f"{provider} returned no images in the last {WINDOW_DAYS} days: no change at that volume")
    return ChangeCost(
        provider=provider,
        per_image_before_micro_usd=before,
        per_image_after_micro_usd=after,
        images_last_30_days=images,
        monthly_before_micro_usd=before * images,
        monthly_after_micro_usd=after * images,
        monthly_change_micro_usd=(after - before) * images,
        notes=notes,
    )
