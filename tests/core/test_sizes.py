"""Canonical image sizes and what each provider renders for them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.catalog import IDEOGRAM_RESOLUTIONS, PROVIDERS, QWEN_SPACE_ASPECT_RATIOS
from core.sizes import SizeError, parse_size, resolve_size, size_choices


def test_ideogram_lists_its_69_resolutions() -> None:
    assert len(IDEOGRAM_RESOLUTIONS) == 69 == len(set(IDEOGRAM_RESOLUTIONS))


@pytest.mark.parametrize(
    ("provider", "asked", "width", "height", "form", "wire", "exact"),
    [
        ("fal-qwen", "square_hd", 1024, 1024, "preset", "square_hd", True),
        ("fal-qwen", "1344x768", 1344, 768, "custom", "1344x768", True),
        ("ideogram", "16:9", 1312, 736, "aspect_ratio", "16:9", True),
        ("ideogram", "1344x768", 1344, 768, "resolution", "1344x768", True),
        ("ideogram", "1024x768", 1152, 864, "resolution", "1152x864", False),  # same 4:3 shape
        ("qwen", "16:9", 1664, 928, "aspect_ratio", "16:9", True),
        ("qwen", "square_hd", 1328, 1328, "aspect_ratio", "1:1", False),
        ("huggingface", "1001x1001", 1000, 1000, "custom", "1000x1000", False),  # multiples of 8
    ],
)
def test_what_each_provider_renders(
    provider: str, asked: str, width: int, height: int, form: str, wire: str, exact: bool
) -> None:
    got = resolve_size(provider, asked)
    assert (got.width, got.height, got.form, got.wire_value, got.exact) == (width, height, form, wire, exact)
    assert bool(got.note) != exact  # every change is explained, nothing else is


@pytest.mark.parametrize("bad", ["huge", "0x100", "100x", "16:0", "", "1024 by 768"])
def test_unreadable_sizes_say_what_is_accepted(bad: str) -> None:
    with pytest.raises(SizeError, match=r"preset|positive"):
        parse_size(bad)


def test_sizes_outside_a_providers_limits_are_refused() -> None:
    with pytest.raises(SizeError, match=r"fal-qwen cannot render 20000x512: width 20000 is outside 64-14142"):
        resolve_size("fal-qwen", "20000x512")
    with pytest.raises(SizeError, match="huggingface"):
        resolve_size("huggingface", "128x128")


@given(st.sampled_from(sorted(PROVIDERS)), st.sampled_from([*QWEN_SPACE_ASPECT_RATIOS, "square", "landscape_16_9"]))
def test_every_provider_renders_something_for_common_sizes(provider: str, size: str) -> None:
    got = resolve_size(provider, size)
    spec = PROVIDERS[provider].sizes
    assert got.width > 0 and got.height > 0
    if got.form == "aspect_ratio":
        assert got.wire_value in spec.aspect_ratios
    if got.form == "resolution":
        assert (got.width, got.height) in spec.resolutions


def test_size_choices_are_native_forms() -> None:
    assert "square_hd" in size_choices("fal-qwen")
    assert size_choices("qwen") == list(QWEN_SPACE_ASPECT_RATIOS)
    assert "1024x1024" in size_choices("ideogram")
