"""Statements run straight through psycopg (`worklist.db.driver`): values as the models'
types give them, whatever the connection's time zone."""

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
