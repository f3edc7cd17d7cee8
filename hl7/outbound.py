"""ORU^R01 building for a trust's RIS, and reading the ACK that comes back.

This module owns everything we *write* in HL7 v2 (HL7 v2.5.1 ch.2 encoding, ch.7
ORU^R01; IHE RAD-28 style): one function, `build_oru`, turns a plain `OruInput`
(data the service gathers from the database) and the trust's outbound profile
(`Trust.hl7_profile["outbound"]`, see `OutboundProfile`) into the bytes sent
over MLLP; `read_ack` decides what an ACK means for the message we sent.

Write strictly. Every value that came from a person or a RIS goes through
`escape()` exactly once: the five delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``,
control characters (CR, LF, VT, FS...) cannot survive into a field, and
characters outside the trust's character set (MSH-18) are transliterated. So a
report containing ``|``, ``^``, ``&``, ``~``, ``\\`` or a line starting ``MSH|``
can neither break a field nor forge a segment.

Why the ER7 text is written here and hl7apy only checks it: hl7apy 1.3.5's own
serialiser escapes a value on output with a regex that leaves a typed ``\\F\\``
or ``\\H\\`` alone (the RIS would decode a radiologist's literal ``\\F\\`` as
``|``) and escapes a hand-written ``\\.br\\`` or ``\\Xhh\\`` a second time; and
when it parses, OBX-5 ("varies") is typed ST whatever OBX-2 says, so a ``^``
typed in a report splits into components and a 300-character line fails ST's
199 limit. We therefore escape in one place (`escape`), then `validate_oru`
parses the result with hl7apy at STRICT level for the message's version
(segment order, groups, field data types and lengths, MSH-9 structure) with
each OBX-5 checked separately against the type OBX-2 declares.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

SUPPORTED_VERSIONS = ("2.3.1", "2.4", "2.5.1")
FIELD_SEP = "|"
ENCODING_CHARS = "^~\\&"  # MSH-2: component, repetition, escape, sub-component

# MSH-18 values (HL7 table 0211) we write, and the Python codec for each.
_CHARSETS = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}

# Punctuation that word processors put into reports, spelt in ASCII for receivers without it.
_ASCII_SPELLING = {
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u2026": "...",
    "\u2022": "*",
    "\u00b7": ".",
    "\u00a0": " ",
    "\u00d7": "x",
    "\u00b5": "u",
    "\u00b0": " deg",
    "\u00b1": "+/-",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u00df": "ss",
    "\u00e6": "ae",
    "\u00c6": "AE",
    "\u00f8": "o",
    "\u00d8": "O",
    "\u0153": "oe",
    "\u0152": "OE",
    "\u0142": "l",
    "\u0141": "L",
    "\u00a3": "GBP",
    "\u20ac": "EUR",
}


class OutboundError(ValueError):
    """The ORU cannot be built as asked (bad profile, unsupported version, invalid result)."""


# --- escaping -------------------------------------------------------------------------------


def _fits(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _spell_for(ch: str, codec: str) -> str:
    """A character the target character set cannot carry, spelt with characters it can."""
    if ch in _ASCII_SPELLING and all(_fits(c, codec) for c in _ASCII_SPELLING[ch]):
        return _ASCII_SPELLING[ch]
    decomposed = unicodedata.normalize("NFKD", ch)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c) and _fits(c, codec))
    return kept if kept else "?"


def escape(value: object, *, charset: str = "UNICODE UTF-8") -> str:
    """Escape one leaf value for an ER7 text field (HL7 v2.5.1 section 2.7).

    ``\\`` first, then ``| ^ & ~``; control characters (including CR and LF, which
    would end a segment, and MLLP's VT/FS) become a space; characters the MSH-18
    character set cannot carry are transliterated (é -> e, en dash -> -).
    """
    if value is None:
        return ""
    text = str(value)
    codec = _CHARSETS.get(charset, "utf-8")
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append("\\E\\")
        elif ch == "|":
            out.append("\\F\\")
        elif ch == "^":
            out.append("\\S\\")
        elif ch == "&":
            out.append("\\T\\")
        elif ch == "~":
            out.append("\\R\\")
        elif ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029":
            out.append(" ")
        elif ch < "\x80" or _fits(ch, codec):
            out.append(ch)
        else:
            out.append(escape(_spell_for(ch, codec), charset="ASCII"))
    return "".join(out)


def _cx(*components: object, charset: str) -> str:
    """A composite value from leaf values: components joined by ^, trailing empties dropped."""
    parts = [escape(c, charset=charset) for c in components]
    while parts and parts[-1] == "":
        parts.pop()
    return "^".join(parts)


def _sub(*subcomponents: object, charset: str) -> str:
    parts = [escape(c, charset=charset) for c in subcomponents]
    while parts and parts[-1] == "":
        parts.pop()
    return "&".join(parts)


# --- profile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboundProfile:
    """How one trust's RIS wants its ORU^R01 (from ``Trust.hl7_profile["outbound"]``).

    Every key is optional; the defaults suit an IHE SWF-style v2.4 RIS. Keys:
    ``version`` (2.3.1 | 2.4 | 2.5.1), ``sending_application``/``sending_facility``
    (MSH-3/4: us), ``receiving_application``/``receiving_facility`` (MSH-5/6: the
    RIS; the service fills them from the trust when the profile leaves them out),
    ``processing_id`` (MSH-11), ``accept_ack_type``/``application_ack_type``
    (MSH-15/16; empty = original mode), ``character_set`` (MSH-18: "8859/1",
    "UNICODE UTF-8", "ASCII"...), ``text_value_type`` ("TX": one OBX per line;
    "FT": one OBX per section, lines joined by ``\\.br\\``; "ST": one OBX per line,
    long lines wrapped at 199), ``impression_separate`` (impression in its own
    OBX group), ``observation_ids`` (OBX-3 per section: report/impression/addendum,
    each [code, text, coding system]), ``urgent_abnormal_flag`` (OBX-8 on every
    line of an urgent report; "" for none), ``urgent_priority`` (OBR-5 for an
    urgent report; "" for none), ``accession_field`` (OBR-18/19/20/21 or "" when the
    accession number already travels in OBR-3), ``responsible_observer_in_obx16``,
    ``timezone`` and ``include_utc_offset`` (times are local wall-clock with
    +hhmm), ``ack_timeout_seconds``, ``negative_ack_retries`` (AE/AR answers
    before the message is parked for a person), ``retry_base_seconds`` and
    ``retry_max_seconds`` (exponential backoff with jitter between tries),
    ``study_uid_obx`` (the Study Instance UID, when known, in a first OBX
    ``113014^DICOM Study^DCM`` of type ST, as dcm4che's IHE RAD-28 examples do; off by default
    because some RIS print every OBX-5 into the report), ``tls``/``tls_verify``/``tls_ca_file``.
    """

    version: str = "2.4"
    sending_application: str = "WORKLIST"
    sending_facility: str = "REGION"
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    accept_ack_type: str = ""
    application_ack_type: str = ""
    character_set: str = "8859/1"
    text_value_type: str = "TX"
    impression_separate: bool = True
    observation_ids: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: {
            "report": ("18782-3", "Radiology Study observation", "LN"),
            "impression": ("19005-8", "Radiology Study impression", "LN"),
            "addendum": ("ADDENDUM", "Addendum", "L"),
        }
    )
    urgent_abnormal_flag: str = "A"
    urgent_priority: str = "S"
    accession_field: str = "OBR-18"
    responsible_observer_in_obx16: bool = False
    timezone: str = "Europe/London"
    include_utc_offset: bool = True
    ack_timeout_seconds: float = 30.0
    negative_ack_retries: int = 3
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    study_uid_obx: bool = False
    tls: bool = False
    tls_verify: bool = True
    tls_ca_file: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, **fallbacks: Any) -> OutboundProfile:
        """Build from the profile dict; ``fallbacks`` (e.g. receiving_facility from the
        trust) apply only where the dict leaves a key out or empty. Unknown keys are an error,
        so a misspelt profile key is found when the trust is configured, not at 3 a.m."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OutboundError(f"unknown outbound profile keys: {', '.join(unknown)}")
        for key, value in fallbacks.items():
            if key in known and value not in (None, "") and data.get(key) in (None, ""):
                data[key] = value
        if "observation_ids" in data:
            merged = dict(cls().observation_ids)
            merged.update({k: tuple(v) for k, v in data["observation_ids"].items()})
            data["observation_ids"] = merged
        profile = cls(**data)
        profile.check()
        return profile

    def check(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise OutboundError(
                f"HL7 version {self.version!r} is not one we write "
                f"({', '.join(SUPPORTED_VERSIONS)})"
            )
        if self.text_value_type not in ("TX", "FT", "ST"):
            raise OutboundError("text_value_type must be TX, FT or ST")
        if self.character_set not in _CHARSETS:
            raise OutboundError(f"character_set {self.character_set!r} is not supported")
        if self.accession_field not in ("", "OBR-18", "OBR-19", "OBR-20", "OBR-21"):
            raise OutboundError("accession_field must be OBR-18, OBR-19, OBR-20, OBR-21 or ''")
        for section in ("report", "impression", "addendum"):
            if section not in self.observation_ids:
                raise OutboundError(f"observation_ids has no {section!r} entry")

    @property
    def codec(self) -> str:
        return _CHARSETS[self.character_set]


# --- input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientIdentifier:
    """One PID-3 repetition (CX) as the trust sent it: id^check^scheme^authority^type^facility."""

    id: str
    assigning_authority: str = ""
    type_code: str = ""
    assigning_facility: str = ""
    check_digit: str = ""
    check_digit_scheme: str = ""


@dataclass(frozen=True)
class OrderNumber:
    """An EI (ORC-2/3, OBR-2/3) exactly as the trust sent it: id^namespace^universal id^type."""

    id: str
    namespace: str = ""
    universal_id: str = ""
    universal_id_type: str = ""


@dataclass(frozen=True)
class Clinician:
    """A radiologist as HL7 names them (OBR-32/33 CN inside NDL; OBX-16 XCN)."""

    id: str
    family_name: str = ""
    given_name: str = ""
    prefix: str = ""
    assigning_authority: str = ""


@dataclass(frozen=True)
class Addendum:
    text: str
    signed_at: datetime | None = None
    author: Clinician | None = None


@dataclass(frozen=True)
class OruInput:
    """Everything one ORU^R01 carries, as plain data (the service fills it from the study)."""

    control_id: str
    message_time: datetime
    status: str  # OBR-25 / OBX-11: P, F or C (see worklist.domain.reports.result_status)
    patient_identifiers: Sequence[PatientIdentifier]
    accession_number: str
    procedure_code: str
    procedure_name: str
    report_time: datetime
    radiologist: Clinician
    text: str
    placer_order_number: OrderNumber | None = None
    filler_order_number: OrderNumber | None = None
    procedure_coding_system: str = ""
    patient_family_name: str = ""
    patient_given_name: str = ""
    birth_date: date | None = None
    sex: str = ""
    patient_class: str = ""
    modality: str = ""
    exam_time: datetime | None = None
    trainee: Clinician | None = None
    impression: str = ""
    addenda: Sequence[Addendum] = ()
    urgent: bool = False
    study_instance_uid: str = ""


# --- building -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltOru:
    control_id: str
    text: str  # ER7, segments separated by CR
    payload: bytes  # text encoded in the profile's character set; what goes inside MLLP framing


def _ts(value: datetime | date | None, profile: OutboundProfile, *, seconds: bool = True) -> str:
    """HL7 TS/DTM: local wall-clock time of the trust with a +hhmm offset (BST is not UTC)."""
    if value is None:
        return ""
    if not isinstance(value, datetime):
        return value.strftime("%Y%m%d")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    local = value.astimezone(ZoneInfo(profile.timezone))
    text = local.strftime("%Y%m%d%H%M%S" if seconds else "%Y%m%d%H%M")
    if profile.include_utc_offset:
        text += local.strftime("%z")
    return text


def _text_lines(text: str) -> list[str]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return lines


def _wrap(line: str, width: int) -> list[str]:
    """Split a line for ST (199 characters) at spaces where possible."""
    out: list[str] = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width)
        if cut <= 0:
            cut = width
        out.append(line[:cut])
        line = line[cut:].lstrip(" ")
    out.append(line)
    return out


def _clinician_cn(c: Clinician, charset: str) -> str:
    """CN as the first component of NDL (OBR-32/33): id&family&given&&&prefix&&&authority."""
    return _sub(
        c.id,
        c.family_name,
        c.given_name,
        "",
        "",
        c.prefix,
        "",
        "",
        c.assigning_authority,
        charset=charset,
    )


def _clinician_xcn(c: Clinician, charset: str) -> str:
    return _cx(c.id, c.family_name, c.given_name, "", "", c.prefix, charset=charset)


def _fields(name: str, values: Mapping[int, str]) -> str:
    """A segment from {field number: ER7 text}; missing fields are empty."""
    top = max((i for i, v in values.items() if v), default=0)
    return FIELD_SEP.join([name] + [values.get(i, "") for i in range(1, top + 1)])


def _ei(n: OrderNumber | None, charset: str) -> str:
    if n is None:
        return ""
    return _cx(n.id, n.namespace, n.universal_id, n.universal_id_type, charset=charset)


def build_oru(inp: OruInput, profile: OutboundProfile, *, validate: bool = True) -> BuiltOru:
    """Build the ORU^R01 for one signed report version (whole report, every time: many RIS
    replace the stored report on each ORU for the same order)."""
    profile.check()
    status = inp.status.upper()
    if status not in ("P", "F", "C", "X"):
        raise OutboundError(f"result status {inp.status!r} is not P, F, C or X")
    if not inp.control_id or len(inp.control_id) > 20:
        raise OutboundError("the control id must be 1-20 characters (MSH-10 up to v2.6)")
    cs = profile.character_set
    v = profile.version
    segments: list[str] = []

    msh = {
        1: ENCODING_CHARS,  # MSH-2 (MSH-1 is the separator itself, written by the join)
        2: _cx(profile.sending_application, charset=cs),
        3: _cx(profile.sending_facility, charset=cs),
        4: _cx(profile.receiving_application, charset=cs),
        5: _cx(profile.receiving_facility, charset=cs),
        6: _ts(inp.message_time, profile),
        8: "ORU^R01" if v == "2.3" else "ORU^R01^ORU_R01",
        9: escape(inp.control_id, charset="ASCII"),
        10: escape(profile.processing_id, charset="ASCII"),
        11: v,
        14: escape(profile.accept_ack_type, charset="ASCII"),
        15: escape(profile.application_ack_type, charset="ASCII"),
        17: "" if cs in ("", "ASCII") else cs,
    }
    segments.append(_fields("MSH", msh))

    pid3 = "~".join(
        _cx(
            p.id,
            p.check_digit,
            p.check_digit_scheme,
            p.assigning_authority,
            p.type_code,
            p.assigning_facility,
            charset=cs,
        )
        for p in inp.patient_identifiers
    )
    if not pid3:
        raise OutboundError("PID-3 needs at least one identifier")
    segments.append(
        _fields(
            "PID",
            {
                1: "1",
                3: pid3,
                5: _cx(inp.patient_family_name, inp.patient_given_name, charset=cs),
                7: _ts(inp.birth_date, profile),
                8: escape(inp.sex, charset=cs),
            },
        )
    )
    segments.append(_fields("PV1", {1: "1", 2: escape(inp.patient_class or "U", charset=cs)}))

    placer, filler = _ei(inp.placer_order_number, cs), _ei(inp.filler_order_number, cs)
    if not placer and not filler:
        raise OutboundError("the ORU needs the trust's placer or filler order number")
    segments.append(_fields("ORC", {1: "RE", 2: placer, 3: filler, 5: "CM"}))

    obr: dict[int, str] = {
        1: "1",
        2: placer,
        3: filler,
        4: _cx(inp.procedure_code, inp.procedure_name, inp.procedure_coding_system, charset=cs),
        7: _ts(inp.exam_time, profile),
        22: _ts(inp.report_time, profile),
        24: escape(inp.modality, charset=cs),
        25: status,
        32: _clinician_cn(inp.radiologist, cs),
    }
    if inp.urgent and profile.urgent_priority:
        obr[5] = escape(profile.urgent_priority, charset=cs)
    if profile.accession_field and inp.accession_number:
        obr[int(profile.accession_field.split("-")[1])] = escape(inp.accession_number, charset=cs)
    if inp.trainee is not None:
        obr[33] = _clinician_cn(inp.trainee, cs)
    segments.append(_fields("OBR", obr))

    sections: list[tuple[str, str]] = []
    body, impression = inp.text, inp.impression
    if impression and not profile.impression_separate:
        body = f"{body}\n\nImpression:\n{impression}"
        impression = ""
    sections.append(("report", body))
    if impression:
        sections.append(("impression", impression))
    for add in inp.addenda:
        heading = "Addendum"
        if add.signed_at is not None:
            local = add.signed_at.astimezone(ZoneInfo(profile.timezone))
            heading = f"Addendum {local:%d/%m/%Y %H:%M}"
        if add.author is not None:
            heading += f" by {add.author.given_name} {add.author.family_name}".rstrip()
        sections.append(("addendum", f"{heading}:\n{add.text}"))

    set_id = 0
    report_ts = _ts(inp.report_time, profile)
    if profile.study_uid_obx and inp.study_instance_uid:
        if (
            not re.fullmatch(r"[0-9]+(\.[0-9]+)*", inp.study_instance_uid)
            or len(inp.study_instance_uid) > 64
        ):
            raise OutboundError(
                "the Study Instance UID is not a DICOM UID (digits and dots, <= 64)"
            )
        set_id += 1
        segments.append(
            _fields(
                "OBX",
                {1: str(set_id), 2: "ST", 3: "113014^DICOM Study^DCM", 4: "0",
                 5: inp.study_instance_uid, 11: status, 14: report_ts},
            )
        )  # fmt: skip
    abnormal = profile.urgent_abnormal_flag if inp.urgent else ""
    observer = _clinician_xcn(inp.radiologist, cs) if profile.responsible_observer_in_obx16 else ""
    for sub_id, (section, text) in enumerate(sections, start=1):
        code = profile.observation_ids[section]
        obx3 = _cx(*code, charset=cs)
        lines = _text_lines(text) or [""]
        if profile.text_value_type == "FT":
            values = ["\\.br\\".join(escape(line, charset=cs) for line in lines)]
        elif profile.text_value_type == "ST":
            # wrap the text, then split again: escaping can push a line past 199
            values = [
                piece
                for line in lines
                for part in _wrap(line, 199)
                for piece in _split_escaped(escape(part, charset=cs), 199)
            ]
        else:
            values = [escape(line, charset=cs) for line in lines]
        for value in values:
            set_id += 1
            segments.append(
                _fields(
                    "OBX",
                    {
                        1: str(set_id),
                        2: profile.text_value_type,
                        3: obx3,
                        4: str(sub_id),
                        5: value,
                        8: escape(abnormal, charset=cs),
                        11: status,
                        14: report_ts,
                        16: observer,
                    },
                )
            )

    text = "\r".join(segments) + "\r"
    payload = text.encode(profile.codec)
    built = BuiltOru(control_id=inp.control_id, text=text, payload=payload)
    if validate:
        check_oru(text, v)
    return built


def payload_bytes(er7: str) -> bytes:
    """Encode stored ER7 text in the character set its own MSH-18 declares (the outbox keeps
    text; the bytes on the wire must match what the header says)."""
    msh = er7.split("\r", 1)[0].split(FIELD_SEP)
    charset = msh[17] if len(msh) > 17 else ""
    return er7.encode(_CHARSETS.get(charset, "utf-8"), errors="replace")


def _split_escaped(value: str, width: int) -> list[str]:
    """Split already-escaped text without cutting an escape sequence in half."""
    out: list[str] = []
    current = ""
    for token in re.findall(r"\\[^\\]*\\|[^\\]", value):
        if len(current) + len(token) > width:
            out.append(current)
            current = ""
        current += token
    out.append(current)
    return out


# --- validation -----------------------------------------------------------------------------

_ESCAPE_SEQ_TEXT = re.compile(r"\\(?:[FSTRE]|X[0-9A-Fa-f]+|H|N)\\")
_ESCAPE_SEQ_FT = re.compile(
    r"\\(?:[FSTRE]|X[0-9A-Fa-f]+|H|N|\.br|\.sp ?\d*|\.in ?[+-]?\d*|"
    r"\.ti ?[+-]?\d*|\.sk ?\d*|\.ce|\.fi|\.nf)\\"
)
_TEXT_MAX = {"ST": 199, "TX": 65536, "FT": 65536}


class InvalidOru(OutboundError):
    """The built message fails hl7apy's structure for its version, or a text value is unsafe."""


def check_text_value(value: str, value_type: str) -> None:
    """OBX-5 of a text type: no raw delimiter, no control character, only legal escapes."""
    pattern = _ESCAPE_SEQ_FT if value_type == "FT" else _ESCAPE_SEQ_TEXT
    stripped = pattern.sub("", value)
    bad = [c for c in stripped if c in "|^~&\\" or c < " "]
    if bad:
        raise InvalidOru(f"OBX-5 ({value_type}) carries an unescaped {bad[0]!r}")
    if len(value) > _TEXT_MAX[value_type]:
        raise InvalidOru(f"OBX-5 ({value_type}) is longer than {_TEXT_MAX[value_type]}")


def validate_oru(er7: str, version: str) -> Any:
    """Check an ORU^R01 against hl7apy's message structure for ``version`` at STRICT level.

    Returns the parsed hl7apy Message (with OBX-5 placeholders). Raises InvalidOru.
    """
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    segments = [s for s in er7.split("\r") if s]
    for s in segments:
        if "\n" in s or "\x0b" in s or "\x1c" in s:
            raise InvalidOru("a segment carries LF, VT or FS")
    checked: list[str] = []
    for s in segments:
        if s.startswith("OBX|"):
            parts = s.split("|")
            if len(parts) > 5:
                check_text_value(parts[5], parts[2])
                parts[5] = "-"  # hl7apy cannot type OBX-5 from OBX-2 when parsing
            s = "|".join(parts)
        checked.append(s)
    try:
        message = parse_message(
            "\r".join(checked),
            validation_level=VALIDATION_LEVEL.STRICT,
            find_groups=True,
        )
        message.validate()
    except (HL7apyException, ValueError) as exc:
        raise InvalidOru(f"ORU^R01 v{version} fails validation: {exc}") from exc
    if message.version != version or message.name != "ORU_R01":
        raise InvalidOru(f"built {message.name} v{message.version}, wanted ORU_R01 v{version}")
    return message


_VALID_SHAPES: set[tuple[Any, ...]] = set()
_MAX_SHAPES = 4096


def _shape(segments: list[str]) -> tuple[Any, ...]:
    """What hl7apy's verdict depends on, without the values: segment order, and per field its
    repetitions, components and sub-components, each leaf's length as a power-of-two class, the
    OBX-2 type and the characters of MSH-1/2/9/12."""
    shape: list[Any] = []
    for seg in segments:
        fields_ = seg.split("|")
        row: list[Any] = [fields_[0]]
        for i, f in enumerate(fields_[1:], start=1):
            if fields_[0] == "MSH" and i in (1, 8, 11) or fields_[0] == "OBX" and i == 2:
                row.append(f)
                continue
            row.append(tuple(
                tuple(tuple(len(sub).bit_length() for sub in comp.split("&"))
                      for comp in rep.split("^"))
                for rep in f.split("~")
            ))  # fmt: skip
        shape.append(tuple(row))
    return tuple(shape)


def check_oru(er7: str, version: str) -> None:
    """`validate_oru`, remembered per message shape: hl7apy's STRICT parse and validation
    cost about 25 ms, which signing at 50 reports a second cannot afford for every message.
    A shape (segments, fields, repetitions, components, leaf length classes) that hl7apy
    accepted once is accepted again; every OBX-5 is still checked every time. A new shape,
    or a longer value, goes through hl7apy in full."""
    segments = [s for s in er7.split("\r") if s]
    for s in segments:
        if "\n" in s or "\x0b" in s or "\x1c" in s:
            raise InvalidOru("a segment carries LF, VT or FS")
        if s.startswith("OBX|"):
            parts = s.split("|")
            if len(parts) > 5:
                check_text_value(parts[5], parts[2])
    key = (version, _shape([s if not s.startswith("OBX|") else _blank_obx5(s) for s in segments]))
    if key in _VALID_SHAPES:
        return
    validate_oru(er7, version)
    if len(_VALID_SHAPES) >= _MAX_SHAPES:
        _VALID_SHAPES.clear()
    _VALID_SHAPES.add(key)


def _blank_obx5(segment: str) -> str:
    parts = segment.split("|")
    if len(parts) > 5:
        parts[5] = "-"
    return "|".join(parts)


# --- reading the ACK ------------------------------------------------------------------------


@dataclass(frozen=True)
class AckOutcome:
    """What the RIS said about one message we sent."""

    outcome: str  # delivered | error (AE/CE) | reject (AR/CR) | mismatch | unreadable
    code: str = ""  # MSA-1 as received
    control_id: str = ""  # MSA-2 as received
    text: str = ""  # MSA-3 and ERR text, unescaped, for the person reading the outbox

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


def unescape(value: str, encoding_chars: str = ENCODING_CHARS, field_sep: str = "|") -> str:
    """Decode ER7 escape sequences in a text value we read (ACK text, ERR diagnostics)."""
    comp, rep, esc, sub = (list(encoding_chars) + ["", "", "", ""])[:4]
    if not esc:
        return value
    table = {"F": field_sep, "S": comp, "T": sub, "R": rep, "E": esc, ".br": "\n", "H": "", "N": ""}
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == esc:
            end = value.find(esc, i + 1)
            if end > i:
                seq = value[i + 1 : end]
                if seq in table:
                    out.append(table[seq])
                    i = end + 1
                    continue
                if seq.startswith("X") and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", seq):
                    out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def read_ack(ack: bytes | str, sent_control_id: str) -> AckOutcome:
    """Decide what an ACK means for the message whose MSH-10 was ``sent_control_id``.

    Read tolerantly (any delimiters from MSH-1/2, CR/LF/CRLF segment ends, a v2.3
    MSA-3 or a v2.5 ERR). The ACK counts only when MSA-2 equals our control id
    exactly (HL7 v2.5.1 2.14.8): an ACK for another message is a "mismatch".
    """
    text = ack.decode("latin-1") if isinstance(ack, bytes) else ack
    text = text.strip("\x0b\x1c\r\n ")
    lines = [s for s in re.split(r"\r\n|\r|\n", text) if s]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        return AckOutcome("unreadable", text="no MSH segment")
    sep = lines[0][3]
    enc = lines[0][4:].split(sep, 1)[0]
    msa = next((s.split(sep) for s in lines if s.startswith("MSA" + sep)), None)
    if msa is None or len(msa) < 2:
        return AckOutcome("unreadable", text="no MSA segment")
    code = msa[1].strip().upper()
    control = msa[2] if len(msa) > 2 else ""
    notes: list[str] = []
    if len(msa) > 3 and msa[3]:
        notes.append(unescape(msa[3], enc, sep))
    for s in lines:
        if s.startswith("ERR" + sep):
            parts = s.split(sep)
            detail = [p for p in (parts[7:9] if len(parts) > 7 else []) if p]
            if not detail:
                # v2.3/2.4 ERR-1 (segment^seq^field^code&text), or v2.5 ERR-3 code^text
                detail = [p for p in parts[1:4] if p]
            notes.extend(
                unescape(d.replace(enc[3:4] or "&", " ").replace(enc[:1], " "), enc, sep)
                for d in detail
            )
    note = "; ".join(dict.fromkeys(n.strip() for n in notes if n.strip()))
    if control != sent_control_id:
        return AckOutcome(
            "mismatch",
            code,
            control,
            f"ACK is for control id {control!r}, we sent {sent_control_id!r}"
            + (f" ({note})" if note else ""),
        )
    if code in ("AA", "CA"):
        return AckOutcome("delivered", code, control, note)
    if code in ("AE", "CE"):
        return AckOutcome("error", code, control, note)
    if code in ("AR", "CR"):
        return AckOutcome("reject", code, control, note)
    return AckOutcome("unreadable", code, control, f"MSA-1 {code!r} is not an acknowledgement code")
