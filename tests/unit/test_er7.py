"""The tolerant ER7 reader (hl7/er7.py): delimiters, separators, escapes, charsets, timestamps."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from hl7.er7 import (
    Delimiters,
    Er7Message,
    is_batch,
    parse_date,
    parse_timestamp,
    read_header,
    split_batch,
    unescape,
)
from hl7.errors import MalformedMessage

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hl7"


def parse(text: str, encoding: str = "ascii") -> Er7Message:
    return Er7Message.parse(text.encode(encoding))


def test_msh_fields_are_numbered_with_msh1_as_the_field_separator() -> None:
    msg = parse("MSH|^~\\&|CRIS|RW6|WL|REG|20261123||ORM^O01^ORM_O01|C1|P|2.4\rPID|1||X^^^RW6^MR")
    assert msg.get("MSH", 1) == "|"
    assert msg.get("MSH", 2) == "^~\\&"
    assert msg.get("MSH", 3) == "CRIS"
    assert msg.get("MSH", 9, 2) == "O01"
    assert msg.message_type == "ORM^O01"
    assert msg.control_id == "C1"
    assert msg.version == "2.4"


def test_components_repetitions_and_subcomponents_are_addressed_from_one() -> None:
    msg = parse("MSH|^~\\&|A|B|||20261123||ADT^A08|1|P|2.4\rPID|1||A1^^^X&1.2.3&ISO^MR~B2^^^NHS^NH")
    assert msg.get("PID", 3) == "A1"
    assert msg.get("PID", 3, 4) == "X"
    assert msg.get("PID", 3, 4, 2) == "1.2.3"
    assert msg.get("PID", 3, 5, repetition=2) == "NH"
    assert msg.get("PID", 3, repetition=3) is None
    assert msg.get("PID", 40) is None
    assert msg.get("OBR", 1) is None


def test_odd_delimiters_declared_in_msh2_are_honoured() -> None:
    msg = parse("MSH#*@!}#A#B###20261123##ADT*A08#1#P#2.4\rPID#1##V1*X*Y*AUTH}NS*MR@V2")
    assert msg.delimiters == Delimiters("#", "*", "@", "!", "}")
    assert msg.get("PID", 3, 4) == "AUTH"
    assert msg.get("PID", 3, 4, 0) == "AUTH}NS"
    assert msg.get("PID", 3, 4, 2) == "NS"
    assert msg.get("PID", 3, repetition=2) == "V2"


def test_a_custom_subcomponent_character_is_used_for_splitting() -> None:
    msg = parse("MSH|^~\\}|A|B|||20261123||ACK^|1|P|2.4\rMSA|AA|x}y")
    assert msg.delimiters.subcomponent == "}"
    assert msg.get("MSA", 2, 1, 2) == "y"


def test_three_encoding_characters_leave_no_subcomponent_separator() -> None:
    msg = parse("MSH|^~}|A|B|||20261123||BAR^P01|1|P|2.4\rPID|1||a&b")
    assert msg.delimiters.subcomponent is None
    assert msg.get("PID", 3) == "a&b"


def test_lf_and_crlf_segment_separators_are_read_like_cr() -> None:
    for sep in ("\n", "\r\n", "\r"):
        msg = parse(
            sep.join(["MSH|^~\\&|A|B|||20261123||ADT^A08|1|P|2.4", "EVN|A08", "PID|1||X"]) + sep
        )
        assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID"]
        assert msg.version == "2.4"


def test_a_stray_line_is_skipped_without_corrupting_its_neighbours() -> None:
    msg = parse("MSH|^~\\&|A|B|||20261123||ORU^R01|1|D|2.3\rI|||x\rPID|1||X")
    assert msg.version == "2.3"
    assert msg.get("PID", 3) == "X"
    assert msg.stray_lines == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b\\T\\c\\R\\d\\E\\e", "a^b&c~d\\e"),
        ("line one\\.br\\line two", "line one\nline two"),
        ("\\H\\ 7.28\\N\\", " 7.28"),
        ("caf\\XE9\\", "caf\u00e9"),
        ("two\\.sp 2\\lines", "two\n\nlines"),
        ("unterminated \\F", "unterminated \\F"),
        ("unknown \\Q\\ kept", "unknown \\Q\\ kept"),
        ("C:\\\\temp", "C:\\\\temp"),
    ],
)
def test_escape_sequences_are_unescaped_after_splitting(raw: str, expected: str) -> None:
    assert unescape(raw, Delimiters()) == expected


def test_an_escaped_delimiter_does_not_split_a_field() -> None:
    msg = parse("MSH|^~\\&|A|B|||20261123||ORM^O01|1|P|2.4\rNTE|1|P|Ward 7 \\F\\ bay 3 \\S\\ side")
    assert msg.get("NTE", 3) == "Ward 7 | bay 3 ^ side"


def test_whole_field_text_rejoins_an_unescaped_ampersand() -> None:
    obr = "|".join(["OBR", "1", *[""] * 11, "Pain & swelling"])
    msg = parse("MSH|^~\\&|A|B|||20261123||ORM^O01|1|P|2.4\r" + obr)
    assert msg.get("OBR", 13) == "Pain "
    assert msg.get("OBR", 13, 0, 0) == "Pain & swelling"


def test_the_hl7_null_and_empty_values_read_as_none() -> None:
    msg = parse('MSH|^~\\&|A|B|||20261123||ADT^A08|1|P|2.4\rPID|1|""||')
    assert msg.get("PID", 2) is None
    assert msg.get("PID", 3) is None


def test_declared_latin1_bytes_are_decoded_as_latin1() -> None:
    msg = Er7Message.parse((FIXTURES / "adt-a08-v23-latin1-nhs-in-pid19.hl7").read_bytes())
    assert msg.get("PID", 5) == "DÉSIRÉ"
    assert msg.charset_note is None


def test_utf8_bytes_mislabelled_as_latin1_are_decoded_as_utf8_and_flagged() -> None:
    raw = "MSH|^~\\&|A|B|||20261123||ADT^A08|1|P|2.4||||||8859/1\rPID|1||X||Testpatiënt".encode()
    msg = Er7Message.parse(raw)
    assert msg.get("PID", 5) == "Testpatiënt"
    assert msg.charset_note and "UTF-8" in msg.charset_note


def test_utf8_declared_as_unicode_utf8_is_decoded() -> None:
    msg = Er7Message.parse((FIXTURES / "omi-o23-v251-two-orders.hl7").read_bytes())
    assert msg.get("PID", 5) == "Zoë"
    assert msg.codec == "utf-8"


def test_undeclared_windows_1252_falls_back_and_is_flagged() -> None:
    raw = b"MSH|^~\\&|A|B|||20261123||ADT^A08|1|P|2.4\rPID|1||X||O\x92Neill"
    msg = Er7Message.parse(raw)
    assert msg.get("PID", 5) == "O\u2019Neill"
    assert msg.codec == "cp1252"
    assert msg.charset_note


def test_msh10_is_kept_byte_for_byte_even_with_a_leading_space() -> None:
    msg = parse("MSH|^~\\&|A|B|||20261123||SIU^S14| 38762|P|2.3")
    assert msg.control_id == " 38762"


def test_a_message_without_msh_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        Er7Message.parse(b"PID|1||X\r")


def test_msh2_with_repeated_characters_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        Er7Message.parse(b"MSH|^^\\&|A\r")


def test_read_header_reads_only_the_msh_of_a_truncated_message() -> None:
    header = read_header(b"MSH|^~\\&|CRIS|RW6|||20261123||ORM^O01|ABC|P|2.4|||AL|NE\rOBX|1|ED|xxxx")
    assert header.control_id == "ABC"
    assert header.trigger == "O01"
    assert header.accept_ack_type == "AL"


def test_a_batch_is_recognised_and_split_into_its_messages() -> None:
    raw = (
        b"BHS|^~\\&|A|B\rMSH|^~\\&|A|B|||2026||ADT^A04|1|P|2.5\rPID|1||X\r"
        b"MSH|^~\\&|A|B|||2026||ADT^A04|2|P|2.5\rPID|1||Y\rBTS|2\r"
    )
    assert is_batch(raw)
    parts = split_batch(raw)
    assert [Er7Message.parse(p).control_id for p in parts] == ["1", "2"]


def test_a_batch_without_msh_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        split_batch(b"BHS|^~\\&|A\rEVN|A04\rPID|1||X\rBTS|1\r")


def test_parsing_a_batch_as_one_message_refuses_it_clearly() -> None:
    with pytest.raises(MalformedMessage, match="batch"):
        Er7Message.parse(b"FHS|^~\\&|A\rBHS|^~\\&|A\rMSH|^~\\&|A|B|||2026||ADT^A04|1|P|2.5\r")


def test_naive_timestamps_are_uk_local_time_across_the_clock_change() -> None:
    winter = parse_timestamp("202601151200")
    summer = parse_timestamp("20260715120000")
    assert winter is not None and winter.astimezone(UTC) == datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    assert summer is not None and summer.astimezone(UTC) == datetime(2026, 7, 15, 11, 0, tzinfo=UTC)


def test_timestamps_with_an_offset_and_fraction_keep_them() -> None:
    when = parse_timestamp("20140529080238.241+0100")
    assert when == datetime(2014, 5, 29, 8, 2, 38, 241000, tzinfo=timezone(timedelta(hours=1)))


def test_partial_timestamps_are_read_to_their_precision() -> None:
    assert parse_timestamp("2026") == datetime(2026, 1, 1, tzinfo=parse_timestamp("2026").tzinfo)  # type: ignore[union-attr]
    assert parse_timestamp("") is None


def test_a_value_that_is_not_a_timestamp_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")
    with pytest.raises(ValueError):
        parse_timestamp("20261399")


def test_dates_of_birth_read_the_date_part_and_ignore_nonsense() -> None:
    assert parse_date("19500401000000") == date(1950, 4, 1)
    assert parse_date("196203520") is None
    assert parse_date(None) is None
