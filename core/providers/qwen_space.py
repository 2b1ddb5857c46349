"""The free Qwen/Qwen-Image Hugging Face Space, through the real gradio_client.

One attempt: take a connected Client (or connect one in a worker thread, bounded), submit to `/infer`, poll the
Job for queue rank and step progress, collect `(image path, seed)` within the request's deadline, then
validate and store the WEBP. Every failure becomes a ProviderError:

- AppError "ZeroGPU quota exceeded" / "ZeroGPU pending credits exceeded" -> QUOTA_EXCEEDED, with
  retry_after_s and reset_at from "Try again in H:MM:SS"
- AppError "ZeroGPU queue timeout" -> RATE_LIMITED (no GPU free in time; the quota itself is not spent)
- Gradio's own input checks (an AppError saying "not in the list of choices" / "greater than maximum value",
  a ValidationError from an endpoint validator, HTTP 400/422 at queue join) -> VALIDATION
- any other AppError (the Space's function failed: CUDA, out of memory, a bug) -> UNAVAILABLE
- QueueError "Queue is full", TooManyRequestsError, HTTP 429 -> RATE_LIMITED
- AuthenticationError, HTTP 401/403 -> AUTH
- httpx/httpx2 connection errors, HTTP 5xx/404, a Space that is paused or broken (ValueError) -> UNAVAILABLE
- the request's deadline, read timeouts -> TIMEOUT; cancel() -> CANCELLED
- anything else (no image, not an image, output of another shape) -> BAD_RESPONSE

Gradio cancels by session: `/cancel` stops every running job of the session, not just one. So each in-flight
generation has a Client (a session) of its own, taken from a small pool, and cancelling one request never
stops another.

Billing: the Space costs no money, so no error of this adapter is ever billed. What it spends is ZeroGPU
quota (GPU seconds per day), which is not money and is not a billing fact.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common.config import disable_telemetry
from common.errors import Billing, ErrorClass, ProviderError
from core.catalog import QWEN_SPACE
from core.images import InvalidImage, StoredImage, store_image
from core.providers.base import (
    AdapterConfig,
    AdapterRequest,
    ConnectionMode,
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
    clamped_value,
    emit,
    emit_event,
)
from core.sizes import resolve_size

PROVIDER_ID = "qwen"
DEFAULT_SPACE = "Qwen/Qwen-Image"
API_NAME = "/infer"
EXPECTED_PARAMETERS: tuple[str, ...] = (
    "prompt",
    "seed",
    "randomize_seed",
    "aspect_ratio",
    "guidance_scale",
    "num_inference_steps",
    "prompt_enhance",
)
EXPECTED_RETURNS = 2  # (image, seed)

DEFAULT_CONNECT_TIMEOUT_S = 20.0
DEFAULT_READ_TIMEOUT_S = 60.0
"""Per HTTP read. Gradio's event stream sends a heartbeat every 15 s, so an idle queue wait never trips it."""
CANCEL_TIMEOUT_S = 5.0
FREE = Billing.NOT_BILLED
"""Every error's billing: the Space charges no money (see the module doc)."""

_TRY_AGAIN = re.compile(r"try again in\s+(?:(\d+):)?(\d{1,2}):(\d{2})", re.IGNORECASE)
# Gradio's own input checks (Radio/Dropdown choices, Slider/Number bounds, validators).
_GRADIO_INPUT_ERRORS = re.compile(
    r"is not in the list of choices|is (?:greater|less) than (?:maximum|minimum) value"
    r"|parameter\(s\) failed validation",
    re.IGNORECASE,
)


