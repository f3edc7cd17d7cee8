"""A fast, tolerant reader of HL7 v2 ER7 ("pipe and hat") messages.

Reading a message here costs a few string splits, not hl7apy's full
structural parse (~12 ms a message): the inbound hot path only needs a few
dozen fields. We read tolerantly (HL7 v2.5.1 chapter 2, sections 2.5-2.7):

* delimiters come from the message itself: MSH-1 is the field separator and
  MSH-2 the encoding characters, in the order component, repetition, escape,
  sub-component (and truncation from v2.7); odd sets such as ``^~\\}`` or a
  three-character ``^~}`` are honoured;
* segments may end in CR, LF or CRLF; a line that is not a segment (no
  three-character name, e.g. after a CR typed into data) is skipped and
  counted in `stray_lines`, never glued onto a neighbour;
* values are split first and unescaped after (section 2.7): ``\\F\\ \\S\\ \\T\\
  \\R\\ \\E\\ \\P\\``, ``\\.br\\`` and the other formatting commands,
  ``\\H\\``/``\\N\\`` highlighting and ``\\Xhh..\\`` bytes; an unknown or
  unterminated escape is kept literally;
* MSH field numbering counts MSH-1 (the separator) as a field, so
  ``get("MSH", 9)`` is the message type as everywhere else;
* bytes are decoded with the character set MSH-18 declares (table 0211); when
  it is empty, unknown or wrong, strict UTF-8 then Windows-1252 are tried and
  the message is flagged (`charset_note`).

Field access returns None for an empty value or the HL7 null ``""``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

from hl7.errors import MalformedMessage

LONDON = ZoneInfo("Europe/London")

# HL7 table 0211 (alternate character sets) -> Python codec.
_CHARSETS: dict[str, str] = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-8",
}

_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}")
_BATCH_HEADERS = ("FHS", "BHS")
_BATCH_SEGMENTS = frozenset({"FHS", "BHS", "BTS", "FTS"})


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators a message declared in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str | None = "\\"
    subcomponent: str | None = "&"
    truncation: str | None = None

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it would be written for these delimiters."""
        return "".join(
            c
            for c in (
                self.component,
                self.repetition,
                self.escape,
                self.subcomponent,
                self.truncation,
            )
            if c
        )

    @classmethod
    def from_msh(cls, field_separator: str, encoding_characters: str) -> Delimiters:
        """Read MSH-1/MSH-2; refuse sets that cannot be split unambiguously."""
        chars = encoding_characters
        if not 2 <= len(chars) <= 5:
            raise MalformedMessage(
                f"MSH-2 must hold 2 to 5 encoding characters, got {len(chars)}",
                segment="MSH",
                sequence=1,
                field=2,
            )
        every = field_separator + chars
        if len(set(every)) != len(every) or any(c.isalnum() or c in "\r\n " for c in every):
            raise MalformedMessage(
                "MSH-1/MSH-2 delimiters must be distinct punctuation characters",
                segment="MSH",
                sequence=1,
                field=2,
            )
        padded = list(chars) + [None] * (5 - len(chars))
        return cls(
            field=field_separator,
            component=padded[0],  # type: ignore[arg-type]
            repetition=padded[1],  # type: ignore[arg-type]
            escape=padded[2],
            subcomponent=padded[3],
            truncation=padded[4],
        )


STANDARD_DELIMITERS = Delimiters()


def unescape(value: str, delimiters: Delimiters, codec: str = "latin-1") -> str:
    """Replace HL7 escape sequences in one already-split value (HL7 v2.5.1 section 2.7)."""
    esc = delimiters.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        j = value.find(esc, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(esc, j + 1)
        if k < 0:
            out.append(value[j:])
            break
        replacement = _escape_sequence(value[j + 1 : k], delimiters, codec)
        out.append(value[j : k + 1] if replacement is None else replacement)
        i = k + 1
    return "".join(out)


def _escape_sequence(seq: str, d: Delimiters, codec: str) -> str | None:
    """The text an escape sequence stands for; None to keep it literally."""
    if not seq:
        return None
    simple = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repetition,
        "E": d.escape,
        "P": d.truncation,
        "H": "",
        "N": "",
    }
    if seq in simple:
        return simple[seq] or ""
    head = seq[0]
    if head == "X" and len(seq) > 1:
        hexdigits = seq[1:]
        try:
            return bytes.fromhex(hexdigits).decode(codec)
        except (ValueError, LookupError):
            return None
    if head == ".":
        command, _, arg = seq[1:].partition(" ")
        count = int(arg) if arg.strip().isdigit() else 1
        if command == "br":
            return "\n"
        if command == "sp":
            return "\n" * max(count, 1)
        if command == "sk":
            return " " * max(count, 1)
        if command in ("in", "ti", "ce", "fi", "nf"):
            return ""
        return None
    if head in ("C", "M"):
        # ISO 2022 character set switching: the switch itself carries no text.
        return ""
    return None


