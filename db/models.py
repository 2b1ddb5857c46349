"""The schema: SQLAlchemy 2.0 typed models for SQLite and PostgreSQL.

Conventions that hold for every table:
- Money is BigInteger micro-dollars (`*_micro_usd`): exact on both databases, sums never round.
- Quantities that can be fractional (megapixels, billed units) are BigInteger millionths (`*_micro`).
- Timestamps are timezone-aware UTC (`UTCDateTime`); SQLite hands back naive values, which we mark as UTC.
- Settings and prices are versioned: versions are immutable rows; "current" is a pointer or the latest row.
- Usage is append-only (`usage_attempts`); dashboards read `usage_daily_rollups`, kept up to date in the same
  transaction as the attempt row.
- Constraint and index names are fixed by a naming convention so migrations (and SQLite batch rebuilds) can
  address them by name on both databases.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Upper bounds (ms) of the latency histogram buckets in usage_daily_rollups; the last bucket is open-ended.
# Steps of about x1.3 from 50 ms to 3 minutes: p50 and p95 read from the rollups alone are interpolated within
# the bucket that holds them, so the error is at most one bucket's width (about 30 %; 50 % above 80 s) and
# much less on smooth data (+0.9 % at p50, +1.6 % at p95 on the seeded test distribution).
LATENCY_BUCKET_BOUNDS_MS: tuple[int, ...] = (
    50, 65, 85, 110, 140, 185, 240, 310, 400, 520, 680, 880, 1_150, 1_500, 1_950, 2_500,
    3_300, 4_300, 5_600, 7_300, 9_500, 12_000, 16_000, 21_000, 27_000, 35_000, 46_000, 60_000, 80_000,
    120_000, 180_000,
)  # fmt: skip
LATENCY_BUCKET_COLUMNS: tuple[str, ...] = tuple(f"latency_b{i:02d}" for i in range(len(LATENCY_BUCKET_BOUNDS_MS) + 1))


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on both databases. Naive datetimes are refused, not guessed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Big primary keys for the tables that grow without bound; SQLite only auto-increments INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Role(StrEnum):
    ADMIN = "ADMIN"
    HERO = "HERO"
    USER = "USER"


class BudgetScope(StrEnum):
    GLOBAL = "global"
    PROVIDER = "provider"
    USER = "user"


class BudgetPeriodKind(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"


class ReservationStatus(StrEnum):
    RESERVED = "reserved"
    """Holding the estimate while the request runs."""
    HELD = "held"
    """Billing unknown: still holding the estimate until the attempt is reconciled."""
    SETTLED = "settled"
    """Replaced by the actual cost (which may be above or below the estimate)."""
    RELEASED = "released"
    """Nothing was billed: the estimate was given back."""
    EXPIRED = "expired"
    """Left by a crash past its expiry: the estimate was given back by the expiry sweep."""


class SpendMode(StrEnum):
    """Live money, or the would-be cost of sandbox and emulator runs. The two never mix in one figure."""

    LIVE = "live"
    SIMULATED = "simulated"


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def _enum(enum_cls: type[StrEnum], length: int = 16) -> Enum:
    # VARCHAR, not a native PostgreSQL ENUM: adding a value later is a plain migration on both databases.
    return Enum(
        enum_cls,
        native_enum=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it as a class attribute)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        list[str]: JSON(),
    }


# --- users and access -----------------------------------------------------------------------------------------


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        Index("uq_users_email", "email", unique=True),
        Index("uq_users_oidc_subject", "oidc_subject", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    """Stored lower-case; unique regardless of the case it was typed in."""
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Consecutive wrong passwords since the last successful sign-in."""
    locked_until: Mapped[datetime | None] = mapped_column(default=None)
    """Sign-in refused until then, after too many wrong passwords in a row."""
    email: Mapped[str | None] = mapped_column(String(255), default=None)
    """Stored lower-case; how an OIDC sign-in (`st.login`) is matched to the account an admin created."""
    oidc_subject: Mapped[str | None] = mapped_column(String(255), default=None)
    """`<issuer>|<sub>` of the identity linked at its first OIDC sign-in; later sign-ins match on it."""


