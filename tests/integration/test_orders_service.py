"""The order service applying RIS events to studies and patients, on a real database.

Events are built directly as the dataclasses `hl7/inbound.py` produces; no HL7 here.
"""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.factories import make_trust, make_user
from worklist.bootstrap import Runtime
from worklist.clock import FixedClock
from worklist.db.models import (
    Alert,
    Assignment,
    Patient,
    PatientIdentifier,
    Study,
    StudyStatusChange,
    Trust,
)
from worklist.domain.events import (
    ExamStatusChanged,
    Identifier,
    OrderCancelled,
    OrderChanged,
    OrderDiscontinued,
    OrderFields,
    OrderHeld,
    OrderPlaced,
    OrderReleased,
    PatientIdentity,
    PatientsMerged,
    PatientUpdated,
)
from worklist.errors import Conflict, NotFound
from worklist.services import orders
from worklist.services.orders import (
    DuplicateOrder,
    IncompleteOrder,
    OrderNotFound,
    StatusConflict,
    apply_events,
)

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
VALID_NHS = "9434765919"
INVALID_NHS = "9219068409"


def patient(local_id: str = "RW6000001", **kwargs: Any) -> PatientIdentity:
    kwargs.setdefault("family_name", "Smith")
    kwargs.setdefault("given_name", "Jane")
    kwargs.setdefault("birth_date", date(1960, 5, 1))
    kwargs.setdefault("sex", "F")
    identifiers = [Identifier(local_id, "RW6", "MR")]
    if kwargs.get("nhs_number"):
        identifiers.append(Identifier(kwargs["nhs_number"], "NHS", "NH"))
    kwargs.setdefault("identifiers", tuple(identifiers))
    return PatientIdentity(local_id=local_id, local_authority="RW6", **kwargs)


def order(accession: str = "ACC1", **kwargs: Any) -> OrderFields:
    kwargs.setdefault("placer_order_number", f"PL-{accession}")
    kwargs.setdefault("placer_order_namespace", "EPR")
    kwargs.setdefault("filler_order_number", f"FL-{accession}")
    kwargs.setdefault("filler_order_namespace", "CRIS")
    kwargs.setdefault("procedure_code", "CCHEA")
    kwargs.setdefault("procedure_name", "CT Head")
    kwargs.setdefault("modality", "CT")
    kwargs.setdefault("order_priority", "R")
    return OrderFields(accession_number=accession, **kwargs)


def placed(
    accession: str = "ACC1", at: datetime = T0, who: PatientIdentity | None = None, **kw: Any
) -> OrderPlaced:
    return OrderPlaced(
        message_time=at, order_control="NW", patient=who or patient(), order=order(accession, **kw)
    )


def exam(status: str, accession: str = "ACC1", at: datetime = T0, **kw: Any) -> ExamStatusChanged:
    return ExamStatusChanged(
        message_time=at,
        order_control="SC",
        order_status=status,
        patient=patient(),
        order=order(accession, **kw),
    )


@pytest.fixture
def trust(session: Session, clock: FixedClock) -> Trust:
    return make_trust(session, now=clock.now(), code="RW6")


def apply(
    session: Session, trust: Trust, clock: FixedClock, *events: Any, control: str = "MSG1"
) -> orders.AppliedResult:
    return apply_events(
        session, trust=trust, events=list(events), source=f"hl7:{control}", now=clock.now()
    )


def study_of(session: Session, trust: Trust, accession: str = "ACC1") -> Study:
    return session.scalars(
        sa.select(Study).where(Study.trust_id == trust.id, Study.accession_number == accession)
    ).one()


def history(session: Session, study: Study) -> list[tuple[str | None, str]]:
    rows = session.scalars(
        sa.select(StudyStatusChange)
        .where(StudyStatusChange.study_id == study.id)
        .order_by(StudyStatusChange.id)
    )
    return [(r.from_status, r.to_status) for r in rows]


def claim(session: Session, study: Study, clock: FixedClock, **user_kwargs: Any):  # type: ignore[no-untyped-def]
    user = make_user(session, now=clock.now(), trusts=("RW6",), credentials=("CT",), **user_kwargs)
    study.claimed_by_id = user.id
    study.claimed_at = clock.now()
    study.claim_expires_at = clock.now() + timedelta(minutes=30)
    session.add(
        Assignment(
            study_id=study.id,
            user_id=user.id,
            kind="pull",
            started_at=clock.now(),
            expires_at=study.claim_expires_at,
        )
    )
    session.flush()
    return user


# --- new orders --------------------------------------------------------------------------


