"""Provider slots in one process, on SQLite and PostgreSQL: the statements and the async API.

(Races across processes and SIGKILL are in test_limits_processes.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Conflict, DatabaseUnavailable, ProviderError
from core.catalog import PROVIDERS
from core.generation import limits
from core.settings import ProviderSettings
from db.engine import transaction
from db.models import ProviderSlot, SlotWaiter, utcnow
from tests.dbfixtures import recorded_statements

Factory = sessionmaker[Session]
P = "ideogram"
A, B = 1, 2


def _take(factory: Factory, holder: str, user: int | None, limit: int, **kwargs: object) -> int | None:
    with transaction(factory) as session:
        limits.ensure_slots(session, P, limit)
        return limits.try_acquire(session, P, holder, user, limit, **kwargs)  # type: ignore[arg-type]


def _release(factory: Factory, holder: str) -> bool:
    with transaction(factory) as session:
        return limits.release(session, P, holder)


def _holders(factory: Factory) -> list[str]:
    with factory() as session:
        return [h for _, h, _, _ in limits.holders(session, P)]


def _waiters(factory: Factory) -> list[str]:
    with factory() as session:
        return [h for h, _ in limits.waiters(session, P)]


@pytest.fixture
def statements(db_engine: Engine) -> Iterator[list[str]]:
    with recorded_statements(db_engine) as seen:
        yield seen


# --- the catalog and the settings ---------------------------------------------------------------------------------


def test_ideogram_allows_ten_in_flight_and_settings_can_say_otherwise() -> None:
    assert PROVIDERS["ideogram"].max_in_flight == 10
    assert limits.effective_limit(None, "ideogram") == 10
    assert limits.effective_limit(ProviderSettings(provider="ideogram")) == 10
    assert limits.effective_limit(ProviderSettings(provider="ideogram", max_in_flight=4)) == 4
    assert limits.effective_limit(ProviderSettings(provider="fal-qwen")) is None  # fal queues over its cap
    assert limits.effective_limit(ProviderSettings(provider="fal-qwen", max_in_flight=2)) == 2
    # Unset, the field is left out of the stored form, so versions stored before it existed compare equal.
    assert "max_in_flight" not in ProviderSettings(provider="ideogram").model_dump(mode="json")
    with pytest.raises(ValueError):
        ProviderSettings(provider="ideogram", max_in_flight=0)


# --- statements -----------------------------------------------------------------------------------------------------


def test_slots_are_created_on_demand_once(db_session_factory: Factory) -> None:
    for limit in (3, 3, 5, 2):
        with transaction(db_session_factory) as session:
            limits.ensure_slots(session, P, limit)
    with db_session_factory() as session:
        numbers = session.scalars(select(ProviderSlot.slot_no).where(ProviderSlot.provider == P)).all()
    assert sorted(numbers) == [0, 1, 2, 3, 4]
    for bad in (0, -1, True, 1001):
        with pytest.raises(ValueError), transaction(db_session_factory) as session:
            limits.ensure_slots(session, P, bad)


def test_at_most_limit_holders_and_a_release_frees_one(db_session_factory: Factory) -> None:
    assert [_take(db_session_factory, f"h{i}", A, 3) for i in range(5)] == [0, 1, 2, None, None]
    assert _holders(db_session_factory) == ["h0", "h1", "h2"]
    assert _waiters(db_session_factory) == ["h3", "h4"]  # the refused ones queue
    assert _release(db_session_factory, "h1")
    assert not _release(db_session_factory, "h1")  # only once
    assert _take(db_session_factory, "h3", A, 3) == 1
    assert _waiters(db_session_factory) == ["h4"]  # a waiter that got its slot leaves the queue


def test_a_holder_never_holds_two_slots(db_session_factory: Factory) -> None:
    assert _take(db_session_factory, "once", A, 3) == 0
    assert _take(db_session_factory, "once", A, 3) is None  # a retried acquire (its answer was lost)
    assert _holders(db_session_factory) == ["once"]


def test_an_expired_lease_frees_the_slot_and_the_old_holder_cannot_renew_or_release_it(
    db_session_factory: Factory,
) -> None:
    past = utcnow() - timedelta(seconds=60)
    assert _take(db_session_factory, "dead", A, 1, lease_s=1, now=past) == 0
    assert _holders(db_session_factory) == []  # its lease is over
    assert _take(db_session_factory, "alive", B, 1) == 0
    with transaction(db_session_factory) as session:
        assert not limits.renew(session, P, "dead")
    assert not _release(db_session_factory, "dead")
    assert _holders(db_session_factory) == ["alive"]


def test_renew_extends_the_lease(db_session_factory: Factory) -> None:
    assert _take(db_session_factory, "h", A, 1, lease_s=5) == 0
    with db_session_factory() as session:
        ((_, _, _, first),) = limits.holders(session, P)
    with transaction(db_session_factory) as session:
        assert limits.renew(session, P, "h", lease_s=300)
    with db_session_factory() as session:
        ((_, _, _, renewed),) = limits.holders(session, P)
    assert renewed - first > timedelta(seconds=200)


def test_a_lowered_limit_never_hands_out_the_higher_slots(db_session_factory: Factory) -> None:
    assert [_take(db_session_factory, f"h{i}", A, 3) for i in range(3)] == [0, 1, 2]
    assert _release(db_session_factory, "h2")
    assert _take(db_session_factory, "new", A, 2) is None  # slot 2 is free, but only 0 and 1 exist now
    assert _release(db_session_factory, "h0")
    assert _take(db_session_factory, "new", A, 2) == 0


# --- fairness -------------------------------------------------------------------------------------------------------


def test_a_free_slot_goes_to_the_user_holding_fewest_not_to_the_oldest_waiter(db_session_factory: Factory) -> None:
    """User A runs 3 of 3 and has 20 more queued; user B queues 1 after them: the next free slot is B's."""
    assert [_take(db_session_factory, f"a-run-{i}", A, 3) for i in range(3)] == [0, 1, 2]
    for i in range(20):
        assert _take(db_session_factory, f"a-wait-{i}", A, 3) is None
    assert _take(db_session_factory, "b-wait", B, 3) is None
    assert _release(db_session_factory, "a-run-1")
    with db_session_factory() as session:
        assert limits.queue_position(session, P, "b-wait", B, 3) == (0, 1)
        assert limits.queue_position(session, P, "a-wait-0", A, 3) == (1, 1)
    for i in range(20):  # A's older requests ask first, and are refused
        assert _take(db_session_factory, f"a-wait-{i}", A, 3) is None
    assert _take(db_session_factory, "b-wait", B, 3) == 1
    # With B served, A's oldest waiter is next in line.
    assert _release(db_session_factory, "a-run-0")
    assert _take(db_session_factory, "a-wait-1", A, 3) is None
    assert _take(db_session_factory, "a-wait-0", A, 3) == 0