class SystemFlag(Base):
    """One-time facts about the installation (e.g. the first admin was created), claimed by primary key."""

    __tablename__ = "system_flags"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_user", "user_id", "revoked_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    """SHA-256 hex of the token: tokens are long random strings, so a fast hash is enough and lookups are O(1)."""
    prefix: Mapped[str] = mapped_column(String(16))
    """The first characters, shown so a person can tell tokens apart."""
    scopes: Mapped[list[str]] = mapped_column(default=list)
    role: Mapped[Role | None] = mapped_column(_enum(Role), default=None)
    """The role the token acts with, never above its user's current role; None = the user's role."""
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    """Requests per minute for this token; None = the installation's default."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiRateWindow(Base):
    """Requests per API token per minute, counted by one upsert that returns the new count: the limit holds
    across every API process on the database. Old windows are deleted by the worker."""

    __tablename__ = "api_rate_windows"

    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)


class ConsoleSession(Base):
    """A signed-in console browser, kept across reloads by a cookie that holds a random token.

    Only SHA-256 hashes of secrets are stored, so a copy of the database signs nobody in. A session starts with
    a one-time hand-off code (the sign-in page sends the browser to a route that trades it for the cookie);
    `token_hash` is set at that exchange. Signing out sets `revoked_at`; an inactive user's sessions are refused.
    """

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_user", "user_id", "revoked_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    """SHA-256 hex of the cookie's token; None until the browser has collected its cookie."""
    handoff_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    """SHA-256 hex of the one-time code the browser trades for its cookie; None once used."""
    handoff_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_at", "at"),
        Index("ix_audit_log_actor_at", "actor_id", "at"),
        Index("ix_audit_log_target_at", "target_type", "target_id", "at"),
        Index("ix_audit_log_action_at", "action", "at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    """None for the system itself (seed, migrations, background jobs)."""
    actor_name: Mapped[str] = mapped_column(String(64))
    """The name at the time of the action: history stays readable if the user is renamed or deactivated."""
    actor_role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(128))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    at: Mapped[datetime] = mapped_column(default=utcnow)


# --- settings and prices (versioned) --------------------------------------------------------------------------


class ProviderSettingsVersion(Base):
    """An immutable snapshot of one provider's settings. Nothing updates or deletes these rows."""

    __tablename__ = "provider_settings_versions"
    __table_args__ = (UniqueConstraint("provider", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    """This version removed the provider's configuration (its settings are the last ones, kept for history)."""
    source_version: Mapped[int | None] = mapped_column(Integer, default=None)
    """Set on a rollback: the version whose settings this one restores."""
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    created_by_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    comment: Mapped[str | None] = mapped_column(Text, default=None)


class ProviderSettingsCurrent(Base):
    """The pointer to each provider's current version, plus the fields routing filters and sorts on.

    The copies (active, is_default, priority) always equal the current version's settings; they let routing
    order providers without parsing JSON and let the database enforce "at most one default provider".
    """

    __tablename__ = "provider_settings"
    __table_args__ = (
        Index(
            "uq_provider_settings_one_default",
            "is_default",
            unique=True,
            sqlite_where=text("is_default"),
            postgresql_where=text("is_default"),
        ),
        Index("ix_provider_settings_routing", "active", "priority"),
    )

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    current_version_id: Mapped[int] = mapped_column(ForeignKey("provider_settings_versions.id"))
    version: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean)
    is_default: Mapped[bool] = mapped_column(Boolean)
    priority: Mapped[int] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class GlobalSettingsVersion(Base):
    """Immutable versions of the global settings; the current one is the highest version."""

    __tablename__ = "global_settings_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    source_version: Mapped[int | None] = mapped_column(Integer, default=None)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    created_by_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    comment: Mapped[str | None] = mapped_column(Text, default=None)


class UserPreferences(Base):
    """A user's own defaults (size, preset, negative prompt), applied between provider settings and preset,
    within what the admins allow. `version` guards concurrent edits (compare-and-set)."""

    __tablename__ = "user_preferences"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    preferences: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PriceVersion(Base):
    """One price rule for one provider, valid from `effective_date` until a later version takes effect."""

    __tablename__ = "price_versions"
    __table_args__ = (
        UniqueConstraint("provider", "version"),
        Index("ix_price_versions_active", "provider", "effective_date", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    rule: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(Text, default="")
    """Where the price comes from (a pricing page URL, an invoice, "catalog default")."""
    effective_date: Mapped[date] = mapped_column(Date)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    created_by_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    comment: Mapped[str | None] = mapped_column(Text, default=None)


# --- generations and usage ------------------------------------------------------------------------------------


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        Index("ix_generations_user_created", "user_id", "created_at"),
        Index("ix_generations_status_created", "status", "created_at"),
        Index("ix_generations_created", "created_at"),
        Index("ix_generations_lease", "status", "lease_expires_at"),
        Index("uq_generations_idempotency_key", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    """`<user id or 0>:<the caller's key>`: a repeated request with the same key returns this generation."""
    request_fingerprint: Mapped[str | None] = mapped_column(String(64), default=None)
    """SHA-256 of the canonical request, so a key reused for a different request is refused, not replayed."""
    mode: Mapped[str] = mapped_column(String(16), default="live", server_default=text("'live'"))
    """live | simulated (emulator or sandbox): decides which budget figures it counts in."""
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    prompt: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The request as given: provider or policy, preset, parameter overrides."""
    routing_policy: Mapped[str] = mapped_column(String(32))
    requested_provider: Mapped[str | None] = mapped_column(String(64), default=None)
    final_provider: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16))
    """pending | running | succeeded | failed | cancelled | refused."""
    estimated_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    final_cost_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    degraded: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """What a soft budget changed, when it did (preset, size or provider), so the caller can be told."""
    error_class: Mapped[str | None] = mapped_column(String(32), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    """The process running it (host:pid:random); recovery takes over generations whose lease has expired."""
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    """Soft delete: a generation's attempts are the ledger and are never deleted with it."""


class GenerationJob(Base):
    """A generation asked for through the REST API, durable before anything runs: any worker process claims it
    (PostgreSQL `FOR UPDATE SKIP LOCKED`; SQLite serialises writers), runs it through `generate()` with the
    idempotency key `job:<id>`, and a job whose worker died is claimed again when its lease expires, so it is
    finished elsewhere and charged once."""

    __tablename__ = "generation_jobs"
    __table_args__ = (
        Index("ix_generation_jobs_status_created", "status", "created_at"),
        Index("ix_generation_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_generation_jobs_user_created", "user_id", "created_at"),
        Index("uq_generation_jobs_idempotency_key", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    """`<user id>:<the Idempotency-Key header>`: a retried POST returns the first job."""
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """GenerationRequest.record(): what to make and how."""
    status: Mapped[str] = mapped_column(String(16))
    """queued | running | succeeded | failed."""
    claims: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker took it; past the limit a job whose workers keep dying fails instead of looping."""
    generation_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id"), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The failure as the API reports it (type, title, detail, field errors), when the job failed."""
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class UsageAttempt(Base):
    """One row per provider attempt (append-only). The generation's fallback chain is its attempts in order."""

    __tablename__ = "usage_attempts"
    __table_args__ = (
        UniqueConstraint("generation_id", "attempt_no"),
        Index("ix_usage_attempts_provider_started", "provider", "started_at"),
        Index("ix_usage_attempts_user_started", "user_id", "started_at"),
        Index("ix_usage_attempts_started", "started_at"),
        Index("ix_usage_attempts_provider_request", "provider", "provider_request_id"),
        Index("ix_usage_attempts_status_started", "status", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"))
    attempt_no: Mapped[int] = mapped_column(Integer)
    """1-based order within the generation (retries and fallbacks)."""
    fallback_position: Mapped[int] = mapped_column(Integer, default=0)
    """0 = the first candidate provider, 1 = the first fallback, ..."""
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    provider: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16), default="live")
    """Connection mode of this attempt: live | emulator | sandbox (the last two count as simulated spend)."""
    endpoint: Mapped[str | None] = mapped_column(Text, default=None)
    """Where the request was sent (base URL or model URL; never a key)."""
    effective_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    preset: Mapped[str] = mapped_column(String(32), default="", server_default=text("''"))
    """The quality preset the attempt ran with ("" = none), so spend can be reported by preset."""
    translation_notes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """What the adapter changed to fit this provider (a fallback's parameters), said to the caller."""
    estimated_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    actual_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    billed_units_micro: Mapped[int | None] = mapped_column(BigInteger, default=None)
    """Billed units as the provider reported them (fal: megapixels), in millionths; None if not reported."""
    price_version_id: Mapped[int | None] = mapped_column(ForeignKey("price_versions.id"), default=None)
    billing: Mapped[str | None] = mapped_column(String(16), default=None)
    """billed | not_billed | unknown, once the attempt is final (common.errors.Billing)."""
    status: Mapped[str] = mapped_column(String(16))
    """submitted | running | succeeded | failed | cancelled | recovered."""
    error_class: Mapped[str | None] = mapped_column(String(32), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    images_count: Mapped[int] = mapped_column(Integer, default=0)
    megapixels_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    submit_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    queue_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    run_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    download_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    total_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    provider_request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    """Stored before polling starts, so a restarted process can collect a paid result (crash recovery)."""
    image_refs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """Content addresses (sha256) of the stored images, with their sizes."""
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class UsageDailyRollup(Base):
    """Per UTC day x provider x user x mode x status x error class x preset totals of finished attempts, written
    in the transaction that finishes each attempt; the histogram counts attempts per latency bucket.

    `user_id` is 0 for work done without a signed-in user (CLI, system) and `error_class` is "" for successes:
    NOT NULL keys keep the unique constraint meaningful (NULLs never collide) and let upserts target it.
    """

    __tablename__ = "usage_daily_rollups"
    __table_args__ = (
        UniqueConstraint("day", "provider", "user_id", "mode", "status", "error_class", "preset"),
        Index("ix_usage_daily_rollups_provider_day", "provider", "day"),
        Index("ix_usage_daily_rollups_user_day", "user_id", "day"),
        Index("ix_usage_daily_rollups_day", "day"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    provider: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(Integer, default=0)
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    error_class: Mapped[str] = mapped_column(String(32), default="")
    preset: Mapped[str] = mapped_column(String(32), default="", server_default=text("''"))
    """The attempt's quality preset ("" = none)."""
    attempts: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    megapixels_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    billed_units_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    actual_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    unknown_billing: Mapped[int] = mapped_column(BigInteger, default=0)
    """Attempts whose billing is unknown (held at their estimate until reconciled)."""
    latency_sum_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_b00: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b01: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b02: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b03: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b04: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b05: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b06: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b07: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b08: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b09: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b10: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b11: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b12: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b13: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b14: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b15: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b16: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b17: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b18: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b19: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b20: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b21: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b22: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b23: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b24: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b25: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b26: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b27: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b28: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b29: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b30: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    latency_b31: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class StoredImage(Base):
    """Every stored image, by generation and user (the files are content-addressed under data/images)."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("generation_id", "position"),
        Index("ix_images_user_created", "user_id", "created_at"),
        Index("ix_images_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"))
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("usage_attempts.id"), default=None)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    position: Mapped[int] = mapped_column(Integer)
    """0-based order within the generation."""
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    seed: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- budgets and alerts ---------------------------------------------------------------------------------------


class Budget(Base):
    """A spending limit: global, per provider or per user; daily or monthly, calendar-aligned in UTC.

    Budgets are never deleted (`deleted_at` marks a soft delete): their periods and reservations are the ledger.
    A provider's daily cost limit in its settings is this same concept: a budget with `settings_provider` set,
    kept in step with the setting (see core.generation.budgets).
    """

    __tablename__ = "budgets"
    __table_args__ = (
        Index("ix_budgets_scope", "scope", "scope_id", "active"),
        Index("uq_budgets_settings_provider", "settings_provider", unique=True),
        CheckConstraint("limit_micro_usd >= 0", name="limit_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[BudgetScope] = mapped_column(_enum(BudgetScope))
    scope_id: Mapped[str | None] = mapped_column(String(64), default=None)
    """The provider id or the user id (as text) for provider / user budgets; None for global."""
    period: Mapped[BudgetPeriodKind] = mapped_column(_enum(BudgetPeriodKind))
    limit_micro_usd: Mapped[int] = mapped_column(BigInteger)
    hard: Mapped[bool] = mapped_column(Boolean, default=True)
    """Hard limits refuse; soft limits degrade with `degrade_action`."""
    degrade_action: Mapped[str | None] = mapped_column(String(32), default=None)
    """cheaper_preset | smaller_size | cheaper_provider (soft budgets)."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    """Soft delete: the budget no longer applies; its periods stay as history."""
    settings_provider: Mapped[str | None] = mapped_column(String(64), default=None)
    """Set on the one budget per provider that IS its settings' `daily_cost_limit_usd`; changed only there."""


class BudgetPeriod(Base):
    """One calendar period (UTC) of one budget, in one mode. Reservations move `reserved`; settlement moves the
    actual cost to `spent`.

    At most one open row per (budget, mode, period start): an admin's reset closes the row (`reset_at`, its
    figures kept as history) and opens a fresh one for the same period, hence the partial unique index.
    """

    __tablename__ = "budget_periods"
    __table_args__ = (
        Index(
            "uq_budget_periods_open",
            "budget_id",
            "mode",
            "period_start",
            unique=True,
            sqlite_where=text("reset_at IS NULL"),
            postgresql_where=text("reset_at IS NULL"),
        ),
        Index("ix_budget_periods_budget_start", "budget_id", "period_start"),
        CheckConstraint("spent_micro_usd >= 0", name="spent_not_negative"),
        CheckConstraint("reserved_micro_usd >= 0", name="reserved_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No cascade: the ledger is never deleted with its budget (budgets are soft-deleted).
    budget_id: Mapped[int] = mapped_column(ForeignKey("budgets.id"))
    mode: Mapped[SpendMode] = mapped_column(_enum(SpendMode), server_default=text("'live'"))
    period_start: Mapped[datetime] = mapped_column()
    period_end: Mapped[datetime] = mapped_column()
    spent_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    reset_at: Mapped[datetime | None] = mapped_column(default=None)
    reset_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)


class BudgetReservation(Base):
    """The estimate of one request held against one budget period, until it is settled, released or expired.

    Every status change is one guarded UPDATE (`WHERE status = <expected>`), so it happens exactly once however
    many processes try."""

    __tablename__ = "budget_reservations"
    __table_args__ = (
        Index("ix_budget_reservations_status_expires", "status", "expires_at"),
        Index("ix_budget_reservations_generation", "generation_id"),
        Index("ix_budget_reservations_period", "budget_period_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    budget_period_id: Mapped[int] = mapped_column(ForeignKey("budget_periods.id"))
    generation_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id", ondelete="SET NULL"))
    mode: Mapped[SpendMode] = mapped_column(_enum(SpendMode), server_default=text("'live'"))
    amount_micro_usd: Mapped[int] = mapped_column(BigInteger)
    actual_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    status: Mapped[ReservationStatus] = mapped_column(_enum(ReservationStatus))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column(default=None)


class AlertRule(Base):
    __tablename__ = "alert_rules"
    __table_args__ = (
        UniqueConstraint("budget_id", "threshold_percent"),
        CheckConstraint("threshold_percent > 0 AND threshold_percent <= 1000", name="threshold_range"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    budget_id: Mapped[int] = mapped_column(ForeignKey("budgets.id", ondelete="CASCADE"))
    threshold_percent: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class AlertEvent(Base):
    """Something an admin should know: a budget threshold crossed in a period, a breaker that opened, a day's
    spend far above its usual rate. `dedupe_key` is unique, so "fires once" is a database fact however many
    processes see the same crossing at once (budget thresholds: `budget:<period id>:<rule id>`)."""

    __tablename__ = "alert_events"
    __table_args__ = (
        UniqueConstraint("rule_id", "budget_period_id"),
        Index("uq_alert_events_dedupe_key", "dedupe_key", unique=True),
        Index("ix_alert_events_fired", "fired_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    """budget_threshold | breaker_open | spend_anomaly."""
    dedupe_key: Mapped[str] = mapped_column(String(200))
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("alert_rules.id"), default=None)
    budget_period_id: Mapped[int | None] = mapped_column(ForeignKey("budget_periods.id"), default=None)
    provider: Mapped[str | None] = mapped_column(String(64), default=None)
    title: Mapped[str] = mapped_column(Text)
    """One plain-text line for people (rendered as text, never HTML)."""
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fired_at: Mapped[datetime] = mapped_column(default=utcnow)
    spent_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    limit_micro_usd: Mapped[int | None] = mapped_column(BigInteger, default=None)
    delivery_status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | delivered | failed | no_webhooks (the summary over its webhook deliveries)."""


class AlertRead(Base):
    """In-app notifications are unread per user until that user marks them read."""

    __tablename__ = "alert_reads"

    alert_event_id: Mapped[int] = mapped_column(ForeignKey("alert_events.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    read_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(default=list)
    """Event types delivered (e.g. "budget.alert"); empty = all."""
    secret_env_var: Mapped[str | None] = mapped_column(String(100), default=None)
    """Name of an environment variable holding the signing secret; when set it wins over `signing_secret`."""
    signing_secret: Mapped[str | None] = mapped_column(Text, default=None)
    """The HMAC-SHA256 key generated at creation and shown once; never shown, logged or exported again."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    """Soft delete: the delivery log stays readable."""


class WebhookDelivery(Base):
    """The delivery log: one row per event per webhook, updated as retries happen."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_pending", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_created", "webhook_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"))
    alert_event_id: Mapped[int | None] = mapped_column(ForeignKey("alert_events.id"), default=None)
    event_type: Mapped[str] = mapped_column(String(64))
    """The alert's kind, or "test" for an admin's "send test"."""
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | delivered | failed."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    """A worker claims a delivery with a lease, so two workers never post it at once and a dead one's expires."""
    response_ms: Mapped[int | None] = mapped_column(Integer, default=None)


# --- provider health ------------------------------------------------------------------------------------------


class CircuitStateRow(Base):
    """Each provider's breaker, shared by every process on the same database."""

    __tablename__ = "circuit_states"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[CircuitState] = mapped_column(_enum(CircuitState), default=CircuitState.CLOSED)
    reason: Mapped[str] = mapped_column(Text, default="")
    since: Mapped[datetime] = mapped_column(default=utcnow)
    next_probe_at: Mapped[datetime | None] = mapped_column(default=None)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    probe_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    """Which process holds the half-open probe, so only one probes at a time."""
    probe_lease_until: Mapped[datetime | None] = mapped_column(default=None)
    """The probe's lease: if its owner dies, another process may probe after this."""
    window_start: Mapped[datetime | None] = mapped_column(default=None)
    """Start of the current failure-rate window (fixed windows; counters reset when a new one starts)."""
    window_requests: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    window_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    opened_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """How many times it has opened (for the console and alerts)."""
    last_error_class: Mapped[str | None] = mapped_column(String(32), default=None)
    last_probe_at: Mapped[datetime | None] = mapped_column(default=None)
    last_probe_ok: Mapped[bool | None] = mapped_column(Boolean, default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- concurrency limits ---------------------------------------------------------------------------------------


class ProviderSlot(Base):
    """One of a provider's in-flight slots (e.g. Ideogram's 10 per account), shared by every process.

    A slot is taken by one guarded UPDATE and released the same way; a holder that dies leaves a lease that
    expires, so its slot comes back by itself."""

    __tablename__ = "provider_slots"
    __table_args__ = (Index("ix_provider_slots_holder", "provider", "holder"),)

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), default=None)
    """The attempt holding it (generation id:attempt no), or None when free."""
    user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    acquired_at: Mapped[datetime | None] = mapped_column(default=None)


class SlotWaiter(Base):
    """A request waiting for a provider slot; slots go to waiters fairly between users (fewest held first,
    then the oldest wait), not to whoever polls fastest."""

    __tablename__ = "slot_waiters"
    __table_args__ = (Index("ix_slot_waiters_provider_enqueued", "provider", "enqueued_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime] = mapped_column()
    """A waiter that stops renewing (its process died) is ignored after this."""
