"""core.images: only real images within limits are accepted, and they are stored once, by content, atomically."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from core.images import InvalidImage, image_path, inspect_image, store_image


def _encode(fmt: str, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height with a few bytes of pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_accepts_png_jpeg_and_webp(fmt: str, name: str):
    info = inspect_image(_encode(fmt))
    assert (info.format, info.width, info.height) == (name, 32, 24)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"error": "not found"}',
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
    ],
)
def test_refuses_bytes_that_are_not_an_image(data: bytes):
    with pytest.raises(InvalidImage):
        inspect_image(data)


def test_refuses_a_truncated_png():
    whole = _encode("PNG", (64, 64))
    for cut in (len(whole) // 2, len(whole) - 12):  # mid pixel data; without the IEND chunk
        with pytest.raises(InvalidImage):
            inspect_image(whole[:cut])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_refuses_formats_other_than_png_jpeg_webp(fmt: str):
    with pytest.raises(InvalidImage, match="unsupported image format"):
        inspect_image(_encode(fmt))


def test_refuses_huge_dimensions_from_the_header_alone():
    # Over the product's own pixel limit, under Pillow's bomb threshold: refused by the limit check.
    with pytest.raises(InvalidImage, match="pixel limit"):
        inspect_image(_png_header_only(9000, 9000))
    # A decompression bomb's header (10^10 pixels): refused without decoding anything.
    with pytest.raises(InvalidImage, match=r"DecompressionBomb|pixel limit"):
        inspect_image(_png_header_only(100_000, 100_000))


def test_byte_and_pixel_limits_are_parameters():
    data = _encode("PNG", (40, 40))
    with pytest.raises(InvalidImage, match="byte limit"):
        inspect_image(data, max_bytes=len(data) - 1)
    with pytest.raises(InvalidImage, match="pixel limit"):
        inspect_image(data, max_pixels=40 * 40 - 1)
    assert inspect_image(data, max_bytes=len(data), max_pixels=40 * 40).size_bytes == len(data)


def test_store_is_content_addressed_and_idempotent(tmp_path: Path):
    data = _encode("WEBP")
    first = store_image(data, root=tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    assert first.sha256 == digest
    assert first.path == tmp_path / digest[:2] / f"{digest}.webp"
    assert first.path.read_bytes() == data
    assert first.ref == f"{digest}.webp"
    assert image_path(first.ref, root=tmp_path) == first.path

    mtime = first.path.stat().st_mtime_ns
    second = store_image(data, root=tmp_path)
    assert second == first and first.path.stat().st_mtime_ns == mtime  # not written again
    other = store_image(_encode("WEBP", colour=(1, 2, 3)), root=tmp_path)
    assert other.sha256 != first.sha256
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([first.path.name, other.path.name])


def test_an_invalid_image_stores_nothing(tmp_path: Path):
    with pytest.raises(InvalidImage):
        store_image(b"not an image", root=tmp_path)
    assert list(tmp_path.rglob("*")) == []


def test_a_failed_write_leaves_no_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = _encode("PNG")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store_image(data, root=tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []

    monkeypatch.undo()
    stored = store_image(data, root=tmp_path)
    assert stored.path.read_bytes() == data


def test_image_path_refuses_what_is_not_a_reference(tmp_path: Path):
    for ref in ("../../etc/passwd", "abc.png", ""):
        with pytest.raises(ValueError, match="not an image reference"):
            image_path(ref, root=tmp_path)
    # A path is reduced to its name: a reference cannot point outside the images directory.
    digest = "a" * 64
    assert image_path(f"../../{digest}.png", root=tmp_path) == tmp_path / "aa" / f"{digest}.png"
