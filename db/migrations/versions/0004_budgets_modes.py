"""Budgets: live and simulated periods, resets with history, soft delete, the settings-backed provider budget.

- `budget_periods.mode` and `budget_reservations.mode` ('live' | 'simulated'): sandbox and emulator runs count
  their would-be cost in rows of their own, so live and simulated spend never mix in one figure.
- One OPEN period per (budget, mode, period start) instead of one row per (budget, period start): an admin's
  reset closes the row (`reset_at`, figures kept) and opens a fresh one for the same period. A partial unique
  index enforces it, so on-demand creation of a period is an INSERT ... ON CONFLICT DO NOTHING that cannot race.
- No more ON DELETE CASCADE from budgets to periods and from periods to reservations: the ledger is never
  deleted with a budget (budgets get `deleted_at`, a soft delete).
- `budgets.settings_provider`: the one budget per provider that is its settings' daily cost limit (unique).
- Reservation status 'held' (billing unknown) needs no schema change: the column is a VARCHAR(16).

SQLite rebuilds budget_periods and budget_reservations (batch mode) inside the migration lock's transaction,
where foreign keys cannot be switched off; dropping the old budget_periods would then cascade to alert events.
No revision before this one writes budget periods, so the tables are empty in practice; should one not be,
the upgrade stops with a message instead of losing rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN_PERIOD = sa.text("reset_at IS NULL")


def _mode_column() -> sa.Column[str]:
    return sa.Column(
        "mode",
        sa.Enum("live", "simulated", name="spendmode", native_enum=False, length=16),
        server_default=sa.text("'live'"),
        nullable=False,
    )


def _refuse_lossy_sqlite_rebuild() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    foreign_keys_on = bind.exec_driver_sql("PRAGMA foreign_keys").scalar()
    periods = bind.exec_driver_sql("SELECT count(*) FROM budget_periods").scalar()
    if foreign_keys_on and periods:
        raise RuntimeError(
            f"revision 0004 rebuilds budget_periods, which holds {periods} row(s); on SQLite with foreign keys on "
            "that would delete their alert events by cascade. Back up the database file, then run this upgrade "
            "once on a connection with PRAGMA foreign_keys=OFF."
        )


def upgrade() -> None:
    _refuse_lossy_sqlite_rebuild()

    with op.batch_alter_table("budgets") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("settings_provider", sa.String(length=64), nullable=True))
    op.create_index("uq_budgets_settings_provider", "budgets", ["settings_provider"], unique=True)

    # Children first: once reservations no longer cascade, a lossy drop of budget_periods would fail, not delete.
    with op.batch_alter_table("budget_reservations") as batch:
        batch.add_column(_mode_column())
        batch.drop_constraint("fk_budget_reservations_budget_period_id_budget_periods", type_="foreignkey")
        batch.create_foreign_key(
            "fk_budget_reservations_budget_period_id_budget_periods", "budget_periods", ["budget_period_id"], ["id"]
        )

    with op.batch_alter_table("budget_periods") as batch:
        batch.add_column(_mode_column())
        batch.drop_constraint("uq_budget_periods_budget_id_period_start", type_="unique")
        batch.drop_constraint("fk_budget_periods_budget_id_budgets", type_="foreignkey")
        batch.create_foreign_key("fk_budget_periods_budget_id_budgets", "budgets", ["budget_id"], ["id"])
    op.create_index(
        "uq_budget_periods_open",
        "budget_periods",
        ["budget_id", "mode", "period_start"],
        unique=True,
        sqlite_where=OPEN_PERIOD,
        postgresql_where=OPEN_PERIOD,
    )
    op.create_index("ix_budget_periods_budget_start", "budget_periods", ["budget_id", "period_start"], unique=False)


def downgrade() -> None:
    # Simulated figures and closed (reset) periods have no place in the old schema. A downgrade that would have
    # to merge them fails on the restored unique constraint instead of guessing.
    op.drop_index("ix_budget_periods_budget_start", table_name="budget_periods")
    op.drop_index("uq_budget_periods_open", table_name="budget_periods")
    with op.batch_alter_table("budget_periods") as batch:
        batch.drop_constraint("fk_budget_periods_budget_id_budgets", type_="foreignkey")
        batch.create_foreign_key(
            "fk_budget_periods_budget_id_budgets", "budgets", ["budget_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_unique_constraint("uq_budget_periods_budget_id_period_start", ["budget_id", "period_start"])
        batch.drop_column("mode")

    with op.batch_alter_table("budget_reservations") as batch:
        batch.drop_constraint("fk_budget_reservations_budget_period_id_budget_periods", type_="foreignkey")
        batch.create_foreign_key(
            "fk_budget_reservations_budget_period_id_budget_periods",
            "budget_periods",
            ["budget_period_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.drop_column("mode")

    op.drop_index("uq_budgets_settings_provider", table_name="budgets")
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("settings_provider")
        batch.drop_column("deleted_at")
