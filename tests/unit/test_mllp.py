"""MLLP framing (hl7/mllp.py): frames from arbitrary chunks, junk, missing CR, size limit."""

from __future__ import annotations

import pytest

from hl7.mllp import Frame, MllpDecoder, Oversize, frame

MSG_A = b"MSH|^~\\&|A|B|C|D|20261123||ORM^O01|1|P|2.4\rPID|1||X\r"
MSG_B = b"MSH|^~\\&|A|B|C|D|20261123||ORM^O01|2|P|2.4\rPID|1||Y\r"


def test_frame_wraps_payload_in_start_and_end_blocks() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"


def test_frame_refuses_a_payload_containing_framing_bytes() -> None:
    with pytest.raises(ValueError):
        frame(b"MSH|\x1c")


def test_a_frame_split_across_many_reads_comes_out_once_whole() -> None:
    decoder = MllpDecoder()
    data = frame(MSG_A)
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == [Frame(MSG_A)]
    assert decoder.junk_bytes == 0
    assert not decoder.in_frame


def test_several_frames_in_one_read_come_out_in_order() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(frame(MSG_A) + frame(MSG_B)) == [Frame(MSG_A), Frame(MSG_B)]


def test_bytes_before_the_start_block_are_skipped_and_counted() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(b"\r\n  keepalive" + frame(MSG_A)) == [Frame(MSG_A)]
    assert decoder.junk_bytes == len(b"\r\n  keepalive")


def test_a_missing_cr_after_the_end_block_still_completes_the_frame() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(b"\x0b" + MSG_A + b"\x1c") == [Frame(MSG_A)]
    assert decoder.feed(b"\x0b" + MSG_B + b"\x1c") == [Frame(MSG_B)]
    assert decoder.junk_bytes == 0


def test_the_cr_after_the_end_block_arriving_in_the_next_read_is_not_junk() -> None:
    decoder = MllpDecoder()
    decoder.feed(b"\x0b" + MSG_A + b"\x1c")
    assert decoder.feed(b"\r" + frame(MSG_B)) == [Frame(MSG_B)]
    assert decoder.junk_bytes == 0


def test_a_new_start_block_abandons_an_unfinished_frame() -> None:
    decoder = MllpDecoder()
    out = decoder.feed(b"\x0bMSH|half a mess" + frame(MSG_B))
    assert out == [Frame(MSG_B)]
    assert decoder.abandoned_frames == 1
    assert decoder.junk_bytes == len(b"MSH|half a mess")


def test_an_unfinished_frame_is_reported_as_pending() -> None:
    decoder = MllpDecoder()
    decoder.feed(b"\x0b" + MSG_A[:20])
    assert decoder.in_frame
    assert decoder.pending_bytes == 20


def test_an_oversize_frame_is_reported_with_its_head_and_the_next_frame_still_decodes() -> None:
    decoder = MllpDecoder(max_message_bytes=100)
    big = MSG_A + b"OBX|" + b"A" * 500 + b"\r"
    out = decoder.feed(frame(big)[:50])
    out += decoder.feed(frame(big)[50:] + frame(MSG_B))
    assert isinstance(out[0], Oversize)
    assert out[0].size == len(big)
    assert out[0].head.startswith(b"MSH|^~\\&|A|B")
    assert out[1] == Frame(MSG_B)
    assert decoder.oversize_frames == 1


def test_a_frame_exactly_at_the_limit_is_accepted() -> None:
    decoder = MllpDecoder(max_message_bytes=len(MSG_A))
    assert decoder.feed(frame(MSG_A)) == [Frame(MSG_A)]


def test_an_empty_frame_comes_out_as_an_empty_payload() -> None:
    assert MllpDecoder().feed(b"\x0b\x1c\r") == [Frame(b"")]
