import pytest

from worklist.domain.study import TERMINAL, StudyStatus, can_move, check_move
from worklist.errors import Conflict


def test_an_exam_completed_study_becomes_ready_to_report() -> None:
    assert can_move(StudyStatus.SCHEDULED, StudyStatus.READY)


def test_a_final_report_is_never_reopened_by_the_ris() -> None:
    with pytest.raises(Conflict, match="final cannot become ready"):
        check_move(StudyStatus.FINAL, StudyStatus.READY)


def test_cancelled_and_discontinued_and_final_are_terminal() -> None:
    assert TERMINAL == {StudyStatus.FINAL, StudyStatus.CANCELLED, StudyStatus.DISCONTINUED}


def test_repeating_the_current_state_is_allowed_so_duplicates_are_harmless() -> None:
    assert all(can_move(s, s) for s in StudyStatus)


def test_a_held_study_can_return_to_any_state_before_reporting() -> None:
    for target in (StudyStatus.SCHEDULED, StudyStatus.IN_PROGRESS, StudyStatus.READY):
        assert can_move(StudyStatus.ON_HOLD, target)
    assert not can_move(StudyStatus.ON_HOLD, StudyStatus.FINAL)
