"""The product's catalog against the emulator's own statement of each provider's API (emulator.api_facts).

The two are written independently (the emulator imports nothing from the product), so where they overlap (sizes,
ranges, enums, the seed maximum) a disagreement is a wrong fact on one side. Every value the catalog lets an
admin choose must be one the provider takes, or one the provider's adapter translates into one it takes.
The checks are functions over catalog specs, so a test can hand them a deliberately wrong catalog and see them
catch it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from core.catalog import PROVIDERS, SEED_MAX, ParamSpec, ProviderSpec
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, ProviderAdapter
from emulator import api_facts as facts

Specs = Mapping[str, ProviderSpec]
Range = tuple[float, float]


def _adapter(provider: str) -> ProviderAdapter:
    """The real adapter in emulator mode (translation sends nothing; nothing listens on port 9)."""
    config = AdapterConfig(api_key="contract-test", base_url="http://127.0.0.1:9", mode=ConnectionMode.EMULATOR)
    if provider == "fal-qwen":
        from core.providers.fal import FalQwenAdapter

        return FalQwenAdapter(config)
    if provider == "ideogram":
        from core.providers.ideogram import IdeogramAdapter

        return IdeogramAdapter(config)
    if provider == "qwen":
        from core.providers.qwen_space import QwenSpaceAdapter

        return QwenSpaceAdapter(config)
    raise KeyError(provider)


def _sent_as(provider: str, name: str, value: Any) -> Any:
    """What the provider's adapter puts on the wire for `name = value`; None when it refuses the value."""
    from common.errors import InvalidInput

    adapter = _adapter(provider)
    try:
        return adapter.translate(AdapterRequest("contract", {name: value})).wire_params.get(name)
    except InvalidInput:
        return None
    finally:
        asyncio.run(adapter.aclose())


def _range_problems(specs: Specs, provider: str, name: str, documented: Range) -> list[str]:
    """The catalog's range for `name` must lie inside the documented one, or its ends must be translated
    into it by the adapter (fal: 1 inference step is sent as fal's minimum of 2)."""
    p: ParamSpec = specs[provider].params[name]
    out = []
    for end in (p.minimum, p.maximum):
        if end is None or documented[0] <= end <= documented[1]:
            continue
        value = int(end) if p.kind == "int" else float(end)
        sent = _sent_as(provider, name, value)
        if sent is None or not documented[0] <= sent <= documented[1]:
            out.append(f"{provider}.{name}: the catalog allows {value}, the provider documents {documented}")
    return out


def _choice_problems(specs: Specs, provider: str, name: str, documented: tuple[str, ...]) -> list[str]:
    extra = set(specs[provider].params[name].choices) - set(documented)
    return [f"{provider}.{name}: {sorted(extra)} not among the provider's {documented}"] if extra else []


def fal_problems(specs: Specs) -> list[str]:
    spec = specs["fal-qwen"]
    out = []
    if spec.sizes.presets != facts.FAL_IMAGE_SIZE_PRESETS:
        out.append(f"fal-qwen presets {spec.sizes.presets} != fal's {facts.FAL_IMAGE_SIZE_PRESETS}")
    if spec.sizes.max_side > facts.FAL_MAX_SIDE:
        out.append(f"fal-qwen max side {spec.sizes.max_side} > fal's {facts.FAL_MAX_SIDE}")
    out += _range_problems(specs, "fal-qwen", "num_inference_steps", facts.FAL_STEPS)
    out += _range_problems(specs, "fal-qwen", "guidance_scale", facts.FAL_GUIDANCE)
    out += _range_problems(specs, "fal-qwen", "num_images", facts.FAL_NUM_IMAGES)
    out += _choice_problems(specs, "fal-qwen", "acceleration", facts.FAL_ACCELERATIONS)
    out += _choice_problems(specs, "fal-qwen", "output_format", facts.FAL_OUTPUT_FORMATS)
    return out


def ideogram_problems(specs: Specs, seed_max: int) -> list[str]:
    spec = specs["ideogram"]
    out = []
    resolutions = {f"{w}x{h}" for w, h in spec.sizes.resolutions}
    if resolutions != facts.IDEOGRAM_RESOLUTIONS:
        out.append(f"ideogram resolutions differ: {sorted(resolutions ^ facts.IDEOGRAM_RESOLUTIONS)}")
    wire_ratios = {ratio.replace(":", "x") for ratio in spec.sizes.aspect_ratios}
    if wire_ratios != set(facts.IDEOGRAM_ASPECT_RATIOS):
        out.append(f"ideogram aspect ratios differ: {sorted(wire_ratios ^ set(facts.IDEOGRAM_ASPECT_RATIOS))}")
    for ratio, (w, h) in spec.sizes.aspect_ratios.items():
        wire = ratio.replace(":", "x")
        if f"{w}x{h}" not in facts.IDEOGRAM_RESOLUTIONS:
            out.append(f"ideogram {ratio} is priced at {w}x{h}, not one of Ideogram's resolutions")
        elif wire in facts.IDEOGRAM_ASPECT_RATIOS and (w, h) != (rendered := facts.ideogram_size_for(wire)):
            out.append(f"ideogram {ratio}: the catalog says {w}x{h}, the emulator renders {rendered}")
    out += _range_problems(specs, "ideogram", "num_images", facts.IDEOGRAM_NUM_IMAGES)
    out += _range_problems(specs, "ideogram", "seed", facts.IDEOGRAM_SEED)
    if seed_max != facts.IDEOGRAM_SEED[1]:
        out.append(f"SEED_MAX {seed_max} != Ideogram's {facts.IDEOGRAM_SEED[1]}")
    out += _choice_problems(specs, "ideogram", "rendering_speed", facts.IDEOGRAM_RENDERING_SPEEDS)
    out += _choice_problems(specs, "ideogram", "magic_prompt", facts.IDEOGRAM_MAGIC_PROMPT)
    out += _choice_problems(specs, "ideogram", "style_type", facts.IDEOGRAM_STYLE_TYPES)
    return out


