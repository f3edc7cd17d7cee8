"""Reporting use cases: autosave the draft, sign preliminary/final, add addenda, urgent alerts.

Each signing writes, in ONE transaction: the immutable `ReportVersion`, the study's
new status, the end of the claim, the audit event, and the outbox row
(`OutboundMessage`) carrying the complete ORU^R01 for the trust's RIS with a
control id (MSH-10) that every retry reuses. So a signed report can never exist
without its ORU queued, and an ORU never leaves for a report that was not
committed. Delivery is `worklist.services.delivery`.

The rules (who may sign what) are `worklist.domain.reports`; this module only
gathers the facts, applies the verdict and writes the rows.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hl7.outbound import (
    Addendum,
    Clinician,
    OrderNumber,
    OruInput,
    OutboundError,
    OutboundProfile,
    build_oru,
)
from hl7.outbound import (
    PatientIdentifier as OruPatientIdentifier,
)
from worklist.db.models import (
    Alert,
    OutboundMessage,
    Patient,
    PatientIdentifier,
    Report,
    ReportVersion,
    Study,
    StudyStatusChange,
    Trust,
    User,
)
from worklist.domain import reports as rules
from worklist.domain.reports import Decision, Signer, StudyFacts, VersionKind
from worklist.domain.study import StudyStatus, check_move
from worklist.errors import Conflict, Forbidden, InvalidInput, NotFound
from worklist.services import audit
from worklist.services import templates as template_service
from worklist.services import worklist as worklist_service

logger = logging.getLogger(__name__)

MAX_REPORT_CHARS = 100_000
URGENT_ALERT = "urgent_finding"
PARKED_ALERT = "oru_parked"


# --- reading ------------------------------------------------------------------------------


def _study_for(session: Session, *, study_id: int, user: User, now: datetime, lock: bool) -> Study:
    query = sa.select(Study).where(Study.id == study_id)
    if lock:  # a row lock on PostgreSQL; on SQLite the write lock (`sqlite_writers`)
        query = query.with_for_update()
    study = session.scalars(query).one_or_none()
    if study is None or not worklist_service.may_see_trust(
        session, user=user, trust_id=study.trust_id, now=now
    ):
        raise NotFound(f"no study {study_id}")
    if lock:
        session.refresh(study)
    return study


def _report_for(session: Session, study: Study) -> Report | None:
    return session.scalars(sa.select(Report).where(Report.study_id == study.id)).one_or_none()


def _versions(session: Session, report: Report | None) -> list[ReportVersion]:
    if report is None:
        return []
    return list(
        session.scalars(
            sa.select(ReportVersion)
            .where(ReportVersion.report_id == report.id)
            .order_by(ReportVersion.sequence)
        )
    )


def _status_reason(session: Session, study: Study) -> str | None:
    """Why the study is in its current state (e.g. the RIS's cancellation reason)."""
    return session.scalar(
        sa.select(StudyStatusChange.reason)
        .where(StudyStatusChange.study_id == study.id, StudyStatusChange.to_status == study.status)
        .order_by(StudyStatusChange.id.desc())
        .limit(1)
    )


def _facts(session: Session, study: Study) -> StudyFacts:
    return StudyFacts(
        status=study.status,
        claimed_by_id=study.claimed_by_id,
        claim_expires_at=study.claim_expires_at,
        status_reason=_status_reason(session, study),
    )


def _signer(user: User) -> Signer:
    return Signer(user_id=user.id, role=user.role, can_finalise=bool(user.can_finalise))


def _enforce(decision: Decision) -> None:
    if decision:
        return
    if decision.kind == "forbidden":
        raise Forbidden(decision.reason)
    if decision.kind == "invalid":
        raise InvalidInput(decision.reason)
    raise Conflict(decision.reason)


@dataclass(frozen=True)
class ReportView:
    study_id: int
    status: str
    draft_text: str
    draft_saved_at: datetime | None
    draft_author_id: int | None
    versions: list[ReportVersion]


def get_report(session: Session, *, study_id: int, user: User, now: datetime) -> ReportView:
    study = _study_for(session, study_id=study_id, user=user, now=now, lock=False)
    report = _report_for(session, study)
    return ReportView(
        study_id=study.id,
        status=report.status if report else "draft",
        draft_text=report.draft_text if report else "",
        draft_saved_at=report.draft_saved_at if report else None,
        draft_author_id=report.draft_author_id if report else None,
        versions=_versions(session, report),
    )


# --- templates ----------------------------------------------------------------------------

# Region-wide starting texts; the most specific match wins (worklist.domain.reports).
DEFAULT_TEMPLATES = (
    rules.ReportTemplate(
        "Generic",
        "Clinical details: {{clinical_details}}\n\nFindings:\n\nImpression:\n",
    ),
    rules.ReportTemplate(
        "CT",
        "{{procedure}} ({{exam_date}})\nClinical details: {{clinical_details}}\n\n"
        "Technique: \n\nFindings:\n\nImpression:\n",
        modality="CT",
    ),
    rules.ReportTemplate(
        "CT head",
        "CT head without contrast ({{exam_date}})\nClinical details: {{clinical_details}}\n\n"
        "Findings: No intracranial haemorrhage, mass effect or midline shift. Grey-white "
        "differentiation is preserved. The ventricles and sulci are normal for age. No skull "
        "fracture.\n\nImpression: No acute intracranial abnormality.",
        procedure_code="CHEAD",
    ),
    rules.ReportTemplate(
        "Chest radiograph",
        "{{procedure}} ({{exam_date}})\nClinical details: {{clinical_details}}\n\n"
        "Findings: The heart is not enlarged. The lungs and pleural spaces are clear.\n\n"
        "Impression: Normal chest radiograph.",
        procedure_code="XCHES",
    ),
)


@dataclass(frozen=True)
class StartingText:
    template: str
    text: str
    unfilled: tuple[str, ...]


def starting_text(session: Session, *, study_id: int, user: User, now: datetime) -> StartingText:
    """The template for this study's procedure/modality with its placeholders filled: the
    stored templates (`worklist.services.templates`) first, ours when none of them fits."""
    study = _study_for(session, study_id=study_id, user=user, now=now, lock=False)
    code = session.scalar(sa.select(Trust.code).where(Trust.id == study.trust_id))
    template = template_service.template_for_study(
        session, trust_id=study.trust_id, trust_code=code, procedure_code=study.procedure_code,
        modality=study.modality, defaults=DEFAULT_TEMPLATES,
    )  # fmt: skip
    if template is None:
        return StartingText("", "", ())
    patient = session.get(Patient, study.patient_id)
    names = (patient.given_name, patient.family_name) if patient else ()
    values = rules.template_values(
        patient_name=" ".join(n for n in names if n),
        birth_date=patient.birth_date if patient else None,
        procedure_name=study.procedure_name or "",
        modality=study.modality or "",
        exam_time=study.performed_at,
        clinical_details=study.clinical_details or "",
        radiologist=user.full_name or user.username,
        accession_number=study.accession_number,
    )
    filled = rules.fill_placeholders(template.text, values)
    return StartingText(template.name, filled.text, filled.unfilled)


# --- the draft ----------------------------------------------------------------------------


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidInput("the report text must be a string")
    if len(text) > MAX_REPORT_CHARS:
        raise InvalidInput(f"the report is longer than {MAX_REPORT_CHARS} characters")
    return text


def save_draft(
    session: Session,
    *,
    study_id: int,
    user: User,
    text: str,
    now: datetime,
    remote_addr: str | None = None,
) -> Report:
    """Autosave: the claim holder (or a manager) keeps the working text; saving also renews the
    claim's lease, since someone typing is working on it."""
    text = _check_text(template_service.expand(session, user=user, text=_check_text(text)))
    study = _study_for(session, study_id=study_id, user=user, now=now, lock=True)
    _enforce(rules.may_edit_draft(_signer(user), _facts(session, study), now))
    report = _report_for(session, study)
    if report is None:
        report = Report(study_id=study.id, draft_text="", status="draft")
        session.add(report)
    report.draft_text = text
    report.draft_author_id = user.id
    report.draft_saved_at = now
    held = study.claimed_by_id == user.id  # a verification claim on a preliminary too
    if held and study.status in (StudyStatus.READY, StudyStatus.PRELIMINARY):
        try:
            worklist_service.renew_claim(session, study_id=study.id, user=user, now=now)
        except Conflict:
            pass  # the lease lapsed; signing will say so
    session.flush()
    return report


# --- signing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    version: ReportVersion
    outbound: OutboundMessage
    alert: Alert | None


def sign_report(
    session: Session,
    *,
    study_id: int,
    user: User,
    status: str,
    now: datetime,
    urgent_finding: bool = False,
    text: str | None = None,
    remote_addr: str | None = None,
) -> Signed:
    """Sign the draft (or ``text``) as a preliminary or final report."""
    if status not in (VersionKind.PRELIMINARY, VersionKind.FINAL):
        raise InvalidInput("status must be 'preliminary' or 'final'")
    return _sign(
        session, study_id=study_id, user=user, kind=VersionKind(status), now=now,
        urgent_finding=urgent_finding, text=text, remote_addr=remote_addr,
    )  # fmt: skip


def add_addendum(
    session: Session,
    *,
    study_id: int,
    user: User,
    text: str,
    now: datetime,
    urgent_finding: bool = False,
    remote_addr: str | None = None,
) -> Signed:
    """An addendum after the final report: the final is never edited; the RIS gets the whole
    report again with OBR-25 C."""
    if user.role not in rules.SIGNING_ROLES:
        raise Forbidden(f"a {user.role} cannot sign reports")
    return _sign(
        session, study_id=study_id, user=user, kind=VersionKind.ADDENDUM, now=now,
        urgent_finding=urgent_finding, text=text, remote_addr=remote_addr,
    )  # fmt: skip


def _sign(
    session: Session,
    *,
    study_id: int,
    user: User,
    kind: VersionKind,
    now: datetime,
    urgent_finding: bool,
    text: str | None,
    remote_addr: str | None,
) -> Signed:
    study = _study_for(session, study_id=study_id, user=user, now=now, lock=True)
    report = _report_for(session, study)
    if text is None:
        if kind is VersionKind.ADDENDUM:
            raise InvalidInput("an addendum needs its text")
        text = report.draft_text if report else ""
    # The signed text never carries a shorthand: the signer's macros are expanded.
    text = _check_text(template_service.expand(session, user=user, text=_check_text(text)))
    versions = _versions(session, report)
    verdict = rules.may_sign(
        kind, _signer(user), _facts(session, study), [v.kind for v in versions], text, now
    )
    _enforce(verdict)
    if report is None:
        report = Report(study_id=study.id, draft_text=text, status="draft")
        session.add(report)
        session.flush()

    author_id, verifier_id = user.id, user.id
    if kind is VersionKind.PRELIMINARY:
        verifier_id = None  # type: ignore[assignment]
    elif kind is VersionKind.FINAL and versions and versions[-1].kind == VersionKind.PRELIMINARY:
        # verifying someone's preliminary: they remain the author, the signer verifies
        author_id = versions[-1].author_id
    version = ReportVersion(
        report_id=report.id,
        study_id=report.study_id,
        sequence=(versions[-1].sequence + 1) if versions else 1,
        kind=kind.value,
        text=text,
        author_id=author_id,
        verifier_id=verifier_id,
        signed_at=now,
        urgent_finding=urgent_finding,
    )
    session.add(version)
    if kind is not VersionKind.ADDENDUM:
        report.draft_text = text
        report.status = kind.value
    session.flush()

    target = StudyStatus(rules.study_status_after(kind))
    if study.status != target:
        check_move(StudyStatus(study.status), target)
        session.add(
            StudyStatusChange(
                study_id=study.id, from_status=study.status, to_status=target.value, at=now,
                reason=f"{kind.value} report signed", source=f"user:{user.username}",
            )
        )  # fmt: skip
        study.status = target.value
        study.status_changed_at = now
        study.updated_at = now
    if rules.releases_claim(kind) and study.claimed_by_id is not None:
        worklist_service.end_claim(session, study=study, now=now, end_reason="signed")

    outbound = queue_oru(session, study=study, version=version, now=now)
    alert = None
    if urgent_finding:
        alert = Alert(
            kind=URGENT_ALERT,
            study_id=study.id,
            trust_id=study.trust_id,
            message=(
                f"Urgent finding flagged by {user.full_name or user.username} on "
                f"accession {study.accession_number} ({study.procedure_name or 'study'})"
            )[:1000],
            created_at=now,
        )
        session.add(alert)
    audit.record(
        session, at=now, action=f"sign_{kind.value}", user=user, object_type="study",
        object_id=study.id, remote_addr=remote_addr,
        detail={"version": version.sequence, "urgent_finding": urgent_finding,
                "control_id": outbound.control_id},
    )  # fmt: skip
    session.flush()
    logger.info(
        "signed %s for study %s (trust %s, accession %s); ORU %s queued",
        kind.value, study.id, study.trust_id, study.accession_number, outbound.control_id,
    )  # fmt: skip
    return Signed(version=version, outbound=outbound, alert=alert)


# --- the ORU for a signed version ---------------------------------------------------------


def new_control_id(version_id: int) -> str:
    """MSH-10: unique, at most 20 characters, never reused even if the database is rebuilt
    (a RIS that de-duplicates on MSH-10 would silently drop a reused id)."""
    return f"W{version_id:09d}{secrets.token_hex(4).upper()}"


def outbound_profile(trust: Trust) -> OutboundProfile:
    """The trust's ORU profile, with MSH-5/6 defaulting to its RIS's own MSH-3/4."""
    profile = (trust.hl7_profile or {}).get("outbound") or {}
    return OutboundProfile.from_dict(
        profile,
        receiving_application=trust.sending_application or "",
        receiving_facility=trust.sending_facility or trust.code,
        tls=bool(trust.ris_tls) or None,
    )


def _clinician(user: User | None) -> Clinician:
    if user is None:
        return Clinician("")
    full = (user.full_name or user.username).strip()
    prefix = ""
    parts = full.split()
    if parts and parts[0].rstrip(".").lower() in {"dr", "prof", "mr", "mrs", "ms", "miss"}:
        prefix, parts = parts[0], parts[1:]
    family = parts[-1] if parts else full
    given = " ".join(parts[:-1])
    return Clinician(user.professional_id or user.username, family, given, prefix)


def oru_input_for(
    session: Session, *, study: Study, version: ReportVersion, control_id: str, now: datetime,
    profile: OutboundProfile,
) -> OruInput:  # fmt: skip
    """Gather everything the ORU for ``version`` carries: the whole report as of that version."""
    patient = session.get(Patient, study.patient_id)
    assert patient is not None
    identifiers = list(
        session.scalars(
            sa.select(PatientIdentifier)
            .where(PatientIdentifier.patient_id == patient.id)
            .order_by(PatientIdentifier.id)
        )
    )
    pid3 = [
        OruPatientIdentifier(i.value, i.authority or "", i.type_code or "") for i in identifiers
    ]
    if not pid3:
        pid3 = [OruPatientIdentifier(patient.local_id, patient.local_authority or "", "MR")]
    versions = list(
        session.scalars(
            sa.select(ReportVersion)
            .where(
                ReportVersion.report_id == version.report_id,
                ReportVersion.sequence <= version.sequence,
            )
            .order_by(ReportVersion.sequence)
        )
    )
    main = [v for v in versions if v.kind != VersionKind.ADDENDUM][-1]
    addenda = [v for v in versions if v.kind == VersionKind.ADDENDUM]
    users = {
        u.id: u
        for u in session.scalars(
            sa.select(User).where(
                User.id.in_(
                    {v.author_id for v in versions}
                    | {v.verifier_id for v in versions if v.verifier_id}
                )
            )
        )
    }
    author = users.get(main.author_id)
    verifier = users.get(main.verifier_id) if main.verifier_id else None
    # OBR-32 is the radiologist responsible for the result; a trainee author goes in OBR-33.
    principal, assistant = author, None
    if verifier is not None and author is not None and verifier.id != author.id:
        principal, assistant = verifier, author
    body, impression = main.text, ""
    if profile.impression_separate:
        body, impression = rules.split_impression(main.text)
    return OruInput(
        control_id=control_id,
        message_time=now,
        status=rules.result_status(version.kind),
        patient_identifiers=pid3,
        accession_number=study.accession_number,
        procedure_code=study.procedure_code or "",
        procedure_name=study.procedure_name or "",
        procedure_coding_system=study.procedure_coding_system or "",
        report_time=version.signed_at,
        radiologist=_clinician(principal),
        trainee=_clinician(assistant) if assistant is not None else None,
        text=body,
        impression=impression,
        addenda=tuple(
            Addendum(a.text, a.signed_at, _clinician(users.get(a.author_id))) for a in addenda
        ),
        placer_order_number=(
            OrderNumber(study.placer_order_number, study.placer_order_namespace or "")
            if study.placer_order_number else None
        ),
        filler_order_number=(
            OrderNumber(study.filler_order_number, study.filler_order_namespace or "")
            if study.filler_order_number else None
        ),
        patient_family_name=patient.family_name or "UNKNOWN",
        patient_given_name=patient.given_name or "",
        birth_date=patient.birth_date,
        sex=patient.sex or "",
        patient_class=study.patient_class or "",
        modality=study.modality or "",
        exam_time=study.performed_at,
        urgent=any(v.urgent_finding for v in versions),
        study_instance_uid=study.study_instance_uid or "",
    )  # fmt: skip


def build_payload(session: Session, *, message: OutboundMessage, now: datetime) -> str:
    """(Re)build the ORU text of an outbox row from its report version, keeping its control id."""
    study = session.get(Study, message.study_id)
    version = session.get(ReportVersion, message.report_version_id)
    trust = session.get(Trust, message.trust_id)
    if study is None or version is None or trust is None:
        raise NotFound(f"outbound message {message.id} has no study or report version")
    profile = outbound_profile(trust)
    inp = oru_input_for(
        session, study=study, version=version, control_id=message.control_id, now=now,
        profile=profile,
    )  # fmt: skip
    return build_oru(inp, profile).text


def queue_oru(
    session: Session, *, study: Study, version: ReportVersion, now: datetime
) -> OutboundMessage:
    """Write the outbox row for a signed version (same transaction as the version).

    If the ORU cannot be built (a profile or data problem), the report stays signed and the row
    is parked with the reason and an alert, for a person to fix and resend: signing must not
    fail because an interface is misconfigured.
    """
    message = OutboundMessage(
        trust_id=study.trust_id,
        study_id=study.id,
        report_version_id=version.id,
        control_id=new_control_id(version.id),
        message_type="ORU^R01",
        payload="",
        state="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(message)
    try:
        message.payload = build_payload(session, message=message, now=now)
    except (OutboundError, ValueError) as exc:
        logger.warning("ORU for study %s cannot be built: %s", study.id, exc)
        message.state = "parked"
        message.next_attempt_at = None
        message.last_error = f"cannot build the ORU: {exc}"[:4000]
        session.add(
            Alert(
                kind=PARKED_ALERT, study_id=study.id, trust_id=study.trust_id, created_at=now,
                message=f"Report for accession {study.accession_number} is signed but its ORU "
                f"cannot be built: {exc}"[:1000],
            )
        )  # fmt: skip
    session.flush()
    return message


# --- alerts -------------------------------------------------------------------------------


def open_alerts(session: Session, *, kinds: tuple[str, ...] = ()) -> list[Alert]:
    """Alerts nobody has acknowledged yet, newest first (what managers see)."""
    query = sa.select(Alert).where(Alert.acknowledged_at.is_(None)).order_by(Alert.id.desc())
    if kinds:
        query = query.where(Alert.kind.in_(kinds))
    return list(session.scalars(query))


def acknowledge_alert(
    session: Session, *, alert_id: int, user: User, now: datetime, remote_addr: str | None = None
) -> Alert:
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFound(f"no alert {alert_id}")
    if user.role not in ("manager", "admin") and alert.user_id != user.id:
        raise Forbidden("only a manager, or the person it is addressed to, acknowledges an alert")
    if alert.acknowledged_at is None:
        alert.acknowledged_at = now
        alert.acknowledged_by_id = user.id
        audit.record(
            session, at=now, action="acknowledge_alert", user=user, object_type="alert",
            object_id=alert.id, detail={"kind": alert.kind}, remote_addr=remote_addr,
        )  # fmt: skip
    return alert


def version_json(version: ReportVersion) -> dict[str, Any]:
    return {
        "sequence": version.sequence,
        "kind": version.kind,
        "result_status": rules.result_status(version.kind),
        "text": version.text,
        "author_id": version.author_id,
        "verifier_id": version.verifier_id,
        "signed_at": version.signed_at.isoformat(),
        "urgent_finding": version.urgent_finding,
    }
