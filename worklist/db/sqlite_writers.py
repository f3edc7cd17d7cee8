"""SQLite writers wait their turn on a file lock, not in SQLite's busy handler.

Every SQLite transaction starts with BEGIN IMMEDIATE (see `worklist.bootstrap`), so
writers are serialised. A writer that finds the database locked waits in SQLite's busy
handler, which sleeps 1, 2, 5, 10, 15 ... up to 100 ms between tries however soon the
lock is free: with eight processes claiming studies at once, transactions of a few
milliseconds had a 99th percentile of hundreds. Here each connection first takes an
exclusive flock(2) on `<database>-writer`, and drops it once its COMMIT or ROLLBACK has
run; the kernel wakes a waiter the moment it is dropped. Threads of one process queue as
processes do (each connection opens the file itself). A thread that already holds the
lock through one connection and begins on another would wait for itself forever: that
is refused with an error instead.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Any

import sqlalchemy as sa


class NestedWriteError(RuntimeError):
    """A thread began a second SQLite write transaction while holding one."""


class WriterQueue:
    def __init__(self, database_path: str) -> None:
        self.lock_path = f"{database_path}-writer"
        self._files: dict[int, int] = {}  # id(DB-API connection) -> lock file descriptor
        self._holders: dict[int, int] = {}  # descriptor -> thread holding it
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
            os.close(fd)  # drops the lock too

    def wait_turn(self, dbapi_connection: Any) -> None:
        me = threading.get_ident()
        with self._guard:
            fd = self._files[id(dbapi_connection)]
            if any(t == me and other != fd for other, t in self._holders.items()):
                raise NestedWriteError(
                    "this thread already has a write transaction open on another connection"
                )
        fcntl.flock(fd, fcntl.LOCK_EX)
        with self._guard:
            self._holders[fd] = me

    def done(self, dbapi_connection: Any) -> None:
        with self._guard:
            fd = self._files.get(id(dbapi_connection))
            if fd is None or self._holders.pop(fd, None) is None:
                return
        fcntl.flock(fd, fcntl.LOCK_UN)


def install(engine: sa.Engine, database_path: str) -> WriterQueue:
    """Queue `engine`'s write transactions; returns the queue (for tests)."""
    queue = WriterQueue(database_path)
    sa.event.listen(engine, "connect", lambda dbapi, _record: queue.opened(dbapi))
    sa.event.listen(engine, "close", lambda dbapi, _record: queue.closed(dbapi))
    sa.event.listen(engine, "close_detached", lambda dbapi: queue.closed(dbapi))

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        # IMMEDIATE takes SQLite's write lock at BEGIN, so two writers never both hold a
        # read lock and fail with "database is locked" when upgrading it.
        dbapi = conn.connection.dbapi_connection
        queue.wait_turn(dbapi)
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            queue.done(dbapi)
            raise

    # After, not before, the COMMIT or ROLLBACK has run (the engine's events fire before),
    # and also when the pool rolls back a connection returned to it.
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(dbapi_connection: Any) -> None:
        try:
            commit(dbapi_connection)
        finally:
            queue.done(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))

    def do_rollback(dbapi_connection: Any) -> None:
        try:
            rollback(dbapi_connection)
        finally:
            queue.done(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    return queue
