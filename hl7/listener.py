"""The MLLP listener: frames in, durable store, ACK out; a worker applies what was stored.

One asyncio server serves many connections. On each connection frames are
handled strictly in order: a frame's ACK is written only after the message is
committed to the database, and the next frame is not looked at before that.
The work is split three ways:

* one per connection (`_serve_connection`): reads with an idle timeout, feeds
  `hl7.mllp.MllpDecoder` (junk skipped and counted, oversize frames answered
  with AR and the connection kept), hands each frame to the store writer and
  writes the ACK it gets back (an FHS/BHS batch: each message on its own, one
  batch of ACKs back);
* the store writer (`_store_loop`): takes every frame waiting from any
  connection, stores them in one transaction (group commit: one fsync for the
  batch) through `worklist.services.messages.store_writer` (on a database
  connection of its own: on PostgreSQL the batch is one statement, one round
  trip; on SQLite the sqlite3 module directly), then releases their ACKs. If
  the database is down, nothing is stored and each sender gets AR 207
  ("resend later"): no ACK is ever sent for a message not on disk;
* the apply worker: applies stored messages in arrival order, in batches, off
  the ACK path (the ACK waits only for the durable write). At start it first
  drains anything stored but not applied before a crash. `serve_hl7` runs it as
  a child process (`run_apply_worker`: its own GIL, so applying, which is
  CPU-heavy ORM work, never delays an ACK); tests run it as a thread
  (`_apply_loop`). Either way it defers to the store writer during a burst
  (SQLite has one write lock; on 2 cores the CPU is shared), for at most
  `APPLY_MAX_DEFER_SECONDS` (the child process: `APPLY_WORKER_MAX_DEFER_SECONDS`
  while the store is saturated).

Optional TLS (`ssl_context`, with client certificates if the context requires
them) and the per-trust source-address allowlist (checked by the store) guard
who may send.

Entry points: `MllpListener` (async start/stop, for tests and embedding) and
`serve_hl7(runtime, host, port, *, ready=None, stop=None, ssl_context=None,
apply="process")`,
the blocking call behind `worklist hl7-listen` and `worklist serve`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hl7.ack import build_batch_ack, build_error_ack, minimal_header
from hl7.er7 import is_batch, read_header, split_batch
from hl7.errors import Hl7Error, ServiceUnavailable
from hl7.mllp import Frame, MllpDecoder, Oversize, frame
from worklist.bootstrap import Runtime
from worklist.config import Settings
from worklist.services import messages

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
STORE_BATCH = 256
APPLY_POLL_SECONDS = 1.0
APPLY_MODES = ("thread", "process", "off")
"""Where stored messages are applied: a thread of this process (tests, embedding), a child
process (`serve_hl7`: its own GIL, so applying never slows an ACK), or not here at all."""
STORE_QUIET_SECONDS = 0.005
# Turns of the event loop the store writer gives before it takes its batch: frames already
# on their way (their senders just got an ACK) are read, parsed and join it. A turn costs
# microseconds; a batch costs a round trip and ~0.4 ms of CPU here and in the database
# (PostgreSQL) whatever its size. bench/ingest, 8 senders at full speed, PostgreSQL:
# ~4 -> ~6-8 frames a batch, listener CPU 0.30-0.32 -> 0.26-0.28 ms and database
# 0.09-0.11 -> 0.08-0.09 ms a message, ack 2,471-2,656 -> 2,686-2,796/s (alternating runs).
STORE_GATHER_TURNS = 3
APPLY_MAX_DEFER_SECONDS = 0.25
# The apply worker process (PostgreSQL) defers longer while the ACK path is at capacity
# (frames queue behind each commit: SATURATED_STORE_BATCH or more a batch, on average).
# Applying a message costs more CPU (~0.3 ms, and its backend's) than storing and
# acknowledging it, and on 2 cores that CPU is the ACK path's. bench/ingest, 4,000 ORMs at
# full speed from 8 senders (~4 frames a batch): deferring 0.25 s it applied 600-1,200 of
# them during the ~2 s burst (0.07-0.14 ms of its CPU a message of the burst); deferring
# 1 s, 200 (0.02 ms); it drains the rest at ~2,400/s once the frames stop (200 a batch in
# ~85 ms), so the applied rate stays ~1,000-1,200/s. Below saturation (800/s offered)
# it mostly defers 0.25 s as before (one 1 s wait in a 4 s run), so it keeps up with the
# traffic; saturated, it still applies a batch (200) a second or more.
APPLY_WORKER_MAX_DEFER_SECONDS = 1.0
SATURATED_STORE_BATCH = 2.0
# The store idle this long (no frame arriving): the apply thread takes bigger batches
# (`idle_apply_batch`), since no ACK is waiting behind SQLite's write lock.
STORE_IDLE_SECONDS = 0.25


_Pending = tuple["messages.Arrival", "messages.Verdict | None", "asyncio.Future[bytes]"]


@dataclass
class ListenerStats:
    """Counters for logs and the benchmark."""

    connections: int = 0
    frames: int = 0
    acks: int = 0
    oversize: int = 0
    junk_bytes: int = 0
    store_batches: int = 0
    store_failures: int = 0
    applied: int = 0


class MllpListener:
    """An asyncio MLLP server bound to one runtime (database, clock, settings)."""

    def __init__(
        self,
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        apply: bool | str = "thread",
        store_batch: int = STORE_BATCH,
        apply_batch: int | None = None,
        apply_workers: int = 1,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        mode = apply if isinstance(apply, str) else ("thread" if apply else "off")
        if mode not in APPLY_MODES:
            raise ValueError(f"apply must be one of {APPLY_MODES}, not {apply!r}")
        self.apply_mode: str = mode
        # Child processes applying in "process" mode, each serving a share of the trusts.
        self.apply_workers = max(1, apply_workers)
        self.store_batch = store_batch
        # Messages applied per transaction: 3 on SQLite, whose one write lock the store
        # writer waits for (measured: p99 ACK latency at 200/s offered fell from ~95 ms with
        # 10 to ~45 ms); 200 on PostgreSQL, where applying and storing do not block each
        # other (the Core apply path costs ~20 ms a batch on top of its messages: alone, 200
        # a batch applied ~1,950/s, 50 a batch ~640/s).
        self.apply_batch = apply_batch or (3 if runtime.dialect == "sqlite" else 200)
        # After a burst (no frame for STORE_IDLE_SECONDS) the backlog drains 100 a transaction
        # on SQLite (one commit and one re-prioritisation per 100 messages, not per 3); a
        # frame arriving meanwhile waits for at most one such batch (~0.05-0.1 s).
        self.idle_apply_batch = max(
            self.apply_batch, 100 if runtime.dialect == "sqlite" else self.apply_batch
        )
        self.directory = messages.TrustDirectory(runtime.settings)
        # The store writer's database connection is its own (`messages.store_writer`).
        self._writer = messages.store_writer(runtime, self.directory)
        # SQLite: the batch is stored in the event loop itself, not in a thread. Nothing there
        # waits on a disk (WAL, synchronous=NORMAL: a commit is ~0.1-1 ms), and the hand-off
        # to a thread and back cost more of the GIL than the store (bench/ingest: ack
        # 1,250-1,350/s -> 1,800-1,980/s, 0.72 -> 0.47 ms of listener CPU a message). While
        # the apply thread commits a batch, the loop waits for the write lock, as the ACKs did.
        self._store_inline = isinstance(self._writer, messages.SqliteStoreWriter)
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._wake_apply: asyncio.Event | None = None
        self._store_busy = False
        self._last_store_activity = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._signals: ApplySignals | None = None
        self._workers: list[multiprocessing.process.BaseProcess] = []

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._wake_apply = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._store_loop(), name="hl7-store"))
        if self.apply_mode == "thread":
            self._tasks.append(asyncio.create_task(self._apply_loop(), name="hl7-apply"))
        elif self.apply_mode == "process":
            context = multiprocessing.get_context("spawn")
            self._signals = ApplySignals.create(context)
            for index in range(self.apply_workers):
                worker = context.Process(
                    target=run_apply_worker,
                    args=(
                        self.settings,
                        self._signals,
                        self.apply_batch,
                        (index, self.apply_workers),
                    ),
                    name=f"hl7-apply-{index}",
                    daemon=True,
                )
                worker.start()
                self._workers.append(worker)
        self._server = await asyncio.start_server(
            self._on_connection,
            self.host,
            self.requested_port,
            ssl=self.ssl_context,
            limit=READ_CHUNK,
        )
        logger.info(
            "HL7 MLLP listener on %s:%s%s",
            self.host,
            self.port,
            " (TLS)" if self.ssl_context else "",
        )

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop accepting, let connections finish the frame in hand, then stop the workers."""
        if self._server is not None:
            self._server.close()
        if self._connections:
            for task in list(self._connections):
                task.cancel()
            await asyncio.wait(list(self._connections), timeout=grace)
        if self._server is not None:
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        self._writer.close()
        if isinstance(self._writer, messages.PostgresStoreWriter):
            await self._writer.close_async()
        if self._workers and self._signals is not None:
            self._signals.stop.set()
            self._signals.wake.set()
            for worker in self._workers:
                await asyncio.to_thread(worker.join, grace)
                if worker.is_alive():
                    worker.terminate()
            self._workers.clear()

    async def drain(self, timeout: float = 30.0) -> None:
        """Return once everything stored so far is applied (tests, shutdown).

        Another worker (this listener's own, or another process's on PostgreSQL)
        may hold some rows, so this waits until none is left in ``received``.
        """

        async def _run() -> None:
            while True:
                if self.apply_mode != "process" and await asyncio.to_thread(self._apply_batch) > 0:
                    continue
                if await asyncio.to_thread(self._pending) == 0:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(_run(), timeout)

    # --- connections ---

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError, asyncio.CancelledError):
                pass

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else None
        self.stats.connections += 1
        decoder = MllpDecoder(self.settings.hl7_max_message_bytes)
        idle = self.settings.hl7_idle_timeout_seconds
        logger.debug("HL7 connection from %s", peer)
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                logger.info("HL7 connection from %s idle for %ss: closing", peer, idle)
                break
            except (ConnectionError, ssl.SSLError) as exc:
                logger.info("HL7 connection from %s broke: %s", peer, exc)
                break
            if not data:
                if decoder.in_frame:
                    logger.warning(
                        "HL7 peer %s closed mid-message (%s bytes unacknowledged, not stored)",
                        peer,
                        decoder.pending_bytes,
                    )
                break
            junk_before = decoder.junk_bytes
            events = decoder.feed(data)
            if decoder.junk_bytes != junk_before:
                self.stats.junk_bytes += decoder.junk_bytes - junk_before
                logger.info(
                    "HL7 peer %s: skipped %s bytes outside frames",
                    peer,
                    decoder.junk_bytes - junk_before,
                )
            for event in events:
                ack = await self._submit(event, peer)
                try:
                    writer.write(frame(ack))
                    await writer.drain()
                except (ConnectionError, ssl.SSLError) as exc:
                    # Stored already: the sender's retry will be answered as a duplicate.
                    logger.info("HL7 peer %s left before its ACK: %s", peer, exc)
                    return
                self.stats.acks += 1

    async def _submit(self, event: Frame | Oversize, peer: str | None) -> bytes:
        if isinstance(event, Frame) and is_batch(event.payload):
            return await self._submit_batch(event.payload, peer)
        return await self._submit_one(event, peer)

    async def _submit_batch(self, payload: bytes, peer: str | None) -> bytes:
        """An FHS/BHS batch is processed message by message: each is stored (and
        duplicate-checked) on its own, and one batch of ACKs goes back. A batch with
        no MSH, or content before its first MSH, is refused whole (AR) by the store."""
        try:
            parts = split_batch(payload)
        except Hl7Error:
            return await self._submit_one(Frame(payload), peer)
        acks = [await self._submit_one(Frame(part), peer) for part in parts]
        return build_batch_ack(
            payload,
            acks,
            now=self.runtime.clock.now(),
            sending_application=self.settings.hl7_application,
            sending_facility=self.settings.hl7_facility,
        )

    async def _submit_one(self, event: Frame | Oversize, peer: str | None) -> bytes:
        assert self._queue is not None
        now = self.runtime.clock.now()
        if isinstance(event, Oversize):
            self.stats.oversize += 1
            arrival = messages.Arrival(
                payload=event.head, peer=peer, received_at=now, oversize_bytes=event.size
            )
        else:
            self.stats.frames += 1
            arrival = messages.Arrival(payload=event.payload, peer=peer, received_at=now)
        # Parse, check and build the ACK here, while the store waits on the database for
        # the previous batch (PostgreSQL: CPU and I/O overlap).
        verdict = messages.prepare(arrival, directory=self.directory, now=now)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        await self._queue.put((arrival, verdict, future))
        return await future

    # --- store writer (group commit) ---

    async def _store_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            self._set_store_busy(True)
            for _ in range(STORE_GATHER_TURNS):
                await asyncio.sleep(0)  # frames arriving meanwhile join this batch
            while len(batch) < self.store_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            arrivals = [a for a, _, _ in batch]
            if self._signals is not None:
                average = self._signals.frames_per_batch
                average.value = 0.9 * average.value + 0.1 * len(batch)
            verdicts = [v for _, v, _ in batch]
            try:
                if isinstance(self._writer, messages.PostgresStoreWriter):
                    outcomes = await self._writer.store_async(
                        arrivals, verdicts, self.runtime.clock.now()
                    )
                    acks = [o.ack for o in outcomes]
                elif self._store_inline:
                    acks = self._store_batch(arrivals, verdicts)
                else:
                    acks = await asyncio.to_thread(self._store_batch, arrivals, verdicts)
            except asyncio.CancelledError:
                for _, _, future in batch:
                    if not future.done():
                        future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - the database is down or refused the batch
                self.stats.store_failures += 1
                logger.exception("storing %s HL7 message(s) failed; answering AR", len(batch))
                acks = [self._unavailable_ack(a, exc) for a in arrivals]
            else:
                self.stats.store_batches += 1
                if self._wake_apply is not None:
                    self._wake_apply.set()
                if self._signals is not None:
                    self._signals.wake.set()
            for (_, _, future), ack in zip(batch, acks, strict=True):
                if not future.done():
                    future.set_result(ack)
            self._set_store_busy(False)

    def _set_store_busy(self, busy: bool) -> None:
        self._store_busy = busy
        self._last_store_activity = time.monotonic()
        if self._signals is not None:
            self._signals.busy.value = int(busy)
            self._signals.last_activity.value = time.time()

    def _store_batch(
        self,
        arrivals: list[messages.Arrival],
        verdicts: list[messages.Verdict | None] | None = None,
    ) -> list[bytes]:
        outcomes = self._writer.store(
            arrivals, verdicts or [None] * len(arrivals), self.runtime.clock.now()
        )
        return [o.ack for o in outcomes]

    def _unavailable_ack(self, arrival: messages.Arrival, exc: Exception) -> bytes:
        try:
            header = read_header(arrival.payload)
        except Hl7Error:
            header = minimal_header()
        error = ServiceUnavailable(f"message not stored ({type(exc).__name__}); please resend")
        return build_error_ack(
            header,
            error,
            now=self.runtime.clock.now(),
            sending_application=self.settings.hl7_application,
            sending_facility=self.settings.hl7_facility,
        )

    # --- apply worker ---

    def _apply_batch(self) -> int:
        limit = self.apply_batch
        idle = time.monotonic() - self._last_store_activity >= STORE_IDLE_SECONDS
        if idle and not self._store_busy and self._queue is not None and self._queue.empty():
            limit = self.idle_apply_batch
        with self.runtime.session() as session:
            taken = messages.apply_pending(
                session,
                directory=self.directory,
                now=self.runtime.clock.now(),
                limit=limit,
            )
        self.stats.applied += taken
        return taken

    def _pending(self) -> int:
        with self.runtime.session() as session:
            return messages.count_pending(session)

    async def _yield_to_store(self) -> None:
        """Let ACKs go first: wait until the store writer has been quiet for a moment.

        Applying holds the database (SQLite's single write lock; the GIL either
        way), so during a burst applying waits, but never more than
        `APPLY_MAX_DEFER_SECONDS`, so it keeps up under steady load.
        """
        deadline = time.monotonic() + APPLY_MAX_DEFER_SECONDS
        while time.monotonic() < deadline:
            assert self._queue is not None
            quiet = time.monotonic() - self._last_store_activity
            if not self._store_busy and self._queue.empty() and quiet >= STORE_QUIET_SECONDS:
                return
            await asyncio.sleep(STORE_QUIET_SECONDS)

    async def _apply_loop(self) -> None:
        assert self._wake_apply is not None
        while True:
            try:
                while True:
                    await self._yield_to_store()
                    if await asyncio.to_thread(self._apply_batch) == 0:
                        break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the worker alive; retry on the next tick
                logger.exception("applying stored HL7 messages failed; retrying")
                await asyncio.sleep(APPLY_POLL_SECONDS)
            self._wake_apply.clear()
            try:
                await asyncio.wait_for(self._wake_apply.wait(), APPLY_POLL_SECONDS)
            except TimeoutError:
                pass


