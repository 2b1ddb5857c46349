"""The placeholder renderer's shortcuts give exactly what the plain Pillow calls would: cached text stamps, the
one-column gradient and the hand-written PNG."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageDraw

from core.images import inspect_image
from core.render import RenderSpec, _font, _paste_stamp, _png, _stamp, render_placeholder


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("SANDBOX", 8),
        ("SANDBOX", 42),
        ("SANDBOX", 170),
        ("offline placeholder, not an AI image", 10),
        ("offline placeholder, not an AI image", 32),
    ],
)
def test_a_cached_stamp_gives_the_pixels_of_draw_text(text: str, size: int):
    background = Image.new("RGB", (1200, 300), (40, 90, 140))
    ImageDraw.Draw(background).ellipse((50, 20, 400, 280), outline=(200, 30, 30), width=9)
    expected, got = background.copy(), background.copy()
    ImageDraw.Draw(expected).text((17, 23), text, font=_font(size), fill=(235, 235, 235))
    _paste_stamp(got, _stamp(text, size), (17, 23), (235, 235, 235))
    assert got.tobytes() == expected.tobytes()
    assert _stamp(text, size) is _stamp(text, size)  # rendered once


@pytest.mark.parametrize(("width", "height"), [(16, 16), (256, 256), (640, 480), (576, 1024)])
def test_the_gradient_is_the_bilinear_resize_of_its_column(width: int, height: int):
    rng = random.Random(width * height)
    column = Image.frombytes("RGB", (1, 64), bytes(rng.randrange(256) for _ in range(64 * 3)))
    direct = column.resize((width, height), Image.Resampling.BILINEAR)
    two_steps = column.resize((1, height), Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.NEAREST)
    assert two_steps.tobytes() == direct.tobytes()


@pytest.mark.parametrize(
    ("width", "height", "mode"), [(1, 1, "RGB"), (37, 11, "RGB"), (300, 200, "RGB"), (64, 48, "L")]
)
def test_the_png_is_standard_and_lossless(width: int, height: int, mode: str):
    rng = random.Random(width + height)
    bands = len(mode)
    img = Image.frombytes(mode, (width, height), bytes(rng.randrange(256) for _ in range(width * height * bands)))
    data = _png(img)
    info = inspect_image(data)  # what store_image checks: a complete PNG within limits
    assert (info.format, info.width, info.height) == ("png", width, height)
    with Image.open(io.BytesIO(data)) as back:
        assert back.format == "PNG" and back.mode == "RGB"
        assert back.tobytes() == img.convert("RGB").tobytes()


def test_a_placeholder_is_compressed():
    data = render_placeholder(RenderSpec("a lighthouse", 3, 1024, 1024))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) < 1024 * 1024 * 3 // 10  # far below the 3 MB of its raw pixels
