"""Spend by preset: the quality preset an attempt ran with, on `usage_attempts` and as a key of
`usage_daily_rollups` (existing rows get "" = no preset recorded).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ["day", "provider", "user_id", "mode", "status", "error_class"]
OLD_NAME = "uq_usage_daily_rollups_day_provider_user_id_mode_status_error_class"
NEW_NAME = "uq_usage_daily_rollups_day_provider_user_id_mode_status_error_class_preset"


def _preset() -> sa.Column[str]:
    return sa.Column("preset", sa.String(length=32), server_default=sa.text("''"), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("usage_attempts") as batch:
        batch.add_column(_preset())
    with op.batch_alter_table("usage_daily_rollups") as batch:
        batch.add_column(_preset())
        batch.drop_constraint(op.f(OLD_NAME), type_="unique")
        batch.create_unique_constraint(op.f(NEW_NAME), [*OLD_KEY, "preset"])


def downgrade() -> None:
    # Rows that differ only by preset would collide under the old key: a downgrade with such rows stops on the
    # restored constraint instead of merging figures.
    with op.batch_alter_table("usage_daily_rollups") as batch:
        batch.drop_constraint(op.f(NEW_NAME), type_="unique")
        batch.create_unique_constraint(op.f(OLD_NAME), OLD_KEY)
        batch.drop_column("preset")
    with op.batch_alter_table("usage_attempts") as batch:
        batch.drop_column("preset")
