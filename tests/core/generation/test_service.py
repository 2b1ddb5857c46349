"""The generation service end to end: the ledger, budgets, idempotency, degrade, cancellation, progress.

Providers run in the offline sandbox unless a test starts the emulator (then the real client libraries talk to
it). Tests taking `db_session_factory` run on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import BudgetExceeded, InvalidInput, PermissionDenied
from core import price_store
from core.generation import usage
from core.generation.models import AdjustmentKind, GenerationRequest, GenerationStatus, ProgressUpdate
from core.generation.service import generate, generate_sync
from core.presets import PRESETS
from core.providers.base import ConnectionMode
from core.security import Actor
from db.engine import transaction
from db.models import BudgetReservation, Generation, ReservationStatus, SpendMode, User
from emulator.faults import Fault, FaultBoard
from emulator.runner import BackgroundServer
from tests.core.generation.service_support import (
    SYSTEM,
    Figures,
    attempts,
    count,
    figures,
    generation,
    images,
    ledger_matches_budget,
    make_budget,
    make_user,
    open_reservations,
    running_emulator,
    seed,
)
from tests.core.generation.service_workers import repeat_with_key

FAL_ESTIMATE = 15_729  # fal-qwen at its default settings (landscape 4:3, one image) and $0.02/MP


pytestmark = pytest.mark.usefixtures("sandbox_only")


def _run(factory: sessionmaker[Session], request: GenerationRequest, actor: Actor = SYSTEM) -> object:
    return generate_sync(request, actor, factory=factory)


def test_a_sandbox_request_end_to_end(factory: sessionmaker[Session]) -> None:
    budget = make_budget(factory)
    seen: list[ProgressUpdate] = []
    request = GenerationRequest("a red fox in snow", provider="fal-qwen", params={"seed": 7})
    result = generate_sync(request, SYSTEM, factory=factory, on_progress=seen.append)

    assert result.status is GenerationStatus.SUCCEEDED and result.provider == "fal-qwen" and result.mode == "sandbox"
    assert result.seed == 7 and len(result.images) == 1 and result.images[0].path.exists()
    assert result.cost.estimated_micro_usd == result.cost.actual_micro_usd == FAL_ESTIMATE
    assert not result.cost.live and result.cost.live_actual_micro_usd == 0
    assert result.cost.simulated_actual_micro_usd == FAL_ESTIMATE
    assert {"attempt", "submitted", "running", "completed"} <= {u.kind for u in seen}
    assert any(a.kind is AdjustmentKind.TRANSLATION for a in result.adjustments)

    [row] = attempts(factory, result.generation_id)
    with factory() as session:
        price = price_store.active_price(session, "fal-qwen")
    assert price is not None
    assert (row.status, row.mode, row.billing, row.actual_micro_usd) == ("succeeded", "sandbox", "billed", FAL_ESTIMATE)
    assert row.price_version_id == price.id and row.provider_request_id and row.endpoint
    assert row.effective_params["seed"] == 7 and row.translation_notes
    assert row.total_ms is not None and row.megapixels_micro == 1024 * 768
    [stored] = images(factory, result.generation_id)
    assert stored.sha256 == result.images[0].sha256 and stored.attempt_id == row.id
    gen = generation(factory, result.generation_id)
    assert (gen.status, gen.mode, gen.final_provider, gen.final_cost_micro_usd) == (
        "succeeded",
        "simulated",
        "fal-qwen",
        FAL_ESTIMATE,
    )
    assert gen.lease_owner and gen.finished_at is not None
    # Sandbox spend is simulated: it counts against the budget, never as live money.
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(FAL_ESTIMATE, 0)
    assert figures(factory, budget, SpendMode.LIVE) == Figures(0, 0)
    with factory() as session:
        today = datetime.now(UTC).date()
        summary = usage.usage_summary(session, date_from=today, date_to=today, by=("provider",))
    assert [(r.spend_mode, r.group["provider"], r.actual_micro_usd) for r in summary] == [
        ("simulated", "fal-qwen", FAL_ESTIMATE)
    ]
    ledger_matches_budget(factory, budget)


def test_a_repeat_with_the_same_key_returns_the_first_result_and_spends_nothing(
    factory: sessionmaker[Session],
) -> None:
    budget = make_budget(factory)
    request = GenerationRequest("a red fox", provider="fal-qwen", params={"seed": 3}, idempotency_key="fox-1")
    first = generate_sync(request, SYSTEM, factory=factory)
    again = generate_sync(request, SYSTEM, factory=factory)
    assert not first.replayed and again.replayed
    assert again.generation_id == first.generation_id and again.status is GenerationStatus.SUCCEEDED
    assert [i.sha256 for i in again.images] == [i.sha256 for i in first.images]
    assert again.cost.actual_micro_usd == first.cost.actual_micro_usd
    assert len(attempts(factory)) == 1 and count(factory, Generation) == 1
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(FAL_ESTIMATE, 0)
    # The same key for a different request is refused, not replayed.
    with pytest.raises(InvalidInput, match="already used for a different request"):
        generate_sync(
            GenerationRequest("a grey wolf", provider="fal-qwen", params={"seed": 3}, idempotency_key="fox-1"),
            SYSTEM,
            factory=factory,
        )
    # Keys belong to their user: another user's same key is a new request.
    other = make_user(factory, "walter")
    assert generate_sync(request, other, factory=factory).generation_id != first.generation_id


@pytest.mark.parametrize("trials", [3])
def test_concurrent_repeats_from_several_processes_run_once(
    db_url: str, db_session_factory: sessionmaker[Session], trials: int
) -> None:
    """4 processes send the same request with the same key at the same moment, several times: one generation,
    one attempt, one charge each time; every process gets that generation back."""
    seed(db_session_factory)
    budget = make_budget(db_session_factory)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        for trial in range(trials):
            key = f"race-{trial}"
            start_at = time.time() + (8.0 if trial == 0 else 1.0)  # the first round waits for the imports
            outcomes = pool.starmap(repeat_with_key, [(db_url, key, start_at)] * 4, chunksize=1)
            ids = {generation_id for generation_id, _, _ in outcomes}
            assert len(ids) == 1, outcomes
            assert sorted(replayed for _, replayed, _ in outcomes) == [False, True, True, True]
            assert all(n == 1 for _, _, n in outcomes)
            assert len(attempts(db_session_factory, ids.pop())) == 1
    assert count(db_session_factory, Generation) == trials
    assert figures(db_session_factory, budget, SpendMode.SIMULATED) == Figures(trials * FAL_ESTIMATE, 0)
    ledger_matches_budget(db_session_factory, budget)


def test_a_hard_budget_refuses_naming_the_budget_and_what_is_left(factory: sessionmaker[Session]) -> None:
    budget = make_budget(factory, name="team", limit_micro_usd=10_000)
    request = GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=False, idempotency_key="k")
    with pytest.raises(BudgetExceeded) as refused:
        _run(factory, request)
    error = refused.value
    assert (error.budget_id, error.budget_name, error.mode) == (budget, "team", "simulated")
    assert (error.left_micro_usd, error.requested_micro_usd) == (10_000, FAL_ESTIMATE)
    assert "'team'" in str(error) and "$0.010000 left" in str(error)
    assert attempts(factory) == [] and open_reservations(factory) == 0
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(0, 0)
    [gen] = _generations(factory)
    assert (gen.status, gen.error_class) == ("refused", "budget_exceeded")
    # A repeat of the key is the same refusal, and spends nothing either.
    with pytest.raises(BudgetExceeded) as again:
        _run(factory, request)
    assert str(again.value) == str(error)
    assert count(factory, Generation) == 1 and attempts(factory) == []


def test_a_hard_budget_refusal_falls_back_to_a_provider_it_allows(factory: sessionmaker[Session]) -> None:
    make_budget(factory, name="fal cap", scope="provider", scope_id="fal-qwen", period="monthly", limit_micro_usd=1)
    result = generate_sync(GenerationRequest("a red fox", provider="fal-qwen"), SYSTEM, factory=factory)
    assert result.provider != "fal-qwen"
    assert any("'fal cap'" in a.message and a.kind is AdjustmentKind.ROUTING for a in result.adjustments)
    assert [a.provider for a in attempts(factory)] == [result.provider]


def _generations(factory: sessionmaker[Session]) -> list[Generation]:
    with factory() as session:
        return list(session.scalars(select(Generation).order_by(Generation.created_at)))


@pytest.mark.parametrize(
    ("action", "request_params", "check"),
    [
        ("cheaper_preset", {"preset": "high"}, "preset"),
        ("smaller_size", {"params": {"image_size": "square_hd"}}, "size"),
        ("cheaper_provider", {}, "provider"),
    ],
)
def test_a_soft_budget_degrades_the_request_says_so_and_records_it(
    factory: sessionmaker[Session], action: str, request_params: dict[str, object], check: str
) -> None:
    budget = make_budget(factory, name="soft cap", limit_micro_usd=1, hard=False, degrade_action=action)
    request = GenerationRequest("a red fox", provider="fal-qwen", **request_params)  # type: ignore[arg-type]
    result = generate_sync(request, SYSTEM, factory=factory)
    assert result.status is GenerationStatus.SUCCEEDED
    degrades = [a for a in result.adjustments if a.kind is AdjustmentKind.DEGRADE]
    assert degrades and all("'soft cap'" in a.message or "estimate" in a.message for a in degrades)
    [row] = attempts(factory)
    if check == "preset":
        assert row.effective_params["num_inference_steps"] == PRESETS["fast"]["fal-qwen"]["num_inference_steps"]
    elif check == "size":
        assert row.effective_params["image_size"] == "512x512"
        assert row.estimated_micro_usd == 5_243  # a quarter of 1024x1024's $0.020972
    else:
        assert result.provider in ("qwen", "sandbox") and row.estimated_micro_usd == 0  # free ones are cheapest
    degraded = generation(factory, result.generation_id).degraded
    assert degraded is not None and degraded["budgets"][0]["name"] == "soft cap"
    assert degraded["budgets"][0]["action"] == action and degraded["changes"]
    # A soft budget holds the request's money anyway: over the limit, recorded, never refused.
    assert figures(factory, budget, SpendMode.SIMULATED).spent == row.actual_micro_usd
    replay = generate_sync(
        GenerationRequest("a red fox", provider="fal-qwen", **request_params),  # type: ignore[arg-type]
        SYSTEM,
        factory=factory,
    )
    assert replay.generation_id != result.generation_id  # no key: a new request


def test_a_user_generates_within_their_budget_and_an_inactive_one_cannot(factory: sessionmaker[Session]) -> None:
    erin = make_user(factory, "erin")
    make_budget(factory, name="erin's", scope="user", scope_id=erin.user_id, limit_micro_usd=FAL_ESTIMATE)
    request = GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=False)
    result = generate_sync(request, erin, factory=factory)
    assert attempts(factory, result.generation_id)[0].user_id == erin.user_id
    with pytest.raises(BudgetExceeded, match="erin's") as refused:
        generate_sync(request, erin, factory=factory)
    assert refused.value.left_micro_usd == 0
    generate_sync(request, SYSTEM, factory=factory)  # the user's budget is theirs alone
    _deactivate(factory, erin)
    with pytest.raises(PermissionDenied, match="deactivated"):
        generate_sync(request, erin, factory=factory)
    with pytest.raises(PermissionDenied, match="no such account"):
        generate_sync(request, Actor(user_id=9999, username="ghost"), factory=factory)


def _deactivate(factory: sessionmaker[Session], actor: Actor) -> None:
    with transaction(factory) as session:
        user = session.get(User, actor.user_id)
        assert user is not None
        user.active = False


def test_a_deactivated_user_cannot_replay_an_earlier_result(factory: sessionmaker[Session]) -> None:
    """A replay writes nothing, so it is authorized where it is read: the earlier result stays theirs to see only
    while the account is active."""
    erin = make_user(factory, "erin")
    request = GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=False, idempotency_key="fox")
    first = generate_sync(request, erin, factory=factory)
    assert generate_sync(request, erin, factory=factory).generation_id == first.generation_id
    _deactivate(factory, erin)
    with pytest.raises(PermissionDenied, match="deactivated"):
        generate_sync(request, erin, factory=factory)


def test_nothing_runnable_is_refused_before_anything_is_written(factory: sessionmaker[Session]) -> None:
    with pytest.raises(InvalidInput) as refused:
        _run(factory, GenerationRequest("a red fox", provider="fal-qwen", params={"guidance_scale": 99}))
    assert "guidance_scale" in str(refused.value)
    with pytest.raises(InvalidInput, match="unknown provider"):
        _run(factory, GenerationRequest("a red fox", provider="dall-e"))
    with pytest.raises(InvalidInput, match="idempotency key"):
        GenerationRequest("x", idempotency_key="")
    assert count(factory, Generation) == 0 and attempts(factory) == []


def test_a_failing_progress_callback_never_stops_a_run(factory: sessionmaker[Session]) -> None:
    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("the display broke")

    request = GenerationRequest("a red fox", provider="sandbox")
    result = generate_sync(request, SYSTEM, factory=factory, on_progress=broken)
    assert result.status is GenerationStatus.SUCCEEDED


def test_generate_sync_works_where_an_event_loop_is_already_running(factory: sessionmaker[Session]) -> None:
    async def inside_a_loop() -> str:
        return generate_sync(GenerationRequest("a red fox", provider="sandbox"), SYSTEM, factory=factory).generation_id

    assert asyncio.run(inside_a_loop())


# --- against the emulator -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def emulated(emulator_server: tuple[BackgroundServer, FaultBoard], monkeypatch: pytest.MonkeyPatch) -> FaultBoard:
    server, board = emulator_server
    board.reset()
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
    return board


def test_every_attempt_is_priced_at_its_own_provider_and_price_version(
    factory: sessionmaker[Session], emulated: FaultBoard
) -> None:
    budget = make_budget(factory)
    emulated.set_fault("fal", None)
    emulated.set_fault("hf", Fault.AUTH)
    result = generate_sync(
        GenerationRequest("a red fox", provider="huggingface", params={"num_inference_steps": 4}),
        SYSTEM,
        factory=factory,
    )
    rows = attempts(factory, result.generation_id)
    assert [r.provider for r in rows] == ["huggingface", result.provider] and result.provider != "huggingface"
    with factory() as session:
        for row in rows:
            price = price_store.active_price(session, row.provider)
            assert price is not None and row.price_version_id == price.id
    assert rows[0].estimated_micro_usd != rows[1].estimated_micro_usd or rows[1].provider == "qwen"
    assert [r.mode for r in rows] == [ConnectionMode.EMULATOR.value] * 2
    ledger_matches_budget(factory, budget)


def test_cancelling_mid_attempt_holds_the_estimate_and_records_the_attempt(
    factory: sessionmaker[Session], emulated: FaultBoard
) -> None:
    """The caller gives up while fal runs the job: the attempt's end is written anyway (cancelled, billing
    unknown: fal may have run it), its estimate stays held, the generation is cancelled."""
    budget = make_budget(factory)
    emulated.configure("fal", latency_s=30.0)

    async def cancel_after_request_id() -> None:
        task = asyncio.create_task(
            generate(GenerationRequest("a red fox", provider="fal-qwen", allow_fallback=False), SYSTEM, factory=factory)
        )
        deadline = time.monotonic() + 30
        while not any(a.provider_request_id for a in await asyncio.to_thread(attempts, factory)):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_request_id())
    [row] = attempts(factory)
    assert (row.status, row.error_class, row.billing) == ("cancelled", "cancelled", "unknown")
    assert row.actual_micro_usd is None
    assert row.provider_request_id  # stored before polling
    [gen] = _generations(factory)
    assert gen.status == "cancelled" and gen.final_cost_micro_usd is None
    assert figures(factory, budget, SpendMode.SIMULATED) == Figures(0, row.estimated_micro_usd)
    with factory() as session:
        statuses = list(session.scalars(select(BudgetReservation.status)))
    assert statuses == [ReservationStatus.HELD]
