"""Storing frames: a resend is recognised by (MSH-3, MSH-4, MSH-10), with the prebuilt
originals query (`messages._originals_query`), whatever MSH-3/MSH-4 hold."""

from __future__ import annotations

import sqlalchemy as sa

from tests.factories import make_trust
from worklist.bootstrap import Runtime
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
