"""Streaming conntrack table dump: aggregate the whole table over raw NETLINK_NETFILTER, entry by entry.

The table breakdown (`exporter.table.service`) needs every entry of a table that can hold hundreds of
thousands. pyroute2's generic decoder builds a nested object per entry (about 150 µs each, 40 s for a
full table). This parser instead `recv_into`s reused buffers and reads, with `struct.unpack_from` at
known offsets, only what the breakdown needs:

- the original tuple: source address, protocol number, destination port;
- for DNS entries, when stale-DNS checking is on: the original destination and the reply source;
- CTA_STATUS (SEEN_REPLY / ASSURED bits) and, for TCP, CTA_PROTOINFO_TCP_STATE.

Most entries (IPv4/IPv6 TCP and UDP without zones) are laid out by the kernel at fixed offsets: one
`unpack_from` reads the header fields and values of both tuples and the status, and every attribute
header on the way is compared with what it must be; anything else (ICMP, zones, other kernels' layouts)
falls back to walking the attributes, with identical results (a unit test holds them equal).

It keeps counters in a few small dicts keyed by ints, never an object per entry, so memory does not grow
with the table. Source addresses are only counted when they belong to a known pod (the pod map at scan
start), so that dict is bounded by the pods on the node, not by the number of distinct sources.

The kernel builds each dump datagram inside the `recv` call, without the GIL: a second thread receives
the next datagrams (a few reused 64 KB buffers) while the scanning thread parses, so the kernel's half
of the work overlaps ours. The scanning thread also sleeps briefly every few datagrams, and both
release the GIL at every `recv`, so scrapes served meanwhile are not held up.

`exporter.table.native` runs this same parser in C (`ctdump.c`, 0.02 µs per entry, over 40x less) when its
shared library is built; this module is its reference (tests/unit/table/test_native.py) and its fallback.

Scanning (the dump request, the receive, restarts, the time cap) is `exporter.table.scan`.

Kernel-side filtering: none. Every aggregate covers the whole table, so every entry has to come across;
CTA_FILTER / mark / zone filters would only drop entries we need, and the kernel walks its whole
(all-namespace) hash table whatever the filter. What the kernel does do for us: one AF_UNSPEC dump (IPv4
and IPv6 in one pass) and, because the receive buffer is large, datagrams of about 32 KB (over 100
entries per system call).

A dump the kernel interrupts (ENOBUFS, EINTR, EBUSY, or a message flagged NLM_F_DUMP_INTR) is
restarted once from scratch; a second interruption, a scan exceeding its time cap, or a garbled or
truncated message leaves a *partial* scan: what was counted so far, flagged, with one log line.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from exporter.netlink import (
    NFNL_SUBSYS_CTNETLINK,
    NLA_TYPE_MASK,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    NetlinkError,
    ParseError,
)

IPCTNL_MSG_CT_NEW = 0  # dump replies carry this type
IPCTNL_MSG_CT_GET = 1
NLM_F_DUMP_INTR = 0x10
CT_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW

# enum ctattr_type / ctattr_tuple / ctattr_ip / ctattr_l4proto / ctattr_protoinfo(_tcp)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
IPS_SEEN_REPLY, IPS_ASSURED = 0x2, 0x4

PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6 = 6, 17, 1, 58
PROTOCOL_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmpv6"}
# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h), named like `conntrack -L`
# (lower case); 9 is SYN_SENT2 (simultaneous open; `conntrack -L` prints it as LISTEN).
TCP_STATES = ("none", "syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack",
              "time_wait", "close", "syn_sent2")
# Non-TCP entries: from the CTA_STATUS bits.
STATUS_STATES = ("unreplied", "replied", "assured")
DNS_PORT = 53

HDR = NLMSGHDR
_HH = struct.Struct("=HH").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U16 = struct.Struct("!H").unpack_from
_U8 = struct.Struct("B").unpack_from
_V4 = struct.Struct("4s").unpack_from
_V6 = struct.Struct("16s").unpack_from
_HDR = HDR.unpack_from
_ENTRY_ATTRS = HDR.size + 4  # nlmsghdr + nfgenmsg

RECV_BUFFER = 1 << 16  # the kernel caps a dump datagram at about 32 KB


def _hdr(length: int, atype: int) -> int:
    """An attribute header (len, type) as the native u32 the fast-path struct reads."""
    return int(struct.unpack("=I", struct.pack("=HH", length, atype))[0])


def _native(fmt: str, value: int) -> int:
    """A big-endian field's value as read by a native-order struct (for comparing without swapping)."""
    return int(struct.unpack("=" + fmt, struct.pack("!" + fmt, value))[0])


