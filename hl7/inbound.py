"""Inbound HL7 -> domain events: the one place that knows inbound segment and field positions.

`message_events(message, profile)` reads an ORM^O01, OMI^O23 or ADT message
(already tokenised by `hl7/er7.py`) and returns the neutral events of
`worklist/domain/events.py`; or raises an `Hl7Error` saying which ACK the
message deserves and why. It knows nothing of sessions, trusts' rows or
sockets.

Where a trust puts things differs (HL7-NOTES section 7): each trust's
`hl7_profile["inbound"]` dict is read by `InboundProfile.from_dict`, whose
defaults are documented on the class. The defaults follow IHE SWF (2.3.1:
accession number in OBR-18, modality in OBR-24, Study Instance UID in ZDS) and
SWF.b (2.5.1 OMI: IPC-1 accession, IPC-5 modality, IPC-3 UID, TQ1-9 priority),
and the NHS England PID-3 convention (``NNNNNNNNNN^^^NHS^NH`` plus the hospital
number).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from hl7.er7 import Er7Message, Segment, parse_date, parse_timestamp
from hl7.errors import (
    DataTypeError,
    Hl7Error,
    RequiredFieldMissing,
    SegmentSequenceError,
    TableValueNotFound,
    UnsupportedProcessingId,
    UnsupportedVersion,
)
from worklist.domain.events import (
    DomainEvent,
    ExamStatusChanged,
    Identifier,
    OrderCancelled,
    OrderChanged,
    OrderDiscontinued,
    OrderEvent,
    OrderFields,
    OrderHeld,
    OrderPlaced,
    OrderReleased,
    PatientIdentity,
    PatientsMerged,
    PatientUpdated,
)

SUPPORTED_VERSIONS = ("2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1")
"""2.3-2.5.1; 2.2 too, since old UK RIS still send it and its ORM has the same shape."""


# ORC-1 (HL7 table 0119) -> event class. SN/NA: filler-originated numbering.
ORDER_CONTROL_EVENTS: dict[str, type[OrderEvent]] = {
    "NW": OrderPlaced,
    "SN": OrderPlaced,
    "XO": OrderChanged,
    "XX": OrderChanged,
    "NA": OrderChanged,
    "RP": OrderChanged,
    "RU": OrderChanged,
    "RO": OrderChanged,
    "CA": OrderCancelled,
    "OC": OrderCancelled,
    "DC": OrderDiscontinued,
    "OD": OrderDiscontinued,
    "HD": OrderHeld,
    "OH": OrderHeld,
    "RL": OrderReleased,
    "OE": OrderReleased,
    "SC": ExamStatusChanged,
}

# ORC-1 SC carries its meaning in ORC-5 (table 0038).
STATUS_CHANGE_EVENTS: dict[str, type[OrderEvent]] = {
    "SC": ExamStatusChanged,
    "IP": ExamStatusChanged,
    "CM": ExamStatusChanged,
    "CA": OrderCancelled,
    "DC": OrderDiscontinued,
    "HD": OrderHeld,
}

PRIORITY_CODES = frozenset({"S", "A", "R", "P", "C", "T", "PRN"})
"""HL7 table 0485 (TQ1-9, TQ.6): stat, ASAP, routine, pre-op, callback, timing critical, PRN."""

_FIELD_CHOICES = {
    "accession": ("OBR-18", "OBR-3", "OBR-19", "OBR-20", "ORC-3", "IPC-1"),
    "priority": ("OBR-27", "ORC-7", "TQ1-9", "OBR-5"),
    "modality": ("OBR-24", "IPC-5", "procedure_table"),
    "nhs_number": ("PID-3", "PID-2", "PID-19"),
}

_TEXT_PATIENT_CLASSES = {
    "EMERGENCY": "E",
    "A&E": "E",
    "ED": "E",
    "INPATIENT": "I",
    "IN PATIENT": "I",
    "DAY CASE": "I",
    "DAYCASE": "I",
    "OUTPATIENT": "O",
    "OUT PATIENT": "O",
    "GP": "O",
    "GP DIRECT ACCESS": "O",
}

_TEXT_PRIORITIES = {
    "STAT": "S",
    "URGENT": "A",
    "U": "A",
    "ASAP": "A",
    "ROUTINE": "R",
    "RT": "R",
    "PREOP": "P",
    "PRE-OP": "P",
    "TC": "T",
}


def _as_tuple(value: Any, name: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"inbound profile {name!r}: expected strings, got {item!r}")
        if allowed is not None and item not in allowed:
            raise ValueError(f"inbound profile {name!r}: {item!r} is not one of {allowed}")
    return items


@dataclass(frozen=True)
class InboundProfile:
    """Where one trust puts things in its inbound messages (`Trust.hl7_profile["inbound"]`).

    Each `*_fields` setting is a list tried in order; the first non-empty value wins.

    * `accession_fields` (default OBR-18, IPC-1, OBR-3): OBR-18 | OBR-3 | OBR-19 |
      OBR-20 | ORC-3 | IPC-1. Set it explicitly per trust: the default is a guess.
    * `priority_fields` (default TQ1-9, OBR-27, ORC-7, OBR-5): for OBR-27/ORC-7 the
      TQ priority is component 6. `priority_map` translates local codes (defaults
      map STAT, URGENT/U, ROUTINE/RT ...); table 0485 codes pass through.
    * `modality_sources` (default IPC-5, OBR-24, procedure_table); `modality_map`
      translates codes (e.g. {"MRI": "MR"}); `procedures` maps OBR-4.1 procedure
      codes to {"modality": ..., "body_area": ..., "pathway": ...}.
    * `patient_class_map`: PV1-2 -> E/I/O...; table 0004 codes pass through, common
      free text ("DAY CASE", "Inpatient") is translated by default.
    * `local_authority`: the assigning authority (PID-3.4) of the trust's hospital
      numbers; default: the first PID-3 identifier that is not the NHS number,
      preferring type MR.
    * `nhs_number_fields` (default PID-3, PID-2, PID-19); in PID-3 an identifier is
      the NHS number when its authority is in `nhs_authorities` (NHS) or its type in
      `nhs_type_codes` (NH, HN, NHS).
    * `pathway_markers`: {pathway: [text, ...]} searched (case-insensitively) in
      OBR-13, OBR-31 and order NTEs; default marks "suspected_cancer" on 2WW/USC/
      "suspected cancer"/FDS.
    * `processing_ids` accepted in MSH-11 (default P, T, D; a live trust should say
      ["P"]); `versions` accepted in MSH-12 (default `SUPPORTED_VERSIONS`).
    * `require_patient_for_new_orders` (default True): NW without PID-3 is AE 101.
    * `ignore_other_adt` (default True): ADT events other than updates and merges
      are acknowledged AA and ignored (HL7-NOTES 6.3); False answers AR 201.
    * `ack_mode`: auto | original | enhanced (see `hl7.ack.ack_is_enhanced`); None (the
      default) uses the trust's `ack_mode` column.
    * `timezone` for naive HL7 times (default Europe/London).
    """

    accession_fields: tuple[str, ...] = ("OBR-18", "IPC-1", "OBR-3")
    priority_fields: tuple[str, ...] = ("TQ1-9", "OBR-27", "ORC-7", "OBR-5")
    priority_map: Mapping[str, str] = field(default_factory=lambda: dict(_TEXT_PRIORITIES))
    modality_sources: tuple[str, ...] = ("IPC-5", "OBR-24", "procedure_table")
    modality_map: Mapping[str, str] = field(default_factory=dict)
    procedures: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    patient_class_map: Mapping[str, str] = field(
        default_factory=lambda: dict(_TEXT_PATIENT_CLASSES)
    )
    local_authority: str | None = None
    nhs_number_fields: tuple[str, ...] = ("PID-3", "PID-2", "PID-19")
    nhs_authorities: tuple[str, ...] = ("NHS",)
    nhs_type_codes: tuple[str, ...] = ("NH", "HN", "NHS")
    pathway_markers: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "suspected_cancer": ("2WW", "TWO WEEK WAIT", "SUSPECTED CANCER", "USC", "FDS")
        }
    )
    processing_ids: tuple[str, ...] = ("P", "T", "D")
    versions: tuple[str, ...] = SUPPORTED_VERSIONS
    require_patient_for_new_orders: bool = True
    ignore_other_adt: bool = True
    ack_mode: str | None = None
    timezone: str = "Europe/London"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InboundProfile:
        """Build from a trust's profile dict; unknown keys or bad values raise ValueError."""
        if not data:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown inbound profile settings: {sorted(unknown)}")
        values: dict[str, Any] = dict(data)
        for key, choices in (
            ("accession_fields", _FIELD_CHOICES["accession"]),
            ("priority_fields", _FIELD_CHOICES["priority"]),
            ("modality_sources", _FIELD_CHOICES["modality"]),
            ("nhs_number_fields", _FIELD_CHOICES["nhs_number"]),
        ):
            if key in values:
                values[key] = _as_tuple(values[key], key, choices)
        for key in ("nhs_authorities", "nhs_type_codes", "processing_ids", "versions"):
            if key in values:
                values[key] = _as_tuple(values[key], key)
        for key in ("priority_map", "modality_map", "patient_class_map"):
            if key in values:
                values[key] = {str(k).upper(): str(v) for k, v in dict(values[key]).items()}
        if "procedures" in values:
            values["procedures"] = {
                str(k).upper(): dict(v) for k, v in dict(values["procedures"]).items()
            }
        if "pathway_markers" in values:
            values["pathway_markers"] = {
                str(k): _as_tuple(v, "pathway_markers")
                for k, v in dict(values["pathway_markers"]).items()
            }
        if values.get("ack_mode") not in (None, "auto", "original", "enhanced"):
            raise ValueError(
                f"ack_mode must be auto, original or enhanced, not {values['ack_mode']!r}"
            )
        ZoneInfo(values.get("timezone", "Europe/London"))
        return cls(**values)

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone)