def _present(value: str | None) -> str | None:
    """None for empty values and the HL7 null ``""``."""
    if not value or value == '""':
        return None
    return value


class Segment:
    """One segment: its name and its raw (still escaped) fields, numbered as in the standard."""

    __slots__ = ("name", "fields", "_message")

    def __init__(self, name: str, fields: list[str], message: Er7Message) -> None:
        self.name = name
        self.fields = fields
        self._message = message

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {len(self.fields) - 1} fields)"

    def raw(self, field: int) -> str:
        """Field `field` exactly as sent (escaped, with its repetitions); "" when absent."""
        if field < 1 or field >= len(self.fields):
            return ""
        return self.fields[field]

    def repetitions(self, field: int) -> list[str]:
        """The raw repetitions of a field; an empty field has none."""
        raw = self.raw(field)
        if not raw:
            return []
        if self.name == "MSH" and field <= 2:
            return [raw]
        return raw.split(self._message.delimiters.repetition)

    def get(
        self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 1
    ) -> str | None:
        """One value, unescaped; None when empty.

        `component=0` gives the whole repetition and `subcomponent=0` the whole
        component, both unescaped as text (for free text where a sender left a
        delimiter unescaped).
        """
        raw = self.raw(field)
        if not raw:
            return None
        msg = self._message
        d = msg.delimiters
        if self.name == "MSH" and field <= 2:
            return raw
        if repetition != 1 or d.repetition in raw:
            reps = raw.split(d.repetition)
            if repetition < 1 or repetition > len(reps):
                return None
            raw = reps[repetition - 1]
        return _present(msg.unescape(_pick(raw, d, component, subcomponent)))

    def components(self, field: int, repetition: int = 1) -> list[str | None]:
        """The components of one repetition, each unescaped (sub-components left joined)."""
        reps = self.repetitions(field)
        if repetition < 1 or repetition > len(reps):
            return []
        return self._message.split_components(reps[repetition - 1])


def _pick(raw: str, d: Delimiters, component: int, subcomponent: int) -> str:
    if component == 0:
        return raw
    if component != 1 or d.component in raw:
        parts = raw.split(d.component)
        if component > len(parts):
            return ""
        raw = parts[component - 1]
    if subcomponent == 0 or not d.subcomponent:
        return raw if subcomponent in (0, 1) else ""
    if subcomponent != 1 or d.subcomponent in raw:
        subs = raw.split(d.subcomponent)
        if subcomponent > len(subs):
            return ""
        raw = subs[subcomponent - 1]
    return raw


@dataclass(frozen=True, slots=True)
class ReceivedHeader:
    """The MSH fields an ACK needs, raw as received (MSH-10 byte for byte)."""

    delimiters: Delimiters
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""
    codec: str = "latin-1"

    def component(self, raw: str, index: int = 1) -> str:
        """Component `index` of a raw header field (unescaped, "" when absent)."""
        parts = raw.split(self.delimiters.component)
        if index > len(parts):
            return ""
        return unescape(parts[index - 1], self.delimiters)

    @property
    def message_code(self) -> str:
        return self.component(self.message_type, 1)

    @property
    def trigger(self) -> str:
        return self.component(self.message_type, 2)

    @property
    def version_id(self) -> str:
        return self.component(self.version, 1).strip()

    @property
    def processing_mode(self) -> str:
        return self.component(self.processing_id, 1).strip()


