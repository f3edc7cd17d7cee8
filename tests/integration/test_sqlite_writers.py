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


def test_writers_start_in_the_order_they_came_even_one_that_comes_straight_back(
    sqlite_engine,
):
    """First come, first served. With one lock for all, a release woke every waiter to
    race for it, and a writer coming straight back (a process claiming again) usually
    won: an unlucky waiter waited several turns."""
    started: list[str] = []
    holding = threading.Event()
    queued = threading.Semaphore(0)

    def write(name):
        with sqlite_engine.begin() as c:
            c.execute(sa.select(1))
            started.append(name)

    def hold_then_come_back():
        with sqlite_engine.begin() as c:
            c.execute(sa.select(1))
            holding.set()
            for _ in range(3):
                assert queued.acquire(timeout=5)
            time.sleep(0.1)  # the three are blocked on the lock by now
        write("back")  # at once, before the waiters have woken

    holder = threading.Thread(target=hold_then_come_back)
    holder.start()
    assert holding.wait(5)
    waiters = []
    for index in range(3):
        waiters.append(threading.Thread(target=write, args=(f"waiter {index}",)))
        waiters[-1].start()
        time.sleep(0.05)  # queued one after another
        queued.release()
    for thread in [holder, *waiters]:
        thread.join(10)
    assert started == ["waiter 0", "waiter 1", "waiter 2", "back"]


def test_a_thread_beginning_a_second_write_while_holding_one_gets_an_error_not_a_hang(
    sqlite_engine,
):
    with sqlite_engine.begin() as outer:
        outer.execute(sa.select(1))
        with pytest.raises(NestedWriteError), sqlite_engine.begin() as inner:
            inner.execute(sa.select(1))
    with sqlite_engine.begin() as after:  # the queue is free again
        assert after.execute(sa.select(1)).scalar() == 1


@pytest.fixture
def sqlite_runtime(database_url, runtime):
    if not database_url.startswith("sqlite"):
        pytest.skip("the writer queue is SQLite's; PostgreSQL locks rows")
    return runtime


def _hold_the_write_lock(runtime, holding, release):
    def hold():
        with runtime.session() as s:  # the default: the first statement takes the lock
            s.execute(sa.select(sa.func.count()).select_from(Trust.__table__))
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(5)
    return thread


def test_a_read_committed_session_reads_while_a_writer_holds_the_lock_and_queues_to_write(
    sqlite_runtime, clock
):
    """The web requests' sessions: reads never wait behind a writer; the first write
    waits its turn, then sees what the writer committed."""
    holding, release = threading.Event(), threading.Event()
    writer = _hold_the_write_lock(sqlite_runtime, holding, release)
    wrote = threading.Event()
    seen: list[int] = []

    def request():
        with sqlite_runtime.session(read_committed=True) as s:
            seen.append(s.scalar(sa.select(sa.func.count()).select_from(Trust.__table__)))
            s.add(Trust(code="RW6", name="Trust RW6", sending_facility="RW6",
                        sending_application="RIS", created_at=clock.now()))  # fmt: skip
            s.flush()  # the first write: waits for the lock
            wrote.set()

    reader = threading.Thread(target=request)
    reader.start()
    assert not wrote.wait(0.5)  # queued behind the writer ...
    assert seen == [0]  # ... but its read was answered at once
    release.set()
    writer.join(5)
    reader.join(5)
    assert wrote.is_set()
    with sqlite_runtime.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Trust.__table__)) == 1


def _waits_behind_a_writer(runtime, work) -> bool:
    """Whether `work` (in a thread of its own) waited while a writer held the lock."""
    holding, release = threading.Event(), threading.Event()
    writer = _hold_the_write_lock(runtime, holding, release)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set()))
    thread.start()
    waited = not done.wait(0.5)
    release.set()
    writer.join(5)
    thread.join(5)
    assert done.is_set()
    return waited


def test_a_locking_read_in_a_read_committed_session_takes_the_write_lock_first(sqlite_runtime):
    """SELECT ... FOR UPDATE, which SQLite's SQL leaves out, still waits its turn: what
    the read decides cannot be overtaken by another writer before the write."""

    def locking_read():
        with sqlite_runtime.session(read_committed=True) as s:
            s.execute(sa.select(Trust).with_for_update())

    def plain_read():
        with sqlite_runtime.session(read_committed=True) as s:
            s.execute(sa.select(Trust))

    assert _waits_behind_a_writer(sqlite_runtime, locking_read)
    assert not _waits_behind_a_writer(sqlite_runtime, plain_read)


def test_driver_statements_take_their_turn_as_sqlalchemy_s_do(sqlite_runtime):
    """`worklist.db.driver` runs statements on the sqlite3 connection itself, past the
    event that queues SQLAlchemy's: its writes and locking reads still wait their turn,
    its plain reads in a read-committed session do not."""
    from worklist.db import driver

    count = sa.select(sa.func.count()).select_from(Trust.__table__)
    rename = sa.update(Trust.__table__).values(name=driver.param("name", sa.String()))

    def read_committed(statement):
        def work():
            with sqlite_runtime.session(read_committed=True) as s:
                driver.rows(s, statement, {"name": "x"})

        return work

    assert not _waits_behind_a_writer(sqlite_runtime, read_committed(count))
    assert _waits_behind_a_writer(sqlite_runtime, read_committed(count.with_for_update()))
    assert _waits_behind_a_writer(sqlite_runtime, read_committed(rename))


def test_a_default_session_holds_the_lock_from_its_first_read(sqlite_runtime):
    """The HL7 apply worker and the scheduler's lease read, then write on what they read:
    their sessions take the lock at the first statement."""

    def job():
        with sqlite_runtime.session() as s:
            s.execute(sa.select(sa.func.count()).select_from(Trust.__table__))

    assert _waits_behind_a_writer(sqlite_runtime, job)


def test_one_writer_in_checkpoint_every_checkpoints_the_wal_after_leaving_the_queue(
    sqlite_engine,
):
    """SQLite's own checkpoint ran inside a COMMIT, the writer queue held meanwhile. Now the
    writer with every CHECKPOINT_EVERY-th ticket of the queue checkpoints (PASSIVE), once
    it is out: one checkpoint per CHECKPOINT_EVERY commits to the database, however many
    connections (8 claiming processes) make them, and not one per connection's own
    CHECKPOINT_EVERY commits."""
    from worklist.db import sqlite_writers

    with sqlite_engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == (
            sqlite_writers.AUTOCHECKPOINT_PAGES
        )
    seen: list[tuple[str, bool]] = []
    with sqlite_engine.connect() as one, sqlite_engine.connect() as other:
        for c in (one, other):
            dbapi = c.connection.dbapi_connection
            dbapi.set_trace_callback(
                lambda sql, dbapi=dbapi: seen.append((sql, dbapi.in_transaction))
            )
        for i in range(sqlite_writers.CHECKPOINT_EVERY):  # the two in turn
            c = (one, other)[i % 2]
            with c.begin():
                c.execute(sa.update(Trust.__table__).where(Trust.__table__.c.id == -i)
                          .values(name="x"))  # fmt: skip
        for c in (one, other):
            c.connection.dbapi_connection.set_trace_callback(None)
    checkpoints = [in_tx for sql, in_tx in seen if "wal_checkpoint" in sql]
    assert checkpoints == [False]  # once, and outside the transaction (the queue is free)
