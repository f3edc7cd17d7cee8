"""Study states and the one table of allowed transitions between them.

A study is one examination ordered by a trust's RIS, keyed by (trust, accession
number). ORC-1/ORC-5 from the RIS and signing by a radiologist move it on.
"""

from __future__ import annotations

from enum import StrEnum

from worklist.errors import Conflict


class StudyStatus(StrEnum):
    ORDERED = "ordered"  # NW received, not yet scheduled
    SCHEDULED = "scheduled"  # ORC-5 SC: booked
    IN_PROGRESS = "in_progress"  # ORC-5 IP: patient on the table
    READY = "ready"  # exam complete / images available: on the reporting worklist
    PRELIMINARY = "preliminary"  # preliminary report signed, awaiting a final one
    FINAL = "final"  # final report signed; addenda may follow
    ON_HOLD = "on_hold"  # HD/OH from the RIS; RL returns it to where it was
    CANCELLED = "cancelled"  # CA/OC from the RIS; kept, never deleted
    DISCONTINUED = "discontinued"  # DC/OD from the RIS; kept, never deleted


_BEFORE_REPORT = {
    StudyStatus.ORDERED,
    StudyStatus.SCHEDULED,
    StudyStatus.IN_PROGRESS,
    StudyStatus.READY,
}
_STOPPED = {StudyStatus.CANCELLED, StudyStatus.DISCONTINUED}

# from -> the states it may move to. Same-state "moves" are always allowed (idempotency).
TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    StudyStatus.ORDERED: frozenset(
        {StudyStatus.SCHEDULED, StudyStatus.IN_PROGRESS, StudyStatus.READY}
        | _STOPPED
        | {StudyStatus.ON_HOLD}
    ),
    StudyStatus.SCHEDULED: frozenset(
        {StudyStatus.ORDERED, StudyStatus.IN_PROGRESS, StudyStatus.READY, StudyStatus.ON_HOLD}
        | _STOPPED
    ),
    StudyStatus.IN_PROGRESS: frozenset(
        {StudyStatus.SCHEDULED, StudyStatus.READY, StudyStatus.ON_HOLD} | _STOPPED
    ),
    StudyStatus.READY: frozenset(
        {StudyStatus.PRELIMINARY, StudyStatus.FINAL, StudyStatus.ON_HOLD} | _STOPPED
    ),
    StudyStatus.PRELIMINARY: frozenset({StudyStatus.FINAL} | _STOPPED),
    StudyStatus.FINAL: frozenset(),
    StudyStatus.ON_HOLD: frozenset(_BEFORE_REPORT | _STOPPED),
    StudyStatus.CANCELLED: frozenset(),
    StudyStatus.DISCONTINUED: frozenset(),
}

# States in which the study sits on a radiologist's reporting worklist.
REPORTABLE = frozenset({StudyStatus.READY})
# States that no RIS message can leave.
TERMINAL = frozenset(s for s, targets in TRANSITIONS.items() if not targets)


def can_move(current: StudyStatus, target: StudyStatus) -> bool:
    return current == target or target in TRANSITIONS[current]


def check_move(current: StudyStatus, target: StudyStatus) -> None:
    """Raise Conflict, naming both states, when the move is not in the table."""
    if not can_move(current, target):
        raise Conflict(f"a study that is {current.value} cannot become {target.value}")
