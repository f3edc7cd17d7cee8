"""The worklist engine through its service functions, on a real (migrated) database."""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from tests.factories import make_patient, make_study, make_trust, make_user
from worklist.db.models import Assignment, AuditEvent, DutySession, Report, ReportVersion, Study
from worklist.domain.priority import PriorityRulesError, described, tier_from_urgency
from worklist.domain.priority_rules import DEFAULT_RULES
from worklist.errors import Conflict, Forbidden, NotFound
from worklist.services import accounts, auto_assignment
from worklist.services import priors as priors_service
from worklist.services import worklist as wl


@pytest.fixture
def region(session, clock):
    now = clock.now()
    rw6 = make_trust(session, now=now, code="RW6")
    rm3 = make_trust(session, now=now, code="RM3")
    return rw6, rm3


def radiologist(session, clock, *, trusts=("RW6",), credentials=("CT:NEURO",), **kw):
    return make_user(
        session, now=clock.now(), trusts=trusts, credentials=credentials, on_duty=True, **kw
    )


def ready(session, clock, trust, **kw):
    study = make_study(session, trust=trust, now=clock.now(), **kw)
    wl.prioritise_study(session, study=study, now=clock.now())
    return study


def test_reprioritise_gives_every_ready_study_its_class_due_time_and_explanation(
    session, clock, region
):
    rw6, _ = region
    ed = make_study(session, trust=rw6, now=clock.now(), patient_class="E",
                    body_area="HEAD", performed_ago=timedelta(minutes=10))  # fmt: skip
    routine = make_study(session, trust=rw6, now=clock.now(), performed_ago=timedelta(days=1))
    scheduled = make_study(session, trust=rw6, now=clock.now(), status="scheduled")
    assert wl.reprioritise(session, now=clock.now()) == 2
    assert (ed.priority_class, routine.priority_class, scheduled.priority_class) == (
        "stat", "outpatient_routine", None,
    )  # fmt: skip
    assert ed.due_at == ed.performed_at + timedelta(hours=1)
    assert ed.priority_explanation["rule"] == "ED head CT"
    assert ed.urgency > routine.urgency
    assert ed.effort == 1.5  # CT, from the rules' effort table
    assert wl.reprioritise(session, now=clock.now()) == 0  # nothing moved


def test_next_case_claims_the_most_urgent_eligible_study_and_records_why(session, clock, region):
    rw6, _ = region
    reader = radiologist(session, clock)
    old = ready(session, clock, rw6, performed_ago=timedelta(days=3))
    ready(session, clock, rw6, performed_ago=timedelta(hours=1))
    stat = ready(session, clock, rw6, order_priority="S")
    result = wl.next_case(session, user=reader, now=clock.now())
    assert result.study is stat
    assert stat.claimed_by_id == reader.id
    assert stat.claim_expires_at == clock.now() + wl.DEFAULT_LEASE
    assert result.assignment.kind == "pull"
    assert result.assignment.explanation["why"] == "the most urgent waiting study you may report"
    assert result.assignment.explanation["priority"]["tier"] == 1
    assert wl.next_case(session, user=reader, now=clock.now()).study is old
    audit = session.scalars(sa.select(AuditEvent).where(AuditEvent.action == "claim")).all()
    assert [a.object_id for a in audit] == [str(stat.id), str(old.id)]


def test_next_case_skips_a_study_claimed_by_another_radiologist(session, clock, region):
    rw6, _ = region
    first, second = radiologist(session, clock), radiologist(session, clock)
    top = ready(session, clock, rw6, order_priority="S")
    other = ready(session, clock, rw6)
    assert wl.next_case(session, user=first, now=clock.now()).study is top
    assert wl.next_case(session, user=second, now=clock.now()).study is other
    nothing = wl.next_case(session, user=second, now=clock.now())
    assert nothing.study is None and nothing.reason == "no eligible study is waiting"


