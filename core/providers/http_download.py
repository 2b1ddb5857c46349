"""Downloading provider images: bounded in time and size, every failure mapped onto ProviderError.

Provider image URLs are short-lived (fal's CDN, Ideogram's signed URLs), so adapters fetch them right after a
result arrives. A URL may also be a `data:` URI (fal's sync_mode). Bytes are checked to be a real image and
stored content-addressed (core.images.store_image).

Mapping: HTTP 4xx on the image (expired or missing) and anything that is not an acceptable image ->
BAD_RESPONSE; HTTP 5xx and connection failures -> UNAVAILABLE; the deadline -> TIMEOUT.
Billing: a download happens after the provider produced (and billed) the images, so every error here carries
the billing facts the caller hands in (`Billed`): fal's reported units, Ideogram's image count.
No provider credentials are ever sent here: image hosts do not need them, and must not see them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote_to_bytes

import httpx

from common.errors import Billing, ErrorClass, ProviderError
from core.images import MAX_IMAGE_BYTES, InvalidImage, StoredImage, store_image

MAX_REDIRECTS = 5
_USER_AGENT = "imagegate-downloader"


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The process's one SSL context for our HTTP clients. httpx builds a new one (loading the whole CA bundle,
    10-40 ms of CPU) for every client it creates without one, and adapters create clients per operation; an
    SSL context is safe to share across threads and event loops. Built on first use with httpx's own defaults
    (certifi, or SSL_CERT_FILE / SSL_CERT_DIR as set at that moment)."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class Billed:
    """What the provider billed for the images being downloaded, as far as the caller knows."""

    billing: Billing
    units: Decimal | None = None


def _error(
    error_class: ErrorClass,
    message: str,
    provider: str,
    *,
    billed: Billed,
    status_code: int | None = None,
    provider_request_id: str | None = None,
) -> ProviderError:
    return ProviderError(
        error_class,
        message,
        provider=provider,
        billing=billed.billing,
        billed_units=billed.units,
        status_code=status_code,
        provider_request_id=provider_request_id,
    )


def _short(url: str) -> str:
    """A URL for messages: data URIs and signed query strings are long and say nothing to a person."""
    if url.startswith("data:"):
        return url[: url.find(",") if "," in url else 30] + ",..."
    return url.split("?", 1)[0][:200]


def decode_data_uri(uri: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a `data:[<mediatype>][;base64],<data>` URI. Raises ValueError with a reason."""
    if not uri.startswith("data:") or "," not in uri:
        raise ValueError("not a data URI (want data:<type>;base64,<data>)")
    header, payload = uri[5:].split(",", 1)
    # base64 is 4 chars per 3 bytes: refuse an oversized payload before decoding it.
    if len(payload) > (max_bytes // 3 + 1) * 4 + 4:
        raise ValueError(f"data URI holds more than {max_bytes} bytes")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"data URI is not valid base64 ({exc})") from None
    return unquote_to_bytes(payload)


