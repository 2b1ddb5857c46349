"""The API's request and response bodies (they are its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.generation.models import MAX_DEADLINE_S

__all__ = ["GenerateBody", "ImageOut", "JobOut"]

MAX_WAIT_S = 300.0


class GenerateBody(BaseModel):
    """What to make. Values are checked by core (the same validator as the console); `wait` decides whether the
    answer waits for the images (up to `timeout_s`) or returns the job at once (202)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    provider: str | None = Field(default=None, max_length=64, description="Run on this provider first.")
    policy: str | None = Field(default=None, max_length=32, description="priority | cheapest | fastest | explicit")
    preset: str | None = Field(default=None, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, description="Parameter overrides (seed, image_size, ...).")
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    allow_fallback: bool | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=10)
    wait: bool = Field(default=True, description="Wait for the result (up to timeout_s) instead of 202 at once.")
    timeout_s: float = Field(default=60.0, ge=0, le=MAX_WAIT_S)


class ImageOut(BaseModel):
    id: int
    url: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    seed: int | None
    position: int


class JobOut(BaseModel):
    """A generation job. `generation` is the service's result (provider, attempts, cost, timings, adjustments)
    once it ran; `error` the problem details when it failed. A POST that waited for its job answers with the result
    `generate()` returned; a later GET reads it from the ledger, which keeps each attempt's timings in milliseconds
    (so `timings` may differ in the last digits, and its `admission_s` is 0 there)."""

    id: str
    status: str = Field(description="queued | running | succeeded | failed")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    generation_id: str | None
    images: list[ImageOut]
    generation: dict[str, Any] | None
    error: dict[str, Any] | None
