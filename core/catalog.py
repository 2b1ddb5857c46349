"""What each provider is: label, key env vars, routing defaults and the parameters it accepts.

Parameters use one canonical vocabulary across providers (fal's names, the richest API); adapters translate
them to each provider's wire names. `ParamSpec` ranges here are the limits an admin may choose within; they are
the provider's own limits or tighter ones the product sets (fal-qwen steps 1-50 instead of fal's 2-250).

Prices are not here: they are versioned data (core.pricing, the price_versions table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

ParamKind = Literal["int", "float", "bool", "enum", "str", "size"]

# Parameters every request may carry, whatever the provider. Everything else is provider-specific.
COMMON_PARAMS: tuple[str, ...] = (
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "image_size",
    "num_images",
    "seed",
    "enable_safety_checker",
    "sync_mode",
)

SEED_MAX = 2_147_483_647
PROMPT_MAX_CHARS = 4000


class ProviderKind(StrEnum):
    PAID = "paid"
    FREE = "free"  # no money, but a quota (GPU seconds) is the scarce resource
    SANDBOX = "sandbox"  # offline, renders locally; never a real provider


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: ParamKind
    label: str
    description: str
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    step: float | None = None
    """UI hint for sliders."""
    receives_key: bool = False
    """A URL given here is called with the provider's key, so core.keys decides which URLs are allowed."""


@dataclass(frozen=True)
class SizeSpec:
    """The image sizes a provider can produce.

    A canonical `image_size` value is one of: a preset name (`square_hd`), an aspect ratio (`16:9`) or
    explicit dimensions (`1024x768`). Each provider produces some of these natively; core.sizes translates
    the others to the nearest thing it can do and says what it changed.
    """

    presets: dict[str, tuple[int, int]] = field(default_factory=dict)
    aspect_ratios: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Aspect ratio -> the dimensions the provider renders for it."""
    resolutions: tuple[tuple[int, int], ...] = ()
    """An explicit list of allowed dimensions (Ideogram); empty = any within custom limits."""
    custom: bool = False
    min_side: int = 64
    max_side: int = 2048
    multiple_of: int = 1


@dataclass(frozen=True)
class ProviderSpec:
    id: str
    label: str
    description: str
    kind: ProviderKind
    key_env_vars: tuple[tuple[str, ...], ...]
    """Alternatives; each is a set of variables that together make a credential (FAL_KEY, or ID + SECRET)."""
    params: dict[str, ParamSpec]
    sizes: SizeSpec
    default_priority: int
    premium: bool = False
    """Premium providers are used only when asked for by name, unless an admin enables automatic routing."""
    max_in_flight: int | None = None
    """Requests the provider accepts in flight per account (Ideogram: 10); None = no limit we must keep (fal
    queues requests over its cap instead of refusing them). A provider's settings may set their own."""
    docs_url: str = ""

    def param(self, name: str) -> ParamSpec | None:
        return self.params.get(name)

    def supports(self, name: str) -> bool:
        return name in self.params


def _p(spec: ParamSpec) -> tuple[str, ParamSpec]:
    return spec.name, spec


FAL_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

# Ideogram 3.0's allowed `resolution` values (its API reference lists 69).
IDEOGRAM_RESOLUTIONS: tuple[tuple[int, int], ...] = tuple(
    (int(w), int(h))
    for w, h in (
        r.split("x")
        for r in (
            "512x1536 576x1408 576x1472 576x1536 640x1344 640x1408 640x1472 640x1536 704x1152 704x1216 "
            "704x1280 704x1344 704x1408 704x1472 736x1312 768x1088 768x1216 768x1280 768x1344 800x1280 "
            "832x960 832x1024 832x1088 832x1152 832x1216 832x1248 864x1152 896x960 896x1024 896x1088 "
            "896x1120 896x1152 960x832 960x896 960x1024 960x1088 1024x832 1024x896 1024x960 1024x1024 "
            "1088x768 1088x832 1088x896 1088x960 1120x896 1152x704 1152x832 1152x864 1152x896 1216x704 "
            "1216x768 1216x832 1248x832 1280x704 1280x768 1280x800 1312x736 1344x640 1344x704 1344x768 "
            "1408x576 1408x640 1408x704 1472x576 1472x640 1472x704 1536x512 1536x576 1536x640"
        ).split()
    )
)

# Ideogram aspect ratios (wire form uses "x": 16x9); the dimensions are what it renders at default resolution.
IDEOGRAM_ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "1:3": (512, 1536),
    "3:1": (1536, 512),
    "1:2": (704, 1408),
    "2:1": (1408, 704),
    "9:16": (736, 1312),
    "16:9": (1312, 736),
    "10:16": (800, 1280),
    "16:10": (1280, 800),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1152),
    "4:3": (1152, 864),
    "4:5": (896, 1120),
    "5:4": (1120, 896),
}

