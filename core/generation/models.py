"""What a caller hands the generation service and what it gets back (core.generation.service.generate).

    request = GenerationRequest("a red fox in snow", preset="fast", params={"seed": 7}, idempotency_key="fox-1")
    result = generate_sync(request, actor)
    result.images[0].path, result.provider, result.cost.actual_micro_usd, result.attempts

Plain frozen dataclasses: the console, the CLI (`--json`) and the REST API render them; `to_dict()` is their
JSON form (money as integer micro-dollars and as text, billed units as decimal text, never floats).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.money import format_usd
from core.providers.base import ProgressEvent

__all__ = [
    "MAX_DEADLINE_S",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "Adjustment",
    "AdjustmentKind",
    "AttemptRecord",
    "CostSummary",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStatus",
    "ImageRecord",
    "ProgressUpdate",
    "TimingSummary",
]

MAX_IDEMPOTENCY_KEY_CHARS = 160
"""The stored key is `<user id or 0>:<key>` in a 200-character column (core.generation.usage checks it too)."""
MAX_ATTEMPTS_PER_REQUEST = 10
MAX_DEADLINE_S = 3600.0
"""A whole request (every attempt, retry and fallback) ends within this, however long the caller allows."""


class GenerationStatus(StrEnum):
    """A generation's state (generations.status)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUSED = "refused"

    @property
    def finished(self) -> bool:
        return self not in (GenerationStatus.PENDING, GenerationStatus.RUNNING)


def _canonical(value: Any) -> Any:
    """A JSON-safe, order-independent form of a parameter value (for the request's fingerprint)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One request for images, before any provider's settings apply.

    `provider` names a provider (it runs first; fallback may still move on unless `allow_fallback` is False);
    `policy` orders the candidates when none is named (priority, cheapest, fastest, explicit; None = the
    global settings'). `params` are canonical parameter overrides (core.catalog names: seed, image_size,
    num_images, ...), applied over the provider's settings and the `preset`. `idempotency_key`: a repeat with
    the same key (for the same user) returns the first request's result and spends nothing twice; a key
    reused for a different request is refused. `deadline_s` bounds the whole request, every retry and
    fallback included (None: the settings' per-attempt timeout, times the attempts allowed)."""

    prompt: str
    negative_prompt: str | None = None
    provider: str | None = None
    policy: str | None = None
    preset: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    deadline_s: float | None = None
    allow_fallback: bool | None = None
    max_attempts: int | None = None
    """Provider attempts for this request, retries and fallbacks included (None: the global settings')."""

    def __post_init__(self) -> None:
        errors: dict[str, str] = {}
        if not isinstance(self.prompt, str):
            errors["prompt"] = "the prompt must be text"
        if not isinstance(self.params, Mapping):
            errors["params"] = "parameters must be a mapping of names to values"
        key = self.idempotency_key
        if key is not None and (
            not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable()
        ):
            errors["idempotency_key"] = f"an idempotency key is 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
        deadline = self.deadline_s
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not math.isfinite(deadline)
            or not 0 < deadline <= MAX_DEADLINE_S
        ):
            errors["deadline_s"] = f"the deadline is a number of seconds above 0 and at most {MAX_DEADLINE_S:g}"
        attempts = self.max_attempts
        if attempts is not None and (
            isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS_PER_REQUEST
        ):
            errors["max_attempts"] = f"max_attempts is a whole number from 1 to {MAX_ATTEMPTS_PER_REQUEST}"
        if self.allow_fallback is not None and not isinstance(self.allow_fallback, bool):
            errors["allow_fallback"] = "allow_fallback is true, false or not given"
        for name in ("negative_prompt", "provider", "policy", "preset"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                errors[name] = f"{name} must be text"
        if errors:
            raise InvalidInput("the generation request is not valid: " + "; ".join(errors.values()), errors)

    def record(self) -> dict[str, Any]:
        """What the generation row keeps of the request (generations.request): everything but the key."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "provider": self.provider,
            "policy": self.policy,
            "preset": self.preset,
            "params": _canonical(dict(self.params)),
            "deadline_s": self.deadline_s,
            "allow_fallback": self.allow_fallback,
            "max_attempts": self.max_attempts,
        }

    def fingerprint(self) -> str:
        """SHA-256 of the request's canonical form (without the key and the deadline, which say how to run it,
        not what to make): a key reused for a different request is told apart from a repeat."""
        what = self.record()
        what.pop("deadline_s")
        text = json.dumps(what, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_record(cls, record: Mapping[str, Any], idempotency_key: str | None = None) -> GenerationRequest:
        """The request a generation row was made from (recovery, replays)."""
        return cls(
            prompt=str(record.get("prompt", "")),
            negative_prompt=record.get("negative_prompt"),
            provider=record.get("provider"),
            policy=record.get("policy"),
            preset=record.get("preset"),
            params=dict(record.get("params") or {}),
            idempotency_key=idempotency_key,
            deadline_s=record.get("deadline_s"),
            allow_fallback=record.get("allow_fallback"),
            max_attempts=record.get("max_attempts"),
        )


@dataclass(frozen=True)
class ImageRecord:
    """One stored image (content-addressed under the data directory's images/)."""

    path: Path
    sha256: str
    width: int
    height: int
    size_bytes: int
    format: str
    seed: int | None
    position: int
    stored_id: int | None = None
    """Its row in the images table when read from the ledger (what the API serves it by); None straight from a
    provider's result, before the row is written."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "size_bytes": self.size_bytes,
            "format": self.format,
            "seed": self.seed,
            "position": self.position,
        }


@dataclass(frozen=True)
class AttemptRecord:
    """One provider attempt, as the usage ledger keeps it."""

    attempt_no: int
    provider: str
    fallback_position: int
    """0 = the first candidate provider, 1 = the first fallback, ..."""
    mode: str
    """live | emulator | sandbox (the last two are simulated spend)."""
    status: str
    """succeeded | failed | cancelled | recovered | running (a repeat of a request still in flight)."""
    error_class: str | None
    error_message: str | None
    billing: str | None
    """billed | not_billed | unknown."""
    billed_units: Decimal | None
    estimated_micro_usd: int
    actual_micro_usd: int | None
    price_version_id: int | None
    translation_notes: tuple[str, ...]
    provider_request_id: str | None
    submit_ms: int | None = None
    queue_ms: int | None = None
    run_ms: int | None = None
    download_ms: int | None = None
    total_ms: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def why(self) -> str:
        """The attempt's outcome in words (an error lists every attempt this way)."""
        if self.error_class is None:
            return f"{self.provider}: {self.status}"
        billed = f", {self.billing}" if self.billing else ""
        return f"{self.provider}: {self.error_class}{billed}: {self.error_message or ''}".rstrip(": ")

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt_no": self.attempt_no,
            "provider": self.provider,
            "fallback_position": self.fallback_position,
            "mode": self.mode,
            "status": self.status,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "billing": self.billing,
            "billed_units": None if self.billed_units is None else str(self.billed_units),
            "estimated_micro_usd": self.estimated_micro_usd,
            "actual_micro_usd": self.actual_micro_usd,
            "price_version_id": self.price_version_id,
            "translation_notes": list(self.translation_notes),
            "provider_request_id": self.provider_request_id,
            "timings_ms": {
                "submit": self.submit_ms,
                "queue": self.queue_ms,
                "run": self.run_ms,
                "download": self.download_ms,
                "total": self.total_ms,
            },
        }


