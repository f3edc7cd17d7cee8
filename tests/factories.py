"""Builders for test data, going through the services where a service exists."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from worklist.db.models import Patient, PatientIdentifier, Study, StudyStatusChange, Trust, User
from worklist.domain.nhs import is_valid_nhs_number, normalise_nhs_number
from worklist.services import accounts, trusts

_seq = itertools.count(1)


def make_trust(session: Session, *, now: datetime, code: str = "RW6", **kwargs: Any) -> Trust:
    kwargs.setdefault("name", f"Trust {code}")
    kwargs.setdefault("sending_facility", code)
    kwargs.setdefault("sending_application", "RIS")
    return trusts.add_trust(session, code=code, now=now, **kwargs)


def make_user(
    session: Session,
    *,
    now: datetime,
    username: str | None = None,
    role: str = "radiologist",
    trusts: tuple[str, ...] = (),
    credentials: tuple[str, ...] = (),
    on_duty: bool = False,
    password: str | None = None,
    **kwargs: Any,
) -> User:
    return accounts.add_user(
        session,
        username=username or f"user{next(_seq)}",
        role=role,
        now=now,
        trust_codes=trusts,
        credentials=[accounts.CredentialSpec.parse(c) for c in credentials],
        on_duty_hours=24 if on_duty else None,
        password=password,
        **kwargs,
    )


def make_token(session: Session, *, user: User, now: datetime) -> str:
    return accounts.create_token(session, user=user, now=now)


def make_patient(
    session: Session,
    *,
    trust: Trust,
    now: datetime,
    local_id: str | None = None,
    nhs_number: str | None = None,
    family_name: str = "Test",
    given_name: str = "Patient",
    birth_date: date | None = None,
) -> Patient:
    nhs = normalise_nhs_number(nhs_number)
    valid = is_valid_nhs_number(nhs)
    patient = Patient(
        trust_id=trust.id,
        local_id=local_id or f"MRN{next(_seq):06d}",
        local_authority=trust.code,
        family_name=family_name,
        given_name=given_name,
        birth_date=birth_date,
        nhs_number=nhs,
        nhs_number_valid=valid,
        link_nhs_number=nhs if valid else None,
        updated_at=now,
    )
    patient.identifiers = [
        PatientIdentifier(value=patient.local_id, authority=trust.code, type_code="MR")
    ]
    if nhs:
        patient.identifiers.append(PatientIdentifier(value=nhs, authority="NHS", type_code="NH"))
    session.add(patient)
    session.flush()
    return patient


def make_study(
    session: Session,
    *,
    trust: Trust,
    now: datetime,
    patient: Patient | None = None,
    accession_number: str | None = None,
    status: str = "ready",
    modality: str = "CT",
    body_area: str | None = "NEURO",
    order_priority: str = "R",
    patient_class: str = "O",
    performed_ago: timedelta = timedelta(hours=1),
    **kwargs: Any,
) -> Study:
    patient = patient or make_patient(session, trust=trust, now=now)
    n = next(_seq)
    performed = now - performed_ago
    study = Study(
        trust_id=trust.id,
        patient_id=patient.id,
        accession_number=accession_number or f"ACC{n:07d}",
        placer_order_number=f"PL{n}",
        filler_order_number=f"FL{n}",
        procedure_code=kwargs.pop("procedure_code", "CHEAD"),
        procedure_name=kwargs.pop("procedure_name", "CT Head"),
        modality=modality,
        body_area=body_area,
        order_priority=order_priority,
        patient_class=patient_class,
        status=status,
        status_changed_at=now,
        performed_at=performed if status != "scheduled" else None,
        ready_at=performed if status == "ready" else None,
        requested_at=performed - timedelta(hours=2),
        created_at=now,
        updated_at=now,
        **kwargs,
    )
    session.add(study)
    session.flush()
    session.add(StudyStatusChange(study_id=study.id, to_status=status, at=now, source="test"))
    return study
