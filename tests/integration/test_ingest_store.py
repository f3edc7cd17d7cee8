"""Storing frames: a resend is recognised by (MSH-3, MSH-4, MSH-10), with the prebuilt
originals query (`messages._originals_query`), whatever MSH-3/MSH-4 hold."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import START
from tests.factories import make_trust
from worklist.bootstrap import Runtime
from worklist.clock import FixedClock
from worklist.db.models import InboundMessage
from worklist.services import messages


def nw(application: str, facility: str, control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|{application}|{facility}|WORKLIST|REGION|20261123080000||ORM^O01|{control_id}"
        "|P|2.4\r"
        "PID|1||RW6000001^^^RW6^MR||Smith^Jane||19600501|F\r"
        f"ORC|NW|P{control_id}^RIS|F{control_id}^RIS||SC\r"
        f"OBR|1|P{control_id}^RIS|F{control_id}^RIS|XCHES^XR Chest^NICIP\r"
    ).encode()


def store(runtime: Runtime, *payloads: bytes) -> list[str]:
    now = runtime.clock.now()
    with runtime.session() as session:
        outcomes = messages.store_messages(
            session,
            [messages.Arrival(p, "127.0.0.1:2575", now) for p in payloads],
            directory=messages.TrustDirectory(runtime.settings),
            now=now,
        )
    return [o.state for o in outcomes]


def test_a_resend_is_a_duplicate_with_or_without_msh3_and_only_from_the_same_sender(
    runtime: Runtime,
) -> None:
    with runtime.session() as session:
        make_trust(session, now=runtime.clock.now(), code="RW6", sending_application=None)
        make_trust(session, now=runtime.clock.now(), code="R0A", sending_application="RIS")
    # First sight: every one is new, and a resend in the same batch is a duplicate.
    assert store(runtime, nw("", "RW6", "C1"), nw("RIS", "R0A", "C1"), nw("", "RW6", "C1")) == [
        "received",
        "received",
        "duplicate",
    ]
    # In a later batch: resends of both, and the same MSH-10 from another sender is new.
    assert store(
        runtime,
        nw("", "RW6", "C1"),
        nw("RIS", "R0A", "C1"),
        nw("OTHER", "RW6", "C1"),
        nw("RIS", "R0A", "C2"),
    ) == ["duplicate", "duplicate", "received", "received"]
    with runtime.engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT sending_application, state FROM inbound_message ORDER BY id")
        ).all()
    assert [tuple(r) for r in stored][:2] == [(None, "received"), ("RIS", "received")]


def write(
    writer: messages.StoreWriter, runtime: Runtime, *payloads: bytes
) -> list[messages.StoreOutcome]:
    now = runtime.clock.now()
    directory = writer.directory
    arrivals = [messages.Arrival(p, "127.0.0.1:2575", now) for p in payloads]
    prepared = [messages.prepare(a, directory=directory, now=now) for a in arrivals]
    return writer.store(arrivals, prepared, now)


def test_the_listeners_store_writer_answers_resends_with_the_originals_ack_byte_for_byte(
    runtime: Runtime, clock: FixedClock
) -> None:
    """The writer the listener uses (on PostgreSQL one statement, resend check in SQL)."""
    with runtime.session() as session:
        make_trust(session, now=runtime.clock.now(), code="RW6", sending_application=None)
        make_trust(session, now=runtime.clock.now(), code="R0A", sending_application="RIS")
    writer = messages.store_writer(runtime, messages.TrustDirectory(runtime.settings))
    try:
        first = write(writer, runtime, nw("", "RW6", "C1"), nw("RIS", "R0A", "C1"))
        assert [o.state for o in first] == ["received", "received"]
        clock.advance(timedelta(seconds=5))  # a resend's own ACK would carry another time
        # Resends of both (one with an empty MSH-3), each twice in the batch; a new MSH-10;
        # the same MSH-10 from another sender; a new one and its resend in the same batch.
        again = write(
            writer,
            runtime,
            nw("", "RW6", "C1"),
            nw("RIS", "R0A", "C1"),
            nw("", "RW6", "C1"),
            nw("RIS", "R0A", "C1"),
            nw("OTHER", "RW6", "C1"),
            nw("RIS", "R0A", "C3"),
            nw("RIS", "R0A", "C3"),
        )
    finally:
        writer.close()
    assert [o.state for o in again] == [
        "duplicate",
        "duplicate",
        "duplicate",
        "duplicate",
        "received",
        "received",
        "duplicate",
    ]
    assert [o.ack for o in again[:4]] == [first[0].ack, first[1].ack] * 2
    assert [o.duplicate_of for o in again[:4]] == [first[0].message_id, first[1].message_id] * 2
    assert again[6].ack == again[5].ack
    assert again[4].ack != first[0].ack
    with runtime.engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT id, state, ack, error FROM inbound_message ORDER BY id")
        ).all()
    assert [r.id for r in stored] == [o.message_id for o in first + again]
    assert [r.ack for r in stored] == [o.ack for o in first + again]
    assert stored[2].error == f"resend of message {first[0].message_id}"
    assert stored[8].error == "resend in the same batch"
    with runtime.session() as session:  # read back as the ORM writes them
        message = session.get(InboundMessage, first[0].message_id)
        assert message is not None
        assert (message.received_at, message.sending_application, message.raw) == (
            START,
            None,
            nw("", "RW6", "C1"),
        )
        assert message.message_type == "ORM^O01" and message.trust_id is not None


def test_the_store_connection_is_replaced_when_the_database_drops_it(
    runtime: Runtime, on_postgres: bool
) -> None:
    """PostgreSQL: the writer keeps one connection; if the server ends it (restart, a killed
    backend), the next batch is stored on a new one, once, and answered AA, not AR."""
    if not on_postgres:
        pytest.skip("the dedicated store connection is PostgreSQL's")
    with runtime.session() as session:
        make_trust(session, now=runtime.clock.now(), code="R0A", sending_application="RIS")
    writer = messages.store_writer(runtime, messages.TrustDirectory(runtime.settings))
    assert isinstance(writer, messages.PostgresStoreWriter)
    try:
        assert [o.ack_code for o in write(writer, runtime, nw("RIS", "R0A", "K1"))] == ["AA"]
        pid = writer._connect().info.backend_pid
        with runtime.engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        time.sleep(0.2)
        outcomes = write(writer, runtime, nw("RIS", "R0A", "K2"), nw("RIS", "R0A", "K1"))
        assert [(o.state, o.ack_code) for o in outcomes] == [
            ("received", "AA"),
            ("duplicate", "AA"),
        ]
        assert writer._connect().info.backend_pid != pid
    finally:
        writer.close()
    with runtime.engine.connect() as connection:
        counts = connection.execute(
            sa.text("SELECT control_id, COUNT(*) FROM inbound_message GROUP BY control_id")
        ).all()
    assert sorted(tuple(r) for r in counts) == [("K1", 2), ("K2", 1)]
