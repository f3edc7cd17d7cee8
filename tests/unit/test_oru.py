"""ORU^R01 building (hl7/outbound.py) and ACK reading.

Escaping is proven with parsers we did not write as well as our own: a
hand-written split-based reader in this file, node-hl7-client (npm) and
python-hl7 (PyPI, in its own venv under /tmp, never in .venv), each run as a
subprocess. Those two skip with a reason when node/npm or the registry is not
reachable.

The example report, identifiers and profile are our own, modelled on the UCLH
Epic radiology ORUs in shared/hl7-corpus/uclh-emap (sections, NHS number, order
numbers with namespaces) and on NHS PID-3 conventions (HL7-NOTES section 6).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from datetime import UTC, date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7.outbound import (
    Addendum,
    Clinician,
    InvalidOru,
    OrderNumber,
    OruInput,
    OutboundError,
    OutboundProfile,
    PatientIdentifier,
    build_oru,
    check_text_value,
    escape,
    read_ack,
    validate_oru,
)
from tests.third_party import node_env, python_hl7

NASTY_REPORT = (
    "CT head: no acute | haemorrhage ^ or ~ infarct & no mass\\shift.\n"
    "MSH|^~\\&|FORGED|RW6|CRIS|RW6|20260101||ORU^R01|EVIL|P|2.4\n"
    "OBX|99|TX|||forged line||||||F\n"
    "Literal escapes typed: \\F\\ \\.br\\ \\X0D\\ end\n"
    "Zoë Nowak-Łukasiewicz, 5 mm – stable, ≥ 2 cm, µg, °\n"
    "\n"
    "Tab\there, bell\x07, VT\x0b FS\x1c inside."
)


def clinician() -> Clinician:
    return Clinician("C4567890", "Okafor", "Ngozi", prefix="Dr", assigning_authority="GMC")


def oru_input(**changes: object) -> OruInput:
    base = OruInput(
        control_id="WL000000000042",
        message_time=datetime(2026, 7, 1, 12, 0, tzinfo=UTC),
        status="F",
        patient_identifiers=(
            PatientIdentifier("9434765919", "NHS", "NH"),
            PatientIdentifier("RW6-123&45", "RW6", "MR"),
        ),
        accession_number="RW6ACC^0001",
        procedure_code="CHEAD",
        procedure_name="CT Head",
        procedure_coding_system="NICIP",
        report_time=datetime(2026, 7, 1, 11, 45, tzinfo=UTC),
        radiologist=clinician(),
        text=NASTY_REPORT,
        impression="No acute intracranial abnormality.",
        placer_order_number=OrderNumber("154412111", "EPC"),
        filler_order_number=OrderNumber("RRV2666111", "CRIS", "1.2.826.0.1", "ISO"),
        patient_family_name="O'Brien",
        patient_given_name="Zoë",
        birth_date=date(1969, 7, 30),
        sex="F",
        patient_class="E",
        modality="CT",
        exam_time=datetime(2026, 7, 1, 10, 5, tzinfo=UTC),
    )
    return replace(base, **changes)


def profile(**keys: object) -> OutboundProfile:
    return OutboundProfile.from_dict(
        {"character_set": "UNICODE UTF-8", **keys},
        receiving_application="CRIS",
        receiving_facility="RW6",
    )


# --- a hand-written reader: split, then unescape (independent of hl7/outbound.py) ----------


def split_decode(value: str) -> str:
    out, i = [], 0
    names = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": "\n"}
    while i < len(value):
        if value[i] == "\\":
            j = value.index("\\", i + 1)
            out.append(names[value[i + 1 : j]])
            i = j + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def segments(text: str) -> list[list[str]]:
    return [s.split("|") for s in text.split("\r") if s]


def obx_values(text: str) -> list[str]:
    return [split_decode(s[5]) for s in segments(text) if s[0] == "OBX"]


def expected_lines(text: str, charset: str = "UNICODE UTF-8") -> list[str]:
    """What each report line should read as at the RIS: control characters become spaces."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return [split_decode(escape(line, charset=charset)) for line in lines] or [""]


# --- structure ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5.1"])
@pytest.mark.parametrize("value_type", ["TX", "FT", "ST"])
def test_the_oru_validates_against_hl7apy_structure_for_each_version_and_text_type(
    version: str, value_type: str
) -> None:
    built = build_oru(oru_input(), profile(version=version, text_value_type=value_type))
    message = validate_oru(built.text, version)
    assert message.name == "ORU_R01"
    assert [s[0] for s in segments(built.text)][:5] == ["MSH", "PID", "PV1", "ORC", "OBR"]
    assert segments(built.text)[0][11] == version


