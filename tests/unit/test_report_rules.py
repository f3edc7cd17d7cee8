"""The report lifecycle rules (worklist/domain/reports.py): who may sign what, and what it means."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worklist.domain.reports import (
    ReportTemplate,
    Signer,
    StudyFacts,
    VersionKind,
    choose_template,
    expand_macros,
    fill_placeholders,
    may_edit_draft,
    may_sign,
    releases_claim,
    result_status,
    split_impression,
    study_status_after,
    template_values,
    unfilled_placeholders,
)

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=20)

consultant = Signer(user_id=1, role="radiologist", can_finalise=True)
trainee = Signer(user_id=2, role="radiologist", can_finalise=False)
manager = Signer(user_id=3, role="manager", can_finalise=True)
admin = Signer(user_id=4, role="admin", can_finalise=True)


def claimed_by(user_id: int | None, status: str = "ready", **kw: object) -> StudyFacts:
    return StudyFacts(status=status, claimed_by_id=user_id, claim_expires_at=LATER, **kw)


def test_each_kind_of_signed_version_has_its_result_status() -> None:
    assert [result_status(k) for k in VersionKind] == ["P", "F", "C"]
    assert result_status("addendum") == "C"


def test_the_claim_holder_with_the_right_to_finalise_may_sign_final() -> None:
    assert may_sign("final", consultant, claimed_by(1), [], "Normal.", NOW)


def test_a_radiologist_without_the_claim_may_not_sign() -> None:
    d = may_sign("preliminary", consultant, claimed_by(2), [], "Normal.", NOW)
    assert not d and d.kind == "forbidden" and "claim" in d.reason
    assert not may_sign("preliminary", consultant, claimed_by(None), [], "Normal.", NOW)


def test_an_expired_claim_counts_as_no_claim() -> None:
    study = StudyFacts(status="ready", claimed_by_id=1, claim_expires_at=NOW - timedelta(seconds=1))
    assert not may_sign("final", consultant, study, [], "Normal.", NOW)


def test_a_manager_may_sign_without_the_claim() -> None:
    assert may_sign("final", manager, claimed_by(2), [], "Normal.", NOW)


def test_a_trainee_may_sign_preliminary_but_not_final() -> None:
    assert may_sign("preliminary", trainee, claimed_by(2), [], "Normal.", NOW)
    d = may_sign("final", trainee, claimed_by(2), [], "Normal.", NOW)
    assert not d and d.kind == "forbidden" and "preliminary" in d.reason


def test_a_final_can_verify_a_preliminary() -> None:
    study = claimed_by(1, status="preliminary")
    assert may_sign("final", consultant, study, ["preliminary"], "Normal.", NOW)


def test_admins_and_integration_accounts_cannot_sign() -> None:
    assert may_sign("final", admin, claimed_by(4), [], "x", NOW).kind == "forbidden"
    bot = Signer(user_id=5, role="integration", can_finalise=True)
    assert may_sign("final", bot, claimed_by(5), [], "x", NOW).kind == "forbidden"


def test_signing_a_study_the_ris_cancelled_is_refused_with_the_ris_reason() -> None:
    study = claimed_by(1, status="cancelled", status_reason="patient did not attend")
    d = may_sign("final", consultant, study, [], "Normal.", NOW)
    assert not d and d.kind == "conflict"
    assert "cancelled" in d.reason and "patient did not attend" in d.reason
    assert not may_sign("final", manager, claimed_by(1, status="discontinued"), [], "x", NOW)


def test_an_empty_report_cannot_be_signed() -> None:
    assert may_sign("final", consultant, claimed_by(1), [], "  \n ", NOW).kind == "invalid"


def test_a_final_report_takes_addenda_not_another_final() -> None:
    study = claimed_by(None, status="final")
    assert may_sign("final", consultant, study, ["final"], "x", NOW).kind == "conflict"
    assert may_sign("preliminary", consultant, study, ["final"], "x", NOW).kind == "conflict"
    assert may_sign("addendum", consultant, study, ["final"], "Also: rib fracture.", NOW)


def test_an_addendum_needs_a_final_report_first() -> None:
    d = may_sign("addendum", consultant, claimed_by(1), ["preliminary"], "x", NOW)
    assert not d and "final" in d.reason


def test_a_study_not_yet_complete_cannot_be_reported() -> None:
    assert may_sign("final", consultant, claimed_by(1, status="scheduled"), [], "x", NOW).kind == (
        "conflict"
    )


def test_signing_moves_the_study_and_releases_the_claim_except_for_addenda() -> None:
    assert study_status_after("preliminary") == "preliminary"
    assert study_status_after("final") == "final"
    assert study_status_after("addendum") == "final"
    assert releases_claim("final") and releases_claim("preliminary")
    assert not releases_claim("addendum")


def test_only_the_claim_holder_or_a_manager_writes_the_draft() -> None:
    assert may_edit_draft(consultant, claimed_by(1), NOW)
    assert may_edit_draft(manager, claimed_by(1), NOW)
    assert not may_edit_draft(trainee, claimed_by(1), NOW)
    assert not may_edit_draft(consultant, claimed_by(1, status="final"), NOW)
    assert may_edit_draft(consultant, claimed_by(1, status="cancelled"), NOW).kind == "conflict"


def test_the_impression_is_split_at_its_last_heading() -> None:
    body, imp = split_impression("Findings: normal.\nImpression: no fracture.\nFollow up.")
    assert body == "Findings: normal."
    assert imp == "no fracture.\nFollow up."
    assert split_impression("CONCLUSION\nAll well") == ("", "All well")
    assert split_impression("No heading here.") == ("No heading here.", "")


TEMPLATES = [
    ReportTemplate("generic", "Findings:\n\nImpression:\n"),
    ReportTemplate("ct", "CT {{procedure}} for {{clinical_details}}", modality="CT"),
    ReportTemplate(
        "ct head", "CT head. {{clinical_details}}", procedure_code="CHEAD", modality="CT"
    ),
    ReportTemplate(
        "ct head rw6", "RW6 CT head.", procedure_code="CHEAD", trust_code="RW6", modality="CT"
    ),
]


def test_the_most_specific_template_is_chosen() -> None:
    def pick(code: str | None, modality: str | None, trust: str | None = None) -> str | None:
        t = choose_template(TEMPLATES, procedure_code=code, modality=modality, trust_code=trust)
        return t.name if t else None

    assert pick("CHEAD", "CT") == "ct head"
    assert pick("CHEAD", "CT", "RW6") == "ct head rw6"
    assert pick("CCAPC", "ct") == "ct"
    assert pick("XCHES", "CR") == "generic"
    assert choose_template([], procedure_code="X", modality="CT") is None


def test_placeholders_are_filled_and_missing_ones_stay_visible() -> None:
    values = template_values(
        procedure_name="CT Head", clinical_details="Fall", exam_time=NOW, patient_name=""
    )
    filled = fill_placeholders(
        "{{procedure}} on {{exam_date}} for {{ clinical_details }}; {{patient_name}} {{nonsense}}",
        values,
    )
    assert filled.text.startswith("CT Head on 01/07/2026 for Fall; ")
    assert filled.unfilled == ("patient_name", "nonsense")
    assert unfilled_placeholders(filled.text) == ["patient_name", "nonsense"]


def test_personal_macros_expand_only_known_names() -> None:
    macros = {"normcxr": "The heart and lungs are normal.", "G": "never"}
    text = expand_macros(".NormCXR No change e.g. 0.5 cm .unknown", macros)
    assert text == "The heart and lungs are normal. No change e.g. 0.5 cm .unknown"


def test_the_exam_date_placeholder_is_the_date_in_england_not_in_utc() -> None:
    late = datetime(2026, 7, 1, 23, 30, tzinfo=UTC)  # 00:30 BST on 2 July
    assert template_values(exam_time=late)["exam_date"] == "02/07/2026"
