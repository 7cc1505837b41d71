"""beat leadership: a lease row, and the last period each scheduled entry was sent for

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.models import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "beat_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("acquired_at", UTCDateTime(), nullable=False),
        sa.Column("renewed_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_beat_leases")),
    )
    op.create_table(
        "beat_entries",
        sa.Column("entry", sa.String(length=200), nullable=False),
        sa.Column("last_period", UTCDateTime(), nullable=False),
        sa.Column("claimed_at", UTCDateTime(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("entry", name=op.f("pk_beat_entries")),
    )


def downgrade() -> None:
    op.drop_table("beat_entries")
    op.drop_table("beat_leases")
