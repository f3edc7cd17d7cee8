"""Statements run straight through the DB-API driver (`worklist.db.driver`): values as the
models' types give them, whatever the connection's time zone, inside the session's
transaction."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from worklist.bootstrap import Runtime
from worklist.db import driver


def test_timestamps_come_back_in_utc_and_other_values_as_they_are(
    runtime: Runtime, on_postgres: bool
) -> None:
    if not on_postgres:
        pytest.skip("a connection time zone is PostgreSQL's")
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


def test_rows_written_and_read_through_the_driver_are_the_rows_the_orm_reads(
    runtime: Runtime,
) -> None:
    """On both databases: what the driver writes the ORM reads back unchanged (aware UTC
    datetimes, JSON, booleans), and what it reads comes back as the models' types give
    it; on SQLite through those types' own processors."""
    from worklist.db.models import AuditEvent
    from worklist.services import audit

    at = datetime(2026, 7, 1, 12, 30, 15, 250, tzinfo=UTC)
    detail = {"why": "it's urgent", "skipped": [1, 2], "nested": {"ok": True}}
    with runtime.session() as session:
        audit.insert(session, at=at, action="claim", object_type="study", object_id=7,
                     detail=detail, remote_addr="10.0.0.1")  # fmt: skip
    with runtime.session() as session:
        event = session.scalars(sa.select(AuditEvent)).one()
        assert (event.at, event.detail, event.object_id) == (at, detail, "7")
        statement = sa.select(AuditEvent.at, AuditEvent.detail, AuditEvent.id == 0).where(
            AuditEvent.at >= driver.param("since", AuditEvent.at.type)
        )
        names, rows = driver.rows(session, statement, {"since": at})
        assert rows == [(at, detail, False)]
        assert rows[0][0].tzinfo is not None and rows[0][0].utcoffset().total_seconds() == 0
        assert driver.rows(session, statement, {"since": at.replace(microsecond=251)})[1] == []


def test_a_driver_write_belongs_to_the_session_s_transaction(runtime: Runtime) -> None:
    """Rolled back with the session (on SQLite the driver's first write begins the
    transaction, as SQLAlchemy's would), committed with it."""
    from worklist.db.models import AuditEvent
    from worklist.services import audit

    at = datetime(2026, 7, 1, 12, 30, tzinfo=UTC)
    session = runtime.read_committed_factory()
    with session.begin():
        audit.insert(session, at=at, action="claim")
        session.rollback()
    with runtime.session() as session:
        assert session.scalars(sa.select(AuditEvent)).all() == []
        audit.insert(session, at=at, action="claim")
    with runtime.session() as session:
        assert [e.action for e in session.scalars(sa.select(AuditEvent))] == ["claim"]


def test_values_stored_once_for_sqlite_give_the_rows_the_values_give(
    runtime: Runtime, on_postgres: bool
) -> None:
    """`as_stored_in_sqlite`: a claim converts its values once for all its statements;
    a statement given them finds what it finds given the values themselves."""
    if on_postgres:
        pytest.skip("SQLite's stored forms (PostgreSQL takes the values as they are)")

    from worklist.db.models import AuditEvent
    from worklist.services import audit

    at = datetime(2026, 7, 1, 12, 30, 15, 250, tzinfo=UTC)
    with runtime.session() as session:
        for action in ("claim", "release"):
            audit.insert(session, at=at, action=action, object_type="study", object_id=7,
                         detail={}, remote_addr=None)  # fmt: skip
    items = sa.func.json_each(driver.param("actions", sa.JSON())).table_valued("value")
    statement = sa.select(AuditEvent.action).where(
        AuditEvent.at == driver.param("at", AuditEvent.at.type),
        AuditEvent.action.in_(sa.select(items.c.value)),
    )
    values = {"at": at, "actions": ["release", "assign"], "unused": [1]}
    stored = driver.as_stored_in_sqlite(values)
    assert stored["actions"] == '["release", "assign"]' and isinstance(stored["at"], str)
    assert driver.as_stored_in_sqlite(stored) == stored  # stored once is stored
    with runtime.session() as session:
        assert driver.rows(session, statement, values)[1] == [("release",)]
        assert driver.rows(session, statement, stored)[1] == [("release",)]
