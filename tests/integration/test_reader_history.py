"""A reader's years of assignments do not slow what reads only their latest.

The worklist page lists the claims taken away from its reader in the last 12 hours, and
auto-assignment sums the effort given to each reader this session. Both must reach those
rows by the reader and the time, not by reading every assignment the reader ever had:
with the benchmark's history (62,000 a reader) that read took a worklist page 0.15-0.3 s.
Checked by the plan each database chooses for the statements those calls run.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_study, make_trust, make_user
from worklist.db.models import Assignment
from worklist.services import auto_assignment
from worklist.services import worklist as wl

HISTORY = 400  # assignments of earlier days, each ended when its report was signed


@pytest.fixture
def reader_with_history(session, clock):
    now = clock.now()
    trust = make_trust(session, now=now, code="RW6")
    reader = make_user(session, now=now, trusts=("RW6",), credentials=("CT:NEURO",), on_duty=True)
    studies = [make_study(session, trust=trust, now=now) for _ in range(4)]
    for i in range(HISTORY):
        started = now - timedelta(days=2 + i // 20, minutes=i)
        session.add(
            Assignment(
                study_id=studies[i % len(studies)].id, user_id=reader.id, kind="pull",
                started_at=started, ended_at=started + timedelta(minutes=20),
                end_reason="signed", explanation={},
            )
        )  # fmt: skip
    session.flush()
    connection = session.connection()
    connection.exec_driver_sql("ANALYZE")
    return reader


def _statements_run(session, call) -> list[tuple[str, object]]:
    """The SQL (with its parameters) that `call()` runs on the session's connection."""
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _many):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    engine = session.get_bind()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return seen


def _reads_by_reader_and_time(statement: str) -> bool:
    flat = " ".join(statement.split())
    return re.search(r"assignment\.user_id = ", flat) is not None \
        and re.search(r"assignment\.(started_at|ended_at) >= ", flat) is not None  # fmt: skip


def _plan(session, statement: str, parameters: object) -> str:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # A few hundred rows fit in a handful of pages: without this PostgreSQL may read
        # them all in sequence, and the question is which index serves the time term.
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
        connection.exec_driver_sql("SET LOCAL enable_seqscan = on")
        return "\n".join(row[0] for row in rows)
    rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
    return "\n".join(str(row[-1]) for row in rows)


def _time_in_index_condition(plan: str) -> bool:
    postgresql = re.search(r"Index Cond: .*\b(started_at|ended_at) >= ", plan)
    sqlite = re.search(
        r"USING (COVERING )?INDEX \w+ \(user_id=\? AND (started_at|ended_at)>\?\)", plan
    )
    return bool(postgresql or sqlite)


def test_the_worklist_page_finds_the_claims_taken_away_lately_without_reading_the_readers_history(
    session, clock, reader_with_history
):
    statements = _statements_run(
        session, lambda: wl.worklist(session, user=reader_with_history, now=clock.now())
    )
    by_time = [(s, p) for s, p in statements if _reads_by_reader_and_time(s)]
    assert len(by_time) == 1, [s for s, _ in statements]
    plan = _plan(session, *by_time[0])
    assert _time_in_index_condition(plan), plan


def test_auto_assignment_sums_the_effort_given_this_session_without_reading_the_readers_history(
    session, clock, reader_with_history
):
    statements = _statements_run(
        session, lambda: auto_assignment.auto_assign(session, now=clock.now())
    )
    by_time = [(s, p) for s, p in statements if _reads_by_reader_and_time(s)]
    assert len(by_time) == 1, [s for s, _ in statements]
    plan = _plan(session, *by_time[0])
    assert _time_in_index_condition(plan), plan
