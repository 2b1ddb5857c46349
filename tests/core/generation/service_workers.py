"""Work run in spawned processes by the service's race tests (never imports a test module)."""

from __future__ import annotations

import time

from core.generation.models import GenerationRequest
from core.generation.service import generate_sync
from core.security import Actor
from db.engine import make_engine, session_factory


def repeat_with_key(url: str, key: str, start_at: float) -> tuple[str, bool, int]:
    """Generate in the sandbox with `key`, starting at the wall-clock moment `start_at` (so every process sends
    at once): (generation id, replayed, images)."""
    engine = make_engine(url)
    try:
        factory = session_factory(engine)
        request = GenerationRequest(
            "a lighthouse at dawn", provider="fal-qwen", params={"seed": 5}, idempotency_key=key
        )
        time.sleep(max(0.0, start_at - time.time()))
        result = generate_sync(request, Actor.system("race"), factory=factory)
        return result.generation_id, result.replayed, len(result.images)
    finally:
        engine.dispose()
