"""The usage ledger: the ONE writer of `generations`, `usage_attempts`, `usage_daily_rollups` and `images` rows.

Every rule that guards money or shared state here is one atomic SQL statement, so any number of processes on
SQLite or PostgreSQL agree:

- `start_generation` inserts the generation with `INSERT ... ON CONFLICT DO NOTHING` on the unique idempotency
  key (`"<user id or 0>:<key>"`), then reads the winner: a repeated request gets the first generation, never a
  second; a key reused with another request (another `request_fingerprint`) is refused with `InvalidInput`.
  Call it first in its transaction (on SQLite a read before the insert would pin an old snapshot).
- `start_attempt` inserts the attempt row (status `submitted`) when the attempt starts, priced at its own
  provider's price version (an attempt without a price version is refused: unpriced is never free), and marks
  the generation `running`. `record_request_id` stores the provider's request id before polling (status
  `running`), so a restarted process can collect a paid result.
- `finish_attempt` writes the attempt's final state exactly once (`UPDATE ... WHERE finished_at IS NULL
  RETURNING ...`) and, in the same transaction, adds it to its rollup row with one upsert
  (`INSERT ... ON CONFLICT (day, provider, user_id, mode, status, error_class) DO UPDATE SET c = c + excluded.c`)
  including one count in its latency bucket (`db.models.LATENCY_BUCKET_BOUNDS_MS`). The rollup day is the UTC
  day the attempt STARTED (as budgets settle into the period they reserved in), and its mode is the attempt's
  connection mode (live | emulator | sandbox). `reconcile_attempt` later turns an attempt's unknown billing into
  a known one exactly once, moving its rollup figures with it.
- `finish_generation` closes a generation exactly once; `soft_delete_generation` hides it (the ledger stays).
- `take_over_generation` / `renew_lease`: the lease a running generation holds; recovery takes over only an
  expired one, by one guarded UPDATE, so two recovering processes never both collect the same result.
- `record_images` indexes a generation's stored images (idempotent per position).

Reads come from the rollups only, never a scan of the attempts: `usage_summary` (counts, images, estimated and
actual cost, unknown billing, p50/p95 latency; grouped by spend mode always, so live and simulated money are
never one figure) and `provider_latency_p50` (the "fastest" routing policy). Percentiles are interpolated
linearly inside the histogram bucket holding the wanted rank, so an estimate is always in the same bucket as
the exact value: off by at most that bucket's width (x1.26-1.33 steps: at most 33 % of the value, 50 % above
80 s; on smooth distributions a few per cent). The open-ended last bucket (over 180 s) reports 180 s.

`pending_attempts` lists, for crash recovery, the attempts that reached the provider (a request id) but never
finished, whose generation's lease has expired.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from common.errors import Billing, InvalidInput, NotFound
from core.catalog import PROVIDERS
from db.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    Generation,
    StoredImage,
    UsageAttempt,
    UsageDailyRollup,
    utcnow,
)

__all__ = [
    "ATTEMPT_FINAL_STATUSES",
    "GENERATION_FINAL_STATUSES",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "SUMMARY_DIMENSIONS",
    "AttemptMode",
    "AttemptOutcome",
    "GenerationStart",
    "ImageRecord",
    "PendingAttempt",
    "StoredImageView",
    "UsageSummaryRow",
    "finish_attempt",
    "finish_generation",
    "latency_bucket",
    "pending_attempts",
    "percentile_from_histogram",
    "provider_latency_p50",
    "reconcile_attempt",
    "record_images",
    "record_request_id",
    "renew_lease",
    "request_fingerprint",
    "scoped_idempotency_key",
    "soft_delete_generation",
    "spend_mode_of",
    "start_attempt",
    "start_generation",
    "take_over_generation",
    "usage_summary",
]

MAX_IDEMPOTENCY_KEY_CHARS = 160
"""The caller's key; stored with its `<user id>:` scope in a 200-character column."""
ATTEMPT_FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "recovered"})
GENERATION_FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "refused"})
GENERATION_MODES = frozenset({"live", "simulated"})
SUMMARY_DIMENSIONS = ("provider", "user", "day", "mode", "status", "error_class")
"""What `usage_summary` can group by. `mode` is the connection mode (live | emulator | sandbox); the spend mode
(live | simulated) is always a group."""


