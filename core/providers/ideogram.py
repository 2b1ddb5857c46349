"""Ideogram 3.0 through its REST API (no official SDK): `POST /v1/ideogram-v3/generate` with `requests`.

The endpoint is synchronous: one multipart POST answers with the images as signed URLs that expire, so every
image is downloaded at once (core.providers.http_download), checked and stored before the attempt counts.

Concurrency: `requests` is blocking, so each in-flight generation holds one worker thread (asyncio.to_thread)
for as long as Ideogram takes to answer. That is acceptable here: Ideogram itself allows about 10 requests in
flight per account, and every call carries a read timeout no longer than the attempt's deadline, so a thread
is never held past it even when the awaiting coroutine has already given up.

Billing (Ideogram bills per image generated): an error answer (4xx, 5xx) or a connection that never opened
generated nothing, not billed; once the POST may have reached Ideogram and no answer came back (a read timeout,
a connection broken mid-answer, the deadline), it may have generated and billed: unknown. After a successful
generate, every failure (an answer we cannot read, an image without a URL, all images unsafe, a download that
fails) is billed, with the number of images Ideogram reported as the units when it could be read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import requests
import urllib3.exceptions
from pydantic import BaseModel, ConfigDict, ValidationError
from requests.structures import CaseInsensitiveDict

from common.errors import Billing, ErrorClass, ProviderError
from core.catalog import IDEOGRAM
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
    checked_prompt,
    checked_value,
    checked_values,
    emit_event,
    unsent_notes,
)
from core.providers.http_download import Billed, download_images
from core.providers.http_headers import retry_after_seconds
from core.sizes import resolve_size

DEFAULT_BASE_URL = "https://api.ideogram.ai"
GENERATE_PATH = "/v1/ideogram-v3/generate"
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 10.0
_MAX_ERROR_BODY = 64 * 1024
_MAX_RESPONSE_BODY = 4 * 1024 * 1024
# Parameters sent as form fields, in the canonical vocabulary (the same names on the wire).
_PASS_THROUGH = ("rendering_speed", "magic_prompt", "style_type", "num_images", "seed")
NOT_BILLED = Billed(Billing.NOT_BILLED)
UNKNOWN = Billed(Billing.UNKNOWN)


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """requests reports a refused (or unresolvable) host and a connection that broke after the request was sent
    with the same class; only the first is certain to have sent nothing."""
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


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

    def _fail(self, error_class: ErrorClass, message: str, billed: Billed, **kwargs: Any) -> ProviderError:
        return ProviderError(
            error_class,
            message,
            provider=self.provider_id,
            billing=billed.billing,
            billed_units=billed.units,
            **kwargs,
        )

    # -- translation -------------------------------------------------------------------------------------

    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> the generate form's fields, each value checked by the one validator against
        the catalog's ranges. Raises InvalidInput when Ideogram cannot serve the request."""
        checked_prompt(IDEOGRAM, request.prompt)
        params = request.params
        wire: dict[str, Any] = {}
        notes: list[str] = []
        size_value = params.get("image_size")
        if size_value is None:
            size_value = IDEOGRAM.params["image_size"].default
        size = resolve_size(IDEOGRAM, checked_value(IDEOGRAM, "image_size", size_value))
        if size.form == "aspect_ratio":
            wire["aspect_ratio"] = size.wire_value.replace(":", "x")  # Ideogram spells ratios 16x9
        else:
            wire["resolution"] = size.wire_value
        if not size.exact:
            notes.append(size.note)
        wire.update(checked_values(IDEOGRAM, params, (*_PASS_THROUGH, "negative_prompt")))
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
                ErrorClass.UNAVAILABLE, f"could not connect to {self.base_url} within {connect:g}s", NOT_BILLED
            ) from None
        except requests.exceptions.Timeout:
            # Sent, and no answer: Ideogram may be generating (and billing) right now.
            raise self._fail(
                ErrorClass.TIMEOUT, f"Ideogram did not answer within {read_timeout_s:.1f}s", UNKNOWN
            ) from None
        except requests.exceptions.ConnectionError as exc:
            if _never_connected(exc):
                raise self._fail(
                    ErrorClass.UNAVAILABLE, f"cannot reach {self.base_url}: {exc.__class__.__name__}", NOT_BILLED
                ) from None
            raise self._fail(
                ErrorClass.UNAVAILABLE,
                f"the connection to Ideogram broke after the request was sent: {exc.__class__.__name__}",
                UNKNOWN,
            ) from None
        except requests.exceptions.RequestException as exc:
            # ChunkedEncodingError and friends: the connection broke while the answer was arriving.
            raise self._fail(
                ErrorClass.UNAVAILABLE,
                f"the connection to Ideogram broke mid-answer: {exc.__class__.__name__}",
                UNKNOWN,
            ) from None

    def _http_error(self, answer: _HttpAnswer) -> ProviderError:
        """An error answer: Ideogram refused the request, or failed it, and generated nothing: never billed."""
        status = answer.status
        message = error_message(answer.body)
        if status == 400:
            return self._fail(ErrorClass.VALIDATION, message, NOT_BILLED, status_code=status)
        if status in (401, 403):
            return self._fail(ErrorClass.AUTH, f"API key refused: {message}", NOT_BILLED, status_code=status)
        if status == 402:
            return self._fail(
                ErrorClass.QUOTA_EXCEEDED, f"out of API credit: {message}", NOT_BILLED, status_code=status
            )
        if status == 415:
            # Our request was malformed (not multipart): an integration bug no user input can fix. Classed as
            # a bad exchange with the provider, so routing falls back and the breaker shows the integration
            # broken, rather than telling the user their parameters were wrong.
            return self._fail(
                ErrorClass.BAD_RESPONSE,
                f"Ideogram refused the request encoding (415: {message}); this is an Imagegate bug",
                NOT_BILLED,
                status_code=status,
            )
        if status == 422:
            # The prompt failed Ideogram's safety check: refused before anything was generated.
            return self._fail(ErrorClass.SAFETY_REJECTED, message, NOT_BILLED, status_code=status)
        if status == 429:
            return self._fail(
                ErrorClass.RATE_LIMITED,
                message,
                NOT_BILLED,
                status_code=status,
                retry_after_s=retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if status >= 500:
            return self._fail(
                ErrorClass.UNAVAILABLE,
                message,
                NOT_BILLED,
                status_code=status,
                retry_after_s=retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if status in (404, 405):
            return self._fail(
                ErrorClass.BAD_RESPONSE,
                f"no generate endpoint at {self.base_url}{GENERATE_PATH} (HTTP {status}); check the base URL",
                NOT_BILLED,
                status_code=status,
            )
        if 400 <= status < 500:
            return self._fail(ErrorClass.VALIDATION, message, NOT_BILLED, status_code=status)
        # Not an error status, not a success we can read (a 1xx or 3xx): what happened is anyone's guess.
        return self._fail(ErrorClass.BAD_RESPONSE, f"unexpected HTTP {status}: {message}", UNKNOWN, status_code=status)

    def _parse(self, answer: _HttpAnswer) -> _GenerateResponse:
        """A success answer we cannot read: Ideogram answers 200 only once it has generated, so it billed, for
        a number of images we cannot tell."""
        generated = Billed(Billing.BILLED)
        if len(answer.body) > _MAX_RESPONSE_BODY:
            raise self._fail(
                ErrorClass.BAD_RESPONSE, "the answer is larger than any real generate response", generated
            )
        try:
            parsed = _GenerateResponse.model_validate_json(answer.body)
        except ValidationError as exc:
            preview = answer.body[:80]
            first = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            raise self._fail(
                ErrorClass.BAD_RESPONSE,
                f"the answer is not the expected generate response ({first}); starts with {preview!r}",
                generated,
                status_code=answer.status,
            ) from None
        if not parsed.data:
            # Billed per image, and it reported none.
            raise self._fail(
                ErrorClass.BAD_RESPONSE, "the answer holds no images", NOT_BILLED, status_code=answer.status
            )
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
        translation = self.translated(request)
        if not self.config.api_key:
            raise self._fail(ErrorClass.AUTH, "no Ideogram API key configured (IDEOGRAM_API_KEY)", NOT_BILLED)
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
        # Generated, so billed: Ideogram bills every image it generated, and said how many in `data`.
        billed = Billed(Billing.BILLED, Decimal(len(parsed.data)))
        if any(image.is_image_safe and not image.url for image in parsed.data):
            raise self._fail(
                ErrorClass.BAD_RESPONSE, "an image marked safe came without a URL", billed, status_code=answer.status
            )
        safe = [image for image in parsed.data if image.is_image_safe]
        if not safe:
            raise self._fail(
                ErrorClass.SAFETY_REJECTED,
                f"Ideogram marked all {len(parsed.data)} image(s) unsafe",
                billed,
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
            billed=billed,
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
            billed_units=billed.units,
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
        """Await the worker thread no longer than the attempt's deadline. Past it, the POST may have reached
        Ideogram, which may still generate (and bill): unknown."""
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                result: _HttpAnswer = await work
                return result
        except TimeoutError:
            raise self._fail(
                ErrorClass.TIMEOUT, "Ideogram did not answer before the attempt's deadline", UNKNOWN
            ) from None

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
