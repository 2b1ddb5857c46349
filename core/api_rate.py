"""Per-token rate limits for the REST API, shared by every API process: a fixed one-minute window per token,
counted by ONE upsert that returns the new count, so two processes can never both let the limit's last request
through twice. A fixed window may let up to twice the limit through across a window boundary; that is the
price of one statement per request instead of a sliding log. The upsert is built once per database kind and run
on the session's connection (no ORM bookkeeping for a statement every request sends)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from db.engine import dialect_insert
from db.models import ApiRateWindow, utcnow

__all__ = ["DEFAULT_RATE_LIMIT_PER_MINUTE", "RateDecision", "count_request", "default_rate_limit", "forget_old_windows"]

DEFAULT_RATE_LIMIT_PER_MINUTE = 600
RATE_LIMIT_ENV = "IMAGEGATE_API_RATE_LIMIT"
WINDOW = timedelta(minutes=1)

_windows = cast(Table, ApiRateWindow.__table__)
_upserts: dict[str, Any] = {}


def _upsert(session: Session) -> Any:
    """INSERT a window with one request, or add one to it; RETURNING the count (built once per database kind)."""
    kind = session.get_bind().dialect.name
    statement = _upserts.get(kind)
    if statement is None:
        insert = dialect_insert(session, _windows)
        statement = _upserts[kind] = insert.on_conflict_do_update(
            index_elements=["token_id", "window_start"], set_={"requests": _windows.c.requests + 1}
        ).returning(_windows.c.requests)
    return statement


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    used: int
    """Requests counted in this window, this one included."""
    retry_after_s: int
    """Seconds until the window ends (when refused: when to try again)."""

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def default_rate_limit() -> int:
    raw = os.environ.get(RATE_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_RATE_LIMIT_PER_MINUTE
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"{RATE_LIMIT_ENV} is a whole number of requests per minute above 0, not {raw!r}")
    return int(raw)


def count_request(session: Session, token_id: int, limit: int, *, now: datetime | None = None) -> RateDecision:
    """Count one request of `token_id` in the current minute and say whether it is within `limit`."""
    moment = now or utcnow()
    start = moment.replace(second=0, microsecond=0)
    counted = session.connection().execute(
        _upsert(session), {"token_id": token_id, "window_start": start, "requests": 1}
    )
    used = int(counted.scalar_one())
    retry = max(1, int((start + WINDOW - moment).total_seconds() + 0.999))
    return RateDecision(used <= limit, limit, used, retry)


def forget_old_windows(session: Session, *, now: datetime | None = None, keep: timedelta = timedelta(hours=1)) -> int:
    """Delete windows older than `keep` (the worker's housekeeping)."""
    result = session.execute(
        delete(ApiRateWindow)
        .where(ApiRateWindow.window_start < (now or utcnow()) - keep)
        .returning(ApiRateWindow.token_id)
    )
    return len(result.all())
