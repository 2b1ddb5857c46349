"""The usage ledger on SQLite and PostgreSQL: generations with idempotency keys, attempts finished exactly once
with their rollups, reconciliation, images, leases and recovery's list, and the reads from the rollups."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, Conflict, InvalidInput, NotFound
from core.generation import usage
from core.generation.usage import AttemptOutcome, ImageRecord
from core.providers.base import ConnectionMode
from db.engine import transaction
from db.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    Generation,
    SpendMode,
    StoredImage,
    UsageAttempt,
    UsageDailyRollup,
)
from tests.core.generation.usage_fixtures import (
    HOUR,
    assert_rollups_match_attempts,
    make_user,
    new_attempt,
    new_generation,
    rollups,
    seeded_price_ids,
)

Factory = sessionmaker[Session]


@pytest.fixture
def prices(db_session_factory: Factory) -> dict[str, int]:
    return seeded_price_ids(db_session_factory)


def _succeeded(
    total_ms: int = 1_234, cost: int = 20_972, units: Decimal | None = Decimal("1.048576")
) -> AttemptOutcome:
    return AttemptOutcome(
        status="succeeded",
        billing=Billing.BILLED,
        actual_micro_usd=cost,
        billed_units=units,
        images_count=1,
        megapixels_micro=1_048_576,
        submit_ms=10,
        queue_ms=200,
        run_ms=900,
        download_ms=124,
        total_ms=total_ms,
        image_refs=({"sha256": "ab" * 32, "format": "png"},),
    )


# --- generations and idempotency ------------------------------------------------------------------------------


def test_without_a_key_every_request_is_a_new_generation(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        first = new_generation(session)
        second = new_generation(session)
    assert first.created and second.created
    assert first.generation_id != second.generation_id
    assert first.status == "pending" and not first.finished


def test_a_repeated_key_returns_the_first_generation_and_its_state(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    with transaction(db_session_factory) as session:
        first = new_generation(session, key="order-17")
        attempt = new_attempt(session, first.generation_id, prices["fal-qwen"])
        usage.finish_attempt(session, attempt, _succeeded())
        usage.finish_generation(
            session, first.generation_id, status="succeeded", final_provider="fal-qwen", final_cost_micro_usd=20_972
        )
    with transaction(db_session_factory) as session:
        again = new_generation(session, key="order-17")
    assert not again.created
    assert again.generation_id == first.generation_id
    assert (again.status, again.final_provider, again.final_cost_micro_usd) == ("succeeded", "fal-qwen", 20_972)
    assert again.finished
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == 1
        stored = session.scalar(select(Generation.idempotency_key))
    assert stored == "0:order-17"


def test_a_key_reused_for_a_different_request_is_refused(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        new_generation(session, key="k1", request={"prompt": "a fox", "provider": "fal-qwen"})
    with pytest.raises(InvalidInput) as caught, transaction(db_session_factory) as session:
        new_generation(session, key="k1", request={"prompt": "a wolf", "provider": "fal-qwen"})
    assert "different request" in str(caught.value)
    assert "idempotency_key" in caught.value.field_errors
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == 1


def test_keys_are_scoped_to_their_user(db_session_factory: Factory) -> None:
    alice, bob = make_user(db_session_factory, "alice"), make_user(db_session_factory, "bob")
    with transaction(db_session_factory) as session:
        ids = {new_generation(session, user_id=u, key="same").generation_id for u in (alice, bob, None)}
    assert len(ids) == 3
    with db_session_factory() as session:
        keys = set(session.scalars(select(Generation.idempotency_key)))
    assert keys == {f"{alice}:same", f"{bob}:same", "0:same"}


@pytest.mark.parametrize("key", ["", "   ", "x" * (usage.MAX_IDEMPOTENCY_KEY_CHARS + 1), "a\nb", "a\x00"])
def test_unusable_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput):
        usage.scoped_idempotency_key(1, key)


def test_the_fingerprint_ignores_field_order_but_not_values() -> None:
    a = usage.request_fingerprint({"prompt": "p", "params": {"seed": 1, "guidance": Decimal("2.5")}})
    b = usage.request_fingerprint({"params": {"guidance": Decimal("2.50"), "seed": 1}, "prompt": "p"})
    c = usage.request_fingerprint({"prompt": "p", "params": {"seed": 2, "guidance": Decimal("2.5")}})
    d = usage.request_fingerprint({"prompt": "p", "params": {"seed": "1", "guidance": Decimal("2.5")}})
    assert a == b
    assert len({a, c, d}) == 3
    assert len(a) == 64


def test_a_generation_finishes_once_and_soft_delete_keeps_the_ledger(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    with transaction(db_session_factory) as session:
        gen = new_generation(session)
        attempt = new_attempt(session, gen.generation_id, prices["fal-qwen"])
        usage.finish_attempt(session, attempt, _succeeded())
        assert usage.get_generation(session, gen.generation_id).status == "running"
        assert usage.finish_generation(
            session, gen.generation_id, status="succeeded", final_provider="fal-qwen", final_cost_micro_usd=20_972
        )
        assert not usage.finish_generation(
            session, gen.generation_id, status="failed", final_provider=None, final_cost_micro_usd=0
        )
        with pytest.raises(Conflict):
            new_attempt(session, gen.generation_id, prices["fal-qwen"], attempt_no=2)
        assert usage.soft_delete_generation(session, gen.generation_id)
        assert not usage.soft_delete_generation(session, gen.generation_id)
        with pytest.raises(NotFound):
            usage.finish_generation(session, "nope", status="failed", final_provider=None, final_cost_micro_usd=0)
        with pytest.raises(ValueError, match="ends as one of"):
            usage.finish_generation(session, gen.generation_id, status="running", final_provider=None,
                                    final_cost_micro_usd=None)  # fmt: skip
    with db_session_factory() as session:
        row = session.execute(select(Generation)).scalar_one()
        assert (row.status, row.final_cost_micro_usd, row.deleted_at is not None) == ("succeeded", 20_972, True)
        assert session.scalar(select(func.count()).select_from(UsageAttempt)) == 1
        assert session.scalar(select(func.count()).select_from(UsageDailyRollup)) == 1


# --- attempts and rollups -------------------------------------------------------------------------------------


def test_an_attempt_without_a_price_is_refused_before_anything_is_written(db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        gen = new_generation(session)
    with pytest.raises(InvalidInput, match="never run unpriced"), transaction(db_session_factory) as session:
        usage.start_attempt(
            session,
            generation_id=gen.generation_id,
            attempt_no=1,
            fallback_position=0,
            user_id=None,
            provider="fal-qwen",
            mode="live",
            endpoint=None,
            effective_params={},
            translation_notes=[],
            estimated_micro_usd=0,
            price_version_id=None,
        )
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageAttempt)) == 0
        assert session.scalar(select(Generation.status)) == "pending"


def test_an_attempt_is_written_at_start_and_finished_exactly_once_with_its_rollup(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    user = make_user(db_session_factory, "carol")
    with transaction(db_session_factory) as session:
        gen = new_generation(session, user_id=user)
        attempt = new_attempt(session, gen.generation_id, prices["fal-qwen"], user_id=user)
    with db_session_factory() as session:
        row = session.get_one(UsageAttempt, attempt)
        assert (row.status, row.finished_at, row.price_version_id) == ("submitted", None, prices["fal-qwen"])
    with transaction(db_session_factory) as session:
        assert usage.record_request_id(session, attempt, "req-123")
    with db_session_factory() as session:
        assert session.get_one(UsageAttempt, attempt).status == "running"

    with transaction(db_session_factory) as session:
        assert usage.finish_attempt(session, attempt, _succeeded(total_ms=1_234))
    with transaction(db_session_factory) as session:
        assert not usage.finish_attempt(session, attempt, _succeeded(total_ms=99, cost=1))
        assert not usage.record_request_id(session, attempt, "req-other")
        with pytest.raises(NotFound):
            usage.finish_attempt(session, 987_654, _succeeded())

    with db_session_factory() as session:
        row = session.get_one(UsageAttempt, attempt)
    assert (row.status, row.billing, row.actual_micro_usd, row.billed_units_micro) == (
        "succeeded", "billed", 20_972, 1_048_576,
    )  # fmt: skip
    assert (row.queue_ms, row.run_ms, row.download_ms, row.total_ms) == (200, 900, 124, 1_234)
    assert row.provider_request_id == "req-123" and row.finished_at is not None
    (rollup,) = rollups(db_session_factory)
    assert (rollup.day, rollup.provider, rollup.user_id, rollup.mode, rollup.status, rollup.error_class) == (
        row.started_at.date(), "fal-qwen", user, "live", "succeeded", "",
    )  # fmt: skip
    assert (rollup.attempts, rollup.images, rollup.megapixels_micro, rollup.billed_units_micro) == (
        1, 1, 1_048_576, 1_048_576,
    )  # fmt: skip
    assert (rollup.estimated_micro_usd, rollup.actual_micro_usd, rollup.unknown_billing) == (20_972, 20_972, 0)
    assert rollup.latency_sum_ms == 1_234
    bucket = usage.latency_bucket(1_234)
    assert LATENCY_BUCKET_BOUNDS_MS[bucket - 1] < 1_234 <= LATENCY_BUCKET_BOUNDS_MS[bucket]
    assert [getattr(rollup, c) for c in LATENCY_BUCKET_COLUMNS] == [int(i == bucket) for i in range(32)]


def test_failures_roll_up_by_error_class_and_unknown_billing_is_reconciled_once(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    with transaction(db_session_factory) as session:
        gen = new_generation(session)
        first = new_attempt(session, gen.generation_id, prices["fal-qwen"], attempt_no=1)
        second = new_attempt(session, gen.generation_id, prices["fal-qwen"], attempt_no=2)
        usage.finish_attempt(
            session,
            first,
            AttemptOutcome(status="failed", billing=Billing.UNKNOWN, actual_micro_usd=None,
                           billed_units=Decimal("0.5"), error_class="timeout", error_message="x" * 10_000,
                           total_ms=30_000),
        )  # fmt: skip
        usage.finish_attempt(
            session,
            second,
            AttemptOutcome(status="failed", billing=Billing.NOT_BILLED, actual_micro_usd=0,
                           error_class="rate_limited", total_ms=40),
        )  # fmt: skip
    by_class = {r.error_class: r for r in rollups(db_session_factory)}
    assert set(by_class) == {"timeout", "rate_limited"}
    assert (by_class["timeout"].unknown_billing, by_class["timeout"].actual_micro_usd) == (1, 0)
    assert by_class["timeout"].billed_units_micro == 500_000
    assert by_class["rate_limited"].latency_b00 == 1

    with transaction(db_session_factory) as session:
        assert usage.reconcile_attempt(
            session, first, billing=Billing.BILLED, actual_micro_usd=20_972, billed_units=Decimal("1.048576")
        )
        assert not usage.reconcile_attempt(session, first, billing=Billing.BILLED, actual_micro_usd=1)
        assert not usage.reconcile_attempt(session, second, billing=Billing.BILLED, actual_micro_usd=1)
        with pytest.raises(ValueError):
            usage.reconcile_attempt(session, second, billing=Billing.UNKNOWN, actual_micro_usd=0)
    timeout = {r.error_class: r for r in rollups(db_session_factory)}["timeout"]
    assert (timeout.unknown_billing, timeout.actual_micro_usd, timeout.billed_units_micro) == (0, 20_972, 1_048_576)
    with db_session_factory() as session:
        row = session.get_one(UsageAttempt, first)
    assert (row.billing, row.actual_micro_usd, row.billed_units_micro) == ("billed", 20_972, 1_048_576)
    assert row.error_message is not None and len(row.error_message) == usage.MAX_ERROR_MESSAGE_CHARS


def test_the_rollup_day_is_the_day_the_attempt_started(db_session_factory: Factory, prices: dict[str, int]) -> None:
    late = datetime(2026, 11, 30, 23, 59, 59, 900_000, tzinfo=UTC)
    with transaction(db_session_factory) as session:
        gen = new_generation(session, now=late)
        attempt = new_attempt(session, gen.generation_id, prices["fal-qwen"], now=late)
        outcome = _succeeded()
        usage.finish_attempt(
            session, attempt, AttemptOutcome(**{**outcome.__dict__, "finished_at": late + timedelta(seconds=2)})
        )
    (rollup,) = rollups(db_session_factory)
    assert rollup.day == date(2026, 11, 30)


def test_rollups_equal_the_sum_of_their_attempts(db_session_factory: Factory, prices: dict[str, int]) -> None:
    rng = random.Random(7)
    users = [None, make_user(db_session_factory, "dave"), make_user(db_session_factory, "erin")]
    with transaction(db_session_factory) as session:
        for g in range(30):
            user = rng.choice(users)
            gen = new_generation(session, user_id=user)
            for n in range(1, rng.randint(1, 4) + 1):
                provider = rng.choice(["fal-qwen", "ideogram", "sandbox"])
                mode = "sandbox" if provider == "sandbox" else rng.choice(["live", "emulator"])
                day = datetime(2026, 11, 1 + g % 3, 12, tzinfo=UTC)
                attempt = new_attempt(
                    session, gen.generation_id, prices[provider], attempt_no=n, provider=provider, mode=mode,
                    user_id=user, estimated_micro_usd=rng.randint(0, 90_000), now=day,
                )  # fmt: skip
                usage.finish_attempt(session, attempt, _random_outcome(rng))
    assert_rollups_match_attempts(db_session_factory)


def _random_outcome(rng: random.Random) -> AttemptOutcome:
    kind = rng.choice(["ok", "ok", "unknown", "not_billed", "billed_failure"])
    timing = rng.choice([None, rng.randint(0, 250_000)])
    if kind == "ok":
        units = rng.choice([None, Decimal(rng.randint(1, 4_000_000)) / 1_000_000])
        return AttemptOutcome(status="succeeded", billing=Billing.BILLED, actual_micro_usd=rng.randint(0, 99_999),
                              billed_units=units, images_count=rng.randint(1, 4),
                              megapixels_micro=rng.randint(0, 4_000_000), total_ms=timing)  # fmt: skip
    if kind == "unknown":
        return AttemptOutcome(status="failed", billing=Billing.UNKNOWN, actual_micro_usd=None, error_class="timeout",
                              total_ms=timing)  # fmt: skip
    if kind == "not_billed":
        return AttemptOutcome(status="failed", billing=Billing.NOT_BILLED, actual_micro_usd=0,
                              error_class=rng.choice(["rate_limited", "unavailable"]), total_ms=timing)  # fmt: skip
    return AttemptOutcome(status="failed", billing=Billing.BILLED, actual_micro_usd=rng.randint(0, 50_000),
                          error_class="bad_response", total_ms=timing)  # fmt: skip


# --- images, leases, recovery ---------------------------------------------------------------------------------


def test_images_are_indexed_once_per_position(db_session_factory: Factory, prices: dict[str, int]) -> None:
    user = make_user(db_session_factory, "frank")
    images = [ImageRecord(f"{i:064x}", "png", 1024, 1024, 1_000 + i, seed=7 + i) for i in range(3)]
    with transaction(db_session_factory) as session:
        gen = new_generation(session, user_id=user)
        attempt = new_attempt(session, gen.generation_id, prices["fal-qwen"], user_id=user)
        stored = usage.record_images(session, gen.generation_id, attempt, user, images)
        replay = usage.record_images(
            session, gen.generation_id, attempt, user, [ImageRecord("f" * 64, "jpeg", 1, 1, 1)] * 3
        )
        assert usage.record_images(session, gen.generation_id, attempt, user, []) == []
    assert [s.position for s in stored] == [0, 1, 2]
    assert [(s.sha256, s.seed, s.user_id, s.attempt_id) for s in stored] == [
        (i.sha256, i.seed, user, attempt) for i in images
    ]
    assert replay == stored
    with db_session_factory() as session:
        assert session.scalar(select(func.count()).select_from(StoredImage)) == 3
        assert usage.generation_images(session, gen.generation_id) == stored


def test_leases_are_taken_over_only_when_expired_and_renewed_only_by_their_owner(db_session_factory: Factory) -> None:
    now = datetime.now(UTC)
    with transaction(db_session_factory) as session:
        gen = new_generation(session, lease_owner="a", lease_expires_at=now + HOUR)
        gid = gen.generation_id
        assert not usage.take_over_generation(session, gid, lease_owner="b", lease_expires_at=now + 2 * HOUR, now=now)
        assert usage.renew_lease(session, gid, lease_owner="a", lease_expires_at=now + timedelta(minutes=1))
        assert not usage.renew_lease(session, gid, lease_owner="b", lease_expires_at=now + HOUR)
        later = now + timedelta(minutes=2)
        assert usage.take_over_generation(session, gid, lease_owner="b", lease_expires_at=later + HOUR, now=later)
        assert not usage.take_over_generation(session, gid, lease_owner="c", lease_expires_at=later + HOUR, now=later)
        assert not usage.renew_lease(session, gid, lease_owner="a", lease_expires_at=later + HOUR)
        state = usage.get_generation(session, gid)
    assert state.lease_owner == "b"


def test_pending_attempts_are_those_that_reached_the_provider_in_an_expired_lease(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    now = datetime.now(UTC)
    with transaction(db_session_factory) as session:
        alive = new_generation(session, lease_expires_at=now + HOUR)
        dead = new_generation(session, lease_expires_at=now - timedelta(seconds=1))
        a_alive = new_attempt(session, alive.generation_id, prices["fal-qwen"])
        usage.record_request_id(session, a_alive, "alive-1")
        a_dead_1 = new_attempt(session, dead.generation_id, prices["fal-qwen"], attempt_no=1)
        usage.record_request_id(session, a_dead_1, "dead-1")
        a_dead_2 = new_attempt(session, dead.generation_id, prices["fal-qwen"], attempt_no=2)  # never got an id
        a_dead_3 = new_attempt(session, dead.generation_id, prices["fal-qwen"], attempt_no=3)
        usage.record_request_id(session, a_dead_3, "dead-3")
        usage.finish_attempt(session, a_dead_3, _succeeded())
    with db_session_factory() as session:
        pending = usage.pending_attempts(session, now)
        everything = usage.pending_attempts(session, now, include_without_request_id=True)
        later = usage.pending_attempts(session, now + 2 * HOUR)
    assert [(p.attempt_id, p.provider_request_id) for p in pending] == [(a_dead_1, "dead-1")]
    assert pending[0].price_version_id == prices["fal-qwen"] and pending[0].lease_owner == "test:1"
    assert {p.attempt_id for p in everything} == {a_dead_1, a_dead_2}
    assert {p.attempt_id for p in later} == {a_alive, a_dead_1}


# --- reads from the rollups -----------------------------------------------------------------------------------


def _finish_many(
    factory: Factory, price_ids: dict[str, int], plan: Sequence[tuple[str, str, str, int | None, int]], day: datetime
) -> None:
    """plan: (provider, mode, status, total_ms, cost) per attempt, all in one generation."""
    with transaction(factory) as session:
        gen = new_generation(session)
        for n, (provider, mode, status, total_ms, cost) in enumerate(plan, start=1):
            attempt = new_attempt(
                session, gen.generation_id, price_ids[provider], attempt_no=n, provider=provider, mode=mode,
                estimated_micro_usd=cost, now=day,
            )  # fmt: skip
            if status == "succeeded":
                outcome = AttemptOutcome(status="succeeded", billing=Billing.BILLED, actual_micro_usd=cost,
                                         images_count=1, total_ms=total_ms)  # fmt: skip
            else:
                outcome = AttemptOutcome(status="failed", billing=Billing.NOT_BILLED, actual_micro_usd=0,
                                         error_class="unavailable", total_ms=total_ms)  # fmt: skip
            usage.finish_attempt(session, attempt, outcome)


def test_the_summary_never_mixes_live_and_simulated_spend(db_session_factory: Factory, prices: dict[str, int]) -> None:
    day = datetime(2026, 11, 5, 10, tzinfo=UTC)
    _finish_many(
        db_session_factory,
        prices,
        [
            ("fal-qwen", "live", "succeeded", 1_000, 20_000),
            ("fal-qwen", "emulator", "succeeded", 1_000, 300_000),
            ("fal-qwen", "sandbox", "succeeded", 50, 0),
            ("fal-qwen", "live", "failed", 100, 0),
        ],
        day,
    )
    with db_session_factory() as session:
        by_provider = usage.usage_summary(session, date_from=day.date(), date_to=day.date(), by=("provider",))
        live = usage.usage_summary(session, date_from=day.date(), date_to=day.date(), mode="live")
        simulated = usage.usage_summary(session, date_from=day.date(), date_to=day.date(), mode="simulated")
        by_mode = usage.usage_summary(session, date_from=day.date(), date_to=day.date(), by=("mode", "status"))
        overall = usage.usage_summary(session, date_from=day.date(), date_to=day.date(), by=())
    rows = {(r.spend_mode, r.group["provider"]): r for r in by_provider}
    assert set(rows) == {("live", "fal-qwen"), ("simulated", "fal-qwen")}
    assert (rows["live", "fal-qwen"].actual_micro_usd, rows["live", "fal-qwen"].attempts) == (20_000, 2)
    assert (rows["live", "fal-qwen"].succeeded, rows["live", "fal-qwen"].images) == (1, 1)
    assert (rows["simulated", "fal-qwen"].actual_micro_usd, rows["simulated", "fal-qwen"].attempts) == (300_000, 2)
    assert [r.actual_micro_usd for r in live] == [20_000] and {r.spend_mode for r in live} == {"live"}
    assert [r.actual_micro_usd for r in simulated] == [300_000] and {r.spend_mode for r in simulated} == {"simulated"}
    assert {(r.spend_mode, r.group["mode"], r.group["status"]) for r in by_mode} == {
        ("live", "live", "succeeded"), ("live", "live", "failed"),
        ("simulated", "emulator", "succeeded"), ("simulated", "sandbox", "succeeded"),
    }  # fmt: skip
    # Even with no dimension at all, one row per spend mode: never a single figure.
    assert sorted((r.spend_mode, r.actual_micro_usd) for r in overall) == [("live", 20_000), ("simulated", 300_000)]


def test_the_summary_groups_by_day_and_user_within_the_range(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    for d in (4, 5, 6):
        _finish_many(
            db_session_factory, prices, [("ideogram", "live", "succeeded", 2_000, 60_000)],
            datetime(2026, 11, d, 10, tzinfo=UTC),
        )  # fmt: skip
    with db_session_factory() as session:
        rows = usage.usage_summary(
            session, date_from=date(2026, 11, 5), date_to=date(2026, 11, 6), by=("day", "user", "error_class")
        )
        with pytest.raises(InvalidInput):
            usage.usage_summary(session, date_from=date(2026, 11, 5), date_to=date(2026, 11, 6), by=("colour",))
        with pytest.raises(InvalidInput):
            usage.usage_summary(session, date_from=date(2026, 11, 6), date_to=date(2026, 11, 5))
        with pytest.raises(InvalidInput):
            usage.usage_summary(session, date_from=date(2026, 11, 5), date_to=date(2026, 11, 6), mode="emulator")
    assert [(r.group["day"], r.group["user"], r.group["error_class"], r.actual_micro_usd) for r in rows] == [
        (date(2026, 11, 5), 0, "", 60_000), (date(2026, 11, 6), 0, "", 60_000),
    ]  # fmt: skip
    assert rows[0].latency_mean_ms == 2_000


def test_provider_p50_reads_succeeded_attempts_from_the_rollups(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    day = datetime(2026, 11, 5, 10, tzinfo=UTC)
    plan = [("fal-qwen", "live", "succeeded", ms, 1) for ms in (900, 1_000, 1_100)]
    plan += [("fal-qwen", "live", "failed", 10, 0)] * 5  # fast failures say nothing about speed
    plan += [("ideogram", "emulator", "succeeded", 4_000, 1)]
    _finish_many(db_session_factory, prices, plan, day)
    with db_session_factory() as session:
        p50 = usage.provider_latency_p50(session, day.date())
        live_only = usage.provider_latency_p50(session, day.date(), mode="live")
        tomorrow = usage.provider_latency_p50(session, day.date() + timedelta(days=1))
    assert p50["fal-qwen"] is not None and 880 < p50["fal-qwen"] <= 1_150
    assert p50["ideogram"] is not None and 3_300 < p50["ideogram"] <= 4_300
    assert p50["qwen"] is None and set(p50) >= {"fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"}
    assert live_only["ideogram"] is None
    assert all(v is None for v in tomorrow.values())


def _exact_rank(values: list[int], q: float) -> int:
    """Nearest-rank quantile: the smallest value with at least q x N values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_p50_and_p95_from_the_rollups_match_the_exact_values_within_the_documented_error(
    db_session_factory: Factory, prices: dict[str, int]
) -> None:
    """A seeded log-normal distribution (median ~2.4 s, a long tail), as provider latencies are: the rollup
    figures are within 13 % of the exact ones, and always inside the same histogram bucket."""
    rng = random.Random(2026)
    latencies = [max(1, round(rng.lognormvariate(math.log(2_400), 0.6))) for _ in range(600)]
    day = datetime(2026, 11, 5, 10, tzinfo=UTC)
    _finish_many(db_session_factory, prices, [("fal-qwen", "live", "succeeded", ms, 1) for ms in latencies], day)
    with db_session_factory() as session:
        (row,) = usage.usage_summary(session, date_from=day.date(), date_to=day.date())
        p50_routing = usage.provider_latency_p50(session, day.date())["fal-qwen"]
    assert row.attempts == 600 and row.p50_ms is not None and row.p95_ms is not None
    assert p50_routing == row.p50_ms
    for q, estimate in ((0.5, row.p50_ms), (0.95, row.p95_ms)):
        exact = _exact_rank(latencies, q)
        print(f"q={q}: exact {exact} ms, from the rollups {estimate:.0f} ms ({(estimate - exact) / exact:+.1%})")
        assert abs(estimate - exact) <= 0.13 * exact
        assert usage.latency_bucket(math.ceil(estimate)) == usage.latency_bucket(exact)
    assert row.latency_mean_ms == pytest.approx(sum(latencies) / 600)


