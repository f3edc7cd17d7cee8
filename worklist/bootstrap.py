"""The composition root: builds the engine, sessions and clock for every process and for tests.

Nothing is wired at import time; each entry point (gunicorn worker, HL7 listener,
scheduler, CLI, test) calls `build_runtime` once and passes the result down.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg.errors
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import RollbackToSavepointClause

from worklist.clock import Clock, SystemClock
from worklist.config import Settings
from worklist.db import sqlite_writers

logger = logging.getLogger(__name__)


def create_db_engine(url: str, *, pool_size: int = 5) -> sa.Engine:
    """An engine tuned per database: SQLite in WAL mode with a busy timeout, PostgreSQL pooled."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=pool_size + 10,
            max_overflow=40,
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # Take over transaction control from pysqlite so BEGIN is issued when SQLAlchemy
            # begins; foreign keys are off by default in SQLite.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Checkpoints are run after leaving the writer queue (`sqlite_writers`).
            cursor.execute(f"PRAGMA wal_autocheckpoint={sqlite_writers.AUTOCHECKPOINT_PAGES}")
            cursor.close()

        database = sa.make_url(url).database
        on_disk = database and database != ":memory:" and not database.startswith("file:")
        sqlite_writers.install(engine, database if on_disk else None)  # BEGIN IMMEDIATE, in turn
        return engine
    # No JIT: every query here is a short index walk, but a pessimistic estimate (a
    # correlated subquery costed per candidate) once pushed the worklist page over
    # jit_above_cost and it spent 390 ms compiling to run in 14.
    engine = sa.create_engine(
        url, pool_size=pool_size, max_overflow=pool_size * 2,
        connect_args={"options": "-c jit=off"},
    )  # fmt: skip
    _ping_when_idle(engine)
    _keep_prepared_statements(engine.dialect)
    return engine


def _keep_prepared_statements(dialect: sa.Dialect) -> None:
    """Roll back through libpq, not through psycopg.

    psycopg forgets every statement it has prepared on a connection at a ROLLBACK (its
    `rollback()`, or any ROLLBACK TO SAVEPOINT it runs), and has the server DEALLOCATE
    ALL. Each failed web request (a 404, a 409 for a study claimed a moment before)
    rolls back, and so does each HL7 message that fails inside its savepoint: the claim
    and every other statement of that connection were parsed and planned afresh for
    their next five runs. One request in 20 failing cost next case 70 % more backend CPU
    a claim (0.9 -> 1.6 ms). PostgreSQL's prepared statements outlive transactions and
    savepoints; psycopg clears them in case the transaction changed the schema, which
    none here does (migrations run on connections of their own)."""

    def do_rollback(dbapi_connection: Any) -> None:
        connection = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
        if connection.info.transaction_status != pq.TransactionStatus.IDLE:  # as psycopg
            _roll_back(connection, b"ROLLBACK")

    def do_rollback_to_savepoint(connection: sa.Connection, name: str) -> None:
        command = dialect.statement_compiler(dialect, RollbackToSavepointClause(name))
        _roll_back(connection.connection.driver_connection, str(command).encode())

    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    dialect.do_rollback_to_savepoint = do_rollback_to_savepoint  # type: ignore[method-assign]


def _roll_back(connection: Any, command: bytes) -> None:
    result = connection.pgconn.exec_(command)
    if result.status == pq.ExecStatus.COMMAND_OK:
        return
    if connection.pgconn.status == pq.ConnStatus.BAD:  # as psycopg: the pool discards it
        message = (result.error_message or b"").decode(errors="replace").strip()
        raise psycopg.OperationalError(message or "the connection to the server was lost")
    raise psycopg.errors.error_from_result(result, encoding=connection.info.encoding)


#: A pooled connection unused for longer than this is tested before it is handed out.
IDLE_BEFORE_PING = 1.0


def _ping_when_idle(engine: sa.Engine) -> None:
    """Test a pooled connection on checkout only if it has sat idle.

    SQLAlchemy's pool_pre_ping tests every checkout: a round trip and ~0.3 ms of CPU on
    each request, a tenth of a next-case claim. A connection used within the last second
    is as good as tested; one that sat idle (a database restart, a firewall dropping
    quiet connections) is pinged, and if dead replaced before anyone sees it. Were the
    database to fail within that second, the request fails once and SQLAlchemy discards
    the pool's connections as it detects the disconnect.
    """

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record):  # type: ignore[no-untyped-def]
        record.info["checked_in_at"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy):  # type: ignore[no-untyped-def]
        idle_since = record.info.get("checked_in_at")
        if idle_since is None or time.monotonic() - idle_since < IDLE_BEFORE_PING:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable
            logger.info("replacing a pooled database connection that failed its ping: %s", exc)
            raise sa.exc.DisconnectionError(str(exc)) from exc


@dataclass
class Runtime:
    """What every process needs: settings, the database, and the clock."""

    settings: Settings
    engine: sa.Engine
    session_factory: sessionmaker[Session]
    clock: Clock
    #: Sessions whose reads see what is committed, statement by statement, as on
    #: PostgreSQL (its default, READ COMMITTED); on SQLite only their writes queue for
    #: the write lock (`sqlite_writers`). For the web requests.
    read_committed_factory: sessionmaker[Session]

    @contextmanager
    def session(self, *, read_committed: bool = False) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        factory = self.read_committed_factory if read_committed else self.session_factory
        with factory.begin() as session:
            yield session

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()


def settle_after_start_up() -> None:
    """Leave the objects alive now (modules, mappers, the app: ~100,000 of them) out of
    every later garbage collection (`gc.freeze`), in a process that serves requests.

    A full collection walked them all: 15-40 ms, at a point that comes round every few
    thousand requests, and one landed on a worklist page in two hundred (the page's p99
    54-57 ms against 12 without it). They live as long as the process anyway."""
    gc.freeze()


def build_runtime(settings: Settings, *, clock: Clock | None = None) -> Runtime:
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(url, pool_size=settings.db_pool_size)
    factory = sessionmaker(engine, expire_on_commit=False)
    read_committed = engine.execution_options(**{sqlite_writers.READ_COMMITTED: True})
    return Runtime(
        settings=settings, engine=engine, session_factory=factory, clock=clock or SystemClock(),
        read_committed_factory=sessionmaker(read_committed, expire_on_commit=False),
    )  # fmt: skip
