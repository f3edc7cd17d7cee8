"""A RIS simulator: plays one or more trusts' RIS systems over real MLLP sockets.

Two halves, used by the tests, the benchmarks, the demo and `worklist simulate-ris`:

* `RisSimulator` listens where a trust's RIS would (asyncio), receives our
  ORU^R01 reports and acknowledges them AA - or, when told, AE, AR, slowly, not
  at all, with the wrong MSA-2, or by dropping the connection for the first N
  messages. It records what it received (in memory, optionally dumped as JSON).
* `order_traffic` / `order_message` generate realistic ORM^O01 order traffic
  (NW, XO, CA, SC with ORC-5 CM) for configured trusts, at a mix of priorities,
  modalities and patient classes; `send_orders` plays it to a listener over MLLP
  at a configurable rate, one connection per trust, waiting for each ACK.

The message text is written by hand here (not with our own hl7/outbound.py) so
that the simulator stays an independent peer: it reads ORUs with a plain split
and writes ORMs the way a RIS engine does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from hl7.mllp import Frame, MllpDecoder, frame

logger = logging.getLogger(__name__)

# --- receiving ORUs -------------------------------------------------------------------------


@dataclass
class RisBehaviour:
    """How the simulated RIS answers. Change it while running; it applies to the next message.

    ``script`` codes are consumed one per message before the defaults apply:
    "AA", "AE", "AR", "CA", "silent" (no ACK), "reset" (drop the connection),
    "mismatch" (ACK with another control id).
    """

    ack_code: str = "AA"
    delay_seconds: float = 0.0  # answer slowly
    silent: bool = False  # never answer
    refuse_first: int = 0  # drop the connection (TCP reset) on the first N messages
    mismatch: bool = False  # answer with a wrong MSA-2
    error_text: str = "Simulated application error"
    script: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the simulated RIS accepted, with the fields a test asks about."""

    control_id: str
    message_type: str
    result_status: str  # OBR-25
    placer_order_number: str  # OBR-2 as sent
    filler_order_number: str  # OBR-3 as sent
    accession_number: str  # OBR-18 as sent
    received_at: str
    answered: str  # the ACK code sent, "silent" or "reset"
    text: str  # the whole message, segments separated by CR

    def segments(self, name: str) -> list[list[str]]:
        return [s.split("|") for s in self.text.split("\r") if s.startswith(name + "|")]


def _field(segment: list[str] | None, index: int) -> str:
    if segment is None:
        return ""
    return segment[index] if len(segment) > index else ""


def describe_message(text: str, answered: str) -> ReceivedMessage:
    """Pull the interesting fields out of a received message with a plain split."""
    segs = [s.split("|") for s in text.replace("\n", "\r").split("\r") if s]
    by_name: dict[str, list[str]] = {}
    for s in segs:
        by_name.setdefault(s[0], s)
    msh = by_name.get("MSH")
    obr = by_name.get("OBR")
    return ReceivedMessage(
        control_id=_field(msh, 9),
        message_type=_field(msh, 8),
        result_status=_field(obr, 25),
        placer_order_number=_field(obr, 2),
        filler_order_number=_field(obr, 3),
        accession_number=_field(obr, 18),
        received_at=datetime.now(UTC).isoformat(),
        answered=answered,
        text=text,
    )


def build_ack(
    message_text: str, code: str, *, text: str = "", control_id: str | None = None
) -> str:
    """An original-mode ACK as a RIS engine writes it (MSA-3 plus a v2.5-style ERR on errors)."""
    segs = [s for s in message_text.replace("\n", "\r").split("\r") if s]
    msh = segs[0].split("|") if segs and segs[0].startswith("MSH|") else ["MSH", "^~\\&"]

    def f(i: int) -> str:
        return msh[i] if len(msh) > i else ""

    version = f(11) or "2.4"
    trigger = f(8).split("^")[1] if "^" in f(8) else ""
    ours = control_id if control_id is not None else f(9)
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    lines = [
        f"MSH|^~\\&|{f(4)}|{f(5)}|{f(2)}|{f(3)}|{now}||ACK^{trigger}^ACK|ACK{time.time_ns()}"
        f"|{f(10) or 'P'}|{version}",
        f"MSA|{code}|{ours}" + (f"|{text}" if text and code != "AA" else ""),
    ]
    if code in ("AE", "AR", "CE", "CR"):
        lines.append(f"ERR||OBR^1^25|207^Application internal error^HL70357|E||||{text}")
    return "\r".join(lines) + "\r"


