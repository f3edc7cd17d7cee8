"""Building the ACK we return for every inbound message (HL7 v2.5.1 chapter 2, 2.9 and 2.14).

Original mode answers AA/AE/AR after processing; enhanced mode answers with a
commit ACK CA/CE/CR once the message is safely stored (MSH-15 valued). The
ACK is built by string, not hl7apy, because it is on the hot path of every
message; what goes into it is escaped here, and the layout follows the
received version:

* MSH: our application/facility, theirs swapped into MSH-5/6, their delimiters,
  processing id, version and character set echoed; MSH-9 ``ACK^<trigger>^ACK``
  (the third component only from v2.3.1);
* MSA-2 is the received MSH-10 byte for byte (even with a leading space, even
  empty); MSA-3 carries the first error's text for v2.3/2.4 receivers;
* ERR up to v2.4: one ERR whose repeating ERR-1 is
  ``segment^sequence^field^code&text&HL70357``; from v2.5: one ERR per
  problem with ERR-2 location, ERR-3 ``code^text^HL70357``, ERR-4 severity,
  ERR-7 diagnostic text and ERR-8 user message.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from hl7.er7 import STANDARD_DELIMITERS, Delimiters, ReceivedHeader
from hl7.errors import ERROR_CODE_TEXT, Hl7Error

ORIGINAL_CODES = ("AA", "AE", "AR")
ENHANCED_CODES = {"AA": "CA", "AE": "CE", "AR": "CR"}
ACK_MODES = ("auto", "original", "enhanced")
"""Per-trust `ack_mode`: follow MSH-15/16, always original, always enhanced (commit)."""

DEFAULT_APPLICATION = "WORKLIST"
DEFAULT_FACILITY = "REGION"
_LONDON = ZoneInfo("Europe/London")
_counter = itertools.count(1)
_PREFIX = f"{os.getpid() % 100000:05d}"


def new_control_id(now: datetime) -> str:
    """A fresh MSH-10 for our own message: at most 20 characters (the limit to v2.6)."""
    return f"W{now:%y%m%d%H%M%S}{_PREFIX[-3:]}{next(_counter) % 1000:03d}"


def escape(text: str, delimiters: Delimiters = STANDARD_DELIMITERS) -> str:
    """Escape delimiters in text we write (HL7 v2.5.1 section 2.7.1).

    Line breaks become ``\\.br\\``.
    """
    esc = delimiters.escape
    if not esc:
        # No escape character declared: the best we can do is not break the framing.
        bad = {delimiters.field, delimiters.component, delimiters.repetition}
        if delimiters.subcomponent:
            bad.add(delimiters.subcomponent)
        return "".join(" " if c in bad or c in "\r\n" else c for c in text)
    table = {
        esc: f"{esc}E{esc}",
        delimiters.field: f"{esc}F{esc}",
        delimiters.component: f"{esc}S{esc}",
        delimiters.repetition: f"{esc}R{esc}",
    }
    if delimiters.subcomponent:
        table[delimiters.subcomponent] = f"{esc}T{esc}"
    if delimiters.truncation:
        table[delimiters.truncation] = f"{esc}P{esc}"
    out = []
    for c in text.replace("\r\n", "\n"):
        if c in table:
            out.append(table[c])
        elif c in "\r\n":
            out.append(f"{esc}.br{esc}")
        else:
            out.append(c)
    return "".join(out)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.3.1' -> (2, 3, 1); unreadable parts count as 0."""
    parts = []
    for piece in version.strip().split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) or (0,)


def ack_is_enhanced(header: ReceivedHeader, ack_mode: str = "auto") -> bool:
    """Whether to answer with a commit ACK (CA/CE/CR) rather than AA/AE/AR.

    `auto` follows the standard: enhanced when MSH-15 or MSH-16 is valued. UK
    feeds often send ``AL|NE`` yet expect AA: such a trust sets "original".
    """
    if ack_mode == "original":
        return False
    if ack_mode == "enhanced":
        return True
    return bool(header.accept_ack_type.strip() or header.application_ack_type.strip())


