"""Fallback under every fault the emulator injects, through the real client libraries.

For each provider and each fault its emulator declares (emulator.<provider>.SUPPORTED_FAULTS), a request names
that provider (fallback allowed) while the fault stands at it, and the test checks:
- the first attempt's error class and billing fact (the adapter's per-case decision);
- what the service did next: fall back at once, retry the same provider once (backoff honouring Retry-After)
  and then fall back, stop (validation, safety, ...), or serve the request anyway (faults the adapter rides
  out, like fal's failing status polls while the job runs on);
- the usage rows and the budget: the simulated spend is exactly the billed attempts' actual costs, the
  estimates of attempts whose billing is unknown are held, nothing is live, no reservation is left open, and
  the rollups count every attempt.

The table below must name every fault each emulator supports: a fault added to the emulator fails
`test_the_table_covers_every_fault_the_emulator_injects` until someone decides what it should do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

import emulator.fal
import emulator.hf
import emulator.ideogram
import emulator.qwen_space
from core.generation.models import GenerationFailed, GenerationRequest, GenerationResult
from core.generation.service import generate
from emulator.faults import Fault, FaultBoard
from emulator.runner import BackgroundServer
from tests.core.generation.service_support import (
    SYSTEM,
    attempts,
    ledger_matches_budget,
    make_budget,
    running_emulator,
    seed,
)

EMULATED = {"fal-qwen": "fal", "huggingface": "hf", "qwen": "qwen", "ideogram": "ideogram"}
SUPPORTED = {
    "fal-qwen": emulator.fal.SUPPORTED_FAULTS,
    "huggingface": emulator.hf.SUPPORTED_FAULTS,
    "qwen": emulator.qwen_space.SUPPORTED_FAULTS,
    "ideogram": emulator.ideogram.SUPPORTED_FAULTS,
}
ATTEMPT_TIMEOUT_S = 3.0
"""Each provider's request_timeout_s here: a hanging provider costs this much, not two minutes."""


@dataclass(frozen=True)
class Expect:
    error_class: str | None
    """The first attempt's error class (None: it succeeded)."""
    billing: str | None
    then: str
    """fallback | retry-fallback | stop | served"""


FALLBACK, RETRY_FALLBACK, STOP, SERVED = "fallback", "retry-fallback", "stop", "served"