def test_with_limit_one_a_burst_cannot_keep_the_slot_from_another_user(db_session_factory: Factory) -> None:
    """Nobody holds anything at the moment a limit-1 slot is freed: the user served longest ago goes first."""
    assert _take(db_session_factory, "a-0", A, 1) == 0
    for i in range(1, 6):
        assert _take(db_session_factory, f"a-{i}", A, 1) is None
    assert _take(db_session_factory, "b-0", B, 1) is None
    served = ["a-0"]
    queue = [f"a-{i}" for i in range(1, 6)] + ["b-0"]
    while queue:
        assert _release(db_session_factory, served[-1])
        winners = [h for h in list(queue) if _take(db_session_factory, h, A if h.startswith("a") else B, 1) == 0]
        assert len(winners) == 1
        served.append(winners[0])
        queue.remove(winners[0])
    assert served[:3] == ["a-0", "b-0", "a-1"]  # B second, not after A's whole burst


def test_equal_users_are_served_oldest_first(db_session_factory: Factory) -> None:
    assert _take(db_session_factory, "x", 9, 1) == 0
    for user in (3, 4, 5):
        assert _take(db_session_factory, f"u{user}", user, 1) is None
    order = []
    holder = "x"
    for _ in range(3):
        assert _release(db_session_factory, holder)
        holder = next(
            h for h in ("u3", "u4", "u5") if h not in order and _take(db_session_factory, h, int(h[1]), 1) == 0
        )
        order.append(holder)
    assert order == ["u3", "u4", "u5"]


