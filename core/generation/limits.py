"""Per-provider concurrency limits that hold across processes and machines, fair between users.

Ideogram allows 10 requests in flight per account, whichever process sends them; so the slots are rows in the
shared database (`provider_slots`), not a semaphore in one process.

Public API (async code goes through core.generation.dbexec; the event loop never waits on the database):
- `async with provider_slot(factory, provider, holder, user_id, limit, deadline) as slot:` waits for one of
  `provider`'s `limit` slots until `deadline` (a `time.monotonic()` instant), holds it (renewing its lease in
  the background) for the block, and releases it on the way out, also on an exception or a cancellation.
  `slot` is a `HeldSlot`, or None when `limit` is None (unlimited: no database work at all).
  Raises `SlotTimeout` (a `Conflict`: busy, try later; not a ProviderError, nothing was sent or billed) when no
  slot came free in time.
- `effective_limit(settings, provider) -> int | None`: the limit for a provider (its settings' `max_in_flight`, else the
  catalog's `ProviderSpec.max_in_flight`; None = unlimited).
- Synchronous building blocks, one short transaction each (the worker and tests use them directly):
  `ensure_slots`, `try_acquire`, `queue_position`, `renew`, `release`, `leave_queue`, `sweep_waiters`,
  `holders`, `waiters`.

Rules, each ONE guarded statement:
- Slots are created on demand: `INSERT ... ON CONFLICT DO NOTHING` of slot numbers 0..limit-1. A lowered limit
  takes effect as the higher-numbered slots are released (they are never handed out again).
- Acquire: one UPDATE takes a slot that is free or whose lease expired (a dead holder's slot comes back after
  its lease) if (a) the holder holds no slot of this provider already, and (b) fewer live waiters are ahead of
  it in the fairness order than there are free slots. PostgreSQL picks the slot with a sub-select
  `FOR UPDATE SKIP LOCKED` (two acquirers never take, or wait on, the same row); SQLite's single writer lock
  serialises the whole transaction. At most `limit` holders at once follows from the rows alone: whatever the
  fairness test says, one slot row has one holder.
- Release and renew: UPDATE ... WHERE provider AND holder (a holder whose lease lapsed and whose slot was taken
  over releases nothing and learns its renewal failed).

Fairness (decided here): every acquirer is a waiter (`slot_waiters`, renewed while it polls; a dead waiter is
ignored once its short lease lapses). The order is: the user holding the fewest live slots of this provider
first; among equals, the user whose last slot was granted longest ago (never = first; a released slot keeps
its last user and grant time for this), then the oldest waiter (id). The last-grant rule is what stops a burst
from one user going first again and again when the limit is small (with limit 1 nobody holds anything at the
moment of a decision). A waiter may take a slot only while its rank in that order is below the number of free
slots, so one user's 20 queued requests cannot starve another user's one: user B holding nothing gets the
next free slot ahead of user A's queue whenever A holds one or more slots, or got one more recently.
Waiters poll: first at once (a write that registers them), then they look with a read (free slots and their
rank) and write only when they may take a slot or must renew their waiter lease. A waiter that needs k more
grants before its turn looks again after about k x 5 ms (at most 250 ms, jittered): the head of the line looks
every 5 ms, so a slot freed in another process is not left idle while the waiter it is kept for sleeps, and a
queue of N costs about 200 x ln(N) reads per second. A release in the same process wakes that process's
waiters near the head of the line at once. Each look or attempt costs O(waiters + slots) of the provider.

Times come from the application's clock (`db.models.utcnow`), like every lease in this schema; machines that
share a database are expected to keep their clocks in sync (NTP), and the leases (30 s by default) dwarf
ordinary skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Integer, String, Table, and_, bindparam, case, delete, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Conflict
from core.catalog import PROVIDERS
from core.generation import dbexec
from core.settings import ProviderSettings
from db.engine import transaction
from db.models import ProviderSlot, SlotWaiter, UTCDateTime, utcnow

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
"""A held slot's lease; renewed every third of it while the block runs. A killed holder's slot is back after it."""
WAITER_LEASE_S = 3.0
"""A waiter that stops polling (its process died) is skipped after this; a live one renews well before."""
WAITER_RENEW_S = 1.0
POLL_MIN_S = 0.005
POLL_NEAR_S = 0.020
"""The longest pause of a waiter whose place in line is unknown (its write lost a race)."""
POLL_PER_PLACE_S = 0.005
"""A waiter that needs k more grants before its turn looks again after about k x this: the head of the line
looks every 5 ms (a slot freed in another process is taken within about that; a release in the same process
wakes its nearest waiters at once), the 10th every 50 ms, so a queue of N costs about 200 x ln(N) reads/s."""
POLL_MAX_S = 0.250
STALE_WAITER_S = 60.0
"""Waiter rows expired this long ago are deleted (by a release or by the worker's sweep)."""
MAX_LIMIT = 1000
_NO_USER = 0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_slots = cast(Table, ProviderSlot.__table__)
_waiters = cast(Table, SlotWaiter.__table__)


class SlotTimeout(Conflict):
    """No slot of the provider came free before the deadline. Nothing was sent to the provider and nothing was
    billed; the caller may try another provider or later."""

    def __init__(self, provider: str, limit: int, waited_s: float) -> None:
        self.provider = provider
        self.limit = limit
        self.waited_s = waited_s
        super().__init__(
            f"{provider}: no slot within the deadline: all {limit} allowed in flight stayed busy for "
            f"{waited_s:.1f} s (other requests hold them); try again later or another provider"
        )


@dataclass
class HeldSlot:
    """One slot held by `holder`."""

    provider: str
    holder: str
    user_id: int
    slot_no: int
    limit: int
    lease_s: float
    acquired_at: datetime
    waited_s: float
    lost: bool = False
    """Set when a renewal found the slot taken over (this process stalled past the lease)."""


def effective_limit(settings: ProviderSettings | None, provider: str | None = None) -> int | None:
    """The provider's concurrency limit: the settings' `max_in_flight` if set, else the catalog's; None =
    unlimited."""
    if settings is not None and settings.max_in_flight is not None:
        return settings.max_in_flight
    spec = PROVIDERS.get(settings.provider if settings is not None else provider or "")
    return None if spec is None else spec.max_in_flight


# --- statements ------------------------------------------------------------------------------------------------


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"a concurrency limit is a whole number from 1 to {MAX_LIMIT}, not {limit!r}")


