"""Versioned prices and exact cost estimates.

A `ProviderPrice` says how one provider charges, where the figure comes from (`source`) and since when
(`effective_date`). A `PriceTable` is a labelled set of them; the database stores each provider's price as
a new version whenever it changes (`ProviderPrice.to_json` / `from_json`), so an old request can always be
priced at the price it ran under.

Units:
- megapixel: width x height / 1,000,000 of what the provider really renders (core.sizes.resolve_size), times
  the number of images. fal bills this way.
- image: per output image, optionally keyed by a parameter (Ideogram prices by `rendering_speed`).
- gpu_second: an estimate of compute time: `seconds_per_step` x inference steps x images, or a flat
  `seconds_per_image` x images where steps do not drive the time. It is an estimate by nature; settlement uses
  what the provider reports where it does.
- free: $0; units count images (the free Space's scarce resource is its quota, tracked by budgets).

Volume tiers: `tiers` lower the unit price once the month-to-date usage passes `from_units`; a request that
straddles a boundary is split and each part charged at its band's price.

Rounding: every amount is computed exactly with Fraction and rounded once per request, half up to the
micro-dollar (core.money.round_half_up_micros). A provider without a price is an error, never $0.

Bounds: every amount and quantity passes core.money.exact_decimal (plain decimals, at most six places, a sane
maximum), so an estimate, a description and a page stay cheap whatever was typed or imported. A stored price
that no longer validates loads as an unusable price (`ProviderPrice.unusable`): that provider's estimates fail
with a clear error; nothing else breaks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from decimal import Decimal, localcontext
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.errors import InvalidInput
from core.catalog import PROVIDERS, ProviderSpec
from core.money import exact_decimal, format_usd, round_half_up_micros, unit_price
from core.settings import field_errors_from_validation
from core.sizes import SizeError, resolve_size

DEFAULT_PRICES_PATH = Path(__file__).resolve().parent / "data" / "prices.json"
MAX_TIER_UNITS = Decimal(1_000_000_000_000)
"""The highest volume-tier threshold (units per month)."""
MAX_GPU_SECONDS = Decimal(86_400)
"""The longest time estimate per step or per image: a day."""
_MAX_PROBLEM_CHARS = 300


class PriceUnit(StrEnum):
    MEGAPIXEL = "megapixel"
    IMAGE = "image"
    GPU_SECOND = "gpu_second"
    FREE = "free"


UNIT_SYMBOLS: dict[PriceUnit, str] = {
    PriceUnit.MEGAPIXEL: "MP",
    PriceUnit.IMAGE: "image",
    PriceUnit.GPU_SECOND: "GPU-s",
    PriceUnit.FREE: "image",
}


def _dec(value: Fraction | Decimal | int) -> Decimal:
    """A Fraction as an exact Decimal. Every quantity here has a terminating decimal expansion (megapixels
    divide by 10^6, prices are decimals); anything else would be a bug, so it is refused rather than rounded."""
    frac = Fraction(value)
    with localcontext() as ctx:
        ctx.prec = 60
        result = Decimal(frac.numerator) / Decimal(frac.denominator)
    if Fraction(result) != frac:
        raise ArithmeticError(f"{frac} has no exact decimal form")
    return result


def _show(value: Fraction | Decimal | int) -> str:
    """An exact number without trailing zeros or exponent: 1.048576, 0.0524288, 3."""
    text = format(_dec(value).normalize(), "f")
    return text


def _usd(value: Fraction | Decimal | int) -> str:
    return f"${_show(value)}"


def _qty(amount: Fraction | Decimal | int, unit: PriceUnit) -> str:
    """`2.097152 MP`, `3 images`, `1 image`, `42 GPU-s`."""
    symbol = UNIT_SYMBOLS[unit]
    if symbol == "image" and Fraction(amount) != 1:
        symbol = "images"
    return f"{_show(amount)} {symbol}"


def _non_negative(value: Decimal | None, what: str) -> Decimal | None:
    if value is None:
        return None
    if not value.is_finite():
        raise ValueError(f"{what} must be a finite amount, not {value}")
    if value < 0:
        raise ValueError(f"{what} {_show(value)} is negative; a price must be 0 or more")
    return value


def _unit_of(info: ValidationInfo) -> PriceUnit | None:
    unit = info.data.get("unit")
    return unit if isinstance(unit, PriceUnit) else None


class PriceTier(BaseModel):
    """From `from_units` units used in the calendar month on, each unit costs `usd_per_unit`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_units: Decimal
    usd_per_unit: Decimal

    @field_validator("from_units", mode="before")
    @classmethod
    def _positive_threshold(cls, value: Any) -> Decimal:
        threshold = exact_decimal(value, what="from_units", maximum=MAX_TIER_UNITS)
        if threshold == 0:
            raise ValueError("from_units must be above 0 (the base price covers usage from 0 on)")
        return threshold

    @field_validator("usd_per_unit", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        return unit_price(value, "usd_per_unit")


class ProviderPrice(BaseModel):
    """How one provider charges. Validated against the catalog: keyed prices must cover every choice of the
    key parameter, tiers must ascend and never get dearer, GPU-second prices need a time estimate."""

    # Field order matters: each validator sees the fields declared before it (info.data).
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    unit: PriceUnit
    key_param: str | None = Field(None, validate_default=True)
    """Per-image prices keyed by this parameter's value (Ideogram: rendering_speed)."""
    keyed_usd_per_unit: dict[str, Decimal] = Field(default_factory=dict, validate_default=True)
    usd_per_unit: Decimal | None = Field(None, validate_default=True)
    """The base price per unit (from 0 units in the month). Not used with key_param; 0 for free."""
    tiers: tuple[PriceTier, ...] = Field((), validate_default=True)
    seconds_per_step: Decimal | None = Field(None, validate_default=True)
    """gpu_second: estimated GPU seconds per inference step per image."""
    seconds_per_image: Decimal | None = Field(None, validate_default=True)
    """gpu_second: estimated GPU seconds per image, where steps do not drive the time."""
    source: str = Field(min_length=1)
    """Where the figure comes from: a URL or a sentence."""
    effective_date: date
    notes: str = ""

    _problem: str | None = PrivateAttr(default=None)
    _stored_rule: dict[str, Any] | None = PrivateAttr(default=None)

    @field_validator("keyed_usd_per_unit", mode="before")
    @classmethod
    def _keyed_amounts(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        return {key: unit_price(price, f"the price for {key}") for key, price in value.items()}

    @field_validator("usd_per_unit", mode="before")
    @classmethod
    def _base_amount(cls, value: Any) -> Any:
        return None if value is None else unit_price(value, "usd_per_unit")

    @field_validator("seconds_per_step", "seconds_per_image", mode="before")
    @classmethod
    def _seconds_amount(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        name = str(info.field_name)
        return exact_decimal(value, what=name, maximum=MAX_GPU_SECONDS, above_minimum=True)

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if value not in PROVIDERS:
            raise ValueError(f"unknown provider {value!r}; known providers: {', '.join(PROVIDERS)}")
        return value

    @field_validator("unit", mode="before")
    @classmethod
    def _unit(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in {u.value for u in PriceUnit}:
            raise ValueError(f"unknown price unit {value!r}; units are: {', '.join(u.value for u in PriceUnit)}")
        return value

    @field_validator("key_param")
    @classmethod
    def _key_param(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        unit, spec = _unit_of(info), PROVIDERS.get(info.data.get("provider", ""))
        if unit is not None and unit is not PriceUnit.IMAGE:
            raise ValueError(f"key_param is only for per-image prices, not {unit.value}")
        if spec is not None:
            p = spec.params.get(value)
            if p is None or p.kind != "enum":
                enums = [n for n, ps in spec.params.items() if ps.kind == "enum"]
                raise ValueError(
                    f"key_param {value!r} is not a choice parameter of {spec.id}; it has: {', '.join(enums) or 'none'}"
                )
        return value

    @field_validator("keyed_usd_per_unit")
    @classmethod
    def _keyed(cls, value: dict[str, Decimal], info: ValidationInfo) -> dict[str, Decimal]:
        for key, price in value.items():
            _non_negative(price, f"the price for {key}")
        key_param = info.data.get("key_param")
        if key_param is None:
            if value and "key_param" in info.data:
                raise ValueError("keyed prices need key_param (the parameter whose value picks the price)")
            return value
        spec = PROVIDERS.get(info.data.get("provider", ""))
        if spec is None:
            return value
        choices = spec.params[key_param].choices
        missing = [c for c in choices if c not in value]
        unknown = [k for k in value if k not in choices]
        problems = []
        if missing:
            problems.append("no price for " + ", ".join(f"{key_param}={c}" for c in missing))
        if unknown:
            what = f"is not a {key_param} value" if len(unknown) == 1 else f"are not {key_param} values"
            problems.append(f"{', '.join(map(repr, unknown))} {what} of {spec.id} ({', '.join(choices)})")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("usd_per_unit")
    @classmethod
    def _base(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        _non_negative(value, "usd_per_unit")
        unit = _unit_of(info)
        if unit is PriceUnit.FREE:
            if value not in (None, Decimal(0)):
                raise ValueError(f"a free price cannot cost {_show(value)} per unit; use another unit")
            return Decimal(0)
        if info.data.get("key_param") is not None:
            if value is not None:
                raise ValueError("with key_param, the prices go in keyed_usd_per_unit, not usd_per_unit")
            return None
        if value is None and unit is not None and "key_param" in info.data:
            raise ValueError(f"a {unit.value} price needs usd_per_unit")
        return value

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, value: tuple[PriceTier, ...], info: ValidationInfo) -> tuple[PriceTier, ...]:
        if not value:
            return value
        if _unit_of(info) is PriceUnit.FREE:
            raise ValueError("a free price has no volume tiers")
        if info.data.get("key_param") is not None:
            raise ValueError("volume tiers are not supported with keyed per-image prices")
        previous_from: Decimal | None = None
        previous_price = info.data.get("usd_per_unit")
        for i, tier in enumerate(value):
            if previous_from is not None and tier.from_units <= previous_from:
                raise ValueError(
                    f"tiers must be in ascending order of from_units: tier {i + 1} starts at "
                    f"{_show(tier.from_units)}, not above the previous tier's {_show(previous_from)}"
                )
            if previous_price is not None and tier.usd_per_unit > previous_price:
                raise ValueError(
                    f"tier {i + 1} ({_usd(tier.usd_per_unit)} from {_show(tier.from_units)} units) is dearer "
                    f"than the price before it ({_usd(previous_price)}); volume tiers may only lower the price"
                )
            previous_from, previous_price = tier.from_units, tier.usd_per_unit
        return value

    @field_validator("seconds_per_step")
    @classmethod
    def _per_step(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is None:
            return None
        _check_seconds(value, "seconds_per_step", info)
        spec = PROVIDERS.get(info.data.get("provider", ""))
        if spec is not None and "num_inference_steps" not in spec.params:
            raise ValueError(f"{spec.id} has no inference steps; use seconds_per_image")
        return value

    @field_validator("seconds_per_image")
    @classmethod
    def _per_image(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is not None:
            _check_seconds(value, "seconds_per_image", info)
        if _unit_of(info) is PriceUnit.GPU_SECOND and "seconds_per_step" in info.data:
            per_step = info.data["seconds_per_step"]
            if (per_step is None) == (value is None):
                raise ValueError(
                    "a gpu_second price needs exactly one time estimate: seconds_per_step or seconds_per_image"
                )
        return value

    @model_validator(mode="after")
    def _complete(self) -> ProviderPrice:
        # Cross-field rules whose inputs may have been defaulted; field validators covered the rest.
        if self._problem is not None:  # an unusable stored price, passed on as it is (PriceTable, say)
            return self
        if self.unit in (PriceUnit.MEGAPIXEL, PriceUnit.GPU_SECOND) and self.usd_per_unit is None:
            raise ValueError(f"a {self.unit.value} price needs usd_per_unit")
        return self

    @property
    def spec(self) -> ProviderSpec:
        return PROVIDERS[self.provider]

    @classmethod
    def unusable(
        cls, *, provider: str, rule: Mapping[str, Any], source: str, effective_date: date, problem: str
    ) -> ProviderPrice:
        """A stored price that no longer validates (entered before a rule existed, or edited by hand): it
        keeps its stored rule for export and correction, describes its problem, and refuses every estimate.
        Built without validation on purpose; nothing in it is used to compute money."""
        raw_unit = rule.get("unit")
        unit = PriceUnit(raw_unit) if raw_unit in {u.value for u in PriceUnit} else PriceUnit.IMAGE
        price = cls.model_construct(
            provider=provider,
            unit=unit,
            key_param=None,
            keyed_usd_per_unit={},
            usd_per_unit=None,
            tiers=(),
            seconds_per_step=None,
            seconds_per_image=None,
            source=source,
            effective_date=effective_date,
            notes="",
        )
        price._problem = problem if len(problem) <= _MAX_PROBLEM_CHARS else problem[: _MAX_PROBLEM_CHARS - 1] + "…"
        price._stored_rule = dict(rule)
        return price

    @property
    def problem(self) -> str | None:
        """Why this stored price cannot be used (None for every validated price)."""
        return self._problem

    @property
    def stored_rule(self) -> dict[str, Any] | None:
        """The stored rule of an unusable price, as it is in the database."""
        return None if self._stored_rule is None else dict(self._stored_rule)

    def to_json(self) -> str:
        """JSON with exact decimal strings (never floats), for a stored price version."""
        return self.model_dump_json(exclude_defaults=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ProviderPrice:
        return cls.model_validate_json(text)

    def describe(self) -> str:
        """One line for a person: `$0.02 per MP (from 2026-09-01)`."""
        if self.problem is not None:
            return f"unusable stored price, enter a new one: {self.problem}"
        symbol = UNIT_SYMBOLS[self.unit]
        if self.unit is PriceUnit.FREE:
            text = "free"
        elif self.key_param is not None:
            text = ", ".join(f"{k} {_usd(v)}" for k, v in self.keyed_usd_per_unit.items())
            text = f"per image by {self.key_param}: {text}"
        else:
            assert self.usd_per_unit is not None  # guaranteed by _complete
            text = f"{_usd(self.usd_per_unit)} per {symbol}"
            for tier in self.tiers:
                text += f", {_usd(tier.usd_per_unit)} past {_show(tier.from_units)} {symbol}/month"
        return f"{text} (since {self.effective_date.isoformat()})"


def _check_seconds(value: Decimal, name: str, info: ValidationInfo) -> None:
    unit = _unit_of(info)
    if unit is not None and unit is not PriceUnit.GPU_SECOND:
        raise ValueError(f"{name} is only for gpu_second prices, not {unit.value}")
    if not value.is_finite() or value <= 0:
        raise ValueError(f"{name} must be above 0, not {value}")


class CostEstimate(BaseModel):
    """What one request is expected to cost, exactly, with the working shown."""

    model_config = ConfigDict(frozen=True)

    provider: str
    micro_usd: int
    """The rounded total in micro-dollars: what budgets reserve."""
    exact_usd: Decimal
    """The total before the one rounding step."""
    units: Decimal
    unit: str
    breakdown: list[str]
    price_source: str
    effective_date: date
    tiers_used: tuple[str, ...] = ()
    """The volume-tier bands this request was priced in (`1000+ MP/month at $0.015 per MP`), in order: one
    band, or two and more when the request straddles a boundary (it is split). Empty for an untiered price."""
    units_used_this_month: Decimal = Decimal(0)
    """The month-to-date units the tiers were applied from (core.spend.tiers.month_to_date_units)."""

    @property
    def formatted(self) -> str:
        return format_usd(self.micro_usd)


def _units_for(price: ProviderPrice, spec: ProviderSpec, params: Mapping[str, Any]) -> tuple[Fraction, list[str]]:
    def param(name: str) -> Any:
        if name in params and params[name] is not None:
            return params[name]
        p = spec.params.get(name)
        return None if p is None else p.default

    count = param("num_images")
    num_images = 1 if count is None else count
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a whole number of at least 1, not {num_images!r}")
    images = "image" if num_images == 1 else "images"
    lines: list[str] = []

    if price.unit is PriceUnit.MEGAPIXEL:
        size = param("image_size")
        if not isinstance(size, str):
            raise ValueError(f"{spec.id} has no image size to price per megapixel")
        rendered = resolve_size(spec, size)
        if not rendered.exact and rendered.note:
            lines.append(f"size: {rendered.note}")
        per_image = rendered.megapixels
        units = per_image * num_images
        lines.append(
            f"{rendered.width}x{rendered.height} = {_show(per_image)} MP x {num_images} {images} = {_show(units)} MP"
        )
        return units, lines
    if price.unit is PriceUnit.GPU_SECOND:
        if price.seconds_per_step is not None:
            steps = param("num_inference_steps")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"num_inference_steps must be a whole number of at least 1, not {steps!r}")
            units = Fraction(price.seconds_per_step) * steps * num_images
            lines.append(
                f"estimated {_show(price.seconds_per_step)} GPU-s per step x {steps} steps x {num_images} "
                f"{images} = {_show(units)} GPU-s"
            )
        else:
            assert price.seconds_per_image is not None  # guaranteed by validation
            units = Fraction(price.seconds_per_image) * num_images
            lines.append(
                f"estimated {_show(price.seconds_per_image)} GPU-s per image x {num_images} {images} "
                f"= {_show(units)} GPU-s"
            )
        return units, lines
    return Fraction(num_images), lines


def _unit_price(price: ProviderPrice, spec: ProviderSpec, params: Mapping[str, Any]) -> tuple[Fraction, str]:
    if price.unit is PriceUnit.FREE:
        return Fraction(0), ""
    if price.key_param is not None:
        key = params.get(price.key_param)
        if key is None:
            key = spec.params[price.key_param].default
        matched = next(
            (k for k in price.keyed_usd_per_unit if isinstance(key, str) and k.lower() == key.strip().lower()),
            None,
        )
        if matched is None:
            raise ValueError(
                f"no {spec.id} price for {price.key_param}={key!r}; priced values: "
                f"{', '.join(price.keyed_usd_per_unit)}"
            )
        return Fraction(price.keyed_usd_per_unit[matched]), f" ({price.key_param}={matched})"
    assert price.usd_per_unit is not None
    return Fraction(price.usd_per_unit), ""


def estimate_cost(
    price: ProviderPrice,
    *,
    provider_id: str,
    params: Mapping[str, Any],
    units_used_this_month: Decimal | int | Fraction = 0,
) -> CostEstimate:
    """The cost of one request with effective parameter values `params` (EffectiveParams.values()).

    `units_used_this_month` is the provider's month-to-date usage in the price's unit (megapixels, images or
    GPU seconds), for volume tiers. Missing parameters take the catalog's defaults. Raises ValueError for a
    price of another provider or parameters that cannot be priced (an unrenderable size, say)."""
    if price.provider != provider_id:
        raise ValueError(f"the price given is for {price.provider!r}, not {provider_id!r}")
    if price.problem is not None:
        raise ValueError(f"the stored price of {provider_id} cannot be used; enter a new price ({price.problem})")
    spec = PROVIDERS[provider_id]
    if isinstance(units_used_this_month, bool) or not isinstance(units_used_this_month, Decimal | int | Fraction):
        raise ValueError(f"units_used_this_month must be a Decimal or int, not {units_used_this_month!r}")
    used = Fraction(units_used_this_month)
    if used < 0:
        raise ValueError(f"units_used_this_month cannot be negative ({_show(used)})")

    try:
        units, lines = _units_for(price, spec, params)
    except SizeError as exc:
        raise ValueError(f"cannot price this request: {exc}") from None
    symbol = UNIT_SYMBOLS[price.unit]
    base, key_note = _unit_price(price, spec, params)

    total = Fraction(0)
    tiers_used: list[str] = []
    if price.unit is PriceUnit.FREE:
        lines.append(f"{_qty(units, price.unit)}: {spec.id} is free, $0")
    elif not price.tiers:
        total = units * base
        lines.append(f"{_qty(units, price.unit)} x {_usd(base)} per {symbol}{key_note} = {_usd(total)}")
    else:
        bands: list[tuple[Fraction, Fraction]] = [(Fraction(0), base)]
        bands += [(Fraction(t.from_units), Fraction(t.usd_per_unit)) for t in price.tiers]
        start, end = used, used + units
        lines.append(f"month-to-date before this request: {_qty(used, price.unit)}")
        for i, (low, band_price) in enumerate(bands):
            high = bands[i + 1][0] if i + 1 < len(bands) else None
            part_low = max(start, low)
            part_high = end if high is None else min(end, high)
            if part_high <= part_low:
                continue
            part = (part_high - part_low) * band_price
            total += part
            band = f"{_show(low)}+" if high is None else f"{_show(low)}-{_show(high)}"
            tiers_used.append(f"{band} {symbol}/month at {_usd(band_price)} per {symbol}")
            lines.append(
                f"{_qty(part_high - part_low, price.unit)} in the {band} {symbol}/month band x "
                f"{_usd(band_price)} per {symbol} = {_usd(part)}"
            )
    micros = round_half_up_micros(total)
    if _dec(total) != _dec(Fraction(micros, 1_000_000)):
        lines.append(f"total {_usd(total)}, rounded half up to the micro-dollar: {format_usd(micros)}")
    else:
        lines.append(f"total {format_usd(micros)}")
    return CostEstimate(
        provider=provider_id,
        micro_usd=micros,
        exact_usd=_dec(total),
        units=_dec(units),
        unit=price.unit.value,
        breakdown=lines,
        price_source=price.source,
        effective_date=price.effective_date,
        tiers_used=tuple(tiers_used),
        units_used_this_month=_dec(used),
    )


class PriceTable(BaseModel):
    """A labelled set of provider prices (one per provider)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    description: str = ""
    prices: dict[str, ProviderPrice]

    @model_validator(mode="after")
    def _keys_match(self) -> PriceTable:
        for key, price in self.prices.items():
            if key != price.provider:
                raise ValueError(f"the price listed under {key!r} is for {price.provider!r}")
        return self

    def price_for(self, provider_id: str) -> ProviderPrice:
        try:
            return self.prices[provider_id]
        except KeyError:
            raise KeyError(
                f"price table {self.version!r} has no price for {provider_id!r} "
                f"(it prices: {', '.join(self.prices) or 'nothing'}); an unpriced provider is never treated as free"
            ) from None

    def estimate(
        self, provider_id: str, params: Mapping[str, Any], *, units_used_this_month: Decimal | int = 0
    ) -> CostEstimate:
        return estimate_cost(
            self.price_for(provider_id),
            provider_id=provider_id,
            params=params,
            units_used_this_month=units_used_this_month,
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> PriceTable:
        return cls.model_validate_json(text)


def parse_price(data: Mapping[str, Any] | str | bytes) -> ProviderPrice:
    """A ProviderPrice from user data (a mapping or JSON), or InvalidInput listing every problem by field."""
    try:
        if isinstance(data, str | bytes):
            return ProviderPrice.model_validate_json(data)
        return ProviderPrice.model_validate(dict(data))
    except ValidationError as exc:
        errors = field_errors_from_validation(exc, allowed=tuple(ProviderPrice.model_fields))
        raise InvalidInput(f"the price is not valid ({len(errors)} problem(s))", errors) from None


def parse_price_table(data: Mapping[str, Any] | str | bytes) -> PriceTable:
    """A PriceTable from user data, or InvalidInput with field paths like `prices.ideogram.tiers`."""
    try:
        if isinstance(data, str | bytes):
            return PriceTable.model_validate_json(data)
        return PriceTable.model_validate(dict(data))
    except ValidationError as exc:
        errors = field_errors_from_validation(exc, allowed=tuple(PriceTable.model_fields))
        raise InvalidInput(f"the price table is not valid ({len(errors)} problem(s))", errors) from None


def load_default_prices(path: Path | None = None) -> PriceTable:
    """The built-in price table (core/data/prices.json): the starting point an admin edits."""
    return parse_price_table((path or DEFAULT_PRICES_PATH).read_text(encoding="utf-8"))
