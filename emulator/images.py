"""Real images for the emulators: deterministic from prompt, seed and size, encoded as PNG, JPEG or WEBP."""

from __future__ import annotations

import hashlib
import io

from PIL import Image, ImageDraw


def render_image(prompt: str, seed: int, width: int, height: int, fmt: str = "png") -> bytes:
    """A gradient whose colours come from prompt and seed, with a frame: cheap, real, deterministic."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    c1 = tuple(digest[0:3])
    c2 = tuple(digest[3:6])
    # Render small and scale up: a 1328x1328 image costs milliseconds, not a second.
    small_w, small_h = max(1, min(width, 64)), max(1, min(height, 64))
    img = Image.new("RGB", (small_w, small_h))
    draw = ImageDraw.Draw(img)
    for y in range(small_h):
        t = y / max(1, small_h - 1)
        colour = tuple(int(a + (b - a) * t) for a, b in zip(c1, c2, strict=True))
        draw.line([(0, y), (small_w, y)], fill=colour)
    img = img.resize((width, height), Image.Resampling.NEAREST)
    out = io.BytesIO()
    pil_format = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}[fmt.lower()]
    img.save(out, format=pil_format)
    return out.getvalue()