def test_the_header_addresses_the_trusts_ris_and_carries_our_control_id() -> None:
    built = build_oru(oru_input(), profile(version="2.4", processing_id="T"))
    msh = segments(built.text)[0]
    assert msh[2:6] == ["WORKLIST", "REGION", "CRIS", "RW6"]
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[9] == "WL000000000042" == built.control_id
    assert msh[10] == "T"
    assert msh[17] == "UNICODE UTF-8"


def test_orc_says_re_and_cm_and_echoes_the_trusts_order_numbers_with_namespaces() -> None:
    segs = {s[0]: s for s in segments(build_oru(oru_input(), profile()).text)}
    assert segs["ORC"][1:6] == ["RE", "154412111^EPC", "RRV2666111^CRIS^1.2.826.0.1^ISO", "", "CM"]
    assert segs["OBR"][2] == "154412111^EPC"
    assert segs["OBR"][3] == "RRV2666111^CRIS^1.2.826.0.1^ISO"


def test_pid3_carries_every_identifier_as_received_with_delimiters_escaped() -> None:
    pid = next(s for s in segments(build_oru(oru_input(), profile()).text) if s[0] == "PID")
    reps = pid[3].split("~")
    assert reps[0] == "9434765919^^^NHS^NH"
    assert [split_decode(c) for c in reps[1].split("^")] == ["RW6-123&45", "", "", "RW6", "MR"]


def test_accession_number_goes_where_the_trust_profile_says() -> None:
    obr18 = next(s for s in segments(build_oru(oru_input(), profile()).text) if s[0] == "OBR")
    assert split_decode(obr18[18]) == "RW6ACC^0001"
    obr = next(
        s
        for s in segments(build_oru(oru_input(), profile(accession_field="OBR-20")).text)
        if s[0] == "OBR"
    )
    assert split_decode(obr[20]) == "RW6ACC^0001" and obr[18] == ""


@pytest.mark.parametrize("status", ["P", "F", "C"])
def test_result_status_is_in_obr25_and_every_obx11(status: str) -> None:
    segs = segments(build_oru(oru_input(status=status), profile()).text)
    assert next(s for s in segs if s[0] == "OBR")[25] == status
    assert {s[11] for s in segs if s[0] == "OBX"} == {status}


def test_times_are_trust_local_with_offset_and_radiologists_are_in_obr32_and_obr33() -> None:
    trainee = Clinician("T123", "Lee", "Sam")
    obr = next(
        s for s in segments(build_oru(oru_input(trainee=trainee), profile()).text) if s[0] == "OBR"
    )
    assert obr[7] == "20260701110500+0100"  # 10:05 UTC is 11:05 BST
    assert obr[22] == "20260701124500+0100"
    assert obr[24] == "CT"
    assert obr[32] == "C4567890&Okafor&Ngozi&&&Dr&&&GMC"
    assert obr[33] == "T123&Lee&Sam"


def test_an_urgent_report_carries_the_abnormal_flag_and_priority_the_profile_names() -> None:
    segs = segments(
        build_oru(
            oru_input(urgent=True), profile(urgent_abnormal_flag="AA", urgent_priority="S")
        ).text
    )
    assert next(s for s in segs if s[0] == "OBR")[5] == "S"
    assert {s[8] for s in segs if s[0] == "OBX"} == {"AA"}
    calm = segments(build_oru(oru_input(urgent=False), profile()).text)
    assert next(s for s in calm if s[0] == "OBR")[5] == ""
    assert all(len(s) <= 8 or s[8] == "" for s in calm if s[0] == "OBX")


def test_the_impression_has_its_own_obx_code_unless_the_profile_keeps_it_inline() -> None:
    segs = segments(build_oru(oru_input(), profile()).text)
    codes = [s[3].split("^")[0] for s in segs if s[0] == "OBX"]
    assert codes[-1] == "19005-8" and codes.count("19005-8") == 1
    inline = segments(build_oru(oru_input(), profile(impression_separate=False)).text)
    assert {s[3].split("^")[0] for s in inline if s[0] == "OBX"} == {"18782-3"}
    assert "No acute intracranial abnormality." in obx_values(
        build_oru(oru_input(), profile(impression_separate=False)).text
    )


