"""Spend intelligence, the full console and the API: general alert events with a unique dedupe key, per-user
read marks, webhook signing secrets and delivery leases, user preferences, OIDC identities on accounts, and the
role and rate limit of an API token.

- `alert_events` now holds every kind of alert (budget thresholds, breakers that opened, unusual daily spend);
  `dedupe_key` is unique so an alert fires once however many processes see it at once. Its per-event `read_at`
  gives way to `alert_reads` (unread per user).
- `webhook_deliveries` no longer cascades from `webhooks` (webhooks are soft-deleted; the log stays), and gets a
  lease so several workers never post one delivery twice.
- `alert_events` and `webhook_deliveries` are recreated: nothing before this revision writes them, so they are
  empty in practice; should either hold rows, the upgrade stops with a message instead of dropping them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = sa.Enum("ADMIN", "HERO", "USER", name="role", native_enum=False, length=16)


def _refuse_if_rows(*tables: str) -> None:
    bind = op.get_bind()
    for table in tables:
        rows = bind.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
        if rows:
            raise RuntimeError(
                f"revision 0006 recreates {table}, which holds {rows} row(s); nothing before this revision writes "
                "it, so this database was written by another tool: back it up and migrate its rows by hand."
            )


def _alert_events(*, general: bool) -> None:
    columns: list[sa.Column[object]]
    if general:
        columns = [
            sa.Column("kind", sa.String(length=32), nullable=False),
            sa.Column("dedupe_key", sa.String(length=200), nullable=False),
            sa.Column("rule_id", sa.Integer(), nullable=True),
            sa.Column("budget_period_id", sa.Integer(), nullable=True),
            sa.Column("provider", sa.String(length=64), nullable=True),
            sa.Column("title", sa.Text(), nullable=False),
            sa.Column("details", sa.JSON(), nullable=False),
            sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("spent_micro_usd", sa.BigInteger(), nullable=True),
            sa.Column("limit_micro_usd", sa.BigInteger(), nullable=True),
            sa.Column("delivery_status", sa.String(length=16), nullable=False),
        ]
        cascade = None
    else:
        columns = [
            sa.Column("rule_id", sa.Integer(), nullable=False),
            sa.Column("budget_period_id", sa.Integer(), nullable=False),
            sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("spent_micro_usd", sa.BigInteger(), nullable=False),
            sa.Column("limit_micro_usd", sa.BigInteger(), nullable=False),
            sa.Column("delivery_status", sa.String(length=16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        ]
        cascade = "CASCADE"
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer(), nullable=False),
        *columns,
        sa.ForeignKeyConstraint(
            ["budget_period_id"],
            ["budget_periods.id"],
            name=op.f("fk_alert_events_budget_period_id_budget_periods"),
            ondelete=cascade,
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"], ["alert_rules.id"], name=op.f("fk_alert_events_rule_id_alert_rules"), ondelete=cascade
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
        sa.UniqueConstraint("rule_id", "budget_period_id", name=op.f("uq_alert_events_rule_id_budget_period_id")),
    )
    op.create_index("ix_alert_events_fired", "alert_events", ["fired_at"], unique=False)
    if general:
        op.create_index("uq_alert_events_dedupe_key", "alert_events", ["dedupe_key"], unique=True)


def _webhook_deliveries(*, leased: bool) -> None:
    extra: list[sa.Column[object]] = []
    if leased:
        extra = [
            sa.Column("lease_owner", sa.String(length=64), nullable=True),
            sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("response_ms", sa.Integer(), nullable=True),
        ]
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("alert_event_id", sa.Integer(), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        *extra,
        sa.ForeignKeyConstraint(
            ["alert_event_id"],
            ["alert_events.id"],
            name=op.f("fk_webhook_deliveries_alert_event_id_alert_events"),
            ondelete=None if leased else "SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete=None if leased else "CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_pending", "webhook_deliveries", ["status", "next_attempt_at"], unique=False)
    op.create_index(
        "ix_webhook_deliveries_webhook_created", "webhook_deliveries", ["webhook_id", "created_at"], unique=False
    )


def upgrade() -> None:
    _refuse_if_rows("webhook_deliveries", "alert_events")
    op.drop_table("webhook_deliveries")
    op.drop_table("alert_events")
    _alert_events(general=True)
    _webhook_deliveries(leased=True)

    op.create_table(
        "alert_reads",
        sa.Column("alert_event_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_event_id"], ["alert_events.id"], name=op.f("fk_alert_reads_alert_event_id_alert_events")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_alert_reads_user_id_users")),
        sa.PrimaryKeyConstraint("alert_event_id", "user_id", name=op.f("pk_alert_reads")),
    )

    op.create_table(
        "user_preferences",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("preferences", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_user_preferences_user_id_users")),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_preferences")),
    )

    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("signing_secret", sa.Text(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("oidc_subject", sa.String(length=255), nullable=True))
    op.create_index("uq_users_email", "users", ["email"], unique=True)
    op.create_index("uq_users_oidc_subject", "users", ["oidc_subject"], unique=True)

    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("role", ROLE, nullable=True))
        batch.add_column(sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("rate_limit_per_minute")
        batch.drop_column("role")

    op.drop_index("uq_users_oidc_subject", table_name="users")
    op.drop_index("uq_users_email", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("oidc_subject")
        batch.drop_column("email")

    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("signing_secret")

    op.drop_table("user_preferences")
    op.drop_table("alert_reads")
    # Alerts of the new kinds have no place in the old schema: a downgrade with alert rows stops, as upgrade does.
    _refuse_if_rows("webhook_deliveries", "alert_events")
    op.drop_table("webhook_deliveries")
    op.drop_table("alert_events")
    _alert_events(general=False)
    _webhook_deliveries(leased=False)
