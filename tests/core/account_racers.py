"""The racers of test_races_accounts, in a module of their own: each spawned process imports only this (and
what it needs), not pytest and the fixtures, so sixteen of them start quickly. The trials run on
tests/racing.py's harness, shared with the other races.

Each racer runs core.users' guarded code, or with `naive` the read-then-write version it replaced (below, test
helpers only: they show that the races' checks can fail)."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked, ImagegateError, InvalidInput
from core import users
from core.security import Actor, Role, verify_dummy, verify_password
from db.engine import make_engine, session_factory, transaction
from db.models import User, utcnow
from tests.racing import run_trials

WRONG = "a wrong guess!"
NAIVE_ADMIN_PAUSE_S = 0.01
"""The naive last-admin change's pause between its count and its write: the audit row, a network hop or a GC
pause of a real change. The two racers are single processes released by one barrier, so their counts land as
far apart as the scheduler puts them, which on this shared 2-core machine (load average up to 15) can be longer
than the bare count-then-write takes. Measured over 3 runs of 12 trials: with no pause no admin was left in
36/36 trials on SQLite and 33/36 on PostgreSQL; with 10 ms in 36/36 on both."""


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]


# --- the naive versions core.users replaced (test helpers only: they show the checks can fail) ------------------


def naive_remove_admin(session: Session, target: int, demote: bool) -> None:
    """Count the other active admins, then demote or deactivate `target` if there is one: two steps, no lock.
    Two removals that count at the same moment each see the other admin, and both go through."""
    others = session.scalar(
        select(func.count()).select_from(User).where(User.role == Role.ADMIN, User.active.is_(True), User.id != target)
    )
    time.sleep(NAIVE_ADMIN_PAUSE_S)  # any work between the count and the write (see NAIVE_ADMIN_PAUSE_S)
    if not others:
        raise InvalidInput("the last active admin cannot be removed")
    change: dict[str, object] = {"role": Role.USER} if demote else {"active": False}
    session.execute(update(User).where(User.id == target).values(change).execution_options(synchronize_session=False))


def naive_authenticate(factory: sessionmaker[Session], username: str, password: str) -> bool:
    """Read the count of wrong passwords, compare it with the limit, verify the password, then write count + 1
    (locking at the limit). Guesses that read the same count are all verified, and their writes overwrite each
    other's: the count stays low and the account is not locked. True if the password was right."""
    with factory() as session:
        row = session.execute(
            select(User.id, User.password_hash, User.failed_sign_ins, User.locked_until).where(
                User.username == username
            )
        ).one_or_none()
    if row is None:
        verify_dummy(password)
        return False
    now = utcnow()
    if (row.locked_until is not None and row.locked_until > now) or row.failed_sign_ins >= users.MAX_FAILED_SIGN_INS:
        raise AccountLocked("too many wrong passwords", row.locked_until or now)
    ok, _new_hash = verify_password(row.password_hash, password)  # slow (argon2): the window stays open meanwhile
    with transaction(factory) as session:
        if ok:
            values: dict[str, object] = {"failed_sign_ins": 0, "locked_until": None}
        else:
            count = row.failed_sign_ins + 1
            locks = count >= users.MAX_FAILED_SIGN_INS
            values = {"failed_sign_ins": count, "locked_until": now + users.SIGN_IN_LOCK if locks else None}
        session.execute(
            update(User).where(User.id == row.id).values(values).execution_options(synchronize_session=False)
        )
    return ok


# --- the racers ------------------------------------------------------------------------------------------------


def change_admin(factory: sessionmaker[Session], plan: str, index: int, ids: tuple[int, int], naive: bool) -> str:
    """One racer's change in one trial.

    demote / deactivate: the system (CLI) demotes or deactivates admin `index`;
    crossed: admin `index`, acting as themselves, demotes (0) or deactivates (1) the other admin.
    With `naive`, the same change by `naive_remove_admin` instead of core.users."""
    try:
        with transaction(factory) as session:
            if naive:
                target = ids[1 - index] if plan == "crossed" else ids[index]
                demote = plan == "demote" or (plan == "crossed" and index == 0)
                naive_remove_admin(session, target, demote)
            elif plan == "crossed":
                me = users.get_user(session, ids[index]).actor()
                other = ids[1 - index]
                if index == 0:
                    users.set_role(session, me, other, Role.USER)
                else:
                    users.set_active(session, me, other, False)
            elif plan == "demote":
                users.set_role(session, Actor.system("cli:racer"), ids[index], Role.USER)
            else:
                users.set_active(session, Actor.system("cli:racer"), ids[index], False)
        return "changed"
    except ImagegateError as exc:  # refused: last admin, or no longer an admin
        return f"refused: {first_line(exc)}"
    except Exception as exc:  # a deadlock or any other failure is a bug; the parent reports it
        return f"error: {first_line(exc)}"


def admin_racer(
    url: str,
    ids: tuple[int, int],
    plans: list[str],
    naive: bool,
    index: int,
    start: Barrier,
    done: Barrier,
    out: Queue[Any],
) -> None:
    """One trial per plan: this racer's change (see `change_admin`), reported as its outcome."""
    engine = make_engine(url)
    factory = session_factory(engine)
    try:
        run_trials(len(plans), start, done, out, lambda trial: change_admin(factory, plans[trial], index, ids, naive))
    finally:
        engine.dispose()


def try_wrong_password(factory: sessionmaker[Session], username: str, naive: bool = False) -> str:
    """One wrong password, through core.users (or `naive_authenticate`); its outcome."""
    try:
        if naive:
            signed_in = naive_authenticate(factory, username, WRONG)
        else:
            signed_in = users.authenticate(factory, username, WRONG) is not None
    except AccountLocked:
        return "locked"
    except Exception as exc:
        return f"error: {first_line(exc)}"
    return "signed in" if signed_in else "verified, wrong"


def guesser(url: str, username: str, naive: bool, start: Barrier, done: Barrier, out: Queue[Any]) -> None:
    """One trial: one wrong password, at the same moment as the other guessers; reported as its outcome."""
    engine = make_engine(url)
    try:
        factory = session_factory(engine)
        with factory() as session:  # connect before the barrier: connecting inside the race spreads its start
            session.execute(select(1))
        run_trials(1, start, done, out, lambda _trial: try_wrong_password(factory, username, naive))
    finally:
        engine.dispose()
