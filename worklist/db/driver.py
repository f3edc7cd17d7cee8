"""Core statements run straight through psycopg, for the few PostgreSQL hot paths (next
case) where SQLAlchemy's per-execution work (cache key, parameter and result processing,
ORM loading) costs more than the database's.

A statement is built with `param()` placeholders for the values that change per call
and compiled once, every other value rendered as a literal, then run on the session's
connection inside the session's transaction, so it sees and is seen by everything else
the unit of work does. psycopg prepares a statement it has run five times, so PostgreSQL
plans it once per connection. Values go in as psycopg takes them (aware datetimes; JSON
through `json()`) and come out as it gives them, datetimes turned to UTC as
`UTCDateTime` does.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

import sqlalchemy as sa
from psycopg import postgres, pq
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state, set_committed_value

_DIALECT = postgresql.dialect(paramstyle="pyformat")  # type: ignore[no-untyped-call]
_MARK = "__driver_param__"
T = TypeVar("T")
_MARKED = re.compile(f"{_MARK}([sb])(\\w+?){_MARK}")


def param(name: str, type_: Any) -> sa.ColumnElement[Any]:
    """A per-call value in a driver statement (psycopg's `%(name)s`, cast to its type).

    A marker until compiled: the compiler would double the percent sign of a literal.
    Arrays go in binary (`%(name)b`): psycopg writes a text array through a regular
    expression per element."""
    cast = type_.compile(dialect=_DIALECT)
    form = "b" if isinstance(type_, sa.ARRAY) else "s"
    return sa.literal_column(f"{_MARK}{form}{name}{_MARK}::{cast}", type_)


def json(value: Any) -> Jsonb:
    return Jsonb(value)


@dataclass
class Compiled:
    """A statement's SQL for psycopg, and the names of its result columns once known."""

    text: str
    names: tuple[str, ...] | None = None
    times: tuple[int, ...] = ()  # where the timestamps are, turned to UTC


@functools.lru_cache(maxsize=4096)
def sql(statement: sa.Executable) -> Compiled:
    """The statement's SQL for psycopg, every value but the `param()`s as a literal."""
    text = str(
        statement.compile(  # type: ignore[attr-defined]
            dialect=_DIALECT, compile_kwargs={"literal_binds": True}
        )
    )
    return Compiled(_MARKED.sub(r"%(\2)\1", text))


def rows(
    session: Session, statement: sa.Executable, params: dict[str, Any]
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """Run `statement` on the session's connection: its column names and rows.

    Flushes first, as the session's own queries do, so that the statement sees what the
    unit of work has added or changed."""
    session.flush()
    connection = session.connection().connection.driver_connection
    assert connection is not None
    compiled = sql(statement)
    with connection.cursor() as cursor:
        cursor.execute(compiled.text, params)
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


def loaded(session: Session, model: type[T], values: dict[str, Any]) -> T:
    """The `model` instance for a row read through the driver, as if the session had
    loaded it (identity-mapped, nothing pending)."""
    mapper = model.__mapper__  # type: ignore[attr-defined]
    found = session.identity_map.get((mapper._identity_class, (values["id"],), None))
    if found is None:
        # The row's values as loaded state, without one attribute event per column.
        found = mapper.class_manager.new_instance()
        found.__dict__.update(values)
        make_transient_to_detached(found)
        # Attached as `Session.add` attaches a detached object, without its cascade over
        # the relationships (none loaded here): a sixth of a claim's client CPU went on
        # the identity key and that cascade.
        session._update_impl(instance_state(found))
    else:
        for name, value in values.items():
            set_committed_value(found, name, value)
    return found  # type: ignore[no-any-return]


_TIMESTAMPS = frozenset(postgres.types[name].oid for name in ("timestamptz", "timestamp"))


def _in_utc(row: tuple[Any, ...], times: tuple[int, ...]) -> tuple[Any, ...]:
    values = list(row)
    for i in times:
        if values[i] is not None:
            values[i] = values[i].astimezone(UTC)
    return tuple(values)
