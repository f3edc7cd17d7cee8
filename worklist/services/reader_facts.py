"""What eligibility reads about a reader: their agreements, credentials and duty
sessions (kept per database connection until someone edits them), and what they hold.

The rules themselves are `worklist.domain.eligibility`'s; this module reads their
inputs. Next case uses the kept facts and checks them in its claim statement
(`worklist.services.worklist.next_case`); everything else reads them afresh.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db import driver
from worklist.db.models import Credential, DutySession, ReportingPermission, Study, Trust, User
from worklist.domain.eligibility import (
    LONDON,
    DutySlot,
    HeldCredential,
    Radiologist,
    ReportingAgreement,
)
from worklist.domain.study import StudyStatus
from worklist.services.pool import pool_values

#: What fills a duty session: the studies a reader holds to report or to verify.
HELD_STATUSES = frozenset({StudyStatus.READY.value, StudyStatus.PRELIMINARY.value})


#: How far ahead a connection keeps a reader's duty sessions with their other standing
#: facts (`standing`); it reads them again after that, or after any edit.
FACTS_HORIZON = timedelta(hours=1)

#: Where a connection keeps its readers' standing facts (`sa.Connection.info`, which
#: lives as long as the database connection: one database, whatever the process serves).
_STANDING = "worklist.standing_facts"


@dataclass(frozen=True)
class Standing:
    """What eligibility reads about a reader that changes only when someone edits it:
    agreements, credentials and the duty sessions overlapping [`read_at`, `until`), as of
    `version` (the reader's `User.facts_version`, counted by the database's triggers)."""

    version: int
    agreements: tuple[ReportingAgreement, ...]
    credentials: tuple[HeldCredential, ...]
    sessions: tuple[DutySlot, ...]
    read_at: datetime
    until: datetime
    #: `pool_values` by London day: made from these facts alone, once a day.
    pools: dict[date, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def pool_values(self, radiologist: Radiologist, now: datetime) -> dict[str, Any]:
        """The pool statement's values for `radiologist` (made from these facts) at `now`."""
        today = now.astimezone(LONDON).date()
        if today not in self.pools:
            self.pools[today] = pool_values(radiologist, now)
        return self.pools[today]


@functools.cache
def _standing_query() -> sa.CompoundSelect[Any]:
    """Built once (composing this UNION costs more than running it), for the driver."""
    user_id = driver.param("user_id", sa.Integer())
    now = driver.param("now", DutySession.starts_at.type)
    until = driver.param("until", DutySession.ends_at.type)
    # Typed NULLs in the first branch: PostgreSQL resolves the UNION's column types from it.
    agreements = sa.select(
        sa.literal(0).label("kind"), ReportingPermission.id, ReportingPermission.trust_id,
        ReportingPermission.starts_on, ReportingPermission.ends_on, Trust.code.label("text1"),
        sa.cast(sa.null(), sa.String).label("text2"),
        sa.cast(sa.null(), DutySession.starts_at.type).label("starts_at"),
        sa.cast(sa.null(), DutySession.ends_at.type).label("ends_at"),
        sa.cast(sa.null(), sa.Float).label("number"),
        sa.cast(sa.null(), sa.Boolean).label("flag"),
    ).join(Trust, Trust.id == ReportingPermission.trust_id).where(
        ReportingPermission.user_id == user_id
    )  # fmt: skip
    credentials = sa.select(
        sa.literal(1), Credential.id, sa.null(), sa.null(), sa.null(), Credential.modality,
        Credential.body_area, sa.null(), sa.null(), sa.null(), sa.null(),
    ).where(Credential.user_id == user_id)  # fmt: skip
    duty = sa.select(
        sa.literal(2), DutySession.id, sa.null(), sa.null(), sa.null(), DutySession.location,
        sa.null(), DutySession.starts_at, DutySession.ends_at, DutySession.capacity,
        DutySession.free_choice,
    ).where(
        DutySession.user_id == user_id, DutySession.starts_at < until, DutySession.ends_at > now
    )  # fmt: skip
    # In the same statement, so that the count is that of the facts read with it.
    version = sa.select(
        sa.literal(3), User.facts_version, sa.null(), sa.null(), sa.null(), sa.null(),
        sa.null(), sa.null(), sa.null(), sa.null(), sa.null(),
    ).where(User.id == user_id)  # fmt: skip
    return sa.union_all(agreements, credentials, duty, version)