@dataclass
class ApplySignals:
    """What the listener and its apply worker process share: wake-up, stop and store activity
    (busy now, last active, and frames per store batch: a moving average, weight 0.1)."""

    wake: Any
    stop: Any
    busy: Any
    last_activity: Any
    frames_per_batch: Any

    @classmethod
    def create(cls, context: Any) -> ApplySignals:
        return cls(
            wake=context.Event(),
            stop=context.Event(),
            busy=context.Value("b", 0, lock=False),
            last_activity=context.Value("d", 0.0, lock=False),
            frames_per_batch=context.Value("d", 0.0, lock=False),
        )

    def wait_for_quiet_store(self) -> None:
        """As `MllpListener._yield_to_store`, across processes; for up to
        `APPLY_WORKER_MAX_DEFER_SECONDS` while the store is saturated."""
        began = time.monotonic()
        while not self.stop.is_set():
            saturated = self.frames_per_batch.value >= SATURATED_STORE_BATCH
            limit = APPLY_WORKER_MAX_DEFER_SECONDS if saturated else APPLY_MAX_DEFER_SECONDS
            if time.monotonic() - began >= limit:
                return
            quiet = time.time() - self.last_activity.value
            if not self.busy.value and quiet >= STORE_QUIET_SECONDS:
                return
            time.sleep(STORE_QUIET_SECONDS)


