"""user_account.facts_version: a count of edits to what eligibility reads about a reader

Next case read the reader's agreements, credentials and duty sessions on every claim:
one statement, a fifth of a claim's CPU on PostgreSQL. They change when an admin edits
them, hours apart, so a connection keeps them (`services.worklist`) and each claim
checks this count instead, inside the claim's own statement. Triggers keep the count:
every insert, update and delete of a reporting agreement, credential or duty session
adds one to its user's (both users', if the row moves), and so does a change of a
trust's code to each user with an agreement for it. Whatever writes those tables (the
admin pages, the CLI, SQL by hand) invalidates the cache.

A later migration that copies one of these tables (SQLite's batch mode) must create its
triggers again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("reporting_permission", "credential", "duty_session")
BUMP = "UPDATE user_account SET facts_version = facts_version + 1 WHERE id"
TRUST_USERS = "(SELECT user_id FROM reporting_permission WHERE trust_id = NEW.id)"


def upgrade() -> None:
    op.add_column(
        "user_account",
        sa.Column("facts_version", sa.Integer(), nullable=False, server_default="0"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION bump_facts_version() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP <> 'INSERT' THEN {BUMP} = OLD.user_id; END IF;
                IF TG_OP <> 'DELETE' THEN {BUMP} = NEW.user_id; END IF;
                RETURN NULL;
            END $$""")
        op.execute(f"""
            CREATE FUNCTION bump_facts_version_of_trust() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN {BUMP} IN {TRUST_USERS}; RETURN NULL; END $$""")
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER tr_{table}_facts AFTER INSERT OR UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION bump_facts_version()"
            )
        op.execute(
            "CREATE TRIGGER tr_trust_code_facts AFTER UPDATE OF code ON trust FOR EACH ROW "
            "WHEN (OLD.code IS DISTINCT FROM NEW.code) "
            "EXECUTE FUNCTION bump_facts_version_of_trust()"
        )
        return
    for table in TABLES:
        for event, users in (
            ("INSERT", "= NEW.user_id"),
            ("UPDATE", "IN (OLD.user_id, NEW.user_id)"),
            ("DELETE", "= OLD.user_id"),
        ):
            op.execute(
                f"CREATE TRIGGER tr_{table}_facts_{event.lower()} AFTER {event} ON {table} "
                f"BEGIN {BUMP} {users}; END"
            )
    op.execute(
        "CREATE TRIGGER tr_trust_code_facts AFTER UPDATE OF code ON trust "
        f"WHEN OLD.code IS NOT NEW.code BEGIN {BUMP} IN {TRUST_USERS}; END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER tr_{table}_facts ON {table}")
        op.execute("DROP TRIGGER tr_trust_code_facts ON trust")
        op.execute("DROP FUNCTION bump_facts_version()")
        op.execute("DROP FUNCTION bump_facts_version_of_trust()")
    else:
        for table in TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER tr_{table}_facts_{event}")
        op.execute("DROP TRIGGER tr_trust_code_facts")
    # Not SQLite's batch mode: copying user_account would break the foreign keys to it.
    op.execute("ALTER TABLE user_account DROP COLUMN facts_version")
