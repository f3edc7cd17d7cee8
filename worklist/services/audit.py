"""The audit log: who did what to which record, when and from where.

Rows are only ever inserted: the application has no code path that updates or
deletes them, and no API or page that could.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db import driver
from worklist.db.models import AuditEvent, User


def record(
    session: Session,
    *,
    at: datetime,
    action: str,
    user: User | None = None,
    object_type: str | None = None,
    object_id: object | None = None,
    detail: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=at,
        user_id=user.id if user else None,
        username=user.username if user else None,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        detail=detail or {},
        remote_addr=remote_addr,
    )
    session.add(event)
    return event


_COLUMNS = AuditEvent.__table__.c
_INSERT = sa.insert(AuditEvent).values(
    {name: driver.param(name, _COLUMNS[name].type) for name in (
        "at", "user_id", "username", "action", "object_type", "object_id", "detail",
        "remote_addr",
    )}
)  # fmt: skip


#: An audit row's columns, in the order `insert_from` takes them.
COLUMNS = (
    "at", "user_id", "username", "action", "object_type", "object_id", "detail", "remote_addr",
)  # fmt: skip


def insert_from(rows: sa.Select[Any]) -> sa.Insert:
    """INSERT INTO audit_event (COLUMNS) SELECT ...: for a statement that writes its own
    audit rows (a data-modifying CTE), in the same round trip as its work."""
    return sa.insert(AuditEvent).from_select(COLUMNS, rows)


def insert(
    session: Session,
    *,
    at: datetime,
    action: str,
    user: User | None = None,
    object_type: str | None = None,
    object_id: object | None = None,
    detail: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> None:
    """The row `record` writes, inserted now with one statement through the driver: for
    hot paths, where the unit of work's flush of a new object costs more than the
    statement."""
    driver.rows(
        session,
        _INSERT,
        {
            "at": at, "user_id": user.id if user else None,
            "username": user.username if user else None, "action": action,
            "object_type": object_type,
            "object_id": None if object_id is None else str(object_id),
            "detail": driver.json(detail or {}), "remote_addr": remote_addr,
        },
    )  # fmt: skip
