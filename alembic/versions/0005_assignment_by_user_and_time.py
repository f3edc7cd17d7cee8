"""A reader's assignments by time: ix_assignment_user_started and ix_assignment_user_ended
in place of ix_assignment_user_id

The worklist page lists the claims taken away from its reader in the last 12 hours, and
auto-assignment sums the effort given to each reader since their session started. Through
ix_assignment_user_id both read every assignment the reader ever had: with a history of
2,000,000 reported studies (62,000 a reader) a worklist page took 0.15-0.3 s. Both new
indexes begin with user_id, so they also serve every lookup by reader alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_assignment_user_started", "assignment", ["user_id", "started_at"])
    op.create_index("ix_assignment_user_ended", "assignment", ["user_id", "ended_at"])
    op.drop_index("ix_assignment_user_id", table_name="assignment")


def downgrade() -> None:
    op.create_index("ix_assignment_user_id", "assignment", ["user_id"])
    op.drop_index("ix_assignment_user_ended", table_name="assignment")
    op.drop_index("ix_assignment_user_started", table_name="assignment")
