"""The generation service's ledger: attempts with mode, endpoint, billing and notes; rollups per day x provider
x user x mode x status x error class with a finer latency histogram; stored images; idempotency keys, leases
and soft delete on generations; breaker window counters and probe lease; cross-process provider slots.

- `usage_attempts` no longer cascades from `generations` (the ledger is never deleted by a cascade).
- `usage_attempts` and `usage_daily_rollups` are recreated: no earlier revision's code ever wrote them, so they
  are empty in practice; should either hold rows, the upgrade stops with a message instead of dropping them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKETS = 32
OLD_BUCKETS = 17
ZERO = sa.text("0")


def _refuse_if_rows(*tables: str) -> None:
    bind = op.get_bind()
    for table in tables:
        rows = bind.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
        if rows:
            raise RuntimeError(
                f"revision 0005 recreates {table}, which holds {rows} row(s); nothing before this revision writes "
                "it, so this database was written by another tool: back it up and migrate its rows by hand."
            )


def _attempts_table(*, cascade: bool, new_columns: bool) -> None:
    extra: list[sa.Column[object]] = []
    if new_columns:
        extra = [
            sa.Column("mode", sa.String(length=16), nullable=False),
            sa.Column("endpoint", sa.Text(), nullable=True),
            sa.Column("translation_notes", sa.JSON(), nullable=False),
            sa.Column("billing", sa.String(length=16), nullable=True),
        ]
    op.create_table(
        "usage_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("attempt_no", sa.Integer(), nullable=False),
        sa.Column("fallback_position", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("effective_params", sa.JSON(), nullable=False),
        sa.Column("estimated_micro_usd", sa.BigInteger(), nullable=False),
        sa.Column("actual_micro_usd", sa.BigInteger(), nullable=True),
        sa.Column("billed_units_micro", sa.BigInteger(), nullable=True),
        sa.Column("price_version_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_class", sa.String(length=32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("images_count", sa.Integer(), nullable=False),
        sa.Column("megapixels_micro", sa.BigInteger(), nullable=False),
        sa.Column("submit_ms", sa.Integer(), nullable=True),
        sa.Column("queue_ms", sa.Integer(), nullable=True),
        sa.Column("run_ms", sa.Integer(), nullable=True),
        sa.Column("download_ms", sa.Integer(), nullable=True),
        sa.Column("total_ms", sa.Integer(), nullable=True),
        sa.Column("provider_request_id", sa.String(length=128), nullable=True),
        sa.Column("image_refs", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *extra,
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_usage_attempts_generation_id_generations"),
            ondelete="CASCADE" if cascade else None,
        ),
        sa.ForeignKeyConstraint(
            ["price_version_id"], ["price_versions.id"], name=op.f("fk_usage_attempts_price_version_id_price_versions")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_usage_attempts_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_attempts")),
        sa.UniqueConstraint("generation_id", "attempt_no", name=op.f("uq_usage_attempts_generation_id_attempt_no")),
    )
    op.create_index("ix_usage_attempts_provider_request", "usage_attempts", ["provider", "provider_request_id"])
    op.create_index("ix_usage_attempts_provider_started", "usage_attempts", ["provider", "started_at"])
    op.create_index("ix_usage_attempts_started", "usage_attempts", ["started_at"])
    op.create_index("ix_usage_attempts_status_started", "usage_attempts", ["status", "started_at"])
    op.create_index("ix_usage_attempts_user_started", "usage_attempts", ["user_id", "started_at"])


def _drop_attempts_table() -> None:
    for index in (
        "ix_usage_attempts_user_started",
        "ix_usage_attempts_status_started",
        "ix_usage_attempts_started",
        "ix_usage_attempts_provider_started",
        "ix_usage_attempts_provider_request",
    ):
        op.drop_index(index, table_name="usage_attempts")
    op.drop_table("usage_attempts")


def _rollups_table(*, new: bool) -> None:
    buckets = BUCKETS if new else OLD_BUCKETS
    key = (
        ["day", "provider", "user_id", "mode", "status", "error_class"]
        if new
        else ["day", "provider", "user_id", "status"]
    )
    columns: list[sa.Column[object]] = [
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
    ]
    if new:
        columns.append(sa.Column("mode", sa.String(length=16), nullable=False))
    columns.append(sa.Column("status", sa.String(length=16), nullable=False))
    if new:
        columns.append(sa.Column("error_class", sa.String(length=32), nullable=False))
    columns += [
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("megapixels_micro", sa.BigInteger(), nullable=False),
    ]
    if new:
        columns += [
            sa.Column("billed_units_micro", sa.BigInteger(), nullable=False),
            sa.Column("estimated_micro_usd", sa.BigInteger(), nullable=False),
            sa.Column("actual_micro_usd", sa.BigInteger(), nullable=False),
            sa.Column("unknown_billing", sa.BigInteger(), nullable=False),
        ]
    else:
        columns.append(sa.Column("cost_micro_usd", sa.BigInteger(), nullable=False))
    columns.append(sa.Column("latency_sum_ms", sa.BigInteger(), nullable=False))
    columns += [
        sa.Column(f"latency_b{i:02d}", sa.BigInteger(), server_default=ZERO, nullable=False) for i in range(buckets)
    ]
    op.create_table(
        "usage_daily_rollups",
        *columns,
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_daily_rollups")),
        sa.UniqueConstraint(*key, name=op.f("uq_usage_daily_rollups_" + "_".join(key))),
    )
    op.create_index("ix_usage_daily_rollups_provider_day", "usage_daily_rollups", ["provider", "day"])
    op.create_index("ix_usage_daily_rollups_user_day", "usage_daily_rollups", ["user_id", "day"])
    if new:
        op.create_index("ix_usage_daily_rollups_day", "usage_daily_rollups", ["day"])


def _drop_rollups_table(*, new: bool) -> None:
    if new:
        op.drop_index("ix_usage_daily_rollups_day", table_name="usage_daily_rollups")
    op.drop_index("ix_usage_daily_rollups_user_day", table_name="usage_daily_rollups")
    op.drop_index("ix_usage_daily_rollups_provider_day", table_name="usage_daily_rollups")
    op.drop_table("usage_daily_rollups")


GENERATION_COLUMNS: tuple[tuple[str, Any, Any], ...] = (
    ("idempotency_key", sa.String(length=200), None),
    ("request_fingerprint", sa.String(length=64), None),
    ("mode", sa.String(length=16), sa.text("'live'")),
    ("lease_owner", sa.String(length=64), None),
    ("lease_expires_at", sa.DateTime(timezone=True), None),
    ("deleted_at", sa.DateTime(timezone=True), None),
)

CIRCUIT_COLUMNS: tuple[tuple[str, Any, Any], ...] = (
    ("probe_lease_until", sa.DateTime(timezone=True), None),
    ("window_start", sa.DateTime(timezone=True), None),
    ("window_requests", sa.Integer(), ZERO),
    ("window_failures", sa.Integer(), ZERO),
    ("opened_count", sa.Integer(), ZERO),
    ("last_error_class", sa.String(length=32), None),
)


def upgrade() -> None:
    _refuse_if_rows("usage_attempts", "usage_daily_rollups")
    _drop_attempts_table()
    _attempts_table(cascade=False, new_columns=True)
    _drop_rollups_table(new=False)
    _rollups_table(new=True)

    # Plain ADD COLUMN (never a batch rebuild): generations is referenced by budget reservations, and a rebuild
    # inside the migration lock's transaction could not switch foreign keys off on SQLite.
    for name, type_, default in GENERATION_COLUMNS:
        op.add_column("generations", sa.Column(name, type_, server_default=default, nullable=default is None))
    op.create_index("uq_generations_idempotency_key", "generations", ["idempotency_key"], unique=True)
    op.create_index("ix_generations_lease", "generations", ["status", "lease_expires_at"])

    for name, type_, default in CIRCUIT_COLUMNS:
        op.add_column("circuit_states", sa.Column(name, type_, server_default=default, nullable=default is None))

    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("attempt_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content_type", sa.String(length=32), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["usage_attempts.id"], name=op.f("fk_images_attempt_id_usage_attempts")
        ),
        sa.ForeignKeyConstraint(
            ["generation_id"], ["generations.id"], name=op.f("fk_images_generation_id_generations")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_images_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("generation_id", "position", name=op.f("uq_images_generation_id_position")),
    )
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_index("ix_images_user_created", "images", ["user_id", "created_at"])

    op.create_table(
        "provider_slots",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("slot_no", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("provider", "slot_no", name=op.f("pk_provider_slots")),
    )
    op.create_index("ix_provider_slots_holder", "provider_slots", ["provider", "holder"])

    op.create_table(
        "slot_waiters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slot_waiters")),
        sa.UniqueConstraint("holder", name=op.f("uq_slot_waiters_holder")),
    )
    op.create_index("ix_slot_waiters_provider_enqueued", "slot_waiters", ["provider", "enqueued_at"])


def downgrade() -> None:
    op.drop_index("ix_slot_waiters_provider_enqueued", table_name="slot_waiters")
    op.drop_table("slot_waiters")
    op.drop_index("ix_provider_slots_holder", table_name="provider_slots")
    op.drop_table("provider_slots")
    op.drop_index("ix_images_user_created", table_name="images")
    op.drop_index("ix_images_sha256", table_name="images")
    op.drop_table("images")
    for name, _type, _default in reversed(CIRCUIT_COLUMNS):
        with op.batch_alter_table("circuit_states") as batch:
            batch.drop_column(name)
    op.drop_index("ix_generations_lease", table_name="generations")
    op.drop_index("uq_generations_idempotency_key", table_name="generations")
    for name, _type, _default in reversed(GENERATION_COLUMNS):
        op.drop_column("generations", name)
    _refuse_if_rows("usage_attempts", "usage_daily_rollups")
    _drop_rollups_table(new=True)
    _rollups_table(new=False)
    _drop_attempts_table()
    _attempts_table(cascade=True, new_columns=False)
