"""ix_study_waiting_by_patient: a patient's ready, unclaimed studies

Next case claims a patient's other waiting studies with the first; through
ix_study_patient_id that read every study the patient ever had (SQLite: ~0.4 ms a claim,
inside the write lock). The predicate is written in coalesce(), as the query writes it,
so that no query of the ready pool can use this index, nor this query the pool's.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("coalesce(status, '') = 'ready' AND coalesce(claimed_by_id, 0) = 0")


def upgrade() -> None:
    op.create_index(
        "ix_study_waiting_by_patient", "study", ["patient_id"], unique=False,
        postgresql_where=WHERE, sqlite_where=WHERE,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_study_waiting_by_patient", table_name="study")