def run_apply_worker(
    settings: Settings, signals: ApplySignals, batch: int, partition: tuple[int, int] = (0, 1)
) -> None:
    """The apply worker as its own process: its own GIL, so applying (CPU-heavy ORM
    work) never delays an ACK; it applies in arrival order until told to stop."""
    from worklist.bootstrap import build_runtime

    try:
        os.nice(
            10
        )  # background work: the scheduler gives the listener (and the database) the CPU first
    except OSError:
        pass
    runtime = build_runtime(settings)
    directory = messages.TrustDirectory(settings)
    parent = multiprocessing.parent_process()
    try:
        while not signals.stop.is_set():
            if parent is not None and not parent.is_alive():
                break  # the listener died (e.g. SIGKILL): its successor starts a new worker
            signals.wait_for_quiet_store()
            try:
                with runtime.session() as session:
                    taken = messages.apply_pending(
                        session,
                        directory=directory,
                        now=runtime.clock.now(),
                        limit=batch,
                        partition=partition,
                    )
            except Exception:  # noqa: BLE001 - keep the worker alive; retry shortly
                logger.exception("applying stored HL7 messages failed; retrying")
                time.sleep(APPLY_POLL_SECONDS)
                continue
            if taken == 0:
                signals.wake.wait(APPLY_POLL_SECONDS)
                signals.wake.clear()
    finally:
        runtime.dispose()