NLA_F_NESTED = 0x8000
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
# Message header, nfgenmsg family, then the original tuple { ip { src, dst }, proto { num, sport, dport } },
# the reply tuple (skipped but for its header) and CTA_STATUS, in the order the kernel writes them.
_FAST4 = struct.Struct("=IHH8xB3x" "III4s8x" "IIB3x8xIH2x" "I48x" "II")
_FAST6 = struct.Struct("=IHH8xB3x" "III16s20x" "IIB3x8xIH2x" "I72x" "II")
_ORIG_AT, _REPLY4_AT, _REPLY6_AT = 20, 72, 96
_ORIG4, _ORIG6 = _hdr(52, CTA_TUPLE_ORIG | NLA_F_NESTED), _hdr(76, CTA_TUPLE_ORIG | NLA_F_NESTED)
_REPLY4, _REPLY6 = _hdr(52, CTA_TUPLE_REPLY | NLA_F_NESTED), _hdr(76, CTA_TUPLE_REPLY | NLA_F_NESTED)
_IP4, _IP6 = _hdr(20, CTA_TUPLE_IP | NLA_F_NESTED), _hdr(44, CTA_TUPLE_IP | NLA_F_NESTED)
_SRC4, _SRC6 = _hdr(8, CTA_IP_V4_SRC), _hdr(20, CTA_IP_V6_SRC)
_PROTO_PORTS = _hdr(28, CTA_TUPLE_PROTO | NLA_F_NESTED)
_NUM = _hdr(5, CTA_PROTO_NUM)
_DPORT = _hdr(6, CTA_PROTO_DST_PORT)
_STATUS_HDR = _hdr(8, CTA_STATUS)
_DNS_NATIVE = _native("H", 53)
_DNS_PROTOS = frozenset((PROTO_UDP, PROTO_TCP))
_ASSURED_NATIVE, _SEEN_REPLY_NATIVE = _native("I", IPS_ASSURED), _native("I", IPS_SEEN_REPLY)
# TCP: after status come mark, id, use and timeout (8 bytes each), then CTA_PROTOINFO; checked, else walked.
_TCPFAST = struct.Struct("=IIIB")
_TCPFAST_OFFSET = 32
_PROTOINFO_TCP_HDR = _hdr(48, CTA_PROTOINFO | NLA_F_NESTED)
_TCP_HDR = _hdr(44, CTA_PROTOINFO_TCP | NLA_F_NESTED)
_STATE_HDR = _hdr(5, CTA_PROTOINFO_TCP_STATE)
# The fixed layouts by address family: (unpack, size, orig/ip/src/reply attribute headers, reply offset).
_LAYOUTS: dict[int, tuple[Callable[..., tuple[Any, ...]], int, int, int, int, int, int]] = {
    _AF_INET: (_FAST4.unpack_from, _FAST4.size, _ORIG4, _IP4, _SRC4, _REPLY4, _REPLY4_AT),
    _AF_INET6: (_FAST6.unpack_from, _FAST6.size, _ORIG6, _IP6, _SRC6, _REPLY6, _REPLY6_AT),
}
_TCP_KEY = PROTO_TCP << 8
_N_TCP_STATES = len(TCP_STATES)


def ip_key(address: str) -> bytes | None:
    """The packed form of an address (what the parser compares against), or None for a hostname."""
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        return None


