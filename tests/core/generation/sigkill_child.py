"""A process that runs one generation and is killed mid-way by tests/core/generation/test_recovery.py.

    python -m tests.core.generation.sigkill_child DATABASE_URL IDEMPOTENCY_KEY PROMPT

The emulator's URL comes from IMAGEGATE_EMULATOR_URL (fal-qwen runs against it, with the real fal-client).
A short lease (2 s) lets the test's recovery take over soon after the kill; it never prints "finished" unless
the test failed to kill it in time.
"""

from __future__ import annotations

import sys

from core.generation.models import GenerationRequest
from core.generation.service import generate_sync
from core.security import Actor
from db.engine import make_engine, session_factory

LEASE_S = 2.0


def main() -> None:
    url, key, prompt = sys.argv[1:4]
    factory = session_factory(make_engine(url))
    request = GenerationRequest(
        prompt,
        provider="fal-qwen",
        params={"seed": 11, "num_inference_steps": 4, "image_size": "square"},
        idempotency_key=key,
        allow_fallback=False,
    )
    result = generate_sync(request, Actor.system("sigkill-test"), factory=factory, lease_ttl_s=LEASE_S)
    print(f"finished {result.generation_id}", flush=True)


if __name__ == "__main__":
    main()
