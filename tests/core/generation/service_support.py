"""Helpers for the generation service's tests (test_service, test_recovery, test_fallback_faults, the CLI's):
the emulator on a free port, seeded settings, budgets, and what the ledger and the budgets say afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core import settings_service
from core.generation import budgets
from core.security import Actor
from core.seed import seed_defaults
from db.engine import transaction
from db.models import (
    BudgetReservation,
    Generation,
    ReservationStatus,
    Role,
    SpendMode,
    StoredImage,
    UsageAttempt,
    UsageDailyRollup,
    User,
)
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app

SYSTEM = Actor.system("tests")


@contextmanager
def running_emulator() -> Iterator[tuple[BackgroundServer, FaultBoard]]:
    board = FaultBoard()
    with serve_in_thread(create_emulator_app(board)) as server:
        yield server, board


def seed(
    factory: sessionmaker[Session], *, global_changes: dict[str, Any] | None = None, timeout_s: float | None = None
) -> None:
    """Default settings and prices, retries quick (tests wait for backoffs), attempts bounded by `timeout_s`."""
    seed_defaults(factory)
    with transaction(factory) as session:
        current = settings_service.get_global_settings(session).settings
        data = settings_service.settings_json(current)
        data.update({"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2, **(global_changes or {})})
        settings_service.save_global_settings(session, SYSTEM, data)
        if timeout_s is not None:
            for provider in ("fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"):
                settings_service.update_provider_settings(session, SYSTEM, provider, {"request_timeout_s": timeout_s})


def make_user(factory: sessionmaker[Session], name: str, role: Role = Role.USER) -> Actor:
    """A new account (a USER unless told), acting as itself: its role is read from the database by core."""
    with transaction(factory) as session:
        user = User(username=name, password_hash="not-a-real-hash", role=role)
        session.add(user)
        session.flush()
        return Actor(user_id=user.id, username=name)


def update_provider(factory: sessionmaker[Session], provider: str, **changes: Any) -> None:
    with transaction(factory) as session:
        settings_service.update_provider_settings(session, SYSTEM, provider, changes)


def make_budget(
    factory: sessionmaker[Session],
    *,
    name: str = "team",
    limit_micro_usd: int = 10_000_000,
    scope: str = "global",
    scope_id: str | int | None = None,
    period: str = "monthly",
    hard: bool = True,
    degrade_action: str | None = None,
) -> int:
    with transaction(factory) as session:
        return budgets.create_budget(
            session,
            SYSTEM,
            name=name,
            scope=scope,
            period=period,
            limit_micro_usd=limit_micro_usd,
            scope_id=scope_id,
            hard=hard,
            degrade_action=degrade_action,
        ).id


@dataclass(frozen=True)
class Figures:
    spent: int
    reserved: int


def figures(factory: sessionmaker[Session], budget_id: int, mode: SpendMode | str) -> Figures:
    with factory() as session:
        f = budgets.current_figures(session, budget_id, mode)
        return Figures(f.spent_micro_usd, f.reserved_micro_usd)


def attempts(factory: sessionmaker[Session], generation_id: str | None = None) -> list[UsageAttempt]:
    with factory() as session:
        query = select(UsageAttempt).order_by(UsageAttempt.generation_id, UsageAttempt.attempt_no)
        if generation_id is not None:
            query = query.where(UsageAttempt.generation_id == generation_id)
        return list(session.scalars(query))


def generation(factory: sessionmaker[Session], generation_id: str) -> Generation:
    with factory() as session:
        row = session.get(Generation, generation_id)
        assert row is not None
        return row


def count(factory: sessionmaker[Session], model: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def rollup_attempts(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.coalesce(func.sum(UsageDailyRollup.attempts), 0))) or 0)


def open_reservations(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(BudgetReservation)
                .where(BudgetReservation.status == ReservationStatus.RESERVED)
            )
            or 0
        )


def images(factory: sessionmaker[Session], generation_id: str) -> list[StoredImage]:
    with factory() as session:
        return list(
            session.scalars(
                select(StoredImage).where(StoredImage.generation_id == generation_id).order_by(StoredImage.position)
            )
        )


def ledger_matches_budget(factory: sessionmaker[Session], budget_id: int) -> None:
    """The budget's figures are what the attempts say: simulated spent = the billed attempts' actual costs,
    reserved = the estimates of attempts whose billing is unknown (held), and nothing live."""
    rows = attempts(factory)
    billed = sum(a.actual_micro_usd or 0 for a in rows if a.billing == "billed" and a.mode != "live")
    held = sum(a.estimated_micro_usd for a in rows if a.billing == "unknown" and a.mode != "live")
    assert figures(factory, budget_id, SpendMode.SIMULATED) == Figures(billed, held)
    assert figures(factory, budget_id, SpendMode.LIVE) == Figures(0, 0)
    assert rollup_attempts(factory) == len(rows)
    assert open_reservations(factory) == 0
