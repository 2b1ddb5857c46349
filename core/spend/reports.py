"""Spend reports from the daily rollups: per day or month, by provider, user, mode or preset, cost per image
against the target, latency p50/p95 and success rate per provider, error classes.

Everything reads `usage_daily_rollups` (never usage_attempts), for any range of UTC days. Live and simulated
spend are never added together: every row carries its `spend_mode` and the totals are one per spend mode.

The result models are pydantic, so the console and the REST API render them as they are (`model_dump(mode=
"json")`). Money is integer micro-USD; cost per image is rounded half up to the micro-dollar, once.

Grouping: `by` is one of REPORT_DIMENSIONS. `month` groups the days of each UTC calendar month (the SQL groups
by day, the months are folded here, histograms included, so one statement serves both databases). `preset`
groups by the quality preset each attempt ran with ("" = none; recorded since schema 0009).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core import settings_service
from core.generation.usage import percentile_from_histogram
from core.money import MICRO, round_half_up_micros, usd_to_micros
from db.models import LATENCY_BUCKET_COLUMNS, UsageDailyRollup, User

__all__ = [
    "REPORT_DIMENSIONS",
    "ErrorClassRow",
    "ProviderPerformance",
    "SpendAccumulator",
    "SpendReport",
    "SpendRow",
    "build_report",
    "cost_per_image_micros",
    "rollup_sums",
    "spend_row",
    "target_cost_per_image_micros",
]

ReportDimension = Literal["provider", "user", "day", "month", "mode", "preset"]
REPORT_DIMENSIONS: tuple[str, ...] = ("provider", "user", "day", "month", "mode", "preset")
SpendModeFilter = Literal["live", "simulated"]
NO_USER_LABEL = "system/CLI"
"""The label of work done without a signed-in user (user id 0 in the rollups)."""
MAX_REPORT_DAYS = 3660
"""About ten years: a range beyond this is a typo, not a report."""


# --- result models --------------------------------------------------------------------------------------------


class SpendRow(BaseModel):
    """One group's figures in one spend mode."""

    model_config = ConfigDict(frozen=True)

    spend_mode: str
    """live or simulated: the two never add up into one figure."""
    key: str
    """The group's value: a provider id, a user id, a day (YYYY-MM-DD), a month (YYYY-MM), a connection mode
    (live | emulator | sandbox), a preset; "total" for the totals."""
    label: str
    """For people: the username for a user id, otherwise the key."""
    attempts: int
    succeeded: int
    images: int
    actual_micro_usd: int
    """The known actual cost; attempts whose billing is unknown add nothing until reconciled."""
    estimated_micro_usd: int
    unknown_billing: int
    """Attempts whose billing is still unknown (their estimate is held by the budgets)."""
    cost_per_image_micro_usd: int | None
    """actual / images, rounded half up; None without images."""
    over_target: bool | None
    """cost per image above the target; None without images."""
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None


class ProviderPerformance(BaseModel):
    model_config = ConfigDict(frozen=True)

    spend_mode: str
    provider: str
    attempts: int
    succeeded: int
    success_rate: float | None
    p50_ms: float | None
    """Latency of every timed attempt, interpolated from the rollups' histogram buckets."""
    p95_ms: float | None


class ErrorClassRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    spend_mode: str
    provider: str
    error_class: str
    attempts: int
    share_of_failures: float
    """This class's attempts over the provider's failed attempts in this spend mode."""


class SpendReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    date_from: date
    date_to: date
    by: str
    mode: str | None
    """The spend mode asked for; None = both (never mixed)."""
    target_cost_per_image_micro_usd: int
    rows: list[SpendRow]
    totals: list[SpendRow]
    """One row per spend mode present (key "total")."""
    providers: list[ProviderPerformance]
    error_classes: list[ErrorClassRow]


# --- aggregation ----------------------------------------------------------------------------------------------


@dataclass
class SpendAccumulator:
    """One group's sums from the rollups, added up group by group; `spend_row` turns it into a SpendRow.
    Public because core.usage_view folds its own statement's groups with it (one builder for both)."""

    attempts: int = 0
    succeeded: int = 0
    images: int = 0
    actual: int = 0
    estimated: int = 0
    unknown: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKET_COLUMNS))

    @classmethod
    def from_sums(cls, values: Iterable[Any]) -> SpendAccumulator:
        """From one group's values of `rollup_sums()`, in its order (succeeded, attempts, images, actual,
        estimated, unknown, *latency buckets); a NULL sum (no rows) counts as 0."""
        numbers = [int(v or 0) for v in values]
        succeeded, attempts, images, actual, estimated, unknown = numbers[:6]
        return cls(attempts, succeeded, images, actual, estimated, unknown, numbers[6:])

    def add(self, other: SpendAccumulator) -> None:
        self.attempts += other.attempts
        self.succeeded += other.succeeded
        self.images += other.images
        self.actual += other.actual
        self.estimated += other.estimated
        self.unknown += other.unknown
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]


