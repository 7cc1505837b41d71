"""the HTTP API: a job's metadata and request hash; idempotency keys per tenant

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("job_metadata", JSON_TYPE, nullable=True))
        batch.drop_constraint("uq_jobs_idempotency_key", type_="unique")
    op.create_index(
        "uq_jobs_tenant_idempotency_key",
        "jobs",
        [sa.func.coalesce(sa.text("tenant"), ""), "idempotency_key"],
        unique=True,
    )
    op.create_index("ix_jobs_idempotency_key", "jobs", ["idempotency_key"])


def downgrade() -> None:
    # Fails if two tenants share a key, which the old global rule cannot hold.
    op.drop_index("ix_jobs_idempotency_key", table_name="jobs")
    op.drop_index("uq_jobs_tenant_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
        batch.drop_column("job_metadata")
        batch.drop_column("request_hash")