DEFAULT_PROFILE = InboundProfile()


# ---------------------------------------------------------------------------------------
# Header checks


def check_header(message: Er7Message, profile: InboundProfile = DEFAULT_PROFILE) -> str:
    """Refuse what we cannot handle at all (AR 203/202, AE 101); return `code^trigger`.

    Which types are accepted is the router's table (`hl7/router.py`), not this function's.
    """
    version = message.version
    if version not in profile.versions:
        raise UnsupportedVersion(
            f"HL7 version {version or '(empty)'} is not supported;"
            f" send one of {', '.join(profile.versions)}",
            segment="MSH",
            sequence=1,
            field=12,
        )
    processing = (message.get("MSH", 11) or "").strip()
    if processing and processing not in profile.processing_ids:
        raise UnsupportedProcessingId(
            f"processing id {processing!r} is not accepted here"
            f" ({', '.join(profile.processing_ids)})",
            segment="MSH",
            sequence=1,
            field=11,
        )
    code, trigger = message.message_code, message.trigger
    if not code:
        raise RequiredFieldMissing(
            "MSH-9 message type is empty", segment="MSH", sequence=1, field=9
        )
    return f"{code}^{trigger}"


def message_time(
    message: Er7Message, profile: InboundProfile, received_at: datetime | None
) -> datetime:
    """MSH-7 as an aware datetime; the receipt time when MSH-7 is empty."""
    raw = message.get("MSH", 7)
    try:
        when = parse_timestamp(raw, profile.tz)
    except ValueError as exc:
        raise DataTypeError(
            f"MSH-7 {raw!r} is not a date/time", segment="MSH", sequence=1, field=7
        ) from exc
    if when is not None:
        return when
    if received_at is not None:
        return received_at
    raise RequiredFieldMissing(
        "MSH-7 date/time of message is empty", segment="MSH", sequence=1, field=7
    )