def _header_from_fields(fields: list[str], delimiters: Delimiters, codec: str) -> ReceivedHeader:
    def f(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    return ReceivedHeader(
        delimiters=delimiters,
        sending_application=f(3),
        sending_facility=f(4),
        receiving_application=f(5),
        receiving_facility=f(6),
        message_type=f(9),
        control_id=f(10),
        processing_id=f(11),
        version=f(12),
        accept_ack_type=f(15),
        application_ack_type=f(16),
        charset=f(18),
        codec=codec,
    )


def _split_msh(line: str) -> tuple[list[str], Delimiters]:
    """MSH line -> (fields numbered so that fields[1] is MSH-1, delimiters)."""
    if len(line) < 8 or not line.startswith("MSH"):
        raise MalformedMessage(
            "message does not start with an MSH segment", segment="MSH", sequence=1
        )
    fs = line[3]
    rest = line[4:]
    end = rest.find(fs)
    encoding = rest if end < 0 else rest[:end]
    delimiters = Delimiters.from_msh(fs, encoding)
    fields = ["MSH", fs, *rest.split(fs)]
    return fields, delimiters


def _first_line(raw: bytes) -> bytes:
    start = len(raw) - len(raw.lstrip(b"\r\n\t \xef\xbb\xbf"))
    cut = len(raw)
    for sep in (b"\r", b"\n"):
        pos = raw.find(sep, start)
        if 0 <= pos < cut:
            cut = pos
    return raw[start:cut]


def read_header(raw: bytes) -> ReceivedHeader:
    """Read only the MSH of raw bytes (ASCII-safe), e.g. the head of an oversize frame.

    Raises MalformedMessage when there is no readable MSH.
    """
    line = _first_line(raw).decode("latin-1")
    fields, delimiters = _split_msh(line)
    declared = _component1(fields[18] if len(fields) > 18 else "", delimiters)
    codec = _CHARSETS.get(declared.upper(), "latin-1")
    if codec == "ascii":
        codec = "latin-1"
    return _header_from_fields(fields, delimiters, codec)


def _component1(raw: str, d: Delimiters) -> str:
    return raw.split(d.repetition)[0].split(d.component)[0].strip()


def decode_payload(raw: bytes, declared: str) -> tuple[str, str, str | None]:
    """Decode message bytes by MSH-18; returns (text, codec used, note when we had to guess)."""
    key = declared.strip().upper()
    codec = _CHARSETS.get(key)
    if codec is None:
        note = f"unknown MSH-18 {declared!r}"
    else:
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            note = f"bytes are not {declared or 'ASCII'} as MSH-18 declares"
        else:
            if codec in ("latin-1", "iso8859-15") and not raw.isascii():
                # Corpus trap: "8859/1" declared, UTF-8 sent. Valid multi-byte UTF-8 is
                # very unlikely in genuine Latin-1 text, so prefer it and say so.
                try:
                    utf8 = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return text, codec, None
                return utf8, "utf-8", f"MSH-18 {declared!r} declared but bytes are UTF-8"
            return text, codec, None
    for fallback in ("utf-8", "cp1252", "latin-1"):
        try:
            return raw.decode(fallback), fallback, f"{note}; decoded as {fallback}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def is_batch(raw: bytes) -> bool:
    """True when the payload is an FHS/BHS batch envelope rather than one message."""
    return _first_line(raw)[:3].decode("latin-1") in _BATCH_HEADERS


def split_batch(raw: bytes) -> list[bytes]:
    """Split an FHS/BHS batch into its messages (HL7 v2.5.1 section 2.10.3).

    Envelope segments (FHS/BHS/BTS/FTS) are dropped; raises MalformedMessage
    when the batch holds content before its first MSH or no MSH at all.
    """
    lines = [line for line in re.split(rb"\r\n|\r|\n", raw) if line.strip()]
    messages: list[list[bytes]] = []
    for line in lines:
        name = line[:3]
        if name.decode("latin-1") in _BATCH_SEGMENTS:
            continue
        if name == b"MSH":
            messages.append([line])
        elif not messages:
            raise MalformedMessage(
                "batch holds segments before its first MSH",
                segment=name.decode("latin-1"),
                sequence=1,
            )
        else:
            messages[-1].append(line)
    if not messages:
        raise MalformedMessage("batch holds no MSH segment", segment="MSH", sequence=1)
    return [b"\r".join(m) + b"\r" for m in messages]


class Er7Message:
    """A parsed message: delimiters, decoded text and its segments in order."""

    __slots__ = (
        "raw",
        "text",
        "delimiters",
        "segments",
        "codec",
        "charset_note",
        "header",
        "stray_lines",
        "_by_name",
    )

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        first = _first_line(raw).decode("latin-1")
        if first[:3] in _BATCH_HEADERS:
            raise MalformedMessage(
                "batch envelope (FHS/BHS): send one message per MLLP frame",
                segment=first[:3],
                sequence=1,
            )
        msh_fields, delimiters = _split_msh(first)
        self.delimiters = delimiters
        declared = _component1(msh_fields[18] if len(msh_fields) > 18 else "", delimiters)
        text, codec, note = decode_payload(raw, declared)
        self.text = text
        self.codec = codec
        self.charset_note = note
        self.segments: list[Segment] = []
        self.stray_lines = 0
        self._by_name: dict[str, list[Segment]] = {}
        self._split_segments(text)
        msh = self.segments[0]
        self.header = _header_from_fields(msh.fields, delimiters, codec)

    def _split_segments(self, text: str) -> None:
        fs = self.delimiters.field
        lines = text.lstrip("\r\n\t \ufeff").replace("\r\n", "\r").replace("\n", "\r").split("\r")
        raw_segments: list[str] = []
        for line in lines:
            if not line:
                continue
            name = line[:3]
            if _SEGMENT_NAME.fullmatch(name) and (len(line) == 3 or line[3] == fs):
                raw_segments.append(line)
            elif line.strip():
                # Not a segment (a CR inside data, a bad segment name): kept out of the
                # segments we read so it cannot corrupt a neighbour's fields, and counted.
                self.stray_lines += 1
        for index, line in enumerate(raw_segments):
            name = line[:3]
            if index == 0:
                fields, _ = _split_msh(line)
            else:
                fields = line.split(fs)
            segment = Segment(name, fields, self)
            self.segments.append(segment)
            self._by_name.setdefault(name, []).append(segment)

    @classmethod
    def parse(cls, raw: bytes) -> Er7Message:
        """Parse one message; raises MalformedMessage when it has no readable MSH."""
        return cls(raw)

    def unescape(self, value: str) -> str:
        return unescape(value, self.delimiters, self.codec if self.codec != "ascii" else "latin-1")

    def split_components(self, raw: str) -> list[str | None]:
        return [_present(self.unescape(c)) for c in raw.split(self.delimiters.component)]

    def segment(self, name: str) -> Segment | None:
        """The first segment called `name`, or None."""
        found = self._by_name.get(name)
        return found[0] if found else None

    def all(self, name: str) -> list[Segment]:
        """Every segment called `name`, in order."""
        return list(self._by_name.get(name, ()))

    def get(
        self,
        segment: str,
        field: int,
        component: int = 1,
        subcomponent: int = 1,
        repetition: int = 1,
    ) -> str | None:
        """A value from the first segment called `segment` (see `Segment.get`)."""
        found = self.segment(segment)
        if found is None:
            return None
        return found.get(field, component, subcomponent, repetition)

    @property
    def message_code(self) -> str:
        return self.get("MSH", 9, 1) or ""

    @property
    def trigger(self) -> str:
        return self.get("MSH", 9, 2) or ""

    @property
    def message_type(self) -> str:
        """`code^trigger`, the routing key (MSH-9.1 and MSH-9.2)."""
        return f"{self.message_code}^{self.trigger}"

    @property
    def control_id(self) -> str:
        """MSH-10 exactly as received (not stripped, not unescaped)."""
        return self.header.control_id

    @property
    def version(self) -> str:
        return (self.get("MSH", 12, 1) or "").strip()


# ---------------------------------------------------------------------------------------
# Dates and times (HL7 DTM/TS: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ])

_TS = re.compile(
    r"(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<frac>\d{1,6}))?(?P<tz>[+-]\d{4})?"
)


def parse_timestamp(value: str | None, default_tz: tzinfo = LONDON) -> datetime | None:
    """An HL7 timestamp as an aware datetime; naive values are in `default_tz` (UK local time).

    Returns None for an empty value; raises ValueError for one that is not a timestamp.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    m = _TS.fullmatch(value)
    if m is None:
        raise ValueError(f"not an HL7 timestamp: {value!r}")
    g = m.groupdict()
    frac = g["frac"] or ""
    micro = int(frac.ljust(6, "0")) if frac else 0
    naive = datetime(
        int(g["y"]),
        int(g["mo"] or 1),
        int(g["d"] or 1),
        int(g["h"] or 0),
        int(g["mi"] or 0),
        int(g["s"] or 0),
        micro,
    )
    tz = g["tz"]
    if tz:
        sign = 1 if tz[0] == "+" else -1
        hours, minutes = int(tz[1:3]), int(tz[3:5])
        if hours > 14 or minutes > 59:
            raise ValueError(f"not an HL7 time zone offset: {tz!r}")
        return naive.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
    return naive.replace(tzinfo=default_tz)


def parse_date(value: str | None) -> date | None:
    """The date part of an HL7 DT/TS (e.g. a date of birth); None when empty or unreadable."""
    if not value:
        return None
    digits = value.strip()[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None
