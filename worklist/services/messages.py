"""Inbound HL7 messages: stored before they are acknowledged, applied once, never dropped.

The life of a message (DESIGN.md "Acknowledgements and bad input"):

1. `store_messages` (for a batch of frames, one transaction, committed *before*
   any ACK leaves; the listener's `store_writer` does the same on a connection of
   its own, on PostgreSQL in one statement): reads the header, finds the
   trust by MSH-3/MSH-4 (and checks the peer against its address allowlist),
   turns the message into domain events to check its content, answers a
   resend of an already-stored MSH-10 from the same sender with the very ACK
   it got the first time, and stores the raw bytes with the ACK it will send.
   States: ``received`` (to be applied), ``duplicate`` (a resend, answered
   with the original's ACK), ``failed`` (AE: its content is wrong),
   ``rejected`` (AR: unknown sender, unsupported type/version, unreadable).
2. `apply_pending` (the listener's apply worker, and recovery at start-up):
   takes ``received`` messages in arrival order, in batches, and applies their
   events: order messages with `worklist.services.orders.CoreBatch` (Core
   statements per batch), the rest with `worklist.services.orders.apply_events`
   (the ORM; the same decisions); a message that cannot be applied becomes
   ``failed`` with its reason (the error queue).
3. The error queue: `list_messages`, `get_message`, `edit_message` (failed or
   rejected only; the old bytes go to the audit log) and `replay_message`
   (applies it exactly once: a conditional state change guards it).

This module reads HL7 through `hl7.er7`, `hl7.router` and `hl7.ack`, which are
pure (no I/O); the sockets are `hl7/listener.py`'s.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from hl7.ack import ack_is_enhanced, build_ack, build_error_ack, minimal_header
from hl7.er7 import (
    Er7Message,
    ReceivedHeader,
    decode_payload,
    is_batch,
    read_header,
    split_batch,
)
from hl7.errors import (
    ApplicationError,
    Hl7Error,
    MalformedMessage,
    MessageTooLarge,
    UnknownSender,
)
from hl7.inbound import InboundProfile
from hl7.router import route
from worklist.config import Settings
from worklist.db.models import InboundMessage, Patient, PatientIdentifier, Study, Trust, User
from worklist.domain.events import DomainEvent, OrderEvent, PatientsMerged, PatientUpdated
from worklist.errors import Conflict, InvalidInput, NotFound, WorklistError
from worklist.services import audit, orders

if TYPE_CHECKING:
    from worklist.bootstrap import Runtime

logger = logging.getLogger(__name__)

# InboundMessage.state, one comment each.
RECEIVED = "received"  # stored and acknowledged; its events are still to be applied
APPLIED = "applied"  # its events were applied to studies/patients
DUPLICATE = "duplicate"  # a resend of a stored MSH-10 from the same sender; answered with that ACK
FAILED = "failed"  # AE, or could not be applied: in the error queue
REJECTED = (
    "rejected"  # AR: unknown sender, unsupported type/version, unreadable; in the error queue
)
STATES = (RECEIVED, APPLIED, DUPLICATE, FAILED, REJECTED)
ERROR_QUEUE = (FAILED, REJECTED)

APPLY_BATCH = 100
APPLY_LOCK_CLASS = 0x484C37  # "HL7": the advisory-lock namespace of the apply workers
_INBOUND: sa.Table = InboundMessage.__table__  # type: ignore[assignment]


# --- Trusts, as the listener sees them -----------------------------------------------------


@dataclass(frozen=True)
class TrustSnapshot:
    """What the inbound path needs of a trust, detached from any session."""

    id: int
    code: str
    sending_application: str | None
    sending_facility: str
    ack_mode: str
    allowed_addresses: tuple[str, ...]
    profile: InboundProfile | None
    profile_error: str | None = None

    def allows(self, peer_host: str | None) -> bool:
        """True when the trust has no allowlist or `peer_host` is in it (addresses or networks)."""
        if not self.allowed_addresses:
            return True
        if not peer_host:
            return False
        try:
            address = ipaddress.ip_address(peer_host)
        except ValueError:
            return peer_host in self.allowed_addresses
        for entry in self.allowed_addresses:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                if entry == peer_host:
                    return True
        return False


def _profile_for(trust: Trust, settings: Settings) -> tuple[InboundProfile | None, str | None]:
    data = dict((trust.hl7_profile or {}).get("inbound") or {})
    data.setdefault("processing_ids", [settings.hl7_processing_id])
    data.setdefault("timezone", settings.timezone)
    try:
        return InboundProfile.from_dict(data), None
    except (ValueError, TypeError, KeyError) as exc:
        return None, f"trust {trust.code} has an invalid inbound HL7 profile: {exc}"


def snapshot(trust: Trust, settings: Settings) -> TrustSnapshot:
    profile, problem = _profile_for(trust, settings)
    return TrustSnapshot(
        id=trust.id,
        code=trust.code,
        sending_application=trust.sending_application,
        sending_facility=trust.sending_facility,
        ack_mode=trust.ack_mode or "original",
        allowed_addresses=tuple(trust.allowed_addresses or ()),
        profile=profile,
        profile_error=problem,
    )


class TrustDirectory:
    """Finds the trust a message comes from by MSH-3/MSH-4; cached, reloaded on a miss.

    Trusts change rarely; the cache lives `ttl` seconds, and an unknown sender
    forces a reload (at most once a second) so a trust added a moment ago is found.
    """

    def __init__(self, settings: Settings, *, ttl: float = 30.0) -> None:
        self.settings = settings
        self.ttl = ttl
        self._trusts: list[TrustSnapshot] = []
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def _load(self, session: Session) -> None:
        rows = session.scalars(sa.select(Trust).where(Trust.active.is_(True)))
        self._trusts = [snapshot(t, self.settings) for t in rows]
        self._loaded_at = time.monotonic()

    def find(self, session: Session, application: str, facility: str) -> TrustSnapshot | None:
        with self._lock:
            age = time.monotonic() - self._loaded_at
            if age > self.ttl:
                self._load(session)
            found = self._match(application, facility)
            if found is None and age > 1.0:
                self._load(session)
                found = self._match(application, facility)
            return found

    def cached(self, application: str, facility: str) -> TrustSnapshot | None:
        """The trust from the cache alone (no database); None when unknown or the cache is old."""
        with self._lock:
            if time.monotonic() - self._loaded_at > self.ttl:
                return None
            return self._match(application, facility)

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = float("-inf")

    def _match(self, application: str, facility: str) -> TrustSnapshot | None:
        fallback = None
        for trust in self._trusts:
            if trust.sending_facility != facility:
                continue
            if trust.sending_application == application:
                return trust
            if trust.sending_application is None:
                fallback = trust
        return fallback


# --- Storing what arrives --------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One MLLP frame as it arrived: payload, peer "host:port", when, and whether it was cut."""

    payload: bytes
    peer: str | None
    received_at: datetime
    oversize_bytes: int | None = None


