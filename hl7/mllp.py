"""MLLP framing: bytes in, frames out. Knows nothing of HL7 content.

The Minimal Lower Layer Protocol (HL7 v2 Transport Specification, MLLP
release 2) wraps each message as ``VT payload FS CR`` (0x0B ... 0x1C 0x0D).
TCP reads do not line up with frames, so `MllpDecoder` is fed arbitrary chunks
and yields whole frames. It is tolerant in what it reads:

* bytes before a start block (keep-alives, stray CR/LF) are skipped and counted;
* a frame is complete at FS; the CR after it is expected but not required
  (a sender that omits it would otherwise wait for its ACK for ever);
* a start block inside an unfinished frame abandons the unfinished one (the
  sender gave up on it) and starts again, counting the abandoned bytes as junk;
* a frame larger than the size limit is not buffered: it is read to its end
  and reported as `Oversize` (with the first bytes kept so the listener can
  still read MSH and send AR), and the connection stays usable.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\r"

_VT = 0x0B
_FS = 0x1C
_CR = 0x0D

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
OVERSIZE_HEAD_BYTES = 4096
"""How much of an oversize frame is kept: enough for MSH, to address the AR."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete MLLP payload (without VT/FS/CR)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame that exceeded the size limit: its total size and its first bytes."""

    size: int
    head: bytes


FrameEvent = Frame | Oversize


def frame(payload: bytes) -> bytes:
    """Wrap one HL7 payload in MLLP start and end blocks.

    Refuses a payload containing VT or FS: it would corrupt the framing (a
    sender must escape such bytes as ``\\X0B\\`` / ``\\X1C\\``).
    """
    if b"\x0b" in payload or b"\x1c" in payload:
        raise ValueError("an MLLP payload must not contain VT (0x0B) or FS (0x1C)")
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


class MllpDecoder:
    """Incremental MLLP decoder: `feed()` chunks, get the frames they complete.

    Counters (`junk_bytes`, `abandoned_frames`, `frames`, `oversize_frames`) are
    for logging; `in_frame` and `pending_bytes` tell the listener, at end of
    stream or idle timeout, whether the peer left a message half-sent.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False
        self._oversize = False
        self._oversize_size = 0
        self._oversize_head = b""
        self._swallow_cr = False
        self.junk_bytes = 0
        self.abandoned_frames = 0
        self.frames = 0
        self.oversize_frames = 0

    @property
    def in_frame(self) -> bool:
        """True when a start block has been read and its end block has not."""
        return self._in_frame

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished frame (0 outside a frame)."""
        if not self._in_frame:
            return 0
        return self._oversize_size if self._oversize else len(self._buffer)

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Consume `data`; return the frames (and oversize reports) it completes, in order."""
        events: list[FrameEvent] = []
        view = memoryview(data)
        pos = 0
        end = len(data)
        while pos < end:
            if self._swallow_cr:
                self._swallow_cr = False
                if data[pos] == _CR:
                    pos += 1
                    continue
            if not self._in_frame:
                start = data.find(START_BLOCK, pos)
                if start < 0:
                    self.junk_bytes += end - pos
                    break
                self.junk_bytes += start - pos
                pos = start + 1
                self._begin_frame()
                continue
            fs = data.find(END_BLOCK, pos)
            vt = data.find(START_BLOCK, pos)
            if vt >= 0 and (fs < 0 or vt < fs):
                # The sender started again without finishing: drop the unfinished frame.
                self._append(view[pos:vt])
                self.junk_bytes += self.pending_bytes
                self.abandoned_frames += 1
                pos = vt + 1
                self._begin_frame()
                continue
            if fs < 0:
                self._append(view[pos:end])
                break
            self._append(view[pos:fs])
            pos = fs + 1
            events.append(self._end_frame())
            self._swallow_cr = True
        return events

    def _begin_frame(self) -> None:
        self._in_frame = True
        self._oversize = False
        self._oversize_size = 0
        self._oversize_head = b""
        self._buffer.clear()

    def _append(self, chunk: memoryview) -> None:
        if not chunk:
            return
        if self._oversize:
            self._oversize_size += len(chunk)
            return
        if len(self._buffer) + len(chunk) > self.max_message_bytes:
            self._buffer += chunk
            self._oversize = True
            self._oversize_size = len(self._buffer)
            self._oversize_head = bytes(self._buffer[:OVERSIZE_HEAD_BYTES])
            self._buffer = bytearray()
            return
        self._buffer += chunk

    def _end_frame(self) -> FrameEvent:
        self._in_frame = False
        if self._oversize:
            self._oversize = False
            self.oversize_frames += 1
            return Oversize(size=self._oversize_size, head=self._oversize_head)
        payload = bytes(self._buffer)
        self._buffer = bytearray()
        self.frames += 1
        return Frame(payload)