def test_addenda_follow_the_report_under_the_addendum_code_with_a_signed_heading() -> None:
    add = Addendum(
        "Compared with prior: unchanged.",
        datetime(2026, 7, 2, 9, 0, tzinfo=UTC),
        Clinician("C1", "Okafor", "Ngozi"),
    )
    text = build_oru(oru_input(status="C", addenda=(add,)), profile()).text
    obx = [s for s in segments(text) if s[0] == "OBX"]
    assert [split_decode(s[5]) for s in obx[-2:]] == [
        "Addendum 02/07/2026 10:00 by Ngozi Okafor:",
        "Compared with prior: unchanged.",
    ]
    assert obx[-1][3].startswith("ADDENDUM^")
    assert len({s[4] for s in obx}) == 3  # OBX-4 groups report, impression, addendum


# --- escaping -----------------------------------------------------------------------------


def test_delimiters_typed_in_a_report_come_back_unchanged_through_a_split_based_reader() -> None:
    built = build_oru(oru_input(impression=""), profile(text_value_type="TX"))
    assert obx_values(built.text) == expected_lines(NASTY_REPORT)
    assert obx_values(built.text)[0] == (
        "CT head: no acute | haemorrhage ^ or ~ infarct & no mass\\shift."
    )


def test_a_line_starting_msh_cannot_forge_a_segment() -> None:
    built = build_oru(oru_input(), profile())
    names = [s[0] for s in segments(built.text)]
    assert names.count("MSH") == 1
    assert set(names) == {"MSH", "PID", "PV1", "ORC", "OBR", "OBX"}
    assert all(len(s) <= 17 for s in segments(built.text) if s[0] == "OBX")
    assert "MSH|^~\\&|FORGED|RW6|CRIS|RW6|20260101||ORU^R01|EVIL|P|2.4" in obx_values(built.text)


def test_control_characters_cannot_end_a_segment_or_an_mllp_frame() -> None:
    built = build_oru(oru_input(text="a\x0bb\x1cc\rd\x00e"), profile())
    assert (
        b"\x0b" not in built.payload
        and b"\x1c" not in built.payload
        and b"\x00" not in built.payload
    )
    assert obx_values(built.text)[:2] == ["a b c", "d e"]


def test_ft_joins_lines_with_br_and_a_typed_br_stays_text() -> None:
    text = "first\nsecond \\.br\\ typed"
    built = build_oru(oru_input(text=text, impression=""), profile(text_value_type="FT"))
    (obx,) = [s for s in segments(built.text) if s[0] == "OBX"]
    assert obx[2] == "FT"
    assert obx[5] == "first\\.br\\second \\E\\.br\\E\\ typed"
    assert split_decode(obx[5]) == text


def test_st_lines_are_wrapped_at_199_without_cutting_an_escape_sequence() -> None:
    line = ("word|" * 80).strip()
    built = build_oru(oru_input(text=line, impression=""), profile(text_value_type="ST"))
    values = [s[5] for s in segments(built.text) if s[0] == "OBX"]
    assert len(values) > 1 and all(len(v) <= 199 for v in values)
    assert "".join(split_decode(v) for v in values).replace(" ", "") == line.replace(" ", "")


def test_non_ascii_letters_are_kept_in_latin1_and_spelt_in_ascii_when_the_trust_wants_ascii() -> (
    None
):
    latin = build_oru(
        oru_input(text="Zoë – Łukasz µ", impression=""), profile(character_set="8859/1")
    )
    assert latin.payload.decode("latin-1").count("Zoë - Lukasz µ") == 1
    assert segments(latin.text)[0][17] == "8859/1"
    ascii_ = build_oru(
        oru_input(text="Zoë – Łukasz", impression=""), profile(character_set="ASCII")
    )
    ascii_.payload.decode("ascii")
    assert obx_values(ascii_.text)[0] == "Zoe - Lukasz"
    utf8 = build_oru(oru_input(text="Zoë – Łukasz ≥", impression=""), profile())
    assert "Zoë – Łukasz ≥" in utf8.payload.decode("utf-8")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=80), min_size=1, max_size=6))
