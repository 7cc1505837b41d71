"""archived results and application notifications

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import worker.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("archived_urls", JSON, nullable=True))
        batch.add_column(sa.Column("notify_url", sa.String(length=2048), nullable=True))
        batch.add_column(sa.Column("on_complete_task", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("notified_at", worker.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("notified_at")
        batch.drop_column("on_complete_task")
        batch.drop_column("notify_url")
        batch.drop_column("archived_urls")
