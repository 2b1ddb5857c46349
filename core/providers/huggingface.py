"""Hugging Face Inference through huggingface_hub's InferenceClient.text_to_image (httpx2 underneath).

Where the call goes, from the `model` parameter and the adapter's base URL:
- an endpoint URL (`https://...`): POSTed to exactly, `inference_provider` ignored (a dedicated Inference
  Endpoint or a self-hosted server);
- a Hub model id with a base URL configured (the emulator, or a self-hosted router): POSTed to
  `{base_url}/models/{model_id}`, the hf-inference route shape;
- a Hub model id otherwise: routed by huggingface_hub to `inference_provider` (`auto` = the model's first
  provider mapping on the Hub), billed by HF.

text_to_image returns one image per call, so `num_images` > 1 is N calls with seeds seed, seed+1, ... run side
by side. The client is blocking: each call holds a worker thread, bounded by the client's timeout (never None)
and by the attempt's deadline. HF returns no seed, so when none is asked for the adapter picks one and sends it,
which makes every result reproducible.
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx2
from huggingface_hub import HfApi, InferenceClient
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.utils._http import parse_ratelimit_headers
from PIL import Image

from core.catalog import HUGGINGFACE, SEED_MAX
from common.config import disable_telemetry
from common.errors import ErrorClass, ProviderError
from core.images import MAX_IMAGE_PIXELS, InvalidImage, StoredImage, store_image
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
from core.providers.http_headers import retry_after_seconds
from core.sizes import SizeError, resolve_size

# The env var is read when huggingface_hub is imported, which may have happened before ours was set: force it.
disable_telemetry()
hf_constants.HF_HUB_DISABLE_TELEMETRY = True

PROBE_TIMEOUT_S = 10.0
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_RETRY_IN_MESSAGE = re.compile(r"[Rr]etry after (\d+(?:\.\d+)?) seconds")
_SAFETY_WORDS = ("nsfw", "safety", "unsafe content")
_NUMERIC = ("num_inference_steps", "guidance_scale", "seed", "num_images")
_SEED_SPAN = SEED_MAX + 1


@dataclass(frozen=True)
class _Target:
    model: str
    """What InferenceClient gets as `model`: a URL (posted to exactly) or a Hub model id."""
    provider: str | None
    """The inference provider for a model id; None for URLs (huggingface_hub uses hf-inference for them)."""
    hub_model_id: str | None
    """The Hub model id behind the call, when there is one (for the health probe's model lookup)."""


def _server_message(exc: HfHubHTTPError) -> str:
    message = exc.server_message or str(exc).strip().splitlines()[0]
    return message.strip() or f"HTTP {exc.response.status_code}"


def _body_json(exc: HfHubHTTPError) -> dict[str, Any]:
    try:
        parsed = exc.response.json()
    except (ValueError, httpx2.HTTPError, RuntimeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _rate_limit_wait(exc: HfHubHTTPError) -> float | None:
    headers = exc.response.headers
    waited = retry_after_seconds(headers.get("Retry-After"))
    if waited is not None:
        return waited
    info = parse_ratelimit_headers(headers)
    if info is not None:
        return float(info.reset_in_seconds)
    found = _RETRY_IN_MESSAGE.search(str(exc))
    return float(found.group(1)) if found else None


def _png_bytes(image: Image.Image) -> bytes:
    """The image PIL decoded, as PNG bytes. Pixels are checked before decoding so a bomb costs nothing."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImage(f"image is {width}x{height}, over the {MAX_IMAGE_PIXELS} pixel limit")
    image.load()
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class HuggingFaceAdapter(ProviderAdapter):
    provider_id = "huggingface"

    def _fail(self, error_class: ErrorClass, message: str, **kwargs: Any) -> ProviderError:
        return ProviderError(error_class, message, provider=self.provider_id, **kwargs)

    # -- translation -------------------------------------------------------------------------------------

    def _target(self, params: Any, notes: list[str]) -> _Target:
        model = params.get("model") or HUGGINGFACE.params["model"].default
        provider = params.get("inference_provider") or HUGGINGFACE.params["inference_provider"].default
        if not isinstance(model, str) or not model.strip():
            raise self._fail(ErrorClass.VALIDATION, f"model must be a Hub model id or a URL, got {model!r}")
        model = model.strip()
        choices = HUGGINGFACE.params["inference_provider"].choices
        if provider not in choices:
            raise self._fail(
                ErrorClass.VALIDATION, f"inference_provider must be one of {', '.join(choices)}, got {provider!r}"
            )
        if model.startswith(("http://", "https://")):
            if provider != "auto":
                notes.append(f"an endpoint URL is called directly; inference_provider {provider!r} does not apply")
            return _Target(model=model, provider=None, hub_model_id=None)
        if not _MODEL_ID.match(model):
            raise self._fail(
                ErrorClass.VALIDATION,
                f"model {model!r} is neither a Hub model id (owner/name) nor an http(s) URL",
            )
        if self.config.base_url:
            if provider not in ("auto", "hf-inference"):
                notes.append(
                    f"calls go to {self.config.base_url} (hf-inference route); "
                    f"inference_provider {provider!r} does not apply"
                )
            url = f"{self.config.base_url.rstrip('/')}/models/{model}"
            return _Target(model=url, provider=None, hub_model_id=model)
        return _Target(model=model, provider=str(provider), hub_model_id=model)

    def translate(self, request: AdapterRequest) -> Translation:
        params = request.params
        notes: list[str] = []
        target = self._target(params, notes)
        wire: dict[str, Any] = {"model": target.model, "provider": target.provider}
        size_value = params.get("image_size") or HUGGINGFACE.params["image_size"].default
        try:
            size = resolve_size(HUGGINGFACE, str(size_value))
        except SizeError as exc:
            raise self._fail(ErrorClass.VALIDATION, f"image_size: {exc}") from None
        wire["width"], wire["height"] = size.width, size.height
        if not size.exact:
            notes.append(size.note)
        try:
            wire.update(checked_values(HUGGINGFACE, params, (*_NUMERIC, "negative_prompt")))
        except ValueError as exc:
            raise self._fail(ErrorClass.VALIDATION, str(exc)) from None
        count = int(wire.pop("num_images", 1))
        wire["calls"] = count
        if count > 1:
            notes.append(
                f"text_to_image returns one image per call: {count} calls, with seeds seed, seed+1, ..."
            )
        handled = {"model", "inference_provider", "image_size", "negative_prompt", *_NUMERIC}
        notes.extend(unsent_notes("Hugging Face text_to_image", params, handled))
        return Translation(wire_params=wire, notes=tuple(notes))

    # -- errors ------------------------------------------------------------------------------------------

    def _map_error(self, exc: BaseException, target: str) -> ProviderError:
        """Any failure of huggingface_hub, httpx2 or PIL as one ProviderError."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, HfHubHTTPError):
            return self._map_http_error(exc)
        if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
            if isinstance(exc.__cause__, httpx2.ConnectTimeout) or isinstance(exc, httpx2.ConnectTimeout):
                return self._fail(ErrorClass.UNAVAILABLE, f"could not connect to {target} in time")
            return self._fail(ErrorClass.TIMEOUT, f"no answer from {target} within the timeout")
        if isinstance(exc, OfflineModeIsEnabled):
            return self._fail(ErrorClass.UNAVAILABLE, "HF_HUB_OFFLINE is set: huggingface_hub makes no calls")
        if isinstance(exc, httpx2.TransportError):
            return self._fail(ErrorClass.UNAVAILABLE, f"cannot reach {target}: {exc.__class__.__name__}: {exc}")
        if isinstance(exc, httpx2.HTTPError):
            return self._fail(ErrorClass.BAD_RESPONSE, f"unreadable answer: {exc.__class__.__name__}: {exc}")
        if isinstance(exc, InvalidImage | OSError | SyntaxError | Image.DecompressionBombError):
            # PIL could not read what came back (UnidentifiedImageError is an OSError), or it was out of limits.
            return self._fail(ErrorClass.BAD_RESPONSE, f"the answer is not a usable image: {exc}")
        if isinstance(exc, ValueError):
            # huggingface_hub's own refusals: unknown provider, task not supported, no token.
            return self._fail(ErrorClass.VALIDATION, str(exc))
        return self._fail(ErrorClass.BAD_RESPONSE, f"unexpected failure: {exc.__class__.__name__}: {exc}")

    def _map_http_error(self, exc: HfHubHTTPError) -> ProviderError:
        status = exc.response.status_code
        message = _server_message(exc)
        request_id = exc.request_id
        common: dict[str, Any] = {"status_code": status, "provider_request_id": request_id}
        if status in (401, 403):
            return self._fail(ErrorClass.AUTH, f"token refused: {message}", **common)
        if status == 402:
            return self._fail(ErrorClass.QUOTA_EXCEEDED, f"out of credits: {message}", **common)
        if status == 404:
            return self._fail(ErrorClass.VALIDATION, f"no such model or endpoint: {message}", **common)
        if status == 429:
            return self._fail(ErrorClass.RATE_LIMITED, message, retry_after_s=_rate_limit_wait(exc), **common)
        if status == 503:
            estimate = _body_json(exc).get("estimated_time")
            wait = float(estimate) if isinstance(estimate, int | float) and not isinstance(estimate, bool) else None
            if wait is None:
                wait = retry_after_seconds(exc.response.headers.get("Retry-After"))
            suffix = f" (ready in about {wait:g}s)" if wait is not None else ""
            return self._fail(ErrorClass.UNAVAILABLE, f"{message}{suffix}", retry_after_s=wait, **common)
        if status >= 500:
            return self._fail(ErrorClass.UNAVAILABLE, message, **common)
        if 400 <= status < 500:
            if any(word in message.lower() for word in _SAFETY_WORDS):
                return self._fail(ErrorClass.SAFETY_REJECTED, message, **common)
            return self._fail(ErrorClass.VALIDATION, message, **common)
        return self._fail(ErrorClass.BAD_RESPONSE, f"unexpected HTTP {status}: {message}", **common)

    # -- one call (runs in a worker thread) --------------------------------------------------------------

    def _one_image(self, prompt: str, wire: dict[str, Any], seed: int, timeout_s: float) -> StoredImage:
        client = InferenceClient(provider=wire["provider"], token=self.config.api_key, timeout=timeout_s)
        try:
            image = client.text_to_image(
                prompt,
                model=wire["model"],
                width=wire["width"],
                height=wire["height"],
                num_inference_steps=wire.get("num_inference_steps"),
                guidance_scale=wire.get("guidance_scale"),
                negative_prompt=wire.get("negative_prompt"),
                seed=seed,
            )
            with image:
                return store_image(_png_bytes(image))
        except Exception as exc:
            raise self._map_error(exc, self._where(wire)) from None

    def _where(self, wire: dict[str, Any]) -> str:
        model = str(wire["model"])
        return model.split("?", 1)[0] if wire["provider"] is None else f"{wire['provider']} ({model})"

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
            raise self._fail(ErrorClass.AUTH, "no Hugging Face token configured (HF_TOKEN)")
        wire = dict(translation.wire_params)
        count = int(wire.pop("calls"))
        first_seed = wire.pop("seed", None)
        if first_seed is None:
            first_seed = secrets.randbelow(_SEED_SPAN)
        seeds = [(int(first_seed) + i) % _SEED_SPAN for i in range(count)]
        await emit_event(on_event,
            ProgressEvent(
                EventKind.RUNNING,
                self.provider_id,
                progress=0.0,
                message=f"{count} text_to_image call(s) to {self._where(wire)}",
            ),
        )
        tasks = [
            asyncio.ensure_future(asyncio.to_thread(self._one_image, request.prompt, wire, seed, request.timeout_s))
            for seed in seeds
        ]
        outcomes: dict[int, StoredImage | ProviderError] = {}
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                index = tasks.index(task)
                exc = task.exception()
                outcomes[index] = self._map_error(exc, self._where(wire)) if exc else task.result()
            await emit_event(on_event,
                ProgressEvent(EventKind.RUNNING, self.provider_id, progress=len(outcomes) / count),
            )
        for task in pending:
            # The worker thread cannot be interrupted; its client timeout ends it. We stop waiting now.
            outcomes[tasks.index(task)] = self._fail(
                ErrorClass.TIMEOUT, f"no image from {self._where(wire)} within {request.timeout_s:g}s"
            )
        images = [(seeds[i], o) for i, o in sorted(outcomes.items()) if isinstance(o, StoredImage)]
        failures = [(seeds[i], o) for i, o in sorted(outcomes.items()) if isinstance(o, ProviderError)]
        if not images:
            raise failures[0][1]
        await emit_event(on_event, ProgressEvent(EventKind.COMPLETED, self.provider_id, progress=1.0))
        run_s = watch.lap()
        return ProviderResult(
            provider=self.provider_id,
            images=tuple(image for _, image in images),
            seed=images[0][0],
            provider_request_id=None,
            timings=Timings(run_s=run_s, total_s=watch.total()),
            translation=translation,
            mode=self.mode,
            raw_metadata={
                "target": self._where(wire),
                "calls": count,
                "seeds": [seed for seed, _ in images],
                "sizes": [f"{image.width}x{image.height}" for _, image in images],
                "failed_calls": [
                    {"seed": seed, "error_class": err.error_class.value, "message": err.message}
                    for seed, err in failures
                ],
            },
        )

    # -- health ------------------------------------------------------------------------------------------

    def _probe_blocking(self, target: _Target) -> str:
        """Cheap, non-billable: a GET on an endpoint URL, or the Hub's model info for a model id."""
        if target.hub_model_id is None:
            headers = {"Authorization": f"Bearer {self.config.api_key}"}
            with httpx2.Client(timeout=PROBE_TIMEOUT_S, follow_redirects=True) as http:
                answer = http.get(target.model, headers=headers)
            if answer.status_code < 400 or answer.status_code in (404, 405):
                # Dedicated endpoints answer GET differently (200, 404, 405); any answer of that kind is alive.
                return f"endpoint reachable (HTTP {answer.status_code} to GET)"
            answer.read()
            error = HfHubHTTPError(f"HTTP {answer.status_code}", response=answer, server_message=answer.text[:300])
            raise self._map_http_error(error)
        api = HfApi(endpoint=self.config.base_url or None, token=self.config.api_key)
        info = api.model_info(target.hub_model_id, expand=["inferenceProviderMapping"], timeout=PROBE_TIMEOUT_S)
        mappings = info.inference_provider_mapping or []
        wanted = target.provider or "hf-inference"
        live = [m.provider for m in mappings if m.status == "live"]
        if not live:
            raise self._fail(ErrorClass.VALIDATION, f"no inference provider serves {target.hub_model_id} now")
        if wanted != "auto" and wanted not in live:
            raise self._fail(
                ErrorClass.VALIDATION,
                f"{wanted} does not serve {target.hub_model_id}; live providers: {', '.join(live)}",
            )
        return f"{target.hub_model_id} found; live providers: {', '.join(live)}"

    async def health_probe(self) -> HealthReport:
        """Nothing is generated or billed.

        - An endpoint URL gets a GET with the token (any answer short of an auth, rate-limit or server error
          counts as up).
        - A Hub model id gets `GET {hub}/api/models/{id}?expand=inferenceProviderMapping` (the Hub, or the base
          URL's emulator): it checks the token (an invalid one is refused) and that the chosen inference
          provider serves the model, without running the model.
        """
        started = time.monotonic()
        if not self.config.api_key:
            return HealthReport(self.provider_id, False, 0.0, "no Hugging Face token configured", ErrorClass.AUTH)
        try:
            # The probe checks the model this adapter is configured for (AdapterConfig.extra), else the default.
            target = self._target(
                {k: self.config.extra.get(k) for k in ("model", "inference_provider")}, []
            )
            detail = await asyncio.wait_for(asyncio.to_thread(self._probe_blocking, target), PROBE_TIMEOUT_S + 1)
        except TimeoutError:
            return HealthReport(
                self.provider_id, False, time.monotonic() - started, "no answer to the probe", ErrorClass.TIMEOUT
            )
        except Exception as exc:
            failure = self._map_error(exc, self.config.base_url or "the Hugging Face Hub")
            return HealthReport(
                self.provider_id, False, time.monotonic() - started, failure.message, failure.error_class
            )
        return HealthReport(self.provider_id, True, time.monotonic() - started, detail)
