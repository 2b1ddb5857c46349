"""Deterministic placeholder images for the offline sandbox.

Same inputs, same bytes: every colour and shape comes from a SHA-256 of the inputs, the font is Pillow's
bundled one and PNG encoding is deterministic. The word SANDBOX is drawn large on every image so nobody takes
one for a real generation.

Every offline request renders here, so it is kept cheap without changing a pixel: fonts, and the text that
depends only on the image's size (the SANDBOX label, the "offline placeholder" line), are rendered once per size
and cached; the gradient is scaled in one dimension only; the PNG is written unfiltered at zlib level 1 (_png).
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 16
MAX_SIDE = 4096


@dataclass(frozen=True)
class RenderSpec:
    """Everything that decides the picture."""

    prompt: str
    seed: int
    width: int
    height: int
    negative_prompt: str = ""
    guidance_scale: float = 0.0
    num_inference_steps: int = 1

    def digest(self) -> bytes:
        key = "\x00".join(
            (
                self.prompt,
                str(self.seed),
                f"{self.width}x{self.height}",
                self.negative_prompt,
                repr(float(self.guidance_scale)),
                str(self.num_inference_steps),
            )
        )
        return hashlib.sha256(key.encode("utf-8")).digest()


OFFLINE_NOTE = "offline placeholder, not an AI image"


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The bundled font at `size`, loaded once: load_default decodes the font from base64 on every call.
    Sharing one font between the to_thread workers is safe: FreeType runs under the GIL, and Pillow >= 12.2
    locks each font in free-threaded builds."""
    return ImageFont.load_default(size=max(8, size))


@dataclass(frozen=True)
class _Stamp:
    """A line of text rendered once as an 8-bit coverage mask, with its bounding box at origin (0, 0)."""

    mask: Image.Image
    bbox: tuple[int, int, int, int]


@functools.lru_cache(maxsize=128)
def _stamp(text: str, font_size: int) -> _Stamp:
    """`text` in the font of `font_size`, as draw.text would put it: pasting `mask` in a colour at (x + left,
    y + top) gives the same pixels as draw.text((x, y), text) (both blend through the same fill-with-mask).
    Only for text that repeats across images; a prompt or a seed would just fill the cache."""
    font = _font(font_size)
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    return _Stamp(mask, (left, top, right, bottom))


def _paste_stamp(img: Image.Image, stamp: _Stamp, xy: tuple[int, int], colour: tuple[int, int, int]) -> None:
    img.paste(colour, (xy[0] + stamp.bbox[0], xy[1] + stamp.bbox[1]), stamp.mask)


def _fit_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def render_placeholder(spec: RenderSpec) -> bytes:
    """A PNG of spec.width x spec.height: a gradient, shapes from the inputs, SANDBOX and the prompt."""
    w, h = spec.width, spec.height
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ValueError(f"cannot render {w}x{h}: each side must be {MIN_SIDE}-{MAX_SIDE} pixels")
    d = spec.digest()
    top, bottom = (d[0], d[1], d[2]), (d[3], d[4], d[5])

    # The gradient is drawn as one column of 64 pixels, scaled smoothly to the height, then widened by copying
    # the column (all columns are the same): the same pixels as one bilinear resize to (w, h), at a sixth of
    # its cost for big images.
    column = bytes(int(a + (b - a) * (y / 63)) for y in range(64) for a, b in zip(top, bottom, strict=True))
    small = Image.frombytes("RGB", (1, 64), column)
    img = small.resize((1, h), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)

    # A few translucent-looking shapes, placed and coloured by the digest (guidance and steps included).
    for i in range(4):
        b = d[6 + i * 6 : 12 + i * 6]
        cx, cy = b[0] * w // 255, b[1] * h // 255
        r = max(4, (b[2] % 64 + 16) * min(w, h) // 256)
        colour = (b[3], b[4], b[5])
        box = (cx - r, cy - r, cx + r, cy + r)
        if i % 2:
            draw.rectangle(box, outline=colour, width=max(2, r // 10))
        else:
            draw.ellipse(box, outline=colour, width=max(2, r // 10))

    shortest = min(w, h)
    label = _stamp("SANDBOX", max(8, shortest // 6))
    left, upper, right, lower = label.bbox
    tx, ty = (w - (right - left)) // 2 - left, (h - (lower - upper)) // 2 - upper
    pad = max(4, shortest // 60)
    draw.rectangle((tx + left - pad, ty + upper - pad, tx + right + pad, ty + lower + pad), fill=(0, 0, 0))
    _paste_stamp(img, label, (tx, ty), (255, 255, 255))

    if shortest < 200:
        # Too small for a legible caption: SANDBOX alone must stay readable.
        return _png(img)
    small_size = max(10, shortest // 32)
    small_font = _font(small_size)
    chars = max(8, w // max(6, shortest // 56))
    caption = [
        _fit_text(spec.prompt, chars),
        _fit_text(
            f"seed {spec.seed} · {w}x{h} · steps {spec.num_inference_steps} · guidance {spec.guidance_scale:g}",
            chars,
        ),
    ]
    line_h = max(12, shortest // 28)
    y = h - pad - line_h * (len(caption) + 1)
    draw.rectangle((0, y - pad, w, h), fill=(0, 0, 0))
    for line in caption:
        draw.text((pad, y), line, font=small_font, fill=(235, 235, 235))
        y += line_h
    # The last line is the same on every image of this size: rendered once.
    _paste_stamp(img, _stamp(OFFLINE_NOTE, small_size), (pad, y), (235, 235, 235))
    return _png(img)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_NONE = b"\x00"


def _png(img: Image.Image) -> bytes:
    """`img` (RGB) as a PNG: 8-bit truecolour, every row unfiltered, deflated at zlib level 1.

    Written here rather than by Image.save because Pillow's encoder tries all five PNG row filters on every
    row to pick the best, which is most of its time (about half the encode of a 1024x1024 placeholder), and
    buys nothing on flat colour and text: unfiltered rows deflate to about the same size. The output is a
    standard PNG that Pillow and every browser read; deterministic for a given zlib, like Pillow's."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    rows = memoryview(img.tobytes())
    stride = width * 3
    deflate = zlib.compressobj(1)
    parts: list[bytes] = []
    for start in range(0, len(rows), stride):
        parts.append(deflate.compress(_FILTER_NONE))
        parts.append(deflate.compress(rows[start : start + stride]))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