def test_next_case_passes_over_studies_it_may_not_give_and_records_the_reasons(
    session, clock, region
):
    rw6, rm3 = region
    creds = ("CT:NEURO", "MG")
    one, two = (
        radiologist(session, clock, credentials=creds),
        radiologist(session, clock, credentials=creds),
    )
    trainee = radiologist(session, clock, credentials=creds, can_finalise=False)
    disputed = ready(session, clock, rw6, order_priority="S", modality="MG",
                     body_area="BREAST", pathway="bsp")  # fmt: skip
    for reader, outcome in ((one, "normal"), (two, "recall")):
        assert wl.next_case(session, user=reader, now=clock.now()).study is disputed
        wl.record_reading(session, study_id=disputed.id, user=reader, outcome=outcome,
                          now=clock.now())  # fmt: skip
    chest = ready(session, clock, rw6, order_priority="S", body_area="CHEST")
    ready(session, clock, rm3, order_priority="S")  # no agreement for RM3
    head = ready(session, clock, rw6)
    result = wl.next_case(session, user=trainee, now=clock.now())
    assert result.study is head
    skipped = result.assignment.explanation["skipped"]
    assert [(s["study_id"], s["reasons"]) for s in skipped] == [
        (disputed.id, ["arbitration of a double read needs a consultant"])
    ]
    assert disputed.claimed_by_id is None  # the refused claim was undone, with its rows
    assert trainee.id not in {
        h.user_id for h in wl.assignment_history(session, study_id=disputed.id)
    }
    assert not session.scalars(
        sa.select(AuditEvent).where(AuditEvent.user_id == trainee.id,
                                    AuditEvent.object_id == str(disputed.id))
    ).all()  # fmt: skip
    assert chest.claimed_by_id is None  # no credential for CT chest: never a candidate
    assert wl.eligibility_for(session, study=chest, user=trainee, now=clock.now()).explain() == (
        "no credential for CT CHEST"
    )
    # A reader never gets back a study they have already read.
    assert wl.next_case(session, user=one, now=clock.now()).study is not disputed


def test_next_case_gives_nothing_off_duty_and_only_stat_or_critical_work_over_capacity(
    session, clock, region
):
    rw6, _ = region
    reader = make_user(session, now=clock.now(), trusts=("RW6",), credentials=("CT",))
    ready(session, clock, rw6)
    off = wl.next_case(session, user=reader, now=clock.now())
    assert off.study is None and off.reason == "not on a duty session now"

    session.add(DutySession(user_id=reader.id, starts_at=clock.now(), capacity=1.0,
                            ends_at=clock.now() + timedelta(hours=4)))  # fmt: skip
    session.flush()
    first = wl.next_case(session, user=reader, now=clock.now())
    assert first.study is not None  # 1.5 effort now held, capacity 1
    refused = wl.next_case(session, user=reader, now=clock.now())
    assert refused.study is None
    assert refused.reason == "session capacity reached; no stat or critical study is waiting"
    stat = ready(session, clock, rw6, order_priority="S")
    assert wl.next_case(session, user=reader, now=clock.now()).study is stat
    timing_critical = ready(session, clock, rw6, order_priority="T")  # tier 2, but critical
    assert timing_critical.critical
    assert wl.next_case(session, user=reader, now=clock.now()).study is timing_critical


def test_the_worklist_lists_eligible_studies_in_order_with_filters_and_paging(
    session, clock, region
):
    rw6, rm3 = region
    reader = radiologist(session, clock, trusts=("RW6", "RM3"), credentials=("CT", "MR"))
    studies = [
        ready(session, clock, rw6 if i % 2 else rm3, modality="MR" if i % 3 == 0 else "CT",
              performed_ago=timedelta(hours=i + 1))
        for i in range(12)
    ]  # fmt: skip
    ready(session, clock, rw6, modality="US")  # no credential: never listed
    mine = wl.next_case(session, user=reader, now=clock.now()).study
    page = wl.worklist(session, user=reader, now=clock.now(), limit=5)
    expected = sorted((s for s in studies if s is not mine), key=lambda s: -s.urgency)
    assert page.studies == expected[:5] and page.has_more
    assert page.mine == [mine]
    assert page.eligibility.allowed
    second = wl.worklist(session, user=reader, now=clock.now(), limit=5, offset=10)
    assert second.studies == expected[10:] and not second.has_more
    only_mr_rw6 = wl.worklist(
        session, user=reader, now=clock.now(),
        filters=wl.WorklistFilters(trusts=("rw6",), modalities=("mr",)),
    )  # fmt: skip
    assert {(s.trust_id, s.modality) for s in only_mr_rw6.studies} == {(rw6.id, "MR")}


def test_a_worklist_filter_with_a_quote_in_it_is_a_value_never_sql(session, clock, region):
    """The page's filters are written into its walk (escaped by SQLAlchemy's literal
    rendering): a quote in a filter matches that text and never closes the string."""
    rw6, _ = region
    reader = radiologist(session, clock, credentials=("CT",))
    study = ready(session, clock, rw6, body_area="HEAD")
    quoted = "HEAD') OR (1=1) OR ('"
    for filters in (
        wl.WorklistFilters(body_areas=(quoted,)),
        wl.WorklistFilters(modalities=(quoted,)),
        wl.WorklistFilters(trusts=(quoted,)),
    ):
        page = wl.worklist(session, user=reader, now=clock.now(), filters=filters)
        assert page.studies == []
    head = wl.worklist(session, user=reader, now=clock.now(),
                       filters=wl.WorklistFilters(body_areas=("head",)))  # fmt: skip
    assert head.studies == [study]


