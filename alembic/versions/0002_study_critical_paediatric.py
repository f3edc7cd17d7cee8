"""study.critical and study.paediatric, and both in the pool indexes

critical: work given even over a full session's capacity; paediatric: a child at the
examination, reported with a paediatric credential. The pool indexes carry both so that
they still cover the candidate query (SQLite chooses them only when they do).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POOLS = {"ix_study_ready_pool": "ready", "ix_study_verification_pool": "preliminary"}
POOL_COLUMNS = ["status", "urgency", "id", "trust_id", "modality", "body_area", "claimed_by_id"]


def _pool_index(batch: object, name: str, columns: list[str]) -> None:
    where = sa.text(f"status = '{POOLS[name]}' AND claimed_by_id IS NULL")
    batch.create_index(  # type: ignore[attr-defined]
        name, columns, unique=False, postgresql_where=where, sqlite_where=where
    )


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for name in POOLS:
            batch.drop_index(name)
        batch.add_column(
            sa.Column("critical", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(
            sa.Column("paediatric", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        for name in POOLS:
            _pool_index(batch, name, [*POOL_COLUMNS, "critical", "paediatric"])


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for name in POOLS:
            batch.drop_index(name)
        batch.drop_column("paediatric")
        batch.drop_column("critical")
        for name in POOLS:
            _pool_index(batch, name, POOL_COLUMNS)
