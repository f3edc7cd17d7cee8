"""Priors: a patient's earlier studies from every trust in the region, with their reports.

Linked by the valid NHS number (the regional link) and by the local record within a
trust; newest first; those of the same modality and body area marked relevant.
Viewing them is audited, because it opens other trusts' records.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import QueryableAttribute, Session, aliased

from worklist.db import driver
from worklist.db.models import (
    AuditEvent,
    Patient,
    ReportingPermission,
    ReportVersion,
    Study,
    Trust,
    User,
)
from worklist.domain.eligibility import LONDON
from worklist.domain.study import StudyStatus
from worklist.errors import NotFound
from worklist.services import accounts, audit
from worklist.services.worklist import same_person_patient_ids, visible_study

_STOPPED = (StudyStatus.CANCELLED.value, StudyStatus.DISCONTINUED.value)
Q = TypeVar("Q", bound=sa.Select[*tuple[Any, ...]])


@dataclass(frozen=True)
class Prior:
    study: Study
    trust_code: str
    relevance: str  # "same modality and body area" | "same body area" | "same modality" | ""
    report_kind: str | None
    report_text: str | None
    report_signed_at: datetime | None

    @property
    def relevant(self) -> bool:
        return self.relevance == "same modality and body area"


def priors(
    session: Session,
    *,
    study_id: int,
    user: User,
    now: datetime,
    limit: int = 100,
    remote_addr: str | None = None,
) -> list[Prior]:
    """Earlier studies of the same person from every trust, newest first, with reports.

    Linked by the valid NHS number (and the local record within a trust); the
    view is audited because it opens other trusts' records.
    """
    if session.get_bind().dialect.name == "postgresql":
        return _priors_in_one_statement(
            session, study_id=study_id, user=user, now=now, limit=limit, remote_addr=remote_addr
        )
    study = visible_study(session, study_id=study_id, user=user, now=now)
    # SQLite: the ids as a list; given a short IN list it goes through ix_study_patient_id.
    people = list(session.scalars(same_person_patient_ids(study.patient_id)))
    rows = session.execute(
        _priors_query(),
        {
            "people": people, "anchor_id": study.id, "limit": limit,
            "anchor_time": study.performed_at or study.requested_at or study.created_at,
        },
    ).all()  # fmt: skip
    result = [
        Prior(
            study=prior,
            trust_code=code,
            relevance=_relevance(prior, study.modality, study.body_area),
            report_kind=kind,
            report_text=text,
            report_signed_at=signed_at,
        )
        for prior, code, kind, text, signed_at in rows
    ]
    audit.insert(
        session, at=now, action="view_priors", user=user, object_type="study",
        object_id=study.id, detail={"patient_id": study.patient_id, "priors": len(result)},
        remote_addr=remote_addr,
    )  # fmt: skip
    return result


def _relevance(prior: Study, modality: str | None, body_area: str | None) -> str:
    same_modality = (prior.modality or "").upper() == (modality or "").upper()
    same_area = (prior.body_area or "").upper() == (body_area or "").upper() and bool(body_area)
    if same_modality and same_area:
        return "same modality and body area"
    if same_area:
        return "same body area"
    return "same modality" if same_modality else ""


def _exam_time(study: Any) -> sa.ColumnElement[datetime]:
    return sa.func.coalesce(study.performed_at, study.requested_at, study.created_at)


def _with_latest_report(query: Q, study_id: sa.ColumnElement[int] | QueryableAttribute[int]) -> Q:
    """`query` outer-joined to the study's latest signed report version (highest sequence),
    found by the study (ix_report_version_study_id_sequence), not through the report."""
    later = aliased(ReportVersion)
    latest_sequence = (
        sa.select(sa.func.max(later.sequence)).where(later.study_id == study_id).scalar_subquery()
    )
    return query.outerjoin(
        ReportVersion,
        sa.and_(ReportVersion.study_id == study_id, ReportVersion.sequence == latest_sequence),
    )


_REPORT_COLUMNS = (
    ReportVersion.kind.label("report_kind"),
    ReportVersion.text.label("report_text"),
    ReportVersion.signed_at.label("report_signed_at"),
)


@functools.cache
def _priors_query() -> sa.Select[Study, str, str, str, datetime]:
    """SQLite: the priors with their trust code and latest report, in one query."""
    exam_time = _exam_time(Study)
    query = (
        sa.select(Study, Trust.code, *_REPORT_COLUMNS)
        .join(Trust, Trust.id == Study.trust_id)
        .where(
            Study.patient_id.in_(sa.bindparam("people", expanding=True)),
            Study.id != sa.bindparam("anchor_id"),
            Study.status.not_in(_STOPPED),
            exam_time < sa.bindparam("anchor_time", type_=Study.performed_at.type),
        )
        .order_by(exam_time.desc(), Study.id.desc())
        .limit(sa.bindparam("limit"))
    )
    return _with_latest_report(query, Study.id)


# --- PostgreSQL: one statement --------------------------------------------------------


def _priors_in_one_statement(
    session: Session,
    *,
    study_id: int,
    user: User,
    now: datetime,
    limit: int,
    remote_addr: str | None,
) -> list[Prior]:
    """The visibility check, the priors with their reports and the audit row in ONE
    statement through the driver: one round trip instead of five, and no ORM query."""
    sees_every_trust = user.role in accounts.SEES_EVERY_TRUST
    values: dict[str, Any] = {
        "study_id": study_id, "user_id": user.id, "username": user.username, "at": now,
        "remote_addr": remote_addr, "limit": limit,
    }  # fmt: skip
    if not sees_every_trust:
        values["today"] = now.astimezone(LONDON).date()
    names, rows = driver.rows(session, _priors_statement(sees_every_trust), values)
    if not rows:  # no such study, or of a trust `user` may not see
        raise NotFound(f"no study {study_id}")
    at = _positions(names)
    study_at = at["study"]
    modality, body_area = rows[0][at["anchor_modality"]], rows[0][at["anchor_body_area"]]
    result = []
    for row in rows:
        if row[at["id"]] is None:  # the study has no priors: its one row, the prior's NULL
            continue
        prior = driver.loaded(
            session, Study, {name: row[i] for name, i in zip(_STUDY_COLUMNS, study_at, strict=True)}
        )
        result.append(
            Prior(
                study=prior,
                trust_code=row[at["trust_code"]],
                relevance=_relevance(prior, modality, body_area),
                report_kind=row[at["report_kind"]],
                report_text=row[at["report_text"]],
                report_signed_at=row[at["report_signed_at"]],
            )
        )
    return result


_STUDY_COLUMNS = tuple(c.key for c in Study.__table__.columns)


@functools.cache
def _positions(names: tuple[str, ...]) -> dict[str, Any]:
    """Where each result column is: by name, and the study's columns (as "study") in order."""
    at: dict[str, Any] = {name: i for i, name in enumerate(names)}
    at["study"] = tuple(at[name] for name in _STUDY_COLUMNS)
    return at