def test_worklist_filters_on_other_columns_walk_the_pool_in_order_past_many_misses(
    session, clock, region
):
    """Breached and priority-class filters are checked on the rows the walk finds: a page
    of rare matches takes several steps through the pool (ties of urgency across a step's
    edge included) and still lists each match once, in worklist order."""
    rw6, _ = region
    reader = radiologist(session, clock, credentials=("CT",))
    now = clock.now()
    studies = [ready(session, clock, rw6, performed_ago=timedelta(hours=1)) for _ in range(160)]
    for i, study in enumerate(studies):
        study.urgency = float(1000 - i // 4)  # groups of four share an urgency
        study.due_at = now - timedelta(hours=1) if i % 9 == 4 else now + timedelta(hours=1)
        study.priority_class = "inpatient" if i % 9 == 4 else "outpatient_routine"
    session.flush()
    in_order = sorted(studies, key=lambda s: (-s.urgency, -s.id))
    breached = [s for s in in_order if s.due_at <= now]

    def listed(limit: int, offset: int = 0, **filters: object) -> list[Study]:
        return wl.worklist(
            session, user=reader, now=now, limit=limit, offset=offset,
            filters=wl.WorklistFilters(**filters),  # type: ignore[arg-type]
        ).studies  # fmt: skip

    assert listed(10, breached=True) == breached[:10]
    assert listed(10, offset=10, breached=True) == breached[10:]
    assert listed(50, priority_classes=("inpatient",)) == breached
    assert listed(200, breached=False) == [s for s in in_order if s.due_at > now]


def test_the_worklist_shows_an_off_duty_radiologist_what_they_could_report_and_why_not_now(
    session, clock, region
):
    rw6, _ = region
    reader = make_user(session, now=clock.now(), trusts=("RW6",), credentials=("CT",))
    study = ready(session, clock, rw6)
    page = wl.worklist(session, user=reader, now=clock.now())
    assert page.studies == [study]
    assert page.eligibility.explain() == "not on a duty session now"


def test_claiming_a_chosen_study_needs_a_free_choice_session_or_a_manager(session, clock, region):
    rw6, _ = region
    reader = radiologist(session, clock)
    routine = ready(session, clock, rw6, performed_ago=timedelta(hours=1))
    with pytest.raises(Forbidden, match="free-choice session"):
        wl.claim_study(session, study_id=routine.id, user=reader, now=clock.now())
    session.scalars(sa.select(DutySession).where(DutySession.user_id == reader.id)).one()
    for duty in session.scalars(sa.select(DutySession).where(DutySession.user_id == reader.id)):
        duty.free_choice = True
    session.flush()
    assignment = wl.claim_study(session, study_id=routine.id, user=reader, now=clock.now())
    assert routine.claimed_by_id == reader.id
    assert assignment.explanation["why"] == "chosen from the worklist (free-choice session)"
    other = radiologist(session, clock)
    for duty in session.scalars(sa.select(DutySession).where(DutySession.user_id == other.id)):
        duty.free_choice = True
    with pytest.raises(Conflict, match="already claimed by another radiologist"):
        wl.claim_study(session, study_id=routine.id, user=other, now=clock.now())


def test_a_study_of_a_trust_the_user_may_not_see_is_not_found(session, clock, region):
    _, rm3 = region
    reader = radiologist(session, clock)
    hidden = ready(session, clock, rm3)
    with pytest.raises(NotFound):
        wl.get_study(session, study_id=hidden.id, user=reader, now=clock.now())
    with pytest.raises(NotFound):
        priors_service.priors(session, study_id=hidden.id, user=reader, now=clock.now())


def test_release_returns_the_study_to_the_pool_with_the_reason(session, clock, region):
    rw6, _ = region
    reader, other = radiologist(session, clock), radiologist(session, clock)
    study = ready(session, clock, rw6)
    wl.next_case(session, user=reader, now=clock.now())
    with pytest.raises(Conflict):
        wl.release_claim(session, study_id=study.id, user=other, reason="x", now=clock.now())
    wl.release_claim(session, study_id=study.id, user=reader, reason="needs a neuro opinion",
                     now=clock.now())  # fmt: skip
    assert study.claimed_by_id is None
    (assignment,) = wl.assignment_history(session, study_id=study.id)
    assert assignment.end_reason == "released: needs a neuro opinion"
    assert wl.next_case(session, user=other, now=clock.now()).study is study


def test_an_expired_lease_returns_the_study_to_the_pool_and_a_renewed_one_stays(
    session, clock, region
):
    rw6, _ = region
    reader = radiologist(session, clock)
    idle = ready(session, clock, rw6, order_priority="S")
    busy = ready(session, clock, rw6)
    wl.next_case(session, user=reader, now=clock.now())
    wl.next_case(session, user=reader, now=clock.now())
    clock.advance(timedelta(minutes=20))
    wl.renew_claim(session, study_id=busy.id, user=reader, now=clock.now())
    clock.advance(timedelta(minutes=15))
    assert wl.expire_claims(session, now=clock.now()) == 1
    assert idle.claimed_by_id is None and busy.claimed_by_id == reader.id
    history = wl.assignment_history(session, study_id=idle.id)
    assert history[-1].end_reason.startswith("expired")
    page = wl.worklist(session, user=reader, now=clock.now())
    assert [a.study_id for a in page.removed] == [idle.id]


def test_a_study_cancelled_by_the_ris_while_claimed_leaves_the_list_and_says_why(
    session, clock, region
):
    rw6, _ = region
    reader = radiologist(session, clock)
    study = ready(session, clock, rw6)
    wl.next_case(session, user=reader, now=clock.now())
    study.status = "cancelled"
    session.flush()
    assert wl.expire_claims(session, now=clock.now()) == 1
    page = wl.worklist(session, user=reader, now=clock.now())
    assert page.mine == []
    assert page.removed[0].end_reason == "cancelled: the RIS cancelled the order"


def test_a_manager_reassigns_and_returns_studies_and_the_history_says_why(session, clock, region):
    rw6, _ = region
    first, second = radiologist(session, clock), radiologist(session, clock)
    unqualified = radiologist(session, clock, credentials=("MR",))
    manager = make_user(session, now=clock.now(), role="manager")
    study = ready(session, clock, rw6)
    wl.next_case(session, user=first, now=clock.now())
    with pytest.raises(Forbidden):
        wl.assign_study(session, study_id=study.id, to_user=second, by=first, now=clock.now())
    with pytest.raises(Conflict, match="no credential for CT NEURO"):
        wl.assign_study(session, study_id=study.id, to_user=unqualified, by=manager,
                        now=clock.now())  # fmt: skip
    wl.assign_study(session, study_id=study.id, to_user=second, by=manager, now=clock.now(),
                    note="first is in theatre")  # fmt: skip
    assert study.claimed_by_id == second.id
    wl.return_to_pool(session, study_id=study.id, by=manager, reason="rebalancing",
                      now=clock.now())  # fmt: skip
    assert study.claimed_by_id is None
    history = wl.assignment_history(session, study_id=study.id)
    assert [(h.user_id, h.kind, h.end_reason) for h in history] == [
        (first.id, "pull", f"reassigned to {second.username} by {manager.username}"),
        (second.id, "manual", f"returned to the pool by {manager.username}: rebalancing"),
    ]
    assert history[1].explanation["why"] == (
        f"reassigned from {first.username} by {manager.username}: first is in theatre"
    )


def test_double_reading_needs_two_different_readers_then_arbitration_by_a_consultant(
    session, clock, region
):
    rw6, _ = region
    creds = ("MG:BREAST",)
    one, two = (
        radiologist(session, clock, credentials=creds),
        radiologist(session, clock, credentials=creds),
    )
    trainee = radiologist(session, clock, credentials=creds, can_finalise=False)
    consultant = radiologist(session, clock, credentials=creds)
    study = ready(session, clock, rw6, modality="MG", body_area="BREAST", pathway="bsp")
    assert wl.next_case(session, user=one, now=clock.now()).study is study
    stage = wl.record_reading(session, study_id=study.id, user=one, outcome="normal",
                              now=clock.now())  # fmt: skip
    assert stage == "second" and study.claimed_by_id is None
    refused = wl.next_case(session, user=one, now=clock.now())
    assert refused.study is None
    assert "gave reading 1" in refused.reason or refused.reason == "no eligible study is waiting"
    assert wl.eligibility_for(session, study=study, user=one, now=clock.now()).explain() == (
        "gave reading 1 of this double read"
    )
    assert wl.next_case(session, user=two, now=clock.now()).study is study
    assert wl.record_reading(session, study_id=study.id, user=two, outcome="recall",
                             now=clock.now()) == "arbitration"  # fmt: skip
    assert wl.next_case(session, user=trainee, now=clock.now()).study is None
    assert wl.next_case(session, user=consultant, now=clock.now()).study is study
    assert wl.record_reading(session, study_id=study.id, user=consultant, outcome="recall",
                             now=clock.now()) == "arbitrated"  # fmt: skip
    assert study.claimed_by_id == consultant.id  # keeps it to sign the report


def test_two_agreeing_readings_leave_the_second_reader_holding_the_study(session, clock, region):
    rw6, _ = region
    one = radiologist(session, clock, credentials=("MG",))
    two = radiologist(session, clock, credentials=("MG",))
    study = ready(session, clock, rw6, modality="MG", body_area="BREAST", pathway="double_read")
    wl.next_case(session, user=one, now=clock.now())
    wl.record_reading(session, study_id=study.id, user=one, outcome="normal", now=clock.now())
    wl.next_case(session, user=two, now=clock.now())
    assert wl.record_reading(session, study_id=study.id, user=two, outcome="Normal",
                             now=clock.now()) == "agreed"  # fmt: skip
    assert study.claimed_by_id == two.id


def test_a_patients_unread_studies_stay_with_one_reader(session, clock, region):
    rw6, _ = region
    reader = radiologist(session, clock, credentials=("CT",))
    other = radiologist(session, clock, credentials=("CT",))
    patient = make_patient(session, trust=rw6, now=clock.now())
    chest = ready(session, clock, rw6, patient=patient, body_area="CHEST", order_priority="A")
    abdomen = ready(session, clock, rw6, patient=patient, body_area="ABDOMEN")
    stranger = ready(session, clock, rw6, performed_ago=timedelta(days=2))
    result = wl.next_case(session, user=reader, now=clock.now())
    assert result.study is chest and result.together == [abdomen]
    assert abdomen.claimed_by_id == reader.id
    why = wl.assignment_history(session, study_id=abdomen.id)[0].explanation["why"]
    assert why == f"same patient as {chest.accession_number}, kept with one reader"
    assert wl.next_case(session, user=other, now=clock.now()).study is stranger


def test_next_case_records_each_study_handed_out_as_every_assignment_is_recorded(
    session, clock, region
):
    """On PostgreSQL the claim statement writes the assignment and audit rows itself (in
    SQL); they are the rows `record_assignments` writes on SQLite and for every other
    kind of assignment."""
    rw6, _ = region
    reader = radiologist(session, clock, credentials=("CT",))
    patient = make_patient(session, trust=rw6, now=clock.now())
    chest = ready(session, clock, rw6, patient=patient, body_area="CHEST", order_priority="A")
    abdomen = ready(session, clock, rw6, patient=patient, body_area="ABDOMEN")
    result = wl.next_case(session, user=reader, now=clock.now(), remote_addr="10.1.2.3")
    assert result.study is chest and result.together == [abdomen]
    session.expire_all()
    rows = {a.study_id: a for a in session.scalars(sa.select(Assignment))}
    assert result.assignment.id == rows[chest.id].id
    assert result.assignment.explanation == rows[chest.id].explanation
    for study, why, extra in (
        (chest, "the most urgent waiting study you may report", {"skipped": []}),
        (abdomen, f"same patient as {chest.accession_number}, kept with one reader",
         {"with_study_id": chest.id}),
    ):  # fmt: skip
        row = rows[study.id]
        assert (row.user_id, row.kind, row.assigned_by_id, row.started_at, row.expires_at) == (
            reader.id,
            "pull",
            None,
            clock.now(),
            clock.now() + wl.DEFAULT_LEASE,
        )
        priority = row.explanation["priority"]
        assert datetime.fromisoformat(priority.pop("due_at")) == study.due_at
        assert row.explanation == {
            "why": why, **extra,
            "priority": {
                "accession_number": study.accession_number,
                "tier": tier_from_urgency(study.urgency), "class": study.priority_class,
                "explanation": described(study.priority_explanation),
            },
        }  # fmt: skip
    events = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "claim").order_by(AuditEvent.id)
    ).all()
    assert [
        (e.at, e.user_id, e.username, e.object_type, e.object_id, e.detail, e.remote_addr)
        for e in events
    ] == [
        (clock.now(), reader.id, reader.username, "study", str(s.id),
         {"kind": "pull", "to": reader.username, "accession_number": s.accession_number,
          "why": rows[s.id].explanation["why"]}, "10.1.2.3")
        for s in (chest, abdomen)
    ]  # fmt: skip