class RisSimulator:
    """One simulated RIS endpoint. `start()` binds (port 0 = any free port)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: RisBehaviour | None = None,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "RIS",
        dump_path: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour or RisBehaviour()
        self.ssl_context = ssl_context
        self.name = name
        self.dump_path = Path(dump_path) if dump_path else None
        self.received: list[ReceivedMessage] = []
        self.refused = 0  # messages dropped because of refuse_first / "reset"
        self.unanswered = 0
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen = 0

    # lifecycle
    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.ssl_context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("simulated RIS %s listening on %s:%s", self.name, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self.dump()

    def dump(self) -> None:
        if self.dump_path is not None:
            self.dump_path.write_text(
                json.dumps([asdict(m) for m in self.received], indent=1), encoding="utf-8"
            )

    def messages(self) -> list[ReceivedMessage]:
        """A copy of what has been received so far (safe from another thread)."""
        return list(self.received)

    # one connection
    def _next_action(self) -> str:
        b = self.behaviour
        self._seen += 1
        if self.refused < b.refuse_first:
            return "reset"
        if b.script:
            return b.script.pop(0)
        if b.silent:
            return "silent"
        if b.mismatch:
            return "mismatch"
        return b.ack_code

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        decoder = MllpDecoder()
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                for event in decoder.feed(chunk):
                    if not isinstance(event, Frame):
                        continue
                    text = event.payload.decode("utf-8", errors="replace")
                    action = self._next_action()
                    if action == "reset":
                        self.refused += 1
                        _abort(writer)
                        return
                    if self.behaviour.delay_seconds:
                        await asyncio.sleep(self.behaviour.delay_seconds)
                    if action == "silent":
                        self.unanswered += 1
                        self.received.append(describe_message(text, "silent"))
                        continue
                    code, other_id = action, None
                    if action == "mismatch":
                        code, other_id = "AA", "NOT-YOURS"
                    message = describe_message(text, action)
                    ack = build_ack(text, code, text=self.behaviour.error_text, control_id=other_id)
                    self.received.append(message)
                    writer.write(frame(ack.encode("utf-8")))
                    await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            return
        except asyncio.CancelledError:
            return  # the simulator is stopping; end this connection quietly
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    # running from synchronous code (tests, the scheduler-side benchmark)
    def start_in_thread(self) -> RisSimulator:
        """Run this simulator on its own event loop in a daemon thread; returns self."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"ris-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop_thread(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)

    def __enter__(self) -> RisSimulator:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a RIS that crashed mid-conversation would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# --- sending orders -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustFeed:
    """One simulated trust RIS as an order sender."""

    code: str  # ODS code, e.g. RW6; also the assigning authority of hospital numbers
    sending_application: str = "CRIS"
    sending_facility: str = ""  # defaults to the code
    receiving_application: str = "WORKLIST"
    receiving_facility: str = "REGION"
    version: str = "2.4"

    @property
    def facility(self) -> str:
        return self.sending_facility or self.code


@dataclass(frozen=True)
class Procedure:
    code: str
    name: str
    modality: str
    body_area: str


PROCEDURES: dict[str, tuple[Procedure, ...]] = {
    "CR": (
        Procedure("XCHES", "XR Chest", "CR", "chest"),
        Procedure("XKNEB", "XR Knee both", "CR", "msk"),
        Procedure("XABDO", "XR Abdomen", "CR", "abdomen"),
    ),
    "CT": (
        Procedure("CHEAD", "CT Head", "CT", "neuro"),
        Procedure("CCAPC", "CT Chest abdomen pelvis with contrast", "CT", "body"),
        Procedure("CPULA", "CT Pulmonary angiogram", "CT", "chest"),
    ),
    "MR": (
        Procedure("MBRAI", "MRI Brain", "MR", "neuro"),
        Procedure("MKNEL", "MRI Knee left", "MR", "msk"),
        Procedure("MPROS", "MRI Prostate", "MR", "body"),
    ),
    "US": (
        Procedure("UABDO", "US Abdomen", "US", "abdomen"),
        Procedure("UPELV", "US Pelvis", "US", "body"),
    ),
    "NM": (Procedure("NBONE", "NM Bone scan whole body", "NM", "msk"),),
    "MG": (Procedure("BMAMB", "Mammogram both breasts", "MG", "breast"),),
}

