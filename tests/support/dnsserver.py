"""An in-process DNS server (dnspython wire format, UDP and TCP on one loopback port) with programmable
misbehaviour, for the probe tests' edge cases: answers, error rcodes, silence, half-answered pairs,
answers only to retransmissions, truncation, stray replies (wrong id, wrong question, other source
address or port), raw bytes, and delays.

It runs one thread with a selector and a timer heap, so delayed answers never block other queries.
Every query received is logged (`queries`) with its transport, source port, id and type, so a test can
check what the prober put on the wire (one source port for a parallel pair, a fresh one per query in
sequential mode).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

A_ANSWER = "192.0.2.1"
AAAA_ANSWER = "2001:db8::1"

# Sends raw bytes as a reply: (query message, query wire) -> list of payloads to send before the answer.
ReplyHook = Callable[[dns.message.Message, bytes], list[bytes]]


@dataclass
class Behaviour:
    """How the server treats a query. The defaults answer every A/AAAA query at once."""

    rcode: int = dns.rcode.NOERROR
    only: str | None = None          # "A" or "AAAA": answer this type only, ignore the other
    silent: bool = False             # never answer (UDP and TCP)
    ignore_first: int = 0            # ignore the first N copies of each UDP query (answer retransmissions)
    ignore_qtype: str | None = None  # ... of this query type only
    truncate: bool = False           # UDP answers carry TC and no records; TCP answers normally
    tcp: bool = True                 # serve TCP; False closes the listener (connection refused)
    wrong_id: bool = False           # before the real answer, send one with another id
    wrong_question: bool = False     # before the real answer, send one for another name
    other_port: bool = False         # before the real answer, send a copy from another source port
    other_address: bool = False      # before the real answer, send a copy from 127.0.0.2
    extra: ReplyHook | None = None   # raw payloads sent (from the server port) before the real answer
    suppress_answer: bool = False    # send only what `extra` returns, no real answer
    delay: float = 0.0               # seconds before answering
    names: tuple[str, ...] | None = None  # only these names exist (NXDOMAIN for others); None: every name
    tcp_delay: float = 0.0           # seconds before answering over TCP
    loss: float = 0.0                # ignore each UDP query with this probability (uniform loss)
    pair_loss: float = 0.0           # ignore a UDP query that came < 5 ms after another from the same port
                                     # with this probability (the conntrack race: only paired packets lose)
    seed: int | None = None          # for loss / pair_loss


@dataclass
class QueryLog:
    transport: str
    src: tuple[str, int]
    id: int
    qtype: str
    at: float


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)


class DnsServer:
    """`with DnsServer() as s:` serves on `s.host`, `s.port` (UDP and TCP) until the block ends."""

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour or Behaviour()
        self.host = host
        self._want_port = port  # 0: any free port; 53 where a resolv.conf must name the server
        self.queries: list[QueryLog] = []
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, str], int] = {}
        self._last_from: dict[tuple[str, int], float] = {}  # client address -> time of its last UDP query
        self._rng = random.Random(self.behaviour.seed)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._sel = selectors.DefaultSelector()
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.udp, self.tcp_listener = self._bind()
        self.port: int = self.udp.getsockname()[1]
        self._tcp_open = True
        self._sel.register(self.udp, selectors.EVENT_READ, self._on_udp)
        self._sel.register(self.tcp_listener, selectors.EVENT_READ, self._on_accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._conns: dict[int, _Conn] = {}
        self._thread = threading.Thread(target=self._run, name="dnsserver", daemon=True)

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self._want_port))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError("no free port for UDP and TCP together")

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(5)
        for c in list(self._conns.values()):
            c.sock.close()
        for s in (self.udp, self.tcp_listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set(self, **changes: Any) -> None:
        """Change the behaviour (thread-safe enough: one attribute swap)."""
        b = Behaviour(**{**self.behaviour.__dict__, **changes})
        self.behaviour = b
        if not b.tcp and self._tcp_open:
            closed = threading.Event()

            def close() -> None:
                self._close_tcp()
                closed.set()

            self._call(close)
            closed.wait(5)

    def wait_idle(self, timeout: float = 2.0) -> None:
        """Wait until the server holds no TCP connection (the client closed; the server saw EOF)."""
        deadline = time.monotonic() + timeout
        while self._conns and time.monotonic() < deadline:
            time.sleep(0.005)

    def logged(self, transport: str | None = None) -> list[QueryLog]:
        with self._lock:
            return [q for q in self.queries if transport is None or q.transport == transport]

    # event loop ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], None], delay: float = 0.0) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        self._wake()

    def _on_wake(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.recv(4096)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else 0.5
            for key, _ in self._sel.select(timeout):
                key.data(key.fileobj)
            now = time.monotonic()
            due: list[Callable[[], None]] = []
            with self._lock:
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for fn in due:
                with contextlib.suppress(OSError):
                    fn()

    def _close_tcp(self) -> None:
        if self._tcp_open:
            self._sel.unregister(self.tcp_listener)
            self.tcp_listener.close()
            self._tcp_open = False

    def _parse(self, wire: bytes, transport: str, peer: Any) -> tuple[dns.message.Message, str] | None:
        """Decode a query and log it; None for bytes that are no DNS message (ignored, as a server would)."""
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            return None
        qtype = dns.rdatatype.to_text(q.question[0].rdtype) if q.question else "?"
        with self._lock:
            self.queries.append(QueryLog(transport, peer, q.id, qtype, time.monotonic()))
        return q, qtype

    # UDP -----------------------------------------------------------------------------------------
    def _on_udp(self, sock: socket.socket) -> None:
        try:
            wire, src = sock.recvfrom(65535)
        except OSError:
            return
        b = self.behaviour
        parsed = self._parse(wire, "udp", src)
        if parsed is None:
            return
        q, qtype = parsed
        with self._lock:
            n = self._seen[(q.id, qtype)] = self._seen.get((q.id, qtype), 0) + 1
        if b.silent or (b.only is not None and qtype != b.only):
            return
        if n <= b.ignore_first and (b.ignore_qtype is None or b.ignore_qtype == qtype):
            return
        now, before = time.monotonic(), self._last_from.get(src)
        self._last_from[src] = now
        if b.loss and self._rng.random() < b.loss:
            return
        if b.pair_loss and before is not None and now - before < 0.005 and self._rng.random() < b.pair_loss:
            return
        payloads: list[tuple[bytes, str]] = []  # (wire, from: "server" | "port" | "address")
        answer = self._answer(q, truncate=b.truncate)
        if b.wrong_id:
            bad = self._answer(q, truncate=b.truncate)
            bad.id = (q.id + 1) & 0xFFFF
            payloads.append((bad.to_wire(), "server"))
        if b.wrong_question:
            other = dns.message.make_query("wrong.example.", q.question[0].rdtype)
            other.id = q.id
            payloads.append((self._answer(other, truncate=False).to_wire(), "server"))
        if b.other_port:
            payloads.append((answer.to_wire(), "port"))
        if b.other_address:
            payloads.append((answer.to_wire(), "address"))
        if b.extra is not None:
            payloads += [(p, "server") for p in b.extra(q, wire)]
        if not b.suppress_answer:
            payloads.append((answer.to_wire(), "server"))
        self._call(lambda: self._send_udp(payloads, src), b.delay)

    def _send_udp(self, payloads: list[tuple[bytes, str]], dst: tuple[str, int]) -> None:
        for data, origin in payloads:
            if origin == "server":
                self.udp.sendto(data, dst)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.2" if origin == "address" else self.host, 0))
                    s.sendto(data, dst)

    def _answer(self, q: dns.message.Message, truncate: bool) -> dns.message.Message:
        b = self.behaviour
        r = dns.message.make_response(q)
        r.set_rcode(b.rcode)
        if b.names is not None and q.question and b.rcode == dns.rcode.NOERROR:
            known = {dns.name.from_text(n) for n in b.names}
            if q.question[0].name not in known:
                r.set_rcode(dns.rcode.NXDOMAIN)
                return r
        if truncate:
            r.flags |= dns.flags.TC
            return r
        if r.rcode() == dns.rcode.NOERROR and q.question:
            qq = q.question[0]
            if qq.rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(qq.name, 30, "IN", "A", A_ANSWER))
            elif qq.rdtype == dns.rdatatype.AAAA:
                r.answer.append(dns.rrset.from_text(qq.name, 30, "IN", "AAAA", AAAA_ANSWER))
        return r

    # TCP -----------------------------------------------------------------------------------------
    def _on_accept(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = _Conn(conn)
        self._sel.register(conn, selectors.EVENT_READ, self._on_tcp)

    def _drop(self, c: _Conn) -> None:
        self._conns.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    def _on_tcp(self, sock: socket.socket) -> None:
        c = self._conns.get(sock.fileno())
        if c is None:
            return
        try:
            data = sock.recv(65535)
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.buf += data
        while len(c.buf) >= 2:
            (n,) = struct.unpack("!H", c.buf[:2])
            if len(c.buf) < 2 + n:
                break
            wire = bytes(c.buf[2 : 2 + n])
            del c.buf[: 2 + n]
            self._tcp_query(c, wire)

    def _tcp_query(self, c: _Conn, wire: bytes) -> None:
        b = self.behaviour
        parsed = self._parse(wire, "tcp", c.sock.getpeername())
        if parsed is None:
            return
        q, qtype = parsed
        if b.silent or (b.only is not None and qtype != b.only):
            return
        out = []
        if b.wrong_id:
            bad = self._answer(q, truncate=False)
            bad.id = (q.id + 1) & 0xFFFF
            out.append(bad.to_wire())
        out.append(self._answer(q, truncate=False).to_wire())
        data = b"".join(struct.pack("!H", len(w)) + w for w in out)

        def send() -> None:
            if c.sock.fileno() >= 0:
                try:
                    c.sock.sendall(data)
                except OSError:
                    self._drop(c)

        self._call(send, b.tcp_delay or b.delay)