@dataclass(frozen=True)
class StoreOutcome:
    """What was stored for one arrival and the ACK to send (already committed when returned)."""

    message_id: int | None
    state: str
    ack: bytes
    ack_code: str
    trust_code: str | None = None
    control_id: str = ""
    duplicate_of: int | None = None


@dataclass
class Verdict:
    header: ReceivedHeader
    trust: TrustSnapshot | None = None
    message: Er7Message | None = None
    events: list[DomainEvent] = field(default_factory=list)
    error: Hl7Error | None = None
    ack: bytes | None = None
    ack_code: str | None = None


def prepare(arrival: Arrival, *, directory: TrustDirectory, now: datetime) -> Verdict | None:
    """Parse, check and build the ACK of one arrival without the database (None: needs it)."""
    verdict = interpret(None, arrival, directory=directory)
    if verdict is not None:
        verdict.ack, verdict.ack_code = _ack_for(verdict, directory.settings, now)
    return verdict


def _peer_host(peer: str | None) -> str | None:
    if not peer:
        return None
    host, sep, _port = peer.rpartition(":")
    return (host if sep else peer).strip("[]")


def _sender(header: ReceivedHeader) -> tuple[str, str]:
    return header.component(header.sending_application), header.component(header.sending_facility)


def _duplicate_key(header: ReceivedHeader) -> tuple[str, str, str]:
    """(MSH-3.1, MSH-4.1, MSH-10) as stored: a resend has the same key (HL7-NOTES section 1.2)."""
    application, facility = _sender(header)
    return application[:100], facility[:100], header.control_id[:100]


def interpret(
    session: Session | None, arrival: Arrival, *, directory: TrustDirectory
) -> Verdict | None:
    """Header, trust and events of one arrival, or the Hl7Error it deserves; no writes.

    Without a session (the listener's event loop, ahead of the database thread) the
    trust comes from the directory's cache only; None means "needs the database"
    (an unknown sender, or a cache too old), and `store_messages` interprets it again.
    """
    payload = arrival.payload
    if is_batch(payload):
        # The listener splits well-formed batches before they get here; what is left is
        # a batch that cannot be split (no MSH, or segments before the first MSH).
        try:
            split_batch(payload)
            problem = MalformedMessage(
                "an FHS/BHS batch must be split into its messages before it is stored",
                segment=payload.lstrip()[:3].decode("latin-1"),
                sequence=1,
            )
        except MalformedMessage as error:
            problem = error
        return Verdict(header=minimal_header(), error=problem)
    try:
        header = read_header(payload)
    except Hl7Error as error:
        return Verdict(header=minimal_header(), error=error)
    application, facility = _sender(header)
    if session is None:
        trust = directory.cached(application, facility)
        if trust is None:
            return None
    else:
        trust = directory.find(session, application, facility)
    if arrival.oversize_bytes is not None:
        limit = directory.settings.hl7_max_message_bytes
        return Verdict(
            header=header,
            trust=trust,
            error=MessageTooLarge(
                f"message of {arrival.oversize_bytes} bytes exceeds the limit of {limit} bytes"
            ),
        )
    if trust is None:
        return Verdict(
            header=header,
            error=UnknownSender(
                f"sender {application or '(empty)'}/{facility or '(empty)'} (MSH-3/MSH-4) is not a"
                " configured trust",
                segment="MSH",
                sequence=1,
                field=4,
            ),
        )
    verdict = Verdict(header=header, trust=trust)
    if not trust.allows(_peer_host(arrival.peer)):
        verdict.error = UnknownSender(
            f"address {_peer_host(arrival.peer)} may not send as trust {trust.code}",
            segment="MSH",
            sequence=1,
            field=4,
        )
        return verdict
    if trust.profile is None:
        verdict.error = ApplicationError(trust.profile_error or "invalid trust profile")
        return verdict
    try:
        verdict.message = Er7Message.parse(payload)
        verdict.header = verdict.message.header
        verdict.events = route(verdict.message, trust.profile, received_at=arrival.received_at)
    except Hl7Error as error:
        verdict.error = error
    except Exception as exc:  # noqa: BLE001 - a reader bug must cost one AE, not the batch
        logger.exception("reading an HL7 message from %s failed unexpectedly", trust.code)
        verdict.events = []
        verdict.error = ApplicationError(f"the message could not be read: {type(exc).__name__}")
    return verdict


def _enhanced(verdict: Verdict) -> bool:
    trust = verdict.trust
    # Without a trust we know nothing of the sender's engine: answer in original mode,
    # which every engine reads (HL7-NOTES 5.1: UK feeds send AL|NE yet expect AA/AE/AR).
    mode = "original"
    if trust is not None:
        mode = (
            trust.profile.ack_mode if trust.profile and trust.profile.ack_mode else None
        ) or trust.ack_mode
    return ack_is_enhanced(
        verdict.header, mode if mode in ("auto", "original", "enhanced") else "original"
    )


def _ack_for(verdict: Verdict, settings: Settings, now: datetime) -> tuple[bytes, str]:
    enhanced = _enhanced(verdict)
    common: dict[str, Any] = {
        "now": now,
        "enhanced": enhanced,
        "sending_application": settings.hl7_application,
        "sending_facility": settings.hl7_facility,
    }
    if verdict.error is not None:
        ack = build_error_ack(verdict.header, verdict.error, **common)
        code = verdict.error.ack_code
    else:
        ack = build_ack(verdict.header, code="AA", **common)
        code = "AA"
    if enhanced:
        code = {"AA": "CA", "AE": "CE", "AR": "CR"}[code]
    return ack, code


def _search_keys(events: Sequence[DomainEvent]) -> tuple[str | None, str | None]:
    accession = patient = None
    for event in events:
        if isinstance(event, OrderEvent):
            accession = accession or event.order.accession_number or event.order.filler_order_number
            if event.patient is not None:
                patient = patient or event.patient.local_id or event.patient.nhs_number
        elif isinstance(event, PatientUpdated):
            patient = patient or event.patient.local_id or event.patient.nhs_number
        elif isinstance(event, PatientsMerged):
            patient = patient or event.surviving.local_id
    return (accession[:64] if accession else None), (patient[:64] if patient else None)


def _message_time(verdict: Verdict) -> datetime | None:
    for event in verdict.events:
        return event.message_time
    return None