def test_a_patients_study_the_reader_may_not_report_or_another_holds_is_not_bundled(
    session, clock, region
):
    rw6, _ = region
    reader = radiologist(session, clock, credentials=("CT",))
    other = radiologist(session, clock, credentials=("CT", "MR"))
    patient = make_patient(session, trust=rw6, now=clock.now())
    chest = ready(session, clock, rw6, patient=patient, body_area="CHEST", order_priority="A")
    brain_mr = ready(session, clock, rw6, patient=patient, modality="MR", body_area="HEAD")
    held = ready(session, clock, rw6, patient=patient, body_area="ABDOMEN")
    assert wl.conditional_claim(
        session, study=held, user_id=other.id, now=clock.now(), lease=wl.DEFAULT_LEASE
    )
    result = wl.next_case(session, user=reader, now=clock.now())
    assert result.study is chest and result.together == []
    assert brain_mr.claimed_by_id is None and held.claimed_by_id == other.id
    assert wl.next_case(session, user=other, now=clock.now()).study is brain_mr


def test_a_patients_study_over_the_sessions_cap_or_double_read_is_given_back_not_bundled(
    session, clock, region
):
    """Claimed with the first study in one statement, then refused by the rules: the
    study goes back to the pool untouched, with no assignment."""
    rw6, _ = region
    reader = make_user(session, now=clock.now(), trusts=("RW6",), credentials=("CT", "MG"))
    session.add(DutySession(user_id=reader.id, starts_at=clock.now(), capacity=1.0,
                            ends_at=clock.now() + timedelta(hours=4)))  # fmt: skip
    other = radiologist(session, clock, credentials=("CT", "MG"))
    patient = make_patient(session, trust=rw6, now=clock.now())
    chest = ready(session, clock, rw6, patient=patient, body_area="CHEST", order_priority="A")
    abdomen = ready(session, clock, rw6, patient=patient, body_area="ABDOMEN")
    screening = ready(session, clock, rw6, patient=patient, modality="MG", body_area="BREAST",
                      pathway="breast_screening")  # fmt: skip
    result = wl.next_case(session, user=reader, now=clock.now())
    assert result.study is chest and result.together == []
    assert (abdomen.claimed_by_id, screening.claimed_by_id) == (None, None)
    session.expire_all()
    assert session.get(Study, abdomen.id).claimed_by_id is None
    assert wl.assignment_history(session, study_id=abdomen.id) == []
    claims = session.scalars(sa.select(AuditEvent.object_id).where(AuditEvent.action == "claim"))
    assert list(claims) == [str(chest.id)]
    taken = {wl.next_case(session, user=other, now=clock.now()).study for _ in range(2)}
    assert taken == {session.get(Study, abdomen.id), session.get(Study, screening.id)}