# The Qwen-Image Space renders one fixed size per aspect ratio. 4:3 is 1472x1104 (the Space's get_image_size();
# providers.md: "1472x1140 or 1472x1104"): the model card's 1472x1140 is not a multiple of 16 and cannot come out.
QWEN_SPACE_ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

_NEGATIVE_PROMPT = ParamSpec(
    "negative_prompt", "str", "Negative prompt", "What the image should not contain.", default=""
)
_SEED = ParamSpec(
    "seed", "int", "Seed", "Same seed + same parameters = same image. Empty = random.", None, 0, SEED_MAX
)


def _num_images(maximum: int) -> ParamSpec:
    return ParamSpec("num_images", "int", "Number of images", "Images per request.", 1, 1, maximum, step=1)


def _steps(default: int, maximum: int) -> ParamSpec:
    return ParamSpec(
        "num_inference_steps",
        "int",
        "Inference steps",
        "More steps: more detail, slower (and on GPU-second pricing, dearer).",
        default,
        1,
        maximum,
        step=1,
    )


def _guidance(default: float, maximum: float) -> ParamSpec:
    return ParamSpec(
        "guidance_scale",
        "float",
        "Guidance scale",
        "How closely the image follows the prompt.",
        default,
        0.0,
        maximum,
        step=0.1,
    )


def _image_size(default: str, description: str) -> ParamSpec:
    return ParamSpec("image_size", "size", "Image size", description, default)


FAL_QWEN = ProviderSpec(
    id="fal-qwen",
    label="fal.ai Qwen-Image",
    description="Qwen-Image on fal.ai's queue API (fal-client). Billed per megapixel of output.",
    kind=ProviderKind.PAID,
    key_env_vars=(("FAL_KEY",), ("FAL_KEY_ID", "FAL_KEY_SECRET")),
    params=dict(
        [
            _p(_NEGATIVE_PROMPT),
            _p(_steps(25, 50)),
            _p(_guidance(3.0, 20.0)),
            _p(_image_size("landscape_4_3", "A fal preset or custom WIDTHxHEIGHT.")),
            _p(_num_images(4)),
            _p(_SEED),
            _p(
                ParamSpec(
                    "enable_safety_checker",
                    "bool",
                    "Safety checker",
                    "fal flags NSFW output and blanks it.",
                    True,
                )
            ),
            _p(
                ParamSpec(
                    "sync_mode",
                    "bool",
                    "Sync mode",
                    "Return images inline as data URIs; fal keeps no request history.",
                    False,
                )
            ),
            _p(
                ParamSpec(
                    "acceleration",
                    "enum",
                    "Acceleration",
                    "Faster inference at some quality cost.",
                    "none",
                    choices=("none", "regular", "high"),
                )
            ),
            _p(
                ParamSpec(
                    "output_format", "enum", "Output format", "Image file format.", "png",
                    choices=("jpeg", "png"),
                )
            ),
        ]
    ),
    sizes=SizeSpec(presets=FAL_SIZE_PRESETS, custom=True, min_side=64, max_side=14142),
    default_priority=98,
    docs_url="https://fal.ai/models/fal-ai/qwen-image/api",
)

IDEOGRAM = ProviderSpec(
    id="ideogram",
    label="Ideogram 3.0",
    description="Ideogram's v3 REST API. Billed per image by rendering speed. Premium: by name only.",
    kind=ProviderKind.PAID,
    key_env_vars=(("IDEOGRAM_API_KEY",),),
    params=dict(
        [
            _p(_NEGATIVE_PROMPT),
            _p(
                _image_size(
                    "1:1", "An aspect ratio (16:9) or one of Ideogram's resolutions (1024x1024)."
                )
            ),
            _p(_num_images(8)),
            _p(_SEED),
            _p(
                ParamSpec(
                    "rendering_speed",
                    "enum",
                    "Rendering speed",
                    "TURBO is cheapest, QUALITY best; the price per image follows it.",
                    "DEFAULT",
                    choices=("TURBO", "DEFAULT", "QUALITY"),
                )
            ),
            _p(
                ParamSpec(
                    "magic_prompt",
                    "enum",
                    "Magic prompt",
                    "Let Ideogram rewrite the prompt.",
                    "AUTO",
                    choices=("AUTO", "ON", "OFF"),
                )
            ),
            _p(
                ParamSpec(
                    "style_type",
                    "enum",
                    "Style type",
                    "Overall style.",
                    "AUTO",
                    choices=("AUTO", "GENERAL", "REALISTIC", "DESIGN", "FICTION"),
                )
            ),
        ]
    ),
    sizes=SizeSpec(
        aspect_ratios=IDEOGRAM_ASPECT_RATIOS,
        resolutions=IDEOGRAM_RESOLUTIONS,
        custom=False,
        min_side=512,
        max_side=1536,
    ),
    default_priority=100,
    premium=True,
    max_in_flight=10,
    docs_url="https://developer.ideogram.ai/api-reference/api-reference/generate-v3",
)