def store_messages(
    session: Session,
    arrivals: Sequence[Arrival],
    *,
    directory: TrustDirectory,
    now: datetime,
    prepared: Sequence[Verdict | None] | None = None,
) -> list[StoreOutcome]:
    """Store a batch of arrivals (the caller commits, then sends the ACKs), in order.

    A resend (same sender MSH-3/MSH-4 and MSH-10, non-empty) is stored as
    ``duplicate`` and answered with the ACK of the first one, byte for byte.
    `prepared` holds verdicts already worked out by `interpret(None, ...)` (the
    listener does the parsing while this thread waits on the database).
    """
    with session.no_autoflush:
        verdicts = _verdicts(session, arrivals, prepared, directory)
        originals = _stored_originals(
            session,
            [
                _duplicate_key(v.header)
                for v, a in zip(verdicts, arrivals, strict=True)
                if a.oversize_bytes is None
            ],
        )
    rows, outcomes = _store_rows(arrivals, verdicts, originals, directory.settings, now)
    # One multi-row INSERT (Core, not ORM units of work: this is the ACK's hot path).
    table = _INBOUND
    ids = (
        session.connection()
        .execute(table.insert().returning(table.c.id, sort_by_parameter_order=True), rows)
        .scalars()
        .all()
    )
    stored = [
        replace(o, message_id=message_id) for message_id, o in zip(ids, outcomes, strict=True)
    ]
    _log_refusals(rows, stored)
    return stored


def _verdicts(
    session: Session,
    arrivals: Sequence[Arrival],
    prepared: Sequence[Verdict | None] | None,
    directory: TrustDirectory,
) -> list[Verdict]:
    """The prepared verdicts, the missing ones (unknown sender, stale cache) worked out with
    the database."""
    ready = list(prepared) if prepared is not None else [None] * len(arrivals)
    return [
        verdict or interpret(session, arrival, directory=directory)  # type: ignore[misc]
        for arrival, verdict in zip(arrivals, ready, strict=True)
    ]


def _store_rows(
    arrivals: Sequence[Arrival],
    verdicts: Sequence[Verdict],
    originals: dict[tuple[str, str, str], _Original],
    settings: Settings,
    now: datetime,
) -> tuple[list[dict[str, Any]], list[StoreOutcome]]:
    """The rows to insert and the outcomes to answer, in order: a resend of a stored message
    (`originals`) or of an earlier one in the batch is a duplicate with that one's ACK."""
    outcomes: list[StoreOutcome] = []
    seen: dict[tuple[str, str, str], _Original] = {}
    rows: list[dict[str, Any]] = []
    for arrival, verdict in zip(arrivals, verdicts, strict=True):
        header = verdict.header
        control_id = header.control_id
        key = _duplicate_key(header)
        original = None
        if control_id and arrival.oversize_bytes is None:
            original = seen.get(key) or originals.get(key)
        accession, patient = _search_keys(verdict.events)
        row: dict[str, Any] = {
            "trust_id": verdict.trust.id if verdict.trust else None,
            "sending_application": key[0] or None,
            "sending_facility": key[1] or None,
            "control_id": key[2],
            "message_type": f"{header.message_code}^{header.trigger}"[:32]
            if header.message_code
            else None,
            "message_time": _message_time(verdict),
            "received_at": arrival.received_at,
            "peer": (arrival.peer or "")[:100] or None,
            "raw": arrival.payload,
            "accession_number": accession,
            "patient_identifier": patient,
            "error": None,
        }
        trust_code = verdict.trust.code if verdict.trust else None
        if original is not None:
            row["state"] = DUPLICATE
            row["ack"] = original.ack
            row["ack_code"] = original.ack_code
            row["error"] = (
                f"resend of message {original.id}" if original.id else "resend in the same batch"
            )
            rows.append(row)
            outcomes.append(
                StoreOutcome(
                    message_id=None,
                    state=DUPLICATE,
                    ack=original.ack,
                    ack_code=original.ack_code or "",
                    trust_code=trust_code,
                    control_id=control_id,
                    duplicate_of=original.id,
                )
            )
            continue
        if verdict.ack is None:
            verdict.ack, verdict.ack_code = _ack_for(verdict, settings, now)
        ack, ack_code = verdict.ack, verdict.ack_code or ""
        if verdict.error is None:
            row["state"] = RECEIVED
        else:
            row["state"] = REJECTED if verdict.error.ack_code == "AR" else FAILED
            row["error"] = _describe(verdict.error)
        row["ack"] = ack
        row["ack_code"] = ack_code
        if control_id:
            seen[key] = _Original(None, ack, ack_code)
        rows.append(row)
        outcomes.append(
            StoreOutcome(
                message_id=None,
                state=row["state"],
                ack=ack,
                ack_code=ack_code,
                trust_code=trust_code,
                control_id=control_id,
            )
        )
    return rows, outcomes


def _log_refusals(rows: Sequence[dict[str, Any]], stored: Sequence[StoreOutcome]) -> None:
    for row, outcome in zip(rows, stored, strict=True):
        if outcome.state in ERROR_QUEUE:
            logger.warning(
                "HL7 %s from %s/%s control id %r: %s",
                outcome.ack_code,
                row["sending_application"] or "",
                row["sending_facility"] or "",
                outcome.control_id,
                row["error"],
            )


class StoreWriter:
    """The listener's store writer: `store` commits a batch of arrivals and returns what to
    answer, in order (the ACKs may go once it returns). One thread uses it at a time.

    This one opens a session per batch (`store_messages`); `PostgresStoreWriter` is the
    PostgreSQL one. `store_writer` picks.
    """

    def __init__(self, runtime: Runtime, directory: TrustDirectory) -> None:
        self.runtime = runtime
        self.directory = directory

    def store(
        self, arrivals: Sequence[Arrival], prepared: Sequence[Verdict | None], now: datetime
    ) -> list[StoreOutcome]:
        with self.runtime.session() as session:
            return store_messages(
                session, arrivals, directory=self.directory, now=now, prepared=prepared
            )

    def verdicts(
        self, arrivals: Sequence[Arrival], prepared: Sequence[Verdict | None]
    ) -> list[Verdict]:
        """The prepared verdicts; those missing (unknown sender, stale cache) read with a
        session."""
        if all(v is not None for v in prepared):
            return list(prepared)  # type: ignore[arg-type]
        with self.runtime.session() as session:
            return _verdicts(session, arrivals, prepared, self.directory)

    def close(self) -> None:
        pass


