"""The usage ledger read back attempt by attempt, for staff: filtered by provider, user, mode, status and dates,
newest first, paginated by id (keyset: a page costs the same however deep it is, and rows written meanwhile never
shift a page). Dashboards read the rollups instead; this is the row-level view behind them."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core.authz import authorize
from core.security import Actor, Role
from db.models import UsageAttempt

__all__ = ["MAX_PAGE", "AttemptRow", "AttemptsPage", "list_attempts"]

MAX_PAGE = 500
STATUSES = ("submitted", "running", "succeeded", "failed", "cancelled", "recovered")
MODES = ("live", "emulator", "sandbox")


class AttemptRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    generation_id: str
    attempt_no: int
    fallback_position: int
    user_id: int | None
    provider: str
    mode: str
    status: str
    error_class: str | None
    error_message: str | None
    billing: str | None
    estimated_micro_usd: int
    actual_micro_usd: int | None
    billed_units_micro: int | None
    price_version_id: int | None
    images_count: int
    megapixels_micro: int
    queue_ms: int | None
    run_ms: int | None
    download_ms: int | None
    total_ms: int | None
    provider_request_id: str | None
    endpoint: str | None
    started_at: datetime
    finished_at: datetime | None


class AttemptsPage(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempts: list[AttemptRow]
    next_before_id: int | None
    """Pass as `before_id` for the next (older) page; None when this is the last."""


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def list_attempts(
    session: Session,
    actor: Actor,
    *,
    provider: str | None = None,
    user_id: int | None = None,
    mode: str | None = None,
    status: str | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> AttemptsPage:
    """One page of attempts, newest first (staff only). Dates are UTC days, both inclusive."""
    authorize(session, actor, Role.ADMIN, Role.HERO, action="read the usage ledger", lock=False)
    errors: dict[str, str] = {}
    if not 1 <= limit <= MAX_PAGE:
        errors["limit"] = f"between 1 and {MAX_PAGE}"
    if mode is not None and mode not in MODES:
        errors["mode"] = f"one of {', '.join(MODES)}"
    if status is not None and status not in STATUSES:
        errors["status"] = f"one of {', '.join(STATUSES)}"
    if date_from is not None and date_to is not None and date_to < date_from:
        errors["date_to"] = "before date_from"
    if errors:
        said = "; ".join(f"{name}: {problem}" for name, problem in errors.items())
        raise InvalidInput(f"the usage filter is not valid: {said}", errors)
    query = select(UsageAttempt).order_by(UsageAttempt.id.desc()).limit(limit + 1)
    conditions: list[Any] = []
    if provider is not None:
        conditions.append(UsageAttempt.provider == provider)
    if user_id is not None:
        conditions.append(UsageAttempt.user_id == user_id)
    if mode is not None:
        conditions.append(UsageAttempt.mode == mode)
    if status is not None:
        conditions.append(UsageAttempt.status == status)
    if date_from is not None:
        conditions.append(UsageAttempt.started_at >= _day_start(date_from))
    if date_to is not None:
        conditions.append(UsageAttempt.started_at < _day_start(date_to + timedelta(days=1)))
    if before_id is not None:
        conditions.append(UsageAttempt.id < before_id)
    rows = list(session.scalars(query.where(*conditions)))
    more = len(rows) > limit
    page = rows[:limit]
    return AttemptsPage(
        attempts=[AttemptRow.model_validate(row, from_attributes=True) for row in page],
        next_before_id=page[-1].id if more and page else None,
    )