def message_events(
    message: Er7Message,
    profile: InboundProfile | Mapping[str, Any] | None = None,
    *,
    received_at: datetime | None = None,
) -> list[DomainEvent]:
    """The domain events one inbound message stands for, or an Hl7Error saying why not.

    An empty list means "acknowledge and ignore" (e.g. an ADT^A03 discharge). The
    message type decides the handler through the router's table (`hl7.router.ROUTES`).
    """
    from hl7.router import route

    return route(message, profile, received_at=received_at)


def patient_update_events(
    message: Er7Message, profile: InboundProfile, when: datetime
) -> list[DomainEvent]:
    """ADT A01/A04/A05/A08/A28/A31: the patient's demographics and identifiers."""
    return [
        PatientUpdated(
            message_time=when,
            patient=_patient(message, profile, required=True),
            trigger=message.trigger,
        )
    ]


# ---------------------------------------------------------------------------------------
# Patients


def _patient(message: Er7Message, profile: InboundProfile, *, required: bool) -> PatientIdentity:
    pid = message.segment("PID")
    if pid is None:
        raise SegmentSequenceError("PID segment is missing", segment="PID", sequence=1)
    return patient_identity(pid, profile, required=required)


def patient_identity(
    pid: Segment, profile: InboundProfile, *, required: bool = True
) -> PatientIdentity:
    """PID -> PatientIdentity: hospital number, NHS number (validated) and every identifier."""
    identifiers = _identifiers(pid, 3)
    nhs_number: str | None = None
    nhs_index: int | None = None
    for source in profile.nhs_number_fields:
        if source == "PID-3":
            for i, ident in enumerate(identifiers):
                if _is_nhs(ident, profile):
                    nhs_number, nhs_index = ident.value, i
                    break
        else:
            number = pid.get(2 if source == "PID-2" else 19)
            if number and _looks_like_nhs_number(number):
                nhs_number = number
        if nhs_number:
            break
    local = _local_identifier(identifiers, nhs_index, profile)
    if local is None and pid.get(2) and not (nhs_number and pid.get(2) == nhs_number):
        # v2.2/2.3 feeds may send only the external id in PID-2.
        local = Identifier(pid.get(2) or "", pid.get(2, 4), pid.get(2, 5))
    if required and local is None and not nhs_number:
        raise RequiredFieldMissing(
            "PID-3 patient identifier list holds no identifier", segment="PID", sequence=1, field=3
        )
    status = pid.get(32)
    return PatientIdentity.with_nhs_number(
        nhs_number=nhs_number,
        local_id=local.value if local else None,
        local_authority=local.authority if local else None,
        nhs_number_status=status,
        identifiers=tuple(identifiers),
        family_name=pid.get(5, 1),
        given_name=pid.get(5, 2),
        birth_date=_birth_date(pid),
        sex=pid.get(8),
    )