class PostgresStoreWriter(StoreWriter):
    """PostgreSQL: a batch is one statement, in one round trip, on a connection of its own.

    The statement (`_PG_STORE`, one SQL text whatever the batch: psycopg prepares it and
    PostgreSQL plans it once) takes the batch's columns as arrays, looks up each message's
    stored original (same MSH-3, MSH-4, MSH-10) on the sender/control-id index, inserts the
    rows (a resend as ``duplicate`` with its original's ACK) and returns what was stored.
    The connection is in autocommit mode, so the statement is its own transaction: when it
    returns, the batch is committed. Through a session the same took four or five round
    trips (pool pre-ping, BEGIN, the resend check, INSERT, COMMIT). The connection is taken
    from the pool once and kept (no pre-ping per batch); if it turns out broken (the
    database restarted, or the backend was killed) the batch is sent once more on a new
    one: a batch that did commit before the break comes back as resends of itself, answered
    with the same ACKs.
    """

    def __init__(self, runtime: Runtime, directory: TrustDirectory) -> None:
        super().__init__(runtime, directory)
        self._connection: Any = None
        self._record: Any = None
        self._async: Any = None  # the connection of `store_async`

    def store(
        self, arrivals: Sequence[Arrival], prepared: Sequence[Verdict | None], now: datetime
    ) -> list[StoreOutcome]:
        verdicts = self.verdicts(arrivals, prepared)
        rows, outcomes, parameters = self._batch(arrivals, verdicts, now)
        return self._stored(rows, outcomes, self._execute(parameters))

    async def store_async(
        self, arrivals: Sequence[Arrival], prepared: Sequence[Verdict | None], now: datetime
    ) -> list[StoreOutcome]:
        """As `store`, awaiting the database in the caller's event loop (no thread: handing a
        batch to a thread and back cost the listener more CPU than storing it)."""
        import asyncio

        if any(v is None for v in prepared):
            verdicts = await asyncio.to_thread(self.verdicts, arrivals, prepared)
        else:
            verdicts = list(prepared)  # type: ignore[arg-type]
        rows, outcomes, parameters = self._batch(arrivals, verdicts, now)
        return self._stored(rows, outcomes, await self._execute_async(parameters))

    def _batch(
        self, arrivals: Sequence[Arrival], verdicts: Sequence[Verdict], now: datetime
    ) -> tuple[list[dict[str, Any]], list[StoreOutcome], dict[str, Any]]:
        rows, outcomes = _store_rows(arrivals, verdicts, {}, self.directory.settings, now)
        checked = [
            bool(row["control_id"]) and arrival.oversize_bytes is None
            for row, arrival in zip(rows, arrivals, strict=True)
        ]
        # A resend within the batch is marked already (`_store_rows`), but is checked too: if
        # the first of the batch is a resend of a stored message, so is it, with that ACK.
        parameters: dict[str, Any] = {name: [row[name] for row in rows] for name, _ in _PG_COLUMNS}
        parameters["checked"] = checked
        return rows, outcomes, parameters

    def _stored(
        self,
        rows: list[dict[str, Any]],
        outcomes: list[StoreOutcome],
        result: list[tuple[Any, ...]],
    ) -> list[StoreOutcome]:
        stored = []
        for outcome, (message_id, original_id, state, ack, ack_code) in zip(
            outcomes, result, strict=True
        ):
            if original_id is None:
                stored.append(replace(outcome, message_id=message_id))
            else:
                stored.append(
                    replace(
                        outcome,
                        message_id=message_id,
                        state=state,
                        ack=bytes(ack),
                        ack_code=ack_code or "",
                        duplicate_of=original_id,
                    )
                )
        _log_refusals(rows, stored)
        return stored

    async def _execute_async(self, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        import psycopg

        for attempt in (1, 2):
            connection = await self._connect_async()
            try:
                async with connection.cursor() as cursor:
                    await cursor.execute(_PG_STORE, parameters)
                    return await cursor.fetchall()
            except psycopg.OperationalError:
                broken = connection.broken or connection.closed
                await self.close_async()
                if not broken or attempt == 2:
                    raise
                logger.warning("the HL7 store connection broke; storing the batch on a new one")
            except BaseException:
                if connection.broken or connection.closed:
                    await self.close_async()
                raise
        raise AssertionError("unreachable")

    async def _connect_async(self) -> Any:
        if self._async is None:
            import psycopg

            engine = self.runtime.engine
            args, kwargs = engine.dialect.create_connect_args(engine.url)
            self._async = await psycopg.AsyncConnection.connect(
                *args, **kwargs, autocommit=True, prepare_threshold=0
            )
            await self._async.execute(_PG_STORE_SETTINGS)
        return self._async

    async def close_async(self) -> None:
        connection, self._async = self._async, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                logger.debug("closing the HL7 store connection failed", exc_info=True)

    def _execute(self, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        import psycopg

        for attempt in (1, 2):
            connection = self._connect()
            try:
                with connection.cursor() as cursor:
                    cursor.execute(_PG_STORE, parameters)
                    return cursor.fetchall()
            except psycopg.OperationalError:
                broken = connection.broken or connection.closed
                self.close()
                if not broken or attempt == 2:
                    raise
                logger.warning("the HL7 store connection broke; storing the batch on a new one")
            except BaseException:
                if connection.broken or connection.closed:
                    self.close()
                raise
        raise AssertionError("unreachable")

    def _connect(self) -> Any:
        if self._connection is None:
            record = self.runtime.engine.raw_connection()
            connection: Any = record.driver_connection
            record.detach()  # ours until closed, never handed back to the pool
            connection.autocommit = True
            connection.prepare_threshold = 0
            connection.execute(_PG_STORE_SETTINGS)
            self._record, self._connection = record, connection
        return self._connection

    def close(self) -> None:
        record, self._record, self._connection = self._record, None, None
        if record is not None:
            try:
                record.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                logger.debug("closing the HL7 store connection failed", exc_info=True)


class SqliteStoreWriter(StoreWriter):
    """SQLite: a batch on a connection of its own, through the sqlite3 module directly.

    The same transaction as `store_messages` (BEGIN IMMEDIATE in turn with every other
    writer, on the `<database>-writer` lock of `worklist.db.sqlite_writers`; the resend
    check; the INSERTs; COMMIT), without a session and SQLAlchemy's per-statement work:
    the listener's process is CPU-bound on SQLite, and the store thread holds its GIL.
    Values go through the columns' own bind processors, so rows are as the ORM writes them.
    """

    def __init__(self, runtime: Runtime, directory: TrustDirectory, database: str) -> None:
        super().__init__(runtime, directory)
        from worklist.db.sqlite_writers import WriterQueue

        self._turns = WriterQueue(database)
        self._connection: Any = None
        self._record: Any = None
        dialect = runtime.engine.dialect
        self._columns = [name for name, _ in _PG_COLUMNS]
        self._binders = [
            (name, _INBOUND.c[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in self._columns
        ]

    def store(
        self, arrivals: Sequence[Arrival], prepared: Sequence[Verdict | None], now: datetime
    ) -> list[StoreOutcome]:
        verdicts = self.verdicts(arrivals, prepared)
        wanted = {
            _duplicate_key(v.header)
            for v, a in zip(verdicts, arrivals, strict=True)
            if a.oversize_bytes is None and v.header.control_id
        }
        connection = self._connect()
        self._turns.wait_turn(connection)
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                originals: dict[tuple[str, str, str], _Original] = {}
                for key in wanted:
                    found = connection.execute(
                        _SQLITE_ORIGINAL, (key[0] or None, key[1] or None, key[2])
                    ).fetchone()
                    if found is not None:
                        originals[key] = _Original(found[0], found[1], found[2])
                rows, outcomes = _store_rows(
                    arrivals, verdicts, originals, self.directory.settings, now
                )
                ids = [
                    connection.execute(
                        _SQLITE_INSERT,
                        [bind(row[name]) if bind else row[name] for name, bind in self._binders],
                    ).lastrowid
                    for row in rows
                ]
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except BaseException:
            self.close()  # a fresh connection for the next batch
            raise
        finally:
            self._turns.done(connection)
        stored = [
            replace(o, message_id=message_id) for message_id, o in zip(ids, outcomes, strict=True)
        ]
        _log_refusals(rows, stored)
        return stored

    def _connect(self) -> Any:
        if self._connection is None:
            record = self.runtime.engine.raw_connection()
            connection: Any = record.driver_connection
            record.detach()  # ours until closed, never handed back to the pool
            self._turns.opened(connection)
            self._record, self._connection = record, connection
        return self._connection

    def close(self) -> None:
        record, connection = self._record, self._connection
        self._record = self._connection = None
        if connection is not None:
            self._turns.closed(connection)
        if record is not None:
            try:
                record.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                logger.debug("closing the HL7 store connection failed", exc_info=True)


def store_writer(runtime: Runtime, directory: TrustDirectory) -> StoreWriter:
    if runtime.dialect == "postgresql" and runtime.engine.dialect.driver == "psycopg":
        return PostgresStoreWriter(runtime, directory)
    database = runtime.engine.url.database
    if (
        runtime.dialect == "sqlite"
        and runtime.engine.dialect.driver == "pysqlite"
        and database
        and database != ":memory:"
        and not database.startswith("file:")
    ):
        return SqliteStoreWriter(runtime, directory, database)
    return StoreWriter(runtime, directory)


_PG_COLUMNS = (
    ("trust_id", "integer"),
    ("sending_application", "text"),
    ("sending_facility", "text"),
    ("control_id", "text"),
    ("message_type", "text"),
    ("message_time", "timestamptz"),
    ("received_at", "timestamptz"),
    ("peer", "text"),
    ("raw", "bytea"),
    ("state", "text"),
    ("error", "text"),
    ("ack", "bytea"),
    ("ack_code", "text"),
    ("accession_number", "text"),
    ("patient_identifier", "text"),
)


def _pg_store_sql() -> str:
    names = [name for name, _ in _PG_COLUMNS]
    # Binary parameters (%b): no text escaping of the raw bytes and ACKs on either side.
    arrays = ", ".join(f"%({name})b::{type_}[]" for name, type_ in _PG_COLUMNS)
    # The stored original of a message, if any: the first non-duplicate row with its
    # sender and MSH-10. An empty MSH-3/MSH-4 is stored NULL; each NULL combination is its
    # own branch, so that every branch is one scan of the sender/control-id index.
    branches = []
    for application_null in (False, True):
        for facility_null in (False, True):
            conditions = [
                "i.checked",
                "m.control_id = i.control_id",
                f"m.state <> '{DUPLICATE}'",
                "m.ack IS NOT NULL",
            ]
            for column, null in (
                ("sending_application", application_null),
                ("sending_facility", facility_null),
            ):
                if null:
                    conditions += [f"i.{column} IS NULL", f"m.{column} IS NULL"]
                else:
                    conditions.append(f"m.{column} = i.{column}")
            branches.append(
                "SELECT m.id, m.ack, m.ack_code FROM inbound_message m WHERE "
                + " AND ".join(conditions)
            )
    plain = [n for n in names if n not in ("state", "error", "ack", "ack_code")]
    return f"""
WITH incoming AS (
    SELECT * FROM unnest({arrays}, %(checked)b::boolean[])
        WITH ORDINALITY AS i({", ".join(names)}, checked, ord)
),
resolved AS (
    SELECT nextval(pg_get_serial_sequence('inbound_message', 'id')) AS id,
        i.ord, o.id AS original_id,
        CASE WHEN o.id IS NULL THEN i.state ELSE '{DUPLICATE}' END AS state,
        CASE WHEN o.id IS NULL THEN i.error ELSE 'resend of message ' || o.id END AS error,
        CASE WHEN o.id IS NULL THEN i.ack ELSE o.ack END AS ack,
        CASE WHEN o.id IS NULL THEN i.ack_code ELSE o.ack_code END AS ack_code,
        {", ".join(f"i.{n}" for n in plain)}
    FROM incoming i LEFT JOIN LATERAL (
        {" UNION ALL ".join(branches)}
        ORDER BY id LIMIT 1
    ) o ON true
    ORDER BY i.ord
),
inserted AS (
    INSERT INTO inbound_message (id, {", ".join(names)})
    SELECT id, {", ".join(names)} FROM resolved
)
SELECT id, original_id, state, ack, ack_code FROM resolved ORDER BY ord
"""


_PG_STORE = _pg_store_sql()
# The store connection's own: the prepared statement runs on its generic plan. PostgreSQL
# otherwise keeps planning it afresh for each batch (its custom plans, knowing the arrays,
# look cheaper than the generic one): ~0.3 ms of server CPU a batch, half the statement's.
# The generic plan is the one wanted whatever the values (unnest, then one index scan per
# message on the sender/control-id index).
_PG_STORE_SETTINGS = "SET plan_cache_mode = force_generic_plan"

_SQLITE_ORIGINAL = (
    "SELECT id, ack, ack_code FROM inbound_message WHERE sending_application IS ?"
    " AND sending_facility IS ? AND control_id = ?"
    f" AND state <> '{DUPLICATE}' AND ack IS NOT NULL ORDER BY id LIMIT 1"
)
_SQLITE_INSERT = (
    f"INSERT INTO inbound_message ({', '.join(n for n, _ in _PG_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in _PG_COLUMNS)})"
)


@dataclass(frozen=True)
class _Original:
    """The first stored message with a given sender and MSH-10: its ACK is every resend's."""

    id: int | None
    ack: bytes
    ack_code: str | None


def _stored_originals(
    session: Session, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], _Original]:
    """Earlier messages with any of these (MSH-3, MSH-4, MSH-10): one query for the batch,
    on the (sending_application, sending_facility, control_id) index; exact keys matched here."""
    wanted = {k for k in keys if k[2]}
    if not wanted:
        return {}
    applications = {k[0] for k in wanted}
    facilities = {k[1] for k in wanted}
    query = _originals_query(
        "" in applications, "" in facilities, session.get_bind().dialect.name == "postgresql"
    )
    parameters = {
        "applications": sorted(a for a in applications if a),
        "facilities": sorted(f for f in facilities if f),
        "control_ids": sorted({k[2] for k in wanted}),
    }
    found: dict[tuple[str, str, str], _Original] = {}
    for row in session.connection().execute(query, parameters):
        key = (row.sending_application or "", row.sending_facility or "", row.control_id or "")
        if key in wanted and key not in found and row.ack is not None:
            found[key] = _Original(row.id, row.ack, row.ack_code)
    return found


@functools.cache
def _originals_query(
    application_null: bool, facility_null: bool, arrays: bool = False
) -> sa.Select[Any]:
    """Built once per shape, not per batch: building it cost as much CPU as the INSERT.
    PostgreSQL takes the values as arrays (`= ANY`), so the SQL text is the same for any
    batch and the server plans it once (psycopg prepares it); elsewhere expanding IN
    lists. An empty MSH-3/MSH-4 is stored NULL."""
    table = _INBOUND

    def column_in(column: sa.ColumnElement[Any], name: str, null: bool) -> sa.ColumnElement[bool]:
        if arrays:
            clause = column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(sa.String)))
        else:
            clause = column.in_(sa.bindparam(name, expanding=True))
        return sa.or_(clause, column.is_(None)) if null else clause

    return (
        sa.select(
            table.c.id,
            table.c.sending_application,
            table.c.sending_facility,
            table.c.control_id,
            table.c.ack,
            table.c.ack_code,
        )
        .where(
            column_in(table.c.sending_application, "applications", application_null),
            column_in(table.c.sending_facility, "facilities", facility_null),
            column_in(table.c.control_id, "control_ids", False),
            table.c.state != DUPLICATE,
        )
        .order_by(table.c.id)
    )


def _describe(error: Hl7Error | WorklistError | Exception) -> str:
    if isinstance(error, Hl7Error):
        where = f" at {error.location}" if error.location else ""
        return f"{error.ack_code} {error.error_code} {error.error_text}{where}: {error.text}"
    code = getattr(error, "hl7_error_code", "207")
    return f"AE {code} {type(error).__name__}: {error}"


# --- Applying ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Applied:
    """What applying one stored message came to: its new state and search keys."""

    state: str
    error: str | None = None
    accession_number: str | None = None
    patient_identifier: str | None = None
    to_reprioritise: tuple[int, ...] = ()


class _Trusts:
    """The trusts (and their parsed inbound profiles) of one apply batch.

    Held strongly here: the session's identity map is weak, so `session.get` alone
    would load the trust again for every message.
    """

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self._found: dict[int, tuple[Trust, InboundProfile | None, str | None]] = {}

    def load(self, trust_ids: Iterable[int | None]) -> None:
        """The batch's trusts in one query, not one each."""
        wanted = {t for t in trust_ids if t is not None and t not in self._found}
        if wanted:
            for trust in self.session.scalars(sa.select(Trust).where(Trust.id.in_(wanted))):
                self._found[trust.id] = (trust, *_profile_for(trust, self.settings))

    def get(self, trust_id: int | None) -> tuple[Trust, InboundProfile]:
        if trust_id is None:
            raise UnknownSender("the message has no trust")
        if trust_id not in self._found:
            trust = self.session.get(Trust, trust_id)
            if trust is None:
                raise UnknownSender(f"trust {trust_id} no longer exists")
            self._found[trust_id] = (trust, *_profile_for(trust, self.settings))
        trust, profile, problem = self._found[trust_id]
        if profile is None:
            raise ApplicationError(problem or "invalid trust profile")
        return trust, profile


@dataclass(frozen=True)
class _Read:
    """A stored message read back: its trust and events, ready to apply."""

    message_id: int
    trust: Trust
    events: list[DomainEvent]
    control_id: str


def _failure(message_id: int, error: Exception) -> _Applied:
    """The error-queue entry for a message that could not be read or applied."""
    if isinstance(error, Hl7Error | WorklistError):
        logger.warning("inbound message %s failed: %s", message_id, _describe(error))
        return _Applied(FAILED, _describe(error))
    logger.error("inbound message %s failed unexpectedly", message_id, exc_info=error)
    return _Applied(FAILED, f"AE 207 application internal error: {type(error).__name__}: {error}")


def _read_stored(
    *, message_id: int, trust_id: int | None, raw: bytes, received_at: datetime, trusts: _Trusts
) -> _Read | _Applied:
    """Parse a stored message into its events (no writes); an `_Applied` failure if it cannot."""
    try:
        trust, profile = trusts.get(trust_id)
        message = Er7Message.parse(raw)
        events = route(message, profile, received_at=received_at)
    except sa.exc.OperationalError:
        raise  # the database itself: leave it received, the worker retries
    except Exception as error:  # noqa: BLE001 - one bad message must not stop the queue
        return _failure(message_id, error)
    return _Read(message_id, trust, events, message.control_id)


def _apply_read(
    session: Session,
    read: _Read,
    *,
    now: datetime,
    reprioritise: bool = True,
    lookups: orders.Lookups | None = None,
) -> _Applied:
    """Apply one read message; on failure it is to become ``failed`` with why.

    No savepoint of our own: nothing is written here before `apply_events`, which
    runs in its own savepoint and leaves nothing behind when it raises, so one bad
    message in a batch fails alone. With `reprioritise=False` the studies to
    re-prioritise come back for the caller to do once per batch.
    """
    try:
        result = orders.apply_events(
            session,
            trust=read.trust,
            events=read.events,
            source=f"hl7:{read.control_id}"[:120],
            now=now,
            control_id=read.control_id or None,
            reprioritise=reprioritise,
            lookups=lookups,
        )
    except sa.exc.OperationalError:
        raise  # the database itself: leave it received, the worker retries
    except Exception as error:  # noqa: BLE001 - one bad message must not stop the queue
        return _failure(read.message_id, error)
    return _applied(result)


def _applied(result: orders.AppliedResult) -> _Applied:
    return _Applied(
        APPLIED,
        "; ".join(result.notes)[:2000] or None,
        result.accession_numbers[0][:64] if result.accession_numbers else None,
        result.patient_local_ids[0][:64] if result.patient_local_ids else None,
        tuple(result.to_reprioritise),
    )


def _apply_reads(
    session: Session, reads: Sequence[_Read | _Applied], *, now: datetime, core: bool
) -> list[_Applied]:
    """Apply a batch's messages in order: runs of order messages by `orders.CoreBatch`
    (with `core`), anything else (ADT, a claim to end, ...) by `apply_events`, one by one."""
    if not core:
        # The ORM path alone: the batch's studies and patients read ahead, one query each.
        lookups = orders.Lookups()
        by_trust: dict[int, tuple[Trust, list[DomainEvent]]] = {}
        for read in reads:
            if isinstance(read, _Read):
                by_trust.setdefault(read.trust.id, (read.trust, []))[1].extend(read.events)
        for trust, events in by_trust.values():
            lookups.read_ahead(session, trust=trust, events=events)
        return [
            read
            if isinstance(read, _Applied)
            else _apply_read(session, read, now=now, reprioritise=False, lookups=lookups)
            for read in reads
        ]
    applied: list[_Applied | None] = [None] * len(reads)
    start = 0
    while start < len(reads):
        read = reads[start]
        if isinstance(read, _Applied):
            applied[start] = read
            start += 1
        elif not orders.CoreBatch.accepts(read.events):
            applied[start] = _apply_read(session, read, now=now, reprioritise=False)
            start += 1
        else:
            end = start + 1
            while end < len(reads) and (
                isinstance(reads[end], _Applied) or orders.CoreBatch.accepts(reads[end].events)  # type: ignore[union-attr]
            ):
                end += 1
            start = _apply_core_run(session, reads, applied, start, end, now=now)
    return [a for a in applied if a is not None]


def _apply_core_run(
    session: Session,
    reads: Sequence[_Read | _Applied],
    applied: list[_Applied | None],
    start: int,
    end: int,
    *,
    now: datetime,
) -> int:
    """Apply reads[start:end] with one `orders.CoreBatch`; returns where the next run starts.

    A message the Core path cannot finish (`orders.NeedsOrm`) ends the run: what came
    before it is written, it is applied by `apply_events`, and the next run reads again.
    """
    batch = orders.CoreBatch(session, now=now)
    batch.read_ahead([(r.trust, r.events) for r in reads[start:end] if isinstance(r, _Read)])
    done: list[int] = []
    stop = end
    for index in range(start, end):
        read = reads[index]
        if isinstance(read, _Applied):
            applied[index] = read
            continue
        try:
            result = batch.apply(
                trust=read.trust,
                events=read.events,
                source=f"hl7:{read.control_id}"[:120],
                control_id=read.control_id or None,
            )
        except orders.NeedsOrm:
            stop = index
            break
        except sa.exc.OperationalError:
            raise  # the database itself: leave it received, the worker retries
        except (Hl7Error, WorklistError) as error:  # what the message says is wrong
            applied[index] = _failure(read.message_id, error)
            continue
        except Exception:  # noqa: BLE001 - a bug of this path must not fail a message
            logger.exception(
                "message %s: the Core path failed; the ORM path applies it", read.message_id
            )
            stop = index
            break
        applied[index] = _applied(result)
        done.append(index)
    try:
        with session.begin_nested():
            batch.write()
    except sa.exc.IntegrityError as error:
        # Another connection created one of these studies or patients since we read: the
        # ORM path, one message at a time, finds it (`apply_events` applies once more).
        # Anything else here is a bug of the Core path (e.g. a new NOT NULL column it
        # does not fill): slower, still right, and said loudly.
        logger.warning(
            "the Core path could not write %d messages (%s); the ORM path applies them",
            len(done),
            str(error.orig)[:200],
        )
        for index in done:
            applied[index] = _apply_read(session, reads[index], now=now, reprioritise=False)  # type: ignore[arg-type]
    # ORM objects an earlier message loaded may predate these writes.
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Study | Patient | PatientIdentifier):
            session.expire(obj)
    if stop < end:
        applied[stop] = _apply_read(session, reads[stop], now=now, reprioritise=False)  # type: ignore[arg-type]
        return stop + 1
    return end


