"""Conntrack statistics straight from the kernel over a raw NETLINK_NETFILTER socket.

Two ctnetlink requests give everything the `conntrack` collector needs:
- `IPCTNL_MSG_CT_GET_STATS_CPU` (a dump): one message per CPU with found, invalid, insert,
  insert_failed, drop, early_drop, error, search_restart, clash_resolve, chain_toolong;
- `IPCTNL_MSG_CT_GET_STATS`: the entry count of this network namespace and the global maximum.

Why not `/proc/net/stat/nf_conntrack`: kernels built without CONFIG_NF_CONNTRACK_PROCFS (many since
5.15) do not have it. Why not pyroute2's NFCTSocket: its generic decoder costs about 1.1 ms per sample,
a hand-built request parsed with `struct` about 16 µs, on one long-lived socket.
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass, field

from exporter.netlink import (
    NFGENMSG,
    NFNL_SUBSYS_CTNETLINK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    RETRY_ERRNOS,
    NetlinkError,
    ParseError,
    be32,
    build_request,
    error_code,
    iter_attrs,
    iter_messages,
    open_socket,
    payloads,
)

IPCTNL_MSG_CT_GET_STATS_CPU = 4
IPCTNL_MSG_CT_GET_STATS = 5

# enum ctattr_stats_cpu (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
CPU_STAT_ATTRS: dict[int, str] = {
    2: "found",
    4: "invalid",
    8: "insert",
    9: "insert_failed",
    10: "drop",
    11: "early_drop",
    12: "error",
    13: "search_restart",
    14: "clash_resolve",
    15: "chain_toolong",
}
CPU_STAT_NAMES: tuple[str, ...] = tuple(CPU_STAT_ATTRS.values())
# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2



@dataclass
class ConntrackStats:
    """One sample: per-CPU counters, this namespace's entry count, the table limit."""

    per_cpu: dict[int, dict[str, int]] = field(default_factory=dict)
    entries: int | None = None
    limit: int | None = None

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CPU_STAT_NAMES, 0)
        for stats in self.per_cpu.values():
            for k, v in stats.items():
                out[k] += v
        return out


def parse_stats_cpu(datagrams: list[bytes], seq: int | None = None) -> dict[int, dict[str, int]]:
    """Parse the reply datagrams of a GET_STATS_CPU dump into {cpu: {stat: value}}."""
    out: dict[int, dict[str, int]] = {}
    for payload in payloads(datagrams, seq, IPCTNL_MSG_CT_GET_STATS_CPU, "conntrack per-CPU statistics request"):
        cpu = NFGENMSG.unpack_from(payload)[2]  # res_id carries the CPU number
        stats = dict.fromkeys(CPU_STAT_NAMES, 0)
        for atype, data in iter_attrs(payload, NFGENMSG.size):
            name = CPU_STAT_ATTRS.get(atype)
            if name is not None:
                stats[name] = be32(data)
        out[cpu] = stats
    return out


def parse_stats_global(datagrams: list[bytes], seq: int | None = None) -> tuple[int | None, int | None]:
    """Parse the reply of a GET_STATS request into (entries, max_entries)."""
    entries = limit = None
    for payload in payloads(datagrams, seq, IPCTNL_MSG_CT_GET_STATS, "conntrack count request"):
        for atype, data in iter_attrs(payload, NFGENMSG.size):
            if atype == CTA_STATS_GLOBAL_ENTRIES:
                entries = be32(data)
            elif atype == CTA_STATS_GLOBAL_MAX_ENTRIES:
                limit = be32(data)
    if entries is None:
        raise ParseError("conntrack count reply without CTA_STATS_GLOBAL_ENTRIES")
    return entries, limit


class NetlinkStatsSource:
    """Samples conntrack statistics on one long-lived netlink socket (thread-safe).

    `record` (a list) receives every raw reply, for `conntrack-dns-exporter record`.
    """

    def __init__(self, timeout: float = 2.0, subsys: int = NFNL_SUBSYS_CTNETLINK,
                 record: list[tuple[str, list[bytes]]] | None = None) -> None:
        self._timeout = timeout
        self._subsys = subsys
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._buf = bytearray(65536)
        self._record = record

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = open_socket()
            s.settimeout(self._timeout)
            self._sock = s
        return self._sock

    def _request(self, msg_type: int, flags: int, what: str) -> tuple[int, list[bytes]]:
        """Send one request and collect its reply datagrams; one retry on EBUSY/ENOBUFS/EINTR."""
        for attempt in (0, 1):
            try:
                return self._request_once(msg_type, flags)
            except NetlinkError as e:
                if attempt == 0 and e.errno in RETRY_ERRNOS:
                    if e.errno == errno.ENOBUFS:  # the socket lost messages: start on a fresh one
                        self._drop_socket()
                    continue
                raise
            except TimeoutError:
                self._drop_socket()
                raise NetlinkError(errno.ETIMEDOUT, what) from None
            except OSError as e:
                self._drop_socket()
                if attempt == 0 and e.errno in RETRY_ERRNOS:
                    continue
                raise NetlinkError(e.errno or errno.EIO, what) from None
        raise AssertionError("unreachable")

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request_once(self, msg_type: int, flags: int) -> tuple[int, list[bytes]]:
        sock = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        sock.send(build_request(msg_type, flags, seq, self._subsys))
        datagrams: list[bytes] = []
        while True:
            n = sock.recv_into(self._buf)
            dgram = bytes(self._buf[:n])
            done = False
            mine = False
            for mtype, _mflags, mseq, payload in iter_messages(dgram):
                if mseq != seq:
                    continue  # a late reply to an earlier, timed-out request
                mine = True
                if mtype == NLMSG_ERROR:
                    err = error_code(payload)
                    if err:
                        raise NetlinkError(err, "conntrack statistics request")
                    done = True
                elif mtype == NLMSG_DONE:
                    done = True
            if mine:
                datagrams.append(dgram)
            if done:
                return seq, datagrams

    def sample(self) -> ConntrackStats:
        with self._lock:
            seq, cpu_replies = self._request(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP,
                                             "conntrack per-CPU statistics request")
            # The kernel flags this single reply NLM_F_MULTI without a closing NLMSG_DONE: ask for an
            # ACK, which ends the exchange.
            seq2, glob_replies = self._request(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST | NLM_F_ACK,
                                               "conntrack count request")
        if self._record is not None:
            self._record.append(("stats_cpu", cpu_replies))
            self._record.append(("stats", glob_replies))
        entries, limit = parse_stats_global(glob_replies, seq2)
        return ConntrackStats(per_cpu=parse_stats_cpu(cpu_replies, seq), entries=entries, limit=limit)
