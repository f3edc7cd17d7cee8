"""Delivering the outbox: every signed report's ORU^R01 to its trust's RIS, at least once.

Rules (issue 5, HL7-NOTES section 8):

* **In order per study.** A message is due only when every earlier message for the
  same study has been delivered; a parked one holds the later ones back until a
  person resends it (a RIS must never get an addendum before the final it amends).
* **Per trust, independently.** Each trust with due messages gets its own worker
  thread and its own MLLP connection, so one trust's dead RIS never delays another's.
* **Crash-safe.** A message is *taken* by a committed conditional update that
  counts the attempt and hides it for a lease; the send happens outside any
  transaction; the outcome is committed afterwards. Killed mid-send, the lease
  runs out and the message goes again with the same control id (MSH-10), so a
  RIS that checks MSH-10 applies it once.
* **Outcomes.** AA/CA with our control id in MSA-2: delivered. AE/AR: recorded with
  the RIS's text; retried with backoff until the trust's ``negative_ack_retries``,
  then parked with an alert. Refused, reset, timed out, unreadable or
  mismatched ACK: retried with exponential backoff and jitter, for ever; the
  whole trust waits out the backoff, not just the one message.

Entry points: `deliver_job(runtime)` for the scheduler (starts per-trust workers
and returns at once), `run_delivery(runtime, stop_event)` for a process of its
own, `deliver_pending(...)` for tests and the CLI (one synchronous pass), and
`resend(...)` for managers.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from hl7.outbound import AckOutcome, OutboundError, payload_bytes, read_ack
from hl7.sender import Endpoint, MllpSender, SendError
from worklist.db.models import Alert, AuditEvent, OutboundMessage, ReportVersion, Trust, User
from worklist.errors import Conflict, Forbidden, NotFound
from worklist.services import audit
from worklist.services.reports import PARKED_ALERT, build_payload, new_control_id, outbound_profile

logger = logging.getLogger(__name__)

PENDING, DELIVERED, PARKED = "pending", "delivered", "parked"
# A taken message is hidden for connect timeout + ACK timeout + this margin: longer than one
# attempt can last, so only a deliverer that died leaves a lease to run out.
LEASE_MARGIN_SECONDS = 5.0
NEGATIVE_ACK = "oru_negative_ack"


def backoff_seconds(
    failures: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with jitter: about base, 2*base, 4*base... up to cap, each scaled by a
    random factor in [0.5, 1) so that many senders do not retry in step."""
    ceiling = min(cap, base * (2 ** max(0, failures - 1)))
    return ceiling * (rng or random).uniform(0.5, 1.0)


def _endpoint(trust: Trust, profile: Any) -> Endpoint | None:
    if not trust.ris_host or not trust.ris_port:
        return None
    return Endpoint(
        trust.ris_host, int(trust.ris_port), tls=bool(trust.ris_tls or profile.tls),
        tls_verify=profile.tls_verify, tls_ca_file=profile.tls_ca_file,
    )  # fmt: skip


def _due_query(now: datetime) -> sa.Select[Any]:
    earlier = aliased(OutboundMessage)
    blocked = (
        sa.select(earlier.id)
        .where(
            earlier.study_id == OutboundMessage.study_id,
            earlier.id < OutboundMessage.id,
            earlier.state != DELIVERED,
        )
        .exists()
    )
    return (
        sa.select(OutboundMessage)
        .where(
            OutboundMessage.state == PENDING,
            sa.or_(
                OutboundMessage.next_attempt_at.is_(None), OutboundMessage.next_attempt_at <= now
            ),
            ~blocked,
        )
        .order_by(OutboundMessage.id)
    )


def trusts_with_due_messages(session: Session, *, now: datetime) -> list[int]:
    sub = _due_query(now).with_only_columns(OutboundMessage.trust_id).distinct().order_by(None)
    return sorted(session.scalars(sub))


