"""the tenant a job belongs to

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
    op.create_index("ix_jobs_tenant_created_at", "jobs", ["tenant", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_created_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("tenant")