def _user(user_id: int | None) -> int:
    return _NO_USER if user_id is None else user_id


# Built once with bind parameters (:p provider, :h holder, :u user id, :lim limit, :at now, :until lease end):
# building these expressions costs far more than running them, and equal statements hit the compiled cache.
_P = bindparam("p", type_=String())
_H = bindparam("h", type_=String())
_U = bindparam("u", type_=Integer())
_LIM = bindparam("lim", type_=Integer())
_AT = bindparam("at", type_=UTCDateTime())
_UNTIL = bindparam("until", type_=UTCDateTime())
_EPOCH_AT = literal(_EPOCH, UTCDateTime())


def _free(table: Any) -> Any:
    return and_(
        table.c.provider == _P,
        table.c.slot_no < _LIM,
        or_(table.c.holder.is_(None), table.c.lease_until < _AT),
    )


def _rank_and_free() -> tuple[Any, Any]:
    """Scalar sub-selects: live waiters ahead of :h in the fairness order, and free slots."""
    per_user_slots = _slots.alias("per_user_slots")
    live = and_(per_user_slots.c.holder.is_not(None), per_user_slots.c.lease_until >= _AT)
    users = (
        select(
            per_user_slots.c.user_id.label("user_id"),
            func.sum(case((live, 1), else_=0)).label("held"),
            func.max(per_user_slots.c.acquired_at).label("last_grant"),
        )
        .where(per_user_slots.c.provider == _P)
        .group_by(per_user_slots.c.user_id)
        .subquery("users")
    )
    mine_slots = _slots.alias("mine_slots")
    my_held = (
        select(func.count())
        .select_from(mine_slots)
        .where(
            mine_slots.c.provider == _P,
            mine_slots.c.user_id == _U,
            mine_slots.c.holder.is_not(None),
            mine_slots.c.lease_until >= _AT,
        )
        .scalar_subquery()
    )
    my_last = (
        select(func.coalesce(func.max(mine_slots.c.acquired_at), _EPOCH_AT))
        .where(mine_slots.c.provider == _P, mine_slots.c.user_id == _U)
        .scalar_subquery()
    )
    me = _waiters.alias("me")
    my_id = select(me.c.id).where(me.c.holder == _H).scalar_subquery()
    other = _waiters.alias("other")
    held = func.coalesce(users.c.held, 0)
    last = func.coalesce(users.c.last_grant, _EPOCH_AT)
    ahead = (
        select(func.count())
        .select_from(other.outerjoin(users, users.c.user_id == other.c.user_id))
        .where(
            other.c.provider == _P,
            other.c.lease_until >= _AT,
            other.c.holder != _H,
            or_(
                held < my_held,
                and_(held == my_held, last < my_last),
                and_(held == my_held, last == my_last, other.c.id < my_id),
            ),
        )
        .scalar_subquery()
    )
    free_slots = _slots.alias("free_slots")
    free = select(func.count()).select_from(free_slots).where(_free(free_slots)).scalar_subquery()
    return ahead, free