def test_the_same_persons_study_at_another_trust_stays_with_one_reader_too(session, clock, region):
    rw6, rm3 = region
    reader = radiologist(session, clock, trusts=("RW6", "RM3"), credentials=("CT",))
    here = make_patient(session, trust=rw6, now=clock.now(), nhs_number="9434765919")
    there = make_patient(session, trust=rm3, now=clock.now(), nhs_number="9434765919")
    alone = make_patient(session, trust=rw6, now=clock.now())
    chest = ready(session, clock, rw6, patient=here, body_area="CHEST", order_priority="A")
    abdomen = ready(session, clock, rm3, patient=there, body_area="ABDOMEN")
    single = ready(session, clock, rw6, patient=alone, body_area="HEAD", order_priority="A")
    first = wl.next_case(session, user=reader, now=clock.now())
    second = wl.next_case(session, user=reader, now=clock.now())
    by_study = {first.study: first.together, second.study: second.together}
    assert by_study == {chest: [abdomen], single: []}


def test_priors_come_from_every_trust_by_valid_nhs_number_newest_first_with_reports(
    session, clock, region
):
    rw6, rm3 = region
    reader = radiologist(session, clock, credentials=("CT",))
    here = make_patient(session, trust=rw6, now=clock.now(), nhs_number="943 476 5919")
    there = make_patient(session, trust=rm3, now=clock.now(), nhs_number="9434765919")
    namesake = make_patient(session, trust=rm3, now=clock.now(), nhs_number="9434765918")  # invalid
    current = ready(session, clock, rw6, patient=here, body_area="CHEST")
    old_ct = make_study(session, trust=rm3, now=clock.now(), patient=there, status="final",
                        body_area="CHEST", performed_ago=timedelta(days=400))  # fmt: skip
    recent_xr = make_study(
        session, trust=rw6, now=clock.now(), patient=here, status="final",
        modality="XR", body_area="CHEST", performed_ago=timedelta(days=30),
    )  # fmt: skip
    make_study(session, trust=rm3, now=clock.now(), patient=namesake, status="final",
               performed_ago=timedelta(days=10))  # fmt: skip
    make_study(session, trust=rw6, now=clock.now(), patient=here, status="ready",
               performed_ago=timedelta(minutes=5))  # later than the current study  # fmt: skip
    report = Report(study_id=old_ct.id, status="final")
    report.versions = [ReportVersion(study_id=old_ct.id, sequence=1, kind="final",
                                     text="No nodule.", author_id=reader.id,
                                     signed_at=clock.now())]  # fmt: skip
    session.add(report)
    session.flush()
    found = priors_service.priors(session, study_id=current.id, user=reader, now=clock.now())
    assert [p.study for p in found] == [recent_xr, old_ct]
    assert [p.trust_code for p in found] == ["RW6", "RM3"]
    assert [p.relevant for p in found] == [False, True]
    assert found[1].report_text == "No nodule." and found[0].report_text is None
    assert session.scalar(sa.select(sa.func.count()).where(AuditEvent.action == "view_priors")) == 1