@dataclass(frozen=True)
class CostSummary:
    """What the request cost. Live money and the would-be cost of sandbox/emulator runs never mix: `live` says
    which this is (a request whose attempts ran in both modes reports each in `live_actual_micro_usd` and
    `simulated_actual_micro_usd`)."""

    estimated_micro_usd: int
    """The estimate of the attempt that served (or of the first attempt, when none did)."""
    actual_micro_usd: int
    """Every attempt's actual cost, summed (attempts that failed after billing count too)."""
    billed_units: Decimal | None
    """Units the providers reported, summed; None when none reported any."""
    live: bool
    """True when this is real money (every attempt live); False for sandbox and emulator runs."""
    live_actual_micro_usd: int = 0
    simulated_actual_micro_usd: int = 0
    unknown_billing_micro_usd: int = 0
    """Estimates still held because a provider may have billed (reconciled later)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimated_micro_usd": self.estimated_micro_usd,
            "estimated_usd": format_usd(self.estimated_micro_usd),
            "actual_micro_usd": self.actual_micro_usd,
            "actual_usd": format_usd(self.actual_micro_usd),
            "billed_units": None if self.billed_units is None else str(self.billed_units),
            "live": self.live,
            "live_actual_micro_usd": self.live_actual_micro_usd,
            "simulated_actual_micro_usd": self.simulated_actual_micro_usd,
            "unknown_billing_micro_usd": self.unknown_billing_micro_usd,
        }


@dataclass(frozen=True)
class TimingSummary:
    """Wall-clock seconds: the whole request, and the split of the attempt that served."""

    total_s: float
    admission_s: float = 0.0
    """Routing, idempotency and the budget reservation, before the first attempt started."""
    submit_s: float = 0.0
    queue_s: float = 0.0
    run_s: float = 0.0
    download_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_s": round(self.total_s, 4),
            "admission_s": round(self.admission_s, 4),
            "submit_s": round(self.submit_s, 4),
            "queue_s": round(self.queue_s, 4),
            "run_s": round(self.run_s, 4),
            "download_s": round(self.download_s, 4),
        }


class AdjustmentKind(StrEnum):
    DEGRADE = "degrade"
    """A soft budget was over its limit: a cheaper preset, a smaller size or a cheaper provider was used."""
    TRANSLATION = "translation"
    """A provider could not take a value as given and the adapter changed it (said in its notes)."""
    ROUTING = "routing"
    """The route itself: a named provider left out, every breaker open, a fallback taken."""
    RETRY = "retry"
    """An attempt was retried or the request moved on to the next provider."""


@dataclass(frozen=True)
class Adjustment:
    """Something done on the caller's behalf that changes what they get or pay."""

    kind: AdjustmentKind
    message: str
    provider: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "message": self.message,
            "provider": self.provider,
            "detail": _canonical(dict(self.detail)),
        }


