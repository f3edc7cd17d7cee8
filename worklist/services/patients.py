"""Patients across the region: the link between trusts is a valid NHS number, nothing else."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worklist.db.models import Patient


def regional_records(session: Session, *, patient: Patient) -> list[Patient]:
    """Every record of the same person in the region, this one included.

    Records are linked only through `link_nhs_number`, which is set only for a valid
    NHS number; a record with no valid number stands alone (its own trust's record).
    Merged-away records follow their survivor.
    """
    if patient.link_nhs_number is None:
        return [patient]
    return list(
        session.scalars(
            sa.select(Patient)
            .where(Patient.link_nhs_number == patient.link_nhs_number)
            .order_by(Patient.trust_id, Patient.id)
        )
    )