def test_auto_assignment_balances_effort_over_a_simulated_day_and_serves_every_trust(
    session, clock, runtime
):
    rng = random.Random(4)
    now = clock.now()
    codes = ["RW6", "RM3", "RBV", "R0A", "RRF", "RMC", "RVY", "RT2"]
    trusts = [make_trust(session, now=now, code=c) for c in codes]
    readers = [
        make_user(session, now=now, trusts=tuple(codes), credentials=("CT", "MR", "XR"))
        for _ in range(4)
    ]
    for r in readers:
        session.add(DutySession(user_id=r.id, starts_at=now, ends_at=now + timedelta(hours=10),
                                capacity=4.0))  # fmt: skip
    session.flush()
    # A busy trust sends half the work; the quiet ones the rest.
    weights = [8, 1, 1, 1, 1, 1, 1, 1]
    waited: dict[str, list[float]] = {c: [] for c in codes}
    for _tick in range(48):  # every 10 minutes for 8 hours
        now = clock.advance(timedelta(minutes=10))
        for _ in range(rng.randint(4, 8)):
            trust = rng.choices(trusts, weights)[0]
            ready(session, clock, trust, modality=rng.choice(["CT", "MR", "XR"]),
                  order_priority=rng.choice(["R", "R", "R", "A", "S"]),
                  performed_ago=timedelta(minutes=rng.randint(1, 60)))  # fmt: skip
        auto_assignment.auto_assign(session, now=now)
        for reader in readers:  # each reports what they hold, up to 3 effort units a tick
            done = 0.0
            for study in session.scalars(
                sa.select(Study).where(Study.claimed_by_id == reader.id).order_by(Study.id)
            ):
                if done + study.effort > 3.0:
                    break
                done += study.effort
                wl.end_claim(session, study=study, now=now, end_reason="signed")
                study.status = "final"
                waited[
                    codes[trusts.index(next(t for t in trusts if t.id == study.trust_id))]
                ].append((now - study.ready_at).total_seconds() / 3600)
        session.flush()
    given = {
        r.username: session.scalar(
            sa.select(sa.func.sum(Study.effort))
            .join(Assignment, Assignment.study_id == Study.id)
            .where(Assignment.user_id == r.id)
        )
        for r in readers
    }
    mean = sum(given.values()) / len(given)
    assert all(abs(v - mean) / mean < 0.15 for v in given.values()), given
    assert all(waited[c] for c in codes), "a trust was starved"
    every = [w for c in codes for w in waited[c]]
    assert max(every) < 10  # nothing waits the day out
    pushed = session.scalars(sa.select(Assignment).where(Assignment.kind == "push")).first()
    assert pushed.explanation["why"].startswith("auto-assigned: tier")


