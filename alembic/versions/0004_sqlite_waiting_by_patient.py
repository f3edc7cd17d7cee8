"""ix_study_waiting_by_patient, on SQLite only: a patient's ready, unclaimed studies

Next case claims a patient's other waiting studies with the one pulled, inside SQLite's
write lock; through ix_study_patient_id SQLite read every study of the patient, history
included (cold pages). PostgreSQL keeps ix_study_patient_id (a partial index there was
tried as 0003 and taken out: it could not estimate its predicate). Revision 0004, not
0003, so that a database stamped with that withdrawn revision fails loudly.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_study_waiting_by_patient"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_index(
        NAME, "study", ["patient_id"], unique=False,
        sqlite_where=sa.text("coalesce(status, '') = 'ready' AND coalesce(claimed_by_id, 0) = 0"),
    )  # fmt: skip


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.drop_index(NAME, table_name="study")
