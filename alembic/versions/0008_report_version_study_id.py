"""report_version.study_id: a study's signed versions found by the study

Priors show each earlier study's latest signed report. They found it through the report
(the report by its study, then its versions by the report's id): two index lookups a
prior, each a random read when the pages are not cached. A version's study never
changes (one report a study), so the version carries it, and priors look the versions
up by (study_id, sequence) directly.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_report_version_study_id_sequence"
FOREIGN_KEY = "fk_report_version_study_id_study"


def upgrade() -> None:
    with op.batch_alter_table("report_version") as batch:
        batch.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE report_version SET study_id = "
        "(SELECT report.study_id FROM report WHERE report.id = report_version.report_id)"
    )
    # SQLite: the table is copied with the column NOT NULL and its foreign key.
    with op.batch_alter_table("report_version") as batch:
        batch.alter_column("study_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(FOREIGN_KEY, "study", ["study_id"], ["id"])
        batch.create_index(INDEX, ["study_id", "sequence"])


def downgrade() -> None:
    with op.batch_alter_table("report_version") as batch:
        batch.drop_index(INDEX)
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        batch.drop_column("study_id")
