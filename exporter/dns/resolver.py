"""Synthetic A/AAAA lookups measured per query (the `mode` probes).

Three modes, each a wire shape the resolvers use, instrumented per query (what was lost, retried,
answered); what an application waits is the resolver models' job (`exporter.dns.models`):
- `parallel` (glibc and musl default): A and AAAA sent back to back from ONE UDP socket, so both
  packets share a source port and therefore one conntrack entry; replies are matched by id AND question.
  This is what loses a packet in the conntrack insert race behind kube-proxy's DNAT.
- `sequential`: A, then AAAA from a new socket (a per-query reference; glibc's single-request-reopen
  differs: `glibc-single-request-reopen`).
- `tcp`: both queries on one TCP connection, with a per-attempt timeout (glibc's use-vc has none:
  `glibc-use-vc`).

Resolver emulation (glibc `res_send.c`, `send_dg`/`send_vc`):
- A reply is accepted only if it comes from the server's address and port, carries the id of an
  outstanding query and echoes its question; anything else is ignored (glibc: `goto wait`) and counted
  as a `mismatch`, and the wait goes on, so the real answer is still accepted.
- After a per-attempt timeout, what is still unanswered is sent again on the SAME socket with the SAME
  id (glibc keeps the socket and the query buffer across tries), until `attempts` transmissions.
  Difference from glibc, deliberately: when only one of a parallel pair came back, glibc switches that
  resolver to single-request mode and re-sends both queries one after the other without counting a
  try; we re-send only the missing one. The application's wait is the same timeout plus one round
  trip, and the packet that went missing is the one we want to count.
- A socket error (ICMP port unreachable, TCP reset) ends the try at once; glibc then closes the socket
  and the next try opens a new one (new source port, possibly another DNAT backend). So do we; the
  query fails with reason `network` only when every attempt failed that way.
- SERVFAIL, REFUSED, NOTIMP, FORMERR and NXDOMAIN are final answers for their query (glibc moves to
  the next server rather than retransmitting; we probe one server).
- A truncated (TC) UDP reply is retried over TCP for that query; if TCP fails too the query fails with
  reason `truncated`.
- glibc `connect()`s its UDP socket, so the kernel drops replies from elsewhere before glibc sees them;
  we leave ours unconnected so stray replies can be counted, and set IP_RECVERR so that an ICMP port
  unreachable still surfaces as ECONNREFUSED, as it does for glibc.

The recorded duration runs from just before the first socket is opened to the arrival of the last
answer (or the moment the last query was given up): what the application waited, without the probe's
own parsing and clean-up after that arrival.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from exporter.discovery.ownports import OwnPorts

QTYPES = ("A", "AAAA")
MODES = ("parallel", "sequential", "tcp")

_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)

_RCODE_REASON = {
    dns.rcode.SERVFAIL: "servfail",
    dns.rcode.NXDOMAIN: "nxdomain",
    dns.rcode.REFUSED: "refused",
    dns.rcode.NOTIMP: "refused",
    dns.rcode.FORMERR: "formerr",
}


@dataclass
class QueryOutcome:
    """The fate of one query of a lookup. `reason` None means a NOERROR answer (possibly empty)."""

    qtype: str
    done: bool = False
    reason: str | None = None
    attempt: int = 0          # 0-based transmission whose reply ended it
    answers: int = 0          # answer records (0 with NOERROR = NODATA)
    first_reply: bool = False  # a reply (any) came back to the first transmission
    at: float = 0.0           # perf_counter() when it ended: its reply's arrival, or when it was given up


@dataclass
class ProbeResult:
    """One lookup of a name in one mode against one server."""

    mode: str
    duration: float = 0.0
    outcomes: dict[str, QueryOutcome] = field(default_factory=dict)
    mismatches: dict[str, int] = field(default_factory=dict)
    partial_lost: str | None = None  # parallel: the qtype lost on the first attempt while the other came back
    sent: int = 0                    # query messages put on the wire (retransmissions and TCP included)
    lone_sent: int = 0               # UDP transmissions that went out ALONE on their socket (no pair partner
    lone_lost: int = 0               # in flight: sequential mode, a parallel probe's re-send of a lost half)

    @property
    def ok(self) -> bool:
        return all(o.reason is None for o in self.outcomes.values())

    @property
    def heard(self) -> bool:
        """Whether the server said anything to any query (an error rcode too): it is there."""
        return any(o.reason not in ("timeout", "network") for o in self.outcomes.values())

    @property
    def retried(self) -> list[str]:
        """Query types answered only after a retransmission (the 5-second wait itself)."""
        return [q for q, o in self.outcomes.items() if o.done and o.reason is None and o.attempt > 0]

    def status(self) -> str:
        """The outcome as glibc's search loop sees it: ok, nodata, nxdomain, servfail or error."""
        if any(o.reason is None and o.answers > 0 for o in self.outcomes.values()):
            return "ok"
        first = self.outcomes.get("A") or next(iter(self.outcomes.values()))
        if first.reason is None and len(self.outcomes) > 1:
            first = self.outcomes["AAAA"]
        if first.reason is None:
            return "nodata"
        if first.reason in ("nxdomain", "servfail"):
            return first.reason
        return "error"


