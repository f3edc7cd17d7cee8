"""Verification: a consultant claims a trainee's preliminary report and signs the final.

After a preliminary report is signed (e.g. by a trainee or an out-of-hours
reporter) the study's status is `preliminary`, its claim is released, and it
waits in the verification pool: preliminary, unclaimed studies, in the same
order as the ready pool (urgency, then newest id; `ix_study_verification_pool`).
Only a radiologist with `can_finalise` is offered one, and only under the same
eligibility rules as any study (agreement for the trust, credential, on duty,
capacity): `worklist.services.worklist.next_case` asks `claim_if_more_urgent`
whether one ranks above the ready study it has claimed, and `claim_study` hands a
preliminary study to `claim_for_verification`. The claim is an ordinary lease (renewed, expired and
released by the worklist service); signing the final report
(`worklist.services.reports.sign_report`) records the consultant as verifier,
keeps the trainee as author (OBR-32 consultant, OBR-33 trainee), queues the
ORU with OBR-25 F and ends the claim.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db import driver
from worklist.db.models import Assignment, Report, ReportVersion, Study, Trust, User
from worklist.domain.eligibility import (
    Eligibility,
    Radiologist,
    current_session,
    may_report,
)
from worklist.domain.priority import tier_from_urgency
from worklist.domain.study import StudyStatus
from worklist.errors import Conflict, Forbidden
from worklist.services import audit, reader_facts
from worklist.services import worklist as worklist_service
from worklist.services.pool import STATUS_LITERAL, pool_values, shared_pool

logger = logging.getLogger(__name__)

#: Candidates next case tries (each taken by someone else meanwhile or refused) before it
#: leaves the verification pool to the ready pool for this call.
_MAX_TRIES = 20
PRELIMINARY = StudyStatus.PRELIMINARY.value


def verification_pool(
    session: Session, *, user: User, now: datetime, limit: int = 50
) -> list[Study]:
    """The preliminary reports `user` may verify, in order (empty for a trainee): the
    unclaimed preliminary studies of the trusts and credentials the consultant holds (the
    agreement and credential rules in SQL, in the statement next case shares)."""
    if not user.can_finalise:
        return []
    radiologist = reader_facts.radiologist_facts(session, user=user, now=now)
    query = _top(shared_pool(session.get_bind().dialect.name, PRELIMINARY), limit)
    names, rows = driver.rows(session, query, pool_values(radiologist, now))
    return [driver.loaded(session, Study, dict(zip(names, row, strict=True))) for row in rows]


@functools.lru_cache(maxsize=64)
def _top(pool: sa.Select[Study], limit: int) -> sa.Select[Study]:
    """The first `limit` of `pool` (a literal: a prepared plan knows how few)."""
    return pool.limit(sa.literal_column(str(int(limit))))


def _eligibility(
    session: Session, *, study: Study, user: User, radiologist: Radiologist, now: datetime
) -> Eligibility:
    code = session.scalar(sa.select(Trust.code).where(Trust.id == study.trust_id))
    facts = worklist_service.study_to_read(study, user=user, trust_code=code)
    return may_report(radiologist, facts, now)


def _claim(
    session: Session, *, study_id: int, user_id: int, now: datetime, lease: timedelta
) -> Study | None:
    """The one claim statement: succeeds only if the study is still preliminary and free.

    On PostgreSQL a row another consultant is claiming right now is skipped (SKIP LOCKED)
    rather than waited for; SQLite serialises writers. The conditional WHERE is the
    guarantee that a study is never claimed twice.
    """
    free = (
        sa.select(Study.id)
        .where(Study.id == study_id)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return session.scalars(
        sa.update(Study)
        .where(Study.id == free, Study.status == PRELIMINARY, Study.claimed_by_id.is_(None))
        .values(claimed_by_id=user_id, claimed_at=now, claim_expires_at=now + lease, updated_at=now)
        .returning(Study),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).one_or_none()


def _unclaim(session: Session, *, study: Study, user_id: int) -> None:
    session.execute(
        sa.update(Study)
        .where(Study.id == study.id, Study.claimed_by_id == user_id)
        .values(claimed_by_id=None, claimed_at=None, claim_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.refresh(study)


def _preliminary_version(session: Session, study: Study) -> ReportVersion | None:
    return session.scalar(
        sa.select(ReportVersion)
        .join(Report, Report.id == ReportVersion.report_id)
        .where(Report.study_id == study.id, ReportVersion.kind == PRELIMINARY)
        .order_by(ReportVersion.sequence.desc())
        .limit(1)
    )


def _record(
    session: Session, *, study: Study, user: User, now: datetime, lease: timedelta, why: str,
    extra: dict[str, Any] | None = None, remote_addr: str | None = None, kind: str = "pull",
) -> Assignment:  # fmt: skip
    version = _preliminary_version(session, study)
    author = session.get(User, version.author_id) if version is not None else None
    explanation: dict[str, Any] = {
        "why": why,
        "priority": {
            "accession_number": study.accession_number,
            "tier": tier_from_urgency(study.urgency),
            "class": study.priority_class,
            "due_at": study.due_at.isoformat() if study.due_at else None,
        },
        "verification": {
            "preliminary_by": author.username if author else None,
            "preliminary_version": version.sequence if version else None,
            "preliminary_signed_at": version.signed_at.isoformat() if version else None,
        },
        **(extra or {}),
    }
    row = Assignment(
        study_id=study.id, user_id=user.id, kind=kind, started_at=now,
        expires_at=now + lease, explanation=explanation,
    )  # fmt: skip
    session.add(row)
    audit.record(
        session, at=now, action="claim", user=user, object_type="study", object_id=study.id,
        detail={"kind": "verify", "to": user.username, "accession_number": study.accession_number,
                "why": why},
        remote_addr=remote_addr,
    )  # fmt: skip
    session.flush()
    return row


def claim_if_more_urgent(
    session: Session,
    *,
    than: Study | None,
    pool_params: dict[str, Any],
    user: User,
    radiologist: Radiologist,
    now: datetime,
    lease: timedelta,
    remote_addr: str | None = None,
) -> worklist_service.ClaimResult | None:
    """Next case for a consultant: claim the most urgent preliminary study they may verify
    when it ranks above `than` (the most urgent ready study they may report, which next
    case has claimed, or None when there is none); else None, and next case keeps `than`.
    A trainee always gets None.

    The pool is read through the driver as the statement every consultant shares (see
    `pool.shared_pool`), with `pool_params`."""
    if not user.can_finalise:
        return None
    slot = current_session(radiologist.sessions, now)
    full = (
        slot is not None and slot.capacity is not None and radiologist.session_load >= slot.capacity
    )
    # Stat and critical work passes a full session's cap.
    query = shared_pool(session.get_bind().dialect.name, PRELIMINARY, stat_only=full)
    codes = {a.trust_id: a.trust_code or "" for a in radiologist.agreements}
    passed: list[int] = []
    while len(passed) < _MAX_TRIES:
        candidates = query.where(Study.id.not_in(passed)) if passed else query
        top = driver.rows(session, _first(candidates), pool_params)[1]
        if not top:
            return None
        urgency, study_id = top[0]
        if than is not None and (than.urgency, than.id) > (urgency, study_id):
            return None  # the ready study ranks first (worklist order)
        passed.append(study_id)
        study = _claim(session, study_id=study_id, user_id=user.id, now=now, lease=lease)
        if study is None:
            continue  # another consultant took it meanwhile
        facts = worklist_service.study_to_read(
            study, user=user, trust_code=codes.get(study.trust_id)
        )
        if not may_report(radiologist, replace(facts, claimed_by_id=None), now):
            _unclaim(session, study=study, user_id=user.id)  # e.g. over capacity
            continue
        why = "the most urgent preliminary report awaiting verification that you may verify"
        assignment = _record(
            session, study=study, user=user, now=now, lease=lease, why=why,
            remote_addr=remote_addr,
        )  # fmt: skip
        logger.info("study %s claimed by %s for verification", study.id, user.username)
        return worklist_service.ClaimResult(study, assignment, why)
    return None


@functools.lru_cache(maxsize=64)
def _first(candidates: sa.Select[Study]) -> sa.Select[tuple[float, int]]:
    return candidates.with_only_columns(Study.urgency, Study.id).limit(sa.literal_column("1"))


def assign_for_verification(
    session: Session, *, study: Study, user: User, now: datetime, lease: timedelta, why: str,
    extra: dict[str, Any] | None = None,
) -> Assignment | None:  # fmt: skip
    """Push (auto-assignment): claim a preliminary study for `user` to verify, or None if
    another consultant took it meanwhile. The caller has checked eligibility."""
    if _claim(session, study_id=study.id, user_id=user.id, now=now, lease=lease) is None:
        return None
    return _record(
        session, study=study, user=user, now=now, lease=lease, why=why, extra=extra,
        kind="push",
    )  # fmt: skip


def claim_for_verification(
    session: Session,
    *,
    study: Study,
    user: User,
    now: datetime,
    lease: timedelta = worklist_service.DEFAULT_LEASE,
    remote_addr: str | None = None,
) -> Assignment:
    """A consultant claims a chosen preliminary study to verify it (e.g. their trainee's).

    No free-choice session is needed: verification is the consultant's own work on a
    report already written. Every eligibility rule must say yes; claiming one's own
    claim again renews the lease.
    """
    if study.status != PRELIMINARY:
        raise Conflict(f"a study that is {study.status} has no preliminary report to verify")
    if study.claimed_by_id == user.id:
        worklist_service.renew_claim(session, study_id=study.id, user=user, now=now, lease=lease)
        current = session.scalar(
            sa.select(Assignment)
            .where(Assignment.study_id == study.id, Assignment.ended_at.is_(None))
            .order_by(Assignment.id.desc())
            .limit(1)
        )
        if current is not None:
            return current
    if not user.can_finalise:
        raise Forbidden("verifying a preliminary report needs the right to finalise")
    radiologist = reader_facts.radiologist_facts(session, user=user, now=now)
    verdict = _eligibility(session, study=study, user=user, radiologist=radiologist, now=now)
    if not verdict:
        raise Conflict(f"you may not verify this study: {verdict.explain()}")
    if _claim(session, study_id=study.id, user_id=user.id, now=now, lease=lease) is None:
        raise Conflict("the study was claimed by someone else or is no longer preliminary")
    return _record(
        session, study=study, user=user, now=now, lease=lease,
        why="chosen for verification of its preliminary report", remote_addr=remote_addr,
    )  # fmt: skip


# --- keeping the verification pool's order current ---------------------------------------


def preliminary_study_ids(session: Session) -> list[int]:
    """Every preliminary study awaiting verification (claimed or not)."""
    status = STATUS_LITERAL[PRELIMINARY]
    return list(session.scalars(sa.select(Study.id).where(Study.status == status)))


def reprioritise_verification_pool(session: Session, *, now: datetime) -> int:
    """Age the preliminary studies' urgency as the ready pool's is aged (the worklist
    sweep covers ready studies only), so verification work ranks by the same clock."""
    return worklist_service.reprioritise(session, now=now, study_ids=preliminary_study_ids(session))


def reprioritise_verification_job(runtime: Any) -> None:
    """Scheduler job (`worklist.services.verification:reprioritise_verification_job`)."""
    rules = worklist_service.rules_for(runtime.settings)
    with runtime.session() as session:
        changed = worklist_service.reprioritise(
            session, now=runtime.clock.now(), rules=rules,
            study_ids=preliminary_study_ids(session),
        )  # fmt: skip
    if changed:
        logger.info("reprioritised %d preliminary studies awaiting verification", changed)