def _acquire_statement() -> Any:
    ahead, free = _rank_and_free()
    candidate = _slots.alias("candidate")
    pick = (
        select(candidate.c.slot_no)
        .where(_free(candidate))
        .order_by(candidate.c.slot_no)
        .limit(1)
        .with_for_update(skip_locked=True)  # PostgreSQL only; SQLite renders nothing
        .scalar_subquery()
    )
    already = _slots.alias("already")
    holds_one = select(already.c.slot_no).where(already.c.provider == _P, already.c.holder == _H).exists()
    return (
        update(_slots)
        .where(
            _slots.c.provider == _P,
            _slots.c.slot_no == pick,
            or_(_slots.c.holder.is_(None), _slots.c.lease_until < _AT),
            ~holds_one,
            ahead < free,
        )
        .values(holder=_H, user_id=_U, lease_until=_UNTIL, acquired_at=_AT)
        .returning(_slots.c.slot_no)
    )


def _look_statement() -> Any:
    ahead, free = _rank_and_free()
    return select(ahead, free)


def _enqueue_statement(insert: Any) -> Any:
    statement = insert(_waiters).values(provider=_P, holder=_H, user_id=_U, enqueued_at=_AT, lease_until=_UNTIL)
    return statement.on_conflict_do_update(
        index_elements=["holder"],
        set_={
            "provider": statement.excluded.provider,
            "user_id": statement.excluded.user_id,
            "lease_until": statement.excluded.lease_until,
        },
    )


_ACQUIRE = _acquire_statement()
_LOOK = _look_statement()
_ENQUEUE = {"postgresql": _enqueue_statement(pg_insert), "sqlite": _enqueue_statement(sqlite_insert)}
_LEAVE = delete(_waiters).where(_waiters.c.holder == _H)


