"""fal.ai Qwen-Image (`fal-ai/qwen-image`) through fal-client's async queue API.

submit -> on_request_id -> poll status (queue position, logs) -> result -> download -> store. The request id
is handed out before any polling so a caller can persist it; `resume` collects a request submitted by another
process, `cancel` stops one.

fal-client is used unmodified, but its HTTP client is ours (a subclass overrides the cached `_client`):
- a transport rewrites fal's queue URLs to `AdapterConfig.base_url` (the emulator), instead of mutating
  fal_client's module globals, which would redirect every fal client in the process;
- it reads `x-fal-billable-units` off the result response (fal-client drops response headers);
- it turns the first 429 into RATE_LIMITED at once, with fal's Retry-After: fal-client ignores Retry-After and
  retries blindly for about 49 s, while a router with other providers should decide for itself;
- a connection refused before the provider ever answered is UNAVAILABLE at once (fal-client would retry for
  about 44 s): nothing was submitted, so failing over is safe. Once a request exists, polls keep fal-client's
  retries, bounded by the request's deadline.
The whole attempt is bounded by `AdapterRequest.timeout_s`; on expiry the fal request is cancelled. Cancelling
the asyncio task instead (shutdown, a page rerun) only stops waiting: the request id was already handed out, so
the paid request is left for `resume()` to collect; stopping it at fal is an explicit `cancel()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import fal_client
import fal_client.client as fal_wire
import httpx
from asyncstdlib import cached_property as async_cached_property
from fal_client.auth import MissingCredentialsError

from core.catalog import FAL_QWEN
from common.errors import ErrorClass, ProviderError
from core.providers.base import (
    AdapterConfig,
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
    emit,
    emit_event,
)
from core.providers.http_download import download_images
from core.providers.http_headers import retry_after_seconds
from core.sizes import SizeError, resolve_size

log = logging.getLogger(__name__)

PROVIDER_ID = FAL_QWEN.id
APP_ID = "fal-ai/qwen-image"
LIVE_QUEUE_URL = "https://queue.fal.run/"
CONNECT_TIMEOUT_S = 5.0
"""A connect that takes longer than this is a dead host for our purposes (fal caps its own at 5 s too)."""
CANCEL_GRACE_S = 2.0
"""How long a best-effort cancel (after a deadline or a task cancellation) may add."""
HEALTH_TIMEOUT_S = 5.0
PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"
"""Never a real request id: its status answers 404 from a reachable queue that accepted our key."""

_RESULT_PATH = re.compile(r"/requests/([^/]+)$")
_FAL_STEPS_MIN, _FAL_STEPS_MAX = 2, 250


class _RateLimited(Exception):
    """Raised by the transport on a 429; not an httpx error, so fal-client does not retry it."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class _CallerFailed(Exception):
    """The caller's own on_request_id callback raised: re-raised as is, it says nothing about fal."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _Unreachable(Exception):
    """The host refused or timed out the connection before it had ever answered in this session."""


def _detail_message(detail: Any) -> str:
    """fal's error `detail`: a string, or FastAPI's list of {loc, msg, type} for a 422."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                field = ".".join(loc) or "input"
                parts.append(f"{field}: {item.get('msg', 'invalid')}")
            else:
                parts.append(str(item))
        return "; ".join(parts) or "invalid input"
    return str(detail)


class _WatchedStream(httpx.AsyncByteStream):
    """A response body that tells the transport when reading it fails (a connection dropped mid-answer)."""

    def __init__(self, inner: httpx.AsyncByteStream, transport: _FalTransport) -> None:
        self.inner = inner
        self.transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield chunk
        except httpx.TransportError as exc:
            self.transport.last_transport_error = exc
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


