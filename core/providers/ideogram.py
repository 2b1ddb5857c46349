"""Ideogram 3.0 through its REST API (no official SDK): `POST /v1/ideogram-v3/generate` with `requests`.

The endpoint is synchronous: one multipart POST answers with the images as signed URLs that expire, so every
image is downloaded at once (core.providers.http_download), checked and stored before the attempt counts.

Concurrency: `requests` is blocking, so each in-flight generation holds one worker thread (asyncio.to_thread)
for as long as Ideogram takes to answer. That is acceptable here: Ideogram itself allows about 10 requests in
flight per account, and every call carries a read timeout no longer than the attempt's deadline, so a thread
is never held past it even when the awaiting coroutine has already given up.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, ValidationError
from requests.structures import CaseInsensitiveDict

from core.catalog import IDEOGRAM
from common.errors import ErrorClass, ProviderError
from core.providers.base import (
    AdapterRequest,
    EventCallback,
    EventKind,
    HealthReport,
    ProgressEvent,
    ProviderAdapter,
    ProviderResult,
    RequestIdCallback,
    Stopwatch,
    Timings,
    Translation,
    checked_values,
    emit_event,
    unsent_notes,
)
from core.providers.http_download import download_images
from core.providers.http_headers import retry_after_seconds
from core.sizes import SizeError, resolve_size

DEFAULT_BASE_URL = "https://api.ideogram.ai"
GENERATE_PATH = "/v1/ideogram-v3/generate"
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 10.0
_MAX_ERROR_BODY = 64 * 1024
_MAX_RESPONSE_BODY = 4 * 1024 * 1024
# Parameters sent as form fields, in the canonical vocabulary (the same names on the wire).
_PASS_THROUGH = ("rendering_speed", "magic_prompt", "style_type", "num_images", "seed")


class _Image(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str | None = None
    is_image_safe: bool
    seed: int | None = None
    resolution: str | None = None
    prompt: str | None = None
    style_type: str | None = None


class _GenerateResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    created: str | None = None
    data: list[_Image]


@dataclass(frozen=True)
class _HttpAnswer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def error_message(body: bytes) -> str:
    """The human message from either error body shape Ideogram uses: RFC 7807 problem+json
    (`{"type","title","detail","status"}`) or `{"error": "..."}` (sometimes `{"error": {"message": ...}}`)."""
    text = body[:_MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(parsed, dict):
        detail, title, err = parsed.get("detail"), parsed.get("title"), parsed.get("error")
        if isinstance(detail, str) and detail:
            return f"{title}: {detail}" if isinstance(title, str) and title and title not in detail else detail
        if isinstance(err, str) and err:
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        for key in ("message", "title"):
            if isinstance(parsed.get(key), str) and parsed[key]:
                return str(parsed[key])
    return text[:300]


class IdeogramAdapter(ProviderAdapter):
    provider_id = "ideogram"

    @property
    def base_url(self) -> str:
        return (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")

    def _fail(self, error_class: ErrorClass, message: str, **kwargs: Any) -> ProviderError:
        return ProviderError(error_class, message, provider=self.provider_id, **kwargs)

    # -- translation -------------------------------------------------------------------------------------

    def translate(self, request: AdapterRequest) -> Translation:
        params = request.params
        wire: dict[str, Any] = {}
        notes: list[str] = []
        size_value = params.get("image_size")
        if size_value is None:
            size_value = IDEOGRAM.params["image_size"].default
        try:
            size = resolve_size(IDEOGRAM, str(size_value))
        except SizeError as exc:
            raise self._fail(ErrorClass.VALIDATION, f"image_size: {exc}") from None
        if size.form == "aspect_ratio":
            wire["aspect_ratio"] = size.wire_value.replace(":", "x")  # Ideogram spells ratios 16x9
        else:
            wire["resolution"] = size.wire_value
        if not size.exact:
            notes.append(size.note)
        try:
            wire.update(checked_values(IDEOGRAM, params, (*_PASS_THROUGH, "negative_prompt")))
        except ValueError as exc:
            raise self._fail(ErrorClass.VALIDATION, str(exc)) from None
        notes.extend(unsent_notes("Ideogram 3.0", params, {"image_size", "negative_prompt", *_PASS_THROUGH}))
        return Translation(wire_params=wire, notes=tuple(notes))

    # -- HTTP (runs in a worker thread) ------------------------------------------------------------------

    def _post(self, fields: Mapping[str, Any], read_timeout_s: float) -> _HttpAnswer:
        """One multipart POST to the generate endpoint; transport failures become ProviderError."""
        url = self.base_url + GENERATE_PATH
        # Every field is a text part: requests builds multipart/form-data only from `files`.
        parts = {name: (None, str(value)) for name, value in fields.items()}
        headers = {"Api-Key": self.config.api_key or "", "Accept": "application/json"}
        connect = min(CONNECT_TIMEOUT_S, read_timeout_s)
        try:
            with (
                requests.Session() as session,
                session.post(
                    url, headers=headers, files=parts, timeout=(connect, read_timeout_s), stream=True
                ) as response,
            ):
                limit = _MAX_RESPONSE_BODY if response.status_code < 400 else _MAX_ERROR_BODY
                body = b""
                for chunk in response.iter_content(chunk_size=65536):
                    body += chunk
                    if len(body) > limit:
                        break
                return _HttpAnswer(response.status_code, CaseInsensitiveDict(response.headers), body)
        except requests.exceptions.ConnectTimeout:
            raise self._fail(
                ErrorClass.UNAVAILABLE, f"could not connect to {self.base_url} within {connect:g}s"
            ) from None
        except requests.exceptions.Timeout:
            raise self._fail(
                ErrorClass.TIMEOUT, f"Ideogram did not answer within {read_timeout_s:.1f}s"
            ) from None
        except requests.exceptions.ConnectionError as exc:
            raise self._fail(
                ErrorClass.UNAVAILABLE, f"cannot reach {self.base_url}: {exc.__class__.__name__}"
            ) from None
        except requests.exceptions.RequestException as exc:
            # ChunkedEncodingError and friends: the connection broke while the answer was arriving.
            raise self._fail(
                ErrorClass.UNAVAILABLE, f"the connection to Ideogram broke mid-answer: {exc.__class__.__name__}"
            ) from None

    def _http_error(self, answer: _HttpAnswer) -> ProviderError:
        status = answer.status
        message = error_message(answer.body)
        if status == 400:
            return self._fail(ErrorClass.VALIDATION, message, status_code=status)
        if status in (401, 403):
            return self._fail(ErrorClass.AUTH, f"API key refused: {message}", status_code=status)
        if status == 402:
            return self._fail(ErrorClass.QUOTA_EXCEEDED, f"out of API credit: {message}", status_code=status)
        if status == 415:
            # Our request was malformed (not multipart): an integration bug no user input can fix. Classed as
            # a bad exchange with the provider, so routing falls back and the breaker shows the integration
            # broken, rather than telling the user their parameters were wrong.
            return self._fail(
                ErrorClass.BAD_RESPONSE,
                f"Ideogram refused the request encoding (415: {message}); this is an Imagegate bug",
                status_code=status,
            )
        if status == 422:
            return self._fail(ErrorClass.SAFETY_REJECTED, message, status_code=status)
        if status == 429:
            return self._fail(
                ErrorClass.RATE_LIMITED,
                message,
                status_code=status,
                retry_after_s=retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if status >= 500:
            return self._fail(
                ErrorClass.UNAVAILABLE,
                message,
                status_code=status,
                retry_after_s=retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if status in (404, 405):
            return self._fail(
                ErrorClass.BAD_RESPONSE,
                f"no generate endpoint at {self.base_url}{GENERATE_PATH} (HTTP {status}); check the base URL",
                status_code=status,
            )
        if 400 <= status < 500:
            return self._fail(ErrorClass.VALIDATION, message, status_code=status)
        return self._fail(ErrorClass.BAD_RESPONSE, f"unexpected HTTP {status}: {message}", status_code=status)

    def _parse(self, answer: _HttpAnswer) -> _GenerateResponse:
        if len(answer.body) > _MAX_RESPONSE_BODY:
            raise self._fail(ErrorClass.BAD_RESPONSE, "the answer is larger than any real generate response")
        try:
            parsed = _GenerateResponse.model_validate_json(answer.body)
        except ValidationError as exc:
            preview = answer.body[:80]
            first = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            raise self._fail(
                ErrorClass.BAD_RESPONSE,
                f"the answer is not the expected generate response ({first}); starts with {preview!r}",
                status_code=answer.status,
            ) from None
        if not parsed.data:
            raise self._fail(ErrorClass.BAD_RESPONSE, "the answer holds no images", status_code=answer.status)
        return parsed

    # -- the attempt -------------------------------------------------------------------------------------

    async def generate(
        self,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
        on_request_id: RequestIdCallback | None = None,
    ) -> ProviderResult:
        watch = Stopwatch()
        deadline = watch.start + request.timeout_s
        translation = self.translate(request)
        if not request.prompt.strip():
            raise self._fail(ErrorClass.VALIDATION, "the prompt is empty")
        if not self.config.api_key:
            raise self._fail(ErrorClass.AUTH, "no Ideogram API key configured (IDEOGRAM_API_KEY)")
        fields = {"prompt": request.prompt, **translation.wire_params}
        # Ideogram gives no request id and no queue: the one call below is the whole run.
        await emit_event(on_event,
            ProgressEvent(EventKind.RUNNING, self.provider_id, message="Ideogram is generating (synchronous call)"),
        )
        answer = await self._bounded(asyncio.to_thread(self._post, fields, request.timeout_s), deadline)
        run_s = watch.lap()
        if answer.status >= 400:
            raise self._http_error(answer)
        parsed = self._parse(answer)
        if any(image.is_image_safe and not image.url for image in parsed.data):
            raise self._fail(
                ErrorClass.BAD_RESPONSE, "an image marked safe came without a URL", status_code=answer.status
            )
        safe = [image for image in parsed.data if image.is_image_safe]
        if not safe:
            raise self._fail(
                ErrorClass.SAFETY_REJECTED,
                f"Ideogram marked all {len(parsed.data)} image(s) unsafe",
                status_code=answer.status,
            )
        await emit_event(on_event,
            ProgressEvent(
                EventKind.DOWNLOADING, self.provider_id, message=f"downloading {len(safe)} image(s) before they expire"
            ),
        )
        images = await download_images(
            [image.url for image in safe if image.url],
            provider=self.provider_id,
            timeout_s=max(0.0, deadline - time.monotonic()),
        )
        download_s = watch.lap()
        await emit_event(on_event, ProgressEvent(EventKind.COMPLETED, self.provider_id))
        unsafe = len(parsed.data) - len(safe)
        return ProviderResult(
            provider=self.provider_id,
            images=images,
            seed=safe[0].seed,
            provider_request_id=None,
            timings=Timings(run_s=run_s, download_s=download_s, total_s=watch.total()),
            translation=translation,
            mode=self.mode,
            nsfw_flags=tuple(not image.is_image_safe for image in parsed.data),
            raw_metadata={
                "created": parsed.created,
                "generated_images": len(parsed.data),
                "unsafe_images": unsafe,
                "images": [
                    {
                        "seed": image.seed,
                        "resolution": image.resolution,
                        "is_image_safe": image.is_image_safe,
                        "style_type": image.style_type,
                        "prompt": image.prompt,
                    }
                    for image in parsed.data
                ],
            },
        )

    async def _bounded(self, work: Any, deadline: float) -> _HttpAnswer:
        """Await the worker thread no longer than the attempt's deadline."""
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                result: _HttpAnswer = await work
                return result
        except TimeoutError:
            raise self._fail(ErrorClass.TIMEOUT, "Ideogram did not answer before the attempt's deadline") from None

    # -- health ------------------------------------------------------------------------------------------

    async def health_probe(self) -> HealthReport:
        """Reachability and key check that generates nothing: a generate call with no prompt.

        Ideogram has no documented free, authenticated GET, so the probe sends the generate endpoint a multipart
        body without `prompt`. The service checks the key first (401 for a bad one) and then refuses the body
        (400): a 400 proves the endpoint is up and the key accepted, and a refused request produces no image and
        no charge. Against the emulator the same route answers the same way.
        """
        started = time.monotonic()
        if not self.config.api_key:
            return HealthReport(
                self.provider_id, False, 0.0, "no Ideogram API key configured", ErrorClass.AUTH
            )
        try:
            answer = await self._bounded(
                asyncio.to_thread(self._post, {"rendering_speed": "TURBO"}, PROBE_TIMEOUT_S),
                started + PROBE_TIMEOUT_S,
            )
        except ProviderError as exc:
            return HealthReport(
                self.provider_id, False, time.monotonic() - started, exc.message, exc.error_class
            )
        latency = time.monotonic() - started
        if answer.status == 400:
            return HealthReport(
                self.provider_id, True, latency, "reachable and key accepted (empty probe refused, nothing generated)"
            )
        if answer.status < 400:
            return HealthReport(self.provider_id, True, latency, f"reachable (HTTP {answer.status} to the probe)")
        failure = self._http_error(answer)
        return HealthReport(self.provider_id, False, latency, failure.message, failure.error_class)
