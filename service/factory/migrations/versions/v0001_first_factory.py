"""The tables of the first factory (raw sqlite3), as it created them.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # SQLite orders rows of one second by its implicit rowid; elsewhere a real `rowid` identity
    # column keeps `ORDER BY rowid` in insertion order.
    sqlite = op.get_bind().dialect.name == "sqlite"

    def rowid() -> list[sa.Column[int]]:
        return [] if sqlite else [sa.Column("rowid", sa.BigInteger, sa.Identity(),
                                            nullable=False, unique=True)]

    text, integer = sa.Text, sa.BigInteger
    op.create_table("meta", sa.Column("key", text, primary_key=True),
                    sa.Column("value", text, nullable=False))
    op.create_table(
        "files", sa.Column("id", text, primary_key=True),
        sa.Column("filename", text, nullable=False), sa.Column("purpose", text, nullable=False),
        sa.Column("bytes", integer, nullable=False), sa.Column("sha256", text, nullable=False),
        sa.Column("created_at", integer, nullable=False), sa.Column("num_lines", integer),
        sa.Column("sample_type", text, nullable=False), sa.Column("mimetype", text),
        sa.Column("visibility", text),
        sa.Column("deleted", integer, nullable=False, server_default="0"), *rowid())
    op.create_index("files_by_content", "files", ["filename", "sha256"])
    op.create_table(
        "jobs", sa.Column("id", text, primary_key=True),
        sa.Column("created_at", integer, nullable=False),
        sa.Column("modified_at", integer, nullable=False),
        sa.Column("status", text, nullable=False), sa.Column("model", text, nullable=False),
        sa.Column("suffix", text), sa.Column("fingerprint", text, nullable=False),
        sa.Column("doc", text, nullable=False), *rowid())
    op.create_table(
        "events", sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                            primary_key=True, autoincrement=True),
        sa.Column("job_id", text, nullable=False), sa.Column("name", text, nullable=False),
        sa.Column("data", text), sa.Column("created_at", integer, nullable=False),
        sqlite_autoincrement=True)
    op.create_index("events_by_job", "events", ["job_id", "seq"])
    op.create_table(
        "checkpoints", sa.Column("job_id", text, primary_key=True),
        sa.Column("step_number", integer, primary_key=True),
        sa.Column("metrics", text, nullable=False),
        sa.Column("created_at", integer, nullable=False))
    op.create_table(
        "models", sa.Column("id", text, primary_key=True),
        sa.Column("job_id", text, nullable=False), sa.Column("root", text, nullable=False),
        sa.Column("created", integer, nullable=False), sa.Column("kind", text, nullable=False),
        sa.Column("doc", text, nullable=False),
        sa.Column("deleted", integer, nullable=False, server_default="0"), *rowid())


def downgrade() -> None:
    for table in ("models", "checkpoints", "events", "jobs", "files", "meta"):
        op.drop_table(table)
