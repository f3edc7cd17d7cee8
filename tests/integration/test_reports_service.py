"""Reports and delivery services against a real database and real MLLP sockets (RIS simulator).

Claims are made by setting Study.claimed_by_id / claim_expires_at through the factories, as the
worklist engine's own tests cover how claims are taken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import sqlalchemy as sa

from hl7.sender import MllpSender
from tests.factories import make_study, make_token, make_trust, make_user
from worklist.bootstrap import Runtime
from worklist.clock import FixedClock
from worklist.db.models import (
    Alert,
    Assignment,
    OutboundMessage,
    ReportVersion,
    Study,
    StudyStatusChange,
    Trust,
    User,
)
from worklist.errors import Conflict, Forbidden, InvalidInput
from worklist.ris_simulator import RisBehaviour, RisSimulator
from worklist.services import delivery, reports
from worklist.services.delivery import _take

FAST = {"retry_base_seconds": 1.0, "retry_max_seconds": 8.0, "ack_timeout_seconds": 2.0}


def fields(payload: str, segment: str) -> list[list[str]]:
    return [s.split("|") for s in payload.split("\r") if s.startswith(segment + "|")]


@dataclass
class World:
    runtime: Runtime
    clock: FixedClock
    trust_id: int
    consultant_id: int
    trainee_id: int
    manager_id: int

    def user(self, session: sa.orm.Session, user_id: int) -> User:
        user = session.get(User, user_id)
        assert user is not None
        return user

    def study(
        self, *, claimed_by: int | None = None, status: str = "ready", trust_id: int | None = None
    ) -> int:
        now = self.clock.now()
        with self.runtime.session() as s:
            trust = s.get(Trust, trust_id or self.trust_id)
            assert trust is not None
            study = make_study(
                s, trust=trust, now=now, status=status,
                claimed_by_id=claimed_by, claimed_at=now if claimed_by else None,
                claim_expires_at=now + timedelta(minutes=30) if claimed_by else None,
            )  # fmt: skip
            if claimed_by:
                s.add(
                    Assignment(
                        study_id=study.id,
                        user_id=claimed_by,
                        kind="pull",
                        started_at=now,
                        expires_at=now + timedelta(minutes=30),
                    )
                )
            return study.id

    def sign(
        self, study_id: int, user_id: int, status: str, text: str = "Normal.", urgent: bool = False
    ) -> reports.Signed:
        with self.runtime.session() as s:
            return reports.sign_report(
                s, study_id=study_id, user=self.user(s, user_id), status=status, text=text,
                now=self.clock.now(), urgent_finding=urgent,
            )  # fmt: skip

    def addendum(self, study_id: int, user_id: int, text: str) -> reports.Signed:
        with self.runtime.session() as s:
            return reports.add_addendum(
                s, study_id=study_id, user=self.user(s, user_id), text=text, now=self.clock.now()
            )

    def outbox(self, study_id: int | None = None) -> list[OutboundMessage]:
        with self.runtime.session() as s:
            q = sa.select(OutboundMessage).order_by(OutboundMessage.id)
            if study_id is not None:
                q = q.where(OutboundMessage.study_id == study_id)
            return list(s.scalars(q))


def make_world(
    runtime: Runtime, clock: FixedClock, *, port: int | None = None, profile: dict | None = None
) -> World:  # type: ignore[type-arg]
    now = clock.now()
    with runtime.session() as s:
        trust = make_trust(
            s, now=now, code="RW6", sending_application="CRIS",
            ris_host="127.0.0.1" if port else None, ris_port=port,
            hl7_profile={"outbound": {**FAST, **(profile or {})}},
        )  # fmt: skip
        consultant = make_user(
            s,
            now=now,
            username="okafor",
            trusts=("RW6",),
            credentials=("CT",),
            full_name="Dr Ngozi Okafor",
            professional_id="C4567890",
        )
        trainee = make_user(
            s,
            now=now,
            username="lee",
            trusts=("RW6",),
            credentials=("CT",),
            full_name="Dr Sam Lee",
            can_finalise=False,
        )
        manager = make_user(s, now=now, username="boss", role="manager")
        return World(runtime, clock, trust.id, consultant.id, trainee.id, manager.id)


@pytest.fixture
def world(runtime: Runtime, clock: FixedClock) -> World:
    return make_world(runtime, clock)


@pytest.fixture
def ris() -> Iterator[RisSimulator]:
    with RisSimulator(name="RW6") as sim:
        yield sim


@pytest.fixture
def sender() -> Iterator[MllpSender]:
    with MllpSender(connect_timeout=2) as s:
        yield s


# --- signing ------------------------------------------------------------------------------


def test_preliminary_final_and_addendum_queue_three_orus_p_f_c_in_order(world: World) -> None:
    study = world.study(claimed_by=world.trainee_id)
    world.sign(study, world.trainee_id, "preliminary", "Findings: small bleed.\nImpression: bleed")
    with world.runtime.session() as s:
        s.get(Study, study).claimed_by_id = world.consultant_id  # type: ignore[union-attr]
        s.get(Study, study).claim_expires_at = world.clock.now() + timedelta(minutes=30)  # type: ignore[union-attr]
    world.clock.advance(timedelta(minutes=10))
    world.sign(study, world.consultant_id, "final", "Findings: small bleed.\nImpression: SAH.")
    world.clock.advance(timedelta(hours=2))
    world.addendum(study, world.consultant_id, "Discussed with the neurosurgeons.")
    out = world.outbox(study)
    assert [fields(m.payload, "OBR")[0][25] for m in out] == ["P", "F", "C"]
    assert [m.state for m in out] == ["pending"] * 3
    assert len({m.control_id for m in out}) == 3
    final_obr = fields(out[1].payload, "OBR")[0]
    assert final_obr[32].startswith("C4567890&Okafor&Ngozi")  # the verifier is responsible
    assert final_obr[33].split("&")[1:3] == ["Lee", "Sam"]  # the trainee author assists
    addendum_obx = [f[5] for f in fields(out[2].payload, "OBX")]
    assert "Findings: small bleed." in addendum_obx and "SAH." in addendum_obx
    assert addendum_obx[-1] == "Discussed with the neurosurgeons."
    with world.runtime.session() as s:
        versions = list(s.scalars(sa.select(ReportVersion).order_by(ReportVersion.sequence)))
        assert [(v.kind, v.author_id, v.verifier_id) for v in versions] == [
            ("preliminary", world.trainee_id, None),
            ("final", world.trainee_id, world.consultant_id),
            ("addendum", world.consultant_id, world.consultant_id),
        ]
        assert versions[1].text == "Findings: small bleed.\nImpression: SAH."  # never edited
        assert s.get(Study, study).status == "final"  # type: ignore[union-attr]


def test_the_oru_echoes_the_trusts_identifiers_and_order_numbers(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    with world.runtime.session() as s:
        row = s.get(Study, study)
        assert row is not None
        row.placer_order_namespace, row.filler_order_namespace = "EPC", "CRIS"
        accession, placer, filler = (
            row.accession_number,
            row.placer_order_number,
            row.filler_order_number,
        )
    signed = world.sign(study, world.consultant_id, "final")
    payload = signed.outbound.payload
    assert fields(payload, "ORC")[0][1:4] == ["RE", f"{placer}^EPC", f"{filler}^CRIS"]
    assert fields(payload, "OBR")[0][18] == accession
    msh = fields(payload, "MSH")[0]
    assert (msh[4], msh[5], msh[9]) == ("CRIS", "RW6", signed.outbound.control_id)
    assert fields(payload, "PID")[0][3].endswith("^^^RW6^MR")


def test_signing_releases_the_claim_and_moves_the_study(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    world.sign(study, world.consultant_id, "final")
    with world.runtime.session() as s:
        row = s.get(Study, study)
        assert row is not None and row.claimed_by_id is None and row.status == "final"
        ended = s.scalars(sa.select(Assignment).where(Assignment.study_id == study)).one()
        assert ended.end_reason == "signed"
        change = s.scalars(
            sa.select(StudyStatusChange)
            .where(StudyStatusChange.study_id == study)
            .order_by(StudyStatusChange.id.desc())
        ).first()
        assert change is not None and change.to_status == "final" and change.source == "user:okafor"


def test_only_the_claim_holder_or_a_manager_can_sign(world: World) -> None:
    study = world.study(claimed_by=world.trainee_id)
    with pytest.raises(Forbidden, match="claim"):
        world.sign(study, world.consultant_id, "final")
    assert world.outbox() == []
    world.sign(study, world.manager_id, "final")
    assert len(world.outbox()) == 1


def test_a_trainee_cannot_sign_final(world: World) -> None:
    study = world.study(claimed_by=world.trainee_id)
    with pytest.raises(Forbidden):
        world.sign(study, world.trainee_id, "final")


def test_signing_a_study_the_ris_cancelled_is_refused_with_the_reason(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    with world.runtime.session() as s:
        row = s.get(Study, study)
        assert row is not None
        row.status = "cancelled"
        s.add(
            StudyStatusChange(
                study_id=study,
                from_status="ready",
                to_status="cancelled",
                at=world.clock.now(),
                reason="ORC-16: wrong patient",
                source="hl7:X1",
            )
        )
    with pytest.raises(Conflict, match="wrong patient"):
        world.sign(study, world.consultant_id, "final")
    assert world.outbox() == []


def test_the_version_and_its_outbox_row_commit_or_roll_back_together(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    with pytest.raises(RuntimeError), world.runtime.session() as s:
        reports.sign_report(
            s,
            study_id=study,
            user=world.user(s, world.consultant_id),
            status="final",
            text="Normal.",
            now=world.clock.now(),
        )
        raise RuntimeError("the process dies before commit")
    with world.runtime.session() as s:
        assert s.scalars(sa.select(ReportVersion)).all() == []
    assert world.outbox() == []
    world.sign(study, world.consultant_id, "final")
    with world.runtime.session() as s:
        (version,) = s.scalars(sa.select(ReportVersion)).all()
        (message,) = s.scalars(sa.select(OutboundMessage)).all()
        assert message.report_version_id == version.id


def test_an_urgent_finding_raises_an_alert_until_a_manager_acknowledges_it(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    signed = world.sign(study, world.consultant_id, "final", "Unexpected lung mass.", urgent=True)
    assert {f[8] for f in fields(signed.outbound.payload, "OBX")} == {"A"}
    assert fields(signed.outbound.payload, "OBR")[0][5] == "S"
    with world.runtime.session() as s:
        (alert,) = reports.open_alerts(s, kinds=(reports.URGENT_ALERT,))
        with pytest.raises(Forbidden):
            reports.acknowledge_alert(
                s, alert_id=alert.id, user=world.user(s, world.consultant_id), now=world.clock.now()
            )
        reports.acknowledge_alert(
            s, alert_id=alert.id, user=world.user(s, world.manager_id), now=world.clock.now()
        )
    with world.runtime.session() as s:
        assert reports.open_alerts(s) == []


def test_autosave_keeps_the_draft_and_renews_the_lease(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    world.clock.advance(timedelta(minutes=20))
    with world.runtime.session() as s:
        reports.save_draft(
            s,
            study_id=study,
            user=world.user(s, world.consultant_id),
            text="Draft | one",
            now=world.clock.now(),
        )
    with world.runtime.session() as s:
        row = s.get(Study, study)
        assert row is not None and row.claim_expires_at is not None
        assert row.claim_expires_at > world.clock.now() + timedelta(minutes=20)
        view = reports.get_report(
            s, study_id=study, user=world.user(s, world.consultant_id), now=world.clock.now()
        )
        assert view.draft_text == "Draft | one" and view.versions == []
    with pytest.raises(Forbidden), world.runtime.session() as s:
        reports.save_draft(
            s, study_id=study, user=world.user(s, world.trainee_id), text="x", now=world.clock.now()
        )
    signed = world.sign(study, world.consultant_id, "final", text=None)  # type: ignore[arg-type]
    assert signed.version.text == "Draft | one"


def test_an_addendum_needs_a_final_report(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    with pytest.raises(Conflict):
        world.addendum(study, world.consultant_id, "too early")
    with pytest.raises(InvalidInput):
        world.sign(study, world.consultant_id, "final", text="   ")


def test_an_oru_that_cannot_be_built_is_parked_with_an_alert_and_the_report_stays_signed(
    runtime: Runtime, clock: FixedClock
) -> None:
    w = make_world(runtime, clock, profile={"text_value_type": "PDF"})
    study = w.study(claimed_by=w.consultant_id)
    signed = w.sign(study, w.consultant_id, "final")
    assert signed.outbound.state == "parked" and "text_value_type" in signed.outbound.last_error
    with runtime.session() as s:
        assert s.get(Study, study).status == "final"  # type: ignore[union-attr]
        assert [a.kind for a in s.scalars(sa.select(Alert))] == [reports.PARKED_ALERT]


# --- delivery -----------------------------------------------------------------------------


@pytest.fixture
def live(runtime: Runtime, clock: FixedClock, ris: RisSimulator) -> World:
    return make_world(runtime, clock, port=ris.port)


def signed_final(w: World) -> int:
    study = w.study(claimed_by=w.consultant_id)
    w.sign(study, w.consultant_id, "final")
    return study


def test_an_aa_marks_the_oru_delivered_with_the_ack_recorded(
    live: World, ris: RisSimulator, sender: MllpSender
) -> None:
    study = signed_final(live)
    result = delivery.deliver_pending(live.runtime, sender=sender)
    assert result.delivered == 1
    (m,) = live.outbox(study)
    assert (m.state, m.attempts, m.last_ack_code) == ("delivered", 1, "AA")
    assert m.delivered_at == live.clock.now()
    assert [r.control_id for r in ris.messages()] == [m.control_id]


def test_ae_is_retried_with_backoff_then_parked_with_an_alert_then_resent_by_hand(
    live: World, ris: RisSimulator, sender: MllpSender
) -> None:
    ris.behaviour = RisBehaviour(ack_code="AE", error_text="Order RW6 not on file")
    study = signed_final(live)
    for _ in range(3):  # negative_ack_retries defaults to 3
        delivery.deliver_pending(live.runtime, sender=sender)
        live.clock.advance(timedelta(seconds=10))
    (m,) = live.outbox(study)
    assert (m.state, m.attempts, m.last_ack_code) == ("parked", 3, "AE")
    assert "Order RW6 not on file" in (m.last_error or "")
    with live.runtime.session() as s:
        assert [a.kind for a in reports.open_alerts(s)] == [reports.PARKED_ALERT]
        history = [e.action for e in delivery.delivery_history(s, message_id=m.id)]
        assert history == ["oru_negative_ack"] * 3 + ["oru_parked"]
    assert delivery.deliver_pending(live.runtime, sender=sender).delivered == 0  # parked stays
    ris.behaviour = RisBehaviour()
    with live.runtime.session() as s, pytest.raises(Forbidden):
        delivery.resend(
            s, message_id=m.id, user=live.user(s, live.consultant_id), now=live.clock.now()
        )
    with live.runtime.session() as s:
        delivery.resend(
            s, message_id=m.id, user=live.user(s, live.manager_id), now=live.clock.now()
        )
    assert delivery.deliver_pending(live.runtime, sender=sender).delivered == 1
    (again,) = live.outbox(study)
    assert again.state == "delivered" and again.control_id == m.control_id
    assert {r.control_id for r in ris.messages()} == {m.control_id}


def test_a_later_oru_for_a_study_waits_while_an_earlier_one_is_parked(
    live: World, ris: RisSimulator, sender: MllpSender
) -> None:
    ris.behaviour = RisBehaviour(script=["AR"])
    with live.runtime.session() as s:
        trust = s.get(Trust, live.trust_id)
        assert trust is not None
        trust.hl7_profile = {"outbound": {**FAST, "negative_ack_retries": 1}}
    study = signed_final(live)
    live.addendum(study, live.consultant_id, "More.")
    other = signed_final(live)
    delivery.deliver_pending(live.runtime, sender=sender)
    states = {m.study_id: [] for m in live.outbox()}  # type: ignore[var-annotated]
    for m in live.outbox():
        states[m.study_id].append(m.state)
    assert states == {study: ["parked", "pending"], other: ["delivered"]}
    assert [r.result_status for r in ris.messages()] == ["F", "F"]  # no C before its F


def test_a_refused_connection_backs_off_the_whole_trust_then_delivers_in_order(
    runtime: Runtime, clock: FixedClock, sender: MllpSender
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    w = make_world(runtime, clock, port=port)
    studies = [signed_final(w) for _ in range(3)]
    first = delivery.deliver_pending(runtime, sender=sender)
    assert first.delivered == 0 and first.failures == 1
    out = w.outbox()
    assert all(m.next_attempt_at and m.next_attempt_at > clock.now() for m in out)
    assert "ConnectionRefused" in (out[0].last_error or "")
    assert delivery.deliver_pending(runtime, sender=sender).rounds == []  # nothing due yet
    with RisSimulator(port=port) as sim:
        clock.advance(timedelta(seconds=10))
        assert delivery.deliver_pending(runtime, sender=sender).delivered == 3
        assert [m.control_id for m in sim.messages()] == [m.control_id for m in out]
    assert [m.study_id for m in w.outbox()] == studies


def test_a_silent_ris_times_out_and_the_retry_reuses_the_control_id(
    live: World, ris: RisSimulator, sender: MllpSender
) -> None:
    with live.runtime.session() as s:
        trust = s.get(Trust, live.trust_id)
        assert trust is not None
        trust.hl7_profile = {"outbound": {**FAST, "ack_timeout_seconds": 0.3}}
    ris.behaviour = RisBehaviour(script=["silent"])
    study = signed_final(live)
    assert delivery.deliver_pending(live.runtime, sender=sender).failures == 1
    live.clock.advance(timedelta(seconds=10))
    assert delivery.deliver_pending(live.runtime, sender=sender).delivered == 1
    (m,) = live.outbox(study)
    assert [r.control_id for r in ris.messages()] == [m.control_id, m.control_id]
    assert m.attempts == 2


def test_a_message_taken_by_a_deliverer_that_died_goes_again_after_its_lease(
    live: World, ris: RisSimulator, sender: MllpSender
) -> None:
    study = signed_final(live)
    with live.runtime.session() as s:
        (m,) = s.scalars(sa.select(OutboundMessage)).all()
        assert _take(s, message=m, now=live.clock.now(), lease=32.0)  # ...then SIGKILL
    assert delivery.deliver_pending(live.runtime, sender=sender).delivered == 0
    live.clock.advance(timedelta(seconds=33))
    assert delivery.deliver_pending(live.runtime, sender=sender).delivered == 1
    (m,) = live.outbox(study)
    assert m.attempts == 2 and m.state == "delivered"


def test_one_trusts_dead_ris_does_not_delay_another_trusts_reports(
    runtime: Runtime, clock: FixedClock, sender: MllpSender
) -> None:
    with RisSimulator(behaviour=RisBehaviour(silent=True)) as dead, RisSimulator() as alive:
        w = make_world(runtime, clock, port=dead.port, profile={"ack_timeout_seconds": 3.0})
        with runtime.session() as s:
            other = make_trust(
                s,
                now=clock.now(),
                code="RM2",
                sending_application="SOLITON",
                ris_host="127.0.0.1",
                ris_port=alive.port,
                hl7_profile={"outbound": FAST},
            )
            other_id = other.id
        signed_final(w)
        for _ in range(5):
            sid = w.study(claimed_by=w.manager_id, trust_id=other_id)
            w.sign(sid, w.manager_id, "final")
        began = time.monotonic()
        worker = threading.Thread(
            target=delivery.deliver_pending, args=(runtime,), kwargs={"sender": sender}
        )
        worker.start()
        while len(alive.messages()) < 5 and time.monotonic() - began < 5:
            time.sleep(0.02)
        elapsed = time.monotonic() - began
        worker.join()
        assert len(alive.messages()) == 5
        assert elapsed < 2.5  # well inside the dead RIS's 3 s ACK timeout


# --- API ----------------------------------------------------------------------------------


def test_the_api_saves_signs_adds_an_addendum_and_lists_deliveries(
    app,
    live: World,
    ris: RisSimulator,
    sender: MllpSender,  # type: ignore[no-untyped-def]
) -> None:
    client = app.test_client()
    study = live.study(claimed_by=live.consultant_id)
    with live.runtime.session() as s:
        token = make_token(s, user=live.user(s, live.consultant_id), now=live.clock.now())
        boss = make_token(s, user=live.user(s, live.manager_id), now=live.clock.now())
    auth = {"Authorization": f"Bearer {token}"}
    r = client.put(f"/api/v1/studies/{study}/report", json={"text": "No fracture."}, headers=auth)
    assert r.status_code == 200, r.json
    r = client.post(
        f"/api/v1/studies/{study}/report/sign",
        json={"status": "final", "urgent_finding": False},
        headers=auth,
    )
    assert r.status_code == 201, r.json
    assert r.json["version"]["result_status"] == "F"
    r = client.post(
        f"/api/v1/studies/{study}/addenda", json={"text": "Also: effusion."}, headers=auth
    )
    assert r.status_code == 201 and r.json["version"]["kind"] == "addendum"
    bad = client.post(
        f"/api/v1/studies/{study}/report/sign", json={"status": "draft"}, headers=auth
    )
    assert bad.status_code == 400
    delivery.deliver_pending(live.runtime, sender=sender)
    r = client.get(f"/api/v1/studies/{study}/deliveries", headers=auth)
    assert r.status_code == 200
    rows = r.json["deliveries"]
    assert [(d["state"], d["last_ack_code"]) for d in rows] == [("delivered", "AA")] * 2
    assert rows[0]["history"][-1]["action"] == "oru_delivered"
    r = client.post(f"/api/v1/deliveries/{rows[1]['id']}/resend", headers=auth)
    assert r.status_code == 403
    r = client.post(
        f"/api/v1/deliveries/{rows[0]['id']}/resend", headers={"Authorization": f"Bearer {boss}"}
    )
    assert r.status_code == 409  # an older ORU would overwrite the newer report at the RIS
    r = client.post(
        f"/api/v1/deliveries/{rows[1]['id']}/resend", headers={"Authorization": f"Bearer {boss}"}
    )
    assert r.status_code == 201 and r.json["control_id"] != rows[1]["control_id"]
    r = client.get(f"/api/v1/studies/{study}/report", headers=auth)
    assert [v["kind"] for v in r.json["versions"]] == ["final", "addendum"]


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    import random

    rng = random.Random(5)
    delays = [delivery.backoff_seconds(n, base=2.0, cap=60.0, rng=rng) for n in range(1, 9)]
    assert 1.0 <= delays[0] < 2.0 and 2.0 <= delays[1] < 4.0 and 8.0 <= delays[3] < 16.0
    assert all(30.0 <= d < 60.0 for d in delays[5:])
    again = [delivery.backoff_seconds(3, base=2.0, cap=60.0, rng=rng) for _ in range(20)]
    assert len(set(again)) > 10  # jittered, so many senders do not retry in step


def test_the_starting_text_is_the_procedures_template_with_placeholders_filled(
    world: World,
) -> None:
    study = world.study(claimed_by=world.consultant_id)  # CHEAD, CT, by the factory
    with world.runtime.session() as s:
        row = s.get(Study, study)
        assert row is not None
        row.clinical_details = "Fall, GCS 14"
        start = reports.starting_text(
            s, study_id=study, user=world.user(s, world.consultant_id), now=world.clock.now()
        )
    assert start.template == "CT head"
    assert "Clinical details: Fall, GCS 14" in start.text
    assert "(23/11/2026)" in start.text and start.unfilled == ()


def test_two_simultaneous_signings_of_one_study_make_one_final_and_one_oru(world: World) -> None:
    study = world.study(claimed_by=world.consultant_id)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def sign() -> None:
        barrier.wait()
        try:
            world.sign(study, world.consultant_id, "final", "Normal.")
            outcomes.append("signed")
        except (Conflict, Forbidden) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=sign) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and outcomes.count("signed") == 1  # the other: a clean 409/403
    assert len(world.outbox(study)) == 1
    with world.runtime.session() as s:
        assert len(s.scalars(sa.select(ReportVersion)).all()) == 1
