"""Priority classes, due times, ageing and explanations, with a fixed clock."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest

from worklist.domain.priority import (
    DESCRIBED_KEYS,
    OrderFacts,
    PriorityRulesError,
    default_rules,
    describe,
    described,
    effort_for,
    load_rules,
    parse_duration,
    parse_rules_json,
    prioritise,
)
from worklist.domain.priority_rules import DEFAULT_RULES

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
RULES = default_rules()


def facts(**kw) -> OrderFacts:
    kw.setdefault("trust_code", "RW6")
    kw.setdefault("modality", "MR")
    kw.setdefault("patient_class", "O")
    kw.setdefault("order_priority", "R")
    return OrderFacts(**kw)


def rank(*studies: OrderFacts, now: datetime = NOW) -> list[int]:
    """Indexes of `studies` in worklist order (most urgent first)."""
    scores = [prioritise(s, RULES, now).urgency for s in studies]
    return sorted(range(len(studies)), key=lambda i: -scores[i])


def test_an_ed_head_ct_is_stat_with_a_one_hour_target_from_the_scan():
    scan = NOW - timedelta(minutes=20)
    p = prioritise(
        facts(patient_class="E", modality="CT", body_area="Head", performed_at=scan,
              ready_at=scan + timedelta(minutes=5)),
        RULES, NOW,
    )  # fmt: skip
    assert (p.class_code, p.tier, p.rule_name) == ("stat", 1, "ED head CT")
    assert p.clock_start_field == "performed_at"
    assert p.due_at == scan + timedelta(hours=1)
    assert "NICE QS74" in p.rule_source


def test_a_stat_ed_head_ct_outranks_every_routine_study_at_once():
    head_ct = facts(patient_class="E", modality="CT", body_area="head", performed_at=NOW)
    routine = [
        facts(performed_at=NOW - timedelta(days=days), modality=m)
        for days in (0, 1, 7, 13, 15, 20, 22, 27, 30)
        for m in ("MR", "CT", "XR")
    ]
    routine += [
        facts(patient_class="I", performed_at=NOW - timedelta(days=5)),
        facts(pathway="screening", modality="MG", performed_at=NOW - timedelta(days=26)),
        facts(pathway="gp", modality="US", performed_at=NOW - timedelta(days=25)),
    ]
    head = prioritise(head_ct, RULES, NOW)
    assert all(head.urgency > prioritise(r, RULES, NOW).urgency for r in routine)


def test_a_stat_order_goes_to_the_top_tier_whatever_the_patient_class():
    p = prioritise(facts(order_priority="S", patient_class="O"), RULES, NOW)
    assert (p.class_code, p.tier, p.rule_name) == ("stat", 1, "Stat order")


def test_a_routine_study_that_has_waited_longer_ranks_above_a_newer_routine_one():
    older = facts(performed_at=NOW - timedelta(days=3))
    newer = facts(performed_at=NOW - timedelta(hours=2))
    assert rank(newer, older) == [1, 0]


def test_a_routine_study_overtakes_a_newer_routine_study_of_a_laxer_class_as_it_waits():
    # GP direct access (7-day target) done today is due before an outpatient
    # routine study (14 days) done 2 days ago...
    gp_new = facts(pathway="gp_direct_access", performed_at=NOW)
    outpatient_old = facts(performed_at=NOW - timedelta(days=2))
    assert rank(outpatient_old, gp_new) == [1, 0]
    # ...but one done 8 days ago is closer to breach and overtakes it.
    outpatient_older = facts(performed_at=NOW - timedelta(days=8))
    assert rank(gp_new, outpatient_older) == [1, 0]


def test_ageing_lifts_an_old_routine_study_over_a_fresh_urgent_one_only_after_21_days():
    fresh_urgent = facts(patient_class="I", order_priority="A", performed_at=NOW)
    assert prioritise(fresh_urgent, RULES, NOW).class_code == "inpatient_urgent"

    twenty_days = facts(performed_at=NOW - timedelta(days=20, hours=23))
    assert rank(twenty_days, fresh_urgent) == [1, 0]
    assert prioritise(twenty_days, RULES, NOW).tier == 3

    twenty_one_days = facts(performed_at=NOW - timedelta(days=21))
    aged = prioritise(twenty_one_days, RULES, NOW)
    assert aged.tier == 2 and aged.base_tier == 3
    assert aged.ageing_reason == "raised from tier 3 to 2 after waiting 21 days"
    assert rank(fresh_urgent, twenty_one_days) == [1, 0]


def test_ageing_never_lifts_routine_work_above_the_stat_tier():
    ancient = prioritise(facts(performed_at=NOW - timedelta(days=60)), RULES, NOW)
    assert ancient.tier == 2


def test_the_review_time_is_when_the_next_ageing_step_will_change_the_tier():
    done = NOW - timedelta(days=2)
    p = prioritise(facts(performed_at=done), RULES, NOW)
    assert p.review_at == done + timedelta(days=21)
    later = prioritise(facts(performed_at=done), RULES, p.review_at)
    assert later.tier == 2 and later.review_at is None
    assert later.urgency > p.urgency


def test_the_score_does_not_change_as_time_passes_until_an_ageing_step():
    study = facts(performed_at=NOW - timedelta(days=1))
    first = prioritise(study, RULES, NOW).urgency
    assert prioritise(study, RULES, NOW + timedelta(days=5)).urgency == first


def test_every_study_is_due_by_the_national_28_day_maximum():
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["trusts"] = {"RM3": {"rules": [{"name": "Slow", "when": {}, "class": "outpatient_routine",
                                        "target": "P40D"}]}}  # fmt: skip
    rules = load_rules(doc)
    done = NOW - timedelta(days=1)
    p = prioritise(facts(trust_code="RM3", performed_at=done), rules, NOW)
    assert p.due_at == done + timedelta(days=28)
    assert p.due_reason == "outer_bound"
    assert "national 28-day maximum" in describe(p, NOW)


def test_a_suspected_cancer_study_is_due_by_the_faster_diagnosis_clock_from_referral():
    referral = NOW - timedelta(days=20)
    done = NOW - timedelta(hours=6)
    p = prioritise(facts(pathway="2WW", referral_at=referral, performed_at=done), RULES, NOW)
    assert p.class_code == "suspected_cancer"
    # 3 days from the scan would be later than referral + 21 days (a week left
    # for the clinic), so the pathway clock sets the due time.
    assert p.due_at == referral + timedelta(days=21)
    assert p.due_reason == "pathway"
    assert p.pathway_ends_at == referral + timedelta(days=28)
    text = describe(p, NOW)
    assert "Faster Diagnosis Standard: 8 days left of the pathway clock" in text


def test_a_suspected_cancer_study_without_a_referral_date_uses_its_own_target():
    done = NOW - timedelta(hours=6)
    p = prioritise(facts(pathway="suspected_cancer", performed_at=done), RULES, NOW)
    assert p.due_at == done + timedelta(days=3) and p.pathway_name is None


def test_the_clock_starts_at_images_available_when_there_is_no_scan_time():
    images = NOW - timedelta(hours=1)
    p = prioritise(facts(images_available_at=images, ready_at=NOW), RULES, NOW)
    assert p.clock_start == images and p.clock_start_field == "images_available_at"


def test_inpatient_and_outpatient_urgent_and_screening_map_to_their_classes():
    assert prioritise(facts(patient_class="I"), RULES, NOW).class_code == "inpatient"
    assert prioritise(facts(order_priority="A"), RULES, NOW).class_code == "outpatient_urgent"
    assert prioritise(facts(pathway="Screening"), RULES, NOW).class_code == "screening"
    assert prioritise(facts(patient_class="E", modality="XR"), RULES, NOW).target == timedelta(
        hours=4
    )


def test_a_trust_can_add_its_own_rules_and_targets_without_code_changes():
    doc = json.loads(json.dumps(DEFAULT_RULES))
    doc["trusts"] = {
        "RBV": {
            "classes": {"inpatient": {"target": "PT12H"}},
            "rules": [
                {
                    "name": "Christie oncology follow-up",
                    "when": {"procedure_code": ["CTCAP"]},
                    "class": "outpatient_urgent",
                }
            ],  # fmt: skip
        }
    }
    rules = parse_rules_json(json.dumps(doc))
    done = NOW - timedelta(hours=1)
    here = prioritise(facts(trust_code="RBV", patient_class="I", performed_at=done), rules, NOW)
    elsewhere = prioritise(
        facts(trust_code="RW6", patient_class="I", performed_at=done), rules, NOW
    )
    assert here.due_at == done + timedelta(hours=12)
    assert elsewhere.due_at == done + timedelta(hours=24)
    onc = prioritise(facts(trust_code="rbv", procedure_code="ctcap"), rules, NOW)
    assert onc.rule_name == "Christie oncology follow-up"
    assert prioritise(facts(trust_code="RW6", procedure_code="CTCAP"), rules, NOW).class_code == (
        "outpatient_routine"
    )


def test_invalid_rules_are_refused_with_every_problem_and_its_path():
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["classes"]["stat"]["target"] = "one hour"
    doc["classes"]["outpatient_routine"]["ageing"] = []
    doc["rules"][0]["class"] = "nonsense"
    doc["rules"][1]["when"] = {"colour": ["red"]}
    with pytest.raises(PriorityRulesError) as raised:
        load_rules(doc)
    problems = "\n".join(raised.value.problems)
    assert "classes.stat.target: 'one hour' is not an ISO 8601 duration" in problems
    assert "classes.outpatient_routine.ageing: must reach tier 2" in problems
    assert "rules[0].class: 'nonsense' is not one of" in problems
    assert "rules[1].when.colour: unknown attribute" in problems


def test_an_ageing_step_above_the_ceiling_is_refused():
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["classes"]["screening"]["ageing"] = [{"after": "P1D", "tier": 1}]
    with pytest.raises(PriorityRulesError, match=r"screening.ageing\[0\].tier"):
        load_rules(doc)


def test_rules_that_are_not_json_are_refused_clearly():
    with pytest.raises(PriorityRulesError, match="not valid JSON"):
        parse_rules_json("{nope")


def test_durations_parse_as_iso_8601():
    assert parse_duration("PT1H") == timedelta(hours=1)
    assert parse_duration("P1DT12H") == timedelta(days=1, hours=12)
    assert parse_duration("P2W") == timedelta(days=14)
    for bad in ("P", "PT", "1h", "P1DT"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_explanation_names_the_rule_target_due_time_and_time_left():
    scan = NOW - timedelta(minutes=20)
    p = prioritise(facts(patient_class="E", modality="CT", body_area="head", performed_at=scan),
                   RULES, NOW)  # fmt: skip
    stored = json.loads(json.dumps(p.explanation()))
    text = describe(stored, NOW)
    assert text == (
        "Stat / emergency department (tier 1): rule 'ED head CT'; target 1 hour from the "
        "examination; due 10:40 (40 min left)"
    )
    assert "breached 20 min ago" in describe(stored, NOW + timedelta(hours=1))


def test_effort_comes_from_the_procedure_then_the_modality_then_the_default():
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["effort"]["procedure_code"] = {"MRPROS": 3.5}
    rules = load_rules(doc)
    assert effort_for(facts(modality="MR", procedure_code="MRPROS"), rules) == 3.5
    assert effort_for(facts(modality="XR"), rules) == 0.3
    assert effort_for(facts(modality="ZZ"), rules) == 1.0


def test_the_tier_is_recoverable_from_the_urgency_score_and_floors_separate_tiers():
    from worklist.domain.priority import tier_from_urgency, urgency_floor, urgency_score

    for tier in (1, 2, 3, 9):
        score = urgency_score(tier, NOW + timedelta(days=300))
        assert tier_from_urgency(score) == tier
        assert score > urgency_floor(tier)
        assert tier == 1 or score <= urgency_floor(tier - 1)
    assert tier_from_urgency(0.0) == 9


def test_the_stored_explanation_carries_a_summary_for_the_worklist_page():
    scan = NOW - timedelta(minutes=20)
    p = prioritise(facts(patient_class="E", modality="CT", body_area="head", performed_at=scan),
                   RULES, NOW)  # fmt: skip
    assert p.explanation()["summary"] == (
        "Stat / emergency department (tier 1): rule 'ED head CT'; target 1 hour from the "
        "examination; due 23 Nov 10:40"
    )


def test_a_timing_critical_order_is_critical_whatever_its_tier_and_says_so():
    timed = prioritise(facts(order_priority="T"), RULES, NOW)
    routine = prioritise(facts(), RULES, NOW)
    assert timed.critical == "Timing critical order" and timed.tier > 1
    assert routine.critical is None
    assert timed.explanation()["critical"] == "Timing critical order"
    assert "critical (Timing critical order)" in timed.summary()


def test_a_region_names_its_own_critical_work_and_bad_entries_are_refused():
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["critical"] = [{"name": "Suspected cord compression", "when": {"pathway": ["mscc"]}}]
    rules = load_rules(doc)
    assert prioritise(facts(pathway="MSCC"), rules, NOW).critical == "Suspected cord compression"
    assert prioritise(facts(order_priority="T"), rules, NOW).critical is None
    doc["critical"] = [{"name": "Everything", "when": {}}, {"when": {"colour": ["red"]}}]
    with pytest.raises(PriorityRulesError) as raised:
        load_rules(doc)
    problems = "\n".join(raised.value.problems)
    assert "critical[0].when: must name at least one attribute" in problems
    assert "critical[1].name: every critical rule needs a name" in problems
    assert "critical[1].when.colour: unknown attribute" in problems


def test_a_child_at_the_examination_makes_a_paediatric_study_by_the_rules_age():
    scanned = NOW - timedelta(hours=1)

    def born(years_before: int, days: int = 0) -> bool:
        birth = (scanned - timedelta(days=days)).date().replace(year=scanned.year - years_before)
        return prioritise(
            facts(performed_at=scanned, patient_birth_date=birth), RULES, NOW
        ).paediatric

    assert born(10) and born(16, days=-1)  # 16 tomorrow: still a child today
    assert not born(16) and not born(40)
    assert not prioritise(facts(performed_at=scanned), RULES, NOW).paediatric  # no birth date
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["paediatric_under_years"] = 18
    assert prioritise(
        facts(performed_at=scanned, patient_birth_date=scanned.date().replace(year=2010)),
        load_rules(doc), NOW,
    ).paediatric  # fmt: skip
    doc["paediatric_under_years"] = "sixteen"
    with pytest.raises(PriorityRulesError, match="paediatric_under_years: must be a whole"):
        load_rules(doc)


def test_what_an_assignment_keeps_of_an_explanation_describes_the_study_as_well():
    """An assignment keeps only the keys `describe` reads (a third of the explanation's
    size), and the line made from them is the one made from the whole explanation."""
    referral = NOW - timedelta(days=20)
    p = prioritise(facts(pathway="2WW", referral_at=referral, performed_at=NOW), RULES, NOW)
    stored = json.loads(json.dumps(p.explanation()))
    kept = described(stored)
    assert set(kept) <= set(DESCRIBED_KEYS) and "pathway" in kept and "summary" not in kept
    for at in (NOW, NOW + timedelta(days=9)):
        assert describe(kept, at) == describe(stored, at)
    assert len(json.dumps(kept)) < len(json.dumps(stored)) / 2