def test_a_dead_waiter_is_skipped_after_its_lease(db_session_factory: Factory) -> None:
    now = utcnow()
    assert _take(db_session_factory, "busy", A, 1, now=now) == 0
    assert _take(db_session_factory, "gone", B, 1, now=now) is None  # queued, then its process dies
    assert _take(db_session_factory, "late", 3, 1, now=now) is None
    assert _release(db_session_factory, "busy")
    assert _take(db_session_factory, "late", 3, 1, now=now) is None  # "gone" is still ahead of it
    later = now + timedelta(seconds=limits.WAITER_LEASE_S + 1)
    assert _take(db_session_factory, "late", 3, 1, now=later) == 0


def test_stale_waiter_rows_are_swept(db_session_factory: Factory) -> None:
    long_ago = utcnow() - timedelta(seconds=limits.STALE_WAITER_S * 2)
    assert _take(db_session_factory, "busy", A, 1) == 0
    assert _take(db_session_factory, "ghost", B, 1, now=long_ago) is None
    assert _take(db_session_factory, "recent", 3, 1) is None
    with transaction(db_session_factory) as session:
        assert limits.sweep_waiters(session) == 1
    with db_session_factory() as session:
        assert session.scalars(select(SlotWaiter.holder)).all() == ["recent"]


# --- the async API --------------------------------------------------------------------------------------------------


async def test_unlimited_does_no_database_work(db_session_factory: Factory, statements: list[str]) -> None:
    async with limits.provider_slot(db_session_factory, P, "h", A, None, time.monotonic() + 1) as slot:
        assert slot is None
    assert statements == []


async def test_provider_slot_holds_and_releases(db_session_factory: Factory) -> None:
    async with limits.provider_slot(db_session_factory, P, "h", A, 2, time.monotonic() + 10) as slot:
        assert slot is not None and slot.slot_no == 0 and slot.user_id == A
        assert _holders(db_session_factory) == ["h"]
    assert _holders(db_session_factory) == []
    with pytest.raises(RuntimeError):
        async with limits.provider_slot(db_session_factory, P, "h2", A, 2, time.monotonic() + 10):
            raise RuntimeError("the provider call failed")
    assert _holders(db_session_factory) == []


async def test_no_slot_within_the_deadline_is_a_clear_timeout(db_session_factory: Factory) -> None:
    assert _take(db_session_factory, "busy", A, 1) == 0
    with pytest.raises(limits.SlotTimeout) as caught:
        async with limits.provider_slot(db_session_factory, P, "late", B, 1, time.monotonic() + 0.3):
            pytest.fail("no slot was free")
    assert isinstance(caught.value, Conflict) and not isinstance(caught.value, ProviderError)
    assert "no slot within the deadline" in str(caught.value) and caught.value.provider == P
    assert _waiters(db_session_factory) == []  # it left the queue


async def test_a_waiter_gets_the_slot_when_it_is_released(db_session_factory: Factory) -> None:
    async with limits.provider_slot(db_session_factory, P, "first", A, 1, time.monotonic() + 10):
        waiting = asyncio.create_task(_hold(db_session_factory, "second", B, 1))
        await _until(lambda: _waiters(db_session_factory) == ["second"])
    slot = await waiting
    assert slot.slot_no == 0 and slot.waited_s > 0


