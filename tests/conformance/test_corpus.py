"""Every message of the shared third-party corpus gets events or a clean negative ACK.

Reads `/work/shared/hl7-corpus` (or `$WORKLIST_HL7_CORPUS`) in place: the
messages are never copied into the project. Skips with a reason when the corpus
is absent. `-s` prints the table of what each message got.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hl7.ack import ack_is_enhanced, build_ack, build_error_ack, minimal_header
from hl7.er7 import Er7Message, is_batch, read_header, split_batch
from hl7.errors import Hl7Error
from hl7.inbound import message_events

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def corpus_dir() -> Path:
    configured = os.environ.get("WORKLIST_HL7_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "shared" / "hl7-corpus"


CORPUS = corpus_dir()
FILES = sorted(CORPUS.rglob("*.hl7")) if CORPUS.is_dir() else []
ORDER_AND_ADT = ("ORM", "OMI", "ADT")

# What we expect of the radiology orders and the ADT the issue names (file -> outcome).
EXPECTED = {
    "dcm4che/omi-o23-imaging-order.hl7": "AA OrderPlaced",
    "dcm4che/orm-o01-general-order-file-but-msh9-omi-o23.hl7": "AA OrderPlaced",
    "openmrs-radiology/orm-o01-v231-nw-zds-custom-model.hl7": "AA OrderPlaced",
    "openmrs-radiology/orm-o01-v231-xo-change-order.hl7": "AA OrderChanged",
    "openmrs-radiology/orm-o01-v231-ca-cancel.hl7": "AA OrderCancelled",
    "uclh-emap/orm-o01-v23-copath-sc-cm.hl7": "AA ExamStatusChanged",
    "uclh-emap/adt-a40-v24-epic-merge.hl7": "AA PatientsMerged",
    "uclh-emap/adt-a08-v24-epic-update.hl7": "AA PatientUpdated",
    "inhealthcare/adt-a28-v24-nhs-number-nsts.hl7": "AA PatientUpdated",
    "node-hl7-client/orm-o01-v23-pid3-reps.hl7": "AE 100",
    "hapi-hl7v2/oru-r01-v2999-unknown-version.hl7": "AR 203",
    "hapi-hl7v2/zzz-zzz-v22-unknown-message-type.hl7": "AR 200",
}


def outcome(raw: bytes) -> tuple[str, bytes]:
    """(summary, ACK) for one payload, as the listener would answer it."""
    try:
        message = Er7Message.parse(raw)
    except Hl7Error as error:
        try:
            header = read_header(raw)
        except Hl7Error:
            header = minimal_header()
        return f"{error.ack_code} {error.error_code}", build_error_ack(header, error, now=NOW)
    enhanced = ack_is_enhanced(message.header)
    try:
        events = message_events(message)
    except Hl7Error as error:
        ack = build_error_ack(message.header, error, now=NOW, enhanced=enhanced)
        return f"{error.ack_code} {error.error_code}", ack
    names = " ".join(type(e).__name__ for e in events) or "(ignored)"
    return f"AA {names}", build_ack(message.header, code="AA", now=NOW, enhanced=enhanced)


pytestmark = pytest.mark.skipif(
    not FILES, reason=f"HL7 corpus not found at {CORPUS} (set WORKLIST_HL7_CORPUS)"
)


@pytest.mark.parametrize(
    "path", FILES, ids=[str(p.relative_to(CORPUS)) for p in FILES] if FILES else []
)
def test_every_corpus_message_gets_an_ack_with_its_control_id(path: Path) -> None:
    raw = path.read_bytes()
    payloads = split_batch(raw) if is_batch(raw) and b"MSH" in raw else [raw]
    for payload in payloads:
        summary, ack = outcome(payload)
        assert ack.startswith(b"MSH")
        msa = [s for s in ack.split(b"\r") if s.startswith(b"MSA")][0]
        try:
            control_id = read_header(payload).control_id.encode("latin-1")
        except Hl7Error:
            control_id = b""
        assert msa.split(msa[3:4])[2] == control_id
        assert summary.split()[0] in ("AA", "AE", "AR")


def test_the_radiology_orders_and_adt_in_the_corpus_get_what_we_expect() -> None:
    got = {}
    for name in EXPECTED:
        path = CORPUS / name
        if not path.exists():
            continue
        got[name] = outcome(path.read_bytes())[0]
    assert got == {k: v for k, v in EXPECTED.items() if k in got}
    assert got, "none of the expected corpus files were found"


def test_print_what_each_corpus_message_got(capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for path in FILES:
        raw = path.read_bytes()
        try:
            kind = read_header(raw).message_type
        except Hl7Error:
            kind = "(batch)" if is_batch(raw) else "(unreadable)"
        if is_batch(raw):
            try:
                parts = split_batch(raw)  # the listener answers a batch message by message
            except Hl7Error as error:
                summary = f"{error.ack_code} {error.error_code}"
            else:
                summary = "batch: " + "; ".join(outcome(part)[0] for part in parts)
        else:
            summary, _ = outcome(raw)
        rows.append((str(path.relative_to(CORPUS)), kind, summary))
    orders_and_adt = [r for r in rows if r[1].split("^")[0] in ORDER_AND_ADT]
    assert orders_and_adt, "the corpus holds no ORM/OMI/ADT"
    with capsys.disabled():
        width = max(len(r[0]) for r in rows)
        print(f"\n{'corpus file':<{width}}  {'MSH-9':<16} outcome")
        for name, kind, summary in rows:
            print(f"{name:<{width}}  {kind:<16} {summary}")
