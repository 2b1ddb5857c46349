"""Budget periods: calendar days and months in UTC, whatever time zone a caller's clock is in.

A period is the half-open interval [start, end): a request at 23:59:59.999999 UTC counts for that day, one at
00:00:00 for the next. Nothing here touches the database; `core.generation.budgets` creates the period row for
"now" on demand, so a new period starts by itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db.models import BudgetPeriodKind


def as_utc(moment: datetime) -> datetime:
    """`moment` in UTC. Naive datetimes are refused, not guessed: a server's local clock is not UTC."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime: pass a timezone-aware datetime")
    return moment.astimezone(UTC)


def period_bounds(kind: BudgetPeriodKind, moment: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar period of `kind` that contains `moment`: (start, end), end exclusive."""
    at = as_utc(moment)
    if kind is BudgetPeriodKind.DAILY:
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if kind is BudgetPeriodKind.MONTHLY:
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    raise ValueError(f"unknown budget period kind: {kind!r}")