def _insert_for(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def ensure_slots(session: Session, provider: str, limit: int) -> None:
    """Create the provider's slots 0..limit-1 that do not exist yet (racing creators cannot collide)."""
    _check_limit(limit)
    rows = [{"provider": provider, "slot_no": n} for n in range(limit)]
    insert = _insert_for(session)
    session.execute(insert(_slots).values(rows).on_conflict_do_nothing(index_elements=["provider", "slot_no"]))


def _enqueue(session: Session, provider: str, holder: str, user_id: int, now: datetime) -> None:
    """Register (or renew) the waiter; a renewal keeps its id, so it keeps its place."""
    statement = _ENQUEUE["postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"]
    until = now + timedelta(seconds=WAITER_LEASE_S)
    session.execute(statement, {"p": provider, "h": holder, "u": user_id, "at": now, "until": until})


def try_acquire(
    session: Session,
    provider: str,
    holder: str,
    user_id: int | None,
    limit: int,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    now: datetime | None = None,
) -> int | None:
    """One attempt, in the caller's transaction: register `holder` as a waiter (or renew it), then take a
    free slot if the fairness order lets it (module docstring); returns the slot number, or None. On success
    the waiter row is gone. The slots must exist (`ensure_slots`)."""
    _check_limit(limit)
    at = now or utcnow()
    user = _user(user_id)
    # The first statement writes: SQLite takes its write lock here, so the rest of the attempt is serialised.
    _enqueue(session, provider, holder, user, at)
    params = {"p": provider, "h": holder, "u": user, "lim": limit, "at": at, "until": at + timedelta(seconds=lease_s)}
    slot_no: int | None = session.execute(_ACQUIRE, params).scalar_one_or_none()
    if slot_no is not None:
        session.execute(_LEAVE, {"h": holder})
    return slot_no


def queue_position(session: Session, provider: str, holder: str, user_id: int | None, limit: int) -> tuple[int, int]:
    """A read-only look: (live waiters ahead of `holder` in the fairness order, free slots). The waiter may
    take a slot when ahead < free; the guarded UPDATE checks that again, so a look only saves a write."""
    params = {"p": provider, "h": holder, "u": _user(user_id), "lim": limit, "at": utcnow()}
    row = session.execute(_LOOK, params).one()
    return int(row[0]), int(row[1])


_RENEW = update(_slots).where(_slots.c.provider == _P, _slots.c.holder == _H).values(lease_until=_UNTIL)
_RELEASE = update(_slots).where(_slots.c.provider == _P, _slots.c.holder == _H).values(holder=None, lease_until=None)
_STALE_WAITERS = delete(_waiters).where(_waiters.c.provider == _P, _waiters.c.lease_until < _AT)


def renew(session: Session, provider: str, holder: str, *, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Extend the holder's lease; False when it no longer holds a slot (its lease lapsed and it was taken)."""
    until = utcnow() + timedelta(seconds=lease_s)
    result = session.execute(_RENEW, {"p": provider, "h": holder, "until": until})
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, provider: str, holder: str) -> bool:
    """Give the holder's slot back; False when it held none. The row keeps its last user and grant time (the
    fairness order reads them). Also deletes this provider's long-expired waiter rows."""
    result = session.execute(_RELEASE, {"p": provider, "h": holder})
    session.execute(_STALE_WAITERS, {"p": provider, "at": utcnow() - timedelta(seconds=STALE_WAITER_S)})
    return bool(result.rowcount)  # type: ignore[attr-defined]


def leave_queue(session: Session, holder: str) -> None:
    """Stop waiting (timeout, cancellation)."""
    session.execute(_LEAVE, {"h": holder})


def sweep_waiters(session: Session) -> int:
    """Delete waiter rows whose process died long ago (the worker's periodic clean-up); returns how many."""
    cutoff = utcnow() - timedelta(seconds=STALE_WAITER_S)
    return int(session.execute(delete(_waiters).where(_waiters.c.lease_until < cutoff)).rowcount)  # type: ignore[attr-defined]


def holders(session: Session, provider: str) -> list[tuple[int, str, int, datetime]]:
    """Live holders of the provider's slots: (slot number, holder, user id, lease until)."""
    now = utcnow()
    query = (
        select(ProviderSlot.slot_no, ProviderSlot.holder, ProviderSlot.user_id, ProviderSlot.lease_until)
        .where(ProviderSlot.provider == provider, ProviderSlot.holder.is_not(None), ProviderSlot.lease_until >= now)
        .order_by(ProviderSlot.slot_no)
    )
    return [(n, str(h), int(u or 0), until) for n, h, u, until in session.execute(query).tuples() if until]


def waiters(session: Session, provider: str) -> list[tuple[str, int]]:
    """Live waiters of the provider, oldest first: (holder, user id)."""
    query = (
        select(SlotWaiter.holder, SlotWaiter.user_id)
        .where(SlotWaiter.provider == provider, SlotWaiter.lease_until >= utcnow())
        .order_by(SlotWaiter.id)
    )
    return [(h, u) for h, u in session.execute(query).tuples()]


# --- in-process wake-ups ---------------------------------------------------------------------------------------

_wake_lock = threading.Lock()
_sleepers: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}


