"""Signed reports travel to the trust's RIS end to end: the reports service, the outbox, the
delivery loop, the MLLP sender and a RIS (our simulator, or python-hl7's server which we did not
write), including a RIS that is down for the first 200 messages of a burst and a deliverer killed
with SIGKILL in the middle of a send."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hl7.sender import MllpSender
from tests.factories import make_study, make_trust, make_user
from tests.third_party import python_hl7_server
from worklist.bootstrap import Runtime
from worklist.clock import FixedClock
from worklist.db.models import OutboundMessage, Study, Trust, User
from worklist.ris_simulator import RisBehaviour, RisSimulator
from worklist.services import delivery, reports

WORKLIST = str(Path(sys.executable).with_name("worklist"))
FAST = {"retry_base_seconds": 1.0, "retry_max_seconds": 30.0, "ack_timeout_seconds": 3.0}


class Region:
    """One trust whose RIS is at `port`, a consultant and a trainee; signs reports."""

    def __init__(
        self, runtime: Runtime, clock: FixedClock, port: int, profile: dict | None = None
    ) -> None:  # type: ignore[type-arg]
        self.runtime, self.clock = runtime, clock
        with runtime.session() as s:
            trust = make_trust(
                s,
                now=clock.now(),
                code="RW6",
                sending_application="CRIS",
                ris_host="127.0.0.1",
                ris_port=port,
                hl7_profile={"outbound": {**FAST, **(profile or {})}},
            )
            consultant = make_user(
                s,
                now=clock.now(),
                username="okafor",
                trusts=("RW6",),
                credentials=("CT",),
                full_name="Dr Ngozi Okafor",
            )
            trainee = make_user(
                s,
                now=clock.now(),
                username="lee",
                trusts=("RW6",),
                credentials=("CT",),
                full_name="Dr Sam Lee",
                can_finalise=False,
            )
            self.trust_id, self.consultant, self.trainee = trust.id, consultant.id, trainee.id

    def study(self, claimed_by: int) -> tuple[int, str]:
        with self.runtime.session() as s:
            trust = s.get(Trust, self.trust_id)
            assert trust is not None
            study = make_study(
                s,
                trust=trust,
                now=self.clock.now(),
                claimed_by_id=claimed_by,
                claim_expires_at=self.clock.now() + timedelta(hours=1),
            )
            return study.id, study.accession_number

    def claim(self, study_id: int, user_id: int) -> None:
        with self.runtime.session() as s:
            study = s.get(Study, study_id)
            assert study is not None
            study.claimed_by_id = user_id
            study.claim_expires_at = self.clock.now() + timedelta(hours=1)

    def sign(self, study_id: int, user_id: int, status: str, text: str) -> str:
        with self.runtime.session() as s:
            user = s.get(User, user_id)
            assert user is not None
            if status == "addendum":
                signed = reports.add_addendum(
                    s, study_id=study_id, user=user, text=text, now=self.clock.now()
                )
            else:
                signed = reports.sign_report(
                    s, study_id=study_id, user=user, status=status, text=text, now=self.clock.now()
                )
            return signed.outbound.control_id

    def outbox(self) -> list[OutboundMessage]:
        with self.runtime.session() as s:
            return list(s.scalars(sa.select(OutboundMessage).order_by(OutboundMessage.id)))


@pytest.fixture
def ris() -> Iterator[RisSimulator]:
    with RisSimulator(name="RW6") as sim:
        yield sim


def test_preliminary_final_and_addendum_reach_the_ris_as_p_f_c_in_that_order(
    runtime: Runtime, clock: FixedClock, ris: RisSimulator
) -> None:
    region = Region(runtime, clock, ris.port)
    study, accession = region.study(claimed_by=region.trainee)
    stop = threading.Event()
    loop = threading.Thread(
        target=delivery.run_delivery, args=(runtime, stop), kwargs={"interval": 0.05}
    )
    loop.start()
    try:
        ids = [
            region.sign(study, region.trainee, "preliminary", "Small subdural.\nImpression: SDH")
        ]
        region.claim(study, region.consultant)
        ids.append(
            region.sign(
                study,
                region.consultant,
                "final",
                "Small subdural haematoma.\nImpression: acute SDH, 4 mm.",
            )
        )
        ids.append(region.sign(study, region.consultant, "addendum", "Neurosurgeons informed."))
        deadline = time.monotonic() + 10
        while len(ris.messages()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(10)
    got = ris.messages()
    assert [m.control_id for m in got] == ids
    assert [m.result_status for m in got] == ["P", "F", "C"]
    assert {m.accession_number for m in got} == {accession}
    for message, status in zip(got, "PFC", strict=True):
        assert {seg[11] for seg in message.segments("OBX")} == {status}
    assert [m.state for m in region.outbox()] == ["delivered"] * 3


def test_a_ris_down_for_the_first_200_messages_of_a_burst_gets_every_report_in_order(
    runtime: Runtime, clock: FixedClock
) -> None:
    with RisSimulator(behaviour=RisBehaviour(refuse_first=200)) as sim, MllpSender() as sender:
        region = Region(runtime, clock, sim.port)
        expected: dict[str, list[str]] = defaultdict(list)
        for n in range(90):  # 90 x (P, F) + 45 addenda = 225 ORUs
            study, accession = region.study(claimed_by=region.trainee)
            expected[accession].append(region.sign(study, region.trainee, "preliminary", f"P{n}"))
            region.claim(study, region.consultant)
            expected[accession].append(region.sign(study, region.consultant, "final", f"F{n}"))
            if n % 2 == 0:
                expected[accession].append(
                    region.sign(study, region.consultant, "addendum", f"A{n}")
                )
        passes = 0
        while passes < 1000:
            passes += 1
            delivery.deliver_pending(runtime, sender=sender)
            if all(m.state == "delivered" for m in region.outbox()):
                break
            clock.advance(timedelta(minutes=1))  # past any backoff
        assert sim.refused == 200
        outbox = region.outbox()
        assert len(outbox) == 225 and {m.state for m in outbox} == {"delivered"}
        received: dict[str, list[str]] = defaultdict(list)
        for m in sim.messages():
            received[m.accession_number].append(m.control_id)
        assert received == expected  # every report, once each, in signing order per study
        statuses = {
            acc: [m.result_status for m in sim.messages() if m.accession_number == acc]
            for acc in expected
        }
        assert all(s in (["P", "F"], ["P", "F", "C"]) for s in statuses.values())


def test_a_deliverer_killed_mid_send_is_replaced_and_the_ris_sees_one_control_id(
    runtime: Runtime, clock: FixedClock, database_url: str, tmp_path: Path
) -> None:
    with RisSimulator(behaviour=RisBehaviour(silent=True)) as sim:
        region = Region(runtime, clock, sim.port, profile={"ack_timeout_seconds": 30.0})
        study, _ = region.study(claimed_by=region.consultant)
        control_id = region.sign(study, region.consultant, "final", "Normal.")
        env = {
            **os.environ,
            "WORKLIST_DATABASE_URL": database_url,
            "WORKLIST_INSTANCE_PATH": str(tmp_path),
        }
        process = subprocess.Popen(
            [WORKLIST, "deliveries", "run", "--loop"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while not sim.messages() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [m.control_id for m in sim.messages()] == [control_id]  # sent, no ACK yet
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        (taken,) = region.outbox()
        assert taken.state == "pending" and taken.attempts == 1
        sim.behaviour = RisBehaviour()
        with MllpSender() as sender:
            clock.set(datetime.now(UTC))
            assert delivery.deliver_pending(runtime, sender=sender).delivered == 0  # leased
            clock.set(datetime.now(UTC) + timedelta(minutes=2))  # the dead one's lease is over
            assert delivery.deliver_pending(runtime, sender=sender).delivered == 1
        assert [m.control_id for m in sim.messages()] == [control_id, control_id]
        (done,) = region.outbox()
        assert done.state == "delivered" and done.attempts == 2


def test_the_cli_lists_the_outbox_and_resends_a_parked_oru(
    runtime: Runtime, clock: FixedClock, database_url: str, tmp_path: Path
) -> None:
    with RisSimulator(behaviour=RisBehaviour(ack_code="AR", error_text="No such order")) as sim:
        region = Region(runtime, clock, sim.port, profile={"negative_ack_retries": 1})
        with runtime.session() as s:
            make_user(s, now=clock.now(), username="boss", role="manager")
        study, _ = region.study(claimed_by=region.consultant)
        control_id = region.sign(study, region.consultant, "final", "Normal.")
        with MllpSender() as sender:
            delivery.deliver_pending(runtime, sender=sender)
        env = {
            **os.environ,
            "WORKLIST_DATABASE_URL": database_url,
            "WORKLIST_INSTANCE_PATH": str(tmp_path),
        }

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [WORKLIST, *args], env=env, capture_output=True, text=True, timeout=60
            )

        listed = run("deliveries", "list", "--state", "parked", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert (row["control_id"], row["last_ack_code"], row["trust"]) == (control_id, "AR", "RW6")
        assert "No such order" in row["last_error"]
        sim.behaviour = RisBehaviour()
        resent = run("deliveries", "resend", str(row["id"]), "--by", "boss")
        assert resent.returncode == 0, resent.stderr
        ran = run("deliveries", "run")
        assert ran.returncode == 0, ran.stderr
        assert [m.answered for m in sim.messages()] == ["AR", "AA"], (ran.stdout, ran.stderr)
        assert run("deliveries", "resend", str(row["id"]), "--by", "okafor").returncode == 1


def test_simulate_ris_plays_the_trusts_ris_and_reports_what_it_received(
    runtime: Runtime, clock: FixedClock, database_url: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    region = Region(runtime, clock, port)
    study, _ = region.study(claimed_by=region.consultant)
    region.sign(study, region.consultant, "final", "Normal.")
    env = {
        **os.environ,
        "WORKLIST_DATABASE_URL": database_url,
        "WORKLIST_INSTANCE_PATH": str(tmp_path),
    }
    process = subprocess.Popen(
        [WORKLIST, "simulate-ris", "--duration", "20", "--dump", str(tmp_path / "dump")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert f"RIS RW6 listening on 127.0.0.1:{port}" in process.stdout.readline()
        with MllpSender() as sender:
            assert delivery.deliver_pending(runtime, sender=sender).delivered == 1
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert json.loads(out)["RW6"]["by_status"] == {"F": 1}
    assert len(json.loads((tmp_path / "dump" / "RW6.json").read_text())) == 1


# --- a receiver we did not write ----------------------------------------------------------


def test_a_third_party_hl7_server_receives_and_acknowledges_a_signed_report(
    runtime: Runtime, clock: FixedClock
) -> None:
    with python_hl7_server("latin-1") as (port, server):
        region = Region(runtime, clock, port)  # default profile: 8859/1, TX lines
        study, _ = region.study(claimed_by=region.consultant)
        control_id = region.sign(
            study,
            region.consultant,
            "final",
            "Zoë's scan | no change ^ & ~ stable\nImpression: normal",
        )
        with MllpSender() as sender:
            assert delivery.deliver_pending(runtime, sender=sender).delivered == 1
        seen = json.loads(server.stdout.readline())
        assert seen == {
            "control": control_id,
            "status": "F",
            "obx5": ["Zoë's scan | no change ^ & ~ stable", "normal"],
        }
        (row,) = region.outbox()
        assert (row.state, row.last_ack_code) == ("delivered", "AA")


def test_the_demo_simulator_thread_plays_every_trusts_ris_and_stops_cleanly(
    runtime: Runtime, clock: FixedClock
) -> None:
    import socket

    from worklist.cli_reports import start_simulation_thread

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    region = Region(runtime, clock, port)
    study, _ = region.study(claimed_by=region.consultant)
    control_id = region.sign(study, region.consultant, "final", "Normal.")
    thread, stop = start_simulation_thread(runtime)
    try:
        with MllpSender() as sender:
            for _ in range(50):
                if delivery.deliver_pending(runtime, sender=sender).delivered:
                    break
                clock.advance(timedelta(minutes=1))
                time.sleep(0.05)
    finally:
        stop()
    assert not thread.is_alive()
    (row,) = region.outbox()
    assert (row.control_id, row.state) == (control_id, "delivered")