class _FalTransport(httpx.AsyncBaseTransport):
    """Routes fal's queue URLs to `base_url`, caps connect time, and watches responses (see module doc)."""

    def __init__(self, base_url: str | None) -> None:
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        # Live: fal's own transport, which falls back to its backup domains. Emulator: plain HTTP.
        self.inner: httpx.AsyncBaseTransport = (
            httpx.AsyncHTTPTransport() if self.base_url else fal_wire.AsyncBackupDomainTransport()
        )
        self.reached = False
        self.last_transport_error: Exception | None = None
        self.billable_units: dict[str, str] = {}

    def _route(self, request: httpx.Request) -> httpx.Request:
        if self.base_url is None:
            return request
        url = str(request.url)
        for prefix in {fal_wire.QUEUE_URL_FORMAT, LIVE_QUEUE_URL}:
            if url.startswith(prefix):
                target = httpx.URL(self.base_url + url[len(prefix) :])
                headers = request.headers.copy()
                headers["Host"] = target.netloc.decode("ascii")
                return httpx.Request(
                    request.method, target, headers=headers, stream=request.stream, extensions=request.extensions
                )
        return request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request = self._route(request)
        timeouts = dict(request.extensions.get("timeout", {}))
        connect = timeouts.get("connect")
        timeouts["connect"] = CONNECT_TIMEOUT_S if connect is None else min(connect, CONNECT_TIMEOUT_S)
        request.extensions["timeout"] = timeouts
        try:
            response = await self.inner.handle_async_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.last_transport_error = exc
            if not self.reached:
                raise _Unreachable(
                    f"cannot connect to {request.url.netloc.decode()}: {exc or type(exc).__name__}"
                ) from exc
            raise
        except httpx.TransportError as exc:
            self.last_transport_error = exc
            raise
        self.reached = True
        self.last_transport_error = None
        if isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _WatchedStream(response.stream, self)
        if response.status_code == 429:
            await response.aread()
            await response.aclose()
            try:
                body = response.json()
                detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
            except ValueError:
                detail = response.text
            raise _RateLimited(
                f"rate limited: {_detail_message(detail) or 'HTTP 429'}",
                retry_after_seconds(response.headers.get("retry-after")),
            )
        match = _RESULT_PATH.search(request.url.path)
        if request.method == "GET" and response.status_code == 200 and match:
            units = response.headers.get("x-fal-billable-units")
            if units is not None:
                self.billable_units[match.group(1)] = units
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _FalClient(fal_client.AsyncClient):
    """fal-client's AsyncClient with our transport underneath; everything above HTTP is fal-client's own."""

    def __init__(self, key: str, transport: _FalTransport, default_timeout: float) -> None:
        super().__init__(key=key, default_timeout=default_timeout)
        self.transport = transport

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        auth = await self._auth
        return httpx.AsyncClient(
            transport=self.transport,
            headers={"Authorization": auth.header_value, "User-Agent": fal_wire.USER_AGENT},
            timeout=self.default_timeout,
        )


@dataclass
class _Progress:
    """What one attempt has seen so far; shared by generate and resume."""

    request_id: str | None = None
    handle: fal_client.AsyncRequestHandle | None = None