HUGGINGFACE = ProviderSpec(
    id="huggingface",
    label="Hugging Face Inference",
    description="HF Inference Providers through huggingface_hub's InferenceClient (a model id or an endpoint URL).",
    kind=ProviderKind.PAID,
    key_env_vars=(("HF_TOKEN",),),
    params=dict(
        [
            _p(_NEGATIVE_PROMPT),
            _p(_steps(25, 50)),
            _p(_guidance(3.0, 20.0)),
            _p(_image_size("1024x1024", "WIDTHxHEIGHT (multiples of 8), or a preset or aspect ratio.")),
            _p(_num_images(4)),
            _p(_SEED),
            _p(
                ParamSpec(
                    "model",
                    "str",
                    "Model",
                    "A Hub model id (Qwen/Qwen-Image) or an inference endpoint URL (Hugging Face's own hosts, "
                    "or one allowed in IMAGEGATE_HF_ALLOWED_ENDPOINTS).",
                    "Qwen/Qwen-Image",
                    receives_key=True,
                )
            ),
            _p(
                ParamSpec(
                    "inference_provider",
                    "enum",
                    "Inference provider",
                    "Who runs the model; auto = the model's first mapping on the Hub.",
                    "auto",
                    choices=(
                        "auto",
                        "fal-ai",
                        "hf-inference",
                        "nscale",
                        "replicate",
                        "together",
                        "wavespeed",
                        "zai-org",
                    ),
                )
            ),
        ]
    ),
    sizes=SizeSpec(presets=FAL_SIZE_PRESETS, custom=True, min_side=256, max_side=2048, multiple_of=8),
    default_priority=90,
    docs_url="https://huggingface.co/docs/huggingface_hub/guides/inference",
)

QWEN_SPACE = ProviderSpec(
    id="qwen",
    label="Qwen-Image Space (free)",
    description="The free Qwen/Qwen-Image Space on Hugging Face (gradio_client). $0, limited by ZeroGPU quota.",
    kind=ProviderKind.FREE,
    key_env_vars=(("HF_TOKEN",),),
    params=dict(
        [
            _p(_steps(50, 50)),
            _p(_guidance(4.0, 10.0)),
            _p(_image_size("16:9", "One of the Space's aspect ratios.")),
            _p(_num_images(1)),
            _p(_SEED),
            _p(
                ParamSpec(
                    "prompt_enhance",
                    "bool",
                    "Prompt enhance",
                    "Let the Space rewrite the prompt before rendering.",
                    True,
                )
            ),
        ]
    ),
    sizes=SizeSpec(aspect_ratios=QWEN_SPACE_ASPECT_RATIOS, custom=False, min_side=928, max_side=1664),
    default_priority=95,
    docs_url="https://huggingface.co/spaces/Qwen/Qwen-Image",
)

SANDBOX = ProviderSpec(
    id="sandbox",
    label="Sandbox (offline)",
    description="Renders a deterministic placeholder image locally with Pillow. No network, no cost. Not AI.",
    kind=ProviderKind.SANDBOX,
    key_env_vars=(),
    params=dict(
        [
            _p(_NEGATIVE_PROMPT),
            _p(_steps(25, 50)),
            _p(_guidance(3.0, 20.0)),
            _p(_image_size("square_hd", "A preset, an aspect ratio or WIDTHxHEIGHT.")),
            _p(_num_images(4)),
            _p(_SEED),
        ]
    ),
    sizes=SizeSpec(presets=FAL_SIZE_PRESETS, aspect_ratios={}, custom=True, min_side=64, max_side=2048),
    default_priority=10,
)

PROVIDERS: dict[str, ProviderSpec] = {p.id: p for p in (FAL_QWEN, IDEOGRAM, HUGGINGFACE, QWEN_SPACE, SANDBOX)}


def get_provider(provider_id: str) -> ProviderSpec:
    try:
        return PROVIDERS[provider_id]
    except KeyError:
        known = ", ".join(PROVIDERS)
        raise KeyError(f"unknown provider {provider_id!r}; known providers: {known}") from None


def provider_ids() -> list[str]:
    return list(PROVIDERS)
