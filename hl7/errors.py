"""The HL7 exception hierarchy: one root (`Hl7Error`), one subclass per HL7 table 0357 code.

Each error knows the acknowledgement it deserves (AR: the message cannot be
handled as sent, do not resend it unchanged; AE: its content is wrong) and
where the problem is (segment, sequence, field, component), so the ACK builder
in `hl7/ack.py` can write MSA and ERR from the exception alone. This is the one
map from "what went wrong" to ACK codes (HL7 v2.5.1 chapter 2, tables 0008 and
0357).
"""

from __future__ import annotations

# HL7 table 0357, message error condition codes (v2.5.1 section 2.15.5.3).
ERROR_CODE_TEXT: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


class Hl7Error(Exception):
    """Root of every HL7 problem; carries what the negative ACK must say.

    `ack_code` is the original-mode code (AE or AR); the enhanced-mode commit
    code (CE/CR) is derived from it. `error_code` is from table 0357.
    """

    ack_code: str = "AE"
    error_code: str = "207"

    def __init__(
        self,
        text: str,
        *,
        segment: str | None = None,
        sequence: int | None = None,
        field: int | None = None,
        component: int | None = None,
        repetition: int | None = None,
        ack_code: str | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.component = component
        self.repetition = repetition
        if ack_code is not None:
            self.ack_code = ack_code
        if error_code is not None:
            self.error_code = error_code

    @property
    def error_text(self) -> str:
        """The table 0357 description of `error_code`."""
        return ERROR_CODE_TEXT.get(self.error_code, "Application error")

    @property
    def location(self) -> str:
        """Human form of where the problem is, e.g. `PID-3` or `MSH-12`; empty when unknown."""
        if not self.segment:
            return ""
        if self.field is None:
            return self.segment
        where = f"{self.segment}-{self.field}"
        if self.component is not None:
            where += f".{self.component}"
        return where

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.text!r}, ack={self.ack_code}, code={self.error_code}, "
            f"at={self.location or '-'})"
        )


# --- AR: reject, the message cannot be handled as sent -------------------------------------


class MessageRejected(Hl7Error):
    """AR: header, type, version or framing problems; resending unchanged will not help."""

    ack_code = "AR"
    error_code = "207"


class MalformedMessage(MessageRejected):
    """The bytes are not an HL7 v2 message we can read (no MSH, no delimiters)."""

    error_code = "100"


class UnsupportedMessageType(MessageRejected):
    """MSH-9.1 names a message type this service does not accept (table 0357 code 200)."""

    error_code = "200"


class UnsupportedEvent(MessageRejected):
    """MSH-9.2 names a trigger event this service does not accept for that type (code 201)."""

    error_code = "201"


class UnsupportedProcessingId(MessageRejected):
    """MSH-11 is not a processing id this feed accepts (code 202)."""

    error_code = "202"


class UnsupportedVersion(MessageRejected):
    """MSH-12 names an HL7 version this service does not read (code 203)."""

    error_code = "203"


class UnknownSender(MessageRejected):
    """MSH-3/MSH-4 (or the peer address) match no configured trust (code 204)."""

    error_code = "204"


class MessageTooLarge(MessageRejected):
    """The MLLP frame exceeded the configured size limit; the connection stays usable."""

    error_code = "207"


class ServiceUnavailable(MessageRejected):
    """Our own failure (e.g. database down) before the message was stored: AR invites a resend."""

    error_code = "207"


# --- AE: error, the content is wrong ----------------------------------------------------


class ContentError(Hl7Error):
    """AE: the message was understood but its content cannot be applied."""

    ack_code = "AE"
    error_code = "207"


class SegmentSequenceError(ContentError):
    """Required segments missing or out of order (code 100)."""

    error_code = "100"


class RequiredFieldMissing(ContentError):
    """A field this service needs is empty (code 101)."""

    error_code = "101"


class DataTypeError(ContentError):
    """A field does not hold its data type, e.g. an unreadable date (code 102)."""

    error_code = "102"


class TableValueNotFound(ContentError):
    """A coded value is not in its table, e.g. an unknown ORC-1 (code 103)."""

    error_code = "103"


class UnknownKey(ContentError):
    """The message refers to an order or patient we do not know (code 204)."""

    error_code = "204"


class DuplicateKey(ContentError):
    """A new order reuses a key that already exists (code 205)."""

    error_code = "205"


class ApplicationError(ContentError):
    """Applying the message failed inside the service (code 207)."""

    error_code = "207"