class AttemptMode(StrEnum):
    """The connection mode of one attempt (core.providers.base.ConnectionMode's values)."""

    LIVE = "live"
    EMULATOR = "emulator"
    SANDBOX = "sandbox"


def spend_mode_of(attempt_mode: str) -> str:
    """`live` for live attempts, `simulated` for emulator and sandbox ones (their would-be cost)."""
    return "live" if AttemptMode(attempt_mode) is AttemptMode.LIVE else "simulated"


# --- what callers pass and get --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStart:
    """The result of `start_generation`: a new generation, or the one an earlier request with the key made."""

    created: bool
    generation_id: str
    status: str
    """pending for a new one; the existing generation's status otherwise (running, succeeded, ...)."""
    mode: str
    final_provider: str | None = None
    final_cost_micro_usd: int | None = None
    estimated_micro_usd: int | None = None
    error_class: str | None = None
    error_message: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass(frozen=True)
class ImageRecord:
    """One stored image of an attempt (core.images.StoredImage plus the seed it was made with)."""

    sha256: str
    content_type: str
    """png | jpeg | webp (core.images.StoredImage.format)."""
    width: int
    height: int
    size_bytes: int
    seed: int | None = None

    @property
    def ref(self) -> dict[str, Any]:
        """What an attempt's `image_refs` keeps for it."""
        return {
            "sha256": self.sha256,
            "format": self.content_type,
            "width": self.width,
            "height": self.height,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class AttemptOutcome:
    """The final state of one attempt. `actual_micro_usd` is None exactly when billing is unknown (budgets hold
    the estimate until `reconcile_attempt`); settlement.py computes it from the billing facts."""

    status: str
    """succeeded | failed | cancelled | recovered."""
    billing: Billing
    actual_micro_usd: int | None
    billed_units: Decimal | None = None
    """As the provider reported them, in its price unit (fal: megapixels); None when it did not say."""
    error_class: str | None = None
    error_message: str | None = None
    images_count: int = 0
    megapixels_micro: int = 0
    submit_ms: int | None = None
    queue_ms: int | None = None
    run_ms: int | None = None
    download_ms: int | None = None
    total_ms: int | None = None
    image_refs: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    finished_at: datetime | None = None
    """None = now."""

    def __post_init__(self) -> None:
        if self.status not in ATTEMPT_FINAL_STATUSES:
            raise ValueError(f"an attempt ends as one of {sorted(ATTEMPT_FINAL_STATUSES)}, not {self.status!r}")
        billing = Billing(self.billing)
        if (self.actual_micro_usd is None) != (billing is Billing.UNKNOWN):
            raise ValueError("actual_micro_usd is None exactly when billing is unknown")
        if self.actual_micro_usd is not None and self.actual_micro_usd < 0:
            raise ValueError("an actual cost cannot be negative")
        if billing is Billing.NOT_BILLED and self.actual_micro_usd:
            raise ValueError("an attempt that was not billed costs 0")
        if billing is Billing.NOT_BILLED and self.billed_units is not None:
            raise ValueError("an attempt with billed units cannot say it was not billed")
        if self.billed_units is not None and self.billed_units < 0:
            raise ValueError("billed units cannot be negative")
        if self.status == "succeeded" and self.error_class:
            raise ValueError("a succeeded attempt has no error class")
        if self.images_count < 0 or self.megapixels_micro < 0:
            raise ValueError("image counts cannot be negative")
        for name in ("submit_ms", "queue_ms", "run_ms", "download_ms", "total_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} cannot be negative")


@dataclass(frozen=True)
class StoredImageView:
    id: int
    generation_id: str
    attempt_id: int | None
    user_id: int | None
    position: int
    sha256: str
    content_type: str
    width: int
    height: int
    size_bytes: int
    seed: int | None
    created_at: datetime


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt that reached its provider and never finished, in a generation whose lease has expired."""

    attempt_id: int
    generation_id: str
    attempt_no: int
    provider: str
    mode: str
    provider_request_id: str | None
    endpoint: str | None
    user_id: int | None
    estimated_micro_usd: int
    price_version_id: int | None
    effective_params: dict[str, Any]
    started_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None


@dataclass(frozen=True)
class UsageSummaryRow:
    """Totals of one group of rollup rows. `spend_mode` (live | simulated) is always part of the group."""

    spend_mode: str
    group: dict[str, Any]
    """The values of the `by` dimensions: provider (str), user (int, 0 = none), day (date), mode, status,
    error_class ("" = none)."""
    attempts: int
    succeeded: int
    images: int
    megapixels_micro: int
    billed_units_micro: int
    estimated_micro_usd: int
    actual_micro_usd: int
    """The known actual cost; attempts with unknown billing add nothing here (see unknown_billing)."""
    unknown_billing: int
    latency_mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None


# --- helpers --------------------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return utcnow() if now is None else now.astimezone(UTC)


def _dialect_insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the usage ledger needs SQLite or PostgreSQL, not {dialect}")


def _canonical_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_json(v) for v in value]
    if isinstance(value, Decimal):
        return {"$decimal": str(value.normalize())}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def request_fingerprint(request: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a request (keys sorted, no whitespace): equal requests, equal
    fingerprints, whatever the order their fields were given in."""
    text = json.dumps(_canonical_json(request), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def scoped_idempotency_key(user_id: int | None, key: str) -> str:
    """`<user id or 0>:<key>`: two users' keys never collide. Refuses an empty or overlong key."""
    if not isinstance(key, str) or not key.strip():
        raise InvalidInput("an idempotency key cannot be empty", {"idempotency_key": "empty"})
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidInput(
            f"the idempotency key is {len(key)} characters long; at most {MAX_IDEMPOTENCY_KEY_CHARS}",
            {"idempotency_key": f"at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"},
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidInput("the idempotency key contains control characters", {"idempotency_key": "control character"})
    return f"{user_id or 0}:{key}"


def _generation_start(row: Generation, *, created: bool) -> GenerationStart:
    return GenerationStart(
        created=created,
        generation_id=row.id,
        status=row.status,
        mode=row.mode,
        final_provider=row.final_provider,
        final_cost_micro_usd=row.final_cost_micro_usd,
        estimated_micro_usd=row.estimated_micro_usd,
        error_class=row.error_class,
        error_message=row.error_message,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        finished_at=row.finished_at,
    )


def latency_bucket(total_ms: int) -> int:
    """The histogram bucket of a latency: bucket i holds (bound[i-1], bound[i]] ms; the last is open-ended."""
    for i, bound in enumerate(LATENCY_BUCKET_BOUNDS_MS):
        if total_ms <= bound:
            return i
    return len(LATENCY_BUCKET_BOUNDS_MS)


def percentile_from_histogram(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of the latencies counted in `counts` (one count per bucket), interpolated
    linearly inside the bucket that holds rank q x N. None when nothing was counted."""
    if not 0 < q <= 1:
        raise ValueError(f"a quantile is in (0, 1], not {q}")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        if seen + count >= rank:
            if i >= len(LATENCY_BUCKET_BOUNDS_MS):
                return float(LATENCY_BUCKET_BOUNDS_MS[-1])  # open-ended: the lower bound is all we know
            low = 0 if i == 0 else LATENCY_BUCKET_BOUNDS_MS[i - 1]
            high = LATENCY_BUCKET_BOUNDS_MS[i]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return float(LATENCY_BUCKET_BOUNDS_MS[-1])  # pragma: no cover - rank <= total always lands above


# --- generations ----------------------------------------------------------------------------------------------


def start_generation(
    session: Session,
    *,
    user_id: int | None,
    prompt: str,
    request: Mapping[str, Any],
    routing_policy: str,
    requested_provider: str | None,
    mode: str,
    estimated_micro_usd: int | None,
    idempotency_key: str | None = None,
    fingerprint: str,
    lease_owner: str,
    lease_expires_at: datetime,
    now: datetime | None = None,
) -> GenerationStart:
    """Create the generation (status `pending`), or return the one an earlier request with the same
    idempotency key created (`created=False`, its current state). A key reused with a different request
    (another `fingerprint`) raises `InvalidInput` naming the key. Without a key every call creates one."""
    raise NotImplementedError


def take_over_generation(
    session: Session, generation_id: str, *, lease_owner: str, lease_expires_at: datetime, now: datetime | None = None
) -> bool:
    """Recovery: take the lease of an unfinished generation whose lease has expired. True for exactly one of
    any number of processes trying at once."""
    raise NotImplementedError


def renew_lease(session: Session, generation_id: str, *, lease_owner: str, lease_expires_at: datetime) -> bool:
    """Extend the lease this owner holds on an unfinished generation; False when another owner took it over."""
    raise NotImplementedError


def finish_generation(
    session: Session,
    generation_id: str,
    *,
    status: str,
    final_provider: str | None,
    final_cost_micro_usd: int | None,
    error_class: str | None = None,
    error_message: str | None = None,
    degraded: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Write the generation's final state exactly once (succeeded | failed | cancelled | refused); False when
    it was already finished."""
    raise NotImplementedError


def soft_delete_generation(session: Session, generation_id: str, *, now: datetime | None = None) -> bool:
    """Hide a generation (its attempts, rollups and images stay: they are the ledger). False if already deleted."""
    raise NotImplementedError


# --- attempts -------------------------------------------------------------------------------------------------


def start_attempt(
    session: Session,
    *,
    generation_id: str,
    attempt_no: int,
    fallback_position: int,
    user_id: int | None,
    provider: str,
    mode: str,
    endpoint: str | None,
    effective_params: Mapping[str, Any],
    translation_notes: Sequence[str],
    estimated_micro_usd: int,
    price_version_id: int | None,
    now: datetime | None = None,
) -> int:
    """Insert the attempt row (status `submitted`) as the attempt starts; returns its id. Refuses an attempt
    without a price version (`InvalidInput`): an unpriced provider is never run as free."""
    raise NotImplementedError


def record_request_id(session: Session, attempt_id: int, provider_request_id: str) -> bool:
    """Store the provider's request id before polling (status `running`); False if the attempt is finished."""
    raise NotImplementedError


def finish_attempt(session: Session, attempt_id: int, outcome: AttemptOutcome) -> bool:
    """The attempt's final state, exactly once, with its rollup row in the same transaction. False (and nothing
    written) when it was already finished."""
    raise NotImplementedError


def reconcile_attempt(
    session: Session,
    attempt_id: int,
    *,
    billing: Billing,
    actual_micro_usd: int,
    billed_units: Decimal | None = None,
) -> bool:
    """Turn a finished attempt's unknown billing into a known one (recovery learnt the facts), exactly once,
    moving its rollup figures (unknown -1, actual + units) in the same transaction."""
    raise NotImplementedError


def record_images(
    session: Session,
    generation_id: str,
    attempt_id: int | None,
    user_id: int | None,
    images: Sequence[ImageRecord],
    *,
    first_position: int = 0,
) -> list[StoredImageView]:
    """Index a generation's stored images at positions first_position, first_position + 1, ...; a position
    already recorded is kept as it is (a recovery replay writes nothing twice)."""
    raise NotImplementedError


def pending_attempts(
    session: Session,
    older_than: datetime,
    *,
    include_without_request_id: bool = False,
    limit: int = 100,
) -> list[PendingAttempt]:
    """Unfinished attempts whose generation's lease expired before `older_than` (normally now) and that have a
    provider request id (with `include_without_request_id`, also those that never got one), oldest first."""
    raise NotImplementedError


# --- reads from the rollups -----------------------------------------------------------------------------------


def provider_latency_p50(
    session: Session, since_day: date, *, mode: str | None = None
) -> dict[str, float | None]:
    """Every catalog provider's median latency (ms) of succeeded attempts since `since_day` (UTC, inclusive),
    from the rollups; None for a provider without one. `mode` limits it to one connection mode."""
    raise NotImplementedError


def usage_summary(
    session: Session,
    *,
    date_from: date,
    date_to: date,
    by: Iterable[str] = ("provider",),
    mode: str | None = None,
) -> list[UsageSummaryRow]:
    """Totals from the rollups for the UTC days date_from..date_to (inclusive), grouped by spend mode (always:
    live and simulated never add up into one figure) and by the `by` dimensions (SUMMARY_DIMENSIONS). `mode`
    (live | simulated) keeps one spend mode only."""
    raise NotImplementedError


_UNUSED: tuple[Any, ...] = (ColumnElement, and_, case, func, literal, select, update, NotFound, PROVIDERS, GENERATION_MODES)