FAMILY_NAMES = (
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Khan",
    "Patel",
    "O'Neill",
    "Nowak",
    "Ahmed",
    "Evans",
    "Thomas",
    "Roberts",
    "Walker",
    "Hughes",
)
GIVEN_NAMES = (
    "Oliver",
    "Amelia",
    "George",
    "Isla",
    "Muhammad",
    "Ava",
    "Noah",
    "Zoë",
    "Jack",
    "Mia",
    "Harry",
    "Sophia",
    "Leo",
    "Grace",
    "Oscar",
    "Freya",
)


@dataclass
class OrderMix:
    """Relative weights for generated traffic."""

    priorities: dict[str, float] = field(
        default_factory=lambda: {"R": 0.70, "A": 0.12, "S": 0.10, "P": 0.05, "T": 0.03}
    )
    modalities: dict[str, float] = field(
        default_factory=lambda: {
            "CR": 0.40,
            "CT": 0.25,
            "MR": 0.13,
            "US": 0.15,
            "NM": 0.03,
            "MG": 0.04,
        }
    )
    patient_classes: dict[str, float] = field(
        default_factory=lambda: {"O": 0.50, "I": 0.30, "E": 0.20}
    )
    change_rate: float = 0.08  # share of orders that get an XO
    cancel_rate: float = 0.04  # share of orders cancelled before the exam


@dataclass
class SimOrder:
    """One order as the simulated RIS knows it."""

    feed: TrustFeed
    placer: str
    filler: str
    accession: str
    hospital_number: str
    nhs_number: str
    family: str
    given: str
    birth_date: str
    sex: str
    patient_class: str
    priority: str
    procedure: Procedure
    requested_at: datetime
    clinical_details: str


def nhs_number(rng: random.Random) -> str:
    """A Modulus 11-valid NHS number in the 999 test range."""
    while True:
        digits = [9, 9, 9] + [rng.randrange(10) for _ in range(6)]
        total = sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True))
        check = 11 - total % 11
        if check == 11:
            check = 0
        if check != 10:
            return "".join(map(str, digits + [check]))


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _hl7_ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"


_CLINICAL = (
    "Fall, ?fracture",
    "Cough 6 weeks, smoker",
    "Head injury, GCS 14",
    "Suspected cancer pathway",
    "Follow-up",
    "Abdominal pain; raised CRP",
    "Pre-op assessment",
    "Post-op check & review",
)


def new_order(
    feed: TrustFeed, rng: random.Random, mix: OrderMix, serial: int, now: datetime
) -> SimOrder:
    modality = _pick(rng, mix.modalities)
    return SimOrder(
        feed=feed,
        placer=f"P{feed.code}{serial:07d}",
        filler=f"{feed.code}{serial:08d}",
        accession=f"{feed.code}{serial:08d}",
        hospital_number=f"{feed.code[:1]}{rng.randrange(10**6, 10**7)}",
        nhs_number=nhs_number(rng),
        family=rng.choice(FAMILY_NAMES),
        given=rng.choice(GIVEN_NAMES),
        birth_date=date(
            rng.randrange(1930, 2020), rng.randrange(1, 13), rng.randrange(1, 29)
        ).strftime("%Y%m%d"),
        sex=rng.choice("MF"),
        patient_class=_pick(rng, mix.patient_classes),
        priority=_pick(rng, mix.priorities),
        procedure=rng.choice(PROCEDURES[modality]),
        requested_at=now,
        clinical_details=rng.choice(_CLINICAL),
    )