def test_a_new_order_creates_an_ordered_study_with_the_trusts_numbers_and_patient(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    result = apply(session, trust, clock, placed())

    study = study_of(session, trust)
    assert result.outcomes[0].action == orders.CREATED
    assert result.study_ids == [study.id] and result.accession_numbers == ["ACC1"]
    assert study.status == "ordered"
    assert (study.placer_order_number, study.placer_order_namespace) == ("PL-ACC1", "EPR")
    assert (study.filler_order_number, study.filler_order_namespace) == ("FL-ACC1", "CRIS")
    assert (
        study.order_placed_at == T0
        and study.last_message_at == T0
        and study.last_control_id == "MSG1"
    )
    assert study.patient.local_id == "RW6000001" and study.patient.family_name == "Smith"
    assert history(session, study) == [(None, "ordered")]
    change = session.scalars(
        sa.select(StudyStatusChange).where(StudyStatusChange.study_id == study.id)
    ).one()
    assert change.source == "hl7:MSG1" and "NW" in (change.reason or "")


def test_the_same_accession_number_in_two_trusts_makes_two_studies_for_two_patients(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    other = make_trust(session, now=clock.now(), code="RM3")
    apply(session, trust, clock, placed("A100", who=patient("RW6-1")))
    apply_events(
        session,
        trust=other,
        events=[placed("A100", who=patient("RM3-9", family_name="Jones"))],
        source="hl7:OTHER1",
        now=clock.now(),
    )

    studies = list(session.scalars(sa.select(Study).where(Study.accession_number == "A100")))
    assert {s.trust_id for s in studies} == {trust.id, other.id}
    assert {s.patient.family_name for s in studies} == {"Smith", "Jones"}


def test_a_second_new_order_for_an_existing_accession_is_refused_as_a_duplicate(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), control="MSG1")

    with pytest.raises(DuplicateOrder) as raised:
        apply(session, trust, clock, placed(at=T0 + timedelta(minutes=5)), control="MSG2")

    assert isinstance(raised.value, Conflict) and raised.value.hl7_error_code == "205"
    assert "ACC1" in str(raised.value)
    assert study_of(session, trust).last_control_id == "MSG1"


def test_a_failed_message_leaves_nothing_of_itself_behind(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed("ACC1"))

    with pytest.raises(DuplicateOrder):
        apply(
            session,
            trust,
            clock,
            placed("ACC2", at=T0 + timedelta(minutes=1)),
            placed("ACC1", at=T0 + timedelta(minutes=1)),
            control="MSG2",
        )

    assert session.scalar(sa.select(Study).where(Study.accession_number == "ACC2")) is None


def test_a_new_order_without_an_accession_number_is_refused_as_incomplete(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    event = OrderPlaced(
        message_time=T0,
        order_control="NW",
        patient=patient(),
        order=OrderFields(placer_order_number="PL9"),
    )
    with pytest.raises(IncompleteOrder) as raised:
        apply(session, trust, clock, event)
    assert raised.value.hl7_error_code == "101"


# --- changes -----------------------------------------------------------------------------


def test_a_change_replaces_the_order_details_but_keeps_values_it_does_not_send(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(clinical_details="headache"))
    change = OrderChanged(
        message_time=T0 + timedelta(minutes=10),
        order_control="XO",
        patient=patient(),
        order=OrderFields(
            accession_number="ACC1", order_priority="S", procedure_name="CT Head with contrast"
        ),
    )

    result = apply(session, trust, clock, change, control="MSG2")

    study = study_of(session, trust)
    assert result.outcomes[0].action == orders.UPDATED
    assert (study.order_priority, study.procedure_name) == ("S", "CT Head with contrast")
    assert study.clinical_details == "headache" and study.modality == "CT"
    assert study.last_message_at == T0 + timedelta(minutes=10) and study.last_control_id == "MSG2"


def test_a_change_found_by_placer_number_alone_updates_that_study(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    change = OrderChanged(
        message_time=T0 + timedelta(minutes=1),
        order_control="XO",
        patient=None,
        order=OrderFields(placer_order_number="PL-ACC1", clinical_details="fall, on warfarin"),
    )

    apply(session, trust, clock, change, control="MSG2")

    assert study_of(session, trust).clinical_details == "fall, on warfarin"


def test_a_change_for_an_unknown_order_is_not_found(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    change = OrderChanged(
        message_time=T0, order_control="XO", patient=patient(), order=order("NOPE")
    )

    with pytest.raises(OrderNotFound) as raised:
        apply(session, trust, clock, change)

    assert isinstance(raised.value, NotFound) and raised.value.hl7_error_code == "204"
    assert session.scalar(sa.select(sa.func.count()).select_from(Study)) == 0


def test_a_cancel_for_an_unknown_order_is_not_found(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    with pytest.raises(OrderNotFound):
        apply(
            session,
            trust,
            clock,
            OrderCancelled(message_time=T0, order_control="CA", patient=None, order=order()),
        )


def test_order_numbers_are_looked_up_only_within_the_sending_trust(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    other = make_trust(session, now=clock.now(), code="RM3")
    apply(session, trust, clock, placed())
    cancel = OrderCancelled(
        message_time=T0 + timedelta(hours=1),
        order_control="CA",
        patient=None,
        order=OrderFields(placer_order_number="PL-ACC1"),
    )

    with pytest.raises(OrderNotFound):
        apply_events(session, trust=other, events=[cancel], source="hl7:X", now=clock.now())
    assert study_of(session, trust).status == "ordered"


# --- cancel, hold, release ---------------------------------------------------------------


def test_cancelling_a_claimed_study_takes_it_off_the_radiologist_and_alerts_them(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(minutes=30)))
    study = study_of(session, trust)
    radiologist = claim(session, study, clock, username="dr_ada")
    cancel = OrderCancelled(
        message_time=T0 + timedelta(hours=1),
        order_control="CA",
        patient=None,
        order=order(),
        reason="patient declined",
    )

    apply(session, trust, clock, cancel, control="MSG3")

    session.refresh(study)
    assert study.status == "cancelled"
    assert (study.claimed_by_id, study.claimed_at, study.claim_expires_at) == (None, None, None)
    assignment = session.scalars(sa.select(Assignment).where(Assignment.study_id == study.id)).one()
    assert assignment.ended_at == clock.now()
    assert assignment.end_reason == "cancelled by RIS: patient declined"
    alert = session.scalars(sa.select(Alert).where(Alert.study_id == study.id)).one()
    assert (
        alert.kind == "claim_withdrawn" and "dr_ada" in alert.message and alert.trust_id == trust.id
    )
    assert alert.user_id == radiologist.id
    assert radiologist.id == assignment.user_id
    assert history(session, study)[-1] == ("ready", "cancelled")
    last = session.scalars(
        sa.select(StudyStatusChange)
        .where(StudyStatusChange.study_id == study.id)
        .order_by(StudyStatusChange.id.desc())
    ).first()
    assert (
        last is not None
        and last.source == "hl7:MSG3"
        and last.reason == "cancelled by RIS: patient declined"
    )


def test_cancelling_an_unclaimed_study_raises_no_alert(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    apply(
        session,
        trust,
        clock,
        OrderCancelled(
            message_time=T0 + timedelta(hours=1), order_control="OC", patient=None, order=order()
        ),
        control="MSG2",
    )

    assert study_of(session, trust).status == "cancelled"
    assert session.scalar(sa.select(sa.func.count()).select_from(Alert)) == 0


def test_holding_a_claimed_study_withdraws_the_claim_and_release_returns_it_to_ready(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(minutes=30)))
    study = study_of(session, trust)
    claim(session, study, clock)
    hold = OrderHeld(
        message_time=T0 + timedelta(hours=1),
        order_control="HD",
        patient=None,
        order=order(),
        reason="awaiting creatinine",
    )

    apply(session, trust, clock, hold, control="MSG3")
    session.refresh(study)
    assert (study.status, study.status_before_hold, study.claimed_by_id) == (
        "on_hold",
        "ready",
        None,
    )
    assignment = session.scalars(sa.select(Assignment).where(Assignment.study_id == study.id)).one()
    assert assignment.end_reason == "held by RIS"
    assert session.scalars(sa.select(Alert.kind)).all() == ["claim_withdrawn"]

    release = OrderReleased(
        message_time=T0 + timedelta(hours=2), order_control="RL", patient=None, order=order()
    )
    apply(session, trust, clock, release, control="MSG4")
    session.refresh(study)
    assert (study.status, study.status_before_hold) == ("ready", None)
    assert history(session, study) == [
        (None, "ordered"),
        ("ordered", "ready"),
        ("ready", "on_hold"),
        ("on_hold", "ready"),
    ]


def test_an_exam_completed_while_on_hold_is_ready_once_released(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("SC", at=T0 + timedelta(minutes=1)))
    apply(
        session,
        trust,
        clock,
        OrderHeld(
            message_time=T0 + timedelta(minutes=2), order_control="HD", patient=None, order=order()
        ),
        control="MSG2",
    )
    apply(session, trust, clock, exam("CM", at=T0 + timedelta(minutes=3)), control="MSG3")
    study = study_of(session, trust)
    assert (study.status, study.status_before_hold) == ("on_hold", "ready")

    apply(
        session,
        trust,
        clock,
        OrderReleased(
            message_time=T0 + timedelta(minutes=4), order_control="RL", patient=None, order=order()
        ),
        control="MSG4",
    )
    assert study_of(session, trust).status == "ready"


def test_a_discontinued_order_is_kept_with_its_history(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("IP", at=T0 + timedelta(minutes=5)))
    apply(
        session,
        trust,
        clock,
        OrderDiscontinued(
            message_time=T0 + timedelta(minutes=6),
            order_control="DC",
            patient=None,
            order=order(),
            reason="contrast reaction",
        ),
        control="MSG2",
    )

    study = study_of(session, trust)
    assert study.status == "discontinued"
    assert history(session, study) == [
        (None, "ordered"),
        ("ordered", "in_progress"),
        ("in_progress", "discontinued"),
    ]


def test_cancelling_a_finally_reported_study_is_a_conflict_for_a_person_to_see(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    study = study_of(session, trust)
    study.status = "final"
    session.flush()

    with pytest.raises(StatusConflict) as raised:
        apply(
            session,
            trust,
            clock,
            OrderCancelled(
                message_time=T0 + timedelta(days=1), order_control="CA", patient=None, order=order()
            ),
            control="MSG2",
        )
    assert "final" in str(raised.value) and raised.value.hl7_error_code == "207"


# --- exam status -------------------------------------------------------------------------


def test_exam_complete_makes_the_study_ready_to_report(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    completed_at = T0 + timedelta(minutes=40)

    result = apply(
        session,
        trust,
        clock,
        exam("SC", at=T0 + timedelta(minutes=10)),
        exam("IP", at=T0 + timedelta(minutes=20)),
        exam("CM", at=completed_at),
        control="MSG2",
    )

    study = study_of(session, trust)
    assert study.status == "ready" and result.outcomes[-1].status == "ready"
    assert study.ready_at == completed_at and study.performed_at == completed_at
    assert history(session, study) == [
        (None, "ordered"),
        ("ordered", "scheduled"),
        ("scheduled", "in_progress"),
        ("in_progress", "ready"),
    ]


def test_exam_complete_waits_for_images_when_the_trust_enters_studies_on_images_available(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    trust.ready_on = "images_available"
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(minutes=30)))
    study = study_of(session, trust)
    assert study.status == "in_progress" and study.performed_at is not None

    moved = orders.mark_images_available(
        session, study=study, at=clock.now(), now=clock.now(), source="pacs"
    )

    assert moved and study.status == "ready" and study.images_available_at == clock.now()


# --- out of order, duplicates ------------------------------------------------------------


def test_the_same_message_applied_twice_changes_nothing(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    events = [placed(), exam("CM", at=T0)]
    apply(session, trust, clock, *events, control="MSG1")
    study = study_of(session, trust)
    before = (
        study.status,
        study.updated_at,
        study.ignored_stale_messages,
        len(history(session, study)),
    )
    clock.advance(timedelta(minutes=5))

    result = apply(session, trust, clock, *events, control="MSG1")

    session.refresh(study)
    assert [o.action for o in result.outcomes] == [orders.DUPLICATE, orders.DUPLICATE]
    assert not result.changed
    assert (
        study.status,
        study.updated_at,
        study.ignored_stale_messages,
        len(history(session, study)),
    ) == before


def test_a_repeated_change_with_a_new_control_id_changes_nothing_but_the_last_message(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    change = OrderChanged(
        message_time=T0 + timedelta(minutes=1),
        order_control="XO",
        patient=patient(),
        order=order(order_priority="U"),
    )
    apply(session, trust, clock, change, control="MSG2")
    result = apply(session, trust, clock, change, control="MSG3")

    assert result.outcomes[0].action == orders.UNCHANGED
    assert len(history(session, study_of(session, trust))) == 1


def test_an_older_change_after_exam_complete_does_not_overwrite_newer_state(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), control="MSG1")
    apply(
        session,
        trust,
        clock,
        exam("CM", at=T0 + timedelta(hours=2), order_priority="U"),
        control="MSG3",
    )
    late = OrderChanged(
        message_time=T0 + timedelta(hours=1),
        order_control="XO",
        patient=patient(),
        order=order(order_priority="R", clinical_details="query bleed"),
    )

    result = apply(session, trust, clock, late, control="MSG2")

    study = study_of(session, trust)
    assert result.outcomes[0].action == orders.STALE and result.stale
    assert study.status == "ready" and study.order_priority == "U"
    assert study.clinical_details == "query bleed"  # an empty field may be filled
    assert study.last_message_at == T0 + timedelta(hours=2) and study.last_control_id == "MSG3"
    assert study.ignored_stale_messages == 1


def test_an_older_scheduled_status_after_exam_complete_does_not_move_the_study_back(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(hours=2)))
    apply(session, trust, clock, exam("SC", at=T0 + timedelta(hours=1)), control="MSG2")

    assert study_of(session, trust).status == "ready"


def test_a_status_arriving_in_the_same_second_that_would_go_backwards_is_superseded(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(minutes=5)))

    result = apply(session, trust, clock, exam("IP", at=T0 + timedelta(minutes=5)), control="MSG2")

    assert study_of(session, trust).status == "ready"
    assert "superseded" in " ".join(result.notes)


def test_exam_complete_arriving_before_the_order_creates_the_study_and_the_late_order_fills_blanks(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    completed = ExamStatusChanged(
        message_time=T0 + timedelta(hours=1),
        order_control="SC",
        order_status="CM",
        patient=patient(),
        order=OrderFields(accession_number="ACC1", placer_order_number="PL-ACC1", modality="CT"),
    )
    created = apply(session, trust, clock, completed, control="MSG2")
    study = study_of(session, trust)
    assert created.outcomes[0].action == orders.CREATED
    assert (
        study.status == "ready" and study.order_placed_at is None and study.procedure_name is None
    )

    late_order = apply(
        session, trust, clock, placed(at=T0, clinical_details="?SAH"), control="MSG1"
    )

    session.refresh(study)
    assert late_order.outcomes[0].action == orders.STALE
    assert study.status == "ready"
    assert (study.procedure_name, study.clinical_details) == ("CT Head", "?SAH")
    assert study.order_placed_at == T0
    with pytest.raises(DuplicateOrder):
        apply(session, trust, clock, placed(at=T0 + timedelta(hours=3)), control="MSG9")


def test_a_cancel_that_arrives_before_exam_complete_is_not_undone_by_the_older_completion(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed())
    apply(
        session,
        trust,
        clock,
        OrderCancelled(
            message_time=T0 + timedelta(hours=2), order_control="CA", patient=None, order=order()
        ),
        control="MSG3",
    )
    apply(session, trust, clock, exam("CM", at=T0 + timedelta(hours=1)), control="MSG2")

    assert study_of(session, trust).status == "cancelled"


# --- patients ----------------------------------------------------------------------------


def test_an_invalid_nhs_number_is_stored_and_flagged_but_not_linked(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(
        session,
        trust,
        clock,
        placed(who=patient(nhs_number=INVALID_NHS, nhs_number_status="NSTS02")),
    )

    record = study_of(session, trust).patient
    assert record.nhs_number == INVALID_NHS
    assert record.nhs_number_valid is False and record.link_nhs_number is None
    assert record.nhs_number_status == "NSTS02"


def test_an_nhs_number_sent_with_spaces_is_normalised_validated_and_linked(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    spaced = "943 476 5919"
    who = PatientIdentity(
        local_id="RW6000001",
        local_authority="RW6",
        nhs_number=spaced,
        nhs_number_status="NSTS01",
        identifiers=(Identifier("RW6000001", "RW6", "MR"), Identifier(spaced, "NHS", "NH")),
    )

    apply(session, trust, clock, placed(who=who))

    record = study_of(session, trust).patient
    assert (record.nhs_number, record.nhs_number_valid, record.link_nhs_number) == (
        VALID_NHS,
        True,
        VALID_NHS,
    )
    assert {(i.value, i.type_code) for i in record.identifiers} == {
        ("RW6000001", "MR"),
        (VALID_NHS, "NH"),
    }


def test_a_patient_update_changes_demographics_but_never_erases_what_it_does_not_send(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(who=patient(nhs_number=VALID_NHS)))
    update = PatientUpdated(
        message_time=T0 + timedelta(days=1),
        trigger="A08",
        patient=PatientIdentity(
            local_id="RW6000001",
            family_name="Smith-Jones",
            identifiers=(Identifier("RW6000001", "RW6", "MR"), Identifier("X1", "PAS", "PI")),
        ),
    )

    result = apply(session, trust, clock, update, control="ADT1")

    record = session.scalars(sa.select(Patient).where(Patient.local_id == "RW6000001")).one()
    assert result.outcomes[0].action == orders.PATIENT_UPDATED
    assert (record.family_name, record.given_name, record.birth_date) == (
        "Smith-Jones",
        "Jane",
        date(1960, 5, 1),
    )
    assert record.link_nhs_number == VALID_NHS
    assert len(record.identifiers) == 3
    again = apply(session, trust, clock, update, control="ADT1")
    assert again.outcomes[0].action == orders.PATIENT_UNCHANGED


def test_an_older_patient_update_arriving_late_does_not_undo_a_newer_one(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(who=patient(nhs_number=VALID_NHS)))

    def a08(hours: int, family_name: str, nhs_number: str | None = None) -> PatientUpdated:
        return PatientUpdated(
            message_time=T0 + timedelta(hours=hours),
            trigger="A08",
            patient=PatientIdentity.with_nhs_number(
                nhs_number=nhs_number,
                local_id="RW6000001",
                family_name=family_name,
                sex="M" if hours == 1 else None,
            ),
        )

    apply(session, trust, clock, a08(5, "Newer-Name"), control="ADT5")
    apply(session, trust, clock, a08(1, "Older-Name", nhs_number="4010232137"), control="ADT1")

    record = session.scalars(sa.select(Patient).where(Patient.local_id == "RW6000001")).one()
    assert record.family_name == "Newer-Name"
    assert record.sex == "F"  # already known: the older message does not overwrite it
    assert record.link_nhs_number == VALID_NHS
    assert record.last_message_at == T0 + timedelta(hours=5)
    assert ("4010232137", "NH") in {(i.value, i.type_code) for i in record.identifiers}


def test_a_patient_update_for_an_unknown_patient_registers_them(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    update = PatientUpdated(
        message_time=T0, trigger="A28", patient=patient("NEW1", nhs_number=VALID_NHS)
    )

    result = apply(session, trust, clock, update)

    assert result.outcomes[0].action == orders.PATIENT_CREATED
    assert (
        session.scalars(sa.select(Patient.link_nhs_number).where(Patient.local_id == "NEW1")).one()
        == VALID_NHS
    )


def test_a_merge_moves_every_study_to_the_surviving_patient_and_deletes_nothing(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(
        session,
        trust,
        clock,
        placed("ACC1", who=patient("OLD1")),
        placed("ACC2", who=patient("OLD1")),
    )
    apply(
        session,
        trust,
        clock,
        placed("ACC3", who=patient("NEW1", nhs_number=VALID_NHS)),
        control="MSG2",
    )
    patients_before = session.scalar(sa.select(sa.func.count()).select_from(Patient))
    identifiers_before = session.scalar(sa.select(sa.func.count()).select_from(PatientIdentifier))
    merge = PatientsMerged(
        message_time=T0 + timedelta(days=1),
        trigger="A40",
        surviving=patient("NEW1"),
        prior_identifiers=(Identifier("OLD1", "RW6", "MR"),),
        prior_local_id="OLD1",
    )

    result = apply(session, trust, clock, merge, control="ADT9")

    survivor = session.scalars(sa.select(Patient).where(Patient.local_id == "NEW1")).one()
    prior = session.scalars(sa.select(Patient).where(Patient.local_id == "OLD1")).one()
    assert result.outcomes[0].action == orders.MERGED
    assert {study_of(session, trust, a).patient_id for a in ("ACC1", "ACC2", "ACC3")} == {
        survivor.id
    }
    assert prior.merged_into_id == survivor.id
    assert session.scalar(sa.select(sa.func.count()).select_from(Patient)) == patients_before
    assert (
        session.scalar(sa.select(sa.func.count()).select_from(PatientIdentifier))
        >= identifiers_before
    )
    assert any(i.value == "OLD1" for i in survivor.identifiers)

    # A later order under the old hospital number lands on the survivor; the merge is idempotent.
    apply(
        session,
        trust,
        clock,
        placed("ACC4", who=patient("OLD1"), at=T0 + timedelta(days=2)),
        control="MSG4",
    )
    assert study_of(session, trust, "ACC4").patient_id == survivor.id
    assert (
        apply(session, trust, clock, merge, control="ADT9").outcomes[0].action
        == orders.PATIENT_UNCHANGED
    )


def test_a_merge_only_touches_the_sending_trusts_records(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    other = make_trust(session, now=clock.now(), code="RM3")
    apply_events(
        session,
        trust=other,
        events=[placed("B1", who=patient("OLD1"))],
        source="hl7:O1",
        now=clock.now(),
    )
    apply(session, trust, clock, placed("ACC1", who=patient("OLD1")))
    merge = PatientsMerged(
        message_time=T0 + timedelta(days=1), surviving=patient("NEW1"), prior_local_id="OLD1"
    )

    apply(session, trust, clock, merge, control="ADT1")

    other_record = session.scalars(sa.select(Patient).where(Patient.trust_id == other.id)).one()
    assert other_record.merged_into_id is None
    assert study_of(session, other, "B1").patient_id == other_record.id


def test_a_study_that_becomes_ready_is_prioritised_at_once(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    urgent = placed(order_priority="S", patient_class="E")

    result = apply(session, trust, clock, urgent, exam("CM", at=T0 + timedelta(minutes=5)))

    study = study_of(session, trust)
    assert result.reprioritised is True
    assert study.due_at is not None and study.priority_class is not None
    assert study.urgency > 0


def test_without_reprioritising_the_studies_to_prioritise_come_back_for_the_caller(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    urgent = placed(order_priority="S", patient_class="E")

    result = apply_events(
        session,
        trust=trust,
        events=[urgent, exam("CM", at=T0 + timedelta(minutes=5))],
        source="hl7:MSG1",
        now=clock.now(),
        reprioritise=False,
    )

    study = study_of(session, trust)
    assert result.reprioritised is None
    assert result.to_reprioritise == [study.id]
    assert study.priority_class is None and study.due_at is None
    assert orders.reprioritise_studies(session, now=clock.now(), study_ids=result.to_reprioritise)
    assert study.due_at is not None and study.priority_class is not None
    assert study.urgency > 0


def test_read_ahead_answers_a_batchs_study_and_patient_look_ups_without_a_query_each(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed("ACC1"), control="NW1")
    lookups = orders.Lookups()
    complete = exam("CM", "ACC1", at=T0 + timedelta(minutes=5))
    new_order = placed("ACC2", at=T0 + timedelta(minutes=6), who=patient("RW6000002"))
    lookups.read_ahead(session, trust=trust, events=[complete, new_order])
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = session.get_bind()
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        for control, event in (("SC1", complete), ("NW2", new_order)):
            apply_events(
                session,
                trust=trust,
                events=[event],
                source=f"hl7:{control}",
                now=clock.now(),
                reprioritise=False,
                lookups=lookups,
            )
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)

    lookups_by_query = [
        s for s in statements if s.lstrip().upper().startswith("SELECT")
        and ("FROM study " in s or "FROM patient " in s)
    ]  # fmt: skip
    assert lookups_by_query == []
    assert study_of(session, trust, "ACC1").status == "ready"
    assert study_of(session, trust, "ACC2").patient.local_id == "RW6000002"


def test_after_a_failed_message_the_read_ahead_forgets_what_its_savepoint_took_back(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    lookups = orders.Lookups()
    order = placed("ACC1", who=patient("RW6000009"))
    bad_status = exam("ZZ", "ACC1", at=T0 + timedelta(minutes=1))
    lookups.read_ahead(session, trust=trust, events=[order])

    with pytest.raises(orders.UnsupportedOrderStatus):
        apply_events(
            session, trust=trust, events=[order, bad_status], source="hl7:BAD",
            now=clock.now(), lookups=lookups,
        )  # fmt: skip
    assert lookups.studies == {} and lookups.patients == {}
    result = apply_events(
        session, trust=trust, events=[order], source="hl7:GOOD", now=clock.now(), lookups=lookups
    )

    assert [o.action for o in result.outcomes] == [orders.CREATED]
    study = study_of(session, trust)
    assert study.patient.local_id == "RW6000009"
    assert session.scalar(sa.select(sa.func.count()).select_from(Patient)) == 1


def test_reprioritising_no_studies_does_nothing(session: Session, clock: FixedClock) -> None:
    assert orders.reprioritise_studies(session, now=clock.now(), study_ids=[]) is None


def test_a_new_order_resent_under_a_new_control_id_is_a_duplicate_not_an_error(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), control="MSG1")

    result = apply(session, trust, clock, placed(), control="MSG1-RESENT")

    assert result.outcomes[0].action == orders.DUPLICATE
    assert len(history(session, study_of(session, trust))) == 1


def test_two_connections_placing_the_same_order_at_once_make_one_study(
    runtime: Runtime, clock: FixedClock
) -> None:
    with runtime.session() as s:
        trust_id = make_trust(s, now=clock.now(), code="RW6").id
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def place(minute: int) -> None:
        barrier.wait()
        try:
            with runtime.session() as s:
                trust = s.get_one(Trust, trust_id)
                result = apply_events(
                    s,
                    trust=trust,
                    events=[placed(at=T0 + timedelta(minutes=minute))],
                    source=f"hl7:C{minute}",
                    now=clock.now(),
                )
                outcomes.append(result.outcomes[0].action)
        except DuplicateOrder:
            outcomes.append("duplicate order")

    threads = [threading.Thread(target=place, args=(m,)) for m in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    # Whichever commits second sees the first's study: the later NW is a duplicate order,
    # the earlier one is stale.
    assert sorted(outcomes) in (["created", "duplicate order"], ["created", "stale"])
    with runtime.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Study)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Patient)) == 1


def test_a_merge_the_other_way_round_makes_the_earlier_prior_record_the_survivor(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(
        session, trust, clock, placed("ACC1", who=patient("A1")), placed("ACC2", who=patient("B1"))
    )
    first = PatientsMerged(
        message_time=T0 + timedelta(days=1), surviving=patient("A1"), prior_local_id="B1"
    )
    apply(session, trust, clock, first, control="ADT1")

    second = PatientsMerged(
        message_time=T0 + timedelta(days=2), surviving=patient("B1"), prior_local_id="A1"
    )
    apply(session, trust, clock, second, control="ADT2")

    a, b = (
        session.scalars(sa.select(Patient).where(Patient.local_id == x)).one() for x in ("A1", "B1")
    )
    assert (a.merged_into_id, b.merged_into_id) == (b.id, None)
    assert {study_of(session, trust, acc).patient_id for acc in ("ACC1", "ACC2")} == {b.id}


def test_an_invalid_nhs_number_never_displaces_a_valid_one_but_is_kept(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(who=patient(nhs_number=VALID_NHS)))
    typo = PatientUpdated(
        message_time=T0 + timedelta(days=1),
        trigger="A08",
        patient=PatientIdentity(local_id="RW6000001", nhs_number=INVALID_NHS, identifiers=()),
    )

    apply(session, trust, clock, typo, control="ADT1")

    record = session.scalars(sa.select(Patient).where(Patient.local_id == "RW6000001")).one()
    assert (record.nhs_number, record.link_nhs_number) == (VALID_NHS, VALID_NHS)
    assert INVALID_NHS in {i.value for i in record.identifiers}


def test_a_corrected_valid_nhs_number_replaces_an_invalid_one_and_links(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(who=patient(nhs_number=INVALID_NHS)))
    fixed = PatientUpdated(
        message_time=T0 + timedelta(days=1),
        patient=PatientIdentity(
            local_id="RW6000001", nhs_number=VALID_NHS, nhs_number_status="NSTS01"
        ),
    )

    apply(session, trust, clock, fixed, control="ADT1")

    record = session.scalars(sa.select(Patient).where(Patient.local_id == "RW6000001")).one()
    assert (record.nhs_number, record.nhs_number_valid, record.link_nhs_number) == (
        VALID_NHS,
        True,
        VALID_NHS,
    )
    assert record.nhs_number_status == "NSTS01"


def test_a_cancel_overtaken_by_a_later_change_still_cancels_but_keeps_the_newer_values(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), control="MSG1")
    newer_change = OrderChanged(
        message_time=T0 + timedelta(hours=3),
        order_control="XO",
        patient=patient(),
        order=order(order_priority="U"),
    )
    apply(session, trust, clock, newer_change, control="MSG3")
    late_cancel = OrderCancelled(
        message_time=T0 + timedelta(hours=2),
        order_control="CA",
        patient=None,
        order=order(order_priority="R"),
        reason="duplicate request",
    )

    result = apply(session, trust, clock, late_cancel, control="MSG2")

    study = study_of(session, trust)
    assert result.outcomes[0].action == orders.UPDATED
    assert (study.status, study.order_priority) == ("cancelled", "U")
    assert study.last_message_at == T0 + timedelta(hours=3)


def test_a_hold_delivered_after_its_release_does_not_leave_the_study_held(
    session: Session, trust: Trust, clock: FixedClock
) -> None:
    apply(session, trust, clock, placed(), exam("CM", at=T0 + timedelta(minutes=30)))
    release = OrderReleased(
        message_time=T0 + timedelta(hours=2), order_control="RL", patient=None, order=order()
    )
    hold = OrderHeld(
        message_time=T0 + timedelta(hours=1), order_control="HD", patient=None, order=order()
    )

    apply(session, trust, clock, release, control="MSG3")
    result = apply(session, trust, clock, hold, control="MSG2")

    assert result.outcomes[0].action == orders.STALE
    assert study_of(session, trust).status == "ready"
