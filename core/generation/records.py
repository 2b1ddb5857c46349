"""Reading the ledger back: a generation as a `GenerationResult` (replays of an idempotency key, recovery), the
reservation one attempt made, and generations left behind by a dead process.

Reads only: core.generation.usage is the one writer of these rows, core.generation.budgets of reservations.

How an attempt's reservation is found again: the service reserves the attempt's estimate and inserts the
attempt row in ONE transaction with one timestamp (`budgets.reserve(now=t)`, `usage.start_attempt(now=t)`),
so the attempt's holds are the generation's reservation rows created at or after the attempt started and
before the next attempt did. Attempts of one generation run one after another, so that window is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.generation.budgets import Hold, Reservation
from core.generation.models import (
    Adjustment,
    AdjustmentKind,
    AttemptRecord,
    CostSummary,
    GenerationRequest,
    GenerationResult,
    GenerationStatus,
    ImageRecord,
    TimingSummary,
)
from core.images import image_path
from db.models import BudgetPeriod, BudgetReservation, Generation, SpendMode, StoredImage, UsageAttempt

__all__ = [
    "abandoned_generations",
    "attempt_records",
    "attempt_reservation",
    "cost_summary",
    "generation_by_key",
    "generation_request",
    "load_result",
]

_UNITS = Decimal(1_000_000)


def generation_by_key(session: Session, scoped_key: str) -> Generation | None:
    """The generation an earlier request with this (scoped) idempotency key made, if any."""
    return session.execute(
        select(Generation).where(Generation.idempotency_key == scoped_key).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def generation_request(session: Session, generation_id: str) -> tuple[GenerationRequest, str]:
    """The request a generation was made from, and its prompt as stored."""
    row = session.execute(select(Generation.request, Generation.prompt).where(Generation.id == generation_id)).one()
    record, prompt = row
    return GenerationRequest.from_record(dict(record or {}, prompt=prompt)), str(prompt)


def _record(row: UsageAttempt) -> AttemptRecord:
    return AttemptRecord(
        attempt_no=row.attempt_no,
        provider=row.provider,
        fallback_position=row.fallback_position,
        mode=row.mode,
        status=row.status,
        error_class=row.error_class,
        error_message=row.error_message,
        billing=row.billing,
        billed_units=None if row.billed_units_micro is None else Decimal(row.billed_units_micro) / _UNITS,
        estimated_micro_usd=row.estimated_micro_usd,
        actual_micro_usd=row.actual_micro_usd,
        price_version_id=row.price_version_id,
        translation_notes=tuple(str(n) for n in (row.translation_notes or ())),
        provider_request_id=row.provider_request_id,
        submit_ms=row.submit_ms,
        queue_ms=row.queue_ms,
        run_ms=row.run_ms,
        download_ms=row.download_ms,
        total_ms=row.total_ms,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def attempt_records(session: Session, generation_id: str) -> list[AttemptRecord]:
    rows = session.execute(
        select(UsageAttempt)
        .where(UsageAttempt.generation_id == generation_id)
        .order_by(UsageAttempt.attempt_no)
        .execution_options(populate_existing=True)
    ).scalars()
    return [_record(row) for row in rows]


def cost_summary(attempts: Sequence[AttemptRecord], served: AttemptRecord | None) -> CostSummary:
    """The request's cost from its attempts: actual costs summed per spend mode, estimates still held."""
    live = simulated = unknown = 0
    units: Decimal | None = None
    for a in attempts:
        if a.billed_units is not None:
            units = (units or Decimal(0)) + a.billed_units
        if a.billing == "unknown":
            unknown += a.estimated_micro_usd
        elif a.actual_micro_usd:
            if a.mode == "live":
                live += a.actual_micro_usd
            else:
                simulated += a.actual_micro_usd
    reference = served or (attempts[0] if attempts else None)
    all_live = bool(attempts) and all(a.mode == "live" for a in attempts)
    return CostSummary(
        estimated_micro_usd=reference.estimated_micro_usd if reference is not None else 0,
        actual_micro_usd=live + simulated,
        billed_units=units,
        live=all_live,
        live_actual_micro_usd=live,
        simulated_actual_micro_usd=simulated,
        unknown_billing_micro_usd=unknown,
    )


