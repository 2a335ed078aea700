"""The glibc resolver model: what `getaddrinfo(name, AF_UNSPEC)` in a glibc 2.3x process waits for.

Follows glibc's `resolv/res_send.c` (`__res_context_send`, `send_dg`, `send_vc`); written from reading
it, not copied. The points that decide how long an application waits:

- `__res_context_send`: `attempts` tries; each try asks every nameserver in turn (`rotate`: starting one
  further on each lookup). With `use-vc` (or after a truncated answer) the server gets ONE TCP attempt
  (`try = statp->retry`).
- `send_dg`: the per-try time budget is `timeout << ns` (divided by the number of servers for ns > 0);
  it covers the whole try, both queries included. A and AAAA go out back to back (`sendmmsg`) on one
  *connected* UDP socket, which is kept across tries; a send or receive error (EPERM from a full
  conntrack table on the node, ICMP refused) closes it (`close_and_return_error`) and the next try opens
  a new one at once, without waiting.
- The half-answer fallback: when the budget runs out after one reply of the pair, glibc does not spend a
  try: it sets `RES_SNGLKUP` on the resolver state and asks both again on the same socket, one after the
  other (the second only once the first is answered). If that also ends with one reply, it sets
  `RES_SNGLKUPREOP`, opens a new socket and asks again (a new socket for the second query too). If that
  ends with one reply, the lookup succeeds with that family only. Each stage has a full budget: this is
  where 15 s and 20 s waits come from. The bits stay set in the process's resolver state: a long-lived
  process (`glibc-sticky`) starts every later lookup in single-request(-reopen) mode.
- A reply counts only if its id and question match a query not answered yet (anything else: keep
  waiting). SERVFAIL/NOTIMP/REFUSED and a "lame" reply (NOERROR, no records, neither AA nor RA: checked
  before TC) end the try once both replies are in, without waiting (`next_ns`); TC switches to TCP.
- `send_vc`: connect, write both queries, read two answers, with no timeout at all (glibc blocks in
  `read`); the model gives up at `vc_limit` (a dropped SYN takes the kernel's ~127 s to fail).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from exporter.dns.models import GlibcState, Lookup, ResolverOptions, Servers
from exporter.dns.resolver import TcpConn, make_query, parse_reply, register_own

_OK, _FAIL, _TC = "ok", "fail", "tc"
_NEXT_NS_RCODES = (dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED)


class _Query:
    __slots__ = ("id", "msg", "qtype", "wire")

    def __init__(self, qname: str, qtype: str, qid: int) -> None:
        self.qtype, self.id = qtype, qid
        self.msg, self.wire = make_query(qname, qtype, qid)


def _matches(q: _Query, r: dns.message.Message) -> bool:
    if r.id != q.id or len(r.question) != 1:
        return False
    a, b = q.msg.question[0], r.question[0]
    return bool(a.name == b.name and a.rdtype == b.rdtype and a.rdclass == b.rdclass)


def _budget(timeout: float, ns: int, nscount: int) -> float:
    if float(timeout).is_integer():
        seconds: float = int(timeout) << ns
        if ns > 0:
            seconds = int(seconds) // nscount
    else:
        seconds = timeout * (1 << ns) / (nscount if ns > 0 else 1)
    return max(seconds, 1.0) if timeout >= 1 else max(seconds, 0.001)


class _Glibc:
    def __init__(self, servers: Servers, qname: str, opts: ResolverOptions, state: GlibcState) -> None:
        self.servers = servers
        self.opts = opts
        self.state = state
        ids = random.sample(range(0x10000), 2)
        self.queries = [_Query(qname, "A", ids[0]), _Query(qname, "AAAA", ids[1])]
        self.socks: dict[int, socket.socket] = {}
        self.result = Lookup("glibc")
        self.loop = asyncio.get_running_loop()
        self.got: dict[str, dns.message.Message] = {}

    # sockets ------------------------------------------------------------------------------------
    def _close(self, ns: int) -> None:
        s = self.socks.pop(ns, None)
        if s is not None:
            s.close()

    def _open(self, ns: int) -> bool:
        """glibc `reopen`: a connected UDP socket for server ns, if none is open."""
        if ns in self.socks:
            return True
        host, port = self.servers[ns]
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        register_own(s, socket.IPPROTO_UDP, self.opts.own)
        try:
            s.connect((host, port))
        except OSError as e:
            s.close()
            self.result.error = _errname(e)
            return False
        self.socks[ns] = s
        return True

    def _send(self, ns: int, q: _Query) -> bool:
        try:
            self.socks[ns].send(q.wire)
        except OSError as e:
            self.result.error = _errname(e)
            self._close(ns)
            return False
        self.result.sent += 1
        return True

    # send_dg ------------------------------------------------------------------------------------
    async def send_dg(self, ns: int) -> str:
        budget = _budget(self.opts.timeout, ns, len(self.servers))
        sr = self.opts.single_request or self.opts.single_request_reopen or self.state.single_request
        srr = self.opts.single_request_reopen or self.state.single_request_reopen
        while True:  # retry_reopen
            if not self._open(ns):
                return _FAIL
            while True:  # retry
                outcome = await self._one_round(ns, budget, sr, srr)
                if outcome != "half":
                    return outcome
                if not sr:
                    sr = self.state.single_request = True
                    continue
                if not srr:
                    srr = self.state.single_request_reopen = True
                    self._close(ns)
                    break
                return _OK  # one family only
            continue

    async def _one_round(self, ns: int, budget: float, sr: bool, srr: bool) -> str:
        a, aaaa = self.queries
        self.got.clear()
        deadline = self.loop.time() + budget
        for q in ([a] if sr else [a, aaaa]):
            if not self._send(ns, q):
                return _FAIL
        second_sent = not sr
        received: set[str] = set()
        while True:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return "half" if any(t in self.got for t in received) else _FAIL
            try:
                async with asyncio.timeout(remaining):
                    data = await self.loop.sock_recv(self.socks[ns], 65535)
            except TimeoutError:
                continue
            except OSError as e:
                self.result.error = _errname(e)
                self._close(ns)
                return _FAIL
            msg = parse_reply(data, require_qr=True)
            if msg is None:
                continue
            hit = next((q for q in self.queries if q.qtype not in received and _matches(q, msg)), None)
            if hit is None:
                continue  # spurious: keep waiting
            rcode = msg.rcode()
            lame = (rcode == dns.rcode.NOERROR and not msg.answer and not msg.additional
                    and not msg.flags & (dns.flags.AA | dns.flags.RA))
            if rcode in _NEXT_NS_RCODES or lame:
                if received:  # the other one is back already: this try is over, no waiting
                    return _OK if self.got else _FAIL
                if not second_sent:
                    # single-request: the second query never went out; glibc 2.36 closes the socket and
                    # ends the try at once (measured: next try ~0.1 ms later from a new port)
                    self._close(ns)
                    return _FAIL
                received.add(hit.qtype)  # no data from it; wait for the other
                continue
            if msg.flags & dns.flags.TC:
                self._close(ns)
                return _TC
            received.add(hit.qtype)
            self.got[hit.qtype] = msg
            if len(received) == 2:
                return _OK
            if not second_sent:
                if srr:
                    self._close(ns)
                    if not self._open(ns):
                        return _FAIL
                if not self._send(ns, aaaa):
                    return _FAIL
                second_sent = True

    # send_vc ------------------------------------------------------------------------------------
    async def send_vc(self, ns: int, limit: float) -> str:
        host, port = self.servers[ns]
        self.got.clear()
        conn: TcpConn | None = None
        try:
            async with asyncio.timeout(limit):
                conn = await TcpConn.open(host, port, self.opts.own)
                await conn.send([q.wire for q in self.queries])
                self.result.sent += 2
                while len(self.got) < 2:
                    msg = parse_reply(await conn.read_message(), require_qr=True)
                    hit = None if msg is None else next(
                        (q for q in self.queries if q.qtype not in self.got and _matches(q, msg)), None)
                    if hit is not None and msg is not None:
                        self.got[hit.qtype] = msg
        except TimeoutError:
            self.got.clear()  # glibc would still be blocked in read(): the application has nothing yet
            self.result.error = "ETIMEDOUT"
            return _FAIL
        except (OSError, asyncio.IncompleteReadError) as e:
            if isinstance(e, OSError):
                self.result.error = _errname(e)
            return _OK if self.got else _FAIL  # a closed connection after one answer: that family only
        finally:
            if conn is not None:
                conn.close()
        return _OK

    # __res_context_send -------------------------------------------------------------------------
    async def run(self) -> Lookup:
        n = len(self.servers)
        offset = 0
        if self.opts.rotate and n > 1:
            offset = self.state.rotation % n
            self.state.rotation += 1
        v_circuit = self.opts.use_vc
        start = self.loop.time()
        try:
            attempt = 0
            while attempt < self.opts.attempts:
                for shift in range(n):
                    ns = (shift + offset) % n
                    while True:  # same_ns
                        if v_circuit:
                            attempt = self.opts.attempts
                            outcome = await self.send_vc(ns, self.opts.vc_limit - (self.loop.time() - start))
                        else:
                            outcome = await self.send_dg(ns)
                            if outcome == _TC:
                                v_circuit = True
                                continue
                        break
                    if outcome == _OK:
                        return self._finish()
                attempt += 1
            self.got.clear()
            return self._finish()
        finally:
            for ns in list(self.socks):
                self._close(ns)

    def _finish(self) -> Lookup:
        r = self.result
        r.answered = {t: m.rcode() for t, m in self.got.items()}
        has_addr = {t for t, m in self.got.items()
                    if m.rcode() == dns.rcode.NOERROR
                    and any(rr.rdtype == dns.rdatatype.from_text(t) for rr in m.answer)}
        final = {t for t, m in self.got.items() if m.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)}
        if not has_addr:
            r.result = "failed"
        elif len(final) == 2:
            r.result = "ok"
        else:
            r.result = "partial"
        return r


def _errname(e: OSError) -> str:
    import errno

    return errno.errorcode.get(e.errno or 0, "EIO")


async def lookup(servers: Servers, qname: str, opts: ResolverOptions, state: GlibcState | None) -> Lookup:
    g = _Glibc(servers, qname, opts, state or GlibcState())
    t0 = time.perf_counter()
    r = await g.run()
    r.duration = time.perf_counter() - t0
    return r