def test_any_typed_text_round_trips_through_the_split_based_reader(lines: list[str]) -> None:
    text = "\n".join(line.replace("\r", " ").replace("\n", " ") for line in lines)
    if not text.strip():
        text = "x"
    built = build_oru(oru_input(text=text, impression=""), profile(text_value_type="TX"))
    names = [s[0] for s in segments(built.text)]
    assert names.count("MSH") == 1 and names[-1] == "OBX"
    assert obx_values(built.text) == expected_lines(text)


def test_the_text_check_refuses_an_unescaped_caret_that_hl7apy_would_split() -> None:
    with pytest.raises(InvalidOru):
        check_text_value("a^b", "TX")
    with pytest.raises(InvalidOru):
        check_text_value("a\\.br\\b", "TX")  # \.br\ is for FT only
    check_text_value("a\\.br\\b\\S\\", "FT")


def test_the_profile_refuses_unknown_keys_versions_and_text_types() -> None:
    with pytest.raises(OutboundError, match="unknown outbound profile keys: verison"):
        OutboundProfile.from_dict({"verison": "2.4"})
    with pytest.raises(OutboundError):
        OutboundProfile.from_dict({"version": "2.999"})
    with pytest.raises(OutboundError):
        OutboundProfile.from_dict({"text_value_type": "ED"})


def test_profile_fallbacks_fill_only_what_the_profile_leaves_out() -> None:
    p = OutboundProfile.from_dict(
        {"receiving_application": "SOLITON"}, receiving_application="CRIS", receiving_facility="RW6"
    )
    assert (p.receiving_application, p.receiving_facility) == ("SOLITON", "RW6")


def test_an_oru_without_order_numbers_or_identifiers_is_refused() -> None:
    with pytest.raises(OutboundError):
        build_oru(oru_input(placer_order_number=None, filler_order_number=None), profile())
    with pytest.raises(OutboundError):
        build_oru(oru_input(patient_identifiers=()), profile())


# --- ACK reading --------------------------------------------------------------------------


def ack(code: str, control: str, extra: str = "", sep: str = "\r") -> bytes:
    return sep.join(
        [
            "MSH|^~\\&|CRIS|RW6|WORKLIST|REGION|20260701||ACK^R01^ACK|A1|P|2.4",
            f"MSA|{code}|{control}" + extra,
        ]
    ).encode()


def test_aa_and_ca_with_our_control_id_mean_delivered() -> None:
    assert read_ack(ack("AA", "WL1"), "WL1").delivered
    assert read_ack(ack("CA", "WL1"), "WL1").outcome == "delivered"


def test_ae_and_ar_carry_the_ris_error_text() -> None:
    ae = read_ack(
        ack(
            "AE",
            "WL1",
            "|Unknown order\rERR||OBR^1^3|204^Unknown key^HL70357|E||||No order RRV1 \\T\\ co",
        ),
        "WL1",
    )
    assert ae.outcome == "error" and "Unknown order" in ae.text and "No order RRV1 & co" in ae.text
    v23 = read_ack(ack("AR", "WL1", "\rERR|OBR^1^3^204&Unknown key&HL70357"), "WL1")
    assert v23.outcome == "reject" and "Unknown key" in v23.text


def test_an_ack_for_another_control_id_is_a_mismatch_not_a_delivery() -> None:
    got = read_ack(ack("AA", "WL2"), "WL1")
    assert got.outcome == "mismatch" and not got.delivered
    assert read_ack(ack("AA", " WL1"), "WL1").outcome == "mismatch"  # MSA-2 compared exactly


def test_an_ack_with_lf_segment_ends_or_odd_delimiters_is_read() -> None:
    assert read_ack(ack("AA", "WL1", sep="\n"), "WL1").delivered
    odd = b"MSH#^~\\&#CRIS#RW6#WL#R#2026##ACK#A1#P#2.4\rMSA#AE#WL1#bad"
    assert read_ack(odd, "WL1").outcome == "error"


def test_garbage_or_an_ack_without_msa_is_unreadable() -> None:
    assert read_ack(b"hello", "WL1").outcome == "unreadable"
    assert read_ack(b"MSH|^~\\&|A|B\r", "WL1").outcome == "unreadable"
    assert read_ack(ack("ZZ", "WL1"), "WL1").outcome == "unreadable"


# --- third-party parsers, each in its own environment -------------------------------------