def rollup_sums() -> list[Any]:
    """The rollup columns a SpendAccumulator is made of, summed, in `SpendAccumulator.from_sums` order: add them
    to a SELECT after its GROUP BY columns."""
    rollup = UsageDailyRollup
    table: Any = rollup.__table__
    return [
        func.sum(case((rollup.status == "succeeded", rollup.attempts), else_=0)),
        func.sum(rollup.attempts),
        func.sum(rollup.images),
        func.sum(rollup.actual_micro_usd),
        func.sum(rollup.estimated_micro_usd),
        func.sum(rollup.unknown_billing),
        *(func.sum(table.c[name]) for name in LATENCY_BUCKET_COLUMNS),
    ]


def _column(dimension: str) -> Any:
    rollup = UsageDailyRollup
    if dimension == "provider":
        return rollup.provider
    if dimension == "user":
        return rollup.user_id
    if dimension in ("day", "month"):
        return rollup.day
    if dimension == "mode":
        return rollup.mode
    if dimension == "error_class":
        return rollup.error_class
    if dimension == "preset":
        return rollup.preset
    raise InvalidInput(
        f"cannot report by {dimension!r}; choose from {', '.join(REPORT_DIMENSIONS)}",
        {"by": f"one of {', '.join(REPORT_DIMENSIONS)}"},
    )


def _aggregate(
    session: Session, date_from: date, date_to: date, mode: str | None, dimensions: Iterable[str]
) -> dict[tuple[Any, ...], SpendAccumulator]:
    """{(spend mode, *dimension values): totals}; `month` folds days into YYYY-MM."""
    dims = tuple(dimensions)
    rollup = UsageDailyRollup
    spend = case((rollup.mode == "live", literal("live")), else_=literal("simulated"))
    groups = [spend, *(_column(d) for d in dims)]
    conditions = [rollup.day >= date_from, rollup.day <= date_to]
    if mode == "live":
        conditions.append(rollup.mode == "live")
    elif mode == "simulated":
        conditions.append(rollup.mode != "live")
    statement = select(*groups, *rollup_sums()).where(*conditions).group_by(*groups)
    out: dict[tuple[Any, ...], SpendAccumulator] = {}
    width = len(groups)
    for row in session.execute(statement).all():
        keys: list[Any] = [str(row[0])]
        for d, value in zip(dims, row[1:width], strict=True):
            if d == "month":
                keys.append(f"{value.year:04d}-{value.month:02d}")
            elif d == "day":
                keys.append(value.isoformat())
            elif d == "user":
                keys.append(int(value or 0))
            else:
                keys.append(str(value))
        acc = SpendAccumulator.from_sums(row[width:])
        out.setdefault(tuple(keys), SpendAccumulator()).add(acc)
    return out


def _fold(
    fine: dict[tuple[Any, ...], SpendAccumulator], dims: tuple[str, ...], keep: tuple[str, ...]
) -> dict[tuple[Any, ...], SpendAccumulator]:
    """`fine` (keyed by spend mode and `dims`) summed into groups keyed by spend mode and `keep`."""
    positions = [1 + dims.index(d) for d in keep]
    out: dict[tuple[Any, ...], SpendAccumulator] = {}
    for key, acc in fine.items():
        out.setdefault((key[0], *(key[i] for i in positions)), SpendAccumulator()).add(acc)
    return out


# --- money helpers --------------------------------------------------------------------------------------------


def target_cost_per_image_micros(session: Session) -> int:
    """The global setting `target_cost_per_image_usd` in micro-USD."""
    return usd_to_micros(settings_service.get_global_settings(session).settings.target_cost_per_image_usd)


def cost_per_image_micros(actual_micro_usd: int, images: int) -> int | None:
    """actual / images in micro-USD, rounded half up once; None without images."""
    if images <= 0:
        return None
    return round_half_up_micros(Fraction(actual_micro_usd, images * MICRO))


def spend_row(spend_mode: str, key: str, label: str, acc: SpendAccumulator, target: int) -> SpendRow:
    """One group's SpendRow: cost per image against `target` (micro-USD), success rate, p50/p95 latency."""
    per_image = cost_per_image_micros(acc.actual, acc.images)
    return SpendRow(
        spend_mode=spend_mode,
        key=key,
        label=label,
        attempts=acc.attempts,
        succeeded=acc.succeeded,
        images=acc.images,
        actual_micro_usd=acc.actual,
        estimated_micro_usd=acc.estimated,
        unknown_billing=acc.unknown,
        cost_per_image_micro_usd=per_image,
        over_target=None if per_image is None else per_image > target,
        success_rate=acc.succeeded / acc.attempts if acc.attempts else None,
        p50_ms=percentile_from_histogram(acc.buckets, 0.5),
        p95_ms=percentile_from_histogram(acc.buckets, 0.95),
    )


