"""The shared pools in SQL: the unclaimed studies a radiologist may be offered, in order.

Two pools are read top-down in worklist order (most urgent first, then newest id): the
ready pool (`ix_study_ready_pool`) and the verification pool of preliminary reports
(`ix_study_verification_pool`). The agreement and credential rules of
`worklist.domain.eligibility.may_report` are written here as SQL so that the index scan
stops at the first row that qualifies; `may_report` still decides every row handed out.

A pool's statement takes the radiologist's trusts and credentials as parameters
(`shared_pool`, `pool_values`): one SQL text for every radiologist, never depending on
the clock, compiled once per process and prepared once per connection, not once per
radiologist. Next case, the worklist page and the verification pool all read it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from worklist.db import driver
from worklist.db.models import Assignment, Study
from worklist.domain.eligibility import (
    LONDON,
    PAEDIATRIC,
    SUBSPECIALTY_BODY_AREAS,
    HeldCredential,
    Radiologist,
    credential_area,
)
from worklist.domain.priority import urgency_floor
from worklist.domain.study import StudyStatus

READY = StudyStatus.READY.value
PRELIMINARY = StudyStatus.PRELIMINARY.value
#: Worklist order: most urgent first. Ties (same tier, same due second) are broken
#: newest-id first so that PostgreSQL and SQLite read the pool indexes backwards.
WORKLIST_ORDER = (Study.urgency.desc(), Study.id.desc())


def _literal(value: str) -> sa.ColumnElement[str]:
    """Written into the SQL, so that the planner can match a partial index's predicate,
    even in a prepared statement. In the statement itself, not a bound parameter
    rendered at each execution (`literal_execute`): SQLAlchemy re-rendered the whole
    claim statement's text for that on every SQLite claim, inside the write lock."""
    return sa.literal_column(f"'{value}'", sa.String())


#: The pool statuses as literals (see `_literal`).
STATUS_LITERAL = {READY: _literal(READY), PRELIMINARY: _literal(PRELIMINARY)}


def unclaimed(status: str) -> sa.ColumnElement[bool]:
    """`status` and unclaimed: the predicate of that pool's partial index."""
    return sa.and_(Study.status == STATUS_LITERAL[status], Study.claimed_by_id.is_(None))


def unclaimed_unindexed(status: str, study: Any = Study) -> sa.ColumnElement[bool]:
    """`unclaimed(status)` written in coalesce(), which no pool index serves: so that both
    planners reach a patient's few studies through a patient index rather than walking
    the pool (literals: PostgreSQL's RETURNING is compiled without literal_binds). The
    patient indexes test this expression themselves: PostgreSQL's second column
    (ix_study_patient_status), SQLite's predicate (ix_study_waiting_by_patient).

    On PostgreSQL not by a partial index (tried as migration 0003): it cannot estimate
    such a predicate, and on a small, fresh table it drove the
    claim of a patient's studies from a scan of that whole index, 46 s a claim."""
    return sa.and_(
        sa.func.coalesce(study.status, sa.literal_column("''")) == sa.literal_column(f"'{status}'"),
        sa.func.coalesce(study.claimed_by_id, sa.literal_column("0")) == sa.literal_column("0"),
    )


def _in_order(
    status: str, trusts: sa.ColumnElement[bool], credentials: sa.ColumnElement[bool], *,
    reader: sa.ColumnElement[int], stat_only: bool, by_patient: bool,
) -> sa.Select[Study]:  # fmt: skip
    """The unclaimed `status` studies that pass the trust and credential tests, in
    worklist order, with the rules every pool applies."""
    waiting = unclaimed_unindexed(status) if by_patient else unclaimed(status)
    query = sa.select(Study).where(waiting, trusts, credentials).order_by(*WORKLIST_ORDER)
    # A patient's other studies (`by_patient`) are never double-read ones: next case
    # never bundles those (`worklist._mates_chosen`).
    if status == READY and not by_patient:
        query = query.where(_not_already_read(reader))
    if stat_only:
        query = query.where(sa.or_(Study.urgency > urgency_floor(1), Study.critical.is_(True)))
    return query