def _apply_one(
    session: Session, row: InboundMessage, *, directory: TrustDirectory, now: datetime
) -> None:
    """Apply one stored message (an ORM row: replay), re-prioritising its studies at once."""
    read = _read_stored(
        message_id=row.id,
        trust_id=row.trust_id,
        raw=row.raw,
        received_at=row.received_at,
        trusts=_Trusts(session, directory.settings),
    )
    applied = read if isinstance(read, _Applied) else _apply_read(session, read, now=now)
    row.state = applied.state
    row.error = applied.error
    if applied.state == APPLIED:
        row.applied_at = now
        row.accession_number = row.accession_number or applied.accession_number
        row.patient_identifier = row.patient_identifier or applied.patient_identifier


def apply_pending(
    session: Session,
    *,
    directory: TrustDirectory,
    now: datetime,
    limit: int = APPLY_BATCH,
    partition: tuple[int, int] = (0, 1),
    core: bool = True,
) -> int:
    """Apply up to `limit` received messages in arrival order; returns how many were taken.

    Messages of one order always come from one trust, so "in order per order"
    holds if each trust's messages are applied by one worker at a time. On
    PostgreSQL a worker first takes a transaction-scoped advisory lock on each
    trust it will serve (`pg_try_advisory_xact_lock`, skipping trusts another
    worker holds, in this or any other listener process or node), and
    `partition=(k, n)` spreads trusts over n workers (trust id mod n). SQLite
    has one writer at a time, so there the order is simply the arrival order.

    Order messages are applied by `orders.CoreBatch` (the same decisions as
    `orders.apply_events`, written with a few Core statements per batch); the rest, and
    everything with `core=False`, by `apply_events` in a savepoint each (the studies and
    patients read ahead by `orders.Lookups`). Either way a bad message fails alone, with
    its reason; the studies the batch touched are re-prioritised once, after the last
    message, and the messages' new states are written in one statement.
    """
    table = _INBOUND
    query = (
        sa.select(table.c.id, table.c.trust_id, table.c.raw, table.c.received_at,
                  table.c.accession_number, table.c.patient_identifier)
        .where(table.c.state == RECEIVED)
        .order_by(table.c.id)
        .limit(limit)
    )  # fmt: skip
    if session.get_bind().dialect.name == "postgresql":
        index, count = partition
        mine = sa.select(Trust.id).where(
            sa.exists().where(InboundMessage.trust_id == Trust.id, InboundMessage.state == RECEIVED)
        )
        if count > 1:
            mine = mine.where(Trust.id % count == index)
        # MATERIALIZED: the lock is tried only on this worker's trusts with work waiting.
        # In one WHERE the planner may call it first, for every trust, and hold other
        # workers' trusts to the end of this transaction (they then sit idle).
        candidates = mine.cte("apply_candidates").prefix_with("MATERIALIZED")
        trust_ids = list(
            session.scalars(
                sa.select(candidates.c.id).where(
                    sa.func.pg_try_advisory_xact_lock(APPLY_LOCK_CLASS, candidates.c.id)
                )
            )
        )
        if not trust_ids:
            return 0
        query = query.where(table.c.trust_id.in_(trust_ids)).with_for_update(skip_locked=True)
    rows = session.connection().execute(query).all()
    if not rows:
        return 0
    trusts = _Trusts(session, directory.settings)
    trusts.load(row.trust_id for row in rows)
    reads = [
        _read_stored(
            message_id=row.id,
            trust_id=row.trust_id,
            raw=row.raw,
            received_at=row.received_at,
            trusts=trusts,
        )
        for row in rows
    ]
    updates: list[dict[str, Any]] = []
    to_reprioritise: list[int] = []
    for row, applied in zip(rows, _apply_reads(session, reads, now=now, core=core), strict=True):
        to_reprioritise.extend(applied.to_reprioritise)
        updates.append(
            {
                "b_id": row.id,
                "b_state": applied.state,
                "b_error": applied.error,
                "b_applied_at": now if applied.state == APPLIED else None,
                "b_accession_number": row.accession_number or applied.accession_number,
                "b_patient_identifier": row.patient_identifier or applied.patient_identifier,
            }
        )
    orders.reprioritise_studies(session, now=now, study_ids=to_reprioritise)
    session.flush()
    session.connection().execute(
        table.update()
        .where(table.c.id == sa.bindparam("b_id"))
        .values(
            state=sa.bindparam("b_state"),
            error=sa.bindparam("b_error"),
            applied_at=sa.bindparam("b_applied_at"),
            accession_number=sa.bindparam("b_accession_number"),
            patient_identifier=sa.bindparam("b_patient_identifier"),
        ),
        updates,
    )
    return len(rows)


