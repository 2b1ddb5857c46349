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
which makes every result reproducible. Calls still running at the deadline are abandoned quietly: their worker
threads end at the client's timeout, and nothing waits for (or logs) what they raise then.

Billing: an error answer (400, 404, 422, 401, 402, 429, 5xx) or a connection that never opened cost nothing;
a call that was sent and never answered (a read timeout, a broken connection, the deadline) may have been
billed: unknown; a 200 whose body is not a usable image was computed, and billed. HF reports no units. For
several calls, the attempt's billing is unknown if any call's is, else billed if any call's is.
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx2
from huggingface_hub import HfApi, InferenceClient
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.utils._http import parse_ratelimit_headers
from PIL import Image

from common.config import disable_telemetry
from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.catalog import HUGGINGFACE, SEED_MAX
from core.images import MAX_IMAGE_PIXELS, InvalidImage, StoredImage, store_image
from core.keys import key_destination_problem
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
    checked_values,
    emit_event,
    refused,
    unsent_notes,
)
from core.providers.http_headers import retry_after_seconds
from core.sizes import resolve_size

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


def _check_key_destination(url: str, config: AdapterConfig) -> None:
    """Defence in depth behind settings validation: the token is sent to an endpoint URL only where core.keys
    allows it (HF's own hosts, an endpoint the operator allowed, the configured base URL; in emulator mode,
    whose key is the emulator's, any loopback URL). Refused before anything is sent, so never billed."""
    problem = key_destination_problem(
        "huggingface",
        url,
        also_allowed=(config.base_url,) if config.base_url else (),
        allow_loopback=config.mode is ConnectionMode.EMULATOR,
    )
    if problem is not None:
        raise ProviderError(
            ErrorClass.VALIDATION, f"model: {problem}", provider="huggingface", billing=Billing.NOT_BILLED
        )


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


def _attempt_billing(outcomes: list[Billing]) -> Billing:
    """The billing of an attempt made of several calls: unknown if any call's is, else billed if any call's
    is, else not billed."""
    if Billing.UNKNOWN in outcomes:
        return Billing.UNKNOWN
    return Billing.BILLED if Billing.BILLED in outcomes else Billing.NOT_BILLED


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


def _abandon(tasks: Iterable[asyncio.Future[StoredImage]]) -> None:
    """Stop waiting for calls that are still running. Their worker threads cannot be interrupted (the client's
    timeout ends them), so cancel the tasks and take whatever they raise later, unlogged: an abandoned call's
    failure is already reported as this attempt's timeout, not as 'Task exception was never retrieved'."""
    for task in tasks:
        task.cancel()
        task.add_done_callback(_forget)


def _forget(task: asyncio.Future[StoredImage]) -> None:
    if not task.cancelled():
        task.exception()