@dataclass(frozen=True, slots=True)
class AckProblem:
    """One ERR entry: what and where (from an Hl7Error, or a warning on an accepted message)."""

    error_code: str
    text: str
    segment: str | None = None
    sequence: int | None = None
    field: int | None = None
    component: int | None = None
    repetition: int | None = None
    severity: str = "E"

    @classmethod
    def from_error(cls, error: Hl7Error) -> AckProblem:
        return cls(
            error_code=error.error_code,
            text=error.text,
            segment=error.segment,
            sequence=error.sequence,
            field=error.field,
            component=error.component,
            repetition=error.repetition,
        )


def build_ack(
    header: ReceivedHeader,
    *,
    code: str,
    now: datetime,
    problems: Sequence[AckProblem] = (),
    text: str | None = None,
    enhanced: bool = False,
    control_id: str | None = None,
    sending_application: str = DEFAULT_APPLICATION,
    sending_facility: str = DEFAULT_FACILITY,
) -> bytes:
    """The ACK payload (without MLLP framing) for a received message header.

    `code` is the original-mode code (AA/AE/AR); with `enhanced` it is sent
    as CA/CE/CR. The bytes are encoded in the received message's character set.
    """
    if code not in ORIGINAL_CODES:
        raise ValueError(f"ACK code must be one of {ORIGINAL_CODES}, got {code!r}")
    d = header.delimiters
    fs = d.field
    sent_code = ENHANCED_CODES[code] if enhanced else code
    version = header.version_id
    vt = version_tuple(version) if version else (2, 5)
    trigger = header.trigger
    c = d.component
    if trigger and vt >= (2, 3, 1):
        message_type = f"ACK{c}{escape(trigger, d)}{c}ACK"
    elif trigger:
        message_type = f"ACK{c}{escape(trigger, d)}"
    else:
        message_type = "ACK"
    local = now.astimezone(_LONDON)
    msh_fields = [
        "MSH",
        d.encoding_characters,
        escape(sending_application, d),
        escape(sending_facility, d),
        header.sending_application,
        header.sending_facility,
        local.strftime("%Y%m%d%H%M%S%z"),
        "",
        message_type,
        escape(control_id or new_control_id(now), d),
        header.processing_id or "P",
        header.version or "2.5",
    ]
    if header.charset:
        msh_fields += ["", "", "", "", "", header.charset]
    segments = [fs.join(msh_fields)]
    if text is None and problems:
        text = problems[0].text
    msa = ["MSA", sent_code, header.control_id]
    if text and code != "AA":
        msa.append(escape(_truncate(text, 80), d))
    segments.append(fs.join(msa))
    if problems:
        segments.extend(_err_segments(problems, d, vt))
    payload = "\r".join(segments) + "\r"
    return payload.encode(_ack_codec(header.codec), errors="replace")


def build_error_ack(
    header: ReceivedHeader,
    error: Hl7Error,
    *,
    now: datetime,
    enhanced: bool = False,
    control_id: str | None = None,
    sending_application: str = DEFAULT_APPLICATION,
    sending_facility: str = DEFAULT_FACILITY,
) -> bytes:
    """The negative ACK (AE/AR, or CE/CR) an `Hl7Error` deserves."""
    return build_ack(
        header,
        code=error.ack_code,
        now=now,
        problems=[AckProblem.from_error(error)],
        enhanced=enhanced,
        control_id=control_id,
        sending_application=sending_application,
        sending_facility=sending_facility,
    )


def minimal_header() -> ReceivedHeader:
    """A stand-in header for bytes with no readable MSH, so they still get an AR."""
    return ReceivedHeader(delimiters=STANDARD_DELIMITERS, version="2.5", processing_id="P")


