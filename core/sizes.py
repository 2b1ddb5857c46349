"""Canonical image sizes and how each provider can honour them.

A canonical `image_size` is a preset name (`square_hd`), an aspect ratio (`16:9`) or dimensions (`1024x768`).
`resolve_size` says what a provider will actually render for it, in which wire form, and whether that is
exactly what was asked. Pricing uses the rendered dimensions; adapters use the wire form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from core.catalog import FAL_SIZE_PRESETS, ProviderSpec, get_provider

_DIMENSIONS = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")

SizeForm = Literal["preset", "aspect_ratio", "resolution", "custom"]


class SizeError(ValueError):
    """The size cannot be understood, or the provider cannot render anything close to it."""


@dataclass(frozen=True)
class RequestedSize:
    raw: str
    preset: str | None = None
    ratio: tuple[int, int] | None = None
    dimensions: tuple[int, int] | None = None


@dataclass(frozen=True)
class ResolvedSize:
    """What a provider renders for a requested size."""

    width: int
    height: int
    form: SizeForm
    """How the adapter sends it: a preset name, an aspect ratio, one of a fixed list, or free dimensions."""
    wire_value: str
    """The value in that form, canonical spelling (`square_hd`, `16:9`, `1024x768`)."""
    exact: bool
    note: str = ""
    """When not exact: what was changed, in words a person understands."""

    @property
    def megapixels(self) -> Fraction:
        return Fraction(self.width * self.height, 1_000_000)


def parse_size(value: str) -> RequestedSize:
    raw = value.strip()
    if raw in FAL_SIZE_PRESETS:
        return RequestedSize(raw=raw, preset=raw)
    if m := _DIMENSIONS.match(raw):
        w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0:
            raise SizeError(f"image size {value!r}: width and height must be positive")
        return RequestedSize(raw=raw, dimensions=(w, h))
    if m := _RATIO.match(raw):
        a, b = int(m.group(1)), int(m.group(2))
        if a <= 0 or b <= 0:
            raise SizeError(f"image size {value!r}: an aspect ratio needs two positive numbers")
        return RequestedSize(raw=raw, ratio=(a, b))
    presets = ", ".join(FAL_SIZE_PRESETS)
    raise SizeError(
        f"image size {value!r} is not understood: use a preset ({presets}), "
        "an aspect ratio like 16:9, or WIDTHxHEIGHT like 1024x768"
    )


def _ratio_of(w: int, h: int) -> float:
    return w / h


def _nearest(
    candidates: dict[str, tuple[int, int]], target_ratio: float, target_area: int | None = None
) -> tuple[str, tuple[int, int]]:
    def score(item: tuple[str, tuple[int, int]]) -> tuple[float, float]:
        _, (w, h) = item
        ratio_gap = abs(_ratio_of(w, h) - target_ratio) / target_ratio
        area_gap = abs(w * h - target_area) / target_area if target_area else 0.0
        return (round(ratio_gap, 6), area_gap)

    return min(candidates.items(), key=score)


def _requested_dims(req: RequestedSize) -> tuple[int, int] | None:
    if req.preset is not None:
        return FAL_SIZE_PRESETS[req.preset]
    return req.dimensions


def resolve_size(provider: ProviderSpec | str, value: str) -> ResolvedSize:
    """What `provider` renders for the canonical size `value`. Raises SizeError when it cannot."""
    spec = get_provider(provider) if isinstance(provider, str) else provider
    sizes = spec.sizes
    req = parse_size(value)
    dims = _requested_dims(req)

    # 1. Native forms first.
    if req.preset is not None and req.preset in sizes.presets:
        w, h = sizes.presets[req.preset]
        return ResolvedSize(w, h, "preset", req.preset, exact=True)
    if req.ratio is not None:
        key = f"{req.ratio[0]}:{req.ratio[1]}"
        if key in sizes.aspect_ratios:
            w, h = sizes.aspect_ratios[key]
            return ResolvedSize(w, h, "aspect_ratio", key, exact=True)
    if dims is not None:
        w, h = dims
        if sizes.resolutions and (w, h) in sizes.resolutions:
            return ResolvedSize(w, h, "resolution", f"{w}x{h}", exact=True)
        if sizes.custom:
            problems = []
            for side_name, side in (("width", w), ("height", h)):
                if side < sizes.min_side or side > sizes.max_side:
                    problems.append(f"{side_name} {side} is outside {sizes.min_side}-{sizes.max_side}")
            if problems:
                raise SizeError(f"{spec.id} cannot render {w}x{h}: " + "; ".join(problems))
            if w % sizes.multiple_of or h % sizes.multiple_of:
                m = sizes.multiple_of
                nw, nh = max(m, round(w / m) * m), max(m, round(h / m) * m)
                return ResolvedSize(
                    nw, nh, "custom", f"{nw}x{nh}", exact=False,
                    note=f"{w}x{h} rounded to {nw}x{nh} ({spec.id} needs multiples of {m})",
                )
            return ResolvedSize(w, h, "custom", f"{w}x{h}", exact=True)

    # 2. Custom dimensions for an aspect ratio, where the provider takes free sizes (about one megapixel).
    if req.ratio is not None and sizes.custom:
        a, b = req.ratio
        m = max(sizes.multiple_of, 8)
        scale = (1_048_576 / (a * b)) ** 0.5
        w = max(sizes.min_side, min(sizes.max_side, round(a * scale / m) * m))
        h = max(sizes.min_side, min(sizes.max_side, round(b * scale / m) * m))
        exact = Fraction(w, h) == Fraction(a, b)
        note = "" if exact else f"{a}:{b} rendered as {w}x{h}, the nearest size {spec.id} accepts"
        return ResolvedSize(w, h, "custom", f"{w}x{h}", exact=exact, note=note)

    # 3. The nearest thing the provider offers: same shape first, then closest area.
    target_ratio = _ratio_of(*dims) if dims else req.ratio[0] / req.ratio[1]  # type: ignore[index]
    target_area = dims[0] * dims[1] if dims else None
    options: dict[str, tuple[SizeForm, str, tuple[int, int]]] = {}
    for name, wh in sizes.presets.items():
        options[f"p:{name}"] = ("preset", name, wh)
    for ratio, wh in sizes.aspect_ratios.items():
        options[f"a:{ratio}"] = ("aspect_ratio", ratio, wh)
    for wh in sizes.resolutions:
        options[f"r:{wh[0]}x{wh[1]}"] = ("resolution", f"{wh[0]}x{wh[1]}", wh)
    if not options:
        raise SizeError(f"{spec.id} cannot render {value!r}")
    # With a ratio asked for, prefer an aspect-ratio form; with dimensions, a fixed resolution.
    preferred = {k: v for k, v in options.items() if v[0] == ("aspect_ratio" if dims is None else "resolution")}
    pool = preferred or options
    key, (w, h) = _nearest({k: v[2] for k, v in pool.items()}, target_ratio, target_area)
    form, wire, _ = pool[key]
    return ResolvedSize(
        w, h, form, wire, exact=False,
        note=f"{value} is not available on {spec.id}; using {wire} ({w}x{h})",
    )


def size_choices(provider: ProviderSpec | str) -> list[str]:
    """The sizes a provider renders natively, for dropdowns."""
    spec = get_provider(provider) if isinstance(provider, str) else provider
    out = list(spec.sizes.presets) + list(spec.sizes.aspect_ratios)
    out += [f"{w}x{h}" for w, h in spec.sizes.resolutions]
    return out