def parse_wait(message: str) -> float | None:
    """Seconds from ZeroGPU's "Try again in H:MM:SS" (or "M:SS"); None when the message gives no wait."""
    m = _TRY_AGAIN.search(message or "")
    if not m:
        return None
    hours = int(m.group(1)) if m.group(1) else 0
    return float(hours * 3600 + int(m.group(2)) * 60 + int(m.group(3)))


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _response_text(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    try:
        text = str(getattr(response, "text", "") or "")
    except Exception:  # a streamed response that was never read has no text
        text = ""
    return text.strip()[:500] or str(exc)


def _is_http_library_error(exc: BaseException, *names: str) -> bool:
    """httpx (gradio_client) and httpx2 (huggingface_hub) share class names but not classes."""
    module = type(exc).__module__ or ""
    if not module.startswith("httpx"):
        return False
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def map_error(exc: BaseException, *, request_id: str | None = None) -> ProviderError:
    """Any exception from gradio_client, the Hub lookup or our own handling -> ProviderError."""
    if isinstance(exc, ProviderError):
        return exc

    def err(error_class: ErrorClass, message: str, **kw: Any) -> ProviderError:
        return ProviderError(
            error_class, message, provider=PROVIDER_ID, billing=FREE, provider_request_id=request_id, **kw
        )

    from gradio_client import exceptions as gc_exceptions
    from gradio_client import utils as gc_utils

    if isinstance(exc, gc_exceptions.AppError):
        title = str(getattr(exc, "title", "") or "")
        message = str(getattr(exc, "message", "") or exc)
        lowered = title.lower()
        if lowered.startswith("zerogpu"):
            wait = parse_wait(message)
            if "queue timeout" in lowered:
                return err(ErrorClass.RATE_LIMITED, f"{title}: {message}", retry_after_s=wait)
            if "quota" in lowered or "credits" in lowered or wait is not None:
                reset_at = datetime.now(UTC) + timedelta(seconds=wait) if wait is not None else None
                return err(ErrorClass.QUOTA_EXCEEDED, f"{title}: {message}", retry_after_s=wait, reset_at=reset_at)
            return err(ErrorClass.UNAVAILABLE, f"{title}: {message}")
        if _GRADIO_INPUT_ERRORS.search(message):
            return err(ErrorClass.VALIDATION, message)
        return err(ErrorClass.UNAVAILABLE, f"the Space failed: {message}")
    if isinstance(exc, gc_exceptions.ValidationError):
        return err(ErrorClass.VALIDATION, str(exc))
    if isinstance(exc, gc_exceptions.AuthenticationError):
        return err(ErrorClass.AUTH, str(exc))
    if isinstance(exc, gc_utils.QueueError | gc_utils.TooManyRequestsError):
        return err(ErrorClass.RATE_LIMITED, str(exc) or "the Space's queue is full")
    if isinstance(exc, gc_utils.InvalidAPIEndpointError):
        return err(ErrorClass.BAD_RESPONSE, f"the Space has no usable {API_NAME} endpoint")

    code = _status_code(exc)
    if code is not None:
        text = _response_text(exc)
        if code in (400, 422):
            return err(ErrorClass.VALIDATION, text, status_code=code)
        if code in (401, 403):
            return err(ErrorClass.AUTH, text, status_code=code)
        if code == 429:
            return err(ErrorClass.RATE_LIMITED, text, status_code=code)
        if code >= 500 or code == 404:
            # 404: no such Space / app at this address; nothing our request did.
            return err(ErrorClass.UNAVAILABLE, text, status_code=code)
        return err(ErrorClass.BAD_RESPONSE, text, status_code=code)

    if _is_http_library_error(exc, "ConnectError", "ConnectTimeout"):
        return err(ErrorClass.UNAVAILABLE, f"cannot reach the Space: {type(exc).__name__}: {exc}")
    if _is_http_library_error(exc, "TimeoutException"):
        return err(ErrorClass.TIMEOUT, f"the Space did not answer in time: {type(exc).__name__}: {exc}")
    if _is_http_library_error(exc, "TransportError", "StreamError"):
        return err(ErrorClass.UNAVAILABLE, f"connection to the Space failed: {type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return err(ErrorClass.TIMEOUT, str(exc) or "timed out")
    if isinstance(exc, concurrent.futures.CancelledError):
        # Not asked for by us (that is handled before mapping): the Space's event stream closed under the job.
        return err(ErrorClass.UNAVAILABLE, "the Space closed the job's event stream before it finished")
    if isinstance(exc, InvalidImage):
        return err(ErrorClass.BAD_RESPONSE, f"the Space returned an invalid image: {exc}")
    if isinstance(exc, ConnectionError):
        return err(ErrorClass.UNAVAILABLE, f"connection to the Space failed: {exc}")
    if isinstance(exc, ValueError):
        text = str(exc)
        # Client() raises bare ValueErrors for a Space that is paused, broken, missing or not a Gradio app.
        if any(s in text for s in ("invalid state", "Could not find Space", "Could not fetch", "Could not get")):
            return err(ErrorClass.UNAVAILABLE, text)
    return err(ErrorClass.BAD_RESPONSE, f"unexpected {type(exc).__name__}: {exc}")


def check_signature(api_info: Mapping[str, Any]) -> None:
    """Fail with BAD_RESPONSE unless `/infer` takes exactly the Space's parameters and returns (image, seed)."""
    endpoints = api_info.get("named_endpoints") or {}
    endpoint = endpoints.get(API_NAME)
    if endpoint is None:
        found = ", ".join(sorted(endpoints)) or "none"
        raise ProviderError(
            ErrorClass.BAD_RESPONSE,
            f"the Space has no {API_NAME} endpoint (named endpoints: {found}); is this the Qwen-Image Space?",
            provider=PROVIDER_ID,
            billing=FREE,
        )
    names = tuple(str(p.get("parameter_name") or p.get("label") or "?") for p in endpoint.get("parameters") or [])
    returns = endpoint.get("returns") or []
    if names != EXPECTED_PARAMETERS or len(returns) != EXPECTED_RETURNS:
        raise ProviderError(
            ErrorClass.BAD_RESPONSE,
            f"the Space's {API_NAME} signature changed: expected ({', '.join(EXPECTED_PARAMETERS)}) -> "
            f"{EXPECTED_RETURNS} values, found ({', '.join(names)}) -> {len(returns)} values",
            provider=PROVIDER_ID,
            billing=FREE,
        )


@dataclass
class _Flight:
    """An in-flight generation: its Job and the Client (session) that runs it."""

    job: Any
    client: Any
    cancelled: bool = False


class QwenSpaceAdapter(ProviderAdapter):
    """Qwen-Image on its Hugging Face Space (or the local emulator), $0 per image, limited by ZeroGPU quota.

    AdapterConfig.base_url: a Gradio app URL (the emulator, e.g. http://127.0.0.1:PORT/qwen/); None = the
    Space named by extra["space"] (default Qwen/Qwen-Image), resolved through the Hub. extra may also set
    connect_timeout_s and read_timeout_s.
    """

    provider_id = PROVIDER_ID
    supports_cancel = True

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        extra = config.extra
        self.space: str = str(extra.get("space", DEFAULT_SPACE))
        self.connect_timeout_s = float(extra.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S))
        self.read_timeout_s = float(extra.get("read_timeout_s", DEFAULT_READ_TIMEOUT_S))
        for name, value in (("connect_timeout_s", self.connect_timeout_s), ("read_timeout_s", self.read_timeout_s)):
            if not value > 0:
                raise ValueError(f"qwen adapter: {name} must be > 0, not {value}")
        if config.poll_interval_s <= 0:
            raise ValueError(f"qwen adapter: poll_interval_s must be > 0, not {config.poll_interval_s}")
        self._idle: list[Any] = []
        self._pool_lock = asyncio.Lock()
        self._flights: dict[str, _Flight] = {}
        self._download_dir_made: Path | None = None  # made on first use: routing builds adapters it never runs

    @property
    def _download_dir(self) -> Path:
        if self._download_dir_made is None:
            self._download_dir_made = Path(tempfile.mkdtemp(prefix="imagegate-qwen-"))
        return self._download_dir_made

    @property
    def source(self) -> str:
        """What the Client connects to: the configured URL, or the Space id."""
        return self.config.base_url or self.space

    # -- parameters ---------------------------------------------------------------------------------------

    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> `/infer`'s keyword arguments. Values are checked by the one validator;
        steps and guidance outside the Space's range are clamped with a note (a fallback from a provider with
        wider ranges sends them), anything else it cannot take raises InvalidInput."""
        checked_prompt(QWEN_SPACE, request.prompt)
        spec = QWEN_SPACE
        params = dict(request.params)
        notes: list[str] = []

        def given(name: str) -> Any:
            value = params.get(name)
            return spec.params[name].default if value is None else value

        checked_value(spec, "num_images", given("num_images"))  # the Space makes one image per request
        size = resolve_size(spec, checked_value(spec, "image_size", given("image_size")))
        if not size.exact and size.note:
            notes.append(size.note)
        steps = clamped_value(spec, "num_inference_steps", given("num_inference_steps"), notes)
        guidance = clamped_value(spec, "guidance_scale", given("guidance_scale"), notes)
        seed = checked_value(spec, "seed", params.get("seed"))
        enhance = checked_value(spec, "prompt_enhance", given("prompt_enhance"))

        for name, value in sorted(params.items()):
            if name not in spec.params and value not in (None, ""):
                notes.append(f"{name} is not supported by the Qwen-Image Space; ignored")

        wire = {
            "prompt": request.prompt,
            "seed": 0 if seed is None else seed,
            "randomize_seed": seed is None,
            "aspect_ratio": size.wire_value,
            "guidance_scale": float(guidance),
            "num_inference_steps": int(steps),
            "prompt_enhance": enhance,
        }
        return Translation(wire_params=wire, notes=tuple(notes))

    # -- clients ------------------------------------------------------------------------------------------

    def _token(self) -> str | bool:
        # False, not None: with None gradio_client would send a token saved on this machine, unasked.
        return self.config.api_key or False

    def _connect_blocking(self) -> Any:
        disable_telemetry()
        import httpx
        from gradio_client import Client

        client = Client(
            self.source,
            token=self._token(),
            verbose=False,
            analytics_enabled=False,
            download_files=str(self._download_dir),
            httpx_kwargs={"timeout": httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)},
        )
        try:
            check_signature(client.view_api(print_info=False, return_format="dict"))
        except BaseException:
            client.close()
            raise
        return client

    async def _connect(self, deadline: float | None) -> Any:
        """A connected, checked Client within the connect timeout, or the request's `deadline` when that comes
        first (None: the connect timeout alone, as for a health probe). A Space that does not answer in time
        is unavailable; only a request whose own deadline cut the connect short timed out."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise ProviderError(
                ErrorClass.TIMEOUT, "no time left to connect to the Space", provider=PROVIDER_ID, billing=FREE
            )
        cut_short = remaining is not None and remaining < self.connect_timeout_s
        bound = remaining if remaining is not None and cut_short else self.connect_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._connect_blocking), bound)
        except TimeoutError:
            # The worker thread gives up on its own (httpx timeouts); nobody waits for it.
            if cut_short:
                raise ProviderError(
                    ErrorClass.TIMEOUT,
                    f"the request's deadline passed while connecting to {self.source}",
                    provider=PROVIDER_ID,
                    billing=FREE,
                ) from None
            raise ProviderError(
                ErrorClass.UNAVAILABLE,
                f"could not connect to {self.source}: no answer within {self.connect_timeout_s:g}s",
                provider=PROVIDER_ID,
                billing=FREE,
            ) from None
        except ProviderError:
            raise
        except Exception as exc:
            mapped = map_error(exc)
            if mapped.error_class is ErrorClass.TIMEOUT:
                # A read timed out while connecting: the Space is not answering, nothing was submitted.
                raise ProviderError(
                    ErrorClass.UNAVAILABLE,
                    f"could not connect to {self.source}: {mapped.message}",
                    provider=PROVIDER_ID,
                    billing=FREE,
                ) from exc
            raise mapped from exc

    async def _acquire(self, deadline: float) -> Any:
        async with self._pool_lock:
            if self._idle:
                return self._idle.pop()
        return await self._connect(deadline)

    async def _release(self, client: Any, *, reusable: bool) -> None:
        if reusable:
            async with self._pool_lock:
                self._idle.append(client)
        else:
            await asyncio.to_thread(client.close)

    async def aclose(self) -> None:
        """Close every idle Client (their heartbeat connections) and the download folder."""
        async with self._pool_lock:
            idle, self._idle = self._idle, []
        for client in idle:
            await asyncio.to_thread(client.close)
        if self._download_dir_made is not None:
            shutil.rmtree(self._download_dir_made, ignore_errors=True)

    # -- running ------------------------------------------------------------------------------------------

    def _event_for(self, status: Any, request_id: str) -> ProgressEvent | None:
        code = getattr(getattr(status, "code", None), "value", None)
        if code == "IN_QUEUE":
            rank = status.rank
            return ProgressEvent(
                EventKind.QUEUED,
                PROVIDER_ID,
                request_id,
                # Gradio's rank counts the jobs ahead (0 = next); positions here start at 1 = next to run.
                queue_position=rank + 1 if isinstance(rank, int) else None,
                queue_size=status.queue_size,
                eta_s=float(status.eta) if status.eta is not None else None,
            )
        if code == "PROCESSING":
            return ProgressEvent(EventKind.RUNNING, PROVIDER_ID, request_id, progress=0.0)
        if code == "PROGRESS":
            fraction: float | None = None
            message = ""
            for unit in status.progress_data or []:
                if unit.index is not None and unit.length:
                    fraction = min(1.0, max(0.0, unit.index / unit.length))
                elif unit.progress is not None:
                    fraction = min(1.0, max(0.0, float(unit.progress)))
                message = unit.desc or message
            return ProgressEvent(EventKind.RUNNING, PROVIDER_ID, request_id, progress=fraction, message=message)
        return None

    async def _wait_for_event_id(self, job: Any, deadline: float) -> str | None:
        """Gradio's event id, known once the queue accepted the job (None if the join failed)."""
        while time.monotonic() < deadline:
            communicator = getattr(job, "communicator", None)
            event_id = getattr(communicator, "event_id", None)
            if event_id:
                return str(event_id)
            if job.done():
                return None
            await asyncio.sleep(0.01)
        return None

    async def _cancel_job(self, flight: _Flight) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(flight.job.cancel), CANCEL_TIMEOUT_S)

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

        client = await self._acquire(deadline)
        try:
            job = client.submit(**translation.wire_params, api_name=API_NAME)
        except Exception as exc:
            await self._release(client, reusable=False)
            raise map_error(exc) from exc

        event_id = await self._wait_for_event_id(job, deadline)
        request_id = event_id or f"local-{id(job):x}"
        flight = _Flight(job=job, client=client)
        self._flights[request_id] = flight
        reusable = False
        try:
            if event_id:
                await emit(on_request_id, request_id)
                await emit_event(on_event, ProgressEvent(EventKind.SUBMITTED, PROVIDER_ID, request_id))
            submit_s = watch.lap()
            queue_s, running = 0.0, False
            last: ProgressEvent | None = None
            while not job.done():
                if flight.cancelled:
                    break
                if time.monotonic() >= deadline:
                    await self._cancel_job(flight)
                    raise ProviderError(
                        ErrorClass.TIMEOUT,
                        f"no result within {request.timeout_s:g}s (cancelled on the Space)",
                        provider=PROVIDER_ID,
                        billing=FREE,
                        provider_request_id=event_id,
                    )
                event = self._event_for(job.status(), request_id)
                if event is not None and event != last:
                    if event.kind is EventKind.RUNNING and not running:
                        running, queue_s = True, watch.lap()
                    last = event
                    await emit_event(on_event, event)
                await asyncio.sleep(min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic())))
            if flight.cancelled:
                raise ProviderError(
                    ErrorClass.CANCELLED,
                    "cancelled on request",
                    provider=PROVIDER_ID,
                    billing=FREE,
                    provider_request_id=event_id,
                )
            if not running:
                queue_s = watch.lap()
            try:
                output = job.result(timeout=0)
            except Exception as exc:
                mapped = map_error(exc, request_id=event_id)
                # An error the Space reported cleanly leaves the session healthy.
                reusable = (
                    mapped.error_class in (ErrorClass.QUOTA_EXCEEDED, ErrorClass.RATE_LIMITED, ErrorClass.VALIDATION)
                    or type(exc).__name__ == "AppError"
                )
                raise mapped from exc
            reusable = True
            run_s = watch.lap()
            await emit_event(on_event, ProgressEvent(EventKind.DOWNLOADING, PROVIDER_ID, request_id))
            image, seed = await self._collect(output, event_id)
            download_s = watch.lap()
            await emit_event(on_event, ProgressEvent(EventKind.COMPLETED, PROVIDER_ID, request_id, progress=1.0))
        finally:
            self._flights.pop(request_id, None)
            if not job.done() or flight.cancelled:
                reusable = False
            await self._release(client, reusable=reusable)

        aspect_ratio = translation.wire_params["aspect_ratio"]
        return ProviderResult(
            provider=PROVIDER_ID,
            images=(image,),
            seed=seed,
            provider_request_id=event_id,
            timings=Timings(
                submit_s=submit_s, queue_s=queue_s, run_s=run_s, download_s=download_s, total_s=watch.total()
            ),
            translation=translation,
            billed_units=None,
            mode=self.mode,
            raw_metadata={
                "source": self.source,
                "event_id": event_id,
                "aspect_ratio": aspect_ratio,
                "randomize_seed": translation.wire_params["randomize_seed"],
                "prompt_enhance": translation.wire_params["prompt_enhance"],
            },
        )

    async def _collect(self, output: Any, event_id: str | None) -> tuple[StoredImage, int]:
        def bad(message: str) -> ProviderError:
            return ProviderError(
                ErrorClass.BAD_RESPONSE, message, provider=PROVIDER_ID, billing=FREE, provider_request_id=event_id
            )

        if not isinstance(output, tuple | list) or len(output) != EXPECTED_RETURNS:
            raise bad(f"expected (image, seed) from {API_NAME}, got {output!r:.200}")
        image_path, seed_value = output
        if not isinstance(image_path, str) or not image_path:
            raise bad(f"the Space returned no image (got {image_path!r:.100})")
        if isinstance(seed_value, bool) or not isinstance(seed_value, int | float) or seed_value != int(seed_value):
            raise bad(f"the Space returned no usable seed (got {seed_value!r:.100})")
        path = Path(image_path)

        def read_and_store() -> StoredImage:
            try:
                data = path.read_bytes()
            finally:
                # The client's download is only a hand-over; the store keeps the content-addressed copy.
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
            return store_image(data)

        try:
            stored = await asyncio.to_thread(read_and_store)
        except InvalidImage as exc:
            raise bad(f"the Space returned something that is not a usable image: {exc}") from exc
        except OSError as exc:
            raise bad(f"cannot read the downloaded image {path}: {exc}") from exc
        return stored, int(seed_value)

    async def cancel(self, provider_request_id: str) -> None:
        """Cancel an in-flight generation of this adapter by the id given to `on_request_id` (Gradio's event id)."""
        flight = self._flights.get(provider_request_id)
        if flight is None:
            raise ProviderError(
                ErrorClass.VALIDATION,
                f"no request {provider_request_id!r} in flight here; only running requests started by this "
                "adapter can be cancelled",
                provider=PROVIDER_ID,
                billing=FREE,
                provider_request_id=provider_request_id,
            )
        flight.cancelled = True
        await self._cancel_job(flight)

    async def health_probe(self) -> HealthReport:
        """Connect afresh and check `/infer`'s signature; generates nothing (no ZeroGPU quota used)."""
        started = time.monotonic()
        try:
            client = await self._connect(None)
        except ProviderError as exc:
            return HealthReport(
                PROVIDER_ID, False, time.monotonic() - started, exc.message, error_class=exc.error_class
            )
        latency = time.monotonic() - started
        await self._release(client, reusable=True)
        where = "emulator" if self.mode is ConnectionMode.EMULATOR else "Space"
        return HealthReport(PROVIDER_ID, True, latency, f"{where} {self.source}: {API_NAME} signature as expected")
