"""Core statements run straight through the DB-API driver (psycopg, sqlite3), for the few
hot paths (next case) where SQLAlchemy's per-execution work (cache key, parameter and
result processing, ORM loading) costs more than the database's.

A statement is built with `param()` placeholders for the values that change per call
and compiled once, every other value rendered as a literal, then run on the session's
connection inside the session's transaction, so it sees and is seen by everything else
the unit of work does.

PostgreSQL: the SQL has PostgreSQL's own $n placeholders and goes through psycopg's
RawCursor as it is: psycopg's cursor parsed `%(name)s` placeholders on every run of a
statement longer than 4 KB, and the next-case claim had to be kept under that. psycopg
prepares a statement it has run five times, so PostgreSQL plans it once per connection.
Values go in as psycopg takes them (aware datetimes; JSON through
`json()`) and come out as it gives them, datetimes turned to UTC as `UTCDateTime` does.

SQLite: values go in as the models' types store them (datetimes as naive UTC text, JSON
as text) and come out through those types' own result processors; a statement that may
write first takes its turn in the writer queue (`sqlite_writers.take_turn`), as every
statement SQLAlchemy runs does. Under the write lock every statement counts: through
SQLAlchemy, a claim held the lock about twice as long as its SQL took.
"""

from __future__ import annotations

import functools
import json as json_module
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from psycopg import RawCursor, postgres, pq
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from worklist.db import sqlite_writers

_DIALECTS = {
    # $n placeholders, as PostgreSQL takes them: no percent signs doubled in literals.
    "postgresql": postgresql.dialect(paramstyle="numeric_dollar"),  # type: ignore[no-untyped-call]
    "sqlite": sqlite.dialect(paramstyle="named"),  # type: ignore[no-untyped-call]
}
_MARK = "__driver_param__"
T = TypeVar("T")
_MARKED = re.compile(f"{_MARK}([sa])(\\w+?)\\|(.+?){_MARK}")


#: PostgreSQL's short names for the types SQLAlchemy spells out (shorter statements).
_SHORT_TYPES = {"TIMESTAMP WITH TIME ZONE": "timestamptz", "INTEGER": "int", "BOOLEAN": "bool"}
_SHORT_TYPE = re.compile("|".join(_SHORT_TYPES))


def param(name: str, type_: Any) -> sa.ColumnElement[Any]:
    """A per-call value in a driver statement: PostgreSQL's `$n`, cast to its type, or
    sqlite3's `:name`.

    A marker until compiled: the compiler would double the percent sign of a literal.
    An array is given as a list and goes in as one value: PostgreSQL's array literal
    (`_array_literal`), or for SQLite, which has no arrays, JSON (`json_each` reads it)."""
    cast = _SHORT_TYPE.sub(
        lambda m: _SHORT_TYPES[m[0]], type_.compile(dialect=_DIALECTS["postgresql"])
    )
    form = "a" if isinstance(type_, sa.ARRAY) else "s"
    return sa.literal_column(f"{_MARK}{form}{name}|{cast}{_MARK}", type_)


def json(value: Any) -> Jsonb:
    return Jsonb(value)


@dataclass
class Compiled:
    """A statement's SQL for the driver, and the names of its result columns once known."""

    text: str
    arrays: frozenset[str] = frozenset()  # PostgreSQL: the array parameters (`_array_literal`)
    params: tuple[str, ...] = ()  # the parameters in placeholder order, those alone sent
    names: tuple[str, ...] | None = None
    times: tuple[int, ...] = ()  # PostgreSQL: where the timestamps are, turned to UTC
    #: SQLite: the result columns that need their type's processor, with it.
    processors: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
    reads_only: bool = False  # SQLite: runs without the write lock in a read-committed session


