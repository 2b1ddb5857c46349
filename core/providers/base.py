"""The one async interface every provider adapter implements.

An adapter takes a validated request in the canonical vocabulary (core.catalog), translates it to the
provider's wire parameters, runs it with the provider's real client library, reports progress, downloads and
stores the images, and maps every failure onto common.errors.ProviderError. It knows nothing of budgets,
routing or the database: the generation service (core.generation) does that around it.

The two contracts every adapter keeps:
- `translate()` raises `common.errors.InvalidInput` (with `field_errors` naming each parameter) when this
  provider cannot serve the request, and nothing else: nothing has been sent, so it is not a ProviderError.
  Fallback calls it for every candidate and skips the ones that refuse.
- `generate()` raises `ProviderError` for every failure, each with the billing facts of that case: billed
  (with the units the provider reported, when it did), not billed, or unknown (a paid job may still run).
  A request `translate()` refuses is a VALIDATION error that was not billed.

Parameter values are checked by the one validator (core.settings.check_param) against the catalog's ranges;
adapters add only what the provider's wire format needs (fal's minimum of 2 steps, the Space's clamping).
"""

from __future__ import annotations

import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.catalog import ProviderSpec
from core.images import StoredImage
from core.prompts import validate_prompt
from core.settings import check_param

log = logging.getLogger(__name__)


class ConnectionMode(StrEnum):
    LIVE = "live"  # the real provider, with a key
    EMULATOR = "emulator"  # the local emulator (imagegate emulator), speaking the provider's wire protocol
    SANDBOX = "sandbox"  # rendered locally; no provider involved


@dataclass(frozen=True)
class AdapterConfig:
    """How an adapter reaches its provider."""

    api_key: str | None = field(default=None, repr=False)
    """Never in repr(): configs end up in log lines and tracebacks."""
    base_url: str | None = None
    """None = the provider's real endpoint. Otherwise the emulator's (or a self-hosted endpoint's) base URL."""
    mode: ConnectionMode = ConnectionMode.LIVE
    poll_interval_s: float = 0.5
    download_timeout_s: float = 30.0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterRequest:
    """A validated request: the prompt and the effective canonical parameters (values only)."""

    prompt: str
    params: Mapping[str, Any]
    timeout_s: float = 120.0
    """Deadline for the whole attempt (submit, queue, run, download). The adapter enforces it."""


class EventKind(StrEnum):
    SUBMITTED = "submitted"  # the provider accepted it; provider_request_id is known
    QUEUED = "queued"  # waiting, with a position / ETA where the provider says
    RUNNING = "running"  # generating, with logs or a progress fraction
    DOWNLOADING = "downloading"
    COMPLETED = "completed"


@dataclass(frozen=True)
class ProgressEvent:
    kind: EventKind
    provider: str
    provider_request_id: str | None = None
    queue_position: int | None = None
    """1 = next to run (providers counting from 0 are shifted by their adapter)."""
    queue_size: int | None = None
    eta_s: float | None = None
    progress: float | None = None
    """0..1 where the provider reports steps."""
    logs: tuple[str, ...] = ()
    message: str = ""


EventCallback = Callable[[ProgressEvent], Awaitable[None] | None]
RequestIdCallback = Callable[[str], Awaitable[None] | None]


@dataclass(frozen=True)
class Translation:
    """The request in the provider's own vocabulary, and what had to change to get there."""

    wire_params: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.notes


@dataclass(frozen=True)
class Timings:
    submit_s: float = 0.0
    queue_s: float = 0.0
    run_s: float = 0.0
    download_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class ProviderResult:
    provider: str
    images: tuple[StoredImage, ...]
    seed: int | None
    provider_request_id: str | None
    timings: Timings
    translation: Translation
    billed_units: Decimal | None = None
    """What the provider says it billed (fal's x-fal-billable-units); None where it does not say."""
    mode: ConnectionMode = ConnectionMode.LIVE
    nsfw_flags: tuple[bool, ...] = ()
    raw_metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    provider: str
    ok: bool
    latency_s: float
    detail: str
    error_class: ErrorClass | None = None


async def emit(callback: RequestIdCallback | None, value: str) -> None:
    """Hand the provider's request id to the caller (sync or async callback). Its failure propagates: a request
    whose id could not be recorded must not go on unnoticed (the adapter cancels it)."""
    if callback is None:
        return
    result = callback(value)
    if inspect.isawaitable(result):
        await result


async def emit_event(callback: EventCallback | None, event: ProgressEvent) -> None:
    """Report progress (sync or async callback). A failing progress display never kills a paid run: the error
    is logged and the run goes on."""
    if callback is None:
        return
    try:
        result = callback(event)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("progress callback failed for %s (%s); the run continues", event.provider, event.kind.value)


def refused(spec: ProviderSpec, field_errors: Mapping[str, str]) -> InvalidInput:
    """The one error `translate()` raises: what this provider cannot take, field by field."""
    message = f"{spec.label} cannot serve this request: {'; '.join(field_errors.values())}"
    return InvalidInput(message, dict(field_errors))


