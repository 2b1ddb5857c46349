"""Rows the usage ledger's tests need (users, prices, a generation with attempts), shared by the test modules
and the spawned race workers (which import this module, never a test module)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import price_store
from core.generation import usage
from core.seed import seed_defaults
from db.engine import transaction
from db.models import LATENCY_BUCKET_COLUMNS, Role, UsageAttempt, UsageDailyRollup, User

HOUR = timedelta(hours=1)


def make_user(factory: sessionmaker[Session], name: str) -> int:
    with transaction(factory) as session:
        row = User(username=name, password_hash="not-a-real-hash", role=Role.USER)
        session.add(row)
        session.flush()
        return row.id


def seeded_price_ids(factory: sessionmaker[Session]) -> dict[str, int]:
    """Seed the built-in settings and prices; the id of each provider's price version in force."""
    seed_defaults(factory)
    with factory() as session:
        out: dict[str, int] = {}
        for provider in ("fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"):
            view = price_store.active_price(session, provider)
            assert view is not None
            out[provider] = view.id
        return out


def new_generation(
    session: Session,
    *,
    user_id: int | None = None,
    mode: str = "live",
    key: str | None = None,
    request: dict[str, Any] | None = None,
    lease_owner: str = "test:1",
    lease_expires_at: datetime | None = None,
    now: datetime | None = None,
) -> usage.GenerationStart:
    body = request if request is not None else {"prompt": "a fox", "provider": "fal-qwen"}
    return usage.start_generation(
        session,
        user_id=user_id,
        prompt=str(body.get("prompt", "a fox")),
        request=body,
        routing_policy="explicit",
        requested_provider="fal-qwen",
        mode=mode,
        estimated_micro_usd=20_972,
        idempotency_key=key,
        fingerprint=usage.request_fingerprint(body),
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at or datetime.now(UTC) + HOUR,
        now=now,
    )


def new_attempt(
    session: Session,
    generation_id: str,
    price_version_id: int,
    *,
    attempt_no: int = 1,
    provider: str = "fal-qwen",
    mode: str = "live",
    user_id: int | None = None,
    estimated_micro_usd: int = 20_972,
    now: datetime | None = None,
) -> int:
    return usage.start_attempt(
        session,
        generation_id=generation_id,
        attempt_no=attempt_no,
        fallback_position=attempt_no - 1,
        user_id=user_id,
        provider=provider,
        mode=mode,
        endpoint="http://127.0.0.1:8787/fal",
        effective_params={"image_size": "square_hd", "num_images": 1},
        translation_notes=[],
        estimated_micro_usd=estimated_micro_usd,
        price_version_id=price_version_id,
        now=now,
    )


def rollups(factory: sessionmaker[Session]) -> list[UsageDailyRollup]:
    with factory() as session:
        return list(session.execute(select(UsageDailyRollup).order_by(UsageDailyRollup.id)).scalars())


def assert_rollups_match_attempts(factory: sessionmaker[Session]) -> None:
    """Every rollup row equals the sums over the finished attempts with its key (a full scan: tests only)."""
    with factory() as session:
        attempts = list(session.execute(select(UsageAttempt).where(UsageAttempt.finished_at.is_not(None))).scalars())
    expected: dict[tuple[Any, ...], dict[str, int]] = {}
    for a in attempts:
        key = (a.started_at.date(), a.provider, a.user_id or 0, a.mode, a.status, a.error_class or "")
        sums = expected.setdefault(key, {name: 0 for name in usage._COUNTER_COLUMNS})
        sums["attempts"] += 1
        sums["images"] += a.images_count
        sums["megapixels_micro"] += a.megapixels_micro
        sums["billed_units_micro"] += a.billed_units_micro or 0
        sums["estimated_micro_usd"] += a.estimated_micro_usd
        sums["actual_micro_usd"] += a.actual_micro_usd or 0
        sums["unknown_billing"] += a.billing == "unknown"
        if a.total_ms is not None:
            sums["latency_sum_ms"] += a.total_ms
            sums[LATENCY_BUCKET_COLUMNS[usage.latency_bucket(a.total_ms)]] += 1
    actual = {
        (r.day, r.provider, r.user_id, r.mode, r.status, r.error_class): {
            name: getattr(r, name) for name in usage._COUNTER_COLUMNS
        }
        for r in rollups(factory)
    }
    assert actual == expected
