"""Property tests: random and mutated bytes at the framer and the parser.

Whatever arrives, the framer returns frames (never raises, never loses a
well-formed frame however the stream is chunked) and the reader either yields
events or raises an `Hl7Error` from which an ACK can always be built; no other
exception, no hang.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7.ack import build_ack, build_error_ack, minimal_header
from hl7.er7 import Er7Message, read_header
from hl7.errors import Hl7Error
from hl7.inbound import message_events
from hl7.mllp import Frame, MllpDecoder, Oversize, frame

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "hl7").glob("*.hl7"))
SAMPLES = [p.read_bytes() for p in FIXTURES]

payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


def ack_for(raw: bytes) -> bytes:
    """What the listener does with one payload: events or a negative ACK, nothing else."""
    try:
        message = Er7Message.parse(raw)
    except Hl7Error as error:
        try:
            header = read_header(raw)
        except Hl7Error:
            header = minimal_header()
        return build_error_ack(header, error, now=NOW)
    try:
        message_events(message)
    except Hl7Error as error:
        return build_error_ack(message.header, error, now=NOW)
    return build_ack(message.header, code="AA", now=NOW)


@given(st.lists(payloads, max_size=5), st.binary(max_size=20), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_well_formed_frames_survive_any_chunking_and_leading_junk(
    messages: list[bytes], junk: bytes, data: st.DataObject
) -> None:
    junk = junk.replace(b"\x0b", b"")
    stream = junk + b"".join(frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = MllpDecoder()
    out = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[previous:cut])
        previous = cut
    assert out == [Frame(m) for m in messages]
    assert not decoder.in_frame


@given(st.binary(max_size=2000), st.integers(1, 400))
@settings(max_examples=300)
def test_random_bytes_never_break_the_framer(stream: bytes, limit: int) -> None:
    decoder = MllpDecoder(max_message_bytes=limit)
    for event in decoder.feed(stream):
        assert isinstance(event, Frame | Oversize)
        if isinstance(event, Frame):
            assert len(event.payload) <= limit


@given(st.binary(max_size=500))
@settings(max_examples=300)
def test_random_bytes_get_an_ack_or_an_hl7_error(raw: bytes) -> None:
    assert ack_for(raw).startswith(b"MSH")


@given(st.text(alphabet="MSH|^~\\&PIDORCOBR0123.\r\n AZ", max_size=300))
@settings(max_examples=300)
def test_hl7_looking_text_gets_an_ack(text: str) -> None:
    assert ack_for(("MSH|^~\\&|" + text).encode()).startswith(b"MSH")


@given(st.sampled_from(SAMPLES), st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_real_shaped_messages_get_an_ack(sample: bytes, data: st.DataObject) -> None:
    mutated = bytearray(sample)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "flip" and mutated:
            mutated[pos] = data.draw(st.sampled_from(list(b"|^~\\&\r\n\x00\xff0A ")))
        elif kind == "delete" and mutated:
            del mutated[pos]
        elif kind == "insert":
            mutated[pos:pos] = data.draw(
                st.sampled_from([b"|", b"^", b"\\", b"\\X", b"\r", b"\\.br\\", b"~"])
            )
        else:
            del mutated[pos:]
    ack = ack_for(bytes(mutated))
    assert ack.startswith(b"MSH")
    assert b"\rMSA|" in ack or b"MSA" in ack
