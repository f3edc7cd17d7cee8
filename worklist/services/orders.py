"""Applying what a trust's RIS says (domain events from inbound HL7) to studies and patients.

This module owns the order lifecycle on the database side: it finds or creates
the study an event is about, keeps the trust's patient record up to date, moves
the study through `worklist.domain.study`'s transition table, and takes a
cancelled or held study away from the radiologist who had claimed it.

Rules (DESIGN.md "Identity", "Order lifecycle"):

* A study's key is (trust, accession number). An event is matched to a study by
  its accession number when it carries one, otherwise by the trust's placer and
  then filler order number (order numbers are only unique within a trust). A
  placer number shared by several accession numbers is one order with several
  examinations, so a NW with a new accession number is a new study.
* A patient is found within the trust by the local hospital number (PID-3 MR);
  a record merged into another (ADT A40) is followed to its survivor.
* Messages can arrive late, twice or out of order:
  - the same message applied twice changes nothing (recognised by MSH-10/MSH-7
    of the last message applied to the study; the HL7 layer's MSH-10 log is the
    first line of defence);
  - a message older (MSH-7) than the last one applied to the study never
    overwrites an order value (it may fill one that is still empty). Its status
    word (CA, DC, HD, RL, SC) still applies when it is newer than the message
    that last set the status (`Study.status_message_at`), so a CA overtaken by
    an XO still cancels; otherwise it is *stale*: recorded
    (`Study.ignored_stale_messages`, outcome "stale") and nothing moves;
  - an exam status change (ORC-1 SC) for an order we have not seen creates the
    study when it carries the accession number and the patient, because the
    exam may need reporting and the NW may never come (or come later: it is
    then stale and only fills blanks). Changes, cancels, holds and releases for
    an unknown order are refused (`OrderNotFound`, AE 204): there is nothing to
    change, and the RIS or the error queue can resend once the order exists;
  - a status move the table forbids that only goes backwards along
    ordered -> scheduled -> in progress -> ready -> preliminary -> final
    (e.g. SC/IP after CM in the same second) is superseded and ignored; any
    other forbidden move (cancel a final study, CM for a cancelled one) raises
    `StatusConflict` so a person looks at it.
* While a study is on hold, exam status changes update the state it returns to
  on release, not its current state.

Exceptions (all `worklist.errors.WorklistError`; each carries `hl7_error_code`,
the HL7 table 0357 code its negative ACK should carry, with ACK code AE):
`DuplicateOrder` (Conflict, 205), `OrderNotFound` (NotFound, 204),
`IncompleteOrder` (InvalidInput, 101), `UnsupportedOrderStatus` (InvalidInput,
103), `StatusConflict` (Conflict, 207), `AmbiguousOrder` (Conflict, 205).
When `apply_events` raises, nothing of that call is left in the session (it runs
inside a savepoint), so the caller can still record the failure in the same
transaction.

Two ways to write, one set of decisions (`_Run`): `apply_events` through the ORM,
one message at a time, for everything; `CoreBatch` for a batch of order messages
with Core statements (the apply worker's hot path), which hands back to
`apply_events` what it cannot do (`NeedsOrm`: a claim to end, a merged patient).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from worklist.db.models import (
    Alert,
    Assignment,
    Patient,
    PatientIdentifier,
    Study,
    StudyStatusChange,
    Trust,
    User,
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
from worklist.domain.nhs import is_valid_nhs_number, normalise_nhs_number
from worklist.domain.priority import RuleSet
from worklist.domain.study import TERMINAL, StudyStatus, can_move
from worklist.errors import Conflict, InvalidInput, NotFound
from worklist.services import audit
from worklist.services import worklist as worklist_engine

logger = logging.getLogger(__name__)

# --- Errors -------------------------------------------------------------------------------


class DuplicateOrder(Conflict):
    """A NW for an order that was already placed by another message (HL7 0357 code 205)."""

    hl7_error_code = "205"


class AmbiguousOrder(Conflict):
    """An event without accession number whose order number matches several studies (205)."""

    hl7_error_code = "205"


class OrderNotFound(NotFound):
    """A change, cancel, hold or release for an order this trust never placed (code 204)."""

    hl7_error_code = "204"


class IncompleteOrder(InvalidInput):
    """A study or patient cannot be created without this value (101, required field missing)."""

    hl7_error_code = "101"


class UnsupportedOrderStatus(InvalidInput):
    """ORC-5 is not an exam status the worklist understands (code 103, table value not found)."""

    hl7_error_code = "103"


class StatusConflict(Conflict):
    """The RIS asks for a move the transition table forbids, e.g. cancel a final study (207)."""

    hl7_error_code = "207"


# --- Results ------------------------------------------------------------------------------

# What happened to each event.
CREATED = "created"  # a new study
UPDATED = "updated"  # the study changed (fields and/or status)
UNCHANGED = "unchanged"  # applied, but it said nothing new
DUPLICATE = "duplicate"  # this very message was already applied to the study
STALE = "stale"  # older than the study's last message: recorded, not allowed to overwrite
PATIENT_CREATED = "patient_created"
PATIENT_UPDATED = "patient_updated"
PATIENT_UNCHANGED = "patient_unchanged"
MERGED = "merged"


@dataclass(frozen=True)
class EventOutcome:
    """What applying one event did, for the message log and the ACK."""

    event: str
    action: str
    study_id: int | None = None
    accession_number: str | None = None
    patient_id: int | None = None
    patient_local_id: str | None = None
    status: str | None = None  # the study's status afterwards
    notes: tuple[str, ...] = ()


@dataclass
class AppliedResult:
    """Outcomes in event order, plus whether the worklist engine re-prioritised the studies.

    `reprioritised` is None when no study needed it, False when
    `worklist.services.worklist.reprioritise` is not available (or failed: see the log;
    the scheduler's periodic job catches up), True when it ran.
    """

    outcomes: list[EventOutcome] = field(default_factory=list)
    reprioritised: bool | None = None
    # With `apply_events(..., reprioritise=False)`: the studies the caller must re-prioritise
    # (once for a whole batch of messages, `reprioritise_studies`); empty otherwise.
    to_reprioritise: list[int] = field(default_factory=list)

    @property
    def study_ids(self) -> list[int]:
        return list(dict.fromkeys(o.study_id for o in self.outcomes if o.study_id is not None))

    @property
    def accession_numbers(self) -> list[str]:
        return list(
            dict.fromkeys(
                o.accession_number for o in self.outcomes if o.accession_number is not None
            )
        )

    @property
    def patient_local_ids(self) -> list[str]:
        return list(
            dict.fromkeys(
                o.patient_local_id for o in self.outcomes if o.patient_local_id is not None
            )
        )

    @property
    def stale(self) -> list[EventOutcome]:
        return [o for o in self.outcomes if o.action == STALE]

    @property
    def changed(self) -> bool:
        return any(
            o.action not in {UNCHANGED, DUPLICATE, STALE, PATIENT_UNCHANGED} for o in self.outcomes
        )

    @property
    def notes(self) -> list[str]:
        return [note for o in self.outcomes for note in o.notes]


# --- Entry point --------------------------------------------------------------------------


def apply_events(
    session: Session,
    *,
    trust: Trust,
    events: Sequence[DomainEvent],
    source: str,
    now: datetime,
    control_id: str | None = None,
    priority_rules: RuleSet | None = None,
    reprioritise: bool = True,
    lookups: Lookups | None = None,
) -> AppliedResult:
    """Apply the events of one inbound message, in order, for `trust`; all or nothing.

    `source` is written on every status change ("hl7:<MSH-10>"); `control_id` (MSH-10)
    defaults to what follows "hl7:" in `source` and is how a repeated message is
    recognised. Runs in a savepoint: on any exception nothing of this call remains.
    `priority_rules` (the region's, `worklist.services.worklist.rules_for(settings)`) are
    passed to the re-prioritisation of the studies touched; None = the engine's defaults.
    `reprioritise=False` leaves that to the caller: the studies to re-prioritise come back
    in `AppliedResult.to_reprioritise` (the apply worker does it once per batch of messages,
    a third of the cost of a message on PostgreSQL). `lookups` (one `Lookups` for a
    batch of messages) answers the study and patient look-ups it has read ahead.
    """
    if control_id is None and source.startswith("hl7:"):
        control_id = source.removeprefix("hl7:") or None
    for attempt in (1, 2):
        run = _Run(
            session=session,
            trust=trust,
            source=source,
            now=now,
            control_id=control_id,
            lookups=lookups,
        )
        try:
            with session.begin_nested():
                for event in events:
                    run.result.outcomes.append(run.apply(event))
                session.flush()
                if reprioritise:
                    _reprioritise(
                        session,
                        now=now,
                        study_ids=sorted(run.to_reprioritise),
                        result=run.result,
                        rules=priority_rules,
                    )
                else:
                    run.result.to_reprioritise = sorted(run.to_reprioritise)
            return run.result
        except sa.exc.IntegrityError:
            # Another connection created the same study or patient since we looked
            # (unique (trust, accession) / (trust, hospital number)). Once more, it is found.
            if lookups is not None:
                lookups.forget()
            if attempt == 2:
                raise
            logger.info("trust %s message %s raced another; applying again", trust.code, source)
        except BaseException:
            # The savepoint took back what this call created: rows the read-ahead may hold.
            if lookups is not None:
                lookups.forget()
            raise
    raise AssertionError("unreachable")


class Lookups:
    """Studies (by accession number) and patients (by hospital number) of a batch of
    messages, read ahead in one query each per trust instead of one per message.

    Share one instance between the `apply_events` calls of one transaction. It
    remembers what it found (and what does not exist yet, until a call creates it);
    a failed call makes it forget everything, since its savepoint may have taken back
    rows held here, and later look-ups query the database as without it.
    """

    def __init__(self) -> None:
        self.studies: dict[tuple[int, str], Study | None] = {}
        self.patients: dict[tuple[int, str], Patient | None] = {}

    def read_ahead(self, session: Session, *, trust: Trust, events: Sequence[DomainEvent]) -> None:
        accessions: set[str] = set()
        local_ids: set[str] = set()
        for event in events:
            if isinstance(event, OrderEvent):
                if event.order.accession_number:
                    accessions.add(event.order.accession_number)
                if event.patient is not None and event.patient.local_id:
                    local_ids.add(event.patient.local_id)
            elif isinstance(event, PatientUpdated) and event.patient.local_id:
                local_ids.add(event.patient.local_id)
        accessions -= {a for t, a in self.studies if t == trust.id}
        local_ids -= {i for t, i in self.patients if t == trust.id}
        if accessions:
            # Locked as `_find_study` locks them (PostgreSQL): one order's messages in turn.
            found_studies = {
                study.accession_number: study
                for study in session.scalars(
                    sa.select(Study)
                    .where(Study.trust_id == trust.id, Study.accession_number.in_(accessions))
                    .with_for_update()
                )
            }
            for accession in accessions:
                self.studies[(trust.id, accession)] = found_studies.get(accession)
        if local_ids:
            found_patients = {
                patient.local_id: patient
                for patient in session.scalars(
                    sa.select(Patient)
                    .where(Patient.trust_id == trust.id, Patient.local_id.in_(local_ids))
                    # Their identifiers too (each message compares PID-3 with them).
                    .options(selectinload(Patient.identifiers))
                )
            }
            for local_id in local_ids:
                self.patients[(trust.id, local_id)] = found_patients.get(local_id)

    def forget(self) -> None:
        self.studies.clear()
        self.patients.clear()


def reprioritise_studies(
    session: Session,
    *,
    now: datetime,
    study_ids: Sequence[int],
    priority_rules: RuleSet | None = None,
) -> bool | None:
    """Re-prioritise studies that `apply_events(..., reprioritise=False)` left to the caller.

    Runs in a savepoint: a failure (even of the database) is logged and leaves the
    messages applied; the scheduler's periodic re-prioritisation catches up. Returns as
    `AppliedResult.reprioritised`: None (nothing to do), False (failed or no engine), True.
    """
    ids = sorted(set(study_ids))
    if not ids:
        return None
    result = AppliedResult()
    try:
        with session.begin_nested():
            _reprioritise(session, now=now, study_ids=ids, result=result, rules=priority_rules)
    except sa.exc.OperationalError:
        raise  # the connection itself: the caller's transaction is gone anyway
    except sa.exc.SQLAlchemyError:
        logger.exception("re-prioritising studies %s failed; the scheduler will catch up", ids)
        return False
    return result.reprioritised


def mark_images_available(
    session: Session,
    *,
    study: Study,
    at: datetime,
    now: datetime,
    source: str,
    priority_rules: RuleSet | None = None,
) -> bool:
    """Record that the study's images reached PACS.

    For a trust whose worklist entry rule is "images_available", an exam that is not yet
    ready becomes ready. True when the status moved.
    """
    if study.images_available_at is None or at < study.images_available_at:
        study.images_available_at = at
    if study.trust.ready_on != "images_available":
        return False
    current = StudyStatus(study.status)
    if current == StudyStatus.ON_HOLD:
        before = StudyStatus(study.status_before_hold or StudyStatus.ORDERED)
        if before in _PROGRESSION and _PROGRESSION[before] < _PROGRESSION[StudyStatus.READY]:
            study.status_before_hold = StudyStatus.READY.value
        return False
    if current not in {StudyStatus.ORDERED, StudyStatus.SCHEDULED, StudyStatus.IN_PROGRESS}:
        return False
    _record_move(
        session, study, StudyStatus.READY, reason="images available in PACS", source=source, now=now
    )
    study.updated_at = now
    _reprioritise(
        session, now=now, study_ids=[study.id], result=AppliedResult(), rules=priority_rules
    )
    return True


# --- Internals ----------------------------------------------------------------------------

# Forward order of the exam and report; used only to recognise superseded (backward) moves.
_PROGRESSION: dict[StudyStatus, int] = {
    StudyStatus.ORDERED: 0,
    StudyStatus.SCHEDULED: 1,
    StudyStatus.IN_PROGRESS: 2,
    StudyStatus.READY: 3,
    StudyStatus.PRELIMINARY: 4,
    StudyStatus.FINAL: 5,
}

# ORC-5 order status (HL7 table 0038) values that describe the examination itself.
_EXAM_STATUSES = {
    "SC": StudyStatus.SCHEDULED,
    "IP": StudyStatus.IN_PROGRESS,
    "CM": StudyStatus.READY,
}

# OrderFields attribute -> Study column; the accession number is the key and is not copied.
_COPIED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(OrderFields) if f.name != "accession_number"
)


@dataclass
class _Run:
    """The state of one `apply_events` call."""

    session: Session
    trust: Trust
    source: str
    now: datetime
    control_id: str | None
    result: AppliedResult = field(default_factory=AppliedResult)
    touched: set[int] = field(default_factory=set)
    to_reprioritise: set[int] = field(default_factory=set)
    lookups: Lookups | None = None

    def apply(self, event: DomainEvent) -> EventOutcome:
        if isinstance(event, PatientUpdated):
            return self._patient_updated(event)
        if isinstance(event, PatientsMerged):
            return self._patients_merged(event)
        if isinstance(event, OrderEvent):
            return self._order_event(event)
        raise InvalidInput(f"{type(event).__name__} is not an event the order service applies")

    # --- reading and writing rows (the ORM here; `_CoreRun` for the Core path) ---

    def _find_study(self, order: OrderFields) -> Study | None:
        return _find_study(self.session, trust=self.trust, order=order, lookups=self.lookups)

    def _new_study(self, patient: Patient, **values: object) -> Study:
        return Study(patient=patient, **values)

    def _created(self, study: Study, change: dict[str, object]) -> None:
        """Write a new study and its first history row (`change`)."""
        self.session.add(study)
        self.session.flush()
        if self.lookups is not None:
            self.lookups.studies[(self.trust.id, study.accession_number)] = study
        self.session.add(StudyStatusChange(study_id=study.id, **change))

    def _record(self, study: Study, target: StudyStatus, reason: str) -> bool:
        return _record_move(
            self.session, study, target, reason=reason, source=self.source, now=self.now
        )

    def _withdraw(self, study: Study, end_reason: str) -> None:
        _withdraw_claim(self.session, study, end_reason=end_reason, now=self.now)

    def _patient_local_id(self, study: Study) -> str | None:
        patient = self.session.get(Patient, study.patient_id)
        return patient.local_id if patient else None

    def _find_patient(self, identity: PatientIdentity) -> Patient | None:
        return _find_patient(
            self.session, trust=self.trust, identity=identity, lookups=self.lookups
        )

    def _create_patient(
        self, identity: PatientIdentity, message_time: datetime, *, flush: bool
    ) -> Patient:
        return _create_patient(
            self.session,
            trust=self.trust,
            identity=identity,
            now=self.now,
            message_time=message_time,
            lookups=self.lookups,
            flush=flush,
        )

    # --- orders ---

    def _order_event(self, event: OrderEvent) -> EventOutcome:
        name = type(event).__name__
        study = self._find_study(event.order)
        if study is None:
            if isinstance(event, OrderPlaced | ExamStatusChanged):
                return self._create_study(event)
            raise OrderNotFound(
                f"{_describe_order(event.order)} is not known for trust {self.trust.code};"
                f" ORC-1 {event.order_control or name} needs an order placed first"
            )
        if study.id not in self.touched and self._is_last_message(study, event):
            return self._outcome(name, DUPLICATE, study, notes=("message already applied",))
        self.touched.add(study.id)
        if study.last_message_at is not None and event.message_time < study.last_message_at:
            if not _speaks_about_status(event) or (
                study.status_message_at is not None and event.message_time < study.status_message_at
            ):
                return self._stale(event, study)
            return self._late_status(event, study)
        if isinstance(event, OrderPlaced) and study.order_placed_at == event.message_time:
            # The same NW (same MSH-7) resent under a new MSH-10: a resend, not a second order.
            return self._outcome(name, DUPLICATE, study, notes=("NW resent with a new control id",))
        if isinstance(event, OrderPlaced) and study.order_placed_at is not None:
            raise DuplicateOrder(
                f"{_describe_order(event.order)} was already placed (accession"
                f" {study.accession_number}, NW of {study.order_placed_at.isoformat()})"
            )

        notes: list[str] = []
        changed = False
        if event.patient is not None:
            patient, patient_changed = self._patient_for(event.patient, event.message_time)
            changed |= patient_changed
            if patient.id != study.patient_id:
                notes.append(f"study moved to patient {patient.local_id}")
                study.patient_id = patient.id
                changed = True
        changed_fields = _copy_order_fields(study, event.order, only_blanks=False)
        if changed_fields:
            notes.append("changed " + ", ".join(changed_fields))
            changed = True
        if isinstance(event, OrderPlaced):
            study.order_placed_at = event.message_time
            changed = True

        moved, status_notes = self._status_for(event, study)
        notes.extend(status_notes)
        if _speaks_about_status(event) or isinstance(event, OrderPlaced):
            study.status_message_at = event.message_time
        study.last_message_at = event.message_time
        study.last_control_id = self._control_id_column()
        if moved or changed:
            study.updated_at = self.now
        if changed_fields or (moved and study.status == StudyStatus.READY):
            self.to_reprioritise.add(study.id)
        action = UPDATED if (moved or changed) else UNCHANGED
        return self._outcome(name, action, study, notes=tuple(notes))

    def _create_study(self, event: OrderPlaced | ExamStatusChanged) -> EventOutcome:
        order = event.order
        if not order.accession_number:
            raise IncompleteOrder(
                f"{_describe_order(order)} is new to trust {self.trust.code}"
                " but has no accession number"
            )
        if event.patient is None:
            raise IncompleteOrder(
                f"accession {order.accession_number} is new to trust {self.trust.code};"
                " the message"
                " has no patient (PID)"
            )
        if isinstance(event, ExamStatusChanged):
            target = self._exam_target(event, study=None)
            reason = (
                f"created from ORC-1 {event.order_control or 'SC'} ORC-5 {event.order_status}"
                " arriving before the order (NW)"
            )
        else:
            target = StudyStatus.ORDERED
            if event.order_status in _EXAM_STATUSES:
                target = self._exam_target(event, study=None)
            reason = f"order placed (ORC-1 {event.order_control or 'NW'})"
        # A new patient is inserted by the study's flush below: one flush for both.
        patient, _ = self._patient_for(event.patient, event.message_time, flush=False)
        study = self._new_study(
            patient,
            trust_id=self.trust.id,
            accession_number=order.accession_number,
            status=target.value,
            status_changed_at=self.now,
            last_message_at=event.message_time,
            last_control_id=self._control_id_column(),
            order_placed_at=event.message_time if isinstance(event, OrderPlaced) else None,
            status_message_at=event.message_time,
            ignored_stale_messages=0,
            created_at=self.now,
            updated_at=self.now,
        )
        _copy_order_fields(study, order, only_blanks=False)
        self._exam_times(study, event)
        if target == StudyStatus.READY:
            study.ready_at = min(event.message_time, self.now)
        self._created(
            study,
            {
                "from_status": None,
                "to_status": target.value,
                "at": self.now,
                "reason": reason,
                "source": self.source,
            },
        )
        self.touched.add(study.id)
        self.to_reprioritise.add(study.id)
        return self._outcome(type(event).__name__, CREATED, study)

    def _late_status(self, event: OrderEvent, study: Study) -> EventOutcome:
        """Older than the last message but newer than the last word on the status (e.g. a CA
        overtaken by an XO): the status applies as it would have in MSH-7 order; the order's
        values only fill blanks."""
        filled = _copy_order_fields(study, event.order, only_blanks=True)
        moved, notes = self._status_for(event, study)
        study.status_message_at = event.message_time
        notes.insert(0, "late message: status applied, newer values kept")
        if filled:
            notes.append("filled empty " + ", ".join(filled))
        if moved or filled:
            study.updated_at = self.now
        if filled or (moved and study.status == StudyStatus.READY):
            self.to_reprioritise.add(study.id)
        action = UPDATED if (moved or filled) else UNCHANGED
        return self._outcome(type(event).__name__, action, study, notes=tuple(notes))

    def _stale(self, event: OrderEvent, study: Study) -> EventOutcome:
        filled = _copy_order_fields(study, event.order, only_blanks=True)
        notes = [
            f"older than the last message applied ({_iso(study.last_message_at)}):"
            " status and values kept"
        ]
        if isinstance(event, OrderPlaced) and study.order_placed_at is None:
            study.order_placed_at = event.message_time
        if filled:
            notes.append("filled empty " + ", ".join(filled))
            self.to_reprioritise.add(study.id)
        study.ignored_stale_messages = (study.ignored_stale_messages or 0) + 1
        study.updated_at = self.now
        logger.info(
            "stale %s for trust %s accession %s ignored",
            type(event).__name__,
            self.trust.code,
            study.accession_number,
        )
        return self._outcome(type(event).__name__, STALE, study, notes=tuple(notes))

    def _status_for(self, event: OrderEvent, study: Study) -> tuple[bool, list[str]]:
        """Move the study as the event says; (moved, notes)."""
        current = StudyStatus(study.status)
        if isinstance(event, OrderCancelled):
            reason = f"cancelled by RIS: {event.reason}" if event.reason else "cancelled by RIS"
            return self._stop(study, StudyStatus.CANCELLED, reason), []
        if isinstance(event, OrderDiscontinued):
            reason = (
                f"discontinued by RIS: {event.reason}" if event.reason else "discontinued by RIS"
            )
            return self._stop(study, StudyStatus.DISCONTINUED, reason), []
        if isinstance(event, OrderHeld):
            if current == StudyStatus.ON_HOLD:
                return False, ["already on hold"]
            self._check(current, StudyStatus.ON_HOLD)
            reason = f"held by RIS: {event.reason}" if event.reason else "held by RIS"
            self._withdraw(study, "held by RIS")
            study.status_before_hold = current.value
            self._record(study, StudyStatus.ON_HOLD, reason)
            return True, []
        if isinstance(event, OrderReleased):
            if current != StudyStatus.ON_HOLD:
                return False, [f"released but not on hold ({current.value})"]
            back = StudyStatus(study.status_before_hold or StudyStatus.ORDERED)
            study.status_before_hold = None
            self._record(study, back, "released by RIS")
            return True, []
        # ORC-1 SC, or a NW/XO whose ORC-5 already says where the exam is.
        if not (isinstance(event, ExamStatusChanged) or event.order_status in _EXAM_STATUSES):
            return False, []
        target = self._exam_target(event, study=study)
        self._exam_times(study, event)
        reason = f"ORC-1 {event.order_control or 'SC'} ORC-5 {event.order_status}"
        if current == StudyStatus.ON_HOLD:
            before = StudyStatus(study.status_before_hold or StudyStatus.ORDERED)
            if before != target and can_move(before, target):
                study.status_before_hold = target.value
                return False, [f"on hold: will return to {target.value}"]
            return False, []
        if current == target:
            return False, []
        if can_move(current, target):
            if target == StudyStatus.READY and study.ready_at is None:
                study.ready_at = min(event.message_time, self.now)
            self._record(study, target, reason)
            return True, []
        if current not in TERMINAL and _PROGRESSION.get(target, 99) < _PROGRESSION.get(current, -1):
            return False, [f"{reason} superseded: study is already {current.value}"]
        self._check(current, target)
        return False, []

    def _stop(self, study: Study, target: StudyStatus, reason: str) -> bool:
        current = StudyStatus(study.status)
        if current == target:
            return False
        self._check(current, target)
        self._withdraw(study, reason)
        study.status_before_hold = None
        return self._record(study, target, reason)

    def _check(self, current: StudyStatus, target: StudyStatus) -> None:
        if not can_move(current, target):
            raise StatusConflict(f"a study that is {current.value} cannot become {target.value}")

    def _exam_target(self, event: OrderEvent, *, study: Study | None) -> StudyStatus:
        """SC -> scheduled, IP -> in progress, CM -> ready (or in progress until the images are
        available, for a trust whose worklist entry rule is "images_available")."""
        target = _EXAM_STATUSES.get(event.order_status or "")
        if target is None:
            raise UnsupportedOrderStatus(
                f"ORC-5 order status {event.order_status!r} is not an exam status (SC, IP, CM)"
            )
        if (
            target == StudyStatus.READY
            and self.trust.ready_on == "images_available"
            and (study is None or study.images_available_at is None)
        ):
            return StudyStatus.IN_PROGRESS
        return target

    def _exam_times(self, study: Study, event: OrderEvent) -> None:
        """Exam complete without OBR-7: the message time is the best word on when it was done."""
        if event.order_status == "CM" and study.performed_at is None:
            study.performed_at = event.order.performed_at or min(event.message_time, self.now)

    def _is_last_message(self, study: Study, event: OrderEvent) -> bool:
        return (
            self.control_id is not None
            and study.last_control_id == self._control_id_column()
            and study.last_message_at == event.message_time
        )

    def _control_id_column(self) -> str | None:
        return self.control_id[:64] if self.control_id else None

    def _outcome(
        self, event: str, action: str, study: Study, notes: tuple[str, ...] = ()
    ) -> EventOutcome:
        return EventOutcome(
            event=event,
            action=action,
            study_id=study.id,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_local_id=self._patient_local_id(study),
            status=study.status,
            notes=notes,
        )

    # --- patients ---

    def _patient_for(
        self, identity: PatientIdentity, message_time: datetime, *, flush: bool = True
    ) -> tuple[Patient, bool]:
        """The trust's (surviving) record for `identity`, created or brought up to date.

        `flush=False`: a new record is not written yet (no id); the caller links it by
        relationship and flushes it with its own row.
        """
        patient = self._find_patient(identity)
        if patient is None:
            return self._create_patient(identity, message_time, flush=flush), True
        changed = _update_patient(patient, identity, now=self.now, message_time=message_time)
        return patient, changed

    def _patient_updated(self, event: PatientUpdated) -> EventOutcome:
        name = type(event).__name__
        patient = _find_patient(
            self.session, trust=self.trust, identity=event.patient, lookups=self.lookups
        )
        if patient is None:
            patient = _create_patient(
                self.session,
                trust=self.trust,
                identity=event.patient,
                now=self.now,
                message_time=event.message_time,
                lookups=self.lookups,
            )
            action = PATIENT_CREATED
        else:
            action = (
                PATIENT_UPDATED
                if _update_patient(
                    patient, event.patient, now=self.now, message_time=event.message_time
                )
                else PATIENT_UNCHANGED
            )
        return EventOutcome(
            event=name, action=action, patient_id=patient.id, patient_local_id=patient.local_id
        )

    def _patients_merged(self, event: PatientsMerged) -> EventOutcome:
        notes: list[str] = []
        survivor = _find_patient(
            self.session,
            trust=self.trust,
            identity=event.surviving,
            follow_merges=False,
            lookups=self.lookups,
        )
        if survivor is None:
            survivor = _create_patient(
                self.session,
                trust=self.trust,
                identity=event.surviving,
                now=self.now,
                lookups=self.lookups,
            )
        else:
            _update_patient(
                survivor, event.surviving, now=self.now, message_time=event.message_time
            )
            if survivor.merged_into_id is not None:
                # The RIS now says this record survives: an earlier merge the other way is reversed.
                notes.append(f"{survivor.local_id} had been merged away; it survives now")
                survivor.merged_into_id = None
        priors = _prior_patients(self.session, trust=self.trust, event=event)
        moved_studies = 0
        merged: list[str] = []
        for prior in priors:
            if prior.id == survivor.id:
                continue
            if prior.merged_into_id != survivor.id:
                prior.merged_into_id = survivor.id
                prior.updated_at = self.now
                merged.append(prior.local_id)
            # Records merged earlier into the prior now point straight at the survivor.
            for earlier in self.session.scalars(
                sa.select(Patient).where(Patient.merged_into_id == prior.id)
            ):
                earlier.merged_into_id = survivor.id
            studies = list(
                self.session.scalars(sa.select(Study).where(Study.patient_id == prior.id))
            )
            for study in studies:
                study.patient_id = survivor.id
                study.updated_at = self.now
            moved_studies += len(studies)
            _copy_identifiers(survivor, prior)
            if (
                survivor.link_nhs_number is None
                and prior.link_nhs_number is not None
                and survivor.nhs_number is None
            ):
                survivor.nhs_number = prior.nhs_number
                survivor.nhs_number_valid = prior.nhs_number_valid
                survivor.nhs_number_status = prior.nhs_number_status
                survivor.link_nhs_number = prior.link_nhs_number
        if not priors:
            notes.append("prior patient not known to this trust; nothing to move")
        if merged or moved_studies:
            notes.append(
                f"merged {', '.join(merged) or '-'} into {survivor.local_id};"
                f" moved {moved_studies} studies"
            )
            audit.record(
                self.session,
                at=self.now,
                action="patients_merged",
                object_type="patient",
                object_id=survivor.id,
                detail={
                    "trust": self.trust.code,
                    "prior_local_ids": [p.local_id for p in priors],
                    "studies_moved": moved_studies,
                    "source": self.source,
                },
            )
        action = MERGED if (merged or moved_studies) else PATIENT_UNCHANGED
        return EventOutcome(
            event=type(event).__name__,
            action=action,
            patient_id=survivor.id,
            patient_local_id=survivor.local_id,
            notes=tuple(notes),
        )


# --- Studies --------------------------------------------------------------------------------


def _find_study(
    session: Session, *, trust: Trust, order: OrderFields, lookups: Lookups | None = None
) -> Study | None:
    """By accession number when the event has one; else by placer, then filler order number.

    The row is locked (PostgreSQL) so two messages for one order apply one after the other.
    """
    if order.accession_number and lookups is not None:
        key = (trust.id, order.accession_number)
        if key in lookups.studies:
            return lookups.studies[key]
    if order.accession_number:
        return session.scalar(
            sa.select(Study)
            .where(Study.trust_id == trust.id, Study.accession_number == order.accession_number)
            .with_for_update()
        )
    for column, number in (
        (Study.placer_order_number, order.placer_order_number),
        (Study.filler_order_number, order.filler_order_number),
    ):
        if not number:
            continue
        found = list(
            session.scalars(
                sa.select(Study)
                .where(Study.trust_id == trust.id, column == number)
                .with_for_update()
            )
        )
        if len(found) > 1:
            raise AmbiguousOrder(
                f"order number {number} matches {len(found)} studies of trust {trust.code}"
                " (accession numbers "
                + ", ".join(s.accession_number for s in found)
                + "); send the accession number"
            )
        if found:
            return found[0]
    return None


def _speaks_about_status(event: OrderEvent) -> bool:
    """Whether the event says where the order is (ORC-1 CA/DC/HD/RL/SC, or ORC-5 SC/IP/CM on XO).

    A NW is not counted: a NW older than the last message is always stale.
    """
    if isinstance(
        event,
        OrderCancelled | OrderDiscontinued | OrderHeld | OrderReleased | ExamStatusChanged,
    ):
        return True
    return isinstance(event, OrderChanged) and event.order_status in _EXAM_STATUSES


def _copy_order_fields(study: Study, order: OrderFields, *, only_blanks: bool) -> list[str]:
    """Copy the order's values onto the study; None never erases. Returns the changed names."""
    changed = []
    for name in _COPIED_FIELDS:
        value = getattr(order, name)
        if value is None:
            continue
        current = getattr(study, name)
        if current == value or (only_blanks and current is not None):
            continue
        setattr(study, name, value)
        changed.append(name)
    return changed


def _record_move(
    session: Session, study: Study, target: StudyStatus, *, reason: str, source: str, now: datetime
) -> bool:
    """Set the status and write its history row; False when it is already there."""
    change = _move(study, target, reason=reason, source=source, now=now)
    if change is not None:
        session.add(StudyStatusChange(**change))
    return change is not None


def _move(
    study: Study, target: StudyStatus, *, reason: str, source: str, now: datetime
) -> dict[str, object] | None:
    """Set the status; the values of its history row, or None when it is already there."""
    if study.status == target.value:
        return None
    change: dict[str, object] = {
        "study_id": study.id,
        "from_status": study.status,
        "to_status": target.value,
        "at": now,
        "reason": reason[:500],
        "source": source[:120],
    }
    study.status = target.value
    study.status_changed_at = now
    if target == StudyStatus.READY and study.ready_at is None:
        study.ready_at = now
    return change


def _withdraw_claim(session: Session, study: Study, *, end_reason: str, now: datetime) -> None:
    """Take the study off whoever holds or reads it, end their claim and tell them (an Alert).

    The claim itself ends through the worklist engine's `end_claim`, the one place claims end.
    """
    open_assignments = list(
        session.scalars(
            sa.select(Assignment).where(
                Assignment.study_id == study.id, Assignment.ended_at.is_(None)
            )
        )
    )
    user_ids = list(dict.fromkeys([study.claimed_by_id] + [a.user_id for a in open_assignments]))
    user_ids = [u for u in user_ids if u is not None]
    if study.claimed_by_id is not None:
        worklist_engine.end_claim(session, study=study, now=now, end_reason=end_reason)
    for assignment in open_assignments:
        if assignment.ended_at is None:
            assignment.ended_at = now
            assignment.end_reason = end_reason[:200]
    for user_id in user_ids:
        user = session.get(User, user_id)
        username = user.username if user else f"user {user_id}"
        session.add(
            Alert(
                kind="claim_withdrawn",
                user_id=user_id,
                study_id=study.id,
                trust_id=study.trust_id,
                message=(
                    f"Accession {study.accession_number} was taken off {username}'s list:"
                    f" {end_reason}"
                )[:1000],
                created_at=now,
            )
        )
        audit.record(
            session,
            at=now,
            action="claim_withdrawn",
            object_type="study",
            object_id=study.id,
            detail={"user_id": user_id, "username": username, "reason": end_reason},
        )
        logger.info("study %s withdrawn from user %s: %s", study.id, user_id, end_reason)


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else "?"


def _describe_order(order: OrderFields) -> str:
    parts = []
    if order.accession_number:
        parts.append(f"accession {order.accession_number}")
    if order.placer_order_number:
        parts.append(f"placer order {order.placer_order_number}")
    if order.filler_order_number:
        parts.append(f"filler order {order.filler_order_number}")
    return "order (" + ", ".join(parts or ["no numbers"]) + ")"


def _reprioritise(
    session: Session,
    *,
    now: datetime,
    study_ids: list[int],
    result: AppliedResult,
    rules: RuleSet | None = None,
) -> None:
    """Ask the worklist engine to re-prioritise these studies, if it exists.

    A bug there must not lose the RIS's message: it is logged, and the scheduler's
    periodic re-prioritisation catches up. A database error fails the message like any other.
    """
    if not study_ids:
        return
    reprioritise = getattr(worklist_engine, "reprioritise", None)
    if reprioritise is None:
        result.reprioritised = False
        return
    try:
        if rules is None:
            reprioritise(session, now=now, study_ids=study_ids)
        else:
            reprioritise(session, now=now, study_ids=study_ids, rules=rules)
    except sa.exc.SQLAlchemyError:
        raise
    except Exception:  # noqa: BLE001 - see docstring
        logger.exception(
            "re-prioritising studies %s failed; the scheduler will catch up", study_ids
        )
        result.reprioritised = False
        return
    result.reprioritised = True


# --- Patients ------------------------------------------------------------------------------


def _find_patient(
    session: Session,
    *,
    trust: Trust,
    identity: PatientIdentity,
    follow_merges: bool = True,
    lookups: Lookups | None = None,
) -> Patient | None:
    """The trust's record by hospital number (else NHS number), followed to its merge survivor."""
    patient: Patient | None = None
    key = (trust.id, identity.local_id or "")
    if identity.local_id and lookups is not None and key in lookups.patients:
        patient = lookups.patients[key]
    elif identity.local_id:
        patient = session.scalar(
            sa.select(Patient).where(
                Patient.trust_id == trust.id, Patient.local_id == identity.local_id
            )
        )
    else:
        number = normalise_nhs_number(identity.nhs_number)
        if number:
            patient = session.scalar(
                sa.select(Patient)
                .where(Patient.trust_id == trust.id, Patient.nhs_number == number)
                .order_by(Patient.merged_into_id.is_not(None), Patient.id)
                .limit(1)
            )
    if patient is None or not follow_merges:
        return patient
    return _survivor(session, patient)


def _survivor(session: Session, patient: Patient) -> Patient:
    seen = {patient.id}
    while patient.merged_into_id is not None:
        nxt = session.get(Patient, patient.merged_into_id)
        if nxt is None or nxt.id in seen:
            break
        seen.add(nxt.id)
        patient = nxt
    return patient


def _create_patient(
    session: Session,
    *,
    trust: Trust,
    identity: PatientIdentity,
    now: datetime,
    message_time: datetime | None = None,
    lookups: Lookups | None = None,
    flush: bool = True,
) -> Patient:
    _require_local_id(trust, identity)
    patient = Patient(
        trust_id=trust.id, local_id=identity.local_id, nhs_number_valid=False, updated_at=now
    )
    _start_patient(patient, identity, now=now, message_time=message_time)
    # A record created by another connection meanwhile fails this insert on the unique
    # (trust, local id); `apply_events` then applies the message again and finds it.
    session.add(patient)
    if flush:
        session.flush()
    if lookups is not None:
        lookups.patients[(trust.id, patient.local_id)] = patient
    return patient


def _require_local_id(trust: Trust, identity: PatientIdentity) -> None:
    if not identity.local_id:
        raise IncompleteOrder(
            f"the patient has no hospital number for trust {trust.code} (PID-3 MR),"
            " so no record can be created"
        )


def _start_patient(
    patient: Patient, identity: PatientIdentity, *, now: datetime, message_time: datetime | None
) -> None:
    """A new record's values from what was sent (the record holds only its keys yet)."""
    _update_patient(patient, identity, now=now, message_time=message_time)
    if not any(i.value == identity.local_id for i in patient.identifiers):
        patient.identifiers.append(
            PatientIdentifier(
                value=identity.local_id, authority=identity.local_authority, type_code="MR"
            )
        )


def _update_patient(
    patient: Patient,
    identity: PatientIdentity,
    *,
    now: datetime,
    message_time: datetime | None = None,
) -> bool:
    """Bring demographics up to date from what was sent; a value not sent is never erased.

    A message older (MSH-7) than the last one applied to this record only fills
    empty values: a late ADT^A08 must not undo a newer update.
    """
    changed = False
    stale = (
        message_time is not None
        and patient.last_message_at is not None
        and message_time < patient.last_message_at
    )
    for name in ("local_authority", "family_name", "given_name", "birth_date", "sex"):
        value = getattr(identity, name)
        current = getattr(patient, name)
        if value is not None and current != value and (current is None or not stale):
            setattr(patient, name, value)
            changed = True
    number = normalise_nhs_number(identity.nhs_number)
    valid = is_valid_nhs_number(number)
    if (
        number is not None
        and patient.nhs_number is not None
        and patient.nhs_number != number
        and ((not valid and patient.nhs_number_valid) or stale)
    ):
        # A number failing Modulus 11 never displaces a valid one (and its regional link),
        # nor does one from an older message: it is kept as an identifier of the record,
        # for a person to look at.
        logger.warning(
            "patient %s: NHS number %s; the one on record is kept",
            patient.local_id,
            "from an older message" if stale else "fails Modulus 11",
        )
        changed |= _add_identifier(patient, Identifier(number, "NHS", "NH"), nhs_number=number)
    elif number is not None:
        for name, value in (
            ("nhs_number", number),
            ("nhs_number_valid", valid),
            ("link_nhs_number", number if valid else None),
        ):
            if getattr(patient, name) != value:
                setattr(patient, name, value)
                changed = True
        if not valid:
            logger.info(
                "patient %s: NHS number fails Modulus 11; kept, not linked", patient.local_id
            )
        if (
            identity.nhs_number_status is not None
            and patient.nhs_number_status != identity.nhs_number_status
        ):
            patient.nhs_number_status = identity.nhs_number_status
            changed = True
    elif (
        identity.nhs_number_status is not None
        and patient.nhs_number_status != identity.nhs_number_status
    ):
        patient.nhs_number_status = identity.nhs_number_status
        changed = True
    for identifier in identity.identifiers:
        changed |= _add_identifier(patient, identifier, nhs_number=number)
    if changed:
        patient.updated_at = now
    if message_time is not None and (
        patient.last_message_at is None or message_time > patient.last_message_at
    ):
        patient.last_message_at = message_time
    return changed


def _add_identifier(patient: Patient, identifier: Identifier, *, nhs_number: str | None) -> bool:
    value = identifier.value
    if nhs_number is not None and normalise_nhs_number(value) == nhs_number:
        value = nhs_number
    if not value:
        return False
    for existing in patient.identifiers:
        if (existing.value, existing.authority, existing.type_code) == (
            value,
            identifier.authority,
            identifier.type_code,
        ):
            return False
    patient.identifiers.append(
        PatientIdentifier(
            value=value[:64], authority=identifier.authority, type_code=identifier.type_code
        )
    )
    return True


def _copy_identifiers(survivor: Patient, prior: Patient) -> None:
    """The survivor keeps every identifier the prior record had (so old numbers still find it)."""
    for identifier in list(prior.identifiers):
        _add_identifier(
            survivor,
            Identifier(identifier.value, identifier.authority, identifier.type_code),
            nhs_number=None,
        )


def _prior_patients(session: Session, *, trust: Trust, event: PatientsMerged) -> list[Patient]:
    """The trust's records named by MRG-1 (prior hospital number and other prior identifiers)."""
    local_ids: list[str] = []
    if event.prior_local_id:
        local_ids.append(event.prior_local_id)
    for identifier in event.prior_identifiers:
        if identifier.value and identifier.value not in local_ids:
            local_ids.append(identifier.value)
    if not local_ids:
        raise IncompleteOrder("the merge names no prior patient identifier (MRG-1)")
    found: dict[int, Patient] = {}
    for patient in session.scalars(
        sa.select(Patient).where(Patient.trust_id == trust.id, Patient.local_id.in_(local_ids))
    ):
        found[patient.id] = patient
    return list(found.values())


# --- The Core path: a batch of order messages without ORM units of work ----------------------


class NeedsOrm(Exception):  # noqa: N818 - a signal, not an error
    """This message needs what only the ORM path does (a claim to end, a merged patient, an
    order without accession number): apply it with `apply_events`."""


class _Row:
    """A study or patient row as plain attributes: what the decisions of `_Run` read and set."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    if TYPE_CHECKING:  # columns as attributes, whatever the table

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

    def state(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if "identifiers" in state:
            state["identifiers"] = list(state["identifiers"])  # type: ignore[call-overload]
        return state

    def restore(self, state: dict[str, object]) -> None:
        self.__dict__.clear()
        self.__dict__.update(state)
        if "identifiers" in state:
            self.identifiers = list(state["identifiers"])  # type: ignore[call-overload]


_STUDY: sa.Table = Study.__table__  # type: ignore[assignment]
_PATIENT: sa.Table = Patient.__table__  # type: ignore[assignment]
_IDENTIFIER: sa.Table = PatientIdentifier.__table__  # type: ignore[assignment]
_STATUS_CHANGE: sa.Table = StudyStatusChange.__table__  # type: ignore[assignment]
# The columns `_Run` sets (the rest of a row, priority and claim, is the worklist engine's
# and keeps its defaults in a new row). The Core path writes only these; a decision that
# sets another column must add it here (test_ingest_core_apply compares both paths' rows).
_STUDY_DECIDED = (
    "trust_id",
    "patient_id",
    "accession_number",
    *_COPIED_FIELDS,
    "ready_at",
    "status",
    "status_before_hold",
    "status_changed_at",
    "last_message_at",
    "last_control_id",
    "order_placed_at",
    "status_message_at",
    "ignored_stale_messages",
    "created_at",
    "updated_at",
)
_PATIENT_COLUMNS = (
    "trust_id",
    "local_id",
    "local_authority",
    "family_name",
    "given_name",
    "birth_date",
    "sex",
    "nhs_number",
    "nhs_number_valid",
    "nhs_number_status",
    "link_nhs_number",
    "merged_into_id",
    "last_message_at",
    "updated_at",
)


class CoreBatch:
    """Order messages of one transaction applied with a few Core statements, not the ORM.

    The decisions are `_Run`'s (the same code as `apply_events`), made on plain rows
    (`_Row`): the batch's studies and patients are read ahead in one query each, new
    rows get their ids up front (PostgreSQL: the sequence; SQLite: the write lock is
    held, so max(id)), and `write` sends the new and changed rows in one executemany
    per table (~0.6 statements a message against ~6 through the ORM). A message that
    fails leaves the rows as they were before it (`apply` restores them), so it fails
    alone as in its own savepoint. Handles `OrderEvent`s with an accession number
    (`accepts`); `apply` raises `NeedsOrm` for what only the ORM path does.
    """

    def __init__(self, session: Session, *, now: datetime) -> None:
        self.session = session
        self.now = now
        self.dialect = session.get_bind().dialect.name
        self.studies: dict[tuple[int, str], _Row | None] = {}
        self.patients: dict[tuple[int, str], _Row | None] = {}
        self.patients_by_id: dict[int, _Row] = {}
        self.loaded: dict[int, dict[str, object]] = {}  # id(row) -> values as read
        self.new_studies: list[_Row] = []
        self.new_patients: list[_Row] = []
        self.changes: list[dict[str, object]] = []
        self._study_ids: list[int] = []
        self._patient_ids: list[int] = []
        self._top: dict[str, int] = {}  # SQLite: the highest id handed out, per table

    @staticmethod
    def accepts(events: Sequence[DomainEvent]) -> bool:
        """Whether a message's events are all ones the Core path decides (before reading)."""
        return bool(events) and all(
            isinstance(e, OrderEvent)
            and e.order.accession_number
            and (e.patient is None or e.patient.local_id)
            for e in events
        )

    def read_ahead(self, messages: Sequence[tuple[Trust, Sequence[DomainEvent]]]) -> None:
        """The studies and patients these messages name, one query each (studies locked:
        one order's messages in turn, as `_find_study` locks them); call it once."""
        study_keys = {
            (trust.id, e.order.accession_number)
            for trust, events in messages
            for e in events
            if isinstance(e, OrderEvent) and e.order.accession_number
        }
        patient_keys = {
            (trust.id, e.patient.local_id)
            for trust, events in messages
            for e in events
            if isinstance(e, OrderEvent) and e.patient and e.patient.local_id
        }
        connection = self.session.connection()
        if study_keys:
            open_assignment = (
                sa.select(Assignment.id)
                .where(Assignment.study_id == _STUDY.c.id, Assignment.ended_at.is_(None))
                .exists()
            )
            query = (
                sa.select(
                    _STUDY,
                    _PATIENT.c.local_id.label("patient_local_id"),
                    open_assignment.label("has_open_assignment"),
                )
                .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_id)
                .where(
                    sa.tuple_(_STUDY.c.trust_id, _STUDY.c.accession_number).in_(sorted(study_keys))
                )
            )
            if self.dialect == "postgresql":
                query = query.with_for_update(of=_STUDY)
            for values in connection.execute(query).mappings():
                study = self._loaded(_Row(**values))
                self.studies[(study.trust_id, study.accession_number)] = study
            for key in study_keys:
                self.studies.setdefault(key, None)
        if patient_keys:
            patients = {}
            query = sa.select(_PATIENT).where(
                sa.tuple_(_PATIENT.c.trust_id, _PATIENT.c.local_id).in_(sorted(patient_keys))
            )
            for values in connection.execute(query).mappings():
                patient = _Row(**values, identifiers=[])
                patients[patient.id] = patient
                self.patients[(patient.trust_id, patient.local_id)] = patient
                self.patients_by_id[patient.id] = patient
            if patients:
                for identifier in connection.execute(
                    sa.select(_IDENTIFIER).where(_IDENTIFIER.c.patient_id.in_(patients))
                ):
                    patients[identifier.patient_id].identifiers.append(identifier)
            for patient in patients.values():
                self._loaded(patient)
            for key in patient_keys:
                self.patients.setdefault(key, None)
        missing_studies = sum(1 for v in self.studies.values() if v is None)
        missing_patients = sum(1 for v in self.patients.values() if v is None)
        self._study_ids = self._allocate(_STUDY, missing_studies, self._study_ids)
        self._patient_ids = self._allocate(_PATIENT, missing_patients, self._patient_ids)

    def apply(
        self,
        *,
        trust: Trust,
        events: Sequence[DomainEvent],
        source: str,
        control_id: str | None,
    ) -> AppliedResult:
        """Decide one message on the rows read ahead; on any exception the rows are as before."""
        keys = [
            (trust.id, e.order.accession_number or "") for e in events if isinstance(e, OrderEvent)
        ]
        patient_keys = [
            (trust.id, e.patient.local_id or "")
            for e in events
            if isinstance(e, OrderEvent) and e.patient
        ]
        saved = (
            {k: (self.studies.get(k), _state(self.studies.get(k))) for k in keys},
            {k: (self.patients.get(k), _state(self.patients.get(k))) for k in patient_keys},
            len(self.new_studies),
            len(self.new_patients),
            len(self.changes),
            list(self._study_ids),
            list(self._patient_ids),
        )
        run = _CoreRun(
            session=self.session,
            trust=trust,
            source=source,
            now=self.now,
            control_id=control_id,
            batch=self,
        )
        try:
            for event in events:
                run.result.outcomes.append(run.apply(event))
        except BaseException:
            self._restore(*saved)
            raise
        run.result.to_reprioritise = sorted(run.to_reprioritise)
        return run.result

    def write(self) -> None:
        """The new and changed rows, one statement per table (the caller commits)."""
        connection = self.session.connection()
        if self.new_patients:
            connection.execute(
                _PATIENT.insert(),
                [
                    {"id": p.id, **{c: getattr(p, c) for c in _PATIENT_COLUMNS}}
                    for p in self.new_patients
                ],
            )
        patients = [p for p in self.patients.values() if p is not None]
        new_identifiers = [
            {
                "patient_id": p.id,
                "value": i.value,
                "authority": i.authority,
                "type_code": i.type_code,
            }
            for p in patients
            for i in p.identifiers
            if getattr(i, "id", None) is None
        ]
        if new_identifiers:
            connection.execute(_IDENTIFIER.insert(), new_identifiers)
        if self.new_studies:
            connection.execute(
                _STUDY.insert(),
                [
                    {"id": s.id, **{c: getattr(s, c) for c in _STUDY_DECIDED}}
                    for s in self.new_studies
                ],
            )
        changed_patients = [
            {"b_id": p.id, **{c: getattr(p, c) for c in _PATIENT_COLUMNS}}
            for p in patients
            if id(p) in self.loaded and self._changed(p, _PATIENT_COLUMNS)
        ]
        if changed_patients:
            connection.execute(_update(_PATIENT, _PATIENT_COLUMNS), changed_patients)
        changed_studies = [
            {"b_id": s.id, **{c: getattr(s, c) for c in _STUDY_DECIDED}}
            for s in self.studies.values()
            if s is not None and id(s) in self.loaded and self._changed(s, _STUDY_DECIDED)
        ]
        if changed_studies:
            connection.execute(_update(_STUDY, _STUDY_DECIDED), changed_studies)
        if self.changes:
            connection.execute(_STATUS_CHANGE.insert(), self.changes)

    # --- internals ---

    def _loaded(self, row: _Row) -> _Row:
        self.loaded[id(row)] = dict(row.__dict__)
        return row

    def _changed(self, row: _Row, columns: Sequence[str]) -> bool:
        before = self.loaded[id(row)]
        return any(before[c] != getattr(row, c) for c in columns)

    def _allocate(self, table: sa.Table, count: int, spare: list[int]) -> list[int]:
        """Ids for `count` new rows (on top of those still spare) of `table`."""
        if count <= len(spare):
            return spare
        wanted = count - len(spare)
        connection = self.session.connection()
        if self.dialect == "postgresql":
            return spare + list(
                connection.execute(
                    sa.text(
                        "SELECT nextval(pg_get_serial_sequence(:table, 'id'))"
                        " FROM generate_series(1, :n)"
                    ),
                    {"table": table.name, "n": wanted},
                ).scalars()
            )
        # SQLite: this transaction holds the write lock (BEGIN IMMEDIATE): nobody else inserts.
        top = self._top.get(table.name)
        if top is None:
            top = connection.execute(sa.select(sa.func.max(table.c.id))).scalar() or 0
        self._top[table.name] = top + wanted
        return spare + list(range(top + 1, top + 1 + wanted))

    def _take_id(self, ids: list[int]) -> int:
        return ids.pop(0)

    def _restore(
        self,
        studies: dict[tuple[int, str], tuple[_Row | None, dict[str, object] | None]],
        patients: dict[tuple[int, str], tuple[_Row | None, dict[str, object] | None]],
        new_studies: int,
        new_patients: int,
        changes: int,
        study_ids: list[int],
        patient_ids: list[int],
    ) -> None:
        for lookup, saved in ((self.studies, studies), (self.patients, patients)):
            for key, (row, state) in saved.items():
                lookup[key] = row
                if row is not None and state is not None:
                    row.restore(state)
        for patient in self.new_patients[new_patients:]:
            self.patients_by_id.pop(patient.id, None)
        del self.new_studies[new_studies:]
        del self.new_patients[new_patients:]
        del self.changes[changes:]
        self._study_ids = study_ids
        self._patient_ids = patient_ids


def _state(row: _Row | None) -> dict[str, object] | None:
    return row.state() if row is not None else None


def _update(table: sa.Table, columns: Sequence[str]) -> sa.Update:
    return (
        table.update()
        .where(table.c.id == sa.bindparam("b_id"))
        .values({c: sa.bindparam(c) for c in columns})
    )


@dataclass
class _CoreRun(_Run):
    """`_Run`'s decisions on a `CoreBatch`'s plain rows; its reads and writes are the batch's."""

    batch: CoreBatch | None = None

    def _find_study(self, order: OrderFields) -> Study | None:
        assert self.batch is not None
        key = (self.trust.id, order.accession_number or "")
        if not order.accession_number or key not in self.batch.studies:
            raise NeedsOrm("an order without accession number, or not read ahead")
        return self.batch.studies[key]  # type: ignore[return-value]

    def _new_study(self, patient: Patient, **values: object) -> Study:
        assert self.batch is not None
        row = _Row(**dict.fromkeys(_STUDY_DECIDED), claimed_by_id=None, has_open_assignment=False)
        row.__dict__.update(values)
        row.id = self.batch._take_id(self.batch._study_ids)
        row.patient_id = patient.id
        row.patient_local_id = patient.local_id
        return row  # type: ignore[return-value]

    def _created(self, study: Study, change: dict[str, object]) -> None:
        assert self.batch is not None
        self.batch.new_studies.append(study)  # type: ignore[arg-type]
        self.batch.studies[(self.trust.id, study.accession_number)] = study  # type: ignore[assignment]
        self.batch.changes.append({"study_id": study.id, **change})

    def _record(self, study: Study, target: StudyStatus, reason: str) -> bool:
        assert self.batch is not None
        change = _move(study, target, reason=reason, source=self.source, now=self.now)
        if change is not None:
            self.batch.changes.append(change)
        return change is not None

    def _withdraw(self, study: Study, end_reason: str) -> None:
        if study.claimed_by_id is not None or study.has_open_assignment:  # type: ignore[attr-defined]
            raise NeedsOrm("a claim to end")

    def _patient_local_id(self, study: Study) -> str | None:
        assert self.batch is not None
        patient = self.batch.patients_by_id.get(study.patient_id)
        if patient is not None:
            return patient.local_id  # type: ignore[no-any-return]
        return study.patient_local_id  # type: ignore[attr-defined, no-any-return]

    def _find_patient(self, identity: PatientIdentity) -> Patient | None:
        assert self.batch is not None
        key = (self.trust.id, identity.local_id or "")
        if not identity.local_id or key not in self.batch.patients:
            raise NeedsOrm("a patient without hospital number, or not read ahead")
        patient = self.batch.patients[key]
        if patient is not None and patient.merged_into_id is not None:
            raise NeedsOrm("a merged patient: its survivor")
        return patient  # type: ignore[return-value]

    def _create_patient(
        self, identity: PatientIdentity, message_time: datetime, *, flush: bool
    ) -> Patient:
        assert self.batch is not None
        _require_local_id(self.trust, identity)
        row = _Row(**dict.fromkeys(_PATIENT_COLUMNS), identifiers=[])
        row.__dict__.update(
            id=self.batch._take_id(self.batch._patient_ids),
            trust_id=self.trust.id,
            local_id=identity.local_id,
            nhs_number_valid=False,
            updated_at=self.now,
        )
        _start_patient(row, identity, now=self.now, message_time=message_time)  # type: ignore[arg-type]
        self.batch.new_patients.append(row)
        self.batch.patients[(self.trust.id, row.local_id)] = row
        self.batch.patients_by_id[row.id] = row
        return row  # type: ignore[return-value]


__all__ = [
    "AmbiguousOrder",
    "AppliedResult",
    "CoreBatch",
    "DuplicateOrder",
    "EventOutcome",
    "IncompleteOrder",
    "Lookups",
    "NeedsOrm",
    "OrderNotFound",
    "StatusConflict",
    "UnsupportedOrderStatus",
    "apply_events",
    "mark_images_available",
    "reprioritise_studies",
]
