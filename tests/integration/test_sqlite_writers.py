"""SQLite write transactions queue on a file lock (worklist.db.sqlite_writers)."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import sqlalchemy as sa

from worklist.bootstrap import create_db_engine
from worklist.db.models import Trust
from worklist.db.sqlite_writers import NestedWriteError

pytestmark = pytest.mark.usefixtures("database_url")


@pytest.fixture
def sqlite_engine(database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("the writer queue is SQLite's; PostgreSQL locks rows")
    engine = create_db_engine(database_url)
    yield engine
    engine.dispose()


def test_a_waiting_writer_starts_as_soon_as_the_one_before_commits(sqlite_engine):
    """SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms... between tries: a
    writer waiting 60 ms would start ~18 ms late. In the queue it starts at once."""
    hold = 0.06
    lateness = []
    for _ in range(5):
        committed = []
        holding = threading.Event()

        def first(holding=holding, committed=committed):
            with sqlite_engine.begin() as c:
                c.execute(sa.select(sa.func.count()).select_from(Trust.__table__))
                holding.set()
                time.sleep(hold)
            committed.append(time.perf_counter())

        thread = threading.Thread(target=first)
        thread.start()
        holding.wait()
        with sqlite_engine.begin() as c:
            started = time.perf_counter()
            c.execute(sa.select(sa.func.count()).select_from(Trust.__table__))
        thread.join()
        lateness.append(started - committed[0])
    assert statistics.median(lateness) < 0.008, lateness


def test_a_thread_beginning_a_second_write_while_holding_one_gets_an_error_not_a_hang(
    sqlite_engine,
):
    with sqlite_engine.begin() as outer:
        outer.execute(sa.select(1))
        with pytest.raises(NestedWriteError), sqlite_engine.begin() as inner:
            inner.execute(sa.select(1))
    with sqlite_engine.begin() as after:  # the queue is free again
        assert after.execute(sa.select(1)).scalar() == 1
