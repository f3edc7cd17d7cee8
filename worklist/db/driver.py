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
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

_DIALECT = postgresql.dialect(paramstyle="pyformat")  # type: ignore[no-untyped-call]
_MARK = "__driver_param__"
_MARKED = re.compile(f"{_MARK}(\\w+?){_MARK}")


def param(name: str, type_: Any) -> sa.ColumnElement[Any]:
    """A per-call value in a driver statement (psycopg's `%(name)s`, cast to its type).

    A marker until compiled: the compiler would double the percent sign of a literal."""
    cast = type_.compile(dialect=_DIALECT)
    return sa.literal_column(f"{_MARK}{name}{_MARK}::{cast}", type_)


def json(value: Any) -> Jsonb:
    return Jsonb(value)


@functools.lru_cache(maxsize=4096)
def sql(statement: sa.Executable) -> str:
    """The statement's SQL for psycopg, every value but the `param()`s as a literal."""
    text = str(
        statement.compile(  # type: ignore[attr-defined]
            dialect=_DIALECT, compile_kwargs={"literal_binds": True}
        )
    )
    return _MARKED.sub(r"%(\1)s", text)


def rows(
    session: Session, statement: sa.Executable, params: dict[str, Any]
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """Run `statement` on the session's connection: its column names and rows.

    Flushes first, as the session's own queries do, so that the statement sees what the
    unit of work has added or changed."""
    session.flush()
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as cursor:
        cursor.execute(sql(statement), params)
        if cursor.description is None:
            return (), []
        names = tuple(column.name for column in cursor.description)
        return names, [tuple(_utc(v) for v in row) for row in cursor.fetchall()]


def _utc(value: Any) -> Any:
    return value.astimezone(UTC) if isinstance(value, datetime) else value
