"""Rollup rows written directly, for tests of what reads them (reports, forecasts, the optimizer, tiers).

Each call adds one `usage_daily_rollups` row (or adds to it) with hand-chosen counters, so a test's expected
figures can be worked out by hand from its seed alone."""

from __future__ import annotations

from datetime import date

from sqlalchemy.orm import Session

from db.models import LATENCY_BUCKET_BOUNDS_MS, LATENCY_BUCKET_COLUMNS, Role, UsageDailyRollup, User


def bucket_of(ms: int) -> int:
    """The histogram bucket holding `ms` (bucket i covers (bound[i-1], bound[i]])."""
    for i, bound in enumerate(LATENCY_BUCKET_BOUNDS_MS):
        if ms <= bound:
            return i
    return len(LATENCY_BUCKET_BOUNDS_MS)


def add_rollup(
    session: Session,
    day: date,
    provider: str,
    *,
    user_id: int = 0,
    mode: str = "live",
    status: str = "succeeded",
    error_class: str = "",
    attempts: int = 1,
    images: int = 0,
    megapixels_micro: int = 0,
    billed_units_micro: int = 0,
    actual_micro_usd: int = 0,
    estimated_micro_usd: int | None = None,
    unknown_billing: int = 0,
    latencies: dict[int, int] | None = None,
) -> None:
    """`latencies`: {milliseconds: attempts}, each counted in its bucket."""
    counts = {name: 0 for name in LATENCY_BUCKET_COLUMNS}
    total_ms = 0
    for ms, n in (latencies or {}).items():
        counts[LATENCY_BUCKET_COLUMNS[bucket_of(ms)]] += n
        total_ms += ms * n
    session.add(
        UsageDailyRollup(
            day=day,
            provider=provider,
            user_id=user_id,
            mode=mode,
            status=status,
            error_class=error_class,
            attempts=attempts,
            images=images,
            megapixels_micro=megapixels_micro,
            billed_units_micro=billed_units_micro,
            estimated_micro_usd=actual_micro_usd if estimated_micro_usd is None else estimated_micro_usd,
            actual_micro_usd=actual_micro_usd,
            unknown_billing=unknown_billing,
            latency_sum_ms=total_ms,
            **counts,
        )
    )
    session.flush()


def add_user(session: Session, name: str, role: Role = Role.USER) -> int:
    row = User(username=name, password_hash="not-a-real-hash", role=role)
    session.add(row)
    session.flush()
    return row.id
