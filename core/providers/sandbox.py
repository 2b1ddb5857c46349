"""The offline sandbox: a provider that renders placeholders locally and never touches the network.

It stands in for every provider without a key, so it behaves like one: a request id, queue positions counting
down, a progress report per step, latency, one to four images with consecutive seeds, a random seed returned
when none was given, images validated and stored like any download. Its images are deterministic (same prompt,
seed, size and parameters: same bytes) and say SANDBOX on their face.

AdapterConfig.extra: `latency_s` (total simulated time, default 0.3 s: a fifth queued, the rest running) and
`queue_length` (positions reported before running, default 2).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from core.catalog import PROMPT_MAX_CHARS, SANDBOX, SEED_MAX
from common.errors import ErrorClass, InvalidInput, ProviderError
from core.images import StoredImage, store_image
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
    emit,
    emit_event,
)
from core.render import RenderSpec, render_placeholder
from core.sizes import SizeError, resolve_size

PROVIDER_ID = "sandbox"
DEFAULT_LATENCY_S = 0.3
DEFAULT_QUEUE_LENGTH = 2
QUEUE_SHARE = 0.2
"""Part of the latency spent 'queued'; the rest is spread over the steps."""


@dataclass
class _Flight:
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def _number(name: str, value: Any, *, integral: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"{name} must be a number", {name: f"expected a number, got {value!r}"})
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a number", {name: f"expected a number, got {value!r}"}) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InvalidInput(f"{name} must be a finite number", {name: f"got {value!r}"})
    if integral and not number.is_integer():
        raise InvalidInput(f"{name} must be a whole number", {name: f"got {value!r}"})
    return number


def _in_range(name: str, value: float, low: float | None, high: float | None) -> float:
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"{'' if low is None else f'{low:g}'}-{'' if high is None else f'{high:g}'}"
        raise InvalidInput(f"{name} {value:g} is outside {span}", {name: f"use a value in {span}"})
    return value


class SandboxAdapter(ProviderAdapter):
    """Offline placeholder renderer with the behaviour of a queue-based provider. $0, mode SANDBOX."""

    provider_id = PROVIDER_ID
    supports_cancel = True

    def __init__(self, config: AdapterConfig | None = None) -> None:
        super().__init__(config or AdapterConfig(mode=ConnectionMode.SANDBOX))
        extra = self.config.extra
        try:
            self.latency_s = float(extra.get("latency_s", DEFAULT_LATENCY_S))
            self.queue_length = int(extra.get("queue_length", DEFAULT_QUEUE_LENGTH))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sandbox adapter: latency_s and queue_length must be numbers ({exc})") from None
        if self.latency_s < 0 or self.latency_s != self.latency_s:
            raise ValueError(f"sandbox adapter: latency_s must be >= 0, not {self.latency_s}")
        if self.queue_length < 0:
            raise ValueError(f"sandbox adapter: queue_length must be >= 0, not {self.queue_length}")
        self._flights: dict[str, _Flight] = {}

    @property
    def mode(self) -> ConnectionMode:
        # Whatever the config says: nothing here ever reaches a provider.
        return ConnectionMode.SANDBOX

    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> what the renderer uses. Raises InvalidInput for values it cannot use."""
        prompt = request.prompt
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("the prompt is empty", {"prompt": "enter a prompt"})
        if len(prompt) > PROMPT_MAX_CHARS:
            raise InvalidInput(
                f"the prompt is {len(prompt)} characters, over {PROMPT_MAX_CHARS}",
                {"prompt": f"at most {PROMPT_MAX_CHARS} characters"},
            )
        params = dict(request.params)
        specs = SANDBOX.params
        notes: list[str] = []

        def spec_value(name: str) -> Any:
            value = params.get(name)
            return specs[name].default if value is None else value

        try:
            size = resolve_size(SANDBOX, str(spec_value("image_size")))
        except SizeError as exc:
            raise InvalidInput(str(exc), {"image_size": str(exc)}) from None
        if not size.exact and size.note:
            notes.append(size.note)

        def ranged(name: str, integral: bool) -> float:
            spec = specs[name]
            return _in_range(name, _number(name, spec_value(name), integral=integral), spec.minimum, spec.maximum)

        steps = int(ranged("num_inference_steps", integral=True))
        guidance = ranged("guidance_scale", integral=False)
        count = int(ranged("num_images", integral=True))
        seed: int | None = None
        if params.get("seed") is not None:
            seed = int(ranged("seed", integral=True))
        negative = params.get("negative_prompt") or ""
        if not isinstance(negative, str):
            raise InvalidInput("negative_prompt must be text", {"negative_prompt": f"got {negative!r}"})

        for name, value in sorted(params.items()):
            if name not in specs and value not in (None, ""):
                notes.append(f"{name} is not used by the sandbox; ignored")

        wire = {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": size.width,
            "height": size.height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "num_images": count,
            "seed": seed,
        }
        return Translation(wire_params=wire, notes=tuple(notes))

    async def _pause(self, seconds: float, flight: _Flight, deadline: float, request_id: str) -> None:
        """Sleep, but stop at once on cancel and never past the request's deadline."""
        remaining = deadline - time.monotonic()
        if seconds >= remaining:
            await self._sleep_or_cancel(max(0.0, remaining), flight, request_id)
            raise ProviderError(
                ErrorClass.TIMEOUT,
                "the sandbox's simulated latency is longer than the request's timeout",
                provider=PROVIDER_ID,
                provider_request_id=request_id,
            )
        await self._sleep_or_cancel(seconds, flight, request_id)

    async def _sleep_or_cancel(self, seconds: float, flight: _Flight, request_id: str) -> None:
        try:
            await asyncio.wait_for(flight.cancelled.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise ProviderError(
            ErrorClass.CANCELLED, "cancelled on request", provider=PROVIDER_ID, provider_request_id=request_id
        )

    async def generate(
        self,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
        on_request_id: RequestIdCallback | None = None,
    ) -> ProviderResult:
        watch = Stopwatch()
        deadline = watch.start + request.timeout_s
        try:
            translation = self.translate(request)
        except InvalidInput as exc:
            detail = "; ".join(f"{k}: {v}" for k, v in exc.field_errors.items())
            raise ProviderError(
                ErrorClass.VALIDATION, f"{exc} ({detail})" if detail else str(exc), provider=PROVIDER_ID
            ) from exc
        wire = translation.wire_params
        seed_given = wire["seed"] is not None
        base_seed: int = wire["seed"] if seed_given else secrets.randbelow(SEED_MAX + 1)

        request_id = f"sandbox-{uuid.uuid4().hex}"
        flight = _Flight()
        self._flights[request_id] = flight
        try:
            await emit(on_request_id, request_id)
            await emit_event(on_event, ProgressEvent(EventKind.SUBMITTED, PROVIDER_ID, request_id))
            submit_s = watch.lap()

            steps: int = wire["num_inference_steps"]
            queue_time = self.latency_s * QUEUE_SHARE if self.queue_length else 0.0
            per_position = queue_time / self.queue_length if self.queue_length else 0.0
            for position in range(self.queue_length, 0, -1):
                await emit_event(on_event,
                    ProgressEvent(
                        EventKind.QUEUED,
                        PROVIDER_ID,
                        request_id,
                        queue_position=position,
                        queue_size=self.queue_length,
                        eta_s=per_position * position,
                    ),
                )
                await self._pause(per_position, flight, deadline, request_id)
            queue_s = watch.lap()

            per_step = (self.latency_s - queue_time) / steps
            for step in range(steps):
                await emit_event(on_event,
                    ProgressEvent(
                        EventKind.RUNNING,
                        PROVIDER_ID,
                        request_id,
                        progress=step / steps,
                        message=f"step {step + 1}/{steps}",
                    ),
                )
                await self._pause(per_step, flight, deadline, request_id)
            seeds = tuple((base_seed + i) % (SEED_MAX + 1) for i in range(wire["num_images"]))
            specs = [
                RenderSpec(
                    prompt=wire["prompt"],
                    seed=s,
                    width=wire["width"],
                    height=wire["height"],
                    negative_prompt=wire["negative_prompt"],
                    guidance_scale=wire["guidance_scale"],
                    num_inference_steps=steps,
                )
                for s in seeds
            ]
            images = await asyncio.to_thread(lambda: [render_placeholder(spec) for spec in specs])
            await emit_event(on_event, ProgressEvent(EventKind.RUNNING, PROVIDER_ID, request_id, progress=1.0))
            run_s = watch.lap()

            await emit_event(on_event, ProgressEvent(EventKind.DOWNLOADING, PROVIDER_ID, request_id))
            stored: list[StoredImage] = []
            for data in images:
                stored.append(await asyncio.to_thread(store_image, data))
            download_s = watch.lap()
            await emit_event(on_event, ProgressEvent(EventKind.COMPLETED, PROVIDER_ID, request_id, progress=1.0))
        finally:
            self._flights.pop(request_id, None)

        return ProviderResult(
            provider=PROVIDER_ID,
            images=tuple(stored),
            seed=base_seed,
            provider_request_id=request_id,
            timings=Timings(
                submit_s=submit_s, queue_s=queue_s, run_s=run_s, download_s=download_s, total_s=watch.total()
            ),
            translation=translation,
            billed_units=None,
            mode=ConnectionMode.SANDBOX,
            raw_metadata={"sandbox": True, "seeds": list(seeds), "seed_given": seed_given},
        )

    async def cancel(self, provider_request_id: str) -> None:
        flight = self._flights.get(provider_request_id)
        if flight is None:
            raise ProviderError(
                ErrorClass.VALIDATION,
                f"no sandbox request {provider_request_id!r} in flight",
                provider=PROVIDER_ID,
                provider_request_id=provider_request_id,
            )
        flight.cancelled.set()

    async def health_probe(self) -> HealthReport:
        return HealthReport(PROVIDER_ID, True, 0.0, "sandbox: renders locally, always available")
