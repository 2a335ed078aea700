"""Netlink plumbing shared by every NETLINK_NETFILTER user (conntrack statistics, the table dump, the
event listener): the socket opener, request builder, message and attribute walkers, and the mapping of
kernel errors to one actionable line (`NetlinkError`, a `CollectorError` with a bounded reason).

The kernel answers ctnetlink requests only to a process with CAP_NET_ADMIN in the network namespace
whose table it reads; the error says so in one line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence

from exporter.core.errors import CollectorError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (network order)
NLATTR = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK = 0x3FFF

RETRY_ERRNOS = (errno.EBUSY, errno.ENOBUFS, errno.EINTR, errno.EAGAIN)


class NetlinkError(CollectorError):
    """A ctnetlink request failed; the message says what to do about it."""

    def __init__(self, err: int, what: str) -> None:
        self.errno = err
        if err == errno.EPERM or err == errno.EACCES:
            msg = (f"{what}: permission denied (EPERM): the exporter needs CAP_NET_ADMIN in the network "
                   "namespace it monitors (DaemonSet: securityContext.capabilities.add [NET_ADMIN])")
            reason = "permission"
        elif err in (errno.EPROTONOSUPPORT, errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT, errno.EINVAL):
            # The statistics requests carry no attributes: EINVAL means the kernel has no ctnetlink
            # subsystem to answer them (nfnetlink without nf_conntrack_netlink).
            msg = (f"{what}: nf_conntrack netlink is not available ({errno.errorcode.get(err, err)}): "
                   "load the nf_conntrack and nf_conntrack_netlink modules")
            reason = "unavailable"
        elif err == errno.ETIMEDOUT:
            msg = f"{what}: no answer from the kernel within the timeout"
            reason = "timeout"
        else:
            msg = f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
            reason = "error"
        super().__init__(msg, reason)


class ParseError(CollectorError):
    reason = "parse"


def build_request(msg_type: int, flags: int, seq: int, subsys: int = NFNL_SUBSYS_CTNETLINK,
                  family: int = socket.AF_UNSPEC, attrs: bytes = b"") -> bytes:
    payload = NFGENMSG.pack(family, 0, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), (subsys << 8) | msg_type, flags, seq, 0) + payload


def iter_messages(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """Yield (type, flags, seq, payload) for each netlink message in a datagram."""
    view = memoryview(buf)
    off = 0
    n = len(view)
    while off + NLMSGHDR.size <= n:
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(view, off)
        if length < NLMSGHDR.size or off + length > n:
            raise ParseError(f"truncated netlink message at offset {off} (length {length}, {n - off} left)")
        yield mtype, flags, seq, view[off + NLMSGHDR.size : off + length]
        off += (length + 3) & ~3


def iter_attrs(payload: memoryview, off: int = 0) -> Iterator[tuple[int, memoryview]]:
    n = len(payload)
    while off + NLATTR.size <= n:
        alen, atype = NLATTR.unpack_from(payload, off)
        if alen < NLATTR.size or off + alen > n:
            raise ParseError(f"truncated netlink attribute at offset {off}")
        yield atype & NLA_TYPE_MASK, payload[off + NLATTR.size : off + alen]
        off += (alen + 3) & ~3


def be32(data: memoryview) -> int:
    if len(data) < 4:
        raise ParseError("short u32 attribute")
    return int(struct.unpack_from("!I", data)[0])


def error_code(payload: memoryview) -> int:
    """The positive errno of an NLMSG_ERROR payload (0 for an ACK)."""
    if len(payload) < 4:
        raise ParseError("short NLMSG_ERROR")
    return -int(struct.unpack_from("=i", payload)[0])


def payloads(datagrams: list[bytes], seq: int | None, msg_type: int, what: str,
             subsys: int = NFNL_SUBSYS_CTNETLINK) -> Iterator[memoryview]:
    """Payloads of the nfnetlink messages of `msg_type` in a reply; an error message raises."""
    want = (subsys << 8) | msg_type
    for dgram in datagrams:
        for mtype, _flags, mseq, payload in iter_messages(dgram):
            if seq is not None and mseq != seq:
                continue
            if mtype == NLMSG_ERROR:
                err = error_code(payload)
                if err:
                    raise NetlinkError(err, what)
            elif mtype == want:
                if len(payload) < NFGENMSG.size:
                    raise ParseError("short nfgenmsg")
                yield payload


def open_socket(recv_timeout: float | None = None) -> socket.socket:
    """A bound NETLINK_NETFILTER socket in the caller's network namespace; failures as NetlinkError.

    `recv_timeout` sets SO_RCVTIMEO (a kernel-side timeout that also holds for `recv_into` on another
    thread); without it the socket is left blocking for the caller to configure."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise NetlinkError(e.errno or errno.EPROTONOSUPPORT, "opening a NETLINK_NETFILTER socket") from None
    try:
        s.bind((0, 0))
        if recv_timeout is not None:
            sec = int(recv_timeout)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                         struct.pack("ll", sec, int((recv_timeout - sec) * 1e6)))
    except OSError as e:
        s.close()
        raise NetlinkError(e.errno or errno.EIO, "setting up the netlink socket") from None
    return s




# ---- multicast listeners (the conntrack event stream) ---------------------------------------------------------
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_RCVBUFFORCE = 33
_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def subscribe(sock: socket.socket, groups: Iterable[int]) -> None:
    """Join netlink multicast groups (NETLINK_ADD_MEMBERSHIP); failures as NetlinkError."""
    for group in groups:
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO, f"joining netlink multicast group {group}") from None


def attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program ((code, jt, jf, k) instructions) with SO_ATTACH_FILTER.

    The kernel copies the program during the call, so the buffer only has to live until it returns."""
    insns = b"".join(_SOCK_FILTER.pack(code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program)
    buf = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as e:
        raise NetlinkError(e.errno or errno.EINVAL, "attaching the BPF socket filter") from None


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Set the receive buffer to `size` bytes: SO_RCVBUFFORCE (CAP_NET_ADMIN: above rmem_max), else
    SO_RCVBUF (capped at net.core.rmem_max). Returns what the kernel granted (it doubles the request)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
