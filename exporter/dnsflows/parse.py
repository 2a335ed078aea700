"""Conntrack event messages (IPCTNL_MSG_CT_NEW / IPCTNL_MSG_CT_DELETE) read with `struct.unpack_from`.

Only what the DNS flow accounting needs is read: the original tuple (source and destination address,
protocol, source and destination port), the reply tuple's source address (the backend DNAT chose),
CTA_STATUS (IPS_SEEN_REPLY) and CTA_ID. One flat tuple per message, no object per attribute; a table
dump reply (the resync after lost events) has the same layout and goes through the same function.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from exporter.netlink import NFNL_SUBSYS_CTNETLINK, NLA_TYPE_MASK, ParseError

IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_ID = 1, 2, 3, 12
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SEEN_REPLY = 0x2
PROTO_TCP, PROTO_UDP = 6, 17
DNS_PORT = 53

_HH = struct.Struct("=HH").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U16 = struct.Struct("!H").unpack_from
_MSG = struct.Struct("=IH").unpack_from
_ATTRS = 20  # nlmsghdr + nfgenmsg

# (proto, orig src, orig dst, sport, dport, reply src, status, id); addresses packed (4 or 16 bytes)
Flow = tuple[int, bytes, bytes, int, int, bytes, int, int]

NLA_F_NESTED = 0x8000


def _hdr(length: int, atype: int) -> int:
    """An attribute header (native u16 len, u16 type) as the big-endian u32 the fast path reads."""
    return int(struct.unpack("!I", struct.pack("=HH", length, atype))[0])


# Fast path: an IPv4 event without zone lays out, at fixed offsets, the original tuple { ip { src, dst },
# proto { num, sport, dport } }, the reply tuple (its source read, the rest skipped), then CTA_ID and
# CTA_STATUS (the order of ctnetlink_conntrack_event). Every attribute header on the way is compared with
# what it must be; anything else (IPv6, zones, dump replies, other kernels) takes the attribute walk.
# One unpack in network byte order reads the values as they are (ports, id, status) and each header as
# a constant (its native bytes read big-endian), so nothing is converted afterwards.
_FAST4 = struct.Struct("!16xB3x" "III4sI4s" "IIB3xIH2xIH2x" "III4s36x" "IIII")
_FAST4_SIZE = _FAST4.size
_FAST4_HDRS = (_hdr(52, CTA_TUPLE_ORIG | NLA_F_NESTED), _hdr(20, CTA_TUPLE_IP | NLA_F_NESTED),
               _hdr(8, CTA_IP_V4_SRC), _hdr(8, CTA_IP_V4_DST), _hdr(28, CTA_TUPLE_PROTO | NLA_F_NESTED),
               _hdr(5, CTA_PROTO_NUM), _hdr(6, CTA_PROTO_SRC_PORT), _hdr(6, CTA_PROTO_DST_PORT),
               _hdr(52, CTA_TUPLE_REPLY | NLA_F_NESTED), _hdr(20, CTA_TUPLE_IP | NLA_F_NESTED),
               _hdr(8, CTA_IP_V4_SRC), _hdr(8, CTA_ID), _hdr(8, CTA_STATUS))
_FAST4_UNPACK = _FAST4.unpack_from
_AF_INET = 2
_DNS_PROTOS = (PROTO_UDP, PROTO_TCP)


def _tuple(buf: bytes | bytearray | memoryview, p: int, end: int) -> tuple[bytes, bytes, int, int, int]:
    """(src, dst, proto, sport, dport) of a CTA_TUPLE_* payload from p to end."""
    src = dst = b""
    proto = sport = dport = 0
    while p + 4 <= end:
        alen, atype = _HH(buf, p)
        if alen < 4 or p + alen > end:
            raise ParseError(f"garbled conntrack tuple attribute at offset {p} (length {alen})")
        atype &= NLA_TYPE_MASK
        q, qe = p + 4, p + alen
        if atype == CTA_TUPLE_IP:
            while q + 4 <= qe:
                qlen, qtype = _HH(buf, q)
                if qlen < 4 or q + qlen > qe:
                    raise ParseError(f"garbled address attribute at offset {q}")
                qtype &= NLA_TYPE_MASK
                if qtype in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = bytes(buf[q + 4 : q + qlen])
                elif qtype in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = bytes(buf[q + 4 : q + qlen])
                q += (qlen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            while q + 4 <= qe:
                qlen, qtype = _HH(buf, q)
                if qlen < 4 or q + qlen > qe:
                    raise ParseError(f"garbled protocol attribute at offset {q}")
                qtype &= NLA_TYPE_MASK
                if qtype == CTA_PROTO_NUM and qlen >= 5:
                    proto = buf[q + 4]
                elif qtype == CTA_PROTO_SRC_PORT and qlen >= 6:
                    sport = _U16(buf, q + 4)[0]
                elif qtype == CTA_PROTO_DST_PORT and qlen >= 6:
                    dport = _U16(buf, q + 4)[0]
                q += (qlen + 3) & ~3
        p += (alen + 3) & ~3
    return src, dst, proto, sport, dport


def parse_flow(buf: bytes | bytearray | memoryview, off: int, end: int) -> Flow | None:
    """The flow of the conntrack message at buf[off:end] (header included), or None unless it is UDP or
    TCP to port 53. Raises ParseError on a garbled message."""
    if end - off >= _FAST4_SIZE and buf[off + 16] == _AF_INET:
        (_fam, oh, ih, sh, src, dh, dst, ph, nh, proto, sph, sport, dph, dport, rh, rih, rsh, rsrc, idh, ct_id,
         sth, status) = _FAST4_UNPACK(buf, off)
        if (oh, ih, sh, dh, ph, nh, sph, dph, rh, rih, rsh, idh, sth) == _FAST4_HDRS:
            if dport != DNS_PORT or proto not in _DNS_PROTOS:
                return None
            return proto, src, dst, sport, DNS_PORT, rsrc, status, ct_id
    return _walk(buf, off, end)


def _walk(buf: bytes | bytearray | memoryview, off: int, end: int) -> Flow | None:
    p = off + _ATTRS
    proto = sport = dport = status = ct_id = 0
    src = dst = rsrc = b""
    seen_orig = False
    while p + 4 <= end:
        alen, atype = _HH(buf, p)
        if alen < 4 or p + alen > end:
            raise ParseError(f"garbled conntrack attribute at offset {p} (length {alen})")
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_ORIG:
            src, dst, proto, sport, dport = _tuple(buf, p + 4, p + alen)
            if dport != DNS_PORT or proto not in (PROTO_UDP, PROTO_TCP):
                return None
            seen_orig = True
        elif atype == CTA_TUPLE_REPLY:
            rsrc = _tuple(buf, p + 4, p + alen)[0]
        elif atype == CTA_STATUS and alen >= 8:
            status = _U32(buf, p + 4)[0]
        elif atype == CTA_ID and alen >= 8:
            ct_id = _U32(buf, p + 4)[0]
        p += (alen + 3) & ~3
    if not seen_orig:
        return None
    return proto, src, dst, sport, dport, rsrc, status, ct_id


def iter_flows(buf: bytes | bytearray | memoryview, n: int) -> Iterator[tuple[int, Flow | None]]:
    """Yield (message type, flow or None) for each netlink message in buf[:n]; (type, None) for a message
    that is no DNS flow (another message type, or the filter is off)."""
    off = 0
    while off + 16 <= n:
        mlen, mtype = _MSG(buf, off)
        if mlen < 16 or off + mlen > n:
            raise ParseError(f"truncated netlink message at offset {off} (length {mlen}, {n - off} left)")
        if mtype in (CT_NEW, CT_DELETE):
            yield mtype, parse_flow(buf, off, off + mlen)
        else:
            yield mtype, None
        off += (mlen + 3) & ~3


# (is NEW, proto, orig src, orig dst, sport, reply src, status, id): a Flow without its dport (always 53),
# with the event type in front: what the listener hands the accounting for each DNS event.
Event = tuple[bool, int, bytes, bytes, int, bytes, int, int]


def parse_events(buf: bytes | bytearray | memoryview, n: int, out: list[Event]) -> int:
    """Append the DNS flows of the NEW and DELETE messages in buf[:n] to `out`, one Event each; return how
    many messages were no DNS flow. The same reading as `parse_flow`, with its fast path inline (this runs
    for every event the socket delivers, DNS or not)."""
    off = 0
    other = 0
    while off + 16 <= n:
        mlen, mtype = _MSG(buf, off)
        if mlen < 16 or off + mlen > n:
            raise ParseError(f"truncated netlink message at offset {off} (length {mlen}, {n - off} left)")
        if mtype != CT_NEW and mtype != CT_DELETE:
            other += 1
            off += (mlen + 3) & ~3
            continue
        if mlen >= _FAST4_SIZE and buf[off + 16] == _AF_INET:
            (_fam, oh, ih, sh, src, dh, dst, ph, nh, proto, sph, sport, dph, dport, rh, rih, rsh, rsrc, idh, ct_id,
             sth, status) = _FAST4_UNPACK(buf, off)
            if (oh, ih, sh, dh, ph, nh, sph, dph, rh, rih, rsh, idh, sth) == _FAST4_HDRS:
                if dport != DNS_PORT or proto not in _DNS_PROTOS:
                    other += 1
                else:
                    out.append((mtype == CT_NEW, proto, src, dst, sport, rsrc, status, ct_id))
                off += (mlen + 3) & ~3
                continue
        flow = _walk(buf, off, off + mlen)
        if flow is None:
            other += 1
        else:
            proto, src, dst, sport, _dport, rsrc, status, ct_id = flow
            out.append((mtype == CT_NEW, proto, src, dst, sport, rsrc, status, ct_id))
        off += (mlen + 3) & ~3
    return other
