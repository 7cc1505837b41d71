"""a waiting job's wake: when its submit was last sent for a free slot

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.models import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Both databases add and drop a plain column in place (SQLite since 3.35): no batch
# copy of the table, which would lose migration 0007's expression index.
def upgrade() -> None:
    op.add_column("jobs", sa.Column("woken_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "woken_at")
