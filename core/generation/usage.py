"""The usage ledger: the ONE writer of `generations`, `usage_attempts`, `usage_daily_rollups` and `images` rows.

Every rule that guards money or shared state here is one atomic SQL statement, so any number of processes on
SQLite or PostgreSQL agree:

- `start_generation` inserts the generation with `INSERT ... ON CONFLICT DO NOTHING` on the unique idempotency
  key (`"<user id or 0>:<key>"`), then reads the winner: a repeated request gets the first generation, never a
  second; a key reused with another request (another `request_fingerprint`) is refused with `InvalidInput`.
- `start_attempt` inserts the attempt row (status `submitted`) when the attempt starts, priced at its own
  provider's price version (an attempt without a price version is refused: unpriced is never free), and marks
  the generation `running`. `record_request_id` stores the provider's request id before polling (status
  `running`), so a restarted process can collect a paid result.
- `finish_attempt` writes the attempt's final state exactly once (`UPDATE ... WHERE finished_at IS NULL
  RETURNING ...`) and, in the same transaction, adds it to its rollup row with one upsert
  (`INSERT ... ON CONFLICT (day, provider, user_id, mode, status, error_class, preset) DO UPDATE SET c = c + ...`)
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

Lock order, for PostgreSQL (no deadlock to break): a transaction that settles budgets and finishes an attempt
settles the budgets FIRST (period rows), then calls `finish_attempt` (the attempt row, then its rollup row); a
transaction finishing several attempts finishes them in attempt id order.

`pending_attempts` lists, for crash recovery, the attempts that reached the provider (a request id) but never
finished, whose generation's lease has expired.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from common.errors import Billing, Conflict, InvalidInput, NotFound
from core.catalog import PROVIDERS
from core.money import MICRO
from db.engine import dialect_insert
from db.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    Generation,
    SpendMode,
    StoredImage,
    UsageAttempt,
    UsageDailyRollup,
    new_uuid,
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
    "generation_images",
    "get_generation",
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
MAX_REQUEST_ID_CHARS = 128
MAX_ERROR_MESSAGE_CHARS = 4000
_START_ATTEMPTS = 3
"""A winner that rolls back between our insert and our read makes `start_generation` try again, this often."""
_COUNTER_COLUMNS: tuple[str, ...] = (
    "attempts",
    "images",
    "megapixels_micro",
    "billed_units_micro",
    "estimated_micro_usd",
    "actual_micro_usd",
    "unknown_billing",
    "latency_sum_ms",
    *LATENCY_BUCKET_COLUMNS,
)
SUMMARY_DIMENSIONS = ("provider", "user", "day", "mode", "status", "error_class", "preset")
"""What `usage_summary` can group by. `mode` is the connection mode (live | emulator | sandbox); the spend mode
(live | simulated) is always a group."""


class AttemptMode(StrEnum):
    """The connection mode of one attempt (core.providers.base.ConnectionMode's values)."""

    LIVE = "live"
    EMULATOR = "emulator"
    SANDBOX = "sandbox"


def spend_mode_of(attempt_mode: str) -> SpendMode:
    """Live money for live attempts; the would-be cost (simulated) of emulator and sandbox ones. `attempt_mode` is
    an AttemptMode or a ConnectionMode (the same values)."""
    return SpendMode.LIVE if AttemptMode(attempt_mode) is AttemptMode.LIVE else SpendMode.SIMULATED


_generations = cast(Table, Generation.__table__)
_attempts = cast(Table, UsageAttempt.__table__)


class _Hot:
    """The hot path's statements, built once (values bound at execution) and run as Core on the session's
    connection, in its transaction: no ORM unit of work and no statement rebuilt per request."""

    insert_generation = insert(_generations)
    mark_running = (
        update(_generations)
        .where(_generations.c.id == bindparam("gid"), _generations.c.finished_at.is_(None))
        .values(status="running")
        .returning(_generations.c.id)
    )
    insert_attempt = insert(_attempts).returning(_attempts.c.id)
    request_id = (
        update(_attempts)
        .where(_attempts.c.id == bindparam("aid"), _attempts.c.finished_at.is_(None))
        .values(provider_request_id=bindparam("rid"), status="running")
        .returning(_attempts.c.id)
    )
    finish_attempt = (
        update(_attempts)
        .where(_attempts.c.id == bindparam("aid"), _attempts.c.finished_at.is_(None))
        .returning(
            _attempts.c.provider,
            _attempts.c.user_id,
            _attempts.c.mode,
            _attempts.c.started_at,
            _attempts.c.estimated_micro_usd,
            _attempts.c.preset,
        )
    )
    finish_generation = (
        update(_generations)
        .where(_generations.c.id == bindparam("gid"), _generations.c.finished_at.is_(None))
        .returning(_generations.c.id)
    )


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


def _units_micro(units: Decimal | None) -> int | None:
    """Billed units in millionths, rounded half up (a provider may report more places than we keep)."""
    if units is None:
        return None
    return int((units * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def _jsonable(value: Any) -> Any:
    """A request as plain JSON (Decimals as their exact text): what the generation row keeps."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    return value


def _require_generation(session: Session, generation_id: str) -> None:
    if session.execute(select(Generation.id).where(Generation.id == generation_id)).first() is None:
        raise NotFound(f"no generation {generation_id}")


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
    if mode not in GENERATION_MODES:
        raise ValueError(f"a generation's mode is live or simulated, not {mode!r}")
    key = None if idempotency_key is None else scoped_idempotency_key(user_id, idempotency_key)
    values: dict[str, Any] = {
        "id": new_uuid(),
        "idempotency_key": key,
        "request_fingerprint": fingerprint,
        "mode": mode,
        "user_id": user_id,
        "prompt": prompt,
        "request": _jsonable(request),
        "routing_policy": routing_policy,
        "requested_provider": requested_provider,
        "status": "pending",
        "estimated_micro_usd": estimated_micro_usd,
        "lease_owner": lease_owner,
        "lease_expires_at": lease_expires_at,
        "created_at": _now(now),
    }
    created = GenerationStart(
        created=True,
        generation_id=values["id"],
        status="pending",
        mode=mode,
        estimated_micro_usd=estimated_micro_usd,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
    )
    if key is None:
        session.connection().execute(_Hot.insert_generation, values)
        return created

    # The insert is the race guard: of any number of concurrent requests with this key exactly one inserts;
    # the others insert nothing (PostgreSQL makes them wait for the winner's commit) and read the winner's row.
    for _ in range(_START_ATTEMPTS):
        statement = (
            dialect_insert(session, Generation)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[Generation.idempotency_key])
            .returning(Generation.id)
        )
        if session.execute(statement).first() is not None:
            return created
        existing = session.execute(
            select(Generation).where(Generation.idempotency_key == key).execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if existing is None:  # pragma: no cover - the winner rolled back between our insert and our read
            continue
        if existing.request_fingerprint != fingerprint:
            raise InvalidInput(
                f"the idempotency key {idempotency_key!r} was already used for a different request; "
                "a repeated request must be identical, and a new request needs a new key",
                {"idempotency_key": "already used for a different request"},
            )
        return _generation_start(existing, created=False)
    raise Conflict(f"the idempotency key {idempotency_key!r} is being used by a request that keeps failing")


def _load_generation(session: Session, generation_id: str) -> Generation:
    row = session.execute(
        select(Generation).where(Generation.id == generation_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no generation {generation_id}")
    return row


def get_generation(session: Session, generation_id: str) -> GenerationStart:
    """A generation's current state (the same view `start_generation` returns for a repeated key)."""
    return _generation_start(_load_generation(session, generation_id), created=False)


def take_over_generation(
    session: Session, generation_id: str, *, lease_owner: str, lease_expires_at: datetime, now: datetime | None = None
) -> bool:
    """Recovery: take the lease of an unfinished generation whose lease has expired. True for exactly one of
    any number of processes trying at once."""
    moment = _now(now)
    statement = (
        update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.finished_at.is_(None),
            or_(Generation.lease_expires_at.is_(None), Generation.lease_expires_at < moment),
        )
        .values(lease_owner=lease_owner, lease_expires_at=lease_expires_at)
        .returning(Generation.id)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).first() is not None


def renew_lease(session: Session, generation_id: str, *, lease_owner: str, lease_expires_at: datetime) -> bool:
    """Extend the lease this owner holds on an unfinished generation; False when another owner took it over."""
    statement = (
        update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.finished_at.is_(None),
            Generation.lease_owner == lease_owner,
        )
        .values(lease_expires_at=lease_expires_at)
        .returning(Generation.id)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).first() is not None


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
    it was already finished. `final_cost_micro_usd` is None while some attempt's billing is unknown."""
    if status not in GENERATION_FINAL_STATUSES:
        raise ValueError(f"a generation ends as one of {sorted(GENERATION_FINAL_STATUSES)}, not {status!r}")
    if final_cost_micro_usd is not None and final_cost_micro_usd < 0:
        raise ValueError("a generation's cost cannot be negative")
    values = {
        "gid": generation_id,
        "status": status,
        "final_provider": final_provider,
        "final_cost_micro_usd": final_cost_micro_usd,
        "error_class": error_class,
        "error_message": _clip(error_message),
        "degraded": None if degraded is None else _jsonable(degraded),
        "finished_at": _now(now),
    }
    if session.connection().execute(_Hot.finish_generation, values).first() is not None:
        return True
    _require_generation(session, generation_id)
    return False


def soft_delete_generation(session: Session, generation_id: str, *, now: datetime | None = None) -> bool:
    """Hide a generation (its attempts, rollups and images stay: they are the ledger). False if already deleted."""
    statement = (
        update(Generation)
        .where(Generation.id == generation_id, Generation.deleted_at.is_(None))
        .values(deleted_at=_now(now))
        .returning(Generation.id)
        .execution_options(synchronize_session=False)
    )
    if session.execute(statement).first() is not None:
        return True
    _require_generation(session, generation_id)
    return False


def _clip(message: str | None) -> str | None:
    if message is None or len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"


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
    preset: str | None = None,
    now: datetime | None = None,
) -> int:
    """Insert the attempt row (status `submitted`) as the attempt starts and mark the generation `running`;
    returns the attempt's id. Refuses an attempt without a price version (`InvalidInput`: an unpriced provider
    is never run as free) and one for a finished generation (`Conflict`)."""
    attempt_mode = AttemptMode(mode)
    if price_version_id is None:
        raise InvalidInput(
            f"{provider} has no price in force: an attempt is never run unpriced (an unpriced provider is never "
            "free); enter a price first",
            {"provider": "no price in force"},
        )
    if attempt_no < 1 or fallback_position < 0:
        raise ValueError("attempt_no starts at 1 and fallback_position at 0")
    if estimated_micro_usd < 0:
        raise ValueError("an estimate cannot be negative")
    connection = session.connection()
    if connection.execute(_Hot.mark_running, {"gid": generation_id}).first() is None:
        _require_generation(session, generation_id)
        raise Conflict(f"generation {generation_id} is already finished; it takes no new attempt")
    values = {
        "generation_id": generation_id,
        "attempt_no": attempt_no,
        "fallback_position": fallback_position,
        "user_id": user_id,
        "provider": provider,
        "mode": attempt_mode.value,
        "endpoint": endpoint,
        "effective_params": _jsonable(effective_params),
        "translation_notes": list(translation_notes),
        "estimated_micro_usd": estimated_micro_usd,
        "price_version_id": price_version_id,
        "preset": preset or "",
        "status": "submitted",
        "started_at": _now(now),
    }
    return int(connection.execute(_Hot.insert_attempt, values).scalar_one())