@dataclass(frozen=True)
class GenerationResult:
    generation_id: str
    status: GenerationStatus
    provider: str | None
    """The provider that served; None when none did."""
    mode: str | None
    """Its connection mode: live | emulator | sandbox."""
    images: tuple[ImageRecord, ...]
    seed: int | None
    attempts: tuple[AttemptRecord, ...]
    cost: CostSummary
    timings: TimingSummary
    adjustments: tuple[Adjustment, ...] = ()
    replayed: bool = False
    """True when this is the stored result of an earlier request with the same idempotency key."""
    error_class: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is GenerationStatus.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation_id": self.generation_id,
            "status": self.status.value,
            "provider": self.provider,
            "mode": self.mode,
            "images": [i.to_dict() for i in self.images],
            "seed": self.seed,
            "attempts": [a.to_dict() for a in self.attempts],
            "cost": self.cost.to_dict(),
            "timings": self.timings.to_dict(),
            "adjustments": [a.to_dict() for a in self.adjustments],
            "replayed": self.replayed,
            "error_class": self.error_class,
            "error_message": self.error_message,
        }


@dataclass(frozen=True)
class ProgressUpdate:
    """What the service tells a caller while a request runs (`on_progress`).

    `kind`: `attempt` (an attempt starts), `retry`, `fallback`, `skipped` (a candidate left out as the request
    ran: breaker, budget, busy), the adapter's own events (`submitted`, `queued`, `running`, `downloading`,
    `completed`, with `event` set), `waiting` (a repeat waiting for the first request with its key) and
    `finished`."""

    kind: str
    message: str
    provider: str | None = None
    attempt_no: int | None = None
    event: ProgressEvent | None = None

    @property
    def line(self) -> str:
        """One line for a terminal or a status box."""
        where = f"[{self.attempt_no}] " if self.attempt_no is not None else ""
        who = f"{self.provider}: " if self.provider else ""
        return f"{where}{who}{self.message}"


class GenerationFailed(ProviderError):
    """Every attempt of a request failed (or none could be made): the message lists each attempt and why.

    A ProviderError (CLI exit 7, HTTP 502) whose `error_class`, `provider` and billing are the last attempt's;
    `billing` is BILLED if any attempt was billed, else UNKNOWN if any may have been, else NOT_BILLED. `result`
    holds every attempt, the cost and the adjustments, as a success would; `errors` the attempts' own errors."""

    def __init__(self, message: str, result: GenerationResult, errors: tuple[ProviderError, ...] = ()) -> None:
        last = result.attempts[-1] if result.attempts else None
        billings = {a.billing for a in result.attempts}
        billing = (
            Billing.BILLED
            if Billing.BILLED.value in billings
            else Billing.UNKNOWN
            if Billing.UNKNOWN.value in billings
            else Billing.NOT_BILLED
        )
        units = [a.billed_units for a in result.attempts if a.billed_units is not None]
        error_class = ErrorClass(last.error_class) if last is not None and last.error_class else ErrorClass.UNAVAILABLE
        super().__init__(
            error_class,
            message,
            provider=last.provider if last is not None else "imagegate",
            billing=billing,
            billed_units=sum(units, Decimal(0)) if units and billing is not Billing.NOT_BILLED else None,
        )
        self.result = result
        self.errors = errors
        """The attempts' own errors, in order, when this process ran them (Retry-After, status codes); empty for
        a replay of a stored failure."""
        if errors:
            self.retry_after_s = errors[-1].retry_after_s
            self.reset_at = errors[-1].reset_at
            self.status_code = errors[-1].status_code

    def __str__(self) -> str:
        return self.message
