"""MLLP client for the outbox: send one message to a RIS, wait for its ACK, time out.

One `MllpSender` keeps one connection per RIS endpoint (host, port, TLS) and
reuses it, as RIS engines expect (HL7-NOTES section 2: one connection, one ACK
per message before the next). Framing comes from `hl7.mllp` (``frame()`` and
`MllpDecoder`). Failures are raised as one of three exceptions so the delivery
service can decide what to do without reading socket errno values:

* `ConnectionRefused` - nobody listens (RIS down), or TLS was refused;
* `ConnectionLost` - reset, broken pipe, or closed before the ACK arrived;
* `AckTimeout` - connected, sent, but no complete ACK within the timeout.

Any failure closes that endpoint's connection; the next send reconnects.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from hl7.mllp import Frame, MllpDecoder, Oversize, frame

logger = logging.getLogger(__name__)

MAX_ACK_BYTES = 1024 * 1024


class SendError(Exception):
    """Delivery to the RIS failed before an ACK came back."""


class ConnectionRefused(SendError):
    """Could not connect (refused, unreachable, DNS, TLS handshake refused)."""


class ConnectionLost(SendError):
    """The connection was reset or closed before the ACK was read."""


class AckTimeout(SendError):
    """No complete ACK within the timeout; the RIS may or may not have the message."""


@dataclass(frozen=True)
class Endpoint:
    """Where one trust's RIS listens for our ORUs."""

    host: str
    port: int
    tls: bool = False
    tls_verify: bool = True
    tls_ca_file: str = ""
    server_hostname: str = ""  # for SNI and certificate checks; defaults to host

    def __str__(self) -> str:
        return f"{'mllps' if self.tls else 'mllp'}://{self.host}:{self.port}"


def _tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=endpoint.tls_ca_file or None)
    if not endpoint.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = MllpDecoder(max_message_bytes=MAX_ACK_BYTES)
        self.lock = threading.Lock()
        self.used = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class MllpSender:
    """Sends framed HL7 messages and returns the ACK payload. Thread-safe per endpoint:
    two sends to one endpoint queue on its connection; different endpoints run in parallel."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._connections: dict[Endpoint, _Connection] = {}
        self._locks: dict[Endpoint, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, endpoint: Endpoint) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(endpoint, threading.Lock())

    def _connect(self, endpoint: Endpoint) -> _Connection:
        try:
            raw = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=self.connect_timeout
            )
        except TimeoutError as exc:
            raise ConnectionRefused(f"{endpoint}: connect timed out") from exc
        except OSError as exc:
            raise ConnectionRefused(f"{endpoint}: {exc.strerror or exc}") from exc
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = raw
        if endpoint.tls:
            try:
                sock = _tls_context(endpoint).wrap_socket(
                    raw, server_hostname=endpoint.server_hostname or endpoint.host
                )
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                raise ConnectionRefused(f"{endpoint}: TLS handshake failed: {exc}") from exc
        return _Connection(sock)

    def send(self, endpoint: Endpoint, payload: bytes, *, timeout: float = 30.0) -> bytes:
        """Send one HL7 payload (unframed) and return the ACK's payload (unframed).

        A reused connection that the RIS closed while idle fails on first use; that
        one case is retried once on a fresh connection (at-least-once: the RIS
        de-duplicates by MSH-10, which is the same on the retry).
        """
        with self._lock_for(endpoint):
            conn = self._connections.get(endpoint)
            reused = conn is not None
            if conn is None:
                conn = self._connections[endpoint] = self._connect(endpoint)
            try:
                return self._exchange(conn, endpoint, payload, timeout)
            except ConnectionLost:
                self._drop(endpoint)
                if not reused:
                    raise
                logger.info("reused connection to %s was closed; reconnecting", endpoint)
            except SendError:
                self._drop(endpoint)
                raise
            conn = self._connections[endpoint] = self._connect(endpoint)
            try:
                return self._exchange(conn, endpoint, payload, timeout)
            except SendError:
                self._drop(endpoint)
                raise

    def _exchange(
        self, conn: _Connection, endpoint: Endpoint, payload: bytes, timeout: float
    ) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            conn.sock.settimeout(timeout)
            conn.sock.sendall(frame(payload))
        except TimeoutError as exc:
            raise AckTimeout(f"{endpoint}: send timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise ConnectionLost(f"{endpoint}: {exc.strerror or exc} while sending") from exc
        conn.used += 1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AckTimeout(f"{endpoint}: no ACK within {timeout:g}s")
            try:
                conn.sock.settimeout(remaining)
                chunk = conn.sock.recv(65536)
            except TimeoutError as exc:
                raise AckTimeout(f"{endpoint}: no ACK within {timeout:g}s") from exc
            except OSError as exc:
                raise ConnectionLost(f"{endpoint}: {exc.strerror or exc} awaiting ACK") from exc
            if not chunk:
                raise ConnectionLost(f"{endpoint}: connection closed before the ACK")
            for event in conn.decoder.feed(chunk):
                if isinstance(event, Frame):
                    return event.payload
                if isinstance(event, Oversize):
                    raise ConnectionLost(f"{endpoint}: ACK larger than {MAX_ACK_BYTES} bytes")

    def _drop(self, endpoint: Endpoint) -> None:
        conn = self._connections.pop(endpoint, None)
        if conn is not None:
            conn.close()

    def close(self, endpoint: Endpoint | None = None) -> None:
        """Close one endpoint's connection, or all of them."""
        with self._guard:
            targets = [endpoint] if endpoint is not None else list(self._connections)
        for ep in targets:
            with self._lock_for(ep):
                self._drop(ep)

    def __enter__(self) -> MllpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_once(endpoint: Endpoint, payload: bytes, *, timeout: float = 30.0) -> bytes:
    """Send one message on a fresh connection and close it (CLI and tests)."""
    with MllpSender() as sender:
        return sender.send(endpoint, payload, timeout=timeout)