def record_request_id(session: Session, attempt_id: int, provider_request_id: str) -> bool:
    """Store the provider's request id before polling (status `running`); False if the attempt is finished."""
    if not provider_request_id or len(provider_request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"a provider request id has 1 to {MAX_REQUEST_ID_CHARS} characters")
    params = {"aid": attempt_id, "rid": provider_request_id}
    return session.connection().execute(_Hot.request_id, params).first() is not None


_ROLLUP_KEYS = ("day", "provider", "user_id", "mode", "status", "error_class", "preset")


@functools.lru_cache(maxsize=256)
def _rollup_upsert(dialect: str, changed: tuple[str, ...]) -> Any:
    """The rollup upsert for one dialect and one set of changed counters, built once: its values are bound at
    execution, so the statement (and its compiled form) is reused instead of rebuilt over ~45 columns per
    attempt."""
    table: Any = UsageDailyRollup.__table__
    statement = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    set_ = {name: table.c[name] + statement.excluded[name] for name in changed}
    return statement.on_conflict_do_update(index_elements=list(_ROLLUP_KEYS), set_=set_)


def _add_to_rollup(session: Session, keys: dict[str, Any], deltas: dict[str, int]) -> None:
    """One upsert: create the rollup row for `keys` with `deltas`, or add `deltas` to it, atomically."""
    changed = tuple(sorted(name for name, value in deltas.items() if value != 0))
    if not changed:
        return
    dialect = session.get_bind().dialect.name
    counters = {name: 0 for name in _COUNTER_COLUMNS}
    counters.update(deltas)
    # Core execution on the session's own connection: same transaction, without the ORM's per-statement work.
    session.connection().execute(_rollup_upsert(dialect, changed), {**keys, **counters})