def _ack_codec(codec: str) -> str:
    return "latin-1" if codec == "ascii" else codec


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _location(p: AckProblem, d: Delimiters) -> list[str]:
    if not p.segment:
        return []
    parts = [p.segment, str(p.sequence or 1)]
    if p.field is not None:
        parts.append(str(p.field))
        if p.component is not None:
            parts += [str(p.repetition or 1), str(p.component)]
    return [escape(x, d) for x in parts]


def _err_segments(problems: Sequence[AckProblem], d: Delimiters, vt: tuple[int, ...]) -> list[str]:
    fs, c = d.field, d.component
    sub = d.subcomponent
    if vt < (2, 5):
        # ERR-1 (ELD): segment^sequence^field position^code&text&HL70357, repeating.
        reps = []
        for p in problems:
            where = _location(p, d)[:3]
            where += [""] * (3 - len(where))
            name = escape(ERROR_CODE_TEXT.get(p.error_code, p.text), d)
            coded = sub.join([p.error_code, name, "HL70357"]) if sub else p.error_code
            reps.append(c.join([*where, coded]))
        return [fs.join(["ERR", d.repetition.join(reps)])]
    segments = []
    for p in problems:
        name = escape(ERROR_CODE_TEXT.get(p.error_code, "Application error"), d)
        fields = [
            "ERR",
            "",
            c.join(_location(p, d)),
            c.join([p.error_code, name, "HL70357"]),
            p.severity,
            "",
            "",
            escape(p.text, d),
            escape(p.text, d),
        ]
        segments.append(fs.join(fields))
    return segments


def build_batch_ack(
    batch: bytes,
    acks: Sequence[bytes],
    *,
    now: datetime,
    sending_application: str = DEFAULT_APPLICATION,
    sending_facility: str = DEFAULT_FACILITY,
) -> bytes:
    """The response to an FHS/BHS batch: our BHS (and FHS if they sent one) around one ACK
    per message, in order, then BTS/FTS with the count (HL7 v2.5.1 section 2.10.3).

    BHS-12 / FHS-12 (reference control id) carry the received BHS-11 / FHS-11.
    """
    lines = [line for line in batch.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")]
    received = {line[:3]: line for line in lines if line[:3] in (b"FHS", b"BHS")}
    delimiters = STANDARD_DELIMITERS
    header_line = received.get(b"FHS") or received.get(b"BHS") or b""
    if len(header_line) >= 8:
        try:
            fs = chr(header_line[3])
            encoding = header_line[4:].split(header_line[3:4])[0].decode("latin-1")
            delimiters = Delimiters.from_msh(fs, encoding)
        except Exception:  # noqa: BLE001 - odd envelope: answer with the standard delimiters
            delimiters = STANDARD_DELIMITERS
    fs = delimiters.field
    stamp = now.astimezone(_LONDON).strftime("%Y%m%d%H%M%S%z")

    def envelope(name: bytes) -> str:
        fields = received[name].decode("latin-1").split(fs) if name in received else []

        def f(n: int) -> str:  # FHS/BHS are numbered like MSH: field 1 is the separator
            return fields[n - 1] if 0 < n - 1 < len(fields) else ""

        return fs.join(
            [
                name.decode(),
                delimiters.encoding_characters,
                escape(sending_application, delimiters),
                escape(sending_facility, delimiters),
                f(3),
                f(4),
                stamp,
                "",
                "",
                "",
                "",
                f(11),
            ]
        )

    out: list[str] = []
    if b"FHS" in received:
        out.append(envelope(b"FHS"))
    out.append(envelope(b"BHS"))
    body = [ack.rstrip(b"\r").decode("latin-1") for ack in acks]
    out.extend(body)
    out.append(f"BTS{fs}{len(acks)}")
    if b"FHS" in received:
        out.append(f"FTS{fs}1")
    return ("\r".join(out) + "\r").encode("latin-1", errors="replace")