@dataclass
class _Query:
    qtype: str
    id: int
    msg: dns.message.Message  # the question (shared between lookups: its own id is not this query's)
    wire: bytes
    out: QueryOutcome
    via_tcp: bool = False  # handed over to TCP after a truncated reply


@functools.lru_cache(maxsize=256)
def _template(name: str, qtype: str) -> tuple[dns.message.Message, bytes]:
    msg = dns.message.make_query(name, qtype, use_edns=False, id=0)
    return msg, msg.to_wire()


def make_query(name: str, qtype: str, qid: int) -> tuple[dns.message.Message, bytes]:
    """The question (a message never to be changed) and the wire of a query for it with id `qid`: what
    dns.message.make_query(name, qtype, use_edns=False, id=qid).to_wire() gives, built once per name and
    type (the probes ask the same few questions every round)."""
    msg, wire = _template(name, qtype)
    return msg, struct.pack("!H", qid) + wire[2:]


def _make_queries(name: str, qtypes: tuple[str, ...]) -> list[_Query]:
    ids = random.sample(range(0x10000), len(qtypes))  # independent random ids, like res_nmkquery
    out = []
    for qid, qt in zip(ids, qtypes, strict=True):
        msg, wire = make_query(name, qt, qid)
        out.append(_Query(qt, qid, msg, wire, QueryOutcome(qt)))
    return out


def _same_host(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a.split("%")[0]), ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def parse_reply(data: bytes, require_qr: bool = False) -> dns.message.Message | None:
    """A DNS message from the wire, or None if it is garbage (or, with `require_qr`, not a response)."""
    try:
        msg = dns.message.from_wire(data)
        return msg if not require_qr or msg.flags & dns.flags.QR else None
    except Exception:
        pass
    # A truncated reply may be cut mid-record; its header and question are still usable.
    if len(data) >= 12 and struct.unpack_from("!H", data, 2)[0] & dns.flags.TC:
        try:
            return dns.message.from_wire(data, question_only=True)
        except Exception:
            return None
    return None


class _Exchange:
    """Matching of replies to the outstanding queries of one lookup."""

    def __init__(self, result: ProbeResult, queries: list[_Query], udp: bool) -> None:
        self.result = result
        self.queries = queries
        self.udp = udp  # over UDP, a query handed to TCP no longer takes UDP answers

    def mismatch(self, hint: str | None = None) -> None:
        if hint is None:
            waiting = [q.qtype for q in self.queries if not q.out.done]
            hint = waiting[0] if waiting else self.queries[0].qtype
        self.result.mismatches[hint] = self.result.mismatches.get(hint, 0) + 1

    def match(self, data: bytes) -> tuple[_Query, dns.message.Message] | None:
        """The query this reply answers, or None (counted as a mismatch unless a duplicate)."""
        msg = parse_reply(data)
        if msg is None or not msg.flags & dns.flags.QR:
            self.mismatch()
            return None
        by_id = [q for q in self.queries if q.id == msg.id]
        for q in by_id:
            if _same_question(q.msg, msg):
                if q.out.done or (self.udp and q.via_tcp):
                    return None  # a second answer to a retransmitted query: harmless, glibc ignores it too
                return q, msg
        hint = by_id[0].qtype if by_id else None
        if hint is None and msg.question:
            t = dns.rdatatype.to_text(msg.question[0].rdtype)
            hint = t if any(q.qtype == t for q in self.queries) else None
        self.mismatch(hint)
        return None


