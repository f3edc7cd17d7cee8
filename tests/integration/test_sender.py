"""The MLLP sender (hl7/sender.py) against real sockets: the RIS simulator answering AA, AE,
AR, slowly, not at all, by resetting, over TLS; nothing listening; and python-hl7's MLLP server
(PyPI `hl7`, in its own venv under /tmp) as a receiver we did not write.

Also the simulator's order traffic (worklist/ris_simulator.py): realistic ORM^O01 sent over
MLLP, each order's messages in order, each valid for hl7apy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hl7.outbound import (
    Clinician,
    OrderNumber,
    OruInput,
    OutboundProfile,
    PatientIdentifier,
    build_oru,
    read_ack,
)
from hl7.sender import AckTimeout, ConnectionLost, ConnectionRefused, Endpoint, MllpSender
from tests.third_party import python_hl7_server
from worklist.ris_simulator import (
    RisBehaviour,
    RisSimulator,
    TrustFeed,
    order_traffic,
    send_orders,
)


def oru(control_id: str = "WL0001", text: str = "Normal chest | no ^ change.") -> bytes:
    inp = OruInput(
        control_id=control_id,
        message_time=datetime(2026, 7, 1, 12, 0, tzinfo=UTC),
        status="F",
        patient_identifiers=(
            PatientIdentifier("9434765919", "NHS", "NH"),
            PatientIdentifier("H1234", "RW6", "MR"),
        ),
        accession_number="RW6000001",
        procedure_code="XCHES",
        procedure_name="XR Chest",
        report_time=datetime(2026, 7, 1, 11, 0, tzinfo=UTC),
        radiologist=Clinician("C1", "Okafor", "Ngozi"),
        text=text,
        placer_order_number=OrderNumber("P1", "CRIS"),
        filler_order_number=OrderNumber("RW6000001", "CRIS"),
        modality="CR",
        patient_family_name="Nowak",
        patient_given_name="Zoë",
    )
    profile = OutboundProfile.from_dict(
        {"character_set": "UNICODE UTF-8"}, receiving_application="CRIS", receiving_facility="RW6"
    )
    return build_oru(inp, profile).payload


@pytest.fixture
def ris() -> Iterator[RisSimulator]:
    with RisSimulator(name="RW6") as sim:
        yield sim


@pytest.fixture
def sender() -> Iterator[MllpSender]:
    with MllpSender(connect_timeout=2) as s:
        yield s


def endpoint(sim: RisSimulator, **kw: object) -> Endpoint:
    return Endpoint("127.0.0.1", sim.port, **kw)  # type: ignore[arg-type]


def test_an_aa_is_returned_and_the_connection_is_reused(
    ris: RisSimulator, sender: MllpSender
) -> None:
    for n in range(3):
        ack = sender.send(endpoint(ris), oru(f"WL{n}"), timeout=5)
        assert read_ack(ack, f"WL{n}").delivered
    assert ris.connections == 1
    assert [m.control_id for m in ris.messages()] == ["WL0", "WL1", "WL2"]
    assert ris.messages()[0].result_status == "F"
    assert ris.messages()[0].filler_order_number == "RW6000001^CRIS"


@pytest.mark.parametrize(("code", "outcome"), [("AE", "error"), ("AR", "reject")])
def test_ae_and_ar_come_back_with_the_ris_error_text(
    ris: RisSimulator, sender: MllpSender, code: str, outcome: str
) -> None:
    ris.behaviour = RisBehaviour(ack_code=code, error_text="Order not found")
    result = read_ack(sender.send(endpoint(ris), oru(), timeout=5), "WL0001")
    assert (result.outcome, result.code) == (outcome, code)
    assert "Order not found" in result.text


def test_an_ack_for_another_message_is_a_mismatch(ris: RisSimulator, sender: MllpSender) -> None:
    ris.behaviour = RisBehaviour(mismatch=True)
    assert read_ack(sender.send(endpoint(ris), oru(), timeout=5), "WL0001").outcome == "mismatch"


def test_a_slow_ris_is_waited_for_within_the_timeout(ris: RisSimulator, sender: MllpSender) -> None:
    ris.behaviour = RisBehaviour(delay_seconds=0.3)
    began = time.monotonic()
    assert read_ack(sender.send(endpoint(ris), oru(), timeout=3), "WL0001").delivered
    assert time.monotonic() - began >= 0.3


def test_a_ris_slower_than_the_timeout_raises_ack_timeout(
    ris: RisSimulator, sender: MllpSender
) -> None:
    ris.behaviour = RisBehaviour(delay_seconds=1.0)
    with pytest.raises(AckTimeout):
        sender.send(endpoint(ris), oru(), timeout=0.3)


def test_a_silent_ris_times_out_and_the_next_send_uses_a_fresh_connection(
    ris: RisSimulator, sender: MllpSender
) -> None:
    ris.behaviour = RisBehaviour(silent=True)
    began = time.monotonic()
    with pytest.raises(AckTimeout):
        sender.send(endpoint(ris), oru("WL1"), timeout=0.4)
    assert 0.35 < time.monotonic() - began < 3
    ris.behaviour = RisBehaviour()
    assert read_ack(sender.send(endpoint(ris), oru("WL2"), timeout=5), "WL2").delivered
    assert ris.connections == 2  # a late ACK on the old connection can never be misread


def test_nothing_listening_raises_connection_refused(sender: MllpSender) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefused):
        sender.send(Endpoint("127.0.0.1", port), oru(), timeout=1)


def test_a_reset_before_the_ack_raises_connection_lost_and_the_next_send_gets_through(
    ris: RisSimulator, sender: MllpSender
) -> None:
    ris.behaviour = RisBehaviour(refuse_first=1)
    with pytest.raises(ConnectionLost):
        sender.send(endpoint(ris), oru("WL1"), timeout=2)
    assert read_ack(sender.send(endpoint(ris), oru("WL2"), timeout=2), "WL2").delivered
    assert [m.control_id for m in ris.messages()] == ["WL2"]
    assert ris.refused == 1


def test_a_connection_the_ris_closed_while_idle_is_replaced_transparently(
    sender: MllpSender,
) -> None:
    first = RisSimulator(name="RW6").start_in_thread()
    port = first.port
    assert read_ack(
        sender.send(Endpoint("127.0.0.1", port), oru("WL1"), timeout=2), "WL1"
    ).delivered
    first.stop_thread()  # the RIS restarts: our pooled connection is now dead
    with RisSimulator(name="RW6", port=port) as second:
        ack = sender.send(Endpoint("127.0.0.1", port), oru("WL2"), timeout=2)
        assert read_ack(ack, "WL2").delivered
        assert [m.control_id for m in second.messages()] == ["WL2"]


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made with the openssl command."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "ris.pem", where / "ris.key"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a test certificate: {exc}")
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_delivers_to_a_ris_whose_certificate_we_trust(
    certificate: tuple[Path, Path], sender: MllpSender
) -> None:
    cert, key = certificate
    with RisSimulator(ssl_context=server_context(cert, key)) as sim:
        ep = Endpoint(
            "127.0.0.1", sim.port, tls=True, tls_ca_file=str(cert), server_hostname="localhost"
        )
        assert read_ack(sender.send(ep, oru("WL1"), timeout=5), "WL1").delivered
        assert read_ack(sender.send(ep, oru("WL2"), timeout=5), "WL2").delivered
        assert sim.connections == 1 and len(sim.messages()) == 2


def test_tls_refuses_a_ris_certificate_we_do_not_trust(
    certificate: tuple[Path, Path], sender: MllpSender
) -> None:
    cert, key = certificate
    with RisSimulator(ssl_context=server_context(cert, key)) as sim:
        ep = Endpoint("127.0.0.1", sim.port, tls=True, server_hostname="localhost")
        with pytest.raises(ConnectionRefused, match="TLS"):
            sender.send(ep, oru(), timeout=5)
        assert sim.messages() == []


# --- a receiver we did not write ----------------------------------------------------------


def test_python_hl7s_mllp_server_receives_our_oru_and_acknowledges_it(
    sender: MllpSender,
) -> None:
    with python_hl7_server("utf-8") as (port, server):
        ack = sender.send(
            Endpoint("127.0.0.1", port), oru("WL77", "Zoë: a | b ^ c\nline 2"), timeout=10
        )
        assert read_ack(ack, "WL77").delivered
        seen = json.loads(server.stdout.readline())
        assert seen == {"control": "WL77", "status": "F", "obx5": ["Zoë: a | b ^ c", "line 2"]}


# --- order traffic from the simulator -----------------------------------------------------

FEEDS = [TrustFeed("RW6", "CRIS"), TrustFeed("RM2", "SOLITON", version="2.3.1")]


def test_generated_orders_parse_strictly_in_hl7apy_and_come_in_order_per_order() -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    seen: dict[str, list[str]] = {}
    for feed, text in order_traffic(FEEDS, count=300, seed=7):
        # parsed strictly; not msg.validate(): hl7apy 1.3.5 wrongly demands RQD in ORM's
        # OBR/RQD/... choice group
        msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        orc = next(s for s in text.split("\r") if s.startswith("ORC|")).split("|")
        assert msg.msh.msh_4.to_er7() == feed.code
        seen.setdefault(orc[2], []).append(f"{orc[1]}/{orc[5]}")
    histories = list(seen.values())
    assert all(h[0] == "NW/SC" for h in histories)
    assert any("SC/CM" in h for h in histories)
    assert any("CA/CA" in h for h in histories) and any("XO/SC" in h for h in histories)
    for h in histories:  # nothing after a cancellation or exam completion
        for end in ("CA/CA", "SC/CM"):
            if end in h:
                assert h.index(end) == len(h) - 1


def test_order_traffic_is_sent_over_mllp_and_each_message_acknowledged(
    ris: RisSimulator,
) -> None:
    report = asyncio.run(
        send_orders(
            "127.0.0.1", ris.port, order_traffic(FEEDS, count=60, seed=3), rate_per_second=0
        )
    )
    assert (report.sent, report.failures, report.acks) == (60, 0, {"AA": 60})
    assert {m.message_type for m in ris.messages()} == {"ORM^O01^ORM_O01"}
    assert ris.connections == 2  # one per trust, kept open


def test_order_traffic_respects_the_rate(ris: RisSimulator) -> None:
    report = asyncio.run(
        send_orders("127.0.0.1", ris.port, order_traffic(FEEDS, count=11), rate_per_second=50)
    )
    assert report.seconds >= 0.19 and report.acks == {"AA": 11}


def test_received_messages_can_be_dumped_as_json(tmp_path: Path, sender: MllpSender) -> None:
    dump = tmp_path / "ris.json"
    with RisSimulator(dump_path=dump) as sim:
        sender.send(endpoint(sim), oru("WL9"), timeout=5)
    rows = json.loads(dump.read_text())
    assert [(r["control_id"], r["answered"]) for r in rows] == [("WL9", "AA")]
