"""Statements run straight through psycopg (`worklist.db.driver`): values as the models'
types give them, whatever the connection's time zone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from worklist.bootstrap import Runtime
from worklist.db import driver
from worklist.db.models import AuditEvent, Trust
from worklist.services import audit


def test_timestamps_come_back_in_utc_and_other_values_as_they_are(
    runtime: Runtime, on_postgres: bool
) -> None:
    if not on_postgres:
        pytest.skip("the driver runs statements on PostgreSQL only")
    statement = sa.select(
        driver.param("at", sa.DateTime(timezone=True)).label("at"),
        sa.cast(sa.null(), sa.DateTime(timezone=True)).label("never"),
        driver.param("text", sa.String()).label("text"),
    )
    summer = datetime(2026, 7, 1, 12, 30, tzinfo=UTC)
    with runtime.session() as session:
        session.execute(sa.text("SET LOCAL TIME ZONE 'Europe/London'"))  # BST: +01:00
        for _ in range(2):  # the first run learns the columns; the second reuses them
            names, rows = driver.rows(session, statement, {"at": summer, "text": "12:30"})
            assert names == ("at", "never", "text")
            assert rows == [(summer, None, "12:30")]
            assert rows[0][0].tzinfo is UTC


def _count(runtime: Runtime) -> int:
    with runtime.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(AuditEvent.__table__)).scalar_one()


def _audit(action: str) -> tuple[sa.Executable, dict]:
    statement = sa.insert(AuditEvent).values(
        at=sa.func.now(),
        action=driver.param("action", sa.String()),
        detail=sa.literal_column("'{}'"),
    )
    return statement, {"action": action}


def test_a_deferred_statement_goes_with_the_commit_and_runs_before_anything_after_it(
    runtime: Runtime, on_postgres: bool
) -> None:
    if not on_postgres:
        pytest.skip("the driver runs statements on PostgreSQL only")
    with runtime.session() as session:
        driver.defer(session, *_audit("first"))
        assert _count(runtime) == 0  # not sent yet
        # The session's next statement (ORM or driver) sees it: it went first.
        assert session.scalar(sa.select(sa.func.count()).select_from(AuditEvent.__table__)) == 1
        driver.defer(session, *_audit("second"))
    assert _count(runtime) == 2  # the second went with the COMMIT


def test_a_rollback_drops_a_deferred_statement_and_a_failing_one_fails_the_commit(
    runtime: Runtime, on_postgres: bool
) -> None:
    if not on_postgres:
        pytest.skip("the driver runs statements on PostgreSQL only")
    session = runtime.session_factory()
    with session.begin():
        driver.defer(session, *_audit("dropped"))
        session.rollback()
    with runtime.session() as session:  # the same pooled connection: nothing left over
        session.execute(sa.select(1))
    assert _count(runtime) == 0
    failing = sa.insert(Trust).values(code="RBV")  # no name: a not-null violation
    with pytest.raises(sa.exc.IntegrityError), runtime.session() as session:
        audit.insert(session, at=datetime.now(UTC), action="kept only if all commit")
        driver.defer(session, failing, {})
    assert _count(runtime) == 0  # nothing of that transaction was committed