@functools.cache
def _priors_statement(sees_every_trust: bool) -> sa.Select[Any]:
    """PostgreSQL: the study if `user` may see it (the anchor), the same person's records,
    the priors, each with its latest report, and the audit row (a data-modifying CTE that
    writes only when the anchor is found), in one statement. One row per prior, the
    anchor's modality and body area on each; a row of NULL priors when it has none; no
    row at all when the study is missing or hidden. Built once."""
    param = driver.param
    visible = [Study.id == param("study_id", sa.Integer())]
    if not sees_every_trust:
        visible.append(
            sa.exists().where(
                accounts.permission_in_force(
                    param("user_id", sa.Integer()), param("today", sa.Date())
                ),
                ReportingPermission.trust_id == Study.trust_id,
            )
        )
    anchor = (
        sa.select(
            Study.id,
            Study.patient_id,
            Study.modality,
            Study.body_area,
            _exam_time(Study).label("exam_time"),
            Patient.link_nhs_number,
        )  # fmt: skip
        .join(Patient, Patient.id == Study.patient_id)
        .where(*visible)
        .cte("anchor")
    )
    # `worklist.same_person_patient_ids` of the anchor: its record and every record sharing
    # its valid NHS number; planned as a few index lookups.
    people = sa.union(
        sa.select(anchor.c.patient_id),
        sa.select(Patient.id).where(Patient.link_nhs_number == anchor.c.link_nhs_number),
    ).cte("people")
    exam_time = _exam_time(Study)
    found = (  # with every column: read again by id, each cost an index read when cold
        sa.select(*Study.__table__.columns, exam_time.label("exam_time"))
        .join(anchor, sa.true())
        .where(
            Study.patient_id.in_(sa.select(people.c.patient_id)),
            Study.id != anchor.c.id,
            Study.status.not_in(_STOPPED),
            exam_time < anchor.c.exam_time,
        )
        .order_by(exam_time.desc(), Study.id.desc())
        .limit(param("limit", sa.Integer()))
        .cte("found")
    )
    audit_row = audit.insert_from(
        sa.select(
            param("at", AuditEvent.at.type),
            param("user_id", sa.Integer()),
            param("username", AuditEvent.username.type),
            sa.literal("view_priors"),
            sa.literal("study"),
            sa.cast(anchor.c.id, AuditEvent.object_id.type),
            sa.func.jsonb_build_object(
                sa.literal("patient_id"),
                anchor.c.patient_id,
                sa.literal("priors"),
                sa.select(sa.func.count()).select_from(found).scalar_subquery(),
            ),
            param("remote_addr", AuditEvent.remote_addr.type),
        )
    ).cte("audit_row")
    latest_report = (  # as `_with_latest_report`; cheaper to plan and run here than its join
        sa.select(*_REPORT_COLUMNS)
        .where(ReportVersion.study_id == found.c.id)
        .order_by(ReportVersion.sequence.desc())
        .limit(1)
        .lateral("latest_report")
    )
    return (
        sa.select(
            anchor.c.modality.label("anchor_modality"),
            anchor.c.body_area.label("anchor_body_area"),
            *(found.c[name] for name in _STUDY_COLUMNS),
            Trust.code.label("trust_code"),
            *latest_report.c,
        )
        .select_from(anchor)
        .outerjoin(found, sa.true())
        .outerjoin(Trust, Trust.id == found.c.trust_id)
        .outerjoin(latest_report, sa.true())
        .order_by(found.c.exam_time.desc(), found.c.id.desc())
        .add_cte(audit_row)
    )
