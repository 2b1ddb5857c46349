"""The racers of test_races_accounts, in a module of their own: each spawned process imports only this (and
what it needs), not pytest and the fixtures, so sixteen of them start quickly. The trials run on
tests/racing.py's harness, shared with the other races."""

from __future__ import annotations

from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from common.errors import AccountLocked, ImagegateError
from core import users
from core.security import Actor, Role
from db.engine import make_engine, session_factory, transaction
from tests.racing import run_trials

WRONG = "a wrong guess!"


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]


def change_admin(factory: sessionmaker[Session], plan: str, index: int, ids: tuple[int, int]) -> str:
    """One racer's change in one trial.

    demote / deactivate: the system (CLI) demotes or deactivates admin `index`;
    crossed: admin `index`, acting as themselves, demotes (0) or deactivates (1) the other admin."""
    try:
        with transaction(factory) as session:
            if plan == "crossed":
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
    url: str, ids: tuple[int, int], plans: list[str], index: int, start: Barrier, done: Barrier, out: Queue[Any]
) -> None:
    """One trial per plan: this racer's change (see `change_admin`), reported as its outcome."""
    engine = make_engine(url)
    factory = session_factory(engine)
    try:
        run_trials(len(plans), start, done, out, lambda trial: change_admin(factory, plans[trial], index, ids))
    finally:
        engine.dispose()


def try_wrong_password(factory: sessionmaker[Session], username: str) -> str:
    try:
        user = users.authenticate(factory, username, WRONG)
    except AccountLocked:
        return "locked"
    except Exception as exc:
        return f"error: {first_line(exc)}"
    return "signed in" if user is not None else "verified, wrong"


def guesser(url: str, username: str, start: Barrier, done: Barrier, out: Queue[Any]) -> None:
    """One trial: one wrong password, at the same moment as the other guessers; reported as its outcome."""
    engine = make_engine(url)
    try:
        factory = session_factory(engine)
        run_trials(1, start, done, out, lambda _trial: try_wrong_password(factory, username))
    finally:
        engine.dispose()