def huggingface_problems(specs: Specs) -> list[str]:
    choices = set(specs["huggingface"].params["inference_provider"].choices) - {"auto"}
    documented = set(facts.HF_TEXT_TO_IMAGE_PROVIDERS)
    return [f"huggingface inference providers differ: {sorted(choices ^ documented)}"] if choices != documented else []


def qwen_space_problems(specs: Specs, seed_max: int) -> list[str]:
    spec = specs["qwen"]
    out = []
    if dict(spec.sizes.aspect_ratios) != facts.QWEN_SPACE_SIZES:
        differ = {
            ratio: (spec.sizes.aspect_ratios.get(ratio), facts.QWEN_SPACE_SIZES.get(ratio))
            for ratio in set(spec.sizes.aspect_ratios) | set(facts.QWEN_SPACE_SIZES)
            if spec.sizes.aspect_ratios.get(ratio) != facts.QWEN_SPACE_SIZES.get(ratio)
        }
        out.append(f"qwen Space sizes differ (catalog, Space): {differ}")
    out += _range_problems(specs, "qwen", "num_inference_steps", facts.QWEN_SPACE_STEPS)
    out += _range_problems(specs, "qwen", "guidance_scale", facts.QWEN_SPACE_GUIDANCE)
    out += _range_problems(specs, "qwen", "seed", facts.QWEN_SPACE_SEED)
    if seed_max > facts.QWEN_SPACE_SEED[1]:
        out.append(f"SEED_MAX {seed_max} > the Space's {facts.QWEN_SPACE_SEED[1]}")
    return out


def catalog_problems(specs: Specs = PROVIDERS, seed_max: int = SEED_MAX) -> list[str]:
    return (
        fal_problems(specs)
        + ideogram_problems(specs, seed_max)
        + huggingface_problems(specs)
        + qwen_space_problems(specs, seed_max)
    )


def test_the_catalog_agrees_with_the_providers_documented_apis() -> None:
    assert catalog_problems() == []


# -- the check can fail: each wrong fact below is one the emulator used to mirror from the catalog -----------------


def _with_param(provider: str, name: str, **changes: Any) -> dict[str, ProviderSpec]:
    spec = PROVIDERS[provider]
    params = {**spec.params, name: dataclasses.replace(spec.params[name], **changes)}
    return {**PROVIDERS, provider: dataclasses.replace(spec, params=params)}


def _with_sizes(provider: str, **changes: Any) -> dict[str, ProviderSpec]:
    spec = PROVIDERS[provider]
    return {**PROVIDERS, provider: dataclasses.replace(spec, sizes=dataclasses.replace(spec.sizes, **changes))}


WRONG_CATALOGS: dict[str, Callable[[], tuple[dict[str, ProviderSpec], int]]] = {
    "fal preset size": lambda: (
        _with_sizes("fal-qwen", presets={**PROVIDERS["fal-qwen"].sizes.presets, "square_hd": (1024, 1000)}),
        SEED_MAX,
    ),
    "fal guidance above 20": lambda: (_with_param("fal-qwen", "guidance_scale", maximum=25.0), SEED_MAX),
    "fal an acceleration fal lacks": lambda: (
        _with_param("fal-qwen", "acceleration", choices=("none", "regular", "high", "turbo")),
        SEED_MAX,
    ),
    "ideogram 9 images": lambda: (_with_param("ideogram", "num_images", maximum=9), SEED_MAX),
    "ideogram FLASH": lambda: (
        _with_param("ideogram", "rendering_speed", choices=("FLASH", "TURBO", "DEFAULT", "QUALITY")),
        SEED_MAX,
    ),
    "ideogram a resolution it lacks": lambda: (
        _with_sizes("ideogram", resolutions=(*PROVIDERS["ideogram"].sizes.resolutions, (1024, 768))),
        SEED_MAX,
    ),
    "ideogram 16:9 at a size it does not render": lambda: (
        _with_sizes("ideogram", aspect_ratios={**PROVIDERS["ideogram"].sizes.aspect_ratios, "16:9": (1344, 768)}),
        SEED_MAX,
    ),
    "seed max beyond int32": lambda: (dict(PROVIDERS), 2**32),
    "qwen Space 4:3 at the model card's 1472x1140": lambda: (
        _with_sizes("qwen", aspect_ratios={**PROVIDERS["qwen"].sizes.aspect_ratios, "4:3": (1472, 1140)}),
        SEED_MAX,
    ),
    "qwen Space an aspect ratio it lacks": lambda: (
        _with_sizes("qwen", aspect_ratios={**PROVIDERS["qwen"].sizes.aspect_ratios, "21:9": (1664, 704)}),
        SEED_MAX,
    ),
    "fal steps above fal's maximum": lambda: (_with_param("fal-qwen", "num_inference_steps", maximum=300), SEED_MAX),
    "huggingface a provider it does not route to": lambda: (
        _with_param(
            "huggingface",
            "inference_provider",
            choices=(*PROVIDERS["huggingface"].params["inference_provider"].choices, "openai"),
        ),
        SEED_MAX,
    ),
}


@pytest.mark.parametrize("mistake", sorted(WRONG_CATALOGS))
def test_a_wrong_catalog_fact_is_caught(mistake: str) -> None:
    specs, seed_max = WRONG_CATALOGS[mistake]()
    assert catalog_problems(specs, seed_max) != []