def _take(session: Session, *, message: OutboundMessage, now: datetime, lease: float) -> bool:
    """Claim one due message for one attempt: a single conditional update (never check-then-set)."""
    result = session.execute(
        sa.update(OutboundMessage)
        .where(
            OutboundMessage.id == message.id,
            OutboundMessage.state == PENDING,
            sa.or_(
                OutboundMessage.next_attempt_at.is_(None), OutboundMessage.next_attempt_at <= now
            ),
        )
        .values(
            attempts=OutboundMessage.attempts + 1,
            last_attempt_at=now,
            next_attempt_at=now + timedelta(seconds=lease),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass
class TrustRound:
    """What one worker pass over one trust did."""

    trust_id: int
    delivered: int = 0
    negative: int = 0
    parked: int = 0
    failures: int = 0
    stopped: str = ""  # why the pass ended early (endpoint down...)
    latencies: list[float] = field(default_factory=list)  # signed -> ACK, seconds (bench)


def _negative_acks(session: Session, message_id: int) -> int:
    return (
        session.scalar(
            sa.select(sa.func.count(AuditEvent.id)).where(
                AuditEvent.action == NEGATIVE_ACK,
                AuditEvent.object_type == "outbound_message",
                AuditEvent.object_id == str(message_id),
            )
        )
        or 0
    )


def _record_ack(
    session: Session, *, message_id: int, ack: bytes, outcome: AckOutcome, profile: Any,
    now: datetime, rng: random.Random,
) -> str:  # fmt: skip
    message = session.get(OutboundMessage, message_id)
    assert message is not None
    message.last_ack = ack.decode("latin-1")[:4000]
    message.last_ack_code = outcome.code[:4] or None
    if outcome.delivered:
        message.state = DELIVERED
        message.delivered_at = now
        message.next_attempt_at = None
        message.last_error = None
        audit.record(
            session, at=now, action="oru_delivered", object_type="outbound_message",
            object_id=message.id, detail={"control_id": message.control_id, "ack": outcome.code},
        )  # fmt: skip
        return "delivered"
    if outcome.outcome in ("error", "reject"):
        message.last_error = f"{outcome.code}: {outcome.text}"[:4000]
        audit.record(
            session, at=now, action=NEGATIVE_ACK, object_type="outbound_message",
            object_id=message.id,
            detail={"control_id": message.control_id, "ack": outcome.code, "text": outcome.text},
        )  # fmt: skip
        session.flush()
        count = _negative_acks(session, message.id)
        if count >= profile.negative_ack_retries:
            _park(
                session,
                message=message,
                now=now,
                why=f"the RIS answered {outcome.code} {count} time(s): {outcome.text}",
            )
            return "parked"
        message.next_attempt_at = now + timedelta(
            seconds=backoff_seconds(count, base=profile.retry_base_seconds,
                                    cap=profile.retry_max_seconds, rng=rng)
        )  # fmt: skip
        return "negative"
    # mismatched or unreadable ACK: the RIS is confused, not refusing this report; try again
    message.last_error = f"ACK not usable ({outcome.outcome}): {outcome.text}"[:4000]
    message.next_attempt_at = now + timedelta(
        seconds=backoff_seconds(message.attempts, base=profile.retry_base_seconds,
                                cap=profile.retry_max_seconds, rng=rng)
    )  # fmt: skip
    return "retry"


def _park(session: Session, *, message: OutboundMessage, now: datetime, why: str) -> None:
    message.state = PARKED
    message.next_attempt_at = None
    session.add(
        Alert(
            kind=PARKED_ALERT, study_id=message.study_id, trust_id=message.trust_id,
            created_at=now, message=f"ORU {message.control_id} parked: {why}"[:1000],
        )
    )  # fmt: skip
    audit.record(
        session, at=now, action="oru_parked", object_type="outbound_message",
        object_id=message.id, detail={"control_id": message.control_id, "why": why[:500]},
    )  # fmt: skip
    logger.warning("ORU %s (trust %s) parked: %s", message.control_id, message.trust_id, why)


def _record_send_failure(
    session: Session, *, message_id: int, trust_id: int, error: SendError, profile: Any,
    now: datetime, rng: random.Random,
) -> datetime:  # fmt: skip
    """The endpoint failed: this message and every due one of the trust wait out the backoff."""
    message = session.get(OutboundMessage, message_id)
    assert message is not None
    message.last_error = f"{type(error).__name__}: {error}"[:4000]
    until = now + timedelta(
        seconds=backoff_seconds(message.attempts, base=profile.retry_base_seconds,
                                cap=profile.retry_max_seconds, rng=rng)
    )  # fmt: skip
    message.next_attempt_at = until
    session.execute(
        sa.update(OutboundMessage)
        .where(
            OutboundMessage.trust_id == trust_id,
            OutboundMessage.state == PENDING,
            sa.or_(
                OutboundMessage.next_attempt_at.is_(None), OutboundMessage.next_attempt_at < until
            ),
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )
    return until


def deliver_trust(
    runtime: Any,
    trust_id: int,
    *,
    sender: MllpSender,
    max_messages: int = 1000,
    rng: random.Random | None = None,
    stop: threading.Event | None = None,
    linger: float = 0.0,
    poll: float = 0.1,
    wake: threading.Event | None = None,
) -> TrustRound:
    """Deliver one trust's due messages, one at a time, each waiting for its ACK.

    With ``linger`` the worker keeps polling for ``linger`` seconds after the queue runs dry,
    so a report signed meanwhile leaves within ``poll`` seconds instead of waiting for the
    next scheduler tick; with ``wake`` it sleeps until woken (see `Deliverer`) instead of
    querying the database every ``poll``.
    """
    rng = rng or random.Random()
    result = TrustRound(trust_id)
    idle_since: float | None = None
    # An ACK's outcome is written in the same transaction that takes the next message: one
    # write per message instead of two while a trust is busy (SQLite has one writer at a time).
    unrecorded: dict[str, Any] | None = None

    def record(session: Session) -> str:
        nonlocal unrecorded
        assert unrecorded is not None
        u, unrecorded = unrecorded, None
        verdict = _record_ack(
            session, message_id=u["message_id"], ack=u["ack"], outcome=u["outcome"],
            profile=u["profile"], now=u["done"], rng=rng,
        )  # fmt: skip
        if verdict == "delivered":
            result.delivered += 1
            result.latencies.append((u["done"] - u["created_at"]).total_seconds())
        elif verdict == "parked":
            result.parked += 1
        elif verdict == "negative":
            result.negative += 1
        else:
            result.failures += 1
            result.stopped = f"ACK {u['outcome'].outcome}"
        return verdict

    for _ in range(max_messages):
        if stop is not None and stop.is_set():
            result.stopped = "stopping"
            break
        now = runtime.clock.now()
        with runtime.session() as session:
            if unrecorded is not None:
                record(session)
            trust = session.get(Trust, trust_id)
            if trust is None:
                result.stopped = "no such trust"
                break
            try:
                profile = outbound_profile(trust)
            except OutboundError as exc:
                result.stopped = f"bad outbound profile: {exc}"
                logger.error("trust %s: %s", trust.code, result.stopped)
                break
            endpoint = _endpoint(trust, profile)
            if endpoint is None:
                result.stopped = "no RIS endpoint configured"
                break
            message = session.scalars(
                _due_query(now).where(OutboundMessage.trust_id == trust_id).limit(1)
            ).first()
            taken = False
            if message is not None:
                lease = sender.connect_timeout + profile.ack_timeout_seconds + LEASE_MARGIN_SECONDS
                taken = _take(session, message=message, now=now, lease=lease)
                message_id, control_id = message.id, message.control_id
                payload, created_at = message.payload, message.created_at
        if message is None:
            idle_since = idle_since if idle_since is not None else time.monotonic()
            remaining = linger - (time.monotonic() - idle_since)
            if remaining <= 0:
                break
            if wake is not None:
                if wake.wait(remaining):
                    wake.clear()
            else:
                (stop or threading.Event()).wait(min(poll, remaining))
            continue
        idle_since = None
        if not taken:
            continue  # another deliverer took it
        try:
            ack = sender.send(endpoint, payload_bytes(payload), timeout=profile.ack_timeout_seconds)
        except SendError as exc:
            with runtime.session() as session:
                until = _record_send_failure(
                    session, message_id=message_id, trust_id=trust_id, error=exc,
                    profile=profile, now=runtime.clock.now(), rng=rng,
                )  # fmt: skip
            result.failures += 1
            result.stopped = f"{type(exc).__name__}: {exc}"
            logger.info("trust %s RIS unavailable (%s); next try at %s", trust_id, exc, until)
            break
        outcome = read_ack(ack, control_id)
        unrecorded = {
            "message_id": message_id, "ack": ack, "outcome": outcome, "profile": profile,
            "done": runtime.clock.now(), "created_at": created_at,
        }  # fmt: skip
        if outcome.outcome in ("mismatch", "unreadable"):
            with runtime.session() as session:
                record(session)
            break
    if unrecorded is not None:
        with runtime.session() as session:
            record(session)
    return result


@dataclass
class DeliveryPass:
    rounds: list[TrustRound] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.rounds)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rounds)


def deliver_pending(
    runtime: Any,
    *,
    sender: MllpSender,
    rng: random.Random | None = None,
    max_messages_per_trust: int = 1000,
) -> DeliveryPass:
    """One synchronous pass: every trust with due messages, in parallel, until each has nothing
    due or its endpoint fails. For tests, the CLI and benchmarks."""
    with runtime.session() as session:
        trust_ids = trusts_with_due_messages(session, now=runtime.clock.now())
    outcome = DeliveryPass()
    lock = threading.Lock()

    def work(trust_id: int) -> None:
        r = deliver_trust(
            runtime, trust_id, sender=sender, rng=rng, max_messages=max_messages_per_trust
        )
        with lock:
            outcome.rounds.append(r)

    threads = [threading.Thread(target=work, args=(t,), name=f"deliver-{t}") for t in trust_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


class Deliverer:
    """One worker thread per trust with due messages, and one dispatcher that looks for due
    messages every ``poll`` seconds (one query for all trusts) and wakes or starts the
    workers. `kick()` never blocks. Idle workers linger for ``linger`` seconds, so a busy
    trust keeps its worker and its MLLP connection between scheduler ticks."""

    def __init__(
        self,
        runtime: Any,
        *,
        sender: MllpSender | None = None,
        on_round: Callable[[TrustRound], None] | None = None,
        linger: float | None = None,
        poll: float = 0.1,
    ) -> None:
        self.runtime = runtime
        self.linger = (
            linger if linger is not None else 2 * runtime.settings.deliver_interval_seconds
        )
        self.poll = poll
        self.sender = sender or MllpSender()
        self.stop = threading.Event()
        self.on_round = on_round
        self._workers: dict[int, threading.Thread] = {}
        self._wake: dict[int, threading.Event] = {}
        self._dispatcher: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> int:
        """Wake or start the workers of trusts with due messages, and make sure the dispatcher
        runs; returns how many workers were started."""
        started = self._dispatch()
        if not self.busy():
            return started  # nothing due: an idle service makes one query per tick, no more
        with self._lock:
            if self._dispatcher is None or not self._dispatcher.is_alive():
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name="deliver-dispatch", daemon=True
                )
                self._dispatcher.start()
        return started

    def _dispatch(self) -> int:
        with self.runtime.session() as session:
            trust_ids = trusts_with_due_messages(session, now=self.runtime.clock.now())
        started = 0
        with self._lock:
            for trust_id in trust_ids:
                worker = self._workers.get(trust_id)
                if worker is not None and worker.is_alive():
                    self._wake[trust_id].set()
                    continue
                self._wake[trust_id] = threading.Event()
                worker = threading.Thread(
                    target=self._work, args=(trust_id,), name=f"deliver-trust-{trust_id}",
                    daemon=True,
                )  # fmt: skip
                self._workers[trust_id] = worker
                worker.start()
                started += 1
        return started

    def _dispatch_loop(self) -> None:
        idle_since = time.monotonic()
        while not self.stop.wait(self.poll):
            try:
                self._dispatch()
            except Exception:
                logger.exception("delivery dispatch failed; trying again")
            if self.busy():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.linger:
                return  # the next kick starts it again

    def _work(self, trust_id: int) -> None:
        try:
            r = deliver_trust(
                self.runtime, trust_id, sender=self.sender, stop=self.stop,
                linger=self.linger, max_messages=1_000_000, wake=self._wake[trust_id],
            )  # fmt: skip
            if self.on_round is not None:
                self.on_round(r)
        except Exception:
            logger.exception("delivery worker for trust %s failed", trust_id)

    def busy(self) -> bool:
        with self._lock:
            return any(w.is_alive() for w in self._workers.values())

    def shutdown(self, timeout: float = 30.0) -> None:
        self.stop.set()
        with self._lock:
            workers = list(self._workers.values())
            for event in self._wake.values():
                event.set()
            dispatcher = self._dispatcher
        for w in workers:
            w.join(timeout)
        if dispatcher is not None:
            dispatcher.join(timeout)
        self.sender.close()


_deliverers: dict[int, Deliverer] = {}
_deliverers_lock = threading.Lock()


def deliver_job(runtime: Any) -> None:
    """Scheduler job: start delivery workers for trusts with due messages, return at once (a
    slow RIS keeps only its own worker busy, never the scheduler)."""
    with _deliverers_lock:
        deliverer = _deliverers.get(id(runtime))
        if deliverer is None:
            deliverer = _deliverers[id(runtime)] = Deliverer(runtime)
    deliverer.kick()


def run_delivery(
    runtime: Any, stop_event: threading.Event, *, interval: float | None = None
) -> None:
    """Deliver until ``stop_event`` is set (a process or thread of its own)."""
    every = interval if interval is not None else runtime.settings.deliver_interval_seconds
    deliverer = Deliverer(runtime, linger=2 * every)
    try:
        while not stop_event.is_set():
            try:
                deliverer.kick()
            except Exception:
                logger.exception("delivery pass failed; trying again")
            stop_event.wait(every)
    finally:
        deliverer.shutdown()


# --- people -------------------------------------------------------------------------------


def _require_manager(user: User) -> None:
    if user.role not in ("manager", "admin"):
        raise Forbidden("only managers and admins can resend reports")


def resend(
    session: Session, *, message_id: int, user: User, now: datetime,
    remote_addr: str | None = None,
) -> OutboundMessage:  # fmt: skip
    """Send an ORU again by hand.

    Parked or pending: rebuilt from its report version (the profile or data may have been
    fixed) and queued now, keeping its control id (the RIS never applied it). Delivered: only
    the study's latest ORU may go again (an older one would overwrite a newer report at the
    RIS), as a new outbox row with a new control id so the RIS does not discard it as a
    duplicate.
    """
    _require_manager(user)
    message = session.get(OutboundMessage, message_id)
    if message is None:
        raise NotFound(f"no outbound message {message_id}")
    if message.state in (PARKED, PENDING):
        if message.report_version_id is not None:
            message.payload = build_payload(session, message=message, now=now)
        message.state = PENDING
        message.next_attempt_at = now
        target = message
    else:
        newer = session.scalar(
            sa.select(sa.func.count(OutboundMessage.id)).where(
                OutboundMessage.study_id == message.study_id, OutboundMessage.id > message.id
            )
        )
        if newer:
            raise Conflict("a newer report for this study has been sent; resend that one")
        version = session.get(ReportVersion, message.report_version_id)
        target = OutboundMessage(
            trust_id=message.trust_id, study_id=message.study_id,
            report_version_id=message.report_version_id,
            control_id=new_control_id(version.id if version else message.id),
            message_type=message.message_type, payload="", state=PENDING, attempts=0,
            next_attempt_at=now, created_at=now,
        )  # fmt: skip
        session.add(target)
        session.flush()
        target.payload = build_payload(session, message=target, now=now)
    audit.record(
        session, at=now, action="oru_resend", user=user, object_type="outbound_message",
        object_id=target.id, remote_addr=remote_addr,
        detail={"control_id": target.control_id, "from_message": message.id},
    )  # fmt: skip
    session.flush()
    return target


def deliveries_for_study(session: Session, *, study_id: int) -> list[OutboundMessage]:
    return list(
        session.scalars(
            sa.select(OutboundMessage)
            .where(OutboundMessage.study_id == study_id)
            .order_by(OutboundMessage.id)
        )
    )


def list_deliveries(
    session: Session, *, state: str | None = None, trust_code: str | None = None,
    limit: int = 100,
) -> list[OutboundMessage]:  # fmt: skip
    query = sa.select(OutboundMessage).order_by(OutboundMessage.id.desc()).limit(limit)
    if state:
        query = query.where(OutboundMessage.state == state)
    if trust_code:
        query = query.join(Trust, Trust.id == OutboundMessage.trust_id).where(
            Trust.code == trust_code.upper()
        )
    return list(session.scalars(query))


def delivery_history(session: Session, *, message_id: int) -> list[AuditEvent]:
    return list(
        session.scalars(
            sa.select(AuditEvent)
            .where(
                AuditEvent.object_type == "outbound_message",
                AuditEvent.object_id == str(message_id),
            )
            .order_by(AuditEvent.id)
        )
    )


def delivery_json(
    message: OutboundMessage, history: list[AuditEvent] | None = None
) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    out: dict[str, Any] = {
        "id": message.id,
        "control_id": message.control_id,
        "trust_id": message.trust_id,
        "study_id": message.study_id,
        "report_version_id": message.report_version_id,
        "state": message.state,
        "attempts": message.attempts,
        "created_at": iso(message.created_at),
        "last_attempt_at": iso(message.last_attempt_at),
        "next_attempt_at": iso(message.next_attempt_at),
        "delivered_at": iso(message.delivered_at),
        "last_ack_code": message.last_ack_code,
        "last_ack": message.last_ack,
        "last_error": message.last_error,
    }
    if history is not None:
        out["history"] = [
            {"at": iso(e.at), "action": e.action, "by": e.username, "detail": e.detail}
            for e in history
        ]
    return out