async def _hold(factory: Factory, holder: str, user: int, limit: int) -> limits.HeldSlot:
    async with limits.provider_slot(factory, P, holder, user, limit, time.monotonic() + 30) as slot:
        assert slot is not None
        return slot


async def _until(condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_cancelling_a_waiter_leaves_no_row(db_session_factory: Factory) -> None:
    assert _take(db_session_factory, "busy", A, 1) == 0
    waiting = asyncio.create_task(_hold(db_session_factory, "impatient", B, 1))
    await _until(lambda: _waiters(db_session_factory) == ["impatient"])
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await _until(lambda: _waiters(db_session_factory) == [])


async def test_cancelling_a_holder_releases_its_slot(db_session_factory: Factory) -> None:
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with limits.provider_slot(db_session_factory, P, "doomed", A, 1, time.monotonic() + 10):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold_forever())
    await entered.wait()
    assert _holders(db_session_factory) == ["doomed"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _holders(db_session_factory) == []


async def test_a_held_slot_is_renewed_while_the_block_runs(db_session_factory: Factory) -> None:
    lease_s = 0.9
    async with limits.provider_slot(db_session_factory, P, "long", A, 1, time.monotonic() + 10, lease_s=lease_s):
        # A competitor waits three leases: without renewal it would take the slot after the first.
        with pytest.raises(limits.SlotTimeout):
            await _hold_within(db_session_factory, "competitor", B, 3 * lease_s)
        assert _holders(db_session_factory) == ["long"]


async def _hold_within(factory: Factory, holder: str, user: int, seconds: float) -> None:
    async with limits.provider_slot(factory, P, holder, user, 1, time.monotonic() + seconds):
        pass


async def test_async_fairness_b_gets_the_next_slot_ahead_of_a_burst(db_session_factory: Factory) -> None:
    """A holds 3 of 3 with 20 tasks waiting; B's one task waits too; when one of A's finishes, B is next."""
    order: list[str] = []
    release_a = [asyncio.Event() for _ in range(3)]

    async def run(holder: str, user: int, done: asyncio.Event | None) -> None:
        async with limits.provider_slot(db_session_factory, P, holder, user, 3, time.monotonic() + 60):
            order.append(holder)
            if done is not None:
                await done.wait()

    running = [asyncio.create_task(run(f"a-run-{i}", A, release_a[i])) for i in range(3)]
    await _until(lambda: len(order) == 3)
    burst = [asyncio.create_task(run(f"a-wait-{i}", A, None)) for i in range(20)]
    await _until(lambda: len(_waiters(db_session_factory)) == 20)
    late = asyncio.create_task(run("b", B, None))
    await _until(lambda: len(_waiters(db_session_factory)) == 21)
    release_a[0].set()
    await _until(lambda: len(order) >= 4)
    assert order[3] == "b"
    for done in release_a[1:]:
        done.set()
    await asyncio.gather(*running, *burst, late)
    assert sorted(order[4:]) == sorted(f"a-wait-{i}" for i in range(20))
    assert _holders(db_session_factory) == [] and _waiters(db_session_factory) == []


async def test_a_failed_release_never_hides_the_blocks_outcome(
    db_session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(*_args: object) -> None:
        raise DatabaseUnavailable("cannot reach the database")

    monkeypatch.setattr(limits, "_release", database_gone)
    with pytest.raises(RuntimeError, match="the provider's own error"):
        async with limits.provider_slot(db_session_factory, P, "h", A, 1, time.monotonic() + 10, lease_s=1):
            raise RuntimeError("the provider's own error")
    assert _holders(db_session_factory) == ["h"]  # still leased: it comes back when the lease lapses
    with transaction(db_session_factory) as session:
        assert limits.try_acquire(session, P, "next", B, 1, now=utcnow() + timedelta(seconds=2)) == 0