def checked_prompt(spec: ProviderSpec, prompt: str) -> str:
    """The prompt as a provider may receive it (core.prompts' rules), or InvalidInput on field `prompt`."""
    try:
        validate_prompt(prompt)
    except InvalidInput as exc:
        raise refused(spec, exc.field_errors or {"prompt": str(exc)}) from None
    return prompt


def checked_value(spec: ProviderSpec, name: str, value: Any) -> Any:
    """A canonical value checked by the one parameter validator (core.settings.check_param) against the
    catalog's range for this provider, normalised. Raises InvalidInput naming the parameter."""
    normal, problem = check_param(spec, spec.params[name], value)
    if problem is not None:
        raise refused(spec, {name: problem})
    return normal


def checked_values(spec: ProviderSpec, params: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The parameters among `names` that are set, each through the one validator; empty text is left out (a
    blank negative prompt is no negative prompt). Raises InvalidInput naming every bad one."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        value = params.get(name)
        if value is None:
            continue
        normal, problem = check_param(spec, spec.params[name], value)
        if problem is not None:
            errors[name] = problem
        elif normal is not None and normal != "":
            out[name] = normal
    if errors:
        raise refused(spec, errors)
    return out


def clamped_value(spec: ProviderSpec, name: str, value: Any, notes: list[str]) -> Any:
    """For providers that fit a fallback's values into their range instead of refusing them: the value's type
    is checked by the one validator, then it is clamped to the catalog's range with a note saying so."""
    p = spec.params[name]
    normal, problem = check_param(spec, replace(p, minimum=None, maximum=None), value)
    if problem is not None:
        raise refused(spec, {name: problem})
    low = p.minimum if p.minimum is not None else normal
    high = p.maximum if p.maximum is not None else normal
    if low <= normal <= high:
        return normal
    fitted = type(normal)(min(max(normal, low), high))
    notes.append(f"{name} {normal:g} is outside {spec.id}'s range {low:g}-{high:g}; using {fitted:g}")
    return fitted


def unsent_notes(provider_label: str, params: Mapping[str, Any], handled: set[str]) -> list[str]:
    """A note for every set parameter the provider has no use for (a fallback may carry another's)."""
    return [
        f"{provider_label} has no {name}; {params[name]!r} was not sent"
        for name in sorted(set(params) - handled)
        if params[name] is not None
    ]


class ProviderAdapter(ABC):
    """Base class. Subclasses set `provider_id` and implement translate/generate/health_probe."""

    provider_id: str
    supports_resume: bool = False
    supports_cancel: bool = False

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config

    @property
    def mode(self) -> ConnectionMode:
        return self.config.mode

    @abstractmethod
    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> the provider's wire parameters, noting anything not represented exactly.

        Raises `common.errors.InvalidInput`, with `field_errors` keyed by parameter name (or `prompt`), when
        this provider cannot serve the request, and never anything else: nothing is sent, so nothing is
        billed. Fallback calls it for every candidate provider; the ones that refuse are skipped."""

    def translated(self, request: AdapterRequest) -> Translation:
        """`translate()` inside an attempt: a refusal becomes the VALIDATION ProviderError `generate()` raises
        (not billed: nothing was sent)."""
        try:
            return self.translate(request)
        except InvalidInput as exc:
            raise ProviderError(
                ErrorClass.VALIDATION, str(exc), provider=self.provider_id, billing=Billing.NOT_BILLED
            ) from exc

    @abstractmethod
    async def generate(
        self,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
        on_request_id: RequestIdCallback | None = None,
    ) -> ProviderResult:
        """Run one attempt. `on_request_id` is awaited with the provider's id before any polling, so the
        caller can persist it (crash recovery). Raises ProviderError for every failure, with its billing facts
        (see the module doc); a request `translate()` refuses is a VALIDATION error, not billed."""

    @abstractmethod
    async def health_probe(self) -> HealthReport:
        """A cheap check that generates nothing billable."""

    async def aclose(self) -> None:
        """Release what the adapter holds (clients, temp files). Adapters holding nothing keep this default."""
        return None

    async def cancel(self, provider_request_id: str) -> None:
        """Stop a request by id. Its errors describe the look-up, which costs nothing: never billed."""
        raise ProviderError(
            ErrorClass.VALIDATION,
            f"{self.provider_id} requests cannot be cancelled once sent",
            provider=self.provider_id,
            billing=Billing.NOT_BILLED,
        )

    async def resume(
        self,
        provider_request_id: str,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
    ) -> ProviderResult:
        """Collect the result of a request submitted before a restart (fal). Others cannot (not billed)."""
        raise ProviderError(
            ErrorClass.VALIDATION,
            f"{self.provider_id} cannot resume a request by id; only queue-based providers (fal) can",
            provider=self.provider_id,
            billing=Billing.NOT_BILLED,
        )


class Stopwatch:
    """Monotonic phase timer for Timings."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start

    def lap(self) -> float:
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        return elapsed

    def total(self) -> float:
        return time.monotonic() - self.start
