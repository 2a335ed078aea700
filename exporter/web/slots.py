"""Connection slots of the web server: whole-request deadlines and who gives up a slot when all are taken.

Slowloris (issue 13): `--web.read-timeout` used to bound each `recv`, so a client sending one byte every
few seconds kept its slot forever, and 64 such clients kept kubelet's probes out until the pod was
restarted. Here:

- a request's line and headers must be complete within `--web.read-timeout` of its first byte (for a new
  connection: of the accept, TLS handshake included); each `recv` waits only for what is left of that;
- between keep-alive requests a connection may be silent for `--web.idle-timeout`;
- when every slot is taken, a new connection takes the slot of the connection that has been reading a
  request the longest and never completed one (a slow or silent client), else of the longest-idle
  connection that completed one request, else of the longest-idle one that completed several; a
  connection that is writing a response is never closed. So a kubelet probe (a new connection that sends
  its request at once) gets a slot during an attack, and Prometheus's keep-alive connection, which
  completes a request every scrape interval, is the last to go.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable

from exporter.core import logs

log = logs.get("web")
LOG_INTERVAL = 10.0

READING, BUSY, IDLE = "reading", "busy", "idle"


class Conn:
    """One accepted connection; `sock` becomes the TLS socket after the handshake."""

    __slots__ = ("deadline", "evicted", "requests", "since", "sock", "state")

    def __init__(self, sock: socket.socket, read_timeout: float) -> None:
        now = time.monotonic()
        self.sock = sock
        self.state = READING
        self.since = now                             # when the current state began
        self.deadline: float | None = now + read_timeout  # request (and handshake) complete by then
        self.requests = 0                            # requests completed on this connection
        self.evicted = False

    def request_parsed(self) -> None:
        self.state, self.deadline = BUSY, None

    def response_sent(self) -> None:
        self.requests += 1
        self.state, self.since, self.deadline = IDLE, time.monotonic(), None


def victim(conns: Iterable[Conn]) -> Conn | None:
    """The connection to close so a new one can be served, or None (every connection is writing)."""
    candidates = [c for c in conns if c.state != BUSY and not c.evicted]
    if not candidates:
        return None
    # Never completed a request first (slow/silent clients), then connections with one request, then
    # proven keep-alive clients (Prometheus reuses its connection every scrape); oldest state first.
    return min(candidates, key=lambda c: (min(c.requests, 2), c.since))


class Evictions:
    """Closes evicted connections and counts them (by state) and request timeouts; logs at most once per
    LOG_INTERVAL."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.by_state = {READING: 0, IDLE: 0}
        self.request_timeouts = 0
        self._lock = threading.Lock()
        self._logged = 0
        self._last_log = 0.0

    def close(self, conn: Conn) -> None:
        """Close `conn` (its thread wakes from recv and ends): its slot goes to a new connection."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        now = time.monotonic()
        with self._lock:
            self.by_state[conn.state] = self.by_state.get(conn.state, 0) + 1
            total = sum(self.by_state.values())
            should_log = now - self._last_log >= LOG_INTERVAL
            if should_log:
                self._last_log = now
                n, self._logged = total - self._logged, total
        if should_log:
            log.warning("connection limit reached (%d open, --web.max-connections); closed %d slow or idle "
                        "connection(s) to serve new ones", self.max_connections, n)

    def count_timeout(self) -> None:
        with self._lock:
            self.request_timeouts += 1

    def counts(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.by_state), self.request_timeouts


class RequestTimeout(TimeoutError):
    """The request's line and headers were not complete within --web.read-timeout."""


class DeadlineReader(io.RawIOBase):
    """The handler's raw input: each recv waits for what is left of the request deadline, or, before a
    keep-alive request's first byte, for the idle timeout."""

    def __init__(self, conn: Conn, read_timeout: float, idle_timeout: float) -> None:
        self.conn = conn
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        conn = self.conn
        sock = conn.sock
        if conn.deadline is None:  # between requests
            sock.settimeout(self.idle_timeout)
            n = sock.recv_into(buffer)
            if n:  # a new request begins: its headers are due within the read timeout
                conn.state, conn.since = READING, time.monotonic()
                conn.deadline = conn.since + self.read_timeout
            return n
        remaining = conn.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            raise RequestTimeout("request not complete within --web.read-timeout")
        sock.settimeout(remaining)
        try:
            return sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise RequestTimeout("request not complete within --web.read-timeout") from None


def handshake(conn: Conn, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """TLS handshake bounded as a whole by the connection's deadline (a trickled ClientHello too)."""
    tls = ctx.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
    conn.sock = tls  # owns the file descriptor now: evicting or shutting down must reach this one
    tls.setblocking(False)
    deadline = conn.deadline if conn.deadline is not None else time.monotonic()
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            want_read = True
        except ssl.SSLWantWriteError:
            want_read = False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS handshake not complete within --web.read-timeout")
        r, w, _ = select.select([tls] if want_read else [], [] if want_read else [tls], [], remaining)
        if not r and not w:
            raise TimeoutError("TLS handshake not complete within --web.read-timeout")
    tls.setblocking(True)
    return tls