def _same_question(q: dns.message.Message, r: dns.message.Message) -> bool:
    if len(r.question) != 1:
        return False
    a, b = q.question[0], r.question[0]
    return bool(a.name == b.name and a.rdtype == b.rdtype and a.rdclass == b.rdclass)


def _finish(q: _Query, msg: dns.message.Message | None, attempt: int, reason: str | None = None,
            at: float = 0.0) -> None:
    q.out.done = True
    q.out.attempt = attempt
    q.out.at = at or time.perf_counter()
    if msg is not None:
        q.out.reason = _RCODE_REASON.get(msg.rcode(), "servfail" if msg.rcode() != dns.rcode.NOERROR else None)
        q.out.answers = sum(len(rr) for rr in msg.answer if rr.rdtype == q.msg.question[0].rdtype)
    else:
        q.out.reason = reason


def _udp_socket(v6: bool, own: OwnPorts | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        register_own(sock, socket.IPPROTO_UDP, own)
    except OSError:
        sock.close()
        raise
    return sock


def register_own(sock: socket.socket, proto: int, own: OwnPorts | None) -> None:
    """Bind to an ephemeral port (as the first send would) and name it before any packet leaves, so the
    passive flow accounting knows this flow is the exporter's own (`exporter.discovery.ownports`)."""
    if own is not None:
        try:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError:
            return  # the send fails too, or binds implicitly: then the flow is counted as a real client's
        own.register(proto, sock.getsockname()[1])


class TcpConn:
    """DNS over TCP on a plain non-blocking socket: length-prefixed messages (RFC 1035 4.2.2), read with the
    event loop's socket calls. (asyncio's streams cost a transport, a protocol and a reader per connection:
    a fifth of the CPU of a TCP probe.) A connection per attempt; `close()` closes the socket at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()

    @classmethod
    async def open(cls, host: str, port: int, own: OwnPorts | None) -> TcpConn:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            register_own(sock, socket.IPPROTO_TCP, own)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, wires: list[bytes]) -> None:
        await self._loop.sock_sendall(self.sock, b"".join(_U16(len(w)) + w for w in wires))

    async def read_message(self) -> bytes:
        """The next message; IncompleteReadError if the server closes the connection before its end."""
        (n,) = struct.unpack("!H", await self._exactly(2))
        return await self._exactly(n)

    async def _exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            data = await self._loop.sock_recv(self.sock, 65537)
            if not data:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += data
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def close(self) -> None:
        self.sock.close()


_U16 = struct.Struct("!H").pack


async def _udp(host: str, port: int, queries: list[_Query], timeout: float, attempts: int,
               result: ProbeResult, own: OwnPorts | None = None) -> None:
    """Send the queries back to back from one UDP socket; retransmit the unanswered ones per attempt.

    After a timeout the socket is kept (same source port, same conntrack entry, same DNAT backend);
    after a socket error (ICMP port unreachable) glibc closes it (`close_and_return_error`) and the next
    try opens a new one: a new source port, so kube-proxy's DNAT may pick another backend.
    """
    loop = asyncio.get_running_loop()
    v6 = ":" in host
    dest = (host, port)
    ex = _Exchange(result, queries, udp=True)
    tcp_tasks: list[asyncio.Task[None]] = []
    sock: socket.socket | None = None
    error = False  # the last attempt ended in a socket error rather than a timeout
    try:
        for attempt in range(attempts):
            pending = [q for q in queries if not q.out.done and not q.via_tcp]
            if not pending:
                break
            if sock is None:
                sock = _udp_socket(v6, own)
            error = False
            try:
                for q in pending:
                    await loop.sock_sendto(sock, q.wire, dest)
                    result.sent += 1
            except OSError:
                error = True
            deadline = loop.time() + timeout
            while not error and any(not q.out.done and not q.via_tcp for q in queries):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        data, src = await loop.sock_recvfrom(sock, 65535)
                    arrived = time.perf_counter()
                except TimeoutError:
                    break
                except OSError:  # ICMP unreachable (IP_RECVERR), no route, ...
                    error = True
                    break
                if not (_same_host(src[0], host) and src[1] == port):
                    ex.mismatch()
                    continue
                hit = ex.match(data)
                if hit is None:
                    continue
                q, msg = hit
                if attempt == 0:
                    q.out.first_reply = True
                if msg.flags & dns.flags.TC:
                    q.via_tcp = True
                    tcp_tasks.append(asyncio.create_task(_tcp_fallback(host, port, q, timeout, attempts, result,
                                                                    attempt, own)))
                    continue
                _finish(q, msg, attempt, at=arrived)
            if attempt == 0 and len(queries) == 2:
                answered = [q for q in queries if q.out.first_reply]
                if len(answered) == 1:
                    result.partial_lost = next(q.qtype for q in queries if not q.out.first_reply)
            if len(pending) == 1 and not error and (len(queries) == 1 or attempt > 0):
                # a query with no partner in flight cannot lose the conntrack insert race: its loss rate is
                # the path's plain loss rate, the reference the race fingerprint compares pairs with
                result.lone_sent += 1
                if not pending[0].out.done and not pending[0].via_tcp:
                    result.lone_lost += 1
            if error:
                sock.close()
                sock = None
        for q in queries:
            if not q.out.done and not q.via_tcp:
                _finish(q, None, attempts - 1, "network" if error else "timeout")
    finally:
        if sock is not None:
            sock.close()
    if tcp_tasks:
        await asyncio.gather(*tcp_tasks)


async def _tcp_fallback(host: str, port: int, q: _Query, timeout: float, attempts: int, result: ProbeResult,
                        udp_attempt: int, own: OwnPorts | None = None) -> None:
    await _tcp(host, port, [q], timeout, attempts, result, own)
    q.out.attempt = max(q.out.attempt, udp_attempt)
    if q.out.reason in ("timeout", "network", "mismatch"):
        q.out.reason = "truncated"


async def _tcp(host: str, port: int, queries: list[_Query], timeout: float, attempts: int,
               result: ProbeResult, own: OwnPorts | None = None) -> None:
    """Both queries on one TCP connection (length-prefixed); a new connection per attempt."""
    ex = _Exchange(result, queries, udp=False)
    error = False
    for attempt in range(attempts):
        pending = [q for q in queries if not q.out.done]
        if not pending:
            return
        conn: TcpConn | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await TcpConn.open(host, port, own)
                await conn.send([q.wire for q in pending])
                result.sent += len(pending)
                while any(not q.out.done for q in pending):
                    data = await conn.read_message()
                    arrived = time.perf_counter()
                    hit = ex.match(data)
                    if hit is not None:
                        _finish(hit[0], hit[1], attempt, at=arrived)
        except TimeoutError:
            error = False
        except (OSError, asyncio.IncompleteReadError):  # refused, reset, closed early: the next try reconnects
            error = True
        finally:
            if conn is not None:
                conn.close()
    for q in queries:
        if not q.out.done:
            _finish(q, None, attempts - 1, "network" if error else "timeout")


async def lookup(host: str, port: int, name: str, mode: str, timeout: float, attempts: int,
                 own: OwnPorts | None = None) -> ProbeResult:
    """Resolve `name` (A and AAAA) at host:port the way `mode` does; never raises for DNS or network faults.

    `own`: where to register the local ports of the probe's sockets (see `exporter.discovery.ownports`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    result = ProbeResult(mode)
    queries = _make_queries(name, QTYPES)
    start = time.perf_counter()
    try:
        if mode == "parallel":
            await _udp(host, port, queries, timeout, attempts, result, own)
        elif mode == "sequential":
            for q in queries:
                await _udp(host, port, [q], timeout, attempts, result, own)
        else:
            await _tcp(host, port, queries, timeout, attempts, result, own)
    except (OSError, dns.exception.DNSException):
        for q in queries:
            if not q.out.done:
                _finish(q, None, 0, "network")
    end = time.perf_counter()
    # Until the last answer arrived (or the last query was given up), not until its parsing and the socket's
    # close were done: what the path took, without the probe's own bookkeeping after the fact.
    settled = max((q.out.at for q in queries), default=0.0)
    result.duration = (settled if all(q.out.done for q in queries) and start < settled <= end else end) - start
    result.outcomes = {q.qtype: q.out for q in queries}
    return result