NODE_READER = r"""
const {Message} = require('node-hl7-client');
const fs = require('fs');
const text = fs.readFileSync(0, 'latin1');
const m = new Message({text: Buffer.from(text, 'latin1').toString('utf8')});
const out = {segments: [], obx5: []};
for (const line of text.split('\r')) { if (line) out.segments.push(line.slice(0, 3)); }
m.get('OBX').forEach(s => out.obx5.push(s.get('5').toString()));
out.obr25 = m.get('OBR.25').toString();
out.control = m.get('MSH.10').toString();
console.log(JSON.stringify(out));
"""


def test_node_hl7_client_reads_every_report_line_back_unchanged() -> None:
    where = node_env()
    built = build_oru(oru_input(impression=""), profile(text_value_type="TX"))
    done = subprocess.run(
        ["node", "-e", NODE_READER], cwd=where, input=built.payload, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    assert got["control"] == "WL000000000042" and got["obr25"] == "F"
    assert got["segments"].count("MSH") == 1
    assert got["obx5"] == expected_lines(NASTY_REPORT)


PYTHON_HL7_READER = r"""
import json, sys, hl7
text = sys.stdin.buffer.read().decode('utf-8')
m = hl7.parse(text)
out = {"segments": [str(s[0]) for s in m],
       "obx5": [m.unescape(str(s[5])) for s in m.segments('OBX')],
       "obx2": sorted({str(s[2]) for s in m.segments('OBX')}),
       "pid3": [str(r) for r in m.segment('PID')[3]]}
print(json.dumps(out))
"""


@pytest.mark.parametrize("value_type", ["TX", "FT"])
def test_python_hl7_in_its_own_venv_parses_the_oru_and_unescapes_the_text(value_type: str) -> None:
    python = python_hl7()
    built = build_oru(oru_input(impression=""), profile(text_value_type=value_type))
    done = subprocess.run(
        [str(python), "-I", "-c", PYTHON_HL7_READER],
        input=built.payload,
        capture_output=True,
        timeout=60,
        cwd="/tmp",
    )
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    assert got["segments"] == ["MSH", "PID", "PV1", "ORC", "OBR"] + ["OBX"] * len(got["obx5"])
    assert got["obx2"] == [value_type]
    lines = expected_lines(NASTY_REPORT)
    if value_type == "FT":
        # python-hl7 decodes the FT line break \.br\ as CR
        assert got["obx5"][0].split("\r") == lines
    else:
        assert got["obx5"] == lines
    assert len(got["pid3"]) == 2


def test_a_remembered_shape_still_sends_a_longer_value_through_hl7apy() -> None:
    build_oru(oru_input(patient_family_name="Okafor"), profile())  # shape now remembered
    build_oru(oru_input(patient_family_name="Nowak"), profile())  # same shape: accepted
    with pytest.raises(InvalidOru):
        build_oru(oru_input(patient_family_name="N" * 300), profile())
    with pytest.raises(InvalidOru):  # an unescaped delimiter in OBX-5 is checked every time
        validate_oru("MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|X|P|2.4\rOBX|1|TX|c||a^b", "2.4")


def test_the_study_instance_uid_goes_in_a_first_obx_only_when_the_profile_asks() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    with_uid = segments(
        build_oru(oru_input(study_instance_uid=uid), profile(study_uid_obx=True)).text
    )
    first = next(s for s in with_uid if s[0] == "OBX")
    assert (first[2], first[3], first[5]) == ("ST", "113014^DICOM Study^DCM", uid)
    without = segments(build_oru(oru_input(study_instance_uid=uid), profile()).text)
    assert all(uid not in "|".join(s) for s in without)
    with pytest.raises(OutboundError):
        build_oru(oru_input(study_instance_uid="1.2.x|y"), profile(study_uid_obx=True))


@pytest.mark.parametrize("value_type", ["TX", "FT"])
def test_our_inbound_er7_reader_reads_the_report_back_unchanged(value_type: str) -> None:
    from hl7.er7 import Er7Message

    built = build_oru(oru_input(impression=""), profile(text_value_type=value_type))
    message = Er7Message(built.payload)
    assert [s.name for s in message.segments].count("MSH") == 1
    obx = [s for s in message.segments if s.name == "OBX"]
    text = [s.get(5, component=0) or "" for s in obx]
    lines = expected_lines(NASTY_REPORT)
    if value_type == "FT":
        assert text[0].split("\n") == lines  # \.br\ read as a line break
    else:
        assert text == lines
    pid = next(s for s in message.segments if s.name == "PID")
    assert pid.get(3, repetition=2) == "RW6-123&45"