@functools.lru_cache(maxsize=4096)
def sql(statement: sa.Executable, dialect_name: str = "postgresql") -> Compiled:
    """The statement's SQL for the driver, every value but the `param()`s as a literal."""
    dialect = _DIALECTS[dialect_name]
    compiled = statement.compile(  # type: ignore[attr-defined]
        dialect=dialect, compile_kwargs={"literal_binds": True}
    )
    text = str(compiled)
    marks = _MARKED.findall(text)
    names = tuple(dict.fromkeys(m[1] for m in marks))
    if dialect_name == "postgresql":
        numbers = {name: i for i, name in enumerate(names, 1)}
        return Compiled(
            _MARKED.sub(lambda m: f"${numbers[m[2]]}::{m[3]}", text),
            arrays=frozenset(m[1] for m in marks if m[0] == "a"),
            params=names,
        )
    processors = (
        (i, column.type._cached_result_processor(dialect, None))
        for i, column in enumerate(compiled._result_columns)
    )
    return Compiled(
        _MARKED.sub(r":\2", text),
        params=names,
        processors=tuple((i, p) for i, p in processors if p is not None),
        reads_only=sqlite_writers.reads_only(text, statement),
    )


def rows(
    session: Session, statement: sa.Executable, params: dict[str, Any]
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """Run `statement` on the session's connection: its column names and rows.

    Flushes first, as the session's own queries do, so that the statement sees what the
    unit of work has added or changed."""
    session.flush()
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        return _sqlite_rows(connection, statement, params)
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    compiled = sql(statement)
    with RawCursor(driver_connection) as cursor:
        cursor.execute(compiled.text, _postgresql_values(compiled, params))
        result = cursor.pgresult
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            return (), []
        if compiled.names is None:  # psycopg builds `description` anew each call
            description = cursor.description or ()
            compiled.names = tuple(column.name for column in description)
            compiled.times = tuple(
                i for i, column in enumerate(description) if column.type_code in _TIMESTAMPS
            )
        found = cursor.fetchall()
        if compiled.times:  # only the timestamp columns, not every value of every row
            found = [_in_utc(row, compiled.times) for row in found]
        return compiled.names, found


def _sqlite_rows(
    connection: sa.Connection, statement: sa.Executable, params: dict[str, Any]
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    compiled = sql(statement, "sqlite")
    sqlite_writers.take_turn(connection, reads_only=compiled.reads_only)
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    cursor = driver_connection.execute(compiled.text, _sqlite_values(compiled, params))
    found = cursor.fetchall()
    if compiled.names is None:
        compiled.names = tuple(column[0] for column in cursor.description or ())
    if not compiled.names:
        return (), []
    if compiled.processors:
        found = [_processed(row, compiled.processors) for row in found]
    return compiled.names, found


def plan(
    session: Session, statement: sa.Executable, params: dict[str, Any], *, analyze: bool = False
) -> list[str]:
    """The database's plan for `statement` with these values, one line a row: PostgreSQL's
    EXPLAIN (with `analyze`, run: roll back after a statement that writes), SQLite's
    EXPLAIN QUERY PLAN. For the benchmark's record and the tests that hold a plan."""
    connection = session.connection()
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    if connection.dialect.name == "sqlite":
        compiled = sql(statement, "sqlite")
        values = _sqlite_values(compiled, params)
        rows = driver_connection.execute("EXPLAIN QUERY PLAN " + compiled.text, values)
        return [str(row[-1]) for row in rows.fetchall()]
    compiled = sql(statement)
    options = "(ANALYZE, BUFFERS, COSTS OFF) " if analyze else ""
    with RawCursor(driver_connection) as cursor:
        cursor.execute(f"EXPLAIN {options}{compiled.text}", _postgresql_values(compiled, params))
        return [row[0] for row in cursor.fetchall()]


def _postgresql_values(compiled: Compiled, params: dict[str, Any]) -> tuple[Any, ...]:
    """The values in placeholder order, as psycopg takes them: lists as array literals
    (`_array_literal`)."""
    arrays = compiled.arrays
    return tuple(
        _array_literal(tuple(params[name])) if name in arrays else params[name]
        for name in compiled.params
    )


def _sqlite_values(compiled: Compiled, params: dict[str, Any]) -> dict[str, Any]:
    """The values the statement uses, as the models' types store them in SQLite."""
    return {name: _sqlite_value(params[name]) for name in compiled.params}


def as_stored_in_sqlite(params: dict[str, Any]) -> dict[str, Any]:
    """Values converted once, as SQLite stores them, for several statements in a row:
    each statement would convert every value it uses again (a claim's lists of trusts
    and credentials to JSON, its times to text), inside the write lock."""
    return {name: _sqlite_value(value) for name, value in params.items()}


def _processed(
    row: tuple[Any, ...], processors: tuple[tuple[int, Callable[[Any], Any]], ...]
) -> tuple[Any, ...]:
    values = list(row)
    for i, process in processors:
        values[i] = process(values[i])
    return tuple(values)


_SQLITE_DATETIME = (
    _DIALECTS["sqlite"].type_descriptor(sa.DateTime()).bind_processor(_DIALECTS["sqlite"])
)


_AS_THEY_ARE = frozenset((int, str, float, bool, bytes))


def _sqlite_value(value: Any) -> Any:
    """A value as the models' types store it in SQLite (see `UTCDateTime`, `sa.JSON`)."""
    if value is None or type(value) in _AS_THEY_ARE:
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the driver; pass an aware datetime")
        return _SQLITE_DATETIME(value.astimezone(UTC).replace(tzinfo=None))  # type: ignore[misc]
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Jsonb):
        return json_module.dumps(value.obj)
    if isinstance(value, dict | list | tuple):
        return json_module.dumps(value)
    return value


def loaded(session: Session, model: type[T], values: dict[str, Any]) -> T:
    """The `model` instance for a row read through the driver, as if the session had
    loaded it (identity-mapped, nothing pending, the attributes not given expired)."""
    mapper = model.__mapper__  # type: ignore[attr-defined]
    key = (mapper._identity_class, (values["id"],), None)
    found = session.identity_map.get(key)
    if found is None:
        # What `make_transient_to_detached` and `Session.add` do for a new instance,
        # without what they need only for one that has a history, a key of several
        # columns or relationships loaded (none here): the identity key read through the
        # attributes, every column's history committed, the unloaded attributes worked
        # out anew each time, the cascade over relationships. It was a sixth of a claim's
        # client CPU; 10.8 -> 6.6 us an instance (a Study).
        found = mapper.class_manager.new_instance()
        found.__dict__.update(values)
        state = instance_state(found)
        state.key = key
        state._expire_attributes(state.dict, _unloaded(mapper, frozenset(values)))
        session._update_impl(state)
    else:
        for name, value in values.items():
            set_committed_value(found, name, value)
    return found  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=256)
def _unloaded(mapper: Any, given: frozenset[str]) -> frozenset[str]:
    """The attributes of `mapper` not among those `given`."""
    return frozenset(mapper.class_manager) - given


@functools.lru_cache(maxsize=4096)
def _array_literal(values: tuple[Any, ...]) -> str:
    """An array of integers or strings as PostgreSQL's array literal, for a parameter
    cast to its array type in the SQL. Kept: a reader's trusts and credentials are the
    same array on every claim (`pool.pool_values`).

    One parameter type whatever the values, so that one prepared statement serves them
    all: psycopg types a list by its contents (an empty list as unknown, small integers as
    smallint[]) and prepares a statement per parameter types (a claim with no area-limited
    credentials was prepared apart from one with some)."""
    items = (
        "NULL" if v is None
        else str(v) if isinstance(v, int)
        else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values
    )  # fmt: skip
    return "{" + ",".join(items) + "}"


_TIMESTAMPS = frozenset(postgres.types[name].oid for name in ("timestamptz", "timestamp"))


def _in_utc(row: tuple[Any, ...], times: tuple[int, ...]) -> tuple[Any, ...]:
    values = list(row)
    for i in times:
        if values[i] is not None:
            values[i] = values[i].astimezone(UTC)
    return tuple(values)