def load_result(session: Session, generation_id: str, *, replayed: bool = True) -> GenerationResult:
    """A generation as the service reports it, from the ledger (the images, every attempt, the cost)."""
    gen = session.execute(
        select(Generation).where(Generation.id == generation_id).execution_options(populate_existing=True)
    ).scalar_one()
    attempts = attempt_records(session, generation_id)
    images = session.execute(
        select(StoredImage).where(StoredImage.generation_id == generation_id).order_by(StoredImage.position)
    ).scalars()
    records = tuple(
        ImageRecord(
            path=image_path(f"{img.sha256}.{img.content_type}"),
            sha256=img.sha256,
            width=img.width,
            height=img.height,
            size_bytes=img.size_bytes,
            format=img.content_type,
            seed=img.seed,
            position=img.position,
            stored_id=img.id,
        )
        for img in images
    )
    served = next((a for a in attempts if a.status in ("succeeded", "recovered")), None)
    total_ms = sum(a.total_ms or 0 for a in attempts)
    timings = TimingSummary(
        total_s=total_ms / 1000,
        submit_s=(served.submit_ms or 0) / 1000 if served else 0.0,
        queue_s=(served.queue_ms or 0) / 1000 if served else 0.0,
        run_s=(served.run_ms or 0) / 1000 if served else 0.0,
        download_s=(served.download_ms or 0) / 1000 if served else 0.0,
    )
    adjustments: list[Adjustment] = []
    degraded: dict[str, Any] = dict(gen.degraded or {})
    for message in degraded.get("messages", ()):
        adjustments.append(Adjustment(AdjustmentKind.DEGRADE, str(message), detail=degraded.get("changes", {})))
    for a in attempts:
        adjustments.extend(
            Adjustment(AdjustmentKind.TRANSLATION, note, provider=a.provider) for note in a.translation_notes
        )
    return GenerationResult(
        generation_id=gen.id,
        status=GenerationStatus(gen.status),
        provider=gen.final_provider or (served.provider if served else None),
        mode=served.mode if served else None,
        images=records,
        seed=records[0].seed if records else None,
        attempts=tuple(attempts),
        cost=cost_summary(attempts, served),
        timings=timings,
        adjustments=tuple(adjustments),
        replayed=replayed,
        error_class=gen.error_class,
        error_message=gen.error_message,
    )


def attempt_reservation(
    session: Session, generation_id: str, started_at: datetime, next_started_at: datetime | None = None
) -> Reservation | None:
    """The reservation an attempt made (its holds in every budget), rebuilt from its rows; None if it made none
    (no budget applied). See the module docstring for how the rows are told apart."""
    query = (
        select(BudgetReservation, BudgetPeriod.budget_id)
        .join(BudgetPeriod, BudgetPeriod.id == BudgetReservation.budget_period_id)
        .where(BudgetReservation.generation_id == generation_id, BudgetReservation.created_at >= started_at)
        .order_by(BudgetReservation.budget_period_id)
        .execution_options(populate_existing=True)
    )
    if next_started_at is not None:
        query = query.where(BudgetReservation.created_at < next_started_at)
    rows = session.execute(query).all()
    if not rows:
        return None
    first: BudgetReservation = rows[0][0]
    holds = tuple(Hold(row.id, int(budget_id), row.budget_period_id) for row, budget_id in rows)
    return Reservation(SpendMode(first.mode), first.amount_micro_usd, generation_id, first.expires_at, holds)


def abandoned_generations(session: Session, now: datetime, *, limit: int = 100) -> list[str]:
    """Unfinished generations whose lease expired before `now` and that have no unfinished attempt (their
    process died before an attempt started or between two): recovery closes them."""
    unfinished_attempt = (
        select(UsageAttempt.id)
        .where(UsageAttempt.generation_id == Generation.id, UsageAttempt.finished_at.is_(None))
        .exists()
    )
    rows = session.execute(
        select(Generation.id)
        .where(
            Generation.finished_at.is_(None),
            Generation.lease_expires_at < now,
            ~unfinished_attempt,
        )
        .order_by(Generation.created_at)
        .limit(limit)
    ).scalars()
    return list(rows)
