"""partial index for beat's lease query

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = sa.text("status IN ('submitted', 'processing') AND upstream_task_id IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_jobs_due", "jobs", ["next_poll_at"], postgresql_where=DUE, sqlite_where=DUE)


def downgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs")