def finish_attempt(session: Session, attempt_id: int, outcome: AttemptOutcome) -> bool:
    """The attempt's final state, exactly once, with its rollup row in the same transaction. False (and nothing
    written) when it was already finished.

    In a transaction that also settles budgets, settle them FIRST (budgets lock their period rows, then this
    locks the attempt and its rollup row): one lock order for every writer, so PostgreSQL never deadlocks.
    Finish one attempt per transaction, or several in attempt id order, for the same reason."""
    billing = Billing(outcome.billing)
    units_micro = _units_micro(outcome.billed_units)
    values = {
        "aid": attempt_id,
        "status": outcome.status,
        "billing": billing.value,
        "actual_micro_usd": outcome.actual_micro_usd,
        "billed_units_micro": units_micro,
        "error_class": outcome.error_class,
        "error_message": _clip(outcome.error_message),
        "images_count": outcome.images_count,
        "megapixels_micro": outcome.megapixels_micro,
        "submit_ms": outcome.submit_ms,
        "queue_ms": outcome.queue_ms,
        "run_ms": outcome.run_ms,
        "download_ms": outcome.download_ms,
        "total_ms": outcome.total_ms,
        "image_refs": [dict(ref) for ref in outcome.image_refs],
        "finished_at": _now(outcome.finished_at),
    }
    row = session.connection().execute(_Hot.finish_attempt, values).first()
    if row is None:
        if session.execute(select(UsageAttempt.id).where(UsageAttempt.id == attempt_id)).first() is None:
            raise NotFound(f"no usage attempt {attempt_id}")
        return False
    provider, user_id, mode, started_at, estimated, preset = row
    deltas = {
        "attempts": 1,
        "images": outcome.images_count,
        "megapixels_micro": outcome.megapixels_micro,
        "billed_units_micro": units_micro or 0,
        "estimated_micro_usd": int(estimated),
        "actual_micro_usd": outcome.actual_micro_usd or 0,
        "unknown_billing": 1 if billing is Billing.UNKNOWN else 0,
    }
    if outcome.total_ms is not None:
        deltas["latency_sum_ms"] = outcome.total_ms
        deltas[LATENCY_BUCKET_COLUMNS[latency_bucket(outcome.total_ms)]] = 1
    keys = {
        "day": started_at.astimezone(UTC).date(),
        "provider": provider,
        "user_id": user_id or 0,
        "mode": mode,
        "status": outcome.status,
        "error_class": outcome.error_class or "",
        "preset": preset or "",
    }
    _add_to_rollup(session, keys, deltas)
    return True