def _check_range(date_from: date, date_to: date, mode: str | None) -> None:
    if date_to < date_from:
        raise InvalidInput("the date range ends before it starts", {"date_to": "before date_from"})
    if (date_to - date_from).days + 1 > MAX_REPORT_DAYS:
        raise InvalidInput(
            f"the date range is longer than {MAX_REPORT_DAYS} days", {"date_to": f"at most {MAX_REPORT_DAYS} days"}
        )
    if mode not in (None, "live", "simulated"):
        raise InvalidInput(f"the spend mode is live or simulated, not {mode!r}", {"mode": "live or simulated"})


def build_report(
    session: Session,
    *,
    date_from: date,
    date_to: date,
    by: str = "provider",
    mode: str | None = None,
) -> SpendReport:
    """The spend report for the UTC days date_from..date_to (inclusive), grouped `by` one of REPORT_DIMENSIONS,
    in one spend mode (`mode` live | simulated) or both, kept apart. Raises InvalidInput for a bad range,
    dimension or mode."""
    _check_range(date_from, date_to, mode)
    dimension = by.strip().lower() if isinstance(by, str) else by
    _column(dimension)  # refuses an unknown dimension (and preset until the rollups record it)
    target = target_cost_per_image_micros(session)

    # One scan of the rollups at the finest grain any part needs; each part folds it (3x faster than 3 scans).
    dims = tuple(dict.fromkeys((dimension, "provider", "error_class")))
    fine = _aggregate(session, date_from, date_to, mode, dims)
    grouped = _fold(fine, dims, (dimension,))
    names: dict[int, str] = {}
    if dimension == "user":
        ids = {int(k[1]) for k in grouped if k[1]}
        if ids:
            names = {uid: name for uid, name in session.execute(select(User.id, User.username).where(User.id.in_(ids)))}
    rows = []
    for (spend_mode, key), acc in sorted(grouped.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        label = str(key)
        if dimension == "user":
            label = NO_USER_LABEL if key == 0 else names.get(int(key), f"user {key}")
        rows.append(spend_row(spend_mode, str(key), label, acc, target))

    totals: dict[str, SpendAccumulator] = {}
    for (spend_mode, _key), acc in grouped.items():
        totals.setdefault(spend_mode, SpendAccumulator()).add(acc)
    total_rows = [spend_row(m, "total", "total", acc, target) for m, acc in sorted(totals.items())]

    per_provider = _fold(fine, dims, ("provider",))
    providers = [
        ProviderPerformance(
            spend_mode=spend_mode,
            provider=provider,
            attempts=acc.attempts,
            succeeded=acc.succeeded,
            success_rate=acc.succeeded / acc.attempts if acc.attempts else None,
            p50_ms=percentile_from_histogram(acc.buckets, 0.5),
            p95_ms=percentile_from_histogram(acc.buckets, 0.95),
        )
        for (spend_mode, provider), acc in sorted(per_provider.items())
    ]
    failures = {k: acc.attempts - acc.succeeded for k, acc in per_provider.items()}
    errors = _fold(fine, dims, ("provider", "error_class"))
    error_rows = [
        ErrorClassRow(
            spend_mode=spend_mode,
            provider=provider,
            error_class=error_class,
            attempts=acc.attempts,
            share_of_failures=acc.attempts / failures[(spend_mode, provider)]
            if failures.get((spend_mode, provider))
            else 0.0,
        )
        for (spend_mode, provider, error_class), acc in sorted(errors.items())
        if error_class
    ]
    return SpendReport(
        date_from=date_from,
        date_to=date_to,
        by=dimension,
        mode=mode,
        target_cost_per_image_micro_usd=target,
        rows=rows,
        totals=total_rows,
        providers=providers,
        error_classes=error_rows,
    )


def report_csv_rows(report: SpendReport) -> list[dict[str, Any]]:
    """The report's rows (then its totals) as flat records for CSV: one header, the same columns every row."""
    out = []
    for row in [*report.rows, *report.totals]:
        record = row.model_dump(mode="json")
        record = {"by": report.by, **record}
        out.append(record)
    return out


def usd(micros: int | None) -> Decimal | None:
    """micro-USD as an exact Decimal of dollars (for people and CSV)."""
    return None if micros is None else Decimal(micros) / MICRO
