"""Fault injection and behaviour knobs shared by every emulated provider.

A fault is chosen per request (a `[[fault:NAME]]` marker in the prompt) or per provider at run time
(`POST /_emulator/faults`), so tests and the console's sandbox controls can make any provider misbehave on
demand. The board is thread-safe: Gradio runs its functions in worker threads.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from enum import StrEnum


class Fault(StrEnum):
    AUTH = "auth"  # 401 / bad key
    VALIDATION = "validation"  # 422 (fal) / 400 (ideogram, hf)
    SAFETY = "safety"  # safety rejection (ideogram 422, fal nsfw, ...)
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After
    SERVER_ERROR = "server_error"  # 5xx
    HANG = "hang"  # never answers (until the client gives up)
    DROP = "drop"  # the connection is closed without a response
    MALFORMED = "malformed"  # a 200 whose body is not the JSON the client expects
    IMAGE_404 = "image_404"  # the image URL in a successful answer 404s
    NOT_AN_IMAGE = "not_an_image"  # the image URL serves bytes that are not an image
    QUOTA = "quota"  # ZeroGPU quota exceeded (qwen Space)
    LOADING = "loading"  # HF 503 model loading
    # fal queue only: the job itself is fine, the exchanges around it fail or report it another way.
    STATUS_ERROR = "status_error"  # status polls answer 503 while the job runs; the job runs on
    STATUS_DROP = "status_drop"  # status polls lose their connection while the job runs; the job runs on
    RESULT_DROP = "result_drop"  # every fetch of the (completed) result loses its connection
    CANCELLED_499 = "cancelled_499"  # once cancelled: status COMPLETED without error, result HTTP 499
    CANCELLED_400 = "cancelled_400"  # once cancelled: status COMPLETED without error, result 400 without type


PROVIDERS = ("fal", "ideogram", "hf", "qwen")
# Ideogram's default account limit is 10 requests in flight; the others get a small number that queues visibly.
DEFAULT_CONCURRENCY = {"fal": 4, "ideogram": 10, "hf": 4, "qwen": 4}
_MARKER = re.compile(r"\[\[fault:([a-z0-9_]+)\]\]")


def fault_in_prompt(prompt: str) -> Fault | None:
    m = _MARKER.search(prompt or "")
    if not m:
        return None
    try:
        return Fault(m.group(1))
    except ValueError:
        return None


@dataclass
class ProviderKnobs:
    latency_s: float = 0.2
    """Time spent 'running' a request."""
    queue_steps: int = 2
    """fal: how many status polls see IN_QUEUE before IN_PROGRESS."""
    concurrency: int = 4
    """Requests run at once; the rest queue (fal, qwen) or get 429 (ideogram, hf)."""
    retry_after_s: int = 2
    fault: Fault | None = None
    fault_count: int | None = None
    """How many more requests get `fault`; None = every request until cleared."""


def _default_knobs() -> dict[str, ProviderKnobs]:
    return {p: ProviderKnobs(concurrency=DEFAULT_CONCURRENCY[p]) for p in PROVIDERS}


@dataclass
class FaultBoard:
    knobs: dict[str, ProviderKnobs] = field(default_factory=lambda: _default_knobs())
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, provider: str) -> ProviderKnobs:
        with self._lock:
            return self.knobs.setdefault(provider, ProviderKnobs())

    def set_fault(self, provider: str, fault: Fault | None, count: int | None = None) -> None:
        with self._lock:
            k = self.knobs.setdefault(provider, ProviderKnobs())
            k.fault, k.fault_count = fault, count

    def configure(self, provider: str, **values: float | int) -> None:
        with self._lock:
            k = self.knobs.setdefault(provider, ProviderKnobs())
            for name, value in values.items():
                if name not in ("latency_s", "queue_steps", "concurrency", "retry_after_s"):
                    raise ValueError(f"unknown emulator knob {name!r}")
                setattr(k, name, type(getattr(k, name))(value))

    def reset(self) -> None:
        with self._lock:
            self.knobs = _default_knobs()

    def take_fault(self, provider: str, prompt: str) -> Fault | None:
        """The fault for this request: the prompt's marker wins, else the provider's standing fault."""
        marker = fault_in_prompt(prompt)
        if marker is not None:
            return marker
        with self._lock:
            k = self.knobs.setdefault(provider, ProviderKnobs())
            if k.fault is None:
                return None
            fault = k.fault
            if k.fault_count is not None:
                k.fault_count -= 1
                if k.fault_count <= 0:
                    k.fault, k.fault_count = None, None
            return fault

    def snapshot(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return {
                p: {
                    "latency_s": k.latency_s,
                    "queue_steps": k.queue_steps,
                    "concurrency": k.concurrency,
                    "retry_after_s": k.retry_after_s,
                    "fault": k.fault.value if k.fault else None,
                    "fault_count": k.fault_count,
                }
                for p, k in self.knobs.items()
            }


BOARD = FaultBoard()