def reconcile_attempt(
    session: Session,
    attempt_id: int,
    *,
    billing: Billing,
    actual_micro_usd: int,
    billed_units: Decimal | None = None,
) -> bool:
    """Turn a finished attempt's unknown billing into a known one (recovery learnt the facts), exactly once,
    moving its rollup figures (unknown -1, actual and billed units added) in the same transaction. False when
    the attempt's billing was not (or is no longer) unknown."""
    known = Billing(billing)
    if known is Billing.UNKNOWN:
        raise ValueError("reconciling needs the billing facts: billed or not_billed")
    if actual_micro_usd < 0 or (known is Billing.NOT_BILLED and (actual_micro_usd or billed_units is not None)):
        raise ValueError("an attempt that was not billed costs 0 and has no billed units")
    units_micro = _units_micro(billed_units)
    # Units recorded at finish were counted then; only the change is added. The units of a finished attempt
    # change only together with its billing (here, under the guard below), so the value read now is the one
    # the guarded UPDATE replaces whenever that UPDATE wins.
    units_before = session.execute(
        select(UsageAttempt.billed_units_micro).where(UsageAttempt.id == attempt_id)
    ).scalar_one_or_none()
    values: dict[str, Any] = {"billing": known.value, "actual_micro_usd": actual_micro_usd}
    if units_micro is not None:
        values["billed_units_micro"] = units_micro
    statement = (
        update(UsageAttempt)
        .where(
            UsageAttempt.id == attempt_id,
            UsageAttempt.finished_at.is_not(None),
            UsageAttempt.billing == Billing.UNKNOWN.value,
        )
        .values(**values)
        .returning(
            UsageAttempt.provider, UsageAttempt.user_id, UsageAttempt.mode, UsageAttempt.started_at,
            UsageAttempt.status, UsageAttempt.error_class, UsageAttempt.preset,
        )
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    row = session.execute(statement).first()
    if row is None:
        if session.execute(select(UsageAttempt.id).where(UsageAttempt.id == attempt_id)).first() is None:
            raise NotFound(f"no usage attempt {attempt_id}")
        return False
    provider, user_id, mode, started_at, status, error_class, preset = row
    keys = {
        "day": started_at.astimezone(UTC).date(),
        "provider": provider,
        "user_id": user_id or 0,
        "mode": mode,
        "status": status,
        "error_class": error_class or "",
        "preset": preset or "",
    }
    deltas = {"unknown_billing": -1, "actual_micro_usd": actual_micro_usd}
    if units_micro is not None:
        deltas["billed_units_micro"] = units_micro - (units_before or 0)
    _add_to_rollup(session, keys, deltas)
    return True


# --- images ---------------------------------------------------------------------------------------------------


def _image_view(row: StoredImage) -> StoredImageView:
    return StoredImageView(
        id=row.id,
        generation_id=row.generation_id,
        attempt_id=row.attempt_id,
        user_id=row.user_id,
        position=row.position,
        sha256=row.sha256,
        content_type=row.content_type,
        width=row.width,
        height=row.height,
        size_bytes=row.size_bytes,
        seed=row.seed,
        created_at=row.created_at,
    )


@functools.cache
def _image_insert(dialect: str) -> Any:
    """INSERT of image rows that keeps a position already recorded (a recovery replay writes nothing twice)."""
    table: Any = StoredImage.__table__
    statement = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return statement.on_conflict_do_nothing(index_elements=["generation_id", "position"])


def record_images(
    session: Session,
    generation_id: str,
    attempt_id: int | None,
    user_id: int | None,
    images: Sequence[ImageRecord],
    *,
    first_position: int = 0,
    now: datetime | None = None,
    read_back: bool = True,
) -> list[StoredImageView]:
    """Index a generation's stored images at positions first_position, first_position + 1, ...; a position
    already recorded is kept as it is (a recovery replay writes nothing twice). Returns the rows at those
    positions, in order (with `read_back=False`, nothing: one statement fewer for a caller that has them)."""
    if not images:
        return []
    if first_position < 0:
        raise ValueError("image positions start at 0")
    moment = _now(now)
    rows = [
        {
            "generation_id": generation_id,
            "attempt_id": attempt_id,
            "user_id": user_id,
            "position": first_position + i,
            "sha256": image.sha256,
            "content_type": image.content_type,
            "width": image.width,
            "height": image.height,
            "size_bytes": image.size_bytes,
            "seed": image.seed,
            "created_at": moment,
        }
        for i, image in enumerate(images)
    ]
    # Core executemany of one statement built once per dialect, on the session's own connection (same
    # transaction): building `.values(rows)` per call cost more than the insert itself.
    session.connection().execute(_image_insert(session.get_bind().dialect.name), rows)
    if not read_back:
        return []
    stored = session.execute(
        select(StoredImage)
        .where(
            StoredImage.generation_id == generation_id,
            StoredImage.position >= first_position,
            StoredImage.position < first_position + len(images),
        )
        .order_by(StoredImage.position)
        .execution_options(populate_existing=True)
    ).scalars()
    return [_image_view(row) for row in stored]


def generation_images(session: Session, generation_id: str) -> list[StoredImageView]:
    """A generation's images in order."""
    rows = session.execute(
        select(StoredImage).where(StoredImage.generation_id == generation_id).order_by(StoredImage.position)
    ).scalars()
    return [_image_view(row) for row in rows]


# --- crash recovery -------------------------------------------------------------------------------------------


def pending_attempts(
    session: Session,
    older_than: datetime,
    *,
    include_without_request_id: bool = False,
    limit: int = 100,
) -> list[PendingAttempt]:
    """Unfinished attempts whose generation's lease expired before `older_than` (normally now), or whose
    generation is finished (nothing runs them any more), and that have a provider request id (with
    `include_without_request_id`, also those that never got one), oldest first."""
    moment = _now(older_than)
    conditions = [
        UsageAttempt.finished_at.is_(None),
        or_(
            Generation.finished_at.is_not(None),
            Generation.lease_expires_at.is_(None),
            Generation.lease_expires_at < moment,
        ),
    ]
    if not include_without_request_id:
        conditions.append(UsageAttempt.provider_request_id.is_not(None))
    rows = session.execute(
        select(UsageAttempt, Generation.lease_owner, Generation.lease_expires_at)
        .join(Generation, Generation.id == UsageAttempt.generation_id)
        .where(*conditions)
        .order_by(UsageAttempt.started_at, UsageAttempt.id)
        .limit(limit)
    ).all()
    return [
        PendingAttempt(
            attempt_id=attempt.id,
            generation_id=attempt.generation_id,
            attempt_no=attempt.attempt_no,
            provider=attempt.provider,
            mode=attempt.mode,
            provider_request_id=attempt.provider_request_id,
            endpoint=attempt.endpoint,
            user_id=attempt.user_id,
            estimated_micro_usd=attempt.estimated_micro_usd,
            price_version_id=attempt.price_version_id,
            effective_params=dict(attempt.effective_params or {}),
            started_at=attempt.started_at,
            lease_owner=lease_owner,
            lease_expires_at=lease_expires_at,
        )
        for attempt, lease_owner, lease_expires_at in rows
    ]


# --- reads from the rollups -----------------------------------------------------------------------------------


def _bucket_sums() -> list[Any]:
    table = UsageDailyRollup.__table__
    return [func.sum(table.c[name]) for name in LATENCY_BUCKET_COLUMNS]


def provider_latency_p50(session: Session, since_day: date, *, mode: str | None = None) -> dict[str, float | None]:
    """Every catalog provider's median latency (ms) of succeeded attempts since `since_day` (UTC, inclusive),
    from the rollups; None for a provider without one. `mode` limits it to one connection mode."""
    conditions = [UsageDailyRollup.day >= since_day, UsageDailyRollup.status == "succeeded"]
    if mode is not None:
        conditions.append(UsageDailyRollup.mode == AttemptMode(mode).value)
    rows = session.execute(
        select(UsageDailyRollup.provider, *_bucket_sums()).where(*conditions).group_by(UsageDailyRollup.provider)
    ).all()
    result: dict[str, float | None] = dict.fromkeys(PROVIDERS, None)
    for provider, *counts in rows:
        result[provider] = percentile_from_histogram([int(c or 0) for c in counts], 0.5)
    return result


_DIMENSION_COLUMNS: dict[str, Any] = {
    "provider": UsageDailyRollup.provider,
    "user": UsageDailyRollup.user_id,
    "day": UsageDailyRollup.day,
    "mode": UsageDailyRollup.mode,
    "status": UsageDailyRollup.status,
    "error_class": UsageDailyRollup.error_class,
    "preset": UsageDailyRollup.preset,
}
_SUMMED = (
    "attempts",
    "images",
    "megapixels_micro",
    "billed_units_micro",
    "estimated_micro_usd",
    "actual_micro_usd",
    "unknown_billing",
    "latency_sum_ms",
)


def usage_summary(
    session: Session,
    *,
    date_from: date,
    date_to: date,
    by: Iterable[str] = ("provider",),
    mode: str | None = None,
) -> list[UsageSummaryRow]:
    """Totals from the rollups for the UTC days date_from..date_to (inclusive), grouped by spend mode (always:
    live and simulated never add up into one figure) and by the `by` dimensions (SUMMARY_DIMENSIONS), ordered
    by them. `mode` (live | simulated) keeps one spend mode only."""
    dimensions = tuple(dict.fromkeys(by))
    unknown = [d for d in dimensions if d not in _DIMENSION_COLUMNS]
    if unknown:
        raise InvalidInput(
            f"cannot group usage by {', '.join(map(repr, unknown))}; choose from {', '.join(SUMMARY_DIMENSIONS)}",
            {"by": f"one of {', '.join(SUMMARY_DIMENSIONS)}"},
        )
    if date_to < date_from:
        raise InvalidInput("the date range ends before it starts", {"date_to": "before date_from"})
    if mode not in (None, "live", "simulated"):
        raise InvalidInput(f"the spend mode is live or simulated, not {mode!r}", {"mode": "live or simulated"})

    rollup = UsageDailyRollup
    spend = case((rollup.mode == AttemptMode.LIVE.value, literal("live")), else_=literal("simulated"))
    group_columns = [spend, *(_DIMENSION_COLUMNS[d] for d in dimensions)]
    table = rollup.__table__
    succeeded = func.sum(case((rollup.status == "succeeded", rollup.attempts), else_=0))
    conditions = [rollup.day >= date_from, rollup.day <= date_to]
    if mode == "live":
        conditions.append(rollup.mode == AttemptMode.LIVE.value)
    elif mode == "simulated":
        conditions.append(rollup.mode != AttemptMode.LIVE.value)
    statement = (
        select(
            *group_columns,
            succeeded,
            *(func.sum(table.c[name]) for name in _SUMMED),
            *_bucket_sums(),
        )
        .where(*conditions)
        .group_by(*group_columns)
        .order_by(*group_columns)
    )
    out: list[UsageSummaryRow] = []
    width = len(group_columns)
    for row in session.execute(statement).all():
        spend_mode = str(row[0])
        group = dict(zip(dimensions, row[1:width], strict=True))
        numbers = [int(v or 0) for v in row[width:]]
        succeeded_count = numbers[0]
        sums = dict(zip(_SUMMED, numbers[1 : 1 + len(_SUMMED)], strict=True))
        counts = numbers[1 + len(_SUMMED) :]
        timed = sum(counts)
        out.append(
            UsageSummaryRow(
                spend_mode=spend_mode,
                group=group,
                attempts=sums["attempts"],
                succeeded=succeeded_count,
                images=sums["images"],
                megapixels_micro=sums["megapixels_micro"],
                billed_units_micro=sums["billed_units_micro"],
                estimated_micro_usd=sums["estimated_micro_usd"],
                actual_micro_usd=sums["actual_micro_usd"],
                unknown_billing=sums["unknown_billing"],
                latency_mean_ms=sums["latency_sum_ms"] / timed if timed else None,
                p50_ms=percentile_from_histogram(counts, 0.5),
                p95_ms=percentile_from_histogram(counts, 0.95),
            )
        )
    return out