def ssl_context_for(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listener from the settings (WORKLIST_HL7_TLS_CERT / _KEY: server certificate
    and key; WORKLIST_HL7_TLS_CLIENT_CA: if set, clients must present a certificate it signed)."""
    if not settings.hl7_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.hl7_tls_cert, settings.hl7_tls_key or None)
    if settings.hl7_tls_client_ca:
        context.load_verify_locations(settings.hl7_tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_hl7(
    runtime: Runtime,
    host: str,
    port: int,
    *,
    ready: threading.Event | Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
    ssl_context: ssl.SSLContext | None = None,
    apply: str | None = None,
    apply_workers: int | None = None,
) -> None:
    """Run the MLLP listener until `stop` is set (blocking; call from a thread or a process).

    `ready` is set (or called with the bound port) once the socket listens. TLS
    comes from `ssl_context`, else from the settings (WORKLIST_HL7_TLS_*).
    Stored messages are applied by a child process (`apply="process"`, the default
    on PostgreSQL), or a thread of this one (`"thread"`, the default on SQLite: a
    second process would fight the listener for SQLite's one write lock, whose
    busy-wait backs off in sleeps of up to 100 ms), or elsewhere (`"off"`).
    """
    if apply is None:
        apply = "thread" if runtime.dialect == "sqlite" else "process"
    if apply_workers is None:
        apply_workers = runtime.settings.hl7_apply_workers
    context = ssl_context if ssl_context is not None else ssl_context_for(runtime.settings)

    async def main() -> None:
        listener = MllpListener(
            runtime, host, port, ssl_context=context, apply=apply, apply_workers=apply_workers
        )
        await listener.start()
        if isinstance(ready, threading.Event):
            ready.set()
        elif ready is not None:
            ready(listener.port)
        try:
            while stop is None or not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await listener.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed, else None (asyncio's own).

    The listener's process is CPU-bound in a burst; uvloop does the loop's own work
    (reads, writes, wake-ups) in C: bench/ingest on PostgreSQL, 0.33 -> 0.31 ms of
    listener CPU a message, ~7 % more ACKs a second. psycopg's AsyncConnection (the
    PostgreSQL store) runs on it as is.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
