"""SQLite writers wait their turn on a file lock, not in SQLite's busy handler.

Every SQLite write transaction starts with BEGIN IMMEDIATE, so writers are serialised.
A writer that finds the database locked waits in SQLite's busy handler, which sleeps 1,
2, 5, 10, 15 ... up to 100 ms between tries however soon the lock is free: with eight
processes claiming studies at once, transactions of a few milliseconds had a 99th
percentile of hundreds. Here each connection first takes its turn in a first-come,
first-served queue (`WriterQueue`: byte-range locks on `<database>-writer`), and leaves it
once its COMMIT or ROLLBACK has run; the kernel wakes the next writer the moment it does.
Threads of one process queue as processes do (each connection opens the file itself).
A thread that already holds the lock through one connection and begins writing on
another would wait for itself forever: that is refused with an error instead.

When the lock is taken: by default at a transaction's first statement, so the whole
transaction is serialised (the code of the HL7 apply worker and the scheduler's lease
relies on that). A connection with the execution option `READ_COMMITTED` (the web
requests' sessions, see `worklist.bootstrap`) reads without it, each statement seeing
what is committed, as PostgreSQL's READ COMMITTED does, and takes it at its first write
or locking read (`SELECT ... FOR UPDATE`, which SQLite's SQL leaves out): readers never
queue behind writers, and a next-case claim holds the lock only from its claim to its
COMMIT, not while it loads the user and their facts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import struct
import threading
import weakref
from typing import Any

import sqlalchemy as sa

logger = logging.getLogger(__name__)

#: WAL checkpoints: the writer holding every this-many-th ticket of the queue (across
#: every process, so one checkpoint per this many commits to the database) copies the WAL
#: into the database (PASSIVE: it never waits for, nor stops, readers and writers), once
#: it has left the queue. SQLite's own checkpoint runs inside the COMMIT
#: that fills 1,000 pages, while the writer still holds the queue: every next-case
#: claim writes ~16 pages, so one in ~60 held the queue ~8 ms longer (an fsync of the
#: database file) and every writer waiting behind it waited that too.
CHECKPOINT_EVERY = 50
#: SQLite's own checkpoint stays, as a safety net, at this many pages.
AUTOCHECKPOINT_PAGES = 10_000

#: The execution option under which reads go without the write lock (see above).
READ_COMMITTED = "worklist_read_committed"
_READS = ("SELECT", "PRAGMA", "EXPLAIN")


def reads_only(text: str, statement: Any) -> bool:
    """A plain read: SELECT (without FOR UPDATE, which SQLite's SQL leaves out but the
    statement still says), PRAGMA or EXPLAIN. Anything else (INSERT, UPDATE, DELETE,
    SAVEPOINT, DDL, WITH ...) may write."""
    if not text.lstrip()[:7].upper().startswith(_READS):
        return False
    return getattr(statement, "_for_update_arg", None) is None


def _checkpoint(dbapi_connection: Any) -> None:
    try:
        dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:  # the commit stands; the next checkpoint catches up
        logger.warning("WAL checkpoint failed: %s", exc)


class NestedWriteError(RuntimeError):
    """A thread began a second SQLite write transaction while holding one."""


#: Byte-range locks on `<database>-writer` (open file description locks, as flock's,
#: so that each connection, not each process, holds its own): byte 0 guards the ticket
#: counter kept in the file's first 8 bytes; the holder of ticket t holds the byte
#: 1 + t % SLOTS while it waits and writes.
SLOTS = 4096
_DISPENSER = 0


def _byte_lock(fd: int, offset: int, kind: int, wait: bool = True) -> None:
    # struct flock: l_type, l_whence, (pad), l_start, l_len, l_pid (0 for OFD locks), (pad)
    request = struct.pack("hh4xqqi4x", kind, os.SEEK_SET, offset, 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)


class WriterQueue:
    """A first-come, first-served queue of writers across processes: a ticket lock.

    A writer takes the next ticket t and holds its slot (t), then waits for the slot of
    ticket t - 1, which its holder drops when it is done: each waiter is woken by its own
    predecessor alone. With one flock(2) for all, every release woke every waiter to race
    for it, and the unlucky waited several turns: among 8 claiming processes the 99th
    percentile wait was 2.7 times the mean. A writer that dies drops its slot with its
    descriptor; its successor then starts, maybe beside the writer before it, which
    BEGIN IMMEDIATE still serialises (the queue only spares SQLite's busy handler)."""

    def __init__(self, database_path: str) -> None:
        self.lock_path = f"{database_path}-writer"
        self._files: dict[int, int] = {}  # id(DB-API connection) -> lock file descriptor
        self._holders: dict[int, tuple[int, int]] = {}  # descriptor -> (thread, ticket)
        self._guard = threading.Lock()

    def opened(self, dbapi_connection: Any) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._guard:
            self._files[id(dbapi_connection)] = fd

    def closed(self, dbapi_connection: Any) -> None:
        with self._guard:
            fd = self._files.pop(id(dbapi_connection), None)
            if fd is not None:
                self._holders.pop(fd, None)
        if fd is not None:
            os.close(fd)  # drops its locks too

    def wait_turn(self, dbapi_connection: Any) -> None:
        me = threading.get_ident()
        with self._guard:
            fd = self._files[id(dbapi_connection)]
            if any(t == me and other != fd for other, (t, _) in self._holders.items()):
                raise NestedWriteError(
                    "this thread already has a write transaction open on another connection"
                )
        ticket = self._take_ticket(fd)
        try:
            before = 1 + (ticket - 1) % SLOTS
            _byte_lock(fd, before, fcntl.F_WRLCK)  # free once the writer before is done
            _byte_lock(fd, before, fcntl.F_UNLCK)
        except BaseException:
            _byte_lock(fd, 1 + ticket % SLOTS, fcntl.F_UNLCK)
            raise
        with self._guard:
            self._holders[fd] = (me, ticket)

    @staticmethod
    def _take_ticket(fd: int) -> int:
        _byte_lock(fd, _DISPENSER, fcntl.F_WRLCK)
        try:
            ticket = int.from_bytes(os.pread(fd, 8, 0) or b"\0", "little")
            os.pwrite(fd, (ticket + 1).to_bytes(8, "little"), 0)
            # Taken before the next ticket is given: that writer waits on this slot.
            _byte_lock(fd, 1 + ticket % SLOTS, fcntl.F_WRLCK)
        finally:
            _byte_lock(fd, _DISPENSER, fcntl.F_UNLCK)
        return ticket

    def done(self, dbapi_connection: Any) -> int | None:
        """Leave the queue: the ticket held, or None if none was."""
        with self._guard:
            fd = self._files.get(id(dbapi_connection))
            held = None if fd is None else self._holders.pop(fd, None)
        if fd is None or held is None:
            return None
        _byte_lock(fd, 1 + held[1] % SLOTS, fcntl.F_UNLCK)  # the next writer starts
        return held[1]

    @staticmethod
    def due_for_checkpoint(ticket: int) -> bool:
        """One writer in `CHECKPOINT_EVERY`, counted across every process: the WAL grows
        with the commits to the database, however many connections make them."""
        return ticket % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1


class _NoQueue(WriterQueue):
    """An in-memory database: one connection, no file to lock."""

    def __init__(self) -> None:
        pass

    def opened(self, dbapi_connection: Any) -> None:
        pass

    def closed(self, dbapi_connection: Any) -> None:
        pass

    def wait_turn(self, dbapi_connection: Any) -> None:
        pass

    def done(self, dbapi_connection: Any) -> int | None:
        return None  # no ticket, and no WAL in memory to checkpoint


#: Each engine's queue, by its dialect (an engine's own, shared by its `execution_options`
#: copies, whose sessions the web requests use).
_QUEUES: weakref.WeakKeyDictionary[sa.Dialect, WriterQueue] = weakref.WeakKeyDictionary()


def take_turn(connection: sa.Connection, *, reads_only: bool) -> None:
    """Before a statement on `connection`: BEGIN IMMEDIATE in the writer queue, unless a
    transaction is open or the statement is a read of a read-committed connection.
    SQLAlchemy's statements come here through an event; `worklist.db.driver`'s, which
    run past it, call it themselves."""
    dbapi = connection.connection.dbapi_connection
    if dbapi.in_transaction:  # type: ignore[union-attr]
        return
    if reads_only and connection.get_execution_options().get(READ_COMMITTED):
        return  # autocommit: this statement alone, what is committed
    # IMMEDIATE takes SQLite's write lock at BEGIN, so two writers never both hold a
    # read lock and fail with "database is locked" when upgrading it.
    queue = _QUEUES[connection.dialect]
    queue.wait_turn(dbapi)
    try:
        dbapi.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
    except BaseException:
        queue.done(dbapi)
        raise


def install(engine: sa.Engine, database_path: str | None) -> WriterQueue:
    """Queue `engine`'s write transactions; returns the queue (for tests). Without a
    database file (in memory) there is no file to lock: BEGIN IMMEDIATE alone."""
    queue = WriterQueue(database_path) if database_path else _NoQueue()
    _QUEUES[engine.dialect] = queue
    sa.event.listen(engine, "connect", lambda dbapi, _record: queue.opened(dbapi))
    sa.event.listen(engine, "close", lambda dbapi, _record: queue.closed(dbapi))
    sa.event.listen(engine, "close_detached", lambda dbapi: queue.closed(dbapi))

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _begin(conn, _cursor, statement, _parameters, context, _executemany):  # type: ignore[no-untyped-def]
        compiled = getattr(getattr(context, "compiled", None), "statement", None)
        take_turn(conn, reads_only=reads_only(statement, compiled))

    # After, not before, the COMMIT or ROLLBACK has run (the engine's events fire before),
    # and also when the pool rolls back a connection returned to it.
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(dbapi_connection: Any) -> None:
        dbapi = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        wrote = dbapi.in_transaction
        try:
            commit(dbapi_connection)
        finally:
            ticket = queue.done(dbapi)
        if wrote and ticket is not None and queue.due_for_checkpoint(ticket):
            _checkpoint(dbapi)

    def do_rollback(dbapi_connection: Any) -> None:
        try:
            rollback(dbapi_connection)
        finally:
            queue.done(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    return queue
