"""The MLLP listener over real sockets (port 0) on a real database: store-then-ACK, framing
edge cases, duplicates, order, merges, cancellation of a claimed study, recovery, TLS, corpus.

Fixtures are ours (tests/fixtures/hl7, see its README); the corpus test reads
/work/shared/hl7-corpus in place.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hl7.er7 import Er7Message
from hl7.listener import MllpListener, event_loop_factory, serve_hl7, ssl_context_for
from hl7.mllp import Frame, MllpDecoder, frame
from tests.factories import make_study, make_trust, make_user
from worklist.bootstrap import Runtime
from worklist.db.models import Alert, InboundMessage, Patient, Study, StudyStatusChange, Trust
from worklist.services import messages

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hl7"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "hl7-corpus"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class RunningListener:
    """An MllpListener on its own event loop thread, driven from synchronous tests."""

    def __init__(self, runtime: Runtime, **kwargs: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.listener = MllpListener(runtime, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.listener.start())
        self.port = self.listener.port

    def call(self, coroutine, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def drain(self) -> None:
        self.call(self.listener.drain())

    def stop(self) -> None:
        self.call(self.listener.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def trust(runtime: Runtime) -> int:
    with runtime.session() as session:
        return make_trust(
            session,
            now=runtime.clock.now(),
            code="RW6",
            sending_application="CRIS",
            sending_facility="RW6",
        ).id


@pytest.fixture
def listener(runtime: Runtime, trust: int) -> Iterator[RunningListener]:
    running = RunningListener(runtime)
    yield running
    running.stop()


class Client:
    """A RIS-like MLLP client: one connection, waits for each ACK."""

    def __init__(self, port: int, *, context: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self.decoder = MllpDecoder()
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_ack(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending += [e.payload for e in self.decoder.feed(data) if isinstance(e, Frame)]
        return self.pending.pop(0)

    def send(self, payload: bytes) -> bytes:
        self.send_raw(frame(payload))
        return self.read_ack()

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> list[str]:
    return Er7Message.parse(ack).segment("MSA").fields  # type: ignore[union-attr]


def rows(runtime: Runtime) -> list[InboundMessage]:
    with runtime.session() as session:
        return list(session.scalars(sa.select(InboundMessage).order_by(InboundMessage.id)))


def study(runtime: Runtime, accession: str) -> Study | None:
    with runtime.session() as session:
        return session.scalar(sa.select(Study).where(Study.accession_number == accession))


def test_a_new_order_is_stored_acknowledged_aa_and_applied_as_a_study(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    ack = client.send(fixture("orm-o01-v24-nw-ct-head.hl7"))
    assert msa(ack)[1:3] == ["AA", "RW6000123"]
    listener.drain()
    [row] = rows(runtime)
    assert (row.state, row.ack_code, row.control_id, row.message_type) == (
        "applied",
        "AA",
        "RW6000123",
        "ORM^O01",
    )
    assert row.ack == ack
    assert row.accession_number == "RW6ACC0001"
    created = study(runtime, "RW6ACC0001")
    assert created is not None and created.modality == "CT" and created.order_priority == "S"


def test_the_message_is_committed_before_its_ack_is_sent(runtime: Runtime, trust: int) -> None:
    running = RunningListener(runtime, apply=False)
    try:
        ack = Client(running.port).send(fixture("orm-o01-v24-nw-ct-head.hl7"))
        # A separate connection sees it at once: the ACK followed the commit.
        engine = sa.create_engine(runtime.settings.resolved_database_url)
        with engine.connect() as conn:
            state, stored_ack = conn.execute(
                sa.select(InboundMessage.state, InboundMessage.ack)
            ).one()
        engine.dispose()
        assert (state, stored_ack) == ("received", ack)
    finally:
        running.stop()


def test_messages_stored_but_not_applied_are_applied_when_a_listener_starts(
    runtime: Runtime, trust: int
) -> None:
    first = RunningListener(runtime, apply=False)
    client = Client(first.port)
    for name in ("orm-o01-v24-nw-ct-head.hl7", "orm-o01-v24-sc-cm.hl7"):
        assert msa(client.send(fixture(name)))[1] == "AA"
    client.close()
    first.stop()
    assert [r.state for r in rows(runtime)] == ["received", "received"]
    second = RunningListener(runtime)
    try:
        deadline = time.monotonic() + 10
        while any(r.state == "received" for r in rows(runtime)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.state for r in rows(runtime)] == ["applied", "applied"]
        assert study(runtime, "RW6ACC0001").status == "ready"  # type: ignore[union-attr]
    finally:
        second.stop()


def test_a_resent_message_is_answered_with_the_same_ack_and_applied_once(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    first = client.send(fixture("orm-o01-v24-nw-ct-head.hl7"))
    listener.drain()
    second = client.send(fixture("orm-o01-v24-nw-ct-head.hl7"))
    listener.drain()
    assert second == first
    assert [r.state for r in rows(runtime)] == ["applied", "duplicate"]
    with runtime.session() as session:
        changes = session.scalar(sa.select(sa.func.count()).select_from(StudyStatusChange))
    assert changes == 1


def test_the_store_connection_killed_by_the_database_is_replaced_without_an_ar(
    runtime: Runtime, listener: RunningListener
) -> None:
    """PostgreSQL: the store writer keeps one connection of its own (no pre-ping); when the
    server ends it (a restart, a killed backend) the next batch goes on a new one, once."""
    writer = listener.listener._writer
    if not isinstance(writer, messages.PostgresStoreWriter):
        pytest.skip("the store's own connection is PostgreSQL's")
    template = fixture("orm-o01-v24-nw-ct-head.hl7")
    client = Client(listener.port)
    assert msa(client.send(template))[1] == "AA"
    pid = writer._async.info.backend_pid
    with runtime.engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    time.sleep(0.2)
    second = template.replace(b"RW6000123", b"RW6000124").replace(b"RW6ACC0001", b"RW6ACC0002")
    assert msa(client.send(second))[1] == "AA"
    assert writer._async.info.backend_pid != pid
    assert [r.control_id for r in rows(runtime)] == ["RW6000123", "RW6000124"]


def test_frames_split_across_reads_and_several_in_one_read_are_acknowledged_in_order(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    names = ["orm-o01-v24-nw-ct-head.hl7", "orm-o01-v24-sc-cm.hl7", "adt-a40-v24-merge.hl7"]
    stream = b"\r\n junk " + b"".join(frame(fixture(n)) for n in names)
    for i in range(0, len(stream), 7):
        client.send_raw(stream[i : i + 7])
    acks = [client.read_ack() for _ in names]
    assert [msa(a)[2] for a in acks] == ["RW6000123", "RW6000124", "RW6-M001"]
    assert listener.listener.stats.junk_bytes >= len(b"\r\n junk ")


def test_an_oversize_message_gets_ar_and_the_connection_stays_usable(
    runtime: Runtime, trust: int
) -> None:
    small = replace(runtime, settings=replace(runtime.settings, hl7_max_message_bytes=2000))
    running = RunningListener(small)
    try:
        client = Client(running.port)
        big = fixture("orm-o01-v24-nw-ct-head.hl7") + b"NTE|1||" + b"X" * 5000 + b"\r"
        refused = client.send(big)
        assert msa(refused)[1:3] == ["AR", "RW6000123"]
        assert b"exceeds the limit" in refused
        assert msa(client.send(fixture("orm-o01-v24-sc-cm.hl7")))[1] == "AA"
        running.drain()
        assert [r.state for r in rows(runtime)] == ["rejected", "applied"]
        assert (
            b"NTE|1||XXXX" in rows(runtime)[0].raw
        )  # the first bytes are kept for the error queue
    finally:
        running.stop()


def test_an_idle_connection_is_closed_after_the_timeout(runtime: Runtime, trust: int) -> None:
    quick = replace(runtime, settings=replace(runtime.settings, hl7_idle_timeout_seconds=0.3))
    running = RunningListener(quick)
    try:
        client = Client(running.port)
        started = time.monotonic()
        assert client.sock.recv(10) == b""
        assert time.monotonic() - started < 5
    finally:
        running.stop()


def test_a_connection_closed_mid_message_stores_nothing(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    client.send_raw(b"\x0b" + fixture("orm-o01-v24-nw-ct-head.hl7")[:60])
    client.close()
    time.sleep(0.3)
    assert rows(runtime) == []
    # The sender's retry on a new connection is stored and applied once.
    assert msa(Client(listener.port).send(fixture("orm-o01-v24-nw-ct-head.hl7")))[1] == "AA"
    listener.drain()
    assert [r.state for r in rows(runtime)] == ["applied"]


def test_an_unknown_sender_gets_ar_204_and_is_kept_as_rejected(
    runtime: Runtime, listener: RunningListener
) -> None:
    payload = fixture("orm-o01-v24-nw-ct-head.hl7").replace(b"|CRIS|RW6|", b"|OTHER|XYZ|")
    ack = Client(listener.port).send(payload)
    fields = msa(ack)
    assert fields[1] == "AR"
    assert "ERR|MSH^1^4^204&Unknown key identifier&HL70357" in ack.decode()
    [row] = rows(runtime)
    assert (row.state, row.trust_id) == ("rejected", None)
    assert "not a configured trust" in (row.error or "")


def test_an_unsupported_message_type_gets_ar_200_in_the_err_layout_of_its_version(
    runtime: Runtime, listener: RunningListener
) -> None:
    ack = Client(listener.port).send(fixture("oru-r01-v24-unsupported.hl7"))
    assert msa(ack)[1] == "AR"
    assert "ERR|MSH^1^9^200&Unsupported message type&HL70357" in ack.decode()
    assert rows(runtime)[0].state == "rejected"


def test_a_content_error_gets_ae_naming_the_field_and_goes_to_the_error_queue(
    runtime: Runtime, listener: RunningListener
) -> None:
    ack = Client(listener.port).send(fixture("orm-o01-v231-nw-missing-pid3.hl7"))
    assert msa(ack)[1] == "AE"
    assert "PID^1^3^101&Required field missing&HL70357" in ack.decode()
    assert rows(runtime)[0].state == "failed"


def test_an_order_the_service_cannot_apply_is_failed_with_its_reason(
    runtime: Runtime, listener: RunningListener
) -> None:
    ack = Client(listener.port).send(
        fixture("orm-o01-v24-ca.hl7")
    )  # cancel of an order never placed
    assert msa(ack)[1] == "AA"
    listener.drain()
    [row] = rows(runtime)
    assert row.state == "failed"
    assert "OrderNotFound" in (row.error or "") and "204" in (row.error or "")


def test_exam_complete_before_the_new_order_still_ends_ready(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    client.send(fixture("orm-o01-v24-sc-cm.hl7"))
    client.send(fixture("orm-o01-v24-nw-ct-head.hl7"))
    listener.drain()
    assert study(runtime, "RW6ACC0001").status == "ready"  # type: ignore[union-attr]


def test_cancelling_a_claimed_study_takes_it_off_the_radiologists_list(
    runtime: Runtime, listener: RunningListener
) -> None:
    now = runtime.clock.now()
    with runtime.session() as session:
        trust = session.scalar(sa.select(Trust).where(Trust.code == "RW6"))
        user = make_user(session, now=now, trusts=("RW6",))
        make_study(
            session,
            trust=trust,
            now=now,
            accession_number="RW6ACC0001",
            status="ready",
            claimed_by_id=user.id,
            claimed_at=now,
            claim_expires_at=now + timedelta(minutes=30),
        )
    assert msa(Client(listener.port).send(fixture("orm-o01-v24-ca.hl7")))[1] == "AA"
    listener.drain()
    cancelled = study(runtime, "RW6ACC0001")
    assert cancelled is not None
    assert (cancelled.status, cancelled.claimed_by_id) == ("cancelled", None)
    with runtime.session() as session:
        alerts = list(session.scalars(sa.select(Alert)))
    assert any("RW6ACC0001" in a.message for a in alerts)


def test_a_merge_moves_studies_to_the_surviving_patient(
    runtime: Runtime, listener: RunningListener
) -> None:
    now = runtime.clock.now()
    with runtime.session() as session:
        trust = session.scalar(sa.select(Trust).where(Trust.code == "RW6"))
        from tests.factories import make_patient

        old = make_patient(session, trust=trust, now=now, local_id="RW6999001")
        make_study(session, trust=trust, now=now, patient=old, accession_number="OLD-1")
    Client(listener.port).send(fixture("adt-a40-v24-merge.hl7"))
    listener.drain()
    assert rows(runtime)[0].state == "applied"
    with runtime.session() as session:
        moved = session.scalar(sa.select(Study).where(Study.accession_number == "OLD-1"))
        survivor = session.get(Patient, moved.patient_id)  # type: ignore[union-attr]
        assert survivor is not None and survivor.local_id == "RW6123456"
        assert session.scalar(sa.select(Patient).where(Patient.local_id == "RW6999001")) is not None


def test_a_trust_in_enhanced_mode_gets_commit_acks(runtime: Runtime, trust: int) -> None:
    with runtime.session() as session:
        session.get(Trust, trust).ack_mode = "enhanced"  # type: ignore[union-attr]
    running = RunningListener(runtime)
    try:
        assert msa(Client(running.port).send(fixture("orm-o01-v24-nw-ct-head.hl7")))[1] == "CA"
    finally:
        running.stop()


def test_a_batch_is_stored_message_by_message_and_answered_with_a_batch_of_acks(
    runtime: Runtime, listener: RunningListener
) -> None:
    client = Client(listener.port)
    reply = client.send(fixture("batch-fhs-bhs-2x-adt-a08-v25.hl7"))
    segments = [s for s in reply.decode().split("\r") if s]
    assert [s[:3] for s in segments] == ["FHS", "BHS", "MSH", "MSA", "MSH", "MSA", "BTS", "FTS"]
    assert segments[1].split("|")[11] == "RW6-BATCH-7"
    assert [s.split("|")[1:3] for s in segments if s.startswith("MSA")] == [
        ["AA", "RW6-B7-1"],
        ["AA", "RW6-B7-2"],
    ]
    assert segments[6] == "BTS|2"
    listener.drain()
    assert [(r.control_id, r.state) for r in rows(runtime)] == [
        ("RW6-B7-1", "applied"),
        ("RW6-B7-2", "applied"),
    ]
    # The same batch again: each message is a duplicate, answered as before.
    assert client.send(fixture("batch-fhs-bhs-2x-adt-a08-v25.hl7")).count(b"MSA|AA|RW6-B7-") == 2
    assert [r.state for r in rows(runtime)][2:] == ["duplicate", "duplicate"]


def test_a_batch_without_msh_is_refused_whole_with_its_reason(
    runtime: Runtime, listener: RunningListener
) -> None:
    ack = Client(listener.port).send(b"BHS|^~\\&|CRIS|RW6\rEVN|A04\rPID|1||X\rBTS|1\r")
    assert msa(ack)[1] == "AR"
    assert b"before its first MSH" in ack
    assert rows(runtime)[0].state == "rejected"


def test_a_profile_in_auto_mode_follows_msh15(runtime: Runtime, trust: int) -> None:
    with runtime.session() as session:
        session.get(Trust, trust).hl7_profile = {"inbound": {"ack_mode": "auto"}}  # type: ignore[union-attr]
    running = RunningListener(runtime)
    try:
        client = Client(running.port)
        assert msa(client.send(fixture("orm-o01-v24-nw-ct-head.hl7")))[1] == "CA"  # MSH-15 AL
        assert msa(client.send(fixture("orm-o01-v24-sc-cm.hl7")))[1] == "AA"  # MSH-15/16 empty
    finally:
        running.stop()


def test_a_source_address_outside_the_trusts_allowlist_is_rejected(
    runtime: Runtime, trust: int
) -> None:
    with runtime.session() as session:
        session.get(Trust, trust).allowed_addresses = ["10.20.0.0/16"]  # type: ignore[union-attr]
    running = RunningListener(runtime)
    try:
        ack = Client(running.port).send(fixture("orm-o01-v24-nw-ct-head.hl7"))
        assert msa(ack)[1] == "AR"
        assert b"may not send as trust RW6" in ack
    finally:
        running.stop()


def test_many_connections_are_served_at_once(runtime: Runtime, listener: RunningListener) -> None:
    template = fixture("orm-o01-v24-nw-ct-head.hl7")
    results: list[list[str]] = []

    def sender(n: int) -> None:
        client = Client(listener.port)
        got = []
        for i in range(10):
            payload = (
                template.replace(b"RW6000123", f"C{n}-{i}".encode())
                .replace(b"RW6ACC0001", f"A{n}-{i}".encode())
                .replace(b"PL778899", f"P{n}-{i}".encode())
            )
            got.append(msa(client.send(payload))[2])
        results.append(got)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([[f"C{n}-{i}" for i in range(10)] for n in range(6)])
    listener.drain()
    assert {r.state for r in rows(runtime)} == {"applied"}
    assert len(rows(runtime)) == 60


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_connections_are_served_when_configured(
    runtime: Runtime, trust: int, tmp_path: Path
) -> None:
    try:
        cert, key = _self_signed(tmp_path)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl not usable: {exc}")
    settings = replace(runtime.settings, hl7_tls_cert=str(cert), hl7_tls_key=str(key)).validated()
    server = ssl_context_for(settings)  # as WORKLIST_HL7_TLS_CERT / _KEY configure it
    assert server is not None and ssl_context_for(runtime.settings) is None
    running = RunningListener(runtime, ssl_context=server)
    try:
        client_context = ssl.create_default_context(cafile=str(cert))
        ack = Client(running.port, context=client_context).send(
            fixture("orm-o01-v24-nw-ct-head.hl7")
        )
        assert msa(ack)[1] == "AA"
    finally:
        running.stop()


def test_serve_hl7_runs_until_stopped_and_reports_its_port(runtime: Runtime, trust: int) -> None:
    stop = threading.Event()
    ports: list[int] = []
    thread = threading.Thread(
        target=serve_hl7,
        args=(runtime, "127.0.0.1", 0),
        kwargs={"ready": ports.append, "stop": stop},
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not ports and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert msa(Client(ports[0]).send(fixture("adt-a40-v24-merge.hl7")))[1] == "AA"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_serve_hl7_runs_on_uvloop_where_installed_else_on_asyncio_own_loop(
    runtime: Runtime, trust: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    uvloop = pytest.importorskip("uvloop")
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert event_loop_factory() is None
    test_serve_hl7_runs_until_stopped_and_reports_its_port(runtime, trust)


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"HL7 corpus not found at {CORPUS}")
def test_every_corpus_order_and_adt_gets_an_ack_over_the_socket(runtime: Runtime) -> None:
    files = sorted(p for p in CORPUS.rglob("*.hl7"))
    now = runtime.clock.now()
    senders = set()
    for path in files:
        try:
            header = Er7Message.parse(path.read_bytes()).header
        except Exception:  # noqa: BLE001 - batches and unreadable files have no single sender
            continue
        app, facility = (
            header.component(header.sending_application),
            header.component(header.sending_facility),
        )
        if facility:
            senders.add((app or None, facility))
    with runtime.session() as session:
        for i, (app, facility) in enumerate(sorted(senders, key=str)):
            session.add(
                Trust(
                    code=f"T{i:02d}",
                    name=facility,
                    sending_application=app,
                    sending_facility=facility,
                    created_at=now,
                    hl7_profile={"inbound": {"processing_ids": ["P", "T", "D"]}},
                )
            )
    running = RunningListener(runtime)
    table = []
    try:
        client = Client(running.port)
        for path in files:
            reply = client.send(path.read_bytes().replace(b"\x0b", b"").replace(b"\x1c", b""))
            # One ACK per message (a batch gets one per message inside its envelope).
            codes = [s.split(b"|")[1].decode() for s in reply.split(b"\r") if s.startswith(b"MSA|")]
            table.append((str(path.relative_to(CORPUS)), codes))
        running.drain()
    finally:
        running.stop()
    stored = rows(runtime)
    assert len(stored) == sum(len(codes) for _, codes in table)  # every message kept
    assert all(codes and set(codes) <= {"AA", "AE", "AR", "CA", "CE", "CR"} for _, codes in table)
    assert not [r for r in stored if r.state == "received"]
    # Shown with `pytest -s` (tests/conformance/test_corpus.py always prints its table).
    print("\ncorpus over MLLP (ACK, then stored state):")
    states = iter(stored)
    for name, codes in table:
        for code in codes:
            row = next(states)
            print(f"  {name:<72} {code:<3} {row.state:<9} {(row.error or '')[:70]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_listener_process(url: str, port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    import os
    import sys

    env = dict(os.environ, WORKLIST_DATABASE_URL=url, WORKLIST_INSTANCE_PATH=str(tmp_path))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from worklist.cli import main; sys.exit(main(sys.argv[1:]))",
            "hl7-listen",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the listener process exited") from None
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the listener process did not start")


def test_a_listener_killed_mid_burst_loses_no_acknowledged_message_and_applies_retries_once(
    runtime: Runtime, trust: int, tmp_path: Path
) -> None:
    url = runtime.settings.resolved_database_url
    template = fixture("orm-o01-v24-nw-ct-head.hl7")

    def message(sender: int, i: int) -> tuple[str, bytes]:
        control = f"K{sender}-{i:03d}"
        return control, (
            template.replace(b"RW6000123", control.encode())
            .replace(b"RW6ACC0001", f"KA{sender}-{i:03d}".encode())
            .replace(b"PL778899", f"KP{sender}-{i:03d}".encode())
            .replace(b"FL445566", f"KF{sender}-{i:03d}".encode())
        )

    burst = {s: [message(s, i) for i in range(40)] for s in range(4)}
    acked: set[str] = set()
    lock = threading.Lock()
    port = _free_port()
    process = _start_listener_process(url, port, tmp_path)

    def sender(s: int) -> None:
        try:
            client = Client(port)
            for control, payload in burst[s]:
                if msa(client.send(payload))[1] == "AA":
                    with lock:
                        acked.add(control)
        except OSError:
            return  # the listener died: the rest are unacknowledged

    threads = [threading.Thread(target=sender, args=(s,)) for s in burst]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()  # SIGKILL, mid-burst
    process.wait(10)
    for t in threads:
        t.join(10)
    assert 60 <= len(acked) < 160, "the kill must land in the middle of the burst"

    with runtime.session() as session:
        stored = set(session.scalars(sa.select(InboundMessage.control_id)))
    assert acked <= stored  # every acknowledged message survived the kill

    # Restart: what was stored is applied; the senders retry everything not acknowledged.
    process = _start_listener_process(url, port, tmp_path)
    try:
        client = Client(port)
        for s in burst:
            for control, payload in burst[s]:
                if control not in acked:
                    assert msa(client.send(payload))[1] == "AA"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with runtime.session() as session:
                pending = session.scalar(
                    sa.select(sa.func.count())
                    .select_from(InboundMessage)
                    .where(InboundMessage.state == "received")
                )
            if not pending:
                break
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(10)
    with runtime.session() as session:
        states = list(session.execute(sa.select(InboundMessage.control_id, InboundMessage.state)))
        studies = session.scalar(sa.select(sa.func.count()).select_from(Study))
    applied = [c for c, state in states if state == "applied"]
    assert sorted(applied) == sorted(
        c for msgs in burst.values() for c, _ in msgs
    )  # each exactly once
    assert {state for _, state in states} <= {"applied", "duplicate"}
    assert studies == 160


def test_random_bytes_on_the_socket_never_stop_the_listener(
    runtime: Runtime, listener: RunningListener
) -> None:
    import random

    rng = random.Random(3)
    valid = fixture("orm-o01-v24-nw-ct-head.hl7")
    for _ in range(25):
        kind = rng.choice(["noise", "framed-noise", "mutated", "truncated"])
        if kind == "noise":
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif kind == "framed-noise":
            blob = frame(bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 300))))
        elif kind == "mutated":
            body = bytearray(valid)
            for _ in range(rng.randrange(1, 10)):
                body[rng.randrange(len(body))] = rng.choice(b"|^~\\&\r\n\x00\xff")
            blob = frame(bytes(body).replace(b"\x0b", b"").replace(b"\x1c", b""))
        else:
            blob = frame(valid)[: rng.randrange(1, len(valid))]
        client = Client(listener.port)
        client.send_raw(blob)
        client.sock.settimeout(0.2)
        try:
            while client.sock.recv(65536):
                pass  # an ACK (AA/AE/AR) or nothing; either way no crash
        except TimeoutError:
            pass
        client.close()
    # Still serving (a fresh control id: a mutated copy of `valid` may hold the old one), and
    # every framed message got an ACK stored with it.
    fresh = valid.replace(b"RW6000123", b"RW6-AFTER").replace(b"RW6ACC0001", b"RW6ACC-AFTER")
    assert msa(Client(listener.port).send(fresh))[1] == "AA"
    assert all(r.ack is not None for r in rows(runtime))