def standing(
    session: Session, *, user_id: int, now: datetime, fresh: bool = False
) -> tuple[Standing, bool]:
    """The reader's standing facts, and whether they came from what this connection
    kept (next case checks those against the stored count in its claim statement).

    One UNION ALL of small index lookups, each row tagged with its kind, when read."""
    kept: dict[int, Standing] = session.connection().info.setdefault(_STANDING, {})
    found = kept.get(user_id)
    if found is not None and not fresh and found.read_at <= now < found.until:
        return found, True
    until = now + FACTS_HORIZON
    values = {"user_id": user_id, "now": now, "until": until}
    permissions: list[ReportingAgreement] = []
    held_credentials: list[HeldCredential] = []
    slots: list[DutySlot] = []
    version = 0
    for kind, row_id, trust_id, starts_on, ends_on, text1, text2, starts_at, ends_at, number, \
            flag in sorted(driver.rows(session, _standing_query(), values)[1],
                           key=lambda r: (r[0], r[1])):  # fmt: skip
        if kind == 0:
            permissions.append(ReportingAgreement(trust_id, starts_on, ends_on, text1, user_id))
        elif kind == 1:
            held_credentials.append(HeldCredential(text1, text2))
        elif kind == 2:
            slots.append(DutySlot(starts_at, ends_at, number, bool(flag), text1, row_id))
        else:
            version = row_id
    found = Standing(version, tuple(permissions), tuple(held_credentials), tuple(slots), now, until)
    kept[user_id] = found
    return found, False


def radiologist_at(session: Session, user: User, facts: Standing, now: datetime) -> Radiologist:
    """The reader's facts at `now`: their standing ones, and the effort they hold when a
    capped session needs it (only the cap reads it: a reader holding many studies made
    every claim sum them all)."""
    slots = tuple(slot for slot in facts.sessions if slot.covers(now))
    capped = any(slot.capacity is not None for slot in slots)
    return Radiologist(
        user_id=user.id,
        agreements=facts.agreements,
        credentials=facts.credentials,
        sessions=slots,
        session_load=_held_load(session, user.id) if capped else 0.0,
        active=user.active and user.role != "integration",
    )


def radiologist_facts(session: Session, *, user: User, now: datetime) -> Radiologist:
    """Everything eligibility needs about `user`, read now."""
    found, _ = standing(session, user_id=user.id, now=now, fresh=True)
    return radiologist_at(session, user, found, now)


def _held_sum() -> sa.ColumnElement[float]:
    """The effort of the studies held to report or verify, summed in the database; the
    status test inside the sum, so that both planners reach the rows through
    ix_study_claimed_by (see `held_by`)."""
    held_statuses = sa.literal_column(", ".join(f"'{s}'" for s in sorted(HELD_STATUSES)))
    return sa.func.coalesce(
        sa.func.sum(sa.case((Study.status.in_([held_statuses]), Study.effort), else_=0.0)), 0.0
    )


@functools.cache
def _held_load_query() -> sa.Select[tuple[float]]:
    """One reader's held effort, for the driver (next case, under a capped session)."""
    return sa.select(_held_sum()).where(
        Study.claimed_by_id == driver.param("user_id", sa.Integer())
    )


def _held_load(session: Session, user_id: int) -> float:
    return float(driver.rows(session, _held_load_query(), {"user_id": user_id})[1][0][0] or 0.0)


def held_effort(session: Session, user_ids: Iterable[int]) -> dict[int, float]:
    """The effort each user holds to report or verify (what fills a session), in one
    query: for callers that need it without a capped session (the facts sum it only
    under one)."""
    ids = list(user_ids)
    if not ids:
        return {}
    rows = session.execute(
        sa.select(Study.claimed_by_id, _held_sum())
        .where(Study.claimed_by_id.in_(ids))
        .group_by(Study.claimed_by_id)
    ).all()
    return {int(user_id): float(total or 0.0) for user_id, total in rows}


def held_by(user_id: int) -> sa.Select[Study]:
    """The studies a user holds: a handful of rows, filtered and sorted in Python, so that
    both planners reach them through ix_study_claimed_by alone (with a status term SQLite
    may walk every ready study through ix_study_status_urgency instead)."""
    return sa.select(Study).where(Study.claimed_by_id == user_id)
