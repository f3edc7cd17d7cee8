"""Eligibility: each rule refuses on its own, with its reason."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

from worklist.domain.eligibility import (
    DutySlot,
    HeldCredential,
    Radiologist,
    RefusalCode,
    ReportingAgreement,
    StudyToRead,
    agreements_expiring,
    may_report,
)

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
TRUST = 6
SESSION = DutySlot(NOW - timedelta(hours=2), NOW + timedelta(hours=2), capacity=10.0)


def radiologist(**kw) -> Radiologist:
    base = Radiologist(
        user_id=1,
        agreements=(ReportingAgreement(TRUST, date(2026, 1, 1), date(2027, 1, 1), "RW6"),),
        credentials=(HeldCredential("CT", "neuro"), HeldCredential("XR")),
        sessions=(SESSION,),
        session_load=2.0,
    )
    return replace(base, **kw)


def study(**kw) -> StudyToRead:
    base = StudyToRead(study_id=100, trust_id=TRUST, trust_code="RW6", modality="CT",
                       body_area="Head", tier=3, effort=1.5)  # fmt: skip
    return replace(base, **kw)


def test_an_eligible_radiologist_gets_yes_with_no_reasons():
    result = may_report(radiologist(), study(), NOW)
    assert result.allowed and bool(result) and result.reasons == ()
    assert result.session == SESSION


def test_no_agreement_for_the_trust_refuses_alone():
    result = may_report(radiologist(), study(trust_id=7, trust_code="RM3"), NOW)
    assert result.codes == {RefusalCode.NO_AGREEMENT}
    assert result.explain() == "no reporting agreement for RM3"


def test_an_agreement_that_ended_refuses_alone():
    ended = (ReportingAgreement(TRUST, date(2025, 1, 1), date(2026, 11, 22), "RW6"),)
    result = may_report(radiologist(agreements=ended), study(), NOW)
    assert result.codes == {RefusalCode.AGREEMENT_ENDED}
    assert "ended on 2026-11-22" in result.explain()


def test_an_agreement_that_has_not_started_refuses_alone():
    future = (ReportingAgreement(TRUST, date(2026, 12, 1), None, "RW6"),)
    result = may_report(radiologist(agreements=future), study(), NOW)
    assert result.codes == {RefusalCode.AGREEMENT_NOT_STARTED}
    assert "starts on 2026-12-01" in result.explain()


def test_the_agreement_end_date_is_inclusive_in_local_time():
    # 23:30 UTC on 31 May is 00:30 BST on 1 June: the agreement has ended.
    late = datetime(2026, 5, 31, 23, 30, tzinfo=UTC)
    agreement = (ReportingAgreement(TRUST, date(2026, 1, 1), date(2026, 5, 31), "RW6"),)
    session = (DutySlot(late - timedelta(hours=1), late + timedelta(hours=1)),)
    r = radiologist(agreements=agreement, sessions=session)
    assert may_report(r, study(), late).codes == {RefusalCode.AGREEMENT_ENDED}
    assert may_report(r, study(), late - timedelta(hours=1)).allowed


def test_no_credential_for_the_modality_refuses_alone():
    result = may_report(radiologist(), study(modality="MR"), NOW)
    assert result.codes == {RefusalCode.NO_CREDENTIAL}
    assert result.explain() == "no credential for MR Head"


def test_a_subspecialty_credential_covers_its_body_areas_only():
    assert may_report(radiologist(), study(body_area="spine"), NOW).allowed
    result = may_report(radiologist(), study(body_area="abdomen"), NOW)
    assert result.codes == {RefusalCode.NO_CREDENTIAL}


def test_a_paediatric_study_needs_a_paediatric_or_any_area_credential():
    child = study(modality="CT", body_area="head", subspecialty="paediatric")
    assert may_report(radiologist(), child, NOW).codes == {RefusalCode.NO_CREDENTIAL}
    xr_child = study(modality="XR", body_area="chest", subspecialty="paediatric")
    assert may_report(radiologist(), xr_child, NOW).allowed
    paeds = radiologist(credentials=(HeldCredential("CT", "paediatric"),))
    assert may_report(paeds, child, NOW).allowed
    # Entered as RIS code tables spell it; and it covers studies coded PAED by body area.
    paed = radiologist(credentials=(HeldCredential("CT", "PAED"),))
    assert may_report(paed, child, NOW).allowed
    assert may_report(paed, study(modality="CT", body_area="PAED"), NOW).allowed


def test_off_duty_refuses_alone():
    result = may_report(radiologist(), study(), SESSION.ends_at)
    assert result.codes == {RefusalCode.OFF_DUTY}


def test_over_session_capacity_refuses_alone():
    result = may_report(radiologist(session_load=10.0), study(), NOW)
    assert result.codes == {RefusalCode.OVER_CAPACITY}
    assert result.explain() == "session capacity reached (10 of 10)"


def test_stat_and_critical_work_bypasses_the_capacity_cap():
    full = radiologist(session_load=12.0)
    assert may_report(full, study(tier=1), NOW).allowed
    assert may_report(full, study(critical=True), NOW).allowed


def test_an_excluded_radiologist_is_refused_alone_with_the_exclusion_reason():
    double_read = study(exclusions={1: "already gave the first reading of this double read"})
    result = may_report(radiologist(), double_read, NOW)
    assert result.codes == {RefusalCode.EXCLUDED}
    assert "first reading" in result.explain()
    assert may_report(radiologist(user_id=2), double_read, NOW).allowed


def test_a_study_claimed_by_someone_else_refuses_alone_but_not_its_own_claimant():
    assert may_report(radiologist(), study(claimed_by_id=9), NOW).codes == {
        RefusalCode.CLAIMED_BY_OTHER
    }
    assert may_report(radiologist(), study(claimed_by_id=1), NOW).allowed


def test_an_inactive_account_is_refused():
    assert may_report(radiologist(active=False), study(), NOW).codes == {RefusalCode.INACTIVE}


def test_every_failing_rule_is_reported_not_only_the_first():
    nobody = radiologist(agreements=(), credentials=(), sessions=())
    result = may_report(nobody, study(claimed_by_id=9), NOW)
    assert result.codes == {
        RefusalCode.NO_AGREEMENT,
        RefusalCode.NO_CREDENTIAL,
        RefusalCode.OFF_DUTY,
        RefusalCode.CLAIMED_BY_OTHER,
    }


def test_agreements_expiring_soon_are_listed_soonest_first_for_manager_warnings():
    today = date(2026, 11, 23)
    a = ReportingAgreement(1, date(2026, 1, 1), date(2026, 12, 20), user_id=5)
    b = ReportingAgreement(2, date(2026, 1, 1), date(2026, 12, 1), user_id=5)
    c = ReportingAgreement(3, date(2026, 1, 1), date(2027, 6, 1), user_id=5)
    d = ReportingAgreement(4, date(2026, 1, 1), None, user_id=5)
    gone = ReportingAgreement(5, date(2025, 1, 1), date(2026, 11, 1), user_id=5)
    assert agreements_expiring([a, b, c, d, gone], today) == [b, a]
    assert agreements_expiring([a, b], today, within=timedelta(days=10)) == [b]
