"""ACK building (hl7/ack.py): codes, MSA-2 byte for byte, ERR layout by version, escaping.

Each ACK is also read back with hl7apy (a parser we did not write), off the hot path.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hl7apy.parser import parse_message

from hl7.ack import (
    AckProblem,
    ack_is_enhanced,
    build_ack,
    build_batch_ack,
    build_error_ack,
    escape,
    minimal_header,
)
from hl7.er7 import Delimiters, Er7Message, read_header
from hl7.errors import RequiredFieldMissing, UnsupportedMessageType, UnsupportedVersion

NOW = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)


def header(msh: str):  # noqa: ANN201 - test helper
    return read_header(msh.encode("latin-1"))


def segments(ack: bytes) -> list[str]:
    return [s for s in ack.decode("latin-1").split("\r") if s]


def test_an_accepted_message_gets_aa_with_msa2_equal_to_its_control_id() -> None:
    ack = build_ack(
        header("MSH|^~\\&|CRIS|RW6|WL|REG|20261123||ORM^O01|RW6000123|P|2.4"), code="AA", now=NOW
    )
    msh, msa = segments(ack)
    assert msa == "MSA|AA|RW6000123"
    fields = msh.split("|")
    assert fields[4:6] == ["CRIS", "RW6"]
    assert fields[8] == "ACK^O01^ACK"
    assert fields[10:12] == ["P", "2.4"]
    assert fields[6] == "20261123093000+0000"


def test_msa2_keeps_a_leading_space_and_an_empty_control_id() -> None:
    spaced = build_ack(header("MSH|^~\\&|A|B|||2026||SIU^S14| 38762|P|2.3"), code="AA", now=NOW)
    empty = build_ack(header("MSH|^~\\&|A|B|||2026||ORM^O01||P|2.3.1"), code="AR", now=NOW)
    assert segments(spaced)[1] == "MSA|AA| 38762"
    assert segments(empty)[1] == "MSA|AR|"


def test_the_ack_is_in_the_received_version_and_processing_id() -> None:
    ack = build_ack(header("MSH|^~\\&|A|B|||2026||ADT^A03|9|P^T|2.5^FRA^2.5"), code="AA", now=NOW)
    fields = segments(ack)[0].split("|")
    assert fields[10] == "P^T"
    assert fields[11] == "2.5^FRA^2.5"


def test_before_231_the_ack_message_type_has_no_structure_component() -> None:
    ack = build_ack(header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.3"), code="AA", now=NOW)
    assert segments(ack)[0].split("|")[8] == "ACK^O01"


def test_errors_up_to_24_use_err1_with_location_and_coded_error() -> None:
    error = RequiredFieldMissing("PID-3 is empty", segment="PID", sequence=1, field=3)
    ack = build_error_ack(header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.4"), error, now=NOW)
    _, msa, err = segments(ack)
    assert msa == "MSA|AE|9|PID-3 is empty"
    assert err == "ERR|PID^1^3^101&Required field missing&HL70357"


def test_errors_from_25_use_err2_err3_err4_and_diagnostic_text() -> None:
    error = UnsupportedMessageType("ORU^R01 not accepted", segment="MSH", sequence=1, field=9)
    ack = build_error_ack(header("MSH|^~\\&|A|B|||2026||ORU^R01|9|P|2.5.1"), error, now=NOW)
    _, msa, err = segments(ack)
    assert msa == "MSA|AR|9|ORU^R01 not accepted".replace("^", "\\S\\")
    fields = err.split("|")
    assert fields[2] == "MSH^1^9"
    assert fields[3] == "200^Unsupported message type^HL70357"
    assert fields[4] == "E"
    assert fields[7] == "ORU\\S\\R01 not accepted"


def test_enhanced_mode_sends_commit_codes() -> None:
    h = header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.4|||AL|NE")
    assert ack_is_enhanced(h)
    assert segments(build_ack(h, code="AA", now=NOW, enhanced=True))[1] == "MSA|CA|9"
    error = UnsupportedVersion("no", segment="MSH", sequence=1, field=12)
    assert segments(build_error_ack(h, error, now=NOW, enhanced=True))[1].startswith("MSA|CR|9")


def test_ack_mode_follows_msh15_unless_the_trust_fixes_it() -> None:
    original = header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.4")
    asks = header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.4|||AL|NE")
    assert not ack_is_enhanced(original)
    assert ack_is_enhanced(asks)
    assert not ack_is_enhanced(asks, "original")
    assert ack_is_enhanced(original, "enhanced")


def test_text_with_delimiters_is_escaped() -> None:
    assert escape("a|b^c~d\\e&f\ng") == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\.br\\g"


def test_the_ack_uses_the_senders_delimiters_so_msa2_matches_byte_for_byte() -> None:
    h = header("MSH#*@!}#A#B###2026##ORM*O01#id*1#P#2.4")
    ack = build_ack(h, code="AA", now=NOW)
    msh, msa = segments(ack)
    assert msh.startswith("MSH#*@!}#")
    assert msa == "MSA#AA#id*1"


def test_several_problems_in_25_get_one_err_each() -> None:
    problems = [
        AckProblem("101", "PID-3 empty", "PID", 1, 3),
        AckProblem("103", "ORC-1 ZZ", "ORC", 2, 1),
    ]
    ack = build_ack(
        header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.5"), code="AE", now=NOW, problems=problems
    )
    errs = [s for s in segments(ack) if s.startswith("ERR")]
    assert len(errs) == 2
    assert errs[1].split("|")[2] == "ORC^2^1"


def test_the_ack_echoes_the_character_set_and_is_encoded_in_it() -> None:
    h = read_header(b"MSH|^~\\&|A|B|||2026||ADT^A08|9|P|2.4||||||8859/1")
    error = RequiredFieldMissing("Nom manquant: é", segment="PID", sequence=1, field=5)
    ack = build_error_ack(h, error, now=NOW)
    assert "|8859/1" in ack.decode("latin-1").split("\r")[0]
    assert "é".encode("latin-1") in ack


def test_bytes_without_msh_still_get_an_ar_from_a_minimal_header() -> None:
    ack = build_ack(minimal_header(), code="AR", now=NOW, problems=[AckProblem("100", "no MSH")])
    assert segments(ack)[1] == "MSA|AR||no MSH"


def test_the_ack_reads_back_with_hl7apy_as_a_valid_ack() -> None:
    error = RequiredFieldMissing("PID-3 is empty", segment="PID", sequence=1, field=3)
    for version in ("2.3", "2.4", "2.5", "2.5.1"):
        h = header(f"MSH|^~\\&|CRIS|RW6|WL|REG|20261123||ORM^O01|C-1|P|{version}")
        ack = build_error_ack(h, error, now=NOW)
        parsed = parse_message(ack.decode("ascii"), find_groups=False)
        assert parsed.msa.msa_1.value == "AE"
        assert parsed.msa.msa_2.value == "C-1"
        assert parsed.msh.msh_12.to_er7().split("^")[0] == version


def test_our_own_reader_reads_the_ack() -> None:
    ack = build_ack(header("MSH|^~\\&|A|B|||2026||ORM^O01|X-9|P|2.4"), code="AA", now=NOW)
    msg = Er7Message.parse(ack)
    assert msg.message_type == "ACK^O01"
    assert msg.get("MSA", 2) == "X-9"


def test_an_ack_code_outside_the_original_set_is_refused() -> None:
    with pytest.raises(ValueError):
        build_ack(header("MSH|^~\\&|A|B|||2026||ORM^O01|9|P|2.4"), code="CA", now=NOW)


def test_escape_without_an_escape_character_blanks_delimiters() -> None:
    assert escape("a|b", Delimiters("|", "^", "~", None, None)) == "a b"


def test_a_batch_gets_our_envelope_around_one_ack_per_message() -> None:
    batch = b"BHS|^~\\&|CRIS|RW6|WL|REG|2026||||B-11\rMSH|^~\\&|CRIS|RW6\rBTS|1\r"
    acks = [build_ack(header("MSH|^~\\&|CRIS|RW6|||2026||ADT^A08|M1|P|2.5"), code="AA", now=NOW)]
    reply = build_batch_ack(batch, acks, now=NOW).decode().split("\r")
    assert reply[0].split("|")[:6] == ["BHS", "^~\\&", "WORKLIST", "REGION", "CRIS", "RW6"]
    assert reply[0].split("|")[11] == "B-11"
    assert reply[2] == "MSA|AA|M1"
    assert reply[3] == "BTS|1"