class HuggingFaceAdapter(ProviderAdapter):
    provider_id = "huggingface"

    def _fail(self, error_class: ErrorClass, message: str, billing: Billing, **kwargs: Any) -> ProviderError:
        return ProviderError(error_class, message, provider=self.provider_id, billing=billing, **kwargs)

    # -- translation -------------------------------------------------------------------------------------

    def _target(self, params: Any, notes: list[str]) -> _Target:
        """Where the call goes. Raises InvalidInput for a model or inference provider that cannot be used."""
        model = checked_value(HUGGINGFACE, "model", params.get("model") or HUGGINGFACE.params["model"].default)
        provider = checked_value(
            HUGGINGFACE,
            "inference_provider",
            params.get("inference_provider") or HUGGINGFACE.params["inference_provider"].default,
        )
        if model.startswith(("http://", "https://")):
            _check_key_destination(model, self.config)
            if provider != "auto":
                notes.append(f"an endpoint URL is called directly; inference_provider {provider!r} does not apply")
            return _Target(model=model, provider=None, hub_model_id=None)
        if not _MODEL_ID.match(model):
            raise refused(
                HUGGINGFACE, {"model": f"model {model!r} is neither a Hub model id (owner/name) nor an http(s) URL"}
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
        """Canonical parameters -> text_to_image's arguments, each value checked by the one validator against
        the catalog's ranges. Raises InvalidInput when this provider cannot serve the request."""
        checked_prompt(HUGGINGFACE, request.prompt)
        params = request.params
        notes: list[str] = []
        try:
            target = self._target(params, notes)
        except ProviderError as exc:
            # A refusal raised as a ProviderError (the key-destination guard): translate() raises InvalidInput.
            raise refused(HUGGINGFACE, {"model": exc.message}) from None
        wire: dict[str, Any] = {"model": target.model, "provider": target.provider}
        size_value = params.get("image_size") or HUGGINGFACE.params["image_size"].default
        size = resolve_size(HUGGINGFACE, checked_value(HUGGINGFACE, "image_size", size_value))
        wire["width"], wire["height"] = size.width, size.height
        if not size.exact:
            notes.append(size.note)
        wire.update(checked_values(HUGGINGFACE, params, (*_NUMERIC, "negative_prompt")))
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
        """Any failure of huggingface_hub, httpx2 or PIL as one ProviderError, billed as the module doc says."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, InvalidInput):
            return self._fail(ErrorClass.VALIDATION, str(exc), Billing.NOT_BILLED)
        if isinstance(exc, HfHubHTTPError):
            return self._map_http_error(exc)
        if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
            if isinstance(exc.__cause__, httpx2.ConnectTimeout) or isinstance(exc, httpx2.ConnectTimeout):
                return self._fail(ErrorClass.UNAVAILABLE, f"could not connect to {target} in time", Billing.NOT_BILLED)
            return self._fail(ErrorClass.TIMEOUT, f"no answer from {target} within the timeout", Billing.UNKNOWN)
        if isinstance(exc, OfflineModeIsEnabled):
            return self._fail(
                ErrorClass.UNAVAILABLE, "HF_HUB_OFFLINE is set: huggingface_hub makes no calls", Billing.NOT_BILLED
            )
        if isinstance(exc, httpx2.ConnectError):
            return self._fail(
                ErrorClass.UNAVAILABLE, f"cannot reach {target}: {exc.__class__.__name__}: {exc}", Billing.NOT_BILLED
            )
        if isinstance(exc, httpx2.TransportError):
            # Sent, then the connection broke: HF may have run (and billed) the call.
            return self._fail(
                ErrorClass.UNAVAILABLE,
                f"the connection to {target} broke: {exc.__class__.__name__}: {exc}",
                Billing.UNKNOWN,
            )
        if isinstance(exc, httpx2.HTTPError):
            return self._fail(
                ErrorClass.BAD_RESPONSE, f"unreadable answer: {exc.__class__.__name__}: {exc}", Billing.UNKNOWN
            )
        if isinstance(exc, InvalidImage | OSError | SyntaxError | Image.DecompressionBombError):
            # PIL could not read what came back (UnidentifiedImageError is an OSError), or it was out of limits.
            # HF answered 200: it ran the call, and bills it.
            return self._fail(ErrorClass.BAD_RESPONSE, f"the answer is not a usable image: {exc}", Billing.BILLED)
        if isinstance(exc, ValueError):
            # huggingface_hub's own refusals, before sending: unknown provider, task not supported, no token.
            return self._fail(ErrorClass.VALIDATION, str(exc), Billing.NOT_BILLED)
        return self._fail(
            ErrorClass.BAD_RESPONSE, f"unexpected failure: {exc.__class__.__name__}: {exc}", Billing.UNKNOWN
        )

    def _map_http_error(self, exc: HfHubHTTPError) -> ProviderError:
        """An error answer: the call was refused or failed, and nothing was billed (HF bills what it runs)."""
        status = exc.response.status_code
        message = _server_message(exc)
        request_id = exc.request_id
        common: dict[str, Any] = {
            "status_code": status,
            "provider_request_id": request_id,
            "billing": Billing.NOT_BILLED,
        }
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
        translation = self.translated(request)
        if not self.config.api_key:
            raise self._fail(ErrorClass.AUTH, "no Hugging Face token configured (HF_TOKEN)", Billing.NOT_BILLED)
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
        try:
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
        finally:
            _abandon(pending)  # the deadline passed, or our own task was cancelled
        for task in pending:
            # Sent, and not answered in time: HF may still run (and bill) it.
            outcomes[tasks.index(task)] = self._fail(
                ErrorClass.TIMEOUT,
                f"no image from {self._where(wire)} within {request.timeout_s:g}s",
                Billing.UNKNOWN,
            )
        images = [(seeds[i], o) for i, o in sorted(outcomes.items()) if isinstance(o, StoredImage)]
        failures = [(seeds[i], o) for i, o in sorted(outcomes.items()) if isinstance(o, ProviderError)]
        if not images:
            first = failures[0][1]
            billing = _attempt_billing([err.billing for _, err in failures])
            if billing is first.billing:
                raise first
            raise ProviderError(
                first.error_class,
                f"{first.message} (and {len(failures) - 1} more call(s) failed)",
                provider=self.provider_id,
                billing=billing,
                status_code=first.status_code,
                retry_after_s=first.retry_after_s,
                reset_at=first.reset_at,
                provider_request_id=first.provider_request_id,
            )
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
                    {
                        "seed": seed,
                        "error_class": err.error_class.value,
                        "billing": err.billing.value,
                        "message": err.message,
                    }
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
            raise self._fail(
                ErrorClass.VALIDATION, f"no inference provider serves {target.hub_model_id} now", Billing.NOT_BILLED
            )
        if wanted != "auto" and wanted not in live:
            raise self._fail(
                ErrorClass.VALIDATION,
                f"{wanted} does not serve {target.hub_model_id}; live providers: {', '.join(live)}",
                Billing.NOT_BILLED,
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
