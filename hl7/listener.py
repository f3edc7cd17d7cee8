"""The MLLP listener: frames in, durable store, ACK out; a worker applies what was stored.

One asyncio server serves many connections. On each connection frames are
handled strictly in order: a frame's ACK is written only after the message is
committed to the database, and the next frame is not looked at before that.
Three coroutines do the work:

* one per connection (`_serve_connection`): reads with an idle timeout, feeds
  `hl7.mllp.MllpDecoder` (junk skipped and counted, oversize frames answered
  with AR and the connection kept), hands each frame to the store writer and
  writes the ACK it gets back;
* the store writer (`_store_loop`): takes every frame waiting from any
  connection, stores them in one transaction (group commit: one fsync for the
  batch) through `worklist.services.messages.store_messages`, then releases
  their ACKs. If the database is down, nothing is stored and each sender gets
  AR 207 ("resend later"): no ACK is ever sent for a message not on disk;
* the apply worker (`_apply_loop`): applies stored messages in arrival order,
  in batches, off the ACK path (the ACK waits only for the durable write). At
  start it first drains anything stored but not applied before a crash.

Optional TLS (`ssl_context`, with client certificates if the context requires
them) and the per-trust source-address allowlist (checked by the store) guard
who may send.

Entry points: `MllpListener` (async start/stop, for tests and embedding) and
`serve_hl7(runtime, host, port, *, ready=None, stop=None, ssl_context=None)`,
the blocking call behind `worklist hl7-listen` and `worklist serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hl7.ack import build_error_ack, minimal_header
from hl7.er7 import read_header
from hl7.errors import Hl7Error, ServiceUnavailable
from hl7.mllp import Frame, MllpDecoder, Oversize, frame
from worklist.bootstrap import Runtime
from worklist.services import messages

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
STORE_BATCH = 256
APPLY_POLL_SECONDS = 1.0


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
        apply: bool = True,
        store_batch: int = STORE_BATCH,
        apply_batch: int = messages.APPLY_BATCH,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.apply_enabled = apply
        self.store_batch = store_batch
        self.apply_batch = apply_batch
        self.directory = messages.TrustDirectory(runtime.settings)
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._queue: asyncio.Queue[tuple[messages.Arrival, asyncio.Future[bytes]]] | None = None
        self._wake_apply: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._wake_apply = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._store_loop(), name="hl7-store"))
        if self.apply_enabled:
            self._tasks.append(asyncio.create_task(self._apply_loop(), name="hl7-apply"))
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.requested_port, ssl=self.ssl_context,
            limit=READ_CHUNK,
        )
        logger.info("HL7 MLLP listener on %s:%s%s", self.host, self.port, " (TLS)" if self.ssl_context else "")

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

    async def drain(self, timeout: float = 30.0) -> None:
        """Return once everything stored so far is applied (tests, shutdown).

        Another worker (this listener's own, or another process's on PostgreSQL)
        may hold some rows, so this waits until none is left in ``received``.
        """
        async def _run() -> None:
            while True:
                if await asyncio.to_thread(self._apply_batch) > 0:
                    continue
                if await asyncio.to_thread(self._pending) == 0:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(_run(), timeout)

    # --- connections ---

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else None
        self.stats.connections += 1
        decoder = MllpDecoder(self.settings.hl7_max_message_bytes)
        idle = self.settings.hl7_idle_timeout_seconds
        logger.debug("HL7 connection from %s", peer)
        while True:
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout=idle)
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
                        peer, decoder.pending_bytes,
                    )
                break
            junk_before = decoder.junk_bytes
            events = decoder.feed(data)
            if decoder.junk_bytes != junk_before:
                self.stats.junk_bytes += decoder.junk_bytes - junk_before
                logger.info("HL7 peer %s: skipped %s bytes outside frames", peer, decoder.junk_bytes - junk_before)
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
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        await self._queue.put((arrival, future))
        return await future

    # --- store writer (group commit) ---

    async def _store_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.store_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            arrivals = [a for a, _ in batch]
            try:
                acks = await asyncio.to_thread(self._store_batch, arrivals)
            except asyncio.CancelledError:
                for _, future in batch:
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
            for (_, future), ack in zip(batch, acks, strict=True):
                if not future.done():
                    future.set_result(ack)

    def _store_batch(self, arrivals: list[messages.Arrival]) -> list[bytes]:
        with self.runtime.session() as session:
            outcomes = messages.store_messages(
                session, arrivals, directory=self.directory, now=self.runtime.clock.now()
            )
        return [o.ack for o in outcomes]

    def _unavailable_ack(self, arrival: messages.Arrival, exc: Exception) -> bytes:
        try:
            header = read_header(arrival.payload)
        except Hl7Error:
            header = minimal_header()
        error = ServiceUnavailable(f"message not stored ({type(exc).__name__}); please resend")
        return build_error_ack(
            header, error, now=self.runtime.clock.now(),
            sending_application=self.settings.hl7_application,
            sending_facility=self.settings.hl7_facility,
        )

    # --- apply worker ---

    def _apply_batch(self) -> int:
        with self.runtime.session() as session:
            taken = messages.apply_pending(
                session, directory=self.directory, now=self.runtime.clock.now(), limit=self.apply_batch
            )
        self.stats.applied += taken
        return taken

    def _pending(self) -> int:
        with self.runtime.session() as session:
            return messages.count_pending(session)

    async def _apply_loop(self) -> None:
        assert self._wake_apply is not None
        while True:
            try:
                while await asyncio.to_thread(self._apply_batch) > 0:
                    pass
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


def ssl_context_from_env(environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """TLS for the listener from WORKLIST_HL7_TLS_CERT / _KEY (server certificate and key),
    WORKLIST_HL7_TLS_CLIENT_CA (if set, clients must present a certificate it signed)."""
    env = os.environ if environ is None else environ
    cert = env.get("WORKLIST_HL7_TLS_CERT")
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, env.get("WORKLIST_HL7_TLS_KEY") or None)
    client_ca = env.get("WORKLIST_HL7_TLS_CLIENT_CA")
    if client_ca:
        context.load_verify_locations(client_ca)
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
) -> None:
    """Run the MLLP listener until `stop` is set (blocking; call from a thread or a process).

    `ready` is set (or called with the bound port) once the socket listens. TLS
    comes from `ssl_context`, else from the WORKLIST_HL7_TLS_* environment.
    """
    context = ssl_context if ssl_context is not None else ssl_context_from_env()

    async def main() -> None:
        listener = MllpListener(runtime, host, port, ssl_context=context)
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

    asyncio.run(main())