def _wake(provider: str) -> None:
    """A slot of `provider` was released here: let this process's waiters look at once (any event loop)."""
    with _wake_lock:
        sleepers = list(_sleepers.get(provider, ()))
    for loop, event in sleepers:
        with contextlib.suppress(RuntimeError):  # that loop is closed
            loop.call_soon_threadsafe(event.set)


async def _sleep_or_wake(provider: str, seconds: float, *, wakeable: bool) -> None:
    """Sleep `seconds`, or less when a slot of `provider` is released in this process and `wakeable` (only the
    waiters near the head of the line: waking all of them would only make them all look, and all but one wait
    again)."""
    if not wakeable:
        await asyncio.sleep(seconds)
        return
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    entry = (loop, event)
    with _wake_lock:
        _sleepers.setdefault(provider, set()).add(entry)
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        pass
    finally:
        with _wake_lock:
            entries = _sleepers.get(provider)
            if entries is not None:
                entries.discard(entry)
                if not entries:
                    del _sleepers[provider]


# --- the async API ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    slot_no: int | None
    grants_before_turn: int | None
    """When the look said "not yet": how many more slots must be granted before this waiter's turn (its rank
    minus the free slots, plus one). None when unknown (the write lost a race)."""


def _attempt(
    factory: sessionmaker[Session],
    provider: str,
    holder: str,
    user_id: int,
    limit: int,
    lease_s: float,
    look_first: bool,
) -> _Outcome:
    """One poll. The first (look_first False) also creates missing slots, in the same transaction: an insert
    that finds them all there costs a few index probes, and no process-wide memory of "created" can go stale
    (a database emptied or replaced under a long-lived process)."""
    if look_first:
        with factory() as session:
            ahead, free = queue_position(session, provider, holder, user_id, limit)
        if ahead >= free:
            return _Outcome(None, ahead - free + 1)
    with transaction(factory) as session:
        if not look_first:
            ensure_slots(session, provider, limit)
        return _Outcome(try_acquire(session, provider, holder, user_id, limit, lease_s=lease_s), None)


def _renew_waiter(factory: sessionmaker[Session], provider: str, holder: str, user_id: int) -> None:
    with transaction(factory) as session:
        _enqueue(session, provider, holder, user_id, utcnow())


def _leave(factory: sessionmaker[Session], holder: str) -> None:
    with transaction(factory) as session:
        leave_queue(session, holder)


def _release(factory: sessionmaker[Session], provider: str, holder: str) -> None:
    with transaction(factory) as session:
        release(session, provider, holder)


def _renew(factory: sessionmaker[Session], provider: str, holder: str, lease_s: float) -> bool:
    with transaction(factory) as session:
        return renew(session, provider, holder, lease_s=lease_s)


def _give_back(factory: sessionmaker[Session], provider: str, holder: str) -> Callable[[_Outcome], None]:
    """What a cancelled acquirer leaves behind: its slot if the attempt took one, else its waiter row."""

    def cleanup(outcome: _Outcome) -> None:
        if outcome.slot_no is not None:
            _release(factory, provider, holder)
            _wake(provider)
        else:
            _leave(factory, holder)

    return cleanup