def count_pending(session: Session) -> int:
    return (
        session.scalar(
            sa.select(sa.func.count())
            .select_from(InboundMessage)
            .where(InboundMessage.state == RECEIVED)
        )
        or 0
    )


# --- Message log and error queue -------------------------------------------------------------


def list_messages(
    session: Session,
    *,
    trust_code: str | None = None,
    accession_number: str | None = None,
    patient_identifier: str | None = None,
    control_id: str | None = None,
    state: str | Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[InboundMessage]:
    """The message log, newest first, filtered."""
    query = sa.select(InboundMessage).order_by(InboundMessage.id.desc())
    if trust_code:
        trust_id = session.scalar(sa.select(Trust.id).where(Trust.code == trust_code.upper()))
        if trust_id is None:
            raise NotFound(f"no trust {trust_code}")
        query = query.where(InboundMessage.trust_id == trust_id)
    if accession_number:
        query = query.where(InboundMessage.accession_number == accession_number)
    if patient_identifier:
        query = query.where(InboundMessage.patient_identifier == patient_identifier)
    if control_id is not None:
        query = query.where(InboundMessage.control_id == control_id)
    if state:
        states = [state] if isinstance(state, str) else list(state)
        unknown = set(states) - set(STATES)
        if unknown:
            raise InvalidInput(
                f"unknown state(s) {sorted(unknown)}; states are {', '.join(STATES)}"
            )
        query = query.where(InboundMessage.state.in_(states))
    if since is not None:
        query = query.where(InboundMessage.received_at >= since)
    if until is not None:
        query = query.where(InboundMessage.received_at < until)
    return list(session.scalars(query.limit(limit).offset(offset)))


def get_message(session: Session, message_id: int) -> InboundMessage:
    row = session.get(InboundMessage, message_id)
    if row is None:
        raise NotFound(f"no inbound message {message_id}")
    return row


def message_text(raw: bytes) -> str:
    """The stored bytes as text (declared charset, else the fallbacks), one segment a line."""
    try:
        declared = read_header(raw).charset
        declared = declared.split("^")[0]
    except MalformedMessage:
        declared = ""
    text, _, _ = decode_payload(raw, declared)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def edit_message(
    session: Session, message_id: int, *, raw: bytes | str, now: datetime, user: User | None = None
) -> InboundMessage:
    """Correct a failed or rejected message before replaying it; old bytes go to the audit log."""
    row = get_message(session, message_id)
    if row.state not in ERROR_QUEUE:
        raise Conflict(
            f"message {message_id} is {row.state}; only failed or rejected messages can be edited"
        )
    if isinstance(raw, str):
        raw = raw.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
    if not raw.strip():
        raise InvalidInput("the edited message is empty")
    try:
        header = read_header(raw)
    except MalformedMessage as exc:
        raise InvalidInput(f"the edited message has no readable MSH: {exc.text}") from exc
    audit.record(
        session,
        at=now,
        action="inbound_message_edited",
        user=user,
        object_type="inbound_message",
        object_id=row.id,
        detail={
            "previous_sha256": hashlib.sha256(row.raw).hexdigest(),
            "previous_raw": row.raw.decode("latin-1"),
            "previous_error": row.error,
        },
    )
    application, facility = _sender(header)
    row.raw = raw
    row.control_id = header.control_id[:100]
    row.sending_application = application[:100] or None
    row.sending_facility = facility[:100] or None
    row.message_type = (
        f"{header.message_code}^{header.trigger}"[:32] if header.message_code else None
    )
    row.error = f"edited at {now.isoformat()}; replay to apply. Was: {row.error}"[:2000]
    return row


def replay_message(
    session: Session,
    message_id: int,
    *,
    directory: TrustDirectory,
    now: datetime,
    user: User | None = None,
) -> InboundMessage:
    """Apply a failed or rejected message now, exactly once.

    The state moves out of the error queue in one conditional UPDATE: of two
    replays racing, one wins and the other gets Conflict. If it fails again it
    returns to the queue with the new reason.
    """
    get_message(session, message_id)
    claimed = session.execute(
        sa.update(InboundMessage)
        .where(InboundMessage.id == message_id, InboundMessage.state.in_(ERROR_QUEUE))
        .values(state=RECEIVED)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"message {message_id} is not in the error queue (already replayed?)")
    row = get_message(session, message_id)
    session.refresh(row)
    directory.invalidate()
    arrival = Arrival(payload=row.raw, peer=row.peer, received_at=row.received_at)
    verdict = interpret(session, arrival, directory=directory)
    assert verdict is not None  # with a session the trust is always resolved
    if verdict.error is not None:
        row.state = REJECTED if verdict.error.ack_code == "AR" else FAILED
        row.error = _describe(verdict.error)
    else:
        row.trust_id = verdict.trust.id if verdict.trust else row.trust_id
        accession, patient = _search_keys(verdict.events)
        row.accession_number = row.accession_number or accession
        row.patient_identifier = row.patient_identifier or patient
        row.message_time = row.message_time or _message_time(verdict)
        _apply_one(session, row, directory=directory, now=now)
    audit.record(
        session,
        at=now,
        action="inbound_message_replayed",
        user=user,
        object_type="inbound_message",
        object_id=row.id,
        detail={"state": row.state, "error": row.error},
    )
    return row


def message_json(
    row: InboundMessage, *, trust_code: str | None = None, full: bool = False
) -> dict[str, Any]:
    """The API/CLI view of one message; `full` adds the raw text and the ACK."""
    data: dict[str, Any] = {
        "id": row.id,
        "trust": trust_code,
        "sending_application": row.sending_application,
        "sending_facility": row.sending_facility,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "message_time": row.message_time.isoformat() if row.message_time else None,
        "received_at": row.received_at.isoformat() if row.received_at else None,
        "peer": row.peer,
        "state": row.state,
        "ack_code": row.ack_code,
        "error": row.error,
        "applied_at": row.applied_at.isoformat() if row.applied_at else None,
        "accession_number": row.accession_number,
        "patient_identifier": row.patient_identifier,
    }
    if full:
        data["raw"] = message_text(row.raw)
        data["ack"] = message_text(row.ack) if row.ack else None
    return data


def trust_codes(session: Session, rows: Sequence[InboundMessage]) -> dict[int, str]:
    ids = {r.trust_id for r in rows if r.trust_id is not None}
    if not ids:
        return {}
    return {
        row.id: row.code
        for row in session.execute(sa.select(Trust.id, Trust.code).where(Trust.id.in_(ids)))
    }