def _identifiers(segment: Segment, field_no: int) -> list[Identifier]:
    found = []
    for rep in range(1, len(segment.repetitions(field_no)) + 1):
        value = segment.get(field_no, 1, repetition=rep)
        if not value or not value.strip():
            continue
        authority = segment.get(field_no, 4, repetition=rep) or _universal_id(
            segment, field_no, rep
        )
        found.append(Identifier(value.strip(), authority, segment.get(field_no, 5, repetition=rep)))
    return found


def _universal_id(segment: Segment, field_no: int, rep: int) -> str | None:
    """CX.4 as HD `namespace&universal id&type`: the namespace, else the universal id (OID)."""
    return segment.get(field_no, 4, 2, repetition=rep)


def _is_nhs(ident: Identifier, profile: InboundProfile) -> bool:
    return (ident.authority or "").upper() in profile.nhs_authorities or (
        (ident.type_code or "").upper() in profile.nhs_type_codes
    )


def _looks_like_nhs_number(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    return len(digits) == 10 and digits.isdigit()


def _local_identifier(
    identifiers: list[Identifier], nhs_index: int | None, profile: InboundProfile
) -> Identifier | None:
    candidates = [ident for i, ident in enumerate(identifiers) if i != nhs_index]
    if profile.local_authority:
        wanted = profile.local_authority.upper()
        for ident in candidates:
            if (ident.authority or "").upper() == wanted:
                return ident
        return None
    for ident in candidates:
        if (ident.type_code or "").upper() == "MR":
            return ident
    return candidates[0] if candidates else None


def _birth_date(pid: Segment) -> date | None:
    return parse_date(pid.get(7))


def merge_events(message: Er7Message, profile: InboundProfile, when: datetime) -> list[DomainEvent]:
    """ADT A40/A34/A18/A47: each PID/MRG pair says the MRG-1 identifiers now belong to PID."""
    trigger = message.trigger
    events: list[DomainEvent] = []
    current: PatientIdentity | None = None
    for segment in message.segments:
        if segment.name == "PID":
            current = patient_identity(segment, profile)
        elif segment.name == "MRG":
            if current is None:
                raise SegmentSequenceError("MRG before any PID", segment="MRG", sequence=1)
            prior = _identifiers(segment, 1)
            if not prior:
                raise RequiredFieldMissing(
                    "MRG-1 prior patient identifier list is empty",
                    segment="MRG",
                    sequence=1,
                    field=1,
                )
            prior_local = _local_identifier(prior, _nhs_position(prior, profile), profile)
            events.append(
                PatientsMerged(
                    message_time=when,
                    surviving=current,
                    prior_identifiers=tuple(prior),
                    prior_local_id=prior_local.value if prior_local else None,
                    trigger=trigger,
                )
            )
    if not events:
        raise SegmentSequenceError(f"ADT^{trigger} holds no MRG segment", segment="MRG", sequence=1)
    return events


def _nhs_position(identifiers: list[Identifier], profile: InboundProfile) -> int | None:
    for i, ident in enumerate(identifiers):
        if _is_nhs(ident, profile):
            return i
    return None


# ---------------------------------------------------------------------------------------
# Orders


@dataclass
class _OrderGroup:
    """The segments of one order: ORC and what follows it up to the next ORC."""

    orc: Segment
    orc_index: int
    obr: Segment | None = None
    tq1: Segment | None = None
    ipc: Segment | None = None
    zds: Segment | None = None
    notes: list[str] = field(default_factory=list)


def _order_groups(message: Er7Message) -> list[_OrderGroup]:
    groups: list[_OrderGroup] = []
    orc_count = 0
    for segment in message.segments:
        name = segment.name
        if name == "ORC":
            orc_count += 1
            groups.append(_OrderGroup(orc=segment, orc_index=orc_count))
            continue
        if not groups:
            if name in ("OBR", "TQ1", "IPC"):
                raise SegmentSequenceError(f"{name} before any ORC", segment=name, sequence=1)
            continue
        group = groups[-1]
        if name == "OBR":
            if group.obr is not None:
                # A second OBR under one ORC: a second exam sharing that order control.
                groups.append(_OrderGroup(orc=group.orc, orc_index=group.orc_index, obr=segment))
            else:
                group.obr = segment
        elif name == "TQ1" and group.tq1 is None:
            group.tq1 = segment
        elif name == "IPC" and group.ipc is None:
            group.ipc = segment
        elif name == "ZDS" and group.zds is None:
            group.zds = segment
        elif name == "NTE" and group.obr is not None:
            text = segment.get(3, 0, 0)
            if text:
                group.notes.append(text)
    return groups


def order_events(message: Er7Message, profile: InboundProfile, when: datetime) -> list[DomainEvent]:
    """ORM^O01 / OMI^O23 -> one order event per ORC/OBR group."""
    groups = _order_groups(message)
    if not groups:
        raise SegmentSequenceError(
            f"{message.message_code} holds no ORC segment", segment="ORC", sequence=1
        )
    pid = message.segment("PID")
    patient = patient_identity(pid, profile, required=False) if pid is not None else None
    if patient is not None and patient.local_id is None and patient.nhs_number is None:
        patient = None
    patient_class = _patient_class(message, profile)
    return [
        _order_event(message, group, profile, when, patient, patient_class)  # type: ignore[misc]
        for group in groups
    ]


def _order_event(
    message: Er7Message,
    group: _OrderGroup,
    profile: InboundProfile,
    when: datetime,
    patient: PatientIdentity | None,
    patient_class: str | None,
) -> OrderEvent:
    orc = group.orc
    seq = group.orc_index
    control = (orc.get(1) or "").upper()
    if not control:
        raise RequiredFieldMissing(
            "ORC-1 order control is empty", segment="ORC", sequence=seq, field=1
        )
    status = (orc.get(5) or "").upper() or None
    event_class = ORDER_CONTROL_EVENTS.get(control)
    if event_class is None:
        raise TableValueNotFound(
            f"ORC-1 order control {control!r} is not accepted from a RIS",
            segment="ORC",
            sequence=seq,
            field=1,
        )
    if control == "SC":
        if status is None:
            raise RequiredFieldMissing(
                "ORC-1 SC (status changed) needs ORC-5 order status",
                segment="ORC",
                sequence=seq,
                field=5,
            )
        event_class = STATUS_CHANGE_EVENTS.get(status)  # type: ignore[assignment]
        if event_class is None:
            raise TableValueNotFound(
                f"ORC-5 order status {status!r} is not understood with ORC-1 SC",
                segment="ORC",
                sequence=seq,
                field=5,
            )
    if group.obr is None and control in ("NW", "SN", "XO", "XX"):
        raise SegmentSequenceError(
            f"ORC-1 {control} without an OBR segment", segment="OBR", sequence=seq
        )
    if event_class is OrderPlaced and patient is None and profile.require_patient_for_new_orders:
        raise RequiredFieldMissing(
            "a new order needs the patient (PID-3)", segment="PID", sequence=1, field=3
        )
    order = _order_fields(message, group, profile, patient_class, status)
    if not (order.accession_number or order.placer_order_number or order.filler_order_number):
        first = profile.accession_fields[0]
        seg, _, fld = first.partition("-")
        raise RequiredFieldMissing(
            f"no accession number ({', '.join(profile.accession_fields)}) and no order numbers"
            " (ORC-2/ORC-3)",
            segment=seg,
            sequence=seq,
            field=int(fld),
        )
    reason = orc.get(16, 2) or orc.get(16, 1)
    extra: dict[str, Any] = {}
    if event_class in (OrderCancelled, OrderDiscontinued, OrderHeld):
        extra["reason"] = reason
    return event_class(
        message_time=when,
        order_control=control,
        order_status=status,
        patient=patient,
        order=order,
        **extra,
    )


def _order_fields(
    message: Er7Message,
    group: _OrderGroup,
    profile: InboundProfile,
    patient_class: str | None,
    status: str | None,
) -> OrderFields:
    orc, obr, tq1, ipc, zds = group.orc, group.obr, group.tq1, group.ipc, group.zds
    tz = profile.tz
    seq = group.orc_index

    def ts(segment: Segment | None, field_no: int, component: int = 1) -> datetime | None:
        if segment is None:
            return None
        raw = segment.get(field_no, component)
        try:
            return parse_timestamp(raw, tz)
        except ValueError as exc:
            raise DataTypeError(
                f"{segment.name}-{field_no} {raw!r} is not a date/time",
                segment=segment.name,
                sequence=seq,
                field=field_no,
            ) from exc

    placer = (obr.get(2) if obr else None) or orc.get(2)
    placer_ns = (obr.get(2, 2) if obr and obr.get(2) else None) or orc.get(2, 2)
    filler = (obr.get(3) if obr else None) or orc.get(3)
    filler_ns = (obr.get(3, 2) if obr and obr.get(3) else None) or orc.get(3, 2)

    accession = None
    for source in profile.accession_fields:
        accession = _field_value(source, orc, obr, ipc)
        if accession:
            break

    code = name = system = None
    if obr is not None:
        code, name, system = obr.get(4, 1), obr.get(4, 2), obr.get(4, 3)
        if not code and not name:
            code, name, system = obr.get(4, 4), obr.get(4, 5), obr.get(4, 6)
        if not code:
            code = obr.get(44, 1)
        name = name or obr.get(44, 2)
    procedure = profile.procedures.get((code or "").upper(), {})

    modality = None
    for source in profile.modality_sources:
        if source == "procedure_table":
            modality = procedure.get("modality")
        elif source == "IPC-5":
            modality = ipc.get(5) if ipc else None
        elif source == "OBR-24":
            modality = obr.get(24) if obr else None
        if modality:
            break
    if modality:
        modality = profile.modality_map.get(modality.upper(), modality.upper())

    priority = None
    for source in profile.priority_fields:
        if source == "TQ1-9":
            priority = tq1.get(9) if tq1 else None
        elif source == "OBR-27":
            priority = obr.get(27, 6) if obr else None
        elif source == "ORC-7":
            priority = orc.get(7, 6)
        elif source == "OBR-5":
            priority = obr.get(5) if obr else None
        if priority:
            break
    if priority:
        priority = profile.priority_map.get(priority.upper(), priority.upper())
        if priority not in PRIORITY_CODES:
            # Not a priority we can rank (e.g. a placeholder): better unknown than wrong.
            priority = None

    notes = [n for n in group.notes if n.strip()]
    clinical_parts = [
        obr.get(13, 0, 0) if obr else None,
        obr.get(31, 2) or obr.get(31, 1) if obr else None,
        *notes,
    ]
    clinical = "\n".join(p.strip() for p in clinical_parts if p and p.strip()) or None

    pathway = procedure.get("pathway") or _pathway(clinical, profile)
    referrer = _person(obr, 16) or _person(orc, 12)

    scheduled = ts(obr, 36) or ts(tq1, 7) or ts(obr, 27, 4) or ts(orc, 7, 4)
    requested = ts(orc, 9) or ts(obr, 6)
    performed = None
    if status == "CM":
        performed = ts(obr, 8) or ts(obr, 7)

    uid = (ipc.get(3) if ipc else None) or (zds.get(1) if zds else None)

    return OrderFields(
        placer_order_number=placer,
        placer_order_namespace=placer_ns,
        filler_order_number=filler,
        filler_order_namespace=filler_ns,
        accession_number=accession,
        procedure_code=code,
        procedure_name=name,
        procedure_coding_system=system,
        modality=modality,
        body_area=procedure.get("body_area"),
        order_priority=priority,
        patient_class=patient_class,
        pathway=pathway,
        clinical_details=clinical,
        referrer=referrer,
        referral_at=None,
        requested_at=requested,
        scheduled_at=scheduled,
        performed_at=performed,
        study_instance_uid=uid,
    )


def _field_value(source: str, orc: Segment, obr: Segment | None, ipc: Segment | None) -> str | None:
    seg, _, number = source.partition("-")
    segment = {"ORC": orc, "OBR": obr, "IPC": ipc}.get(seg)
    if segment is None:
        return None
    value = segment.get(int(number))
    return value.strip() if value and value.strip() else None


def _patient_class(message: Er7Message, profile: InboundProfile) -> str | None:
    raw = message.get("PV1", 2)
    if not raw:
        return None
    key = raw.strip().upper()
    return profile.patient_class_map.get(key, key)


def _pathway(clinical: str | None, profile: InboundProfile) -> str | None:
    if not clinical:
        return None
    upper = clinical.upper()
    for pathway, markers in profile.pathway_markers.items():
        for marker in markers:
            if _contains_word(upper, marker.upper()):
                return pathway
    return None


def _contains_word(text: str, word: str) -> bool:
    start = 0
    while True:
        i = text.find(word, start)
        if i < 0:
            return False
        before = text[i - 1] if i > 0 else " "
        after = text[i + len(word)] if i + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return True
        start = i + 1


def _person(segment: Segment | None, field_no: int) -> str | None:
    """XCN `id^family^given^middle^suffix^prefix` as text, e.g. `Dr Jane Smith (C1234567)`."""
    if segment is None or not segment.raw(field_no):
        return None
    ident = segment.get(field_no, 1)
    family = segment.get(field_no, 2)
    given = segment.get(field_no, 3)
    prefix = segment.get(field_no, 6)
    name = " ".join(p for p in (prefix, given, family) if p)
    if name and ident:
        return f"{name} ({ident})"
    return name or ident


__all__ = [
    "DEFAULT_PROFILE",
    "Hl7Error",
    "InboundProfile",
    "check_header",
    "merge_events",
    "message_events",
    "message_time",
    "order_events",
    "patient_identity",
    "patient_update_events",
]