class FalQwenAdapter(ProviderAdapter):
    provider_id = PROVIDER_ID
    supports_resume = True
    supports_cancel = True

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)

    # -- translation ------------------------------------------------------------------------------------

    def _invalid(self, message: str) -> ProviderError:
        return ProviderError(ErrorClass.VALIDATION, message, provider=self.provider_id)

    def _int(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
            raise self._invalid(f"{name} must be a whole number, got {value!r}")
        return int(value)

    def _float(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._invalid(f"{name} must be a number, got {value!r}")
        return float(value)

    def _bool(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._invalid(f"{name} must be true or false, got {value!r}")
        return value

    def _choice(self, name: str, value: Any) -> str:
        choices = FAL_QWEN.params[name].choices
        if value not in choices:
            raise self._invalid(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> fal-ai/qwen-image input. Missing parameters take the catalog's defaults
        (not fal's, which differ: 30 steps and guidance 2.5), so what runs is what the product shows."""
        if not request.prompt or not request.prompt.strip():
            raise self._invalid("prompt is empty")
        notes: list[str] = []
        params: dict[str, Any] = {
            name: spec.default for name, spec in FAL_QWEN.params.items() if spec.default is not None
        }
        for name, value in request.params.items():
            if name not in FAL_QWEN.params:
                if value is not None:
                    notes.append(f"{name} is not a {self.provider_id} parameter; ignored")
                continue
            if value is not None:
                params[name] = value
            elif name == "seed":
                params.pop("seed", None)

        wire: dict[str, Any] = {"prompt": request.prompt}
        try:
            size = resolve_size(FAL_QWEN, str(params["image_size"]))
        except SizeError as exc:
            raise self._invalid(str(exc)) from None
        wire["image_size"] = size.wire_value if size.form == "preset" else {"width": size.width, "height": size.height}
        if not size.exact:
            notes.append(size.note)

        steps = self._int("num_inference_steps", params["num_inference_steps"])
        if steps < _FAL_STEPS_MIN:
            notes.append(f"num_inference_steps {steps} raised to {_FAL_STEPS_MIN}, fal's minimum")
            steps = _FAL_STEPS_MIN
        if steps > _FAL_STEPS_MAX:
            raise self._invalid(f"num_inference_steps must be at most {_FAL_STEPS_MAX} on fal, got {steps}")
        wire["num_inference_steps"] = steps

        guidance = self._float("guidance_scale", params["guidance_scale"])
        if not 0 <= guidance <= 20:
            raise self._invalid(f"guidance_scale must be between 0 and 20 on fal, got {guidance:g}")
        wire["guidance_scale"] = guidance

        count = self._int("num_images", params["num_images"])
        if not 1 <= count <= 4:
            raise self._invalid(f"num_images must be between 1 and 4 on fal, got {count}")
        wire["num_images"] = count

        if "seed" in params:
            seed = self._int("seed", params["seed"])
            if seed < 0:
                raise self._invalid(f"seed must be 0 or more, got {seed}")
            wire["seed"] = seed

        negative = params.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise self._invalid(f"negative_prompt must be text, got {negative!r}")
        if negative.strip():
            wire["negative_prompt"] = negative

        wire["enable_safety_checker"] = self._bool("enable_safety_checker", params["enable_safety_checker"])
        wire["sync_mode"] = self._bool("sync_mode", params["sync_mode"])
        wire["acceleration"] = self._choice("acceleration", params["acceleration"])
        wire["output_format"] = self._choice("output_format", params["output_format"])
        return Translation(wire_params=wire, notes=tuple(notes))

    # -- plumbing -----------------------------------------------------------------------------------------

    def _key(self) -> str:
        key = (self.config.api_key or "").strip()
        if not key:
            raise ProviderError(
                ErrorClass.AUTH,
                "no fal key configured: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET)",
                provider=self.provider_id,
            )
        return key

    @contextlib.asynccontextmanager
    async def _session(self, timeout_s: float) -> AsyncIterator[tuple[_FalClient, _FalTransport]]:
        """A fresh client per operation: httpx pools are tied to one event loop, and callers (Streamlit,
        the CLI) may run each operation in a new loop."""
        key = self._key()
        transport = _FalTransport(self.config.base_url)
        fal = _FalClient(key, transport, default_timeout=max(1.0, timeout_s))
        try:
            yield fal, transport
        finally:
            http = await fal._client
            await http.aclose()

    def _error(
        self, error_class: ErrorClass, message: str, request_id: str | None, status_code: int | None = None
    ) -> ProviderError:
        return ProviderError(
            error_class, message, provider=self.provider_id, status_code=status_code, provider_request_id=request_id
        )

    def _map(self, exc: BaseException, request_id: str | None, transport: _FalTransport | None = None) -> ProviderError:
        """Every exception fal-client, httpx or a provider answer can raise, as a ProviderError."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, _RateLimited):
            err = self._error(ErrorClass.RATE_LIMITED, exc.message, request_id, 429)
            err.retry_after_s = exc.retry_after_s
            return err
        if isinstance(exc, _Unreachable):
            return self._error(ErrorClass.UNAVAILABLE, str(exc), request_id)
        if isinstance(exc, MissingCredentialsError):
            return self._error(ErrorClass.AUTH, f"no fal credentials: {exc}", request_id)
        if isinstance(exc, fal_client.FalClientHTTPError):
            return self._map_http(exc, request_id)
        if isinstance(exc, fal_client.FalClientTimeoutError | httpx.TimeoutException | TimeoutError):
            return self._error(
                ErrorClass.TIMEOUT, f"fal did not answer in time ({exc or type(exc).__name__})", request_id
            )
        if isinstance(exc, httpx.HTTPError):
            return self._error(
                ErrorClass.UNAVAILABLE, f"fal connection failed: {type(exc).__name__}: {exc}", request_id
            )
        if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
            # JSONDecodeError is a ValueError; fal-client raises ValueError on a status it does not know.
            return self._error(
                ErrorClass.BAD_RESPONSE, f"unexpected answer from fal: {type(exc).__name__}: {exc}", request_id
            )
        return self._error(ErrorClass.BAD_RESPONSE, f"fal call failed: {type(exc).__name__}: {exc}", request_id)

    def _map_http(self, exc: fal_client.FalClientHTTPError, request_id: str | None) -> ProviderError:
        status = exc.status_code
        message = _detail_message(exc.message)
        headers = {k.lower(): v for k, v in exc.response_headers.items()}
        error_type = exc.error_type or ""
        request_id = request_id or headers.get("x-fal-request-id")
        if error_type in ("request_timeout", "startup_timeout") or headers.get("x-fal-request-timeout-type"):
            return self._error(ErrorClass.TIMEOUT, f"fal {error_type or 'timeout'}: {message}", request_id, status)
        if error_type == "request_cancelled" or status == 499:
            return self._error(ErrorClass.CANCELLED, f"the fal request was cancelled: {message}", request_id, status)
        if status in (401, 403):
            return self._error(ErrorClass.AUTH, f"fal refused the key: {message}", request_id, status)
        if status == 422:
            return self._error(ErrorClass.VALIDATION, f"fal rejected the input: {message}", request_id, status)
        if status == 429:
            err = self._error(ErrorClass.RATE_LIMITED, f"rate limited: {message}", request_id, status)
            err.retry_after_s = retry_after_seconds(headers.get("retry-after"))
            return err
        if status >= 500 or status == 408:
            kind = f" ({error_type})" if error_type else ""
            return self._error(ErrorClass.UNAVAILABLE, f"fal failed{kind}: {message}", request_id, status)
        if status == 400:
            return self._error(ErrorClass.VALIDATION, f"fal refused the request: {message}", request_id, status)
        return self._error(ErrorClass.BAD_RESPONSE, f"unexpected HTTP {status} from fal: {message}", request_id, status)

    async def _cancel_quietly(self, handle: fal_client.AsyncRequestHandle) -> None:
        try:
            await asyncio.wait_for(handle.cancel(), timeout=CANCEL_GRACE_S)
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("could not cancel fal request %s: %s", handle.request_id, exc)

    # -- running ------------------------------------------------------------------------------------------

    async def generate(
        self,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
        on_request_id: RequestIdCallback | None = None,
    ) -> ProviderResult:
        translation = self.translate(request)
        watch = Stopwatch()
        progress = _Progress()
        async with self._session(request.timeout_s) as (fal, transport):

            async def attempt() -> ProviderResult:
                # fal drops a request that has not started within this; it needs more than 1 s.
                start_timeout = request.timeout_s if request.timeout_s > 1 else None
                handle = await fal.submit(APP_ID, translation.wire_params, start_timeout=start_timeout)
                progress.handle, progress.request_id = handle, handle.request_id
                submit_s = watch.lap()
                try:
                    await emit(on_request_id, handle.request_id)
                except Exception as exc:
                    # The caller could not record the id: cancel rather than pay for an image nobody tracks.
                    await self._cancel_quietly(handle)
                    raise _CallerFailed(exc) from exc
                await emit_event(on_event, ProgressEvent(EventKind.SUBMITTED, self.provider_id, handle.request_id))
                return await self._follow(handle, transport, translation, watch, submit_s, on_event)

            return await self._bounded(attempt, request.timeout_s, progress, transport)

    async def resume(
        self,
        provider_request_id: str,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
    ) -> ProviderResult:
        translation = self.translate(request)
        watch = Stopwatch()
        progress = _Progress(request_id=provider_request_id)
        async with self._session(request.timeout_s) as (fal, transport):

            async def attempt() -> ProviderResult:
                handle = await fal.get_handle(APP_ID, provider_request_id)
                progress.handle = handle
                return await self._follow(handle, transport, translation, watch, 0.0, on_event)

            try:
                return await self._bounded(attempt, request.timeout_s, progress, transport, cancel_on_timeout=False)
            except ProviderError as err:
                if err.status_code == 404:
                    raise self._error(
                        ErrorClass.VALIDATION,
                        f"fal knows no request {provider_request_id!r} (expired, never submitted, or sync_mode)",
                        provider_request_id,
                        404,
                    ) from None
                raise

    async def _bounded(
        self,
        attempt: Any,
        timeout_s: float,
        progress: _Progress,
        transport: _FalTransport,
        *,
        cancel_on_timeout: bool = True,
    ) -> ProviderResult:
        """Run `attempt` within the deadline; map whatever escapes; cancel the fal request when we give up."""
        try:
            async with asyncio.timeout(timeout_s) as scope:
                result: ProviderResult = await attempt()
                return result
        except TimeoutError as exc:
            if not scope.expired():
                raise self._map(exc, progress.request_id, transport) from exc
            if progress.handle is not None and cancel_on_timeout:
                await self._cancel_quietly(progress.handle)
            if transport.last_transport_error is not None:
                cause = transport.last_transport_error
                raise self._error(
                    ErrorClass.UNAVAILABLE,
                    f"fal kept failing at the connection level until the {timeout_s:g}s deadline: "
                    f"{type(cause).__name__}: {cause}",
                    progress.request_id,
                ) from exc
            where = "in the queue or running" if progress.request_id else "submitting"
            raise self._error(
                ErrorClass.TIMEOUT, f"no result within {timeout_s:g}s (still {where})", progress.request_id
            ) from exc
        except ProviderError:
            raise
        except _CallerFailed as failed:
            raise failed.original from None
        except Exception as exc:
            raise self._map(exc, progress.request_id, transport) from exc

    async def _follow(
        self,
        handle: fal_client.AsyncRequestHandle,
        transport: _FalTransport,
        translation: Translation,
        watch: Stopwatch,
        submit_s: float,
        on_event: EventCallback | None,
    ) -> ProviderResult:
        request_id = handle.request_id
        queue_s = run_s = 0.0
        running = False
        last_position: int | None = None
        seen_logs = 0
        completed: fal_client.Completed | None = None

        def new_lines(logs: list[dict[str, Any]] | None) -> tuple[str, ...]:
            nonlocal seen_logs
            logs = logs or []
            if len(logs) < seen_logs:  # the provider restarted its log list
                seen_logs = 0
            fresh = tuple(str(item.get("message", "")) for item in logs[seen_logs:] if isinstance(item, dict))
            seen_logs = len(logs)
            return fresh

        async for status in handle.iter_events(with_logs=True, interval=self.config.poll_interval_s):
            if isinstance(status, fal_client.Queued):
                if status.position != last_position:
                    last_position = status.position
                    await emit_event(
                        on_event,
                        # fal counts from 0 (= next to run); the product counts from 1.
                        ProgressEvent(
                            EventKind.QUEUED, self.provider_id, request_id, queue_position=status.position + 1
                        ),
                    )
            elif isinstance(status, fal_client.InProgress):
                lines = new_lines(status.logs)
                first = not running
                if first:
                    running, queue_s = True, watch.lap()
                if first or lines:
                    await emit_event(
                        on_event, ProgressEvent(EventKind.RUNNING, self.provider_id, request_id, logs=lines)
                    )
            elif isinstance(status, fal_client.Completed):
                completed = status
                if running:
                    run_s = watch.lap()
                else:
                    queue_s = watch.lap()
                if status.error:
                    log.info("fal request %s completed with error %s: %s", request_id, status.error_type, status.error)
        if completed is None:
            raise self._error(ErrorClass.BAD_RESPONSE, "fal's status stream ended without COMPLETED", request_id)

        output = await handle.get(interval=self.config.poll_interval_s)
        urls, seed, flags = self._parse_output(output, request_id)
        if flags and all(flags):
            raise self._error(
                ErrorClass.SAFETY_REJECTED,
                f"fal's safety checker flagged {'the image' if len(flags) == 1 else f'all {len(flags)} images'}",
                request_id,
            )
        keep = [url for url, flagged in zip(urls, flags, strict=True) if not flagged]
        watch.lap()
        await emit_event(
            on_event,
            ProgressEvent(EventKind.DOWNLOADING, self.provider_id, request_id, message=f"{len(keep)} image(s)"),
        )
        images = await download_images(
            keep, provider=self.provider_id, timeout_s=self.config.download_timeout_s, provider_request_id=request_id
        )
        download_s = watch.lap()

        billed: Decimal | None = None
        raw_units = transport.billable_units.get(request_id)
        if raw_units is not None:
            try:
                billed = Decimal(raw_units)
            except InvalidOperation:
                log.warning("fal sent an unreadable x-fal-billable-units %r for %s", raw_units, request_id)
        await emit_event(
            on_event,
            ProgressEvent(EventKind.COMPLETED, self.provider_id, request_id, logs=new_lines(completed.logs)),
        )
        return ProviderResult(
            provider=self.provider_id,
            images=images,
            seed=seed,
            provider_request_id=request_id,
            timings=Timings(submit_s, queue_s, run_s, download_s, watch.total()),
            translation=translation,
            billed_units=billed,
            mode=self.config.mode,
            nsfw_flags=tuple(flags),
            raw_metadata={
                "timings": output.get("timings"),
                "metrics": completed.metrics,
                "prompt": output.get("prompt"),
                "filtered_nsfw": sum(flags),
            },
        )

    def _parse_output(self, output: Any, request_id: str) -> tuple[list[str], int | None, list[bool]]:
        """images[].url, seed and has_nsfw_concepts from fal's result, or BAD_RESPONSE saying what is off."""
        if not isinstance(output, Mapping):
            raise self._error(ErrorClass.BAD_RESPONSE, f"fal's result is not an object: {output!r:.200}", request_id)
        images = output.get("images")
        if not isinstance(images, list) or not images:
            raise self._error(ErrorClass.BAD_RESPONSE, "fal's result has no images", request_id)
        urls = []
        for i, image in enumerate(images):
            url = image.get("url") if isinstance(image, Mapping) else None
            if not isinstance(url, str) or not url:
                raise self._error(ErrorClass.BAD_RESPONSE, f"fal's image {i} has no url", request_id)
            urls.append(url)
        seed = output.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise self._error(ErrorClass.BAD_RESPONSE, f"fal's seed is not an integer: {seed!r}", request_id)
        raw_flags = output.get("has_nsfw_concepts") or []
        if not isinstance(raw_flags, list):
            raise self._error(ErrorClass.BAD_RESPONSE, "fal's has_nsfw_concepts is not a list", request_id)
        # Missing flags mean the checker said nothing about that image (it was off, or fal omitted them).
        flags = [bool(raw_flags[i]) if i < len(raw_flags) else False for i in range(len(urls))]
        return urls, seed, flags

    # -- cancel and health --------------------------------------------------------------------------------

    async def cancel(self, provider_request_id: str) -> None:
        """Ask fal to cancel a request. Raises VALIDATION if it already completed or fal does not know it."""
        async with self._session(10.0) as (fal, transport):
            try:
                async with asyncio.timeout(10.0):
                    await fal.cancel(APP_ID, provider_request_id)
            except fal_client.FalClientHTTPError as exc:
                text = exc.response.text if exc.response is not None else ""
                if exc.status_code == 400 and "ALREADY_COMPLETED" in text:
                    raise self._error(
                        ErrorClass.VALIDATION,
                        f"fal request {provider_request_id} already completed; collect it with resume()",
                        provider_request_id,
                        400,
                    ) from None
                if exc.status_code == 404:
                    raise self._error(
                        ErrorClass.VALIDATION, f"fal knows no request {provider_request_id!r}", provider_request_id, 404
                    ) from None
                raise self._map(exc, provider_request_id, transport) from exc
            except TimeoutError as exc:
                raise self._error(
                    ErrorClass.TIMEOUT, "fal did not confirm the cancellation within 10s", provider_request_id
                ) from exc
            except ProviderError:
                raise
            except Exception as exc:
                raise self._map(exc, provider_request_id, transport) from exc

    async def health_probe(self) -> HealthReport:
        """GET the status of a request id that cannot exist. A reachable queue that accepts the key answers
        404, which costs nothing; 401/403 means the key is refused; anything else is unhealthy."""
        started = time.monotonic()

        def report(ok: bool, detail: str, error_class: ErrorClass | None = None) -> HealthReport:
            return HealthReport(self.provider_id, ok, time.monotonic() - started, detail, error_class)

        target = self.config.base_url or LIVE_QUEUE_URL
        try:
            async with self._session(HEALTH_TIMEOUT_S) as (fal, transport):
                try:
                    async with asyncio.timeout(HEALTH_TIMEOUT_S):
                        await fal.status(APP_ID, PROBE_REQUEST_ID)
                except fal_client.FalClientHTTPError as exc:
                    if exc.status_code == 404:
                        return report(True, f"fal queue at {target} reachable and the key accepted")
                    err = self._map(exc, None, transport)
                    return report(False, err.message, err.error_class)
                except TimeoutError:
                    return report(False, f"no answer from {target} within {HEALTH_TIMEOUT_S:g}s", ErrorClass.TIMEOUT)
                except Exception as exc:
                    err = self._map(exc, None, transport)
                    return report(False, err.message, err.error_class)
        except ProviderError as err:
            return report(False, err.message, err.error_class)
        return report(False, f"{target} answered a status for a request that cannot exist", ErrorClass.BAD_RESPONSE)
