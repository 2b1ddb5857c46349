"""Quality presets: Fast, Standard, High, Ultra.

A preset is a named set of concrete parameter values per provider, applied after the provider's settings and
before the request's own overrides (core.settings.resolve_effective). Each preset only names parameters the
provider has, and every value is inside the catalog's limits (tests/core/test_settings.py checks both).

What the presets trade: inference steps (time, and on GPU-second pricing, money), guidance, fal's
`acceleration`, and Ideogram's `rendering_speed` (which sets Ideogram's price per image).

Presets deliberately do not set `image_size` or `num_images`. Size is a composition choice (a portrait stays a
portrait in every preset) and, with count, is what per-megapixel and per-image prices charge for: a preset that
quietly changed either would change the bill behind the admin's back. Pick those explicitly.

Admins edit presets through the global setting `preset_overrides` (preset -> provider -> {param: value}),
validated by core.settings like every other parameter value and applied over these built-in values by
`resolve_effective`; edits are therefore versioned, audited, diffed and rolled back with the global settings.
The values below stay the built-in ones ("reset to built-in" removes an override).

Rationale per preset:
- fast: drafts and previews. About 10-15 steps is where Qwen-Image first gives a usable composition; fal's
  `acceleration=high` roughly halves run time for a visible quality cost; JPEG output downloads faster.
  Ideogram TURBO is its cheapest tier ($0.03/image at the default prices).
- standard: the everyday default. The catalog's defaults (25 steps, guidance 3.0 on Qwen-Image), fal's
  regular acceleration (near-lossless speed-up), Ideogram DEFAULT. The free Space gets 30 of its 50 steps,
  since its scarce resource is the ZeroGPU seconds per day.
- high: final images. 40 steps and slightly stronger guidance (4.0) for detail and prompt adherence, no
  acceleration, PNG. Ideogram QUALITY.
- ultra: the provider's maximum that is still sensible: 50 steps (the product's cap), guidance 4.5 (higher
  values over-saturate Qwen-Image), PNG. Ideogram has nothing above QUALITY, so ultra equals high there.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from core.catalog import get_provider

PRESET_NAMES: tuple[str, ...] = ("fast", "standard", "high", "ultra")

PRESET_LABELS: dict[str, str] = {
    "fast": "Fast",
    "standard": "Standard",
    "high": "High",
    "ultra": "Ultra",
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "fast": "Drafts and previews: fewest steps, accelerated, cheapest Ideogram tier.",
    "standard": "Everyday default: balanced steps and guidance.",
    "high": "Final images: more steps, stronger guidance, no acceleration, lossless output.",
    "ultra": "Maximum steps the product allows; slowest (and dearest where time is billed).",
}

# preset -> provider -> canonical params. Only parameters that provider has; values within catalog limits.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "fal-qwen": {
            "num_inference_steps": 12,
            "guidance_scale": 2.5,
            "acceleration": "high",
            "output_format": "jpeg",
        },
        "ideogram": {"rendering_speed": "TURBO"},
        "huggingface": {"num_inference_steps": 12, "guidance_scale": 2.5},
        "qwen": {"num_inference_steps": 15, "guidance_scale": 3.5},
        "sandbox": {"num_inference_steps": 12, "guidance_scale": 2.5},
    },
    "standard": {
        "fal-qwen": {
            "num_inference_steps": 25,
            "guidance_scale": 3.0,
            "acceleration": "regular",
            "output_format": "png",
        },
        "ideogram": {"rendering_speed": "DEFAULT"},
        "huggingface": {"num_inference_steps": 25, "guidance_scale": 3.0},
        "qwen": {"num_inference_steps": 30, "guidance_scale": 4.0},
        "sandbox": {"num_inference_steps": 25, "guidance_scale": 3.0},
    },
    "high": {
        "fal-qwen": {
            "num_inference_steps": 40,
            "guidance_scale": 4.0,
            "acceleration": "none",
            "output_format": "png",
        },
        "ideogram": {"rendering_speed": "QUALITY"},
        "huggingface": {"num_inference_steps": 40, "guidance_scale": 4.0},
        "qwen": {"num_inference_steps": 40, "guidance_scale": 4.0},
        "sandbox": {"num_inference_steps": 40, "guidance_scale": 4.0},
    },
    "ultra": {
        "fal-qwen": {
            "num_inference_steps": 50,
            "guidance_scale": 4.5,
            "acceleration": "none",
            "output_format": "png",
        },
        "ideogram": {"rendering_speed": "QUALITY"},
        "huggingface": {"num_inference_steps": 50, "guidance_scale": 4.5},
        "qwen": {"num_inference_steps": 50, "guidance_scale": 4.5},
        "sandbox": {"num_inference_steps": 50, "guidance_scale": 4.5},
    },
}


PRESET_FORBIDDEN_PARAMS: frozenset[str] = frozenset({"image_size", "num_images"})
"""What a preset, built-in or edited, never sets (they decide the bill; see above)."""

PresetOverrides = Mapping[str, Mapping[str, Mapping[str, Any]]]
"""preset -> provider -> {param: value}: the admins' edits over the built-in values."""


class UnknownPreset(ValueError):
    """A preset name that is not one of PRESET_NAMES."""


def normalize_preset(name: str) -> str:
    """The canonical (lower-case) preset name; raises UnknownPreset listing the choices."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if key not in PRESETS:
        choices = ", ".join(PRESET_LABELS[p] for p in PRESET_NAMES)
        raise UnknownPreset(f"unknown quality preset {name!r}; choose one of {choices}")
    return key


def preset_params(preset: str, provider_id: str) -> dict[str, Any]:
    """The parameter values `preset` sets for `provider_id` (a fresh dict; empty if it sets none there)."""
    key = normalize_preset(preset)
    get_provider(provider_id)  # a clear KeyError for an unknown provider
    return dict(PRESETS[key].get(provider_id, {}))


def presets_for(provider_id: str, overrides: PresetOverrides | None = None) -> MappingProxyType[str, dict[str, Any]]:
    """Every preset's values for one provider, for a UI table: the built-in values, with `overrides` (the
    global settings' `preset_overrides`, already validated) applied over them when given."""
    get_provider(provider_id)
    return MappingProxyType(
        {
            name: {**PRESETS[name].get(provider_id, {}), **((overrides or {}).get(name, {}).get(provider_id, {}))}
            for name in PRESET_NAMES
        }
    )
