import pytest

from worklist.domain.nhs import is_valid_nhs_number, normalise_nhs_number


@pytest.mark.parametrize(
    "number", ["9434765919", "4010232137", "9990500002", "943 476 5919", "943-476-5919"]
)
def test_numbers_with_a_correct_modulus_11_check_digit_are_valid(number: str) -> None:
    assert is_valid_nhs_number(number)


@pytest.mark.parametrize(
    "number",
    ["9219068409", "1039282726", "111222223", "94347659190", "943476591X", "", None, "9434765918"],
)
def test_numbers_with_a_wrong_check_digit_or_shape_are_invalid(number: str | None) -> None:
    assert not is_valid_nhs_number(number)


def test_a_number_whose_check_digit_would_be_ten_is_never_valid() -> None:
    # 123456789 gives 11 - (sum mod 11) = 10 for the check digit, so no tenth digit works.
    assert not any(is_valid_nhs_number(f"123456789{d}") for d in range(10))


def test_spacing_is_removed_when_normalising() -> None:
    assert normalise_nhs_number(" 943 476 5919 ") == "9434765919"
    assert normalise_nhs_number("  ") is None
