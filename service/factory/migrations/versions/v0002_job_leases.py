"""Supervision leases on jobs: which replica supervises a running job, and until when.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: jobs written before leases (and jobs nobody works on) hold none.
    # (SQLite and Postgres both add a nullable column in place: no table rewrite.)
    op.add_column("jobs", sa.Column("lease_owner", sa.Text, nullable=True))
    # Milliseconds since the epoch, from the supervising replica's clock.
    op.add_column("jobs", sa.Column("lease_until", sa.BigInteger, nullable=True))
    op.create_index("jobs_by_lease", "jobs", ["status", "lease_until"])


def downgrade() -> None:
    op.drop_index("jobs_by_lease", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
