"""The demo region: the eight Greater Manchester trusts, a dozen radiologists and a few
hundred studies in every state, so that a new user sees a populated worklist at once.

Synthetic data only: names are invented and NHS numbers are in the 999 test range.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db.models import (
    Patient,
    PatientIdentifier,
    Report,
    ReportVersion,
    Study,
    StudyStatusChange,
    Trust,
    User,
)
from worklist.domain.nhs import is_valid_nhs_number
from worklist.domain.study import StudyStatus
from worklist.services import accounts, trusts

# ODS code, name, RIS MSH-3, MSH-4. The RIS endpoints are the RIS simulator's ports.
TRUSTS = (
    ("RMC", "Bolton NHS Foundation Trust", "CRIS", "RMC"),
    ("RBV", "The Christie NHS Foundation Trust", "SECTRA_RIS", "RBV"),
    ("R0A", "Manchester University NHS Foundation Trust", "EPIC_RADIANT", "R0A"),
    ("RM3", "Northern Care Alliance NHS Foundation Trust (Salford Royal)", "CRIS", "RM3"),
    ("RW6", "Pennine Acute Hospitals NHS Trust", "CRIS", "RW6"),
    ("RWJ", "Stockport NHS Foundation Trust", "SOLITON", "RWJ"),
    ("RMP", "Tameside and Glossop Integrated Care NHS Foundation Trust", "CRIS", "RMP"),
    ("RRF", "Wrightington, Wigan and Leigh Teaching Hospitals NHS Foundation Trust", "CRIS", "RRF"),
)
RIS_BASE_PORT = 12575  # RIS simulator: trust i listens on RIS_BASE_PORT + i

DEMO_PASSWORD = "demo-password"  # documented in the README; demo data refuses production


@dataclass(frozen=True)
class DemoRadiologist:
    username: str
    full_name: str
    trusts: tuple[str, ...]
    credentials: tuple[str, ...]
    can_finalise: bool = True


RADIOLOGISTS = (
    DemoRadiologist("asingh", "Dr Anjali Singh", ("R0A", "RM3", "RW6"), ("CT", "MR:NEURO", "XR")),
    DemoRadiologist("bmorris", "Dr Ben Morris", ("RMC", "RRF"), ("CT", "XR", "US")),
    DemoRadiologist("cokafor", "Dr Chidi Okafor", ("RBV", "R0A"), ("CT", "MR", "NM")),
    DemoRadiologist("dhughes", "Dr Deborah Hughes", ("RWJ", "RMP", "R0A"), ("MG", "US:BREAST")),
    DemoRadiologist("ekhan", "Dr Emran Khan", tuple(t[0] for t in TRUSTS), ("XR", "CT")),
    DemoRadiologist("fwalsh", "Dr Fiona Walsh", ("RM3", "RW6", "RMP"), ("MR:MSK", "XR", "US:MSK")),
    DemoRadiologist("gpatel", "Dr Gita Patel", ("RBV",), ("CT", "MR", "PT")),
    DemoRadiologist("hjones", "Dr Huw Jones", ("RMC", "RWJ", "RRF"), ("CT:CHEST", "XR:CHEST")),
    DemoRadiologist("iobi", "Dr Ifeoma Obi", tuple(t[0] for t in TRUSTS), ("MR", "CT")),
    DemoRadiologist("jchen", "Dr Jia Chen", ("R0A",), ("US", "XR:PAED", "MR:PAED")),
    DemoRadiologist("kwright", "Dr Kate Wright (ST3)", ("R0A", "RM3"), ("XR", "CT"), False),
    DemoRadiologist("lroberts", "Dr Liam Roberts (ST4)", ("RMC", "RW6"), ("XR", "US"), False),
)

# procedure code, name, modality, body area, relative effort
PROCEDURES = (
    ("CHEAD", "CT Head", "CT", "NEURO", 1.0),
    ("CCAPC", "CT Chest abdomen pelvis with contrast", "CT", "BODY", 2.0),
    ("CCHEC", "CT Chest with contrast", "CT", "CHEST", 1.5),
    ("CPULA", "CT Pulmonary angiogram", "CT", "CHEST", 1.5),
    ("MBRAI", "MRI Head", "MR", "NEURO", 2.0),
    ("MKNEL", "MRI Knee left", "MR", "MSK", 1.5),
    ("MLSPI", "MRI Lumbar spine", "MR", "MSK", 1.5),
    ("XCHES", "XR Chest", "XR", "CHEST", 0.3),
    ("XWRIR", "XR Wrist right", "XR", "MSK", 0.3),
    ("XPCHE", "XR Chest paediatric", "XR", "PAED", 0.4),
    ("UABDO", "US Abdomen", "US", "BODY", 0.8),
    ("UBRBL", "US Breast bilateral", "US", "BREAST", 0.8),
    ("MAMMB", "Mammography bilateral", "MG", "BREAST", 0.6),
    ("NBONE", "NM Bone scan", "NM", "BODY", 1.2),
)
FAMILY = (
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Johnson",
    "Davies",
    "Patel",
    "Robinson",
    "Wright",
    "Thompson",
    "Evans",
    "Walker",
    "O'Brien",
    "Hughes",
    "Khan",
    "Ahmed",
    "Nowak",
    "Kowalski",
    "Okoro",
    "Lewis",
    "Clarke",
    "Begum",
)
GIVEN = (
    "Oliver",
    "Amelia",
    "George",
    "Isla",
    "Harry",
    "Ava",
    "Noah",
    "Mia",
    "Jack",
    "Sofia",
    "Muhammad",
    "Grace",
    "Leo",
    "Freya",
    "Arthur",
    "Zainab",
    "Renée",
    "Seán",
    "Aoife",
    "Tomasz",
)
# Clinical questions by body area, so that each request reads like a real one.
CLINICAL = {
    "NEURO": (
        "Fall, head injury, on anticoagulants. ?bleed",
        "Sudden severe headache. ?SAH",
        "New left-sided weakness. ?stroke",
        "Progressive memory loss",
    ),
    "BODY": (
        "Weight loss, iron deficiency anaemia. ?malignancy",
        "RUQ pain, deranged LFTs",
        "Routine follow-up, known lymphoma",
        "Staging, newly diagnosed colorectal cancer",
    ),
    "CHEST": (
        "Cough 6 weeks, smoker. 2WW suspected lung cancer",
        "SOB, raised D-dimer. ?PE",
        "Fever and crackles right base. ?consolidation",
        "Pre-operative assessment",
    ),
    "MSK": (
        "Knee locking after twisting injury",
        "Back pain with left leg radiculopathy",
        "FOOSH, tender snuffbox",
        "Hip pain, unable to weight bear. ?NOF fracture",
    ),
    "PAED": ("Wheeze and fever, 3 years old", "Persistent cough, ?inhaled foreign body"),
    "BREAST": ("Palpable breast lump, 2WW", "Breast screening recall", "Nipple discharge, 2WW"),
}

# How the demo's studies are spread over states (weights).
STATUS_MIX = (
    (StudyStatus.SCHEDULED, 10),
    (StudyStatus.IN_PROGRESS, 3),
    (StudyStatus.READY, 60),
    (StudyStatus.PRELIMINARY, 5),
    (StudyStatus.FINAL, 18),
    (StudyStatus.ON_HOLD, 2),
    (StudyStatus.CANCELLED, 2),
)
PRIORITY_MIX = (("R", 70), ("A", 15), ("S", 8), ("T", 7))
CLASS_MIX = (("O", 55), ("I", 30), ("E", 15))


def is_empty(session: Session) -> bool:
    return session.scalar(sa.select(sa.func.count()).select_from(Trust)) == 0


def demo_nhs_number(rng: random.Random, *, valid: bool = True) -> str:
    """A number in the 999 test range that passes (or, on request, fails) Modulus 11."""
    while True:
        candidate = "999" + "".join(str(rng.randrange(10)) for _ in range(7))
        if is_valid_nhs_number(candidate) == valid:
            return candidate


def _pick(rng: random.Random, weighted: tuple[tuple[object, int], ...]) -> object:
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights=weights)[0]


def load(session: Session, *, now: datetime, seed: int = 7, studies: int = 360) -> str:
    """Create the demo region; refuses to run on a database that already has trusts."""
    if not is_empty(session):
        return "demo: the database already has trusts; nothing loaded"
    rng = random.Random(seed)
    trust_rows: list[Trust] = []
    for index, (code, name, application, facility) in enumerate(TRUSTS):
        trust_rows.append(
            trusts.add_trust(
                session,
                code=code,
                name=name,
                sending_application=application,
                sending_facility=facility,
                ris_host="127.0.0.1",
                ris_port=RIS_BASE_PORT + index,
                now=now,
            )
        )
    by_code = {t.code: t for t in trust_rows}
    radiologists: list[User] = []
    for r in RADIOLOGISTS:
        radiologists.append(
            accounts.add_user(
                session,
                username=r.username,
                role="radiologist",
                full_name=r.full_name,
                password=DEMO_PASSWORD,
                trust_codes=r.trusts,
                credentials=[accounts.CredentialSpec.parse(c) for c in r.credentials],
                on_duty_hours=10,
                can_finalise=r.can_finalise,
                now=now,
                professional_id=f"{7000000 + len(radiologists) * 137:07d}",
            )
        )
    accounts.add_user(
        session,
        username="manager",
        role="manager",
        full_name="Service Manager",
        password=DEMO_PASSWORD,
        now=now,
    )
    accounts.add_user(
        session,
        username="admin",
        role="admin",
        full_name="Administrator",
        password=DEMO_PASSWORD,
        now=now,
    )

    # Patients: some have studies at several trusts (the regional link), a few an invalid
    # NHS number.
    patients: list[Patient] = []
    people = [
        (
            rng.choice(FAMILY),
            rng.choice(GIVEN),
            demo_nhs_number(rng, valid=rng.random() > 0.05),
            date(1930, 1, 1) + timedelta(days=rng.randrange(30000)),
            rng.choice("MF"),
        )
        for _ in range(studies // 2)
    ]
    study_count = 0
    counter = 0
    for family, given, nhs, dob, sex in people:
        visits = rng.choice((1, 1, 1, 2, 3))
        trusts_seen = rng.sample(trust_rows, k=min(visits, len(trust_rows)))
        for trust in trusts_seen:
            counter += 1
            valid = is_valid_nhs_number(nhs)
            patient = Patient(
                trust_id=trust.id,
                local_id=f"{trust.code}{100000 + counter}",
                local_authority=trust.code,
                family_name=family,
                given_name=given,
                birth_date=dob,
                sex=sex,
                nhs_number=nhs,
                nhs_number_valid=valid,
                nhs_number_status="NSTS01" if valid else "NSTS02",
                link_nhs_number=nhs if valid else None,
                updated_at=now,
            )
            patient.identifiers = [
                PatientIdentifier(value=nhs, authority="NHS", type_code="NH"),
                PatientIdentifier(value=patient.local_id, authority=trust.code, type_code="MR"),
            ]
            session.add(patient)
            patients.append(patient)
    session.flush()
    for patient in patients:
        for _ in range(rng.choice((1, 1, 2))):
            study_count += 1
            _add_study(session, rng, patient, by_code, radiologists, now, study_count)
    session.flush()
    _prioritise(session, now)
    return (
        f"demo: loaded {len(trust_rows)} trusts, {len(radiologists)} radiologists, "
        f"{len(patients)} patient records, {study_count} studies; "
        f"sign in as asingh, manager or admin with password {DEMO_PASSWORD!r}"
    )


def _add_study(
    session: Session,
    rng: random.Random,
    patient: Patient,
    trusts_by_code: dict[str, Trust],
    radiologists: list[User],
    now: datetime,
    n: int,
) -> None:
    code, name, modality, body_area, effort = rng.choice(PROCEDURES)
    status = _pick(rng, STATUS_MIX)
    assert isinstance(status, StudyStatus)
    priority, patient_class = _pick(rng, PRIORITY_MIX), _pick(rng, CLASS_MIX)
    # How long ago the exam was done: a realistic queue has stat work from the last hours,
    # inpatients from the last day or two, outpatients from the last weeks.
    if priority == "S" or patient_class == "E":
        waited = timedelta(minutes=rng.randrange(5, 180))
    elif priority in {"A", "T"} or patient_class == "I":
        waited = timedelta(minutes=rng.randrange(30, 60 * 48))
    else:
        waited = timedelta(minutes=rng.randrange(60, 60 * 24 * 24))
    performed = now - waited
    requested = performed - timedelta(minutes=rng.randrange(20, 60 * 24 * 5))
    trust = next(t for t in trusts_by_code.values() if t.id == patient.trust_id)
    clinical = rng.choice(CLINICAL[body_area])
    pathway = "suspected_cancer" if "2WW" in clinical or "malignancy" in clinical else None
    study = Study(
        trust_id=trust.id,
        patient_id=patient.id,
        accession_number=f"{trust.code}{20260000 + n}",
        placer_order_number=f"PL{500000 + n}",
        filler_order_number=f"FL{800000 + n}",
        procedure_code=code,
        procedure_name=name,
        modality=modality,
        body_area=body_area,
        order_priority=priority,
        patient_class=patient_class,
        pathway=pathway,
        clinical_details=clinical,
        referrer="Dr A Referrer",
        referral_at=requested - timedelta(days=rng.randrange(1, 10)) if pathway else None,
        requested_at=requested,
        effort=effort,
        status=status.value,
        status_changed_at=now,
        created_at=requested,
        updated_at=now,
    )
    if status not in {StudyStatus.SCHEDULED, StudyStatus.CANCELLED}:
        study.performed_at = performed
    if status in {StudyStatus.READY, StudyStatus.PRELIMINARY, StudyStatus.FINAL}:
        study.ready_at = study.images_available_at = performed
    if status == StudyStatus.ON_HOLD:
        study.status_before_hold = StudyStatus.SCHEDULED.value
    session.add(study)
    session.flush()
    session.add(
        StudyStatusChange(
            study_id=study.id,
            from_status=None,
            to_status=status.value,
            at=now,
            reason="demo data",
            source="system",
        )
    )
    if status in {StudyStatus.PRELIMINARY, StudyStatus.FINAL}:
        author = rng.choice(radiologists)
        report = Report(study_id=study.id, draft_text="", status=status.value)
        signed = min(now, performed + timedelta(hours=rng.randrange(1, 48)))
        report.versions = [
            ReportVersion(
                study_id=study.id,
                sequence=1,
                kind=status.value,
                author_id=author.id,
                signed_at=signed,
                text=f"{name}.\n\nFindings: no acute abnormality.\n\nImpression: normal study.",
            )
        ]
        session.add(report)


def _prioritise(session: Session, now: datetime) -> None:
    """Give every ready study its priority, due time and explanation, as the scheduler would."""
    try:
        from worklist.services.worklist import reprioritise
    except ImportError:
        return
    reprioritise(session, now=now)
