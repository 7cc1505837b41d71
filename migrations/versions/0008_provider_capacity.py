"""provider capacity: a job's account, priority, waiting reason and cost; account states

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.models import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("account", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("waiting_reason", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("cost", sa.Float(), nullable=True))
    op.create_index("ix_jobs_provider_status_account", "jobs", ["provider", "status", "account"])
    op.create_table(
        "account_states",
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=32), nullable=False),
        sa.Column("paused_until", UTCDateTime(), nullable=True),
        sa.Column("pause_reason", sa.String(length=255), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("opened_until", UTCDateTime(), nullable=True),
        sa.Column("probe_job_id", sa.Uuid(), nullable=True),
        sa.Column("next_create_at", UTCDateTime(), nullable=True),
        sa.Column("next_request_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "account", name=op.f("pk_account_states")),
    )


def downgrade() -> None:
    op.drop_table("account_states")
    op.drop_index("ix_jobs_provider_status_account", table_name="jobs")
    # SQLite drops columns by copying the table, which loses expression indexes:
    # migration 0007's is taken down first and made again after.
    op.drop_index("uq_jobs_tenant_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cost")
        batch.drop_column("waiting_reason")
        batch.drop_column("priority")
        batch.drop_column("account")
    op.create_index(
        "uq_jobs_tenant_idempotency_key",
        "jobs",
        [sa.func.coalesce(sa.text("tenant"), ""), "idempotency_key"],
        unique=True,
    )
