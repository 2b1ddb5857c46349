"""Deterministic placeholder images for the offline sandbox.

Same inputs, same bytes: every colour and shape comes from a SHA-256 of the inputs, the font is Pillow's
bundled one and PNG encoding is deterministic. The word SANDBOX is drawn large on every image so nobody takes
one for a real generation.
"""

from __future__ import annotations

import hashlib
import io
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


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _fit_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def render_placeholder(spec: RenderSpec) -> bytes:
    """A PNG of spec.width x spec.height: a gradient, shapes from the inputs, SANDBOX and the prompt."""
    w, h = spec.width, spec.height
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ValueError(f"cannot render {w}x{h}: each side must be {MIN_SIDE}-{MAX_SIDE} pixels")
    d = spec.digest()
    top, bottom = (d[0], d[1], d[2]), (d[3], d[4], d[5])

    # The gradient is drawn small and scaled up smoothly: big images cost milliseconds, not a second.
    small = Image.new("RGB", (1, 64))
    for y in range(64):
        t = y / 63
        small.putpixel((0, y), tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    img = small.resize((w, h), Image.Resampling.BILINEAR)
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
    big = _font(shortest // 6)
    label = "SANDBOX"
    left, upper, right, lower = draw.textbbox((0, 0), label, font=big)
    tx, ty = (w - (right - left)) // 2 - left, (h - (lower - upper)) // 2 - upper
    pad = max(4, shortest // 60)
    draw.rectangle((tx + left - pad, ty + upper - pad, tx + right + pad, ty + lower + pad), fill=(0, 0, 0))
    draw.text((tx, ty), label, font=big, fill=(255, 255, 255))

    if shortest < 200:
        # Too small for a legible caption: SANDBOX alone must stay readable.
        return _png(img)
    small_font = _font(max(10, shortest // 32))
    chars = max(8, w // max(6, shortest // 56))
    caption = [
        _fit_text(spec.prompt, chars),
        _fit_text(
            f"seed {spec.seed} · {w}x{h} · steps {spec.num_inference_steps} · guidance {spec.guidance_scale:g}",
            chars,
        ),
        "offline placeholder, not an AI image",
    ]
    line_h = max(12, shortest // 28)
    y = h - pad - line_h * len(caption)
    draw.rectangle((0, y - pad, w, h), fill=(0, 0, 0))
    for line in caption:
        draw.text((pad, y), line, font=small_font, fill=(235, 235, 235))
        y += line_h
    return _png(img)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    # Fast compression: a sandbox image is a placeholder, and encoding time is most of the render time.
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()
