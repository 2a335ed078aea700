"""The musl resolver model: what `getaddrinfo(name, AF_UNSPEC)` in a musl 1.2 (Alpine) process waits for.

Follows musl's `src/network/res_msend.c` (`__res_msend_rc`) and `src/network/lookup_name.c`
(`name_from_dns`); written from reading them, not copied:

- one unconnected UDP socket for the whole lookup, A and AAAA sent back to back to EVERY nameserver at
  once (no per-server turns, `rotate` and `single-request*` are ignored);
- every `timeout / attempts` (2.5 s by default) whatever is still unanswered is sent again, to every
  server, on the same socket; the lookup ends when all queries are answered or `timeout` (5 s) has
  passed since the start: `attempts` only sets the resend interval;
- `sendto` errors are not checked: with EPERM (a node whose conntrack table is full) nothing leaves, and
  musl simply waits out the timeout (5 s) where glibc fails in 0.2 ms;
- a reply is matched by id only (and must come from an address queried); NOERROR and NXDOMAIN are
  accepted, SERVFAIL triggers an immediate resend to that server (at most 2 per query per interval),
  anything else is ignored;
- `name_from_dns`: any query without an accepted answer, or a SERVFAIL, makes the lookup fail with
  EAI_AGAIN: musl never returns one family when the other was lost (no `partial`).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time

import dns.message
import dns.rcode
import dns.rdatatype

from exporter.dns.models import GlibcState, Lookup, ResolverOptions, Servers
from exporter.dns.resolver import make_query, register_own


def _family_of(servers: Servers) -> int:
    return socket.AF_INET6 if any(":" in h for h, _ in servers) else socket.AF_INET


def _dest(host: str, port: int, family: int) -> tuple[str, int]:
    if family == socket.AF_INET6 and ":" not in host:
        return (f"::ffff:{host}", port)  # musl maps IPv4 servers in a mixed list
    return (host, port)


async def lookup(servers: Servers, qname: str, opts: ResolverOptions, state: GlibcState | None = None) -> Lookup:
    result = Lookup("musl")
    loop = asyncio.get_running_loop()
    family = _family_of(servers)
    dests = [_dest(h, p, family) for h, p in servers]
    qid = random.randrange(0x10000)
    ids = [qid, (qid & 0xFF00) | ((qid + 1) & 0xFF)]  # lookup_name.c makes the second id differ
    wires = [make_query(qname, t, i)[1] for t, i in zip(("A", "AAAA"), ids, strict=True)]
    answers: list[bytes | None] = [None, None]
    timeout_ms = int(opts.timeout * 1000)
    retry_ms = timeout_ms // max(opts.attempts, 1)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    register_own(sock, socket.IPPROTO_UDP, opts.own)
    t_start = time.perf_counter()

    def now_ms() -> float:
        return (time.perf_counter() - t_start) * 1000

    def send(i: int, dest: tuple[str, int]) -> None:
        try:
            sock.sendto(wires[i], dest)
            result.sent += 1
        except OSError as e:  # musl ignores sendto's result
            result.error = errno.errorcode.get(e.errno or 0, "EIO")

    try:
        t1: float = -retry_ms
        servfail_retry: int = 0
        t2 = now_ms()
        while t2 < timeout_ms:
            if all(a is not None for a in answers):
                break
            if t2 - t1 >= retry_ms:
                for i in range(2):
                    if answers[i] is None:
                        for d in dests:
                            send(i, d)
                t1 = t2
                servfail_retry = 4
            wait = (t1 + retry_ms - t2) / 1000
            try:
                async with asyncio.timeout(max(wait, 0)):
                    data, src = await loop.sock_recvfrom(sock, 65535)
            except (TimeoutError, OSError):
                t2 = now_ms()
                continue
            t2 = now_ms()
            if len(data) < 4:
                continue
            j = next((k for k, d in enumerate(dests) if _same(src, d)), None)
            if j is None:
                continue
            slot = next((k for k in range(2) if answers[k] is None and data[:2] == wires[k][:2]), None)
            if slot is None:
                continue
            rcode = data[3] & 15
            if rcode == dns.rcode.SERVFAIL:
                if servfail_retry > 0:
                    servfail_retry -= 1
                    send(slot, dests[j])
                continue
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                continue
            answers[slot] = data
    finally:
        sock.close()
    result.duration = time.perf_counter() - t_start
    rcodes: dict[str, int] = {}
    addrs = 0
    for t, a in zip(("A", "AAAA"), answers, strict=True):
        if a is None:
            continue
        try:
            m = dns.message.from_wire(a)
        except Exception:
            continue
        rcodes[t] = m.rcode()
        addrs += sum(len(rr) for rr in m.answer if rr.rdtype == dns.rdatatype.from_text(t))
    result.answered = rcodes
    if len(rcodes) == 2 and all(rc == dns.rcode.NOERROR for rc in rcodes.values()) and addrs:
        result.result = "ok"
    return result


def _same(src: tuple[str, int] | tuple[str, int, int, int], dest: tuple[str, int]) -> bool:
    return src[0] == dest[0] and src[1] == dest[1]
