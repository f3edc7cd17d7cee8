"""The default prioritisation rules: UK practice, written as data.

This is a plain JSON-shaped document, not code: a region or a trust replaces
or extends it with its own document (a versioned JSON file or a database row)
that `worklist.domain.priority.load_rules` validates. Nothing here is read
except through that loader, so a trust's change never needs a code change.

Shape
-----
* ``outer_bound``: the national maximum wait for a report. NHS England: no
  examination may wait more than 4 weeks (28 days) for its report, so every
  study's due time is at most ``clock start + outer_bound``.
* ``clock_start``: which study timestamps start the turnaround clock, first
  present wins. NHS England measures reporting turnaround from the
  examination, so the scan time comes first.
* ``classes``: priority classes. ``tier`` 1 is the most urgent; the worklist
  is ordered by (effective tier, time left to breach). ``target`` is an ISO
  8601 duration from the clock start. ``ageing`` steps raise the tier as a
  study waits (``after``: waited since the clock started, or ``overdue_by``:
  past its due time), so that nothing waits forever: every class must reach
  the ``ageing_ceiling`` tier before the outer bound, and no step goes above
  it (tier 1 stays reserved for immediate work). Routine work is lifted into
  the urgent tier only when the 28-day maximum is at stake, so a backlog of
  late routine studies never buries fresh urgent ones. ``pathway_clock`` adds a second clock that
  started at referral (the 28-day Faster Diagnosis Standard).
* ``rules``: first match wins. ``when`` lists accepted values per order
  attribute (case-insensitive; a missing key matches anything). A rule may
  override the class target (``target``) and cite its ``source``.
* ``effort``: relative reporting effort per modality / procedure code, used to
  balance workload when assigning.
* ``trusts``: per-trust overrides keyed by trust code (ODS code): ``classes``
  (partial, merged over the region's), ``rules`` (tried before the region's)
  and ``effort``.
"""

from __future__ import annotations

from typing import Any

DEFAULT_RULES: dict[str, Any] = {
    "version": 1,
    "name": "UK defaults (NHS England, RCR, NICE)",
    "outer_bound": "P28D",
    "clock_start": ["performed_at", "images_available_at", "ready_at", "requested_at"],
    "default_class": "outpatient_routine",
    # Ageing never lifts a study above this tier: tier 1 is kept for work that
    # is immediate by its nature (an ED head CT outranks every routine study).
    "ageing_ceiling": 2,
    "classes": {
        "stat": {
            "label": "Stat / emergency department",
            "tier": 1,
            "target": "PT1H",
            "ageing": [],
        },
        "inpatient_urgent": {
            "label": "Inpatient urgent",
            "tier": 2,
            "target": "PT4H",
            "ageing": [],
        },
        "suspected_cancer": {
            "label": "Suspected cancer (Faster Diagnosis Standard)",
            "tier": 2,
            "target": "P3D",
            # The 28-day Faster Diagnosis Standard runs from the urgent
            # referral; the report must be back with a week left so the
            # clinic can tell the patient (report_by) within the 28 days.
            "pathway_clock": {
                "name": "Faster Diagnosis Standard",
                "length": "P28D",
                "report_by": "P21D",
            },
            "ageing": [],
        },
        "outpatient_urgent": {
            "label": "Outpatient urgent",
            "tier": 2,
            "target": "P2D",
            "ageing": [],
        },
        "inpatient": {
            "label": "Inpatient",
            # RCR audit standard: inpatient imaging verified within one working day.
            "tier": 3,
            "target": "PT24H",
            "ageing": [{"overdue_by": "PT24H", "tier": 2}],
        },
        "gp_direct_access": {
            "label": "GP direct access",
            "tier": 3,
            "target": "P7D",
            "ageing": [{"after": "P21D", "tier": 2}],
        },
        "outpatient_routine": {
            "label": "Outpatient routine",
            "tier": 3,
            "target": "P14D",
            "ageing": [{"after": "P21D", "tier": 2}],
        },
        "screening": {
            "label": "Screening",
            "tier": 4,
            "target": "P14D",
            "ageing": [
                {"overdue_by": "PT0S", "tier": 3},
                {"after": "P21D", "tier": 2},
            ],
        },
    },
    # Under 16 at the examination: paediatric (RCR paediatric imaging: children's services
    # commonly to the 16th birthday; set 18 where the trust's children's service runs to 18).
    "paediatric_under_years": 16,
    # Critical work is given even to a radiologist whose session is full, as stat work is.
    "critical": [
        {
            "name": "Timing critical order",
            "source": "order priority T (OBR-27 / TQ1-9): the result is needed at a set time",
            "when": {"order_priority": ["T"]},
        }
    ],
    "rules": [
        {
            "name": "ED head CT",
            "source": (
                "NICE QS74 / QS166: CT head for head injury, "
                "provisional report within 1 hour of the scan"
            ),
            "when": {"patient_class": ["E"], "modality": ["CT"], "body_area": ["head", "brain"]},
            "class": "stat",
            "target": "PT1H",
        },
        {
            "name": "Stat order",
            "source": "order priority S (OBR-27 / TQ1-9)",
            "when": {"order_priority": ["S"]},
            "class": "stat",
        },
        {
            "name": "Emergency department",
            "source": "patient class E (PV1-2): reported within the ED stay",
            "when": {"patient_class": ["E"]},
            "class": "stat",
            "target": "PT4H",
        },
        {
            "name": "Suspected cancer pathway",
            "source": "NHS England Faster Diagnosis Standard (28 days from urgent referral)",
            "when": {"pathway": ["suspected_cancer", "fds", "2ww", "usc"]},
            "class": "suspected_cancer",
        },
        {
            "name": "Screening programme",
            "source": "pathway flag: screening (e.g. NHS Breast Screening Programme)",
            "when": {"pathway": ["screening", "bsp"]},
            "class": "screening",
        },
        {
            "name": "Inpatient urgent",
            "source": "patient class I with order priority A, T or P",
            "when": {"patient_class": ["I"], "order_priority": ["A", "T", "P"]},
            "class": "inpatient_urgent",
        },
        {
            "name": "Inpatient",
            "source": "RCR audit standard: inpatient report within one working day",
            "when": {"patient_class": ["I"]},
            "class": "inpatient",
        },
        {
            "name": "Outpatient urgent",
            "source": "order priority A, T or P outside an admission",
            "when": {"order_priority": ["A", "T", "P"]},
            "class": "outpatient_urgent",
        },
        {
            "name": "GP direct access",
            "source": "pathway flag: GP direct access request",
            "when": {"pathway": ["gp_direct_access", "gp", "direct_access"]},
            "class": "gp_direct_access",
        },
        {
            "name": "Outpatient routine",
            "source": "everything else: well inside the 28-day maximum",
            "when": {},
            "class": "outpatient_routine",
        },
    ],
    "effort": {
        "default": 1.0,
        "modality": {
            "CR": 0.3,
            "DX": 0.3,
            "XR": 0.3,
            "MG": 0.5,
            "US": 0.6,
            "RF": 0.8,
            "NM": 1.5,
            "CT": 1.5,
            "MR": 2.0,
            "PT": 2.5,
        },
        "procedure_code": {},
    },
    "trusts": {},
}
