"""Fill a network namespace's conntrack table fast, with real kernel entries, and empty it again.

pyroute2's `entry('add')` manages ~800 entries/s; here batches of IPCTNL_MSG_CT_NEW messages (no ACK)
go out on one raw NETLINK_NETFILTER socket opened inside the namespace: 262,144 entries in about 3 s.
Entries are UDP, ASSURED|SEEN_REPLY so a full table cannot early-drop them (the kernel also insists on
the CONFIRMED bit in a create request, as conntrack-tools sends it), with a long timeout and a mark, so
`drain()` removes exactly them with one filtered flush.

Only ever used on namespaces a test created: every function takes the namespace name and refuses none.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from exporter.conntrack.stats import IPCTNL_MSG_CT_GET_STATS, parse_stats_global
from exporter.netlink import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NFNL_SUBSYS_CTNETLINK,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSGHDR,
    build_request,
    iter_messages,
)
from tests.support.netns import in_netns

FILL_MARK = 0x00C7F111
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2
NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_MARK, CTA_MARK_MASK = 1, 2, 3, 7, 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8

SRC_BASE = int(ipaddress.IPv4Address("198.18.0.0"))  # RFC 2544 benchmarking range, never routed here
DST = int(ipaddress.IPv4Address("198.19.0.1"))


def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * ((4 - n % 4) % 4)


def _tuple(src: int, dst: int, sport: int, dport: int, proto: int) -> bytes:
    ip = _attr(CTA_IP_V4_SRC, struct.pack("!I", src)) + _attr(CTA_IP_V4_DST, struct.pack("!I", dst))
    pr = (_attr(CTA_PROTO_NUM, bytes([proto])) + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
          + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return _attr(CTA_TUPLE_IP | NLA_F_NESTED, ip) + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, pr)


def _new_msg(seq: int, src: int, sport: int, dst: int, dport: int, mark: int, timeout: int) -> bytes:
    body = (NFGENMSG.pack(socket.AF_INET, 0, 0)
            + _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, _tuple(src, dst, sport, dport, socket.IPPROTO_UDP))
            + _attr(CTA_TUPLE_REPLY | NLA_F_NESTED, _tuple(dst, src, dport, sport, socket.IPPROTO_UDP))
            + _attr(CTA_STATUS, struct.pack("!I", IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED))
            + _attr(CTA_TIMEOUT, struct.pack("!I", timeout))
            + _attr(CTA_MARK, struct.pack("!I", mark)))
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    mtype = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def _open(ns: str) -> socket.socket:
    if not ns:
        raise ValueError("ctfill only works on a named test namespace, never the machine's own")
    s: socket.socket = in_netns(ns, socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, 0))
    return s


def _drain_errors(s: socket.socket) -> None:
    s.setblocking(False)
    try:
        while True:
            s.recv(65536)
    except BlockingIOError:
        pass
    except OSError as e:  # ENOBUFS: error replies overflowed the buffer; that is fine here
        if e.errno != errno.ENOBUFS:
            raise
    finally:
        s.setblocking(True)


def fill(ns: str, n: int, *, mark: int = FILL_MARK, start: int = 0, sources: int = 256,
         timeout: int = 3600, batch: int = 400, dport: int | None = None) -> int:
    """Ask the kernel to create `n` filler entries in namespace `ns`; return how many the table gained.

    Entry i has source 198.18.0.0 + i % sources and a source port derived from i // sources, so
    different `start` values give different entries (`dport`: every entry to that port instead). At the
    table limit the rest fail (ENOMEM).
    """
    before = count(ns)
    s = _open(ns)
    try:
        buf: list[bytes] = []
        for k in range(start, start + n):
            src = SRC_BASE + k % sources
            q = k // sources
            sport = 1024 + q % 64000
            to = 9 + q // 64000 if dport is None else dport
            buf.append(_new_msg(k + 1, src, sport, DST, to, mark, timeout))
            if len(buf) == batch:
                s.send(b"".join(buf))
                buf.clear()
                _drain_errors(s)
        if buf:
            s.send(b"".join(buf))
        _drain_errors(s)
    finally:
        s.close()
    return count(ns) - before


def fill_to(ns: str, total: int | None = None, *, mark: int = FILL_MARK) -> int:
    """Fill until the namespace table holds `total` entries (default and at most: the limit).

    Returns the final count. Entries that expire or get evicted meanwhile are topped up (a few rounds).
    """
    limit = stats(ns)[1]
    total = limit if total is None else min(total, limit)
    start = 0
    for _ in range(5):
        have = count(ns)
        if have >= total:
            return have
        need = total - have
        if fill(ns, need, mark=mark, start=start) == 0:
            break
        start += need
    return count(ns)


def count(ns: str) -> int:
    """The namespace's conntrack entry count, over netlink."""
    return stats(ns)[0]


def stats(ns: str) -> tuple[int, int]:
    """(entries, limit) of the namespace's table, over netlink."""
    s = _open(ns)
    try:
        s.send(build_request(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST | NLM_F_ACK, 1))
        replies = []
        while True:
            d = s.recv(65536)
            replies.append(d)
            if any(t == 2 for t, _f, _q, _p in iter_messages(d)):  # the ACK
                break
        entries, limit = parse_stats_global(replies)
        return entries or 0, limit or 0
    finally:
        s.close()


def drain(ns: str, *, mark: int = FILL_MARK) -> int:
    """Delete every entry carrying `mark` (one filtered flush); return how many went away."""
    before = count(ns)
    s = _open(ns)
    try:
        body = (NFGENMSG.pack(socket.AF_INET, 0, 0) + _attr(CTA_MARK, struct.pack("!I", mark))
                + _attr(CTA_MARK_MASK, struct.pack("!I", 0xFFFFFFFF)))
        msg = NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                            NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
        s.send(msg)
        s.settimeout(30)
        while True:
            d = s.recv(65536)
            if any(t == 2 for t, _f, _q, _p in iter_messages(d)):
                break
    finally:
        s.close()
    return before - count(ns)