@dataclass
class Aggregate:
    """Counters of one scan. `states` is keyed by protocol << 8 | state index."""

    states: dict[int, int] = field(default_factory=dict)
    dns: dict[int, int] = field(default_factory=dict)
    stale_dns: int = 0
    entries: int = 0
    sources: dict[bytes, int] = field(default_factory=dict)
    dump_interrupted: bool = False

    def named_states(self) -> dict[tuple[str, str], int]:
        """{(protocol, state): count} with readable labels (see PROTOCOL_NAMES, TCP_STATES, STATUS_STATES)."""
        out: dict[tuple[str, str], int] = {}
        for key, n in self.states.items():
            proto, st = key >> 8, key & 0xFF
            pname = PROTOCOL_NAMES.get(proto, "other")
            tcp = proto == PROTO_TCP
            sname = (TCP_STATES[st] if st < len(TCP_STATES) else "other") if tcp else STATUS_STATES[st]
            out[(pname, sname)] = out.get((pname, sname), 0) + n
        return out

    def dns_by_transport(self) -> dict[str, int]:
        return {"udp": self.dns.get(PROTO_UDP, 0), "tcp": self.dns.get(PROTO_TCP, 0)}


class DumpParser:
    """Feeds dump datagrams into an `Aggregate`.

    `source_keys`: packed addresses whose entries are counted per address (the pods); every other
    source only counts towards the total. `dns_servers`: packed addresses of the current DNS
    endpoints/servers; when given, a DNS entry addressed to one of them (original destination: the
    Service IP, NodeLocal, a configured server) but answered from an address that is none of them
    (reply source: where DNAT sent it) counts as stale. Only UDP entries: a UDP client that keeps its
    socket reuses the entry and stays pinned to where it points; a TCP connection pins nothing (the next
    one gets a new port and the current DNAT), and its SYN_SENT entry to a dead address only waits out the
    kernel's 120 s after a path is healed. DNS to other servers (CoreDNS's own upstream queries crossing
    the node, pods asking public resolvers) is not ours to judge and never counts.
    """

    def __init__(self, source_keys: Iterable[bytes] = (), dns_servers: Iterable[bytes] | None = None) -> None:
        self.agg = Aggregate(sources=dict.fromkeys(source_keys, 0))
        self.dns_servers = frozenset(dns_servers) if dns_servers is not None else None
        self.done = False

    def feed(self, buf: bytes | bytearray | memoryview, n: int | None = None) -> bool:
        """Parse the netlink messages in buf[:n]; return True once the dump's NLMSG_DONE was seen.

        Raises ParseError on a truncated or garbled message (what came before it is counted) and
        NetlinkError on an error reply.
        """
        if n is None:
            n = len(buf)
        try:
            return self._feed(buf, n)
        except struct.error as e:  # a read past the end of the buffer: the message lied about its length
            raise ParseError(f"garbled conntrack dump message: {e}") from None

    def _feed(self, buf: bytes | bytearray | memoryview, n: int) -> bool:
        agg = self.agg
        states = agg.states
        dns = agg.dns
        sources = agg.sources
        count_sources = bool(sources)
        servers = self.dns_servers
        hdr, tcpfast, layouts = _HDR, _TCPFAST.unpack_from, _LAYOUTS
        slow = _slow_entry
        entries = 0
        stale = 0
        off = 0
        try:
            while off + 16 <= n:
                # Fast path: the fixed layout the kernel uses for IPv4/IPv6 TCP and UDP entries without
                # zones, read with one unpack and checked header by header; anything else takes the walk.
                fast = False
                layout = layouts.get(buf[off + 16]) if off + 17 <= n else None  # by nfgenmsg family
                if layout is not None and off + layout[1] <= n:
                    unpack, size, orig_h, ip_h, src_h, reply_h, reply_off = layout
                    (mlen, mtype, mflags, _fam, oh, ih, sh, src, ph, nh, proto, dh, dport, rh, sth,
                     status) = unpack(buf, off)
                    if (mtype == CT_NEW_TYPE and oh == orig_h and ih == ip_h and sh == src_h
                            and ph == _PROTO_PORTS and nh == _NUM and dh == _DPORT and rh == reply_h
                            and sth == _STATUS_HDR and mlen >= size and off + mlen <= n):
                        fast = True
                        end = off + mlen
                        tail = off + size
                        reply_at = off + reply_off
                        orig_at = off + _ORIG_AT
                        dport = dport == _DNS_NATIVE and DNS_PORT
                        status = (2 if status & _ASSURED_NATIVE else 1 if status & _SEEN_REPLY_NATIVE else 0)
                        tcp_state = -1
                        if proto == PROTO_TCP:
                            if tail + _TCPFAST_OFFSET + _TCPFAST.size <= end:
                                pih, tch, sth, st = tcpfast(buf, tail + _TCPFAST_OFFSET)
                                if pih == _PROTOINFO_TCP_HDR and tch == _TCP_HDR and sth == _STATE_HDR:
                                    tcp_state = st
                            if tcp_state < 0:
                                tcp_state = _tcp_state(buf, tail, end)
                if not fast:
                    mlen, mtype, mflags, _seq, _pid = hdr(buf, off)
                    end = off + mlen
                    if mlen < 16 or end > n:
                        raise ParseError(f"truncated netlink message at offset {off} (length {mlen}, {n - off} left)")
                    if mtype != CT_NEW_TYPE:
                        if mtype == NLMSG_DONE:
                            self.done = True
                            return True
                        if mtype == NLMSG_ERROR:
                            err = -struct.unpack_from("=i", buf, off + 16)[0] if mlen >= 20 else errno.EIO
                            if err:
                                raise NetlinkError(err, "conntrack table dump")
                            self.done = True
                            return True
                        off += (mlen + 3) & ~3
                        continue
                    proto, dport, bits, tcp_state, src, orig_at, reply_at = slow(buf, off + _ENTRY_ATTRS, end)
                    status = 2 if bits & IPS_ASSURED else 1 if bits & IPS_SEEN_REPLY else 0
                # one counter key per (protocol, state): TCP by its conntrack state, the rest by status
                if proto == PROTO_TCP:
                    key = _TCP_KEY | (tcp_state if 0 <= tcp_state < _N_TCP_STATES else 0xFF)
                else:
                    key = proto << 8 | status
                if mflags & NLM_F_DUMP_INTR:
                    agg.dump_interrupted = True
                states[key] = states.get(key, 0) + 1
                if dport == DNS_PORT and proto in _DNS_PROTOS:
                    dns[proto] = dns.get(proto, 0) + 1
                    # stale: addressed to a DNS server we know, answered by an address that is none of them
                    if (servers is not None and proto == PROTO_UDP and reply_at >= 0
                            and _tuple_address(buf, orig_at, end, True) in servers
                            and _tuple_address(buf, reply_at, end, False) not in servers):
                        stale += 1
                if count_sources:
                    c = sources.get(src)
                    if c is not None:
                        sources[src] = c + 1
                entries += 1
                off += (mlen + 3) & ~3
            return False
        finally:
            agg.entries += entries
            agg.stale_dns += stale