def _esc(value: str) -> str:
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def order_message(
    order: SimOrder, order_control: str, order_status: str, *, control_id: str, when: datetime
) -> str:
    """One ORM^O01 for ``order`` with ORC-1 ``order_control`` and ORC-5 ``order_status``,
    laid out as an IHE SWF (RAD-4/RAD-13) RIS sends it: NHS number and hospital number in
    PID-3, placer/filler in ORC-2/3 and OBR-2/3, accession in OBR-18, modality in OBR-24,
    priority in ORC-7/OBR-27 component 6."""
    f = order.feed
    p = order.procedure
    ts = _hl7_ts(when)
    tq = f"^^^{_hl7_ts(order.requested_at)}^^{order.priority}"
    exam_time = ts if order_status == "CM" else ""
    segs = [
        f"MSH|^~\\&|{f.sending_application}|{f.facility}|{f.receiving_application}|"
        f"{f.receiving_facility}|{ts}||ORM^O01^ORM_O01|{control_id}|P|{f.version}|||AL|NE||8859/1",
        f"PID|1||{order.nhs_number}^^^NHS^NH~{order.hospital_number}^^^{f.code}^MR||"
        f"{_esc(order.family)}^{_esc(order.given)}||{order.birth_date}|{order.sex}",
        f"PV1|1|{order.patient_class}|{f.code}WARD^^^{f.code}",
        f"ORC|{order_control}|{order.placer}^{f.sending_application}|"
        f"{order.filler}^{f.sending_application}||{order_status}||{tq}||{ts}",
        f"OBR|1|{order.placer}^{f.sending_application}|{order.filler}^{f.sending_application}|"
        f"{p.code}^{_esc(p.name)}^NICIP|||{exam_time}||||||{_esc(order.clinical_details)}|||"
        f"G1234567^Referrer^Rita||{order.accession}||||||{p.modality}|||{tq}",
    ]
    return "\r".join(segs) + "\r"


def order_traffic(
    feeds: Sequence[TrustFeed],
    *,
    count: int,
    seed: int = 1,
    mix: OrderMix | None = None,
    start: datetime | None = None,
) -> Iterator[tuple[TrustFeed, str]]:
    """``count`` messages of realistic traffic across ``feeds``: each order is placed (NW,
    ORC-5 SC), maybe changed (XO) or cancelled (CA), and most are completed (SC, ORC-5 CM,
    which puts them on the reporting worklist). Messages for one order come in order."""
    rng = random.Random(seed)
    mix = mix or OrderMix()
    now = start or datetime.now(UTC)
    serial = itertools.count(1)
    open_orders: list[SimOrder] = []
    sent = 0
    while sent < count:
        now += timedelta(seconds=rng.uniform(0.5, 20))
        if open_orders and (len(open_orders) > 20 or rng.random() < 0.5):
            order = open_orders.pop(rng.randrange(len(open_orders)))
            roll = rng.random()
            if roll < mix.cancel_rate:
                control, status = "CA", "CA"
            elif roll < mix.cancel_rate + mix.change_rate:
                control, status = "XO", "SC"
                open_orders.append(order)
            else:
                control, status = "SC", "CM"
        else:
            feed = rng.choice(list(feeds))
            order = new_order(feed, rng, mix, next(serial), now)
            control, status = "NW", "SC"
            open_orders.append(order)
        sent += 1
        cid = f"{order.feed.code}{sent:09d}"
        yield order.feed, order_message(order, control, status, control_id=cid, when=now)


@dataclass
class SendReport:
    sent: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    seconds: float = 0.0


async def send_orders(
    host: str,
    port: int,
    traffic: Iterable[tuple[TrustFeed, str]],
    *,
    rate_per_second: float = 0.0,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SendReport:
    """Play ``traffic`` to an MLLP listener: one connection per trust, each message waits for
    its ACK (as a RIS engine does). ``rate_per_second`` 0 = as fast as the ACKs allow."""
    report = SendReport()
    conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter, MllpDecoder]] = {}
    began = time.monotonic()
    try:
        for i, (feed, text) in enumerate(traffic):
            if rate_per_second > 0:
                wait = began + i / rate_per_second - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                if feed.code not in conns:
                    r, w = await asyncio.open_connection(host, port, ssl=ssl_context)
                    conns[feed.code] = (r, w, MllpDecoder())
                reader, writer, decoder = conns[feed.code]
                writer.write(frame(text.encode("latin-1", errors="replace")))
                await writer.drain()
                code = await asyncio.wait_for(_read_ack_code(reader, decoder), timeout)
                report.acks[code] = report.acks.get(code, 0) + 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                logger.warning("order to %s:%s failed: %s", host, port, exc)
                report.failures += 1
                old = conns.pop(feed.code, None)
                if old is not None:
                    old[1].close()
            report.sent += 1
    finally:
        for _, w, _ in conns.values():
            w.close()
        report.seconds = time.monotonic() - began
    return report


async def _read_ack_code(reader: asyncio.StreamReader, decoder: MllpDecoder) -> str:
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        for event in decoder.feed(chunk):
            if isinstance(event, Frame):
                text = event.payload.decode("latin-1")
                for seg in text.replace("\n", "\r").split("\r"):
                    if seg.startswith("MSA|"):
                        return seg.split("|")[1]
                return "?"