def test_auto_assignment_counts_what_an_uncapped_session_already_holds(session, clock, region):
    """A rota row without a cap is pushed to up to the default capacity, counting the
    studies its reader already holds (pulled before, say), not only what it pushes now."""
    rw6, _ = region
    busy = radiologist(session, clock, credentials=("CT",))  # on duty, no cap
    free = radiologist(session, clock, credentials=("CT",))
    held = [ready(session, clock, rw6, performed_ago=timedelta(hours=2)) for _ in range(5)]
    for study in held:
        assert wl.conditional_claim(
            session, study=study, user_id=busy.id, now=clock.now(), lease=wl.DEFAULT_LEASE
        )
    assert sum(s.effort for s in held) >= auto_assignment.DEFAULT_PUSH_CAPACITY
    waiting = [ready(session, clock, rw6) for _ in range(3)]
    made = auto_assignment.auto_assign(session, now=clock.now())
    assert {a.study_id for a in made} == {s.id for s in waiting}
    assert {a.user_id for a in made} == {free.id}


def test_a_priority_tier_is_recoverable_from_the_stored_urgency(session, clock, region):
    rw6, _ = region
    stat = ready(session, clock, rw6, order_priority="S")
    routine = ready(session, clock, rw6)
    assert tier_from_urgency(stat.urgency) == 1 and tier_from_urgency(routine.urgency) == 3