def _slow_entry(buf: bytes | bytearray | memoryview, a: int,
                end: int) -> tuple[int, int, int, int, bytes, int, int]:
    """Walk one entry's attributes: (protocol, dst port, status, tcp state, source, tuple offsets orig/reply)."""
    hh, mask = _HH, NLA_TYPE_MASK
    proto = dport = status = tcp_state = orig_at = reply_at = -1
    src = b""
    while a + 4 <= end:
        alen, atype = hh(buf, a)
        if alen < 4 or a + alen > end:
            raise ParseError(f"garbled conntrack attribute at offset {a} (length {alen})")
        atype &= mask
        if atype == CTA_TUPLE_ORIG:
            orig_at = a
            te = a + alen
            p = a + 4
            while p + 4 <= te:
                plen, ptype = hh(buf, p)
                pe = p + plen
                if plen < 4 or pe > te:
                    raise ParseError(f"garbled conntrack tuple at offset {p}")
                ptype &= mask
                if ptype == CTA_TUPLE_IP:
                    src = _first_address(buf, p, pe)
                elif ptype == CTA_TUPLE_PROTO:
                    q = p + 4
                    while q + 4 <= pe:
                        qlen, qtype = hh(buf, q)
                        if qlen < 4 or q + qlen > pe:
                            raise ParseError(f"garbled conntrack proto attribute at offset {q}")
                        qtype &= mask
                        if qtype == CTA_PROTO_NUM:
                            proto = _U8(buf, q + 4)[0]
                        elif qtype == CTA_PROTO_DST_PORT:
                            dport = _U16(buf, q + 4)[0]
                        q += (qlen + 3) & ~3
                p += (plen + 3) & ~3
        elif atype == CTA_TUPLE_REPLY:
            reply_at = a
        elif atype == CTA_STATUS:
            if alen < 8:
                raise ParseError(f"short CTA_STATUS at offset {a}")
            status = _U32(buf, a + 4)[0]
        elif atype == CTA_PROTOINFO:
            tcp_state = _protoinfo_tcp_state(buf, a, a + alen)
        a += (alen + 3) & ~3
    if proto < 0 or status < 0:
        raise ParseError(f"conntrack entry at offset {a} without original tuple or status")
    return proto, dport, status, tcp_state, src, orig_at, reply_at