def test_a_histogram_quantile_is_always_in_the_exact_values_bucket() -> None:
    """The guarantee behind the documented error, on hostile data (clusters at bucket edges, the open bucket)."""
    rng = random.Random(11)
    edges = [*LATENCY_BUCKET_BOUNDS_MS, LATENCY_BUCKET_BOUNDS_MS[-1] + 1]
    for _ in range(300):
        values = [rng.choice([rng.randint(0, 400_000), rng.choice(edges), rng.choice(edges) + 1])
                  for _ in range(rng.randint(1, 60))]  # fmt: skip
        counts = [0] * len(LATENCY_BUCKET_COLUMNS)
        for v in values:
            counts[usage.latency_bucket(v)] += 1
        for q in (0.5, 0.95, 0.99, 1.0):
            estimate = usage.percentile_from_histogram(counts, q)
            assert estimate is not None
            exact_bucket = usage.latency_bucket(_exact_rank(values, q))
            if exact_bucket == len(LATENCY_BUCKET_BOUNDS_MS):
                assert estimate == LATENCY_BUCKET_BOUNDS_MS[-1]
            else:
                low = 0 if exact_bucket == 0 else LATENCY_BUCKET_BOUNDS_MS[exact_bucket - 1]
                assert low <= estimate <= LATENCY_BUCKET_BOUNDS_MS[exact_bucket]
    assert usage.percentile_from_histogram([0] * 32, 0.5) is None
    with pytest.raises(ValueError):
        usage.percentile_from_histogram([1] * 32, 0)


