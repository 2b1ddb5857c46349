"""The offline sandbox: a provider that renders placeholders locally and never touches the network.

It stands in for every provider without a key, so it behaves like one: a request id, queue positions counting
down, progress reports saying which step it is at, latency, one to four images with consecutive seeds, a random
seed returned when none was given, images validated and stored like any download. Its images are deterministic
(same prompt, seed, size and parameters: same bytes) and say SANDBOX on their face.

AdapterConfig.extra: `latency_s` (total simulated time, default 0.3 s: a fifth queued, the rest running) and
`queue_length` (positions reported before running, default 2). Nothing here costs money: no error is billed.

It is cheap per request, because a benchmark or a busy offline console runs many at once: progress comes at a
bounded cadence (RUNNING "step k/n" at most every MIN_REPORT_INTERVAL_S of simulated time and at most
MAX_REPORTS times, then progress 1.0; at most MAX_REPORTS queue positions), one timer per report and none when
latency_s is 0, and the images are rendered and stored in one worker-thread hop.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid

from common.errors import Billing, ErrorClass, ProviderError
from core.catalog import SANDBOX, SEED_MAX
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
    checked_prompt,
    checked_values,
    emit,
    emit_event,
)
from core.render import RenderSpec, render_placeholder
from core.sizes import resolve_size

PROVIDER_ID = "sandbox"
DEFAULT_LATENCY_S = 0.3
DEFAULT_QUEUE_LENGTH = 2
QUEUE_SHARE = 0.2
"""Part of the latency spent 'queued'; the rest is spread over the steps."""
MIN_REPORT_INTERVAL_S = 0.25
"""Simulated time between two RUNNING reports at least: a display cannot show more, and each costs a timer."""
MAX_REPORTS = 8
"""RUNNING reports (before the final progress 1.0), and queue positions, per request at most."""


def checkpoints(units: int, reports: int) -> list[tuple[int, int]]:
    """Which of `units` consecutive units (steps, queue places) get a report, when `reports` are made: pairs
    (index of the unit reported, how many units pass until the next report). Reports split the units into
    equal runs, the first at unit 0; the runs add up to `units`, so the sleeps add up to the whole latency."""
    count = max(1, min(units, reports))
    starts = [i * units // count for i in range(count)]
    return [(start, end - start) for start, end in zip(starts, [*starts[1:], units], strict=True)]


def running_reports(steps: int, seconds: float) -> int:
    """How many RUNNING reports `steps` steps over `seconds` get: one per MIN_REPORT_INTERVAL_S, at most
    MAX_REPORTS and at most one per step, always at least the first."""
    # The epsilon keeps 0.5 s / 0.25 s at 2 reports whatever the floating-point rounding of `seconds`.
    per_interval = math.floor(seconds / MIN_REPORT_INTERVAL_S + 1e-9)
    return max(1, min(steps, MAX_REPORTS, per_interval))


class _Flight:
    """One request in flight: whether it was cancelled, and the pause to wake when it is."""

    __slots__ = ("cancelled", "waiter")

    def __init__(self) -> None:
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        """Canonical parameters -> what the renderer uses, each checked by the one validator against the
        catalog's ranges (missing ones take the catalog's defaults). Raises InvalidInput for values it cannot
        use."""
        checked_prompt(SANDBOX, request.prompt)
        specs = SANDBOX.params
        given = {name: value for name, value in request.params.items() if name in specs and value is not None}
        values = checked_values(SANDBOX, {**{n: p.default for n, p in specs.items()}, **given}, tuple(specs))
        notes: list[str] = []
        size = resolve_size(SANDBOX, values["image_size"])
        if not size.exact and size.note:
            notes.append(size.note)
        for name, value in sorted(request.params.items()):
            if name not in specs and value not in (None, ""):
                notes.append(f"{name} is not used by the sandbox; ignored")

        wire = {
            "prompt": request.prompt,
            "negative_prompt": values.get("negative_prompt", ""),
            "width": size.width,
            "height": size.height,
            "num_inference_steps": values["num_inference_steps"],
            "guidance_scale": float(values["guidance_scale"]),
            "num_images": values["num_images"],
            "seed": values.get("seed"),
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
                billing=Billing.NOT_BILLED,
                provider_request_id=request_id,
            )
        await self._sleep_or_cancel(seconds, flight, request_id)

    async def _sleep_or_cancel(self, seconds: float, flight: _Flight, request_id: str) -> None:
        """Sleep `seconds` (none at all for 0) unless cancel() comes first; raise CANCELLED if it did.

        One future and one loop timer, like asyncio.sleep, that cancel() can also resolve: asyncio.wait_for
        on an Event costs a task, a timeout handle and a cancellation of that task on every timeout."""
        if seconds > 0 and not flight.cancelled:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, _wake, waiter)
            flight.waiter = waiter
            try:
                await waiter
            finally:
                timer.cancel()
                flight.waiter = None
        if not flight.cancelled:
            return
        raise ProviderError(
            ErrorClass.CANCELLED,
            "cancelled on request",
            provider=PROVIDER_ID,
            billing=Billing.NOT_BILLED,
            provider_request_id=request_id,
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
        translation = self.translated(request)
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
            if self.queue_length:
                # Every position when there are few (the default 2), MAX_REPORTS evenly spread when many.
                for passed, places in checkpoints(self.queue_length, MAX_REPORTS):
                    position = self.queue_length - passed
                    await emit_event(
                        on_event,
                        ProgressEvent(
                            EventKind.QUEUED,
                            PROVIDER_ID,
                            request_id,
                            queue_position=position,
                            queue_size=self.queue_length,
                            eta_s=per_position * position,
                        ),
                    )
                    await self._pause(per_position * places, flight, deadline, request_id)
            queue_s = watch.lap()

            run_time = self.latency_s - queue_time
            per_step = run_time / steps
            for step, stride in checkpoints(steps, running_reports(steps, run_time)):
                await emit_event(
                    on_event,
                    ProgressEvent(
                        EventKind.RUNNING,
                        PROVIDER_ID,
                        request_id,
                        progress=step / steps,
                        message=f"step {step + 1}/{steps}",
                    ),
                )
                await self._pause(per_step * stride, flight, deadline, request_id)
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
            # Rendering and storing in one worker-thread hop (each hop is a thread handoff and a loop wake-up);
            # the store's share of it is reported as the download, as before.
            stored, store_s = await asyncio.to_thread(_render_and_store, specs)
            await emit_event(on_event, ProgressEvent(EventKind.RUNNING, PROVIDER_ID, request_id, progress=1.0))
            await emit_event(on_event, ProgressEvent(EventKind.DOWNLOADING, PROVIDER_ID, request_id))
            run_s = watch.lap() - store_s
            download_s = store_s
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
                billing=Billing.NOT_BILLED,
                provider_request_id=provider_request_id,
            )
        flight.cancel()

    async def health_probe(self) -> HealthReport:
        return HealthReport(PROVIDER_ID, True, 0.0, "sandbox: renders locally, always available")


def _render_and_store(specs: list[RenderSpec]) -> tuple[list[StoredImage], float]:
    """Render and store every image (in a worker thread): the stored images and the seconds spent storing."""
    stored: list[StoredImage] = []
    store_s = 0.0
    for spec in specs:
        data = render_placeholder(spec)
        started = time.monotonic()
        stored.append(store_image(data))
        store_s += time.monotonic() - started
    return stored, store_s