async def _fetch(
    client: httpx.AsyncClient, url: str, max_bytes: int, provider: str, request_id: str | None, billed: Billed
) -> bytes:
    async with client.stream("GET", url) as response:
        if response.status_code >= 400:
            error_class = ErrorClass.UNAVAILABLE if response.status_code >= 500 else ErrorClass.BAD_RESPONSE
            raise _error(
                error_class,
                f"image download failed: HTTP {response.status_code} for {_short(url)}",
                provider,
                status_code=response.status_code,
                provider_request_id=request_id,
                billed=billed,
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _error(
                ErrorClass.BAD_RESPONSE,
                f"image at {_short(url)} is {declared} bytes, over the {max_bytes} byte limit",
                provider,
                provider_request_id=request_id,
                billed=billed,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise _error(
                    ErrorClass.BAD_RESPONSE,
                    f"image at {_short(url)} is over the {max_bytes} byte limit",
                    provider,
                    provider_request_id=request_id,
                billed=billed,
                )
            chunks.append(chunk)
        return b"".join(chunks)


async def download_image(
    url: str,
    *,
    provider: str,
    timeout_s: float,
    billed: Billed,
    client: httpx.AsyncClient | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    provider_request_id: str | None = None,
    root: Path | None = None,
) -> StoredImage:
    """Fetch one image (http(s) or data URI) within `timeout_s`, validate it and store it. Every error carries
    `billed`, the provider's billing facts for the images."""
    if timeout_s <= 0:
        raise _error(
            ErrorClass.TIMEOUT,
            "no time left to download the image",
            provider,
            provider_request_id=provider_request_id,
            billed=billed,
        )
    if url.startswith("data:"):
        try:
            data = decode_data_uri(url, max_bytes=max_bytes)
        except ValueError as exc:
            raise _error(
                ErrorClass.BAD_RESPONSE,
                f"inline image: {exc}",
                provider,
                provider_request_id=provider_request_id,
                billed=billed,
            ) from None
    elif url.startswith(("http://", "https://")):
        own_client = client is None
        http = client or httpx.AsyncClient(
            verify=shared_ssl_context(),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            headers={"User-Agent": _USER_AGENT},
        )
        try:
            async with asyncio.timeout(timeout_s):
                data = await _fetch(http, url, max_bytes, provider, provider_request_id, billed)
        except TimeoutError:
            raise _error(
                ErrorClass.TIMEOUT,
                f"image download from {_short(url)} took over {timeout_s:g}s",
                provider,
                provider_request_id=provider_request_id,
                billed=billed,
            ) from None
        except httpx.TimeoutException:
            raise _error(
                ErrorClass.TIMEOUT,
                f"image download from {_short(url)} timed out",
                provider,
                provider_request_id=provider_request_id,
                billed=billed,
            ) from None
        except httpx.TooManyRedirects:
            raise _error(
                ErrorClass.BAD_RESPONSE,
                f"image URL {_short(url)} redirects too many times",
                provider,
                provider_request_id=provider_request_id,
                billed=billed,
            ) from None
        except httpx.HTTPError as exc:
            raise _error(
                ErrorClass.UNAVAILABLE,
                f"image download from {_short(url)} failed: {exc.__class__.__name__}: {exc}",
                provider,
                provider_request_id=provider_request_id,
                billed=billed,
            ) from None
        finally:
            if own_client:
                await http.aclose()
    else:
        raise _error(
            ErrorClass.BAD_RESPONSE,
            f"image URL {_short(url)!r} is neither http(s) nor a data URI",
            provider,
            provider_request_id=provider_request_id,
            billed=billed,
        )
    try:
        # Hashing and writing a large file is blocking work: keep it off the event loop.
        return await asyncio.to_thread(store_image, data, root=root)
    except InvalidImage as exc:
        raise _error(
            ErrorClass.BAD_RESPONSE,
            f"{_short(url)} is not a usable image: {exc}",
            provider,
            provider_request_id=provider_request_id,
            billed=billed,
        ) from None


async def download_images(
    urls: Sequence[str],
    *,
    provider: str,
    timeout_s: float,
    billed: Billed,
    max_bytes: int = MAX_IMAGE_BYTES,
    provider_request_id: str | None = None,
    root: Path | None = None,
) -> tuple[StoredImage, ...]:
    """Fetch several images concurrently over one connection pool, all within one deadline (`timeout_s`).
    The first failure cancels the rest and is raised, with `billed`."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(
        verify=shared_ssl_context(),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        headers={"User-Agent": _USER_AGENT},
    ) as client:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        download_image(
                            url,
                            provider=provider,
                            timeout_s=deadline - time.monotonic(),
                            billed=billed,
                            client=client,
                            max_bytes=max_bytes,
                            provider_request_id=provider_request_id,
                            root=root,
                        )
                    )
                    for url in urls
                ]
        except ExceptionGroup as failed:
            # Callers expect one ProviderError, not a group: the first failure says what went wrong.
            raise failed.exceptions[0] from None
    return tuple(task.result() for task in tasks)
