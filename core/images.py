"""Checking and storing generated images.

Provider URLs expire, so adapters download at once; every image is checked to be a real image within limits
(anything else is the provider's `bad_response`) and stored content-addressed: the same bytes land once.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.config import images_dir

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000  # above any provider's output (fal's 14142x14142 custom size excepted)
ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


class InvalidImage(ValueError):
    """The bytes are not an image we accept. The message says why."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png | jpeg | webp
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path
    format: str
    width: int
    height: int
    size_bytes: int

    @property
    def ref(self) -> str:
        """What the database keeps: the content address, relative to the images directory."""
        return f"{self.sha256}.{self.format}"


def inspect_image(
    data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> ImageInfo:
    """Check that `data` is a complete PNG, JPEG or WEBP image within limits, without decoding a bomb."""
    if not data:
        raise InvalidImage("empty image (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes, over the {max_bytes} byte limit")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidImage(f"unsupported image format {fmt or 'unknown'!r}")
            if width <= 0 or height <= 0:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            # Checked before decoding, so a decompression bomb is refused from its header alone.
            if width * height > max_pixels:
                raise InvalidImage(f"image is {width}x{height}, over the {max_pixels} pixel limit")
            img.verify()
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        preview = data[:32]
        raise InvalidImage(f"not a readable image ({exc.__class__.__name__}: {exc}); starts with {preview!r}") from exc
    return ImageInfo(format=ALLOWED_FORMATS[fmt], width=width, height=height, size_bytes=len(data))


def store_image(data: bytes, *, root: Path | None = None) -> StoredImage:
    """Validate and store `data` under its SHA-256. Writing is atomic (temp file + rename)."""
    info = inspect_image(data)
    digest = hashlib.sha256(data).hexdigest()
    base = root or images_dir()
    folder = base / digest[:2]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.{info.format}"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return StoredImage(digest, path, info.format, info.width, info.height, info.size_bytes)


def image_path(ref: str, *, root: Path | None = None) -> Path:
    """The file for a stored image reference (`<sha256>.<format>`)."""
    name = Path(ref).name
    if len(name.split(".")[0]) != 64:
        raise ValueError(f"not an image reference: {ref!r}")
    return (root or images_dir()) / name[:2] / name
