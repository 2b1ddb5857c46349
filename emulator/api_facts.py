"""Each provider's API as its own documentation states it: the emulator's statement, independent of the product.

The emulator never takes these from the product's catalog (core.catalog; no module under emulator/ imports
core, db or common): a wrong catalog fact would be mirrored here and no contract test could catch it.
tests/emulator/test_contract.py compares the product's catalog against this module where they overlap.

Source of every fact, unless its comment names another: /work/shared/reference/providers.md ("Provider facts":
the providers' published documentation and their client packages, fal-client 1.0.3, huggingface-hub 2.4.0,
gradio-client 2.7.2, as of autumn 2026). Facts the documentation leaves open are marked as the emulator's choice.
"""

from __future__ import annotations

# --- fal.ai: fal-ai/qwen-image (providers.md, "Model input") ------------------------------------------------

FAL_IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
FAL_DEFAULT_IMAGE_SIZE = "landscape_4_3"
FAL_MAX_SIDE = 14142
"""`image_size` as `{width, height}`: each at most 14142."""
FAL_STEPS = (2, 250)
FAL_DEFAULT_STEPS = 30
FAL_GUIDANCE = (0.0, 20.0)
FAL_DEFAULT_GUIDANCE = 2.5
FAL_NUM_IMAGES = (1, 4)
FAL_ACCELERATIONS = ("none", "regular", "high")
FAL_OUTPUT_FORMATS = ("jpeg", "png")
FAL_MAX_LORAS = 3
FAL_LORA_SCALE = (0.0, 4.0)
FAL_DEFAULT_NEGATIVE_PROMPT = " "

# --- Ideogram 3.0: POST /v1/ideogram-v3/generate (providers.md, "Ideogram") ----------------------------------

IDEOGRAM_SEED = (0, 2_147_483_647)
IDEOGRAM_NUM_IMAGES = (1, 8)
IDEOGRAM_ASPECT_RATIOS: tuple[str, ...] = (
    "1x3", "3x1", "1x2", "2x1", "9x16", "16x9", "10x16", "16x10", "2x3", "3x2", "3x4", "4x3", "4x5", "5x4", "1x1",
)  # fmt: skip
"""Wire spelling, with an x."""
IDEOGRAM_DEFAULT_ASPECT_RATIO = "1x1"
IDEOGRAM_RENDERING_SPEEDS = ("TURBO", "DEFAULT", "QUALITY")
"""FLASH is listed too but reportedly answered 400 on some endpoints: the emulator refuses it."""
IDEOGRAM_MAGIC_PROMPT = ("AUTO", "ON", "OFF")
IDEOGRAM_STYLE_TYPES = ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "FICTION")
# providers.md gives the form and the count ("one of 69 WxH values"); the values are the `resolution` enum of
# Ideogram's v3 API reference (https://developer.ideogram.ai/api-reference/api-reference/generate-v3), as its
# generated SDKs list it.
IDEOGRAM_RESOLUTIONS: frozenset[str] = frozenset(
    """
    512x1536 576x1408 576x1472 576x1536 640x1344 640x1408 640x1472 640x1536 704x1152 704x1216 704x1280 704x1344
    704x1408 704x1472 736x1312 768x1088 768x1216 768x1280 768x1344 800x1280 832x960 832x1024 832x1088 832x1152
    832x1216 832x1248 864x1152 896x960 896x1024 896x1088 896x1120 896x1152 960x832 960x896 960x1024 960x1088
    1024x832 1024x896 1024x960 1024x1024 1088x768 1088x832 1088x896 1088x960 1120x896 1152x704 1152x832 1152x864
    1152x896 1216x704 1216x768 1216x832 1248x832 1280x704 1280x768 1280x800 1312x736 1344x640 1344x704 1344x768
    1408x576 1408x640 1408x704 1472x576 1472x640 1472x704 1536x512 1536x576 1536x640
    """.split()
)


def _dims(resolution: str) -> tuple[int, int]:
    width, height = resolution.split("x")
    return int(width), int(height)


def ideogram_size_for(aspect_ratio: str) -> tuple[int, int]:
    """The size the emulator renders a wire aspect ratio (`16x9`) at. Ideogram does not document it; the
    emulator's choice is the resolution whose ratio is nearest, and of those the one nearest a megapixel."""
    a, b = (int(part) for part in aspect_ratio.split("x"))
    return min(
        (_dims(r) for r in IDEOGRAM_RESOLUTIONS),
        key=lambda wh: (abs(wh[0] / wh[1] - a / b), abs(wh[0] * wh[1] - 1024 * 1024)),
    )


# --- Hugging Face Inference (providers.md, "Hugging Face Inference") ------------------------------------------

HF_TEXT_TO_IMAGE_PROVIDERS = ("fal-ai", "hf-inference", "nscale", "replicate", "together", "wavespeed", "zai-org")
"""Inference providers huggingface-hub 2.4.0 routes text-to-image to (`provider="auto"` takes the first mapping)."""

# --- The Qwen/Qwen-Image Space, endpoint /infer (providers.md, "Hugging Face Spaces") ---------------------------

# providers.md lists 1:1, 16:9, 9:16, 3:2 and 2:3, and "4:3 1472x1140 or 1472x1104". The Space's app
# (get_image_size(), as ported in OpenVINO's Qwen-Image notebook) renders 4:3 at 1472x1104 and 3:4 at 1104x1472:
# multiples of 16, which the Qwen-Image pipeline needs (1140 is not; the model card's 1472x1140 comes out 1136
# high). The Space's choices are these seven.
QWEN_SPACE_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}
QWEN_SPACE_DEFAULT_ASPECT_RATIO = "16:9"
QWEN_SPACE_GUIDANCE = (0.0, 10.0)
QWEN_SPACE_DEFAULT_GUIDANCE = 4.0
QWEN_SPACE_STEPS = (1, 50)
QWEN_SPACE_DEFAULT_STEPS = 50
QWEN_SPACE_SEED = (0, 2_147_483_647)
"""The Space's MAX_SEED is np.iinfo(np.int32).max (its app's seed slider); providers.md does not state it."""