async def acquire(
    factory: sessionmaker[Session],
    provider: str,
    holder: str,
    user_id: int | None,
    limit: int,
    deadline: float,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    clock: Callable[[], float] = time.monotonic,
) -> HeldSlot:
    """Wait for a slot until `deadline` (on `clock`, `time.monotonic()` by default); the caller must `release`
    it (`provider_slot` does). Raises SlotTimeout. A cancellation leaves nothing behind."""
    _check_limit(limit)
    if lease_s <= 0:
        raise ValueError("lease_s must be positive")
    user = _user(user_id)
    started = clock()
    pause = POLL_MIN_S / 2
    look_first = False  # the first attempt writes at once: it registers the waiter
    renewed_at = clock()
    cleanup = _give_back(factory, provider, holder)
    while True:
        future = dbexec.submit(_attempt, factory, provider, holder, user, limit, lease_s, look_first)
        outcome = await dbexec.finish_even_if_cancelled(future, cleanup)
        if outcome.slot_no is not None:
            return HeldSlot(
                provider=provider,
                holder=holder,
                user_id=user,
                slot_no=outcome.slot_no,
                limit=limit,
                lease_s=lease_s,
                acquired_at=utcnow(),
                waited_s=clock() - started,
            )
        remaining = deadline - clock()
        if remaining <= 0:
            try:
                await _run_to_end(dbexec.submit(_leave, factory, holder))
            except Exception:  # the waiter row is ignored once its lease lapses; the timeout is the news
                log.warning("could not remove the %s waiter %s", provider, holder, exc_info=True)
            raise SlotTimeout(provider, limit, clock() - started)
        # Look again about when this waiter's turn may have come (module docstring): often near the head of the
        # line, rarely far back, so a long queue stays cheap and a freed slot does not wait for a sleeper.
        places = outcome.grants_before_turn
        if places is None:
            pause = min(pause * 2, POLL_NEAR_S)
        else:
            pause = min(max(POLL_PER_PLACE_S * places, POLL_MIN_S), POLL_MAX_S)
        near = places is None or places <= limit
        try:
            await _sleep_or_wake(provider, min(remaining, pause * random.uniform(0.8, 1.2)), wakeable=near)
        except asyncio.CancelledError:
            dbexec.submit(_leave, factory, holder)
            raise
        look_first = True
        if clock() - renewed_at >= WAITER_RENEW_S:
            # A read-only look does not renew the waiter; keep its place while it waits.
            renewal = dbexec.submit(_renew_waiter, factory, provider, holder, user)
            await dbexec.finish_even_if_cancelled(renewal, lambda _: _leave(factory, holder))
            renewed_at = clock()


async def _run_to_end(future: Any) -> None:
    """Await work that must finish even if this task is cancelled meanwhile (it keeps running regardless)."""
    await asyncio.shield(asyncio.wrap_future(future))


async def release_slot(factory: sessionmaker[Session], slot: HeldSlot) -> None:
    """Give the slot back (the work runs to its end even if the caller is cancelled meanwhile). A database
    failure here is logged, not raised: it must not hide the outcome of the block (a provider's answer, or its
    error), and the slot comes back by itself when its lease lapses."""
    try:
        await _run_to_end(dbexec.submit(_release, factory, slot.provider, slot.holder))
    except Exception:
        log.warning(
            "could not release the %s slot of %s; it comes back when its lease lapses (%.0f s)",
            slot.provider,
            slot.holder,
            slot.lease_s,
            exc_info=True,
        )
    finally:
        _wake(slot.provider)


async def _keep_renewed(factory: sessionmaker[Session], slot: HeldSlot) -> None:
    interval = slot.lease_s / 3
    while True:
        await asyncio.sleep(interval)
        try:
            held = await dbexec.run_db(_renew, factory, slot.provider, slot.holder, slot.lease_s)
        except Exception:  # a database blip: the lease has two more intervals to go; try again next time
            log.warning("could not renew the %s slot of %s", slot.provider, slot.holder, exc_info=True)
            continue
        if not held:
            slot.lost = True
            log.warning(
                "%s lost its %s slot: its lease lapsed before it was renewed (the process stalled?)",
                slot.holder,
                slot.provider,
            )
            return


@asynccontextmanager
async def provider_slot(
    factory: sessionmaker[Session],
    provider: str,
    holder: str,
    user_id: int | None,
    limit: int | None,
    deadline: float,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[HeldSlot | None]:
    """Hold one of `provider`'s `limit` slots for the block (None = unlimited: yields None, no database work).
    `holder` must be unique per acquisition (the attempt's id); `user_id` None = no user (all such requests
    share one place in the fairness order)."""
    if limit is None:
        yield None
        return
    slot = await acquire(factory, provider, holder, user_id, limit, deadline, lease_s=lease_s, clock=clock)
    renewer = asyncio.create_task(_keep_renewed(factory, slot), name=f"renew {provider} slot {holder}")
    try:
        yield slot
    finally:
        # Not awaited: a renewal already running in a thread may land before or after the release; after it,
        # it matches no row (the holder is gone), before it, the release clears it anyway.
        renewer.cancel()
        await release_slot(factory, slot)
