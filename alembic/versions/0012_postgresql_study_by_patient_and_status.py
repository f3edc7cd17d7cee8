"""PostgreSQL: ix_study_patient_status, (patient_id, coalesce(status, '')), in place of
ix_study_patient_id

Next case claims, with the study it pulls, the same person's other waiting studies. On
PostgreSQL it found them through ix_study_patient_id and read every study of the person
from the table, history included, to test each one's status: about five random heap
reads a claim from outside shared_buffers in the benchmark (19,935 study blocks read for
4,000 claims, 8 processes; 2,068 with this index), and backend CPU a claim 0.78-0.86 ->
0.72-0.79 ms (one process, alternating runs). The second column is the expression the
mates query tests (`pool.unclaimed_unindexed`), so only a patient's waiting studies are
read; the pool's partial indexes still cannot serve that query (which keeps PostgreSQL
from walking the pool for it), and a plain composite index has statistics the planner
can use, where the partial index tried as 0003 had none. Patient lookups for priors and
merges use its leading column as they used ix_study_patient_id. SQLite keeps
ix_study_patient_id and its own partial index (0004).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_study_patient_status"
OLD = "ix_study_patient_id"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_index(NAME, "study", ["patient_id", sa.text("coalesce(status, '')")])
    op.drop_index(OLD, table_name="study")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_index(OLD, "study", ["patient_id"])
    op.drop_index(NAME, table_name="study")