def _first_address(buf: bytes | bytearray | memoryview, p: int, pe: int) -> bytes:
    """The source address: the first attribute of a CTA_TUPLE_IP nest starting at p."""
    if p + 8 > pe:
        raise ParseError(f"empty address nest at offset {p}")
    qlen, qtype = _HH(buf, p + 4)
    qtype &= NLA_TYPE_MASK
    if qtype == CTA_IP_V4_SRC and qlen == 8 and p + 12 <= pe:
        return bytes(_V4(buf, p + 8)[0])
    if qtype == CTA_IP_V6_SRC and qlen == 20 and p + 24 <= pe:
        return bytes(_V6(buf, p + 8)[0])
    raise ParseError(f"unexpected address attribute {qtype} at offset {p + 4}")


def _protoinfo_tcp_state(buf: bytes | bytearray | memoryview, a: int, end: int) -> int:
    """CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE u8 } } at a, or -1."""
    if a + 8 > end:
        return -1
    plen, ptype = _HH(buf, a + 4)
    if ptype & NLA_TYPE_MASK != CTA_PROTOINFO_TCP or plen < 4 or a + 4 + plen > end:
        return -1
    q, qe = a + 8, a + 4 + plen
    while q + 4 <= qe:
        qlen, qtype = _HH(buf, q)
        if qlen < 4 or q + qlen > qe:
            raise ParseError(f"garbled TCP protoinfo at offset {q}")
        if qtype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE and qlen >= 5:
            return int(_U8(buf, q + 4)[0])
        q += (qlen + 3) & ~3
    return -1


def _tcp_state(buf: bytes | bytearray | memoryview, a: int, end: int) -> int:
    """Walk the attributes from a to end for CTA_PROTOINFO; the TCP state, or -1."""
    while a + 4 <= end:
        alen, atype = _HH(buf, a)
        if alen < 4 or a + alen > end:
            raise ParseError(f"garbled conntrack attribute at offset {a} (length {alen})")
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO:
            return _protoinfo_tcp_state(buf, a, a + alen)
        a += (alen + 3) & ~3
    return -1


def _tuple_address(buf: bytes | bytearray | memoryview, at: int, msg_end: int, dst: bool) -> bytes:
    """The source (or destination) address of the tuple attribute at `at` (b"" if it has none)."""
    alen = _HH(buf, at)[0]
    end = at + alen
    if alen < 4 or end > msg_end:
        raise ParseError(f"garbled conntrack tuple at offset {at}")
    want = (CTA_IP_V4_DST, CTA_IP_V6_DST) if dst else (CTA_IP_V4_SRC, CTA_IP_V6_SRC)
    p = at + 4
    while p + 4 <= end:
        plen, ptype = _HH(buf, p)
        if plen < 4 or p + plen > end:
            raise ParseError(f"garbled conntrack tuple at offset {p}")
        if ptype & NLA_TYPE_MASK == CTA_TUPLE_IP:
            q, qe = p + 4, p + plen
            while q + 4 <= qe:
                qlen, qtype = _HH(buf, q)
                if qlen < 4 or q + qlen > qe:
                    raise ParseError(f"garbled address attribute at offset {q}")
                qtype &= NLA_TYPE_MASK
                if qtype == want[0] and qlen == 8:
                    return bytes(_V4(buf, q + 4)[0])
                if qtype == want[1] and qlen == 20:
                    return bytes(_V6(buf, q + 4)[0])
                q += (qlen + 3) & ~3
            return b""
        p += (plen + 3) & ~3
    return b""
