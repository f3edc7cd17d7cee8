"""JSON shapes of the API's resources, in one place so every endpoint says the same thing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from worklist.db.models import Study, Trust, User


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def trust_json(trust: Trust) -> dict[str, Any]:
    return {
        "code": trust.code,
        "name": trust.name,
        "sending_application": trust.sending_application,
        "sending_facility": trust.sending_facility,
        "ris_host": trust.ris_host,
        "ris_port": trust.ris_port,
        "ack_mode": trust.ack_mode,
        "active": trust.active,
    }


def user_json(user: User) -> dict[str, Any]:
    return {
        "username": user.username,
        "full_name": user.full_name,
        "role": user.role,
        "trusts": sorted(p.trust.code for p in user.permissions),
        "credentials": sorted(
            c.modality + (f":{c.body_area}" if c.body_area else "") for c in user.credentials
        ),
    }


def study_json(study: Study) -> dict[str, Any]:
    patient = study.patient
    return {
        "id": study.id,
        "trust": study.trust.code,
        "accession_number": study.accession_number,
        "placer_order_number": study.placer_order_number,
        "filler_order_number": study.filler_order_number,
        "status": study.status,
        "procedure_code": study.procedure_code,
        "procedure_name": study.procedure_name,
        "modality": study.modality,
        "body_area": study.body_area,
        "order_priority": study.order_priority,
        "patient_class": study.patient_class,
        "pathway": study.pathway,
        "clinical_details": study.clinical_details,
        "referrer": study.referrer,
        "patient": {
            "local_id": patient.local_id,
            "nhs_number": patient.nhs_number,
            "nhs_number_valid": patient.nhs_number_valid,
            "family_name": patient.family_name,
            "given_name": patient.given_name,
            "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
            "sex": patient.sex,
        },
        "requested_at": iso(study.requested_at),
        "performed_at": iso(study.performed_at),
        "ready_at": iso(study.ready_at),
        "priority": {
            "class": study.priority_class,
            "due_at": iso(study.due_at),
            "urgency": study.urgency,
            "explanation": study.priority_explanation,
        },
        "claimed_by": study.claimed_by.username if study.claimed_by else None,
        "claim_expires_at": iso(study.claim_expires_at),
    }
