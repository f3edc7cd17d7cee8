"""Drop four indexes that lead another index of their table: ix_report_version_report_id,
ix_patient_trust_id, ix_credential_user_id and ix_reporting_permission_user_id

Each is the leading column of a unique constraint's index on the same table (report
versions by (report_id, sequence), patients by (trust_id, local_id), credentials by
(user_id, modality, body_area), agreements by (user_id, trust_id)), which serves every
lookup by that column; the second index served nothing the first does not, and every
insert paid for it (report_version has a row per signed report: 2,000,000 in the
benchmark).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (index, table, column) of each index dropped.
_DROPPED = (
    ("ix_report_version_report_id", "report_version", "report_id"),
    ("ix_patient_trust_id", "patient", "trust_id"),
    ("ix_credential_user_id", "credential", "user_id"),
    ("ix_reporting_permission_user_id", "reporting_permission", "user_id"),
)


def upgrade() -> None:
    for index, table, _ in _DROPPED:
        op.drop_index(index, table_name=table)


def downgrade() -> None:
    for index, table, column in _DROPPED:
        op.create_index(index, table, [column])
