"""NHS numbers: normalisation and the Modulus 11 check.

The NHS number is the regional link between trusts, so only a number that
passes its check digit may ever link two patients (NHS Data Dictionary,
"NHS NUMBER"). Senders format it with spaces or dashes (3-3-4); we store the
ten digits.
"""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[\s\-]")


def normalise_nhs_number(raw: str | None) -> str | None:
    """Strip the 3-3-4 spacing real feeds use; None when nothing is left."""
    if raw is None:
        return None
    digits = _SEPARATORS.sub("", raw)
    return digits or None


def is_valid_nhs_number(raw: str | None) -> bool:
    """True when `raw` is ten digits whose tenth is the Modulus 11 check digit.

    Weights 10..2 over the first nine digits; check = 11 - (sum mod 11);
    11 becomes 0 and 10 means the number can never be valid.
    """
    number = normalise_nhs_number(raw)
    if number is None or len(number) != 10 or not number.isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:9], range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        check = 0
    if check == 10:
        return False
    return check == int(number[9])
