"""The message log and error queue through the JSON API (/api/v1/messages) and the CLI.

Messages are stored through the same service the listener uses (store, then apply).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.factories import make_token, make_trust, make_user
from worklist.bootstrap import Runtime
from worklist.db.models import AuditEvent, InboundMessage, Study
from worklist.services import messages

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hl7"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin_token(runtime: Runtime) -> str:
    now = runtime.clock.now()
    with runtime.session() as session:
        make_trust(session, now=now, code="RW6", sending_application="CRIS", sending_facility="RW6")
        make_trust(
            session, now=now, code="RM3", sending_application="SOLITON", sending_facility="RM3"
        )
        admin = make_user(session, now=now, role="admin", username="admin1")
        return make_token(session, user=admin, now=now)


def receive(
    runtime: Runtime, *names: str, peer: str = "127.0.0.1:5000"
) -> list[messages.StoreOutcome]:
    """What the listener does: store (commit), then the apply worker applies."""
    directory = messages.TrustDirectory(runtime.settings)
    now = runtime.clock.now()
    with runtime.session() as session:
        outcomes = messages.store_messages(
            session,
            [messages.Arrival(fixture(n), peer, now) for n in names],
            directory=directory,
            now=now,
        )
    with runtime.session() as session:
        messages.apply_pending(session, directory=directory, now=now)
    return outcomes


def test_the_message_log_needs_an_admin_token(runtime: Runtime, client, admin_token: str) -> None:
    with runtime.session() as session:
        radiologist = make_user(session, now=runtime.clock.now(), trusts=("RW6",))
        token = make_token(session, user=radiologist, now=runtime.clock.now())
    assert client.get("/api/v1/messages").status_code == 401
    assert client.get("/api/v1/messages", headers=auth(token)).status_code == 403
    assert client.get("/api/v1/messages", headers=auth(admin_token)).status_code == 200


def test_the_log_lists_each_message_with_its_state_and_ack_and_filters_it(
    runtime: Runtime, client, admin_token: str
) -> None:
    receive(
        runtime,
        "orm-o01-v24-nw-ct-head.hl7",
        "orm-o01-v24-nw-ct-head.hl7",
        "orm-o01-v23-lf-escapes.hl7",
        "oru-r01-v24-unsupported.hl7",
    )
    everything = client.get("/api/v1/messages", headers=auth(admin_token)).json["messages"]
    assert [(m["control_id"], m["state"], m["ack_code"]) for m in everything] == [
        ("RW6000202", "rejected", "AR"),
        ("RM3-000900", "applied", "AA"),
        ("RW6000123", "duplicate", "AA"),
        ("RW6000123", "applied", "AA"),
    ]

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/v1/messages?{query}", headers=auth(admin_token))
        assert response.status_code == 200, response.json
        return [m["control_id"] for m in response.json["messages"]]

    assert ids("accession=RW6ACC0001") == ["RW6000123", "RW6000123"]
    assert ids("trust=RM3") == ["RM3-000900"]
    assert ids("patient=S0012345") == ["RM3-000900"]
    assert ids("control_id=RW6000202") == ["RW6000202"]
    assert ids("state=rejected,duplicate") == ["RW6000202", "RW6000123"]
    assert ids("since=2026-11-23T08:00:00Z&until=2026-11-23T10:00:00Z") == [
        m["control_id"] for m in everything
    ]
    assert ids("until=2026-11-23T08:00:00Z") == []
    assert client.get("/api/v1/messages?state=lost", headers=auth(admin_token)).status_code == 400


def test_one_message_shows_its_raw_text_and_the_ack_that_was_sent(
    runtime: Runtime, client, admin_token: str
) -> None:
    [outcome] = receive(runtime, "orm-o01-v24-nw-ct-head.hl7")
    shown = client.get(f"/api/v1/messages/{outcome.message_id}", headers=auth(admin_token)).json
    assert shown["raw"].startswith("MSH|^~\\&|CRIS|RW6|")
    assert "\nPID|" in shown["raw"]
    assert "MSA|AA|RW6000123" in shown["ack"]
    assert shown["trust"] == "RW6"
    assert client.get("/api/v1/messages/99999", headers=auth(admin_token)).status_code == 404


def test_a_failed_message_can_be_corrected_and_replayed_exactly_once(
    runtime: Runtime, client, admin_token: str
) -> None:
    [outcome] = receive(runtime, "orm-o01-v231-nw-missing-pid3.hl7")
    assert outcome.state == "failed"
    original = fixture("orm-o01-v231-nw-missing-pid3.hl7").decode()
    corrected = original.replace("PID|1||||NOIDENT", "PID|1||H777^^^RW6^MR||NOIDENT")
    edited = client.put(
        f"/api/v1/messages/{outcome.message_id}", json={"raw": corrected}, headers=auth(admin_token)
    )
    assert edited.status_code == 200, edited.json
    assert "H777" in edited.json["raw"]
    replayed = client.post(
        f"/api/v1/messages/{outcome.message_id}/replay", headers=auth(admin_token)
    )
    assert replayed.status_code == 200, replayed.json
    assert replayed.json["state"] == "applied"
    again = client.post(f"/api/v1/messages/{outcome.message_id}/replay", headers=auth(admin_token))
    assert again.status_code == 409
    with runtime.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Study)) == 1
        actions = set(session.scalars(sa.select(AuditEvent.action)))
    assert {"inbound_message_edited", "inbound_message_replayed"} <= actions


def test_a_cancel_that_came_before_its_order_applies_when_replayed_after_it(
    runtime: Runtime, client, admin_token: str
) -> None:
    [cancel] = receive(runtime, "orm-o01-v24-ca.hl7")
    with runtime.session() as session:
        assert messages.get_message(session, cancel.message_id).state == "failed"  # type: ignore[arg-type]
    receive(runtime, "orm-o01-v24-nw-ct-head.hl7")
    replayed = client.post(
        f"/api/v1/messages/{cancel.message_id}/replay", headers=auth(admin_token)
    )
    assert replayed.json["state"] == "applied"
    with runtime.session() as session:
        study = session.scalar(sa.select(Study).where(Study.accession_number == "RW6ACC0001"))
        assert study is not None and study.status == "cancelled"


def test_one_bad_message_in_an_apply_batch_fails_alone_and_the_others_are_applied_and_prioritised(
    runtime: Runtime, admin_token: str
) -> None:
    # One apply batch: a cancel for an order not yet placed (fails), then the order and
    # its exam-complete (applied; the study re-prioritised once, after the batch).
    cancel, placed, complete = receive(
        runtime, "orm-o01-v24-ca.hl7", "orm-o01-v24-nw-ct-head.hl7", "orm-o01-v24-sc-cm.hl7"
    )
    assert cancel.state == placed.state == complete.state == "received"
    with runtime.session() as session:
        failed = messages.get_message(session, cancel.message_id)  # type: ignore[arg-type]
        assert failed.state == "failed"
        assert failed.error is not None and failed.error.startswith("AE 204 OrderNotFound")
        assert failed.applied_at is None
        for outcome in (placed, complete):
            row = messages.get_message(session, outcome.message_id)  # type: ignore[arg-type]
            assert row.state == "applied" and row.applied_at is not None
            assert row.accession_number == "RW6ACC0001"
        study = session.scalars(sa.select(Study)).one()
        assert study.status == "ready"
        assert study.priority_class is not None and study.due_at is not None
        assert messages.count_pending(session) == 0


def test_an_apply_worker_locks_only_its_own_trusts_so_a_second_worker_applies_meanwhile(
    runtime: Runtime, admin_token: str, on_postgres: bool
) -> None:
    if not on_postgres:
        pytest.skip("per-trust apply workers are PostgreSQL's (advisory locks)")
    directory = messages.TrustDirectory(runtime.settings)
    now = runtime.clock.now()
    with runtime.session() as session:
        messages.store_messages(
            session,
            [
                messages.Arrival(fixture(name), "127.0.0.1:5000", now)
                for name in ("orm-o01-v24-nw-ct-head.hl7", "orm-o01-v23-lf-escapes.hl7")
            ],
            directory=directory,
            now=now,
        )
        trust_ids = set(session.scalars(sa.select(InboundMessage.trust_id)))
    assert len({t % 2 for t in trust_ids}) == 2  # one trust in each partition

    with runtime.session() as first:
        # The first worker's transaction (and its trust locks) is still open ...
        taken_first = messages.apply_pending(first, directory=directory, now=now, partition=(0, 2))
        with runtime.session() as second:
            # ... and the second worker still gets its own trust's message.
            taken_second = messages.apply_pending(
                second, directory=directory, now=now, partition=(1, 2)
            )
    assert (taken_first, taken_second) == (1, 1)
    with runtime.session() as session:
        assert messages.count_pending(session) == 0


def test_an_applied_message_cannot_be_edited(runtime: Runtime, client, admin_token: str) -> None:
    [outcome] = receive(runtime, "orm-o01-v24-nw-ct-head.hl7")
    response = client.put(
        f"/api/v1/messages/{outcome.message_id}",
        data="MSH|^~\\&|X",
        headers=auth(admin_token),
        content_type="text/plain",
    )
    assert response.status_code == 409


def test_a_rejected_message_from_a_trust_added_later_applies_on_replay(
    runtime: Runtime, client, admin_token: str
) -> None:
    [outcome] = receive(
        runtime, "adt-a08-v23-latin1-nhs-in-pid19.hl7"
    )  # PAS/RM3: not a known sender yet
    assert outcome.state == "rejected"
    with runtime.session() as session:
        make_trust(
            session,
            now=runtime.clock.now(),
            code="RM3P",
            sending_application="PAS",
            sending_facility="RM3",
        )
    replayed = client.post(
        f"/api/v1/messages/{outcome.message_id}/replay", headers=auth(admin_token)
    )
    assert replayed.json["state"] == "applied"
    assert replayed.json["trust"] == "RM3P"


def test_the_cli_lists_shows_edits_and_replays_messages(
    runtime: Runtime, admin_token: str, capsys, tmp_path: Path
) -> None:
    from worklist.cli import main

    [failed] = receive(runtime, "orm-o01-v24-ca.hl7")
    receive(runtime, "orm-o01-v24-nw-ct-head.hl7")
    env_url = runtime.settings.resolved_database_url
    import os

    os.environ["WORKLIST_DATABASE_URL"] = env_url
    try:
        assert main(["messages", "list", "--state", "failed"]) == 0
        listed = capsys.readouterr().out
        assert "RW6000125" in listed and "failed" in listed
        assert main(["messages", "show", str(failed.message_id)]) == 0
        assert "ORC|CA|" in capsys.readouterr().out
        assert main(["messages", "replay", str(failed.message_id)]) == 0
        assert "applied" in capsys.readouterr().out
        assert main(["messages", "replay", str(failed.message_id)]) == 1
        [rejected] = receive(runtime, "oru-r01-v24-unsupported.hl7")
        corrected = tmp_path / "corrected.hl7"
        corrected.write_bytes(fixture("orm-o01-v24-sc-cm.hl7").replace(b"RW6000124", b"RW6-FIXED"))
        assert main(["messages", "edit", str(rejected.message_id), "--file", str(corrected)]) == 0
        assert main(["messages", "replay", str(rejected.message_id)]) == 0
        capsys.readouterr()
        assert main(["messages", "list", "--control-id", "RW6-FIXED", "--json"]) == 0
        assert '"state": "applied"' in capsys.readouterr().out
    finally:
        del os.environ["WORKLIST_DATABASE_URL"]