# --- the outcome's own rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "running", "billing": Billing.BILLED, "actual_micro_usd": 1},
        {"status": "failed", "billing": Billing.UNKNOWN, "actual_micro_usd": 0},
        {"status": "failed", "billing": Billing.BILLED, "actual_micro_usd": None},
        {"status": "failed", "billing": Billing.NOT_BILLED, "actual_micro_usd": 5},
        {"status": "failed", "billing": Billing.NOT_BILLED, "actual_micro_usd": 0, "billed_units": Decimal(1)},
        {"status": "succeeded", "billing": Billing.BILLED, "actual_micro_usd": -1},
        {"status": "succeeded", "billing": Billing.BILLED, "actual_micro_usd": 1, "error_class": "timeout"},
        {"status": "succeeded", "billing": Billing.BILLED, "actual_micro_usd": 1, "total_ms": -5},
    ],
)
def test_an_impossible_outcome_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AttemptOutcome(**fields)


def test_spend_mode_of_puts_only_live_attempts_in_live_money() -> None:
    assert usage.spend_mode_of("live") is SpendMode.LIVE
    for offline in ("emulator", "sandbox", ConnectionMode.EMULATOR, ConnectionMode.SANDBOX):
        assert usage.spend_mode_of(offline) is SpendMode.SIMULATED
    assert usage.spend_mode_of(ConnectionMode.LIVE) is SpendMode.LIVE
    with pytest.raises(ValueError):
        usage.spend_mode_of("simulated")  # a spend mode is not an attempt's mode
