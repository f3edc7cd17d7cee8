"""Priors: a patient's earlier studies from every trust in the region, with their reports.

Linked by the valid NHS number (the regional link) and by the local record within a
trust; newest first; those of the same modality and body area marked relevant.
Viewing them is audited, because it opens other trusts' records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db.models import Report, ReportVersion, Study, Trust, User
from worklist.domain.study import StudyStatus
from worklist.services import audit
from worklist.services.worklist import same_person_patient_ids, visible_study


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
    study = visible_study(session, study_id=study_id, user=user, now=now)
    # PostgreSQL plans the subquery as a few index lookups (one round trip fewer); SQLite
    # goes through ix_study_patient_id only for a short list.
    people = same_person_patient_ids(study.patient_id)
    patient_ids = (
        people if session.get_bind().dialect.name == "postgresql" else list(session.scalars(people))
    )
    exam_time = sa.func.coalesce(Study.performed_at, Study.requested_at, Study.created_at)
    this_time = study.performed_at or study.requested_at or study.created_at
    rows = session.execute(
        sa.select(Study, Trust.code)
        .join(Trust, Trust.id == Study.trust_id)
        .where(
            Study.patient_id.in_(patient_ids),
            Study.id != study.id,
            Study.status.not_in([StudyStatus.CANCELLED.value, StudyStatus.DISCONTINUED.value]),
            exam_time < this_time,
        )
        .order_by(exam_time.desc(), Study.id.desc())
        .limit(limit)
    ).all()
    latest = _latest_reports(session, [s.id for s, _ in rows])
    result = []
    for prior, code in rows:
        same_modality = (prior.modality or "").upper() == (study.modality or "").upper()
        same_area = (prior.body_area or "").upper() == (study.body_area or "").upper() and bool(
            study.body_area
        )
        relevance = (
            "same modality and body area"
            if same_modality and same_area
            else "same body area"
            if same_area
            else "same modality"
            if same_modality
            else ""
        )
        version = latest.get(prior.id)
        result.append(
            Prior(
                study=prior,
                trust_code=code,
                relevance=relevance,
                report_kind=version.kind if version else None,
                report_text=version.text if version else None,
                report_signed_at=version.signed_at if version else None,
            )
        )
    audit.record(
        session, at=now, action="view_priors", user=user, object_type="study", object_id=study.id,
        detail={"patient_id": study.patient_id, "priors": len(result)}, remote_addr=remote_addr,
    )  # fmt: skip
    return result


def _latest_reports(session: Session, study_ids: list[int]) -> dict[int, ReportVersion]:
    if not study_ids:
        return {}
    rows = session.execute(
        sa.select(Report.study_id, ReportVersion)
        .join(ReportVersion, ReportVersion.report_id == Report.id)
        .where(Report.study_id.in_(study_ids))
        .order_by(ReportVersion.sequence)
    ).all()
    return {study_id: version for study_id, version in rows}