EXPECTED: dict[tuple[str, str], Expect] = {
    # fal: the queue API. A 422 "may" be billed (unknown); anything after COMPLETED is billed.
    ("fal-qwen", "auth"): Expect("auth", "not_billed", FALLBACK),
    ("fal-qwen", "validation"): Expect("validation", "unknown", STOP),
    ("fal-qwen", "safety"): Expect("safety_rejected", "billed", STOP),
    ("fal-qwen", "rate_limit"): Expect("rate_limited", "not_billed", FALLBACK),  # Retry-After above the max backoff
    ("fal-qwen", "server_error"): Expect("unavailable", "not_billed", RETRY_FALLBACK),
    ("fal-qwen", "hang"): Expect("timeout", "unknown", FALLBACK),  # a timeout prefers another provider
    ("fal-qwen", "drop"): Expect("unavailable", "unknown", RETRY_FALLBACK),  # the submit may have queued a job
    ("fal-qwen", "malformed"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("fal-qwen", "image_404"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("fal-qwen", "not_an_image"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("fal-qwen", "status_error"): Expect(None, "billed", SERVED),  # polls retried; the job runs on
    ("fal-qwen", "status_drop"): Expect(None, "billed", SERVED),
    ("fal-qwen", "result_drop"): Expect("unavailable", "billed", RETRY_FALLBACK),  # completed, so billed
    ("fal-qwen", "cancelled_499"): Expect(None, "billed", SERVED),  # only a cancelled job answers 499
    ("fal-qwen", "cancelled_400"): Expect(None, "billed", SERVED),
    # Hugging Face inference: error answers are not billed, a 200 that is not an image is.
    ("huggingface", "auth"): Expect("auth", "not_billed", FALLBACK),
    ("huggingface", "validation"): Expect("validation", "not_billed", STOP),
    ("huggingface", "safety"): Expect("safety_rejected", "not_billed", STOP),
    ("huggingface", "rate_limit"): Expect("rate_limited", "not_billed", FALLBACK),
    ("huggingface", "server_error"): Expect("unavailable", "not_billed", RETRY_FALLBACK),
    ("huggingface", "hang"): Expect("timeout", "unknown", FALLBACK),
    ("huggingface", "drop"): Expect("unavailable", "unknown", RETRY_FALLBACK),
    ("huggingface", "malformed"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("huggingface", "image_404"): Expect("validation", "not_billed", STOP),  # the model's URL answers 404
    ("huggingface", "not_an_image"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("huggingface", "quota"): Expect("quota_exceeded", "not_billed", FALLBACK),  # 402: its quota is spent
    ("huggingface", "loading"): Expect("unavailable", "not_billed", FALLBACK),  # its wait is above the max backoff
    # The free Qwen Space: never billed.
    ("qwen", "validation"): Expect("validation", "not_billed", STOP),
    ("qwen", "quota"): Expect("quota_exceeded", "not_billed", FALLBACK),
    ("qwen", "rate_limit"): Expect("rate_limited", "not_billed", RETRY_FALLBACK),
    ("qwen", "server_error"): Expect("unavailable", "not_billed", RETRY_FALLBACK),
    ("qwen", "hang"): Expect("timeout", "not_billed", FALLBACK),
    ("qwen", "drop"): Expect("unavailable", "not_billed", RETRY_FALLBACK),
    ("qwen", "malformed"): Expect("bad_response", "not_billed", RETRY_FALLBACK),
    ("qwen", "not_an_image"): Expect("bad_response", "not_billed", RETRY_FALLBACK),
    # Ideogram: billed per image once it answered 200, the failed downloads included.
    ("ideogram", "auth"): Expect("auth", "not_billed", FALLBACK),
    ("ideogram", "validation"): Expect("validation", "not_billed", STOP),
    ("ideogram", "safety"): Expect("safety_rejected", "not_billed", STOP),
    ("ideogram", "rate_limit"): Expect("rate_limited", "not_billed", FALLBACK),
    ("ideogram", "server_error"): Expect("unavailable", "not_billed", RETRY_FALLBACK),
    ("ideogram", "hang"): Expect("timeout", "unknown", FALLBACK),
    ("ideogram", "drop"): Expect("unavailable", "unknown", RETRY_FALLBACK),
    ("ideogram", "malformed"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("ideogram", "image_404"): Expect("bad_response", "billed", RETRY_FALLBACK),
    ("ideogram", "not_an_image"): Expect("bad_response", "billed", RETRY_FALLBACK),
}


def test_the_table_covers_every_fault_the_emulator_injects() -> None:
    for provider, faults in SUPPORTED.items():
        listed = {fault for (p, fault) in EXPECTED if p == provider}
        assert listed == {f.value for f in faults}, provider


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def service(
    emulator_server: tuple[BackgroundServer, FaultBoard],
    sqlite_session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[sessionmaker[Session], FaultBoard, int]:
    server, board = emulator_server
    board.reset()
    for name in EMULATED.values():
        board.configure(name, retry_after_s=1)
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
    seed(sqlite_session_factory, timeout_s=ATTEMPT_TIMEOUT_S)
    budget = make_budget(sqlite_session_factory, limit_micro_usd=5_000_000)
    return sqlite_session_factory, board, budget


def _run(factory: sessionmaker[Session], request: GenerationRequest) -> GenerationResult | GenerationFailed:
    try:
        return asyncio.run(generate(request, SYSTEM, factory=factory))
    except GenerationFailed as failed:
        return failed


@pytest.mark.parametrize(("provider", "fault"), sorted(EXPECTED), ids=[f"{p}-{f}" for p, f in sorted(EXPECTED)])
def test_fallback_under_each_fault(
    service: tuple[sessionmaker[Session], FaultBoard, int], provider: str, fault: str, tmp_path: Path
) -> None:
    factory, board, budget = service
    expect = EXPECTED[(provider, fault)]
    board.set_fault(EMULATED[provider], Fault(fault))
    params = {} if provider == "ideogram" else {"num_inference_steps": 4}
    outcome = _run(factory, GenerationRequest(f"a lighthouse ({fault})", provider=provider, params=params))

    rows = attempts(factory)
    first = rows[0]
    assert first.provider == provider
    assert (first.error_class, first.billing) == (expect.error_class, expect.billing), [
        (r.provider, r.status, r.error_class, r.billing) for r in rows
    ]
    at_primary = [r for r in rows if r.provider == provider]
    elsewhere = [r for r in rows if r.provider != provider]
    if expect.then == SERVED:
        assert isinstance(outcome, GenerationResult) and outcome.provider == provider
        assert len(rows) == 1 and first.status == "succeeded"
    elif expect.then == STOP:
        assert isinstance(outcome, GenerationFailed), outcome
        assert len(rows) == 1 and not elsewhere
        assert f"{provider}: {expect.error_class}" in str(outcome)  # the error lists the attempt and why
        assert outcome.result.attempts[0].billing == expect.billing
    else:
        assert isinstance(outcome, GenerationResult), outcome
        assert outcome.provider != provider and outcome.images
        assert len(at_primary) == (2 if expect.then == RETRY_FALLBACK else 1)
        assert all(r.error_class == expect.error_class and r.billing == expect.billing for r in at_primary)
        assert [r.status for r in elsewhere] == ["succeeded"]
        assert [a.fallback_position for a in outcome.attempts] == [0] * len(at_primary) + [1]
        assert any(adj.kind.value == "retry" and "falling back" in adj.message for adj in outcome.adjustments)
    ledger_matches_budget(factory, budget)