def test_agreements_end_on_the_date_given(session, clock, region):
    rw6, _ = region
    reader = radiologist(session, clock)
    reader.permissions[0].ends_on = date(2026, 11, 22)
    session.flush()
    study = ready(session, clock, rw6)
    verdict = wl.eligibility_for(session, study=study, user=reader, now=clock.now())
    assert verdict.explain() == "reporting agreement for RW6 ended on 2026-11-22"


def test_which_trusts_a_radiologist_sees_turns_at_london_midnight_everywhere(session, region):
    """00:30 in London (BST) is still the day before in UTC: an agreement that ended
    "yesterday" in London hides that trust from lists and from single studies alike."""
    rw6, _ = region
    london_half_past_midnight = datetime(2026, 6, 30, 23, 30, tzinfo=UTC)
    reader = make_user(session, now=london_half_past_midnight, trusts=("RW6",))
    reader.permissions[0].ends_on = date(2026, 6, 30)
    session.flush()
    now = london_half_past_midnight
    assert accounts.visible_trust_ids(session, user=reader, on=now) == set()
    assert not wl.may_see_trust(session, user=reader, trust_id=rw6.id, now=now)
    earlier = now - timedelta(hours=1)  # 23:30 in London, the agreement's last day
    assert accounts.visible_trust_ids(session, user=reader, on=earlier) == {rw6.id}
    assert wl.may_see_trust(session, user=reader, trust_id=rw6.id, now=earlier)


def test_reprioritising_named_studies_touches_only_those(session, clock, region):
    rw6, _ = region
    first = make_study(session, trust=rw6, now=clock.now(), order_priority="S")
    second = make_study(session, trust=rw6, now=clock.now())
    assert wl.reprioritise(session, now=clock.now(), study_ids=[first.id]) == 1
    assert first.priority_class == "stat" and second.priority_class is None


def test_a_region_changes_its_rules_with_a_json_file_not_a_code_change(
    session, clock, region, tmp_path
):
    rw6, rm3 = region
    document = json.loads(json.dumps(DEFAULT_RULES))
    document["trusts"] = {"RM3": {"classes": {"outpatient_routine": {"target": "P7D"}}}}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(document))
    rules = wl.rules_for(SimpleNamespace(priority_rules_path=str(path)))
    here = make_study(session, trust=rm3, now=clock.now())
    there = make_study(session, trust=rw6, now=clock.now())
    wl.reprioritise(session, now=clock.now(), rules=rules)
    assert here.due_at == here.performed_at + timedelta(days=7)
    assert there.due_at == there.performed_at + timedelta(days=14)
    document["trusts"] = {"RM3": {"classes": {"outpatient_routine": {"target": "tomorrow"}}}}
    path.write_text(json.dumps(document))
    os.utime(path, (1, 1))  # a different modification time: the file is read again
    with pytest.raises(PriorityRulesError, match="trusts.RM3.classes.outpatient_routine.target"):
        wl.rules_for(SimpleNamespace(priority_rules_path=str(path)))


def test_the_scheduler_job_raises_a_waiting_study_as_it_ages(runtime, clock):
    with runtime.session() as s:
        trust = make_trust(s, now=clock.now(), code="RW6")
        old = make_study(s, trust=trust, now=clock.now(),
                         performed_ago=timedelta(days=20, hours=23)).id  # fmt: skip
    wl.reprioritise_job(runtime)
    with runtime.session() as s:
        before = s.get(Study, old).urgency
        assert tier_from_urgency(before) == 3
    clock.advance(timedelta(hours=2))
    wl.reprioritise_job(runtime)
    with runtime.session() as s:
        study = s.get(Study, old)
        assert tier_from_urgency(study.urgency) == 2 and study.urgency > before
        assert study.priority_explanation["ageing"] == (
            "raised from tier 3 to 2 after waiting 21 days"
        )


def test_a_childs_study_goes_to_a_radiologist_with_a_paediatric_credential(session, clock, region):
    rw6, _ = region
    now = clock.now()
    child = make_patient(session, trust=rw6, now=now, birth_date=date(2019, 6, 1))
    head_ct = ready(session, clock, rw6, patient=child, modality="CT", body_area="HEAD")
    assert head_ct.paediatric
    assert head_ct.priority_explanation["paediatric"] is True
    neuro = radiologist(session, clock, credentials=("CT:NEURO",))
    paeds = radiologist(session, clock, credentials=("CT:PAED",))
    refused = wl.next_case(session, user=neuro, now=now)
    assert refused.study is None
    assert wl.next_case(session, user=paeds, now=now).study is head_ct