def _not_already_read(user_id: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Not a double-read study this radiologist has already given a reading of.

    A per-row index lookup (ix_assignment_study_id) on the few candidates read: the
    OFFSET keeps PostgreSQL from turning the NOT EXISTS into an anti-join that scanned
    every assignment (it drops a bare LIMIT from an EXISTS), and naming no column outside
    ix_study_ready_pool keeps that index covering for SQLite. "+ 0" keeps the lookup off
    the reader's own indexes (a reader has years of rows)."""
    mine = (
        sa.select(Assignment.id)
        .where(
            Assignment.study_id == Study.id,
            Assignment.user_id + sa.literal_column("0") == user_id,
            Assignment.end_reason.like("read:%"),
        )
        .limit(sa.literal_column("1"))
        .offset(sa.literal_column("0"))
        .exists()
    )
    return ~mine


def _cover(
    credentials: Iterable[HeldCredential],
) -> tuple[dict[str, set[str] | None], set[str]]:
    """What credentials cover, as the pool's SQL tests it: the body areas
    covered per modality (None = any; modality "*" = any modality), and the modalities
    of a child's study (paediatric) covered ("*" = any)."""
    by_modality: dict[str, set[str] | None] = {}
    for_children: set[str] = set()
    for credential in credentials:
        modality = credential.modality.strip().upper()
        held = credential_area(credential.body_area)
        if held is None or held == PAEDIATRIC:
            for_children.add(modality)
        if held is None:
            by_modality[modality] = None  # any body area
            continue
        areas = {held} | set(SUBSPECIALTY_BODY_AREAS.get(held, ()))
        current = by_modality.setdefault(modality, set())
        if current is not None:
            current.update(areas)
    return by_modality, for_children


# --- the pools as one statement for every radiologist (through the driver) ------------

#: Joins a modality and a body area in `pool_values`' "areas" (neither holds it).
_AREA_JOIN = "|"


def pool_values(radiologist: Radiologist, now: datetime) -> dict[str, Any]:
    """The radiologist's trusts and credentials as the values of `shared_pool`'s
    parameters, for `worklist.db.driver` (tuples: PostgreSQL arrays, SQLite JSON; kept
    for a day by `reader_facts.Standing`, so the driver's array literals are made once).
    Short names: the claim names each three times."""
    today = now.astimezone(LONDON).date()
    by_modality, for_children = _cover(radiologist.credentials)
    areas = sorted(
        f"{modality}{_AREA_JOIN}{area}"
        for modality, covered in by_modality.items()
        for area in covered or ()
    )
    return {
        "reader": radiologist.user_id,
        "trusts": tuple(sorted({a.trust_id for a in radiologist.agreements if a.in_force(today)})),
        "any_area": tuple(sorted(m for m, covered in by_modality.items() if covered is None)),
        "areas": tuple(areas),
        "children": tuple(sorted(for_children)),
        # Which terms can match at all: the others are not evaluated on the rows walked.
        "all_adults": by_modality.get("*", ()) is None,
        "all_children": "*" in for_children,
        "some_areas": any(not a.startswith(f"*{_AREA_JOIN}") for a in areas),
        "star_areas": any(a.startswith(f"*{_AREA_JOIN}") for a in areas),
    }


def _listed(value: sa.ColumnElement[Any], name: str, item: Any, dialect: str) -> Any:
    """`value` is in the list parameter `name`: PostgreSQL's `= ANY (array)`; SQLite, which
    has no arrays, `IN (SELECT value FROM json_each(json))`, an ephemeral index built on
    the first row that asks."""
    if dialect == "postgresql":
        return value == sa.any_(driver.param(name, postgresql.ARRAY(item)))
    items = sa.func.json_each(driver.param(name, sa.JSON())).table_valued("value")
    return value.in_(sa.select(items.c.value))


@functools.lru_cache(maxsize=32)
def shared_pool(
    dialect: str, status: str = READY, *, stat_only: bool = False, by_patient: bool = False
) -> sa.Select[Study]:
    """Unclaimed `status` studies of the trusts and credentials a radiologist holds, in
    worklist order, those given as parameters (`pool_values`), not written in: one SQL
    text for every radiologist. With `stat_only`, only the stat and critical work that
    passes a full session's cap. With `by_patient` the rules are written so that no index
    serves them: for a query that names a patient's few studies (a patient index, see
    `unclaimed_unindexed`), which both planners must reach through that index and never
    by walking the pool.

    A statement is compiled (SQLAlchemy), prepared (sqlite3's statement cache, psycopg)
    and planned (PostgreSQL) once per text. With the trusts and credentials written in,
    each radiologist's claim had its own text: a web worker, serving every radiologist in
    turn, compiled it for each radiologist's first claim in that process (a p99 of 41-47
    against 21-24 ms on SQLite, 8 processes), and PostgreSQL parsed and planned it on
    most claims (~1.4 ms of planning). The lists are tested on the pool index's own
    columns, so the walk stays index-only.
    Flags skip the terms a radiologist's credentials cannot match: without them SQLite
    built the area terms' strings on every row walked (past 1,500 claimed studies: 103
    us a walk, 38 with the flags, 32 written in)."""
    # SQLite: "+ 0" so that its planner never drives the walk from the list of trusts
    # through an index on trust_id (then sorting), whatever it guesses the list holds.
    trust = Study.trust_id + sa.literal_column("0") if by_patient or dialect != "postgresql" \
        else Study.trust_id  # fmt: skip

    def holds(name: str, value: sa.ColumnElement[str]) -> Any:
        return _listed(value, name, sa.Text(), dialect)

    def flag(name: str) -> sa.ColumnElement[bool]:
        return driver.param(name, sa.Boolean())

    area = sa.func.lower(Study.body_area)
    adults = sa.or_(
        holds("any_area", Study.modality),
        flag("all_adults"),
        sa.and_(
            flag("some_areas"),
            holds("areas", Study.modality.concat(_AREA_JOIN).concat(area)),
        ),
        sa.and_(
            flag("star_areas"),
            holds("areas", sa.literal_column(f"'*{_AREA_JOIN}'", sa.Text()).concat(area)),
        ),
    )
    children = sa.or_(holds("children", Study.modality), flag("all_children"))
    return _in_order(
        status,
        _listed(trust, "trusts", sa.Integer(), dialect),
        sa.or_(
            sa.and_(Study.paediatric.is_(False), adults),
            sa.and_(Study.paediatric.is_(True), children),
        ),
        reader=driver.param("reader", sa.Integer()), stat_only=stat_only, by_patient=by_patient,
    )  # fmt: skip
