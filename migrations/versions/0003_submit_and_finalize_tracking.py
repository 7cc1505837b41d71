"""in-flight create marker, finalize tracking, overdue index

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("create_started_at", "on_complete_sent_at", "finalized_at")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in COLUMNS:
            batch.add_column(
                sa.Column(name, worker.models.UTCDateTime(timezone=True), nullable=True)
            )
    op.create_index("ix_jobs_status_deadline", "jobs", ["status", "deadline"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_status_deadline", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
