"""Neutral domain events that inbound HL7 becomes and the order service applies.

`hl7/inbound.py` is the only place that knows where these values sit in an
ORM^O01, OMI^O23 or ADT message; everything after it sees only these frozen
dataclasses. Nothing here imports HL7 or the database.

Conventions:
* every datetime is timezone-aware (naive HL7 times are read as Europe/London
  local time by the parser before they get here);
* optional values are None, never "" (an HL7 "" meaning "delete this value" is
  not carried: the worklist never deletes order data on a message's say-so);
* codes are kept as the sender sent them after per-trust mapping
  (`order_priority` S/A/R/P/T/C..., `patient_class` E/I/O/...);
* each event carries the message time (MSH-7), the order control (ORC-1) and
  the order status (ORC-5) so the service can refuse to let an older message
  overwrite newer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NamedTuple

from worklist.domain.nhs import is_valid_nhs_number, normalise_nhs_number


class Identifier(NamedTuple):
    """One patient identifier as sent (PID-3 / MRG-1 repetition): CX.1, CX.4, CX.5."""

    value: str
    authority: str | None = None
    type_code: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PatientIdentity:
    """Who the message is about, within one trust.

    `local_id`/`local_authority` is the trust's hospital number (MRN), the key
    of a patient within that trust. `nhs_number` is normalised (ten digits,
    no spaces); it links patients across trusts only when `nhs_number_valid`
    (Modulus 11). `nhs_number_status` is PID-32 as sent (NSTS01 = verified).
    `identifiers` keeps every identifier the sender listed, NHS number included.
    """

    local_id: str | None
    local_authority: str | None = None
    nhs_number: str | None = None
    nhs_number_valid: bool = False
    nhs_number_status: str | None = None
    identifiers: tuple[Identifier, ...] = ()
    family_name: str | None = None
    given_name: str | None = None
    birth_date: date | None = None
    sex: str | None = None

    @classmethod
    def with_nhs_number(cls, *, nhs_number: str | None, **fields: object) -> PatientIdentity:
        """Build an identity, normalising the NHS number and recording whether it is valid."""
        number = normalise_nhs_number(nhs_number)
        return cls(
            nhs_number=number,
            nhs_number_valid=is_valid_nhs_number(number),
            **fields,  # type: ignore[arg-type]
        )

    @property
    def link_nhs_number(self) -> str | None:
        """The NHS number usable for the regional link: only a valid one."""
        return self.nhs_number if self.nhs_number_valid else None


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderFields:
    """What one ORC/OBR (and TQ1/IPC/ZDS) group says about one requested examination.

    Order numbers are namespaced by trust by the service (the key of a study is
    (trust, accession number)); `*_namespace` keep EI.2 so the ORU can echo the
    trust's numbers exactly.
    """

    placer_order_number: str | None = None
    placer_order_namespace: str | None = None
    filler_order_number: str | None = None
    filler_order_namespace: str | None = None
    accession_number: str | None = None
    procedure_code: str | None = None
    procedure_name: str | None = None
    procedure_coding_system: str | None = None
    modality: str | None = None
    body_area: str | None = None
    order_priority: str | None = None
    patient_class: str | None = None
    pathway: str | None = None
    clinical_details: str | None = None
    referrer: str | None = None
    referral_at: datetime | None = None
    requested_at: datetime | None = None
    scheduled_at: datetime | None = None
    performed_at: datetime | None = None
    study_instance_uid: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class InboundEvent:
    """Fields common to every event: when the sender says it happened and the ORC-1/ORC-5 codes."""

    message_time: datetime
    order_control: str | None = None
    order_status: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderEvent(InboundEvent):
    """An event about one order (one ORC/OBR group); `patient` is None when there was no PID."""

    patient: PatientIdentity | None
    order: OrderFields


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderPlaced(OrderEvent):
    """ORC-1 NW (or SN/NA filler-originated numbering for an order we have not seen)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderChanged(OrderEvent):
    """ORC-1 XO/XX (and SN/NA/RP/RU/RO): replace the order's details with these."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderCancelled(OrderEvent):
    """ORC-1 CA/OC: the examination will not happen; take it off every list."""

    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderDiscontinued(OrderEvent):
    """ORC-1 DC/OD: stopped part way; history kept."""

    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderHeld(OrderEvent):
    """ORC-1 HD/OH: paused."""

    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderReleased(OrderEvent):
    """ORC-1 RL/OE: a held order resumes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExamStatusChanged(OrderEvent):
    """ORC-1 SC with ORC-5 SC (scheduled), IP (in progress) or CM (exam complete).

    `order_status` (inherited) is the new status; CM makes the study ready to report.
    """


@dataclass(frozen=True, kw_only=True, slots=True)
class PatientUpdated(InboundEvent):
    """ADT A01/A04/A08/A28/A31: demographics (and identifiers) for one patient of the trust."""

    patient: PatientIdentity
    trigger: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PatientsMerged(InboundEvent):
    """ADT A40/A34/A18 (MRG): the prior identifiers now belong to `surviving`.

    Studies filed under any of `prior_identifiers` (in this trust) move to the
    surviving patient; nothing is deleted.
    """

    surviving: PatientIdentity
    prior_identifiers: tuple[Identifier, ...] = field(default_factory=tuple)
    prior_local_id: str | None = None
    trigger: str | None = None


ORDER_EVENT_TYPES: tuple[type[OrderEvent], ...] = (
    OrderPlaced,
    OrderChanged,
    OrderCancelled,
    OrderDiscontinued,
    OrderHeld,
    OrderReleased,
    ExamStatusChanged,
)

DomainEvent = (
    OrderPlaced
    | OrderChanged
    | OrderCancelled
    | OrderDiscontinued
    | OrderHeld
    | OrderReleased
    | ExamStatusChanged
    | PatientUpdated
    | PatientsMerged
)
"""Every event `hl7/inbound.py` can produce."""
