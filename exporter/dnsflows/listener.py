"""The background listener: a NETLINK_NETFILTER socket joined to the NFNLGRP_CONNTRACK_NEW and
NFNLGRP_CONNTRACK_DESTROY multicast groups of the exporter's network namespace (the node's, under
hostNetwork), with the BPF filter of `exporter.dnsflows.bpf` attached before joining, so only DNS
events ever reach it. One thread; the kernel queues events in the socket's receive buffer
(`--collector.dnsflows.receive-buffer`, SO_RCVBUFFORCE with CAP_NET_ADMIN).

- ENOBUFS: the buffer overflowed and the kernel dropped events (how many, it does not say). Counted
  (`events_lost`), logged once per burst (overflows less than BURST_GAP apart), and followed by a
  resync: a dump of the table, of which the port-53 entries are read (at most one resync per
  RESYNC_MIN_GAP), to find the exporter's own probe flows whose NEW event was lost. Counts of the lost
  events themselves cannot be recovered, which the docs say.
- Socket errors (no permission, no ctnetlink): listener down (`listener_up 0`), one log line, retried
  with a growing back-off.
- `nf_conntrack_events` = 0: the kernel sends no events at all. Re-read every SYSCTL_EVERY seconds and
  reported (`events_enabled`); one log line on each change. The exporter never writes the sysctl.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from exporter import netlink
from exporter.core import logs
from exporter.core.errors import CollectorError
from exporter.dnsflows import native
from exporter.dnsflows.bpf import dns_port_filter
from exporter.dnsflows.flows import FlowStats
from exporter.dnsflows.parse import Event, iter_flows, parse_events

NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
IPCTNL_MSG_CT_GET = 1
EVENTS_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_events")
SYSCTL_EVERY = 30.0
RESYNC_MIN_GAP = 60.0  # the filtered dumps of a full table cost about 0.3 s of CPU (one unfiltered: 1.4 s)
RESYNC_MAX_SECONDS = 10.0
BATCH_BIG = 1024  # events in one drain above which the listener does not pause (fewer with a small buffer)
BATCH_BYTES = 4096  # receive buffer per event of such a batch: a batch fills at most ~1/6 of the buffer
BATCH_PAUSE = 0.5  # seconds a pause between two drains lasts at most (a light stream: 2 wake-ups/s)
EVENT_BYTES = 1300  # receive buffer one queued event takes (of the doubled size the kernel grants)
# Events/s the kernel's conntrack garbage collection sends in a burst (the DESTROY events of the entries
# that expired since its last pass; measured: about 37,000/s on the 2-vCPU VM, docs/dnsflows.md). A pause
# is short enough that such a burst, starting as the pause does, fills at most half the buffer.
BURST_RATE = 50_000
BATCH_FIRST = 0.05  # seconds of the first pause after a quiet time, which measures the stream's rate
DRAIN_MAX = 1024  # datagrams read (and accounted as one batch) before the listener looks at stop again
BURST_GAP = 10.0  # seconds without an overflow that end a burst (for the log line)
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
RECV_BUFFER = 1 << 16
# The event socket's receive buffer by default (`--collector.dnsflows.receive-buffer`): kernel memory, used
# only while events wait to be read. 16 MiB (the kernel doubles it: about 25,800 events) lets the listener
# pause 0.26 s between drains under the burst cap above (4 MiB: 0.065 s), so a steady stream costs about 4
# wake-ups a second instead of 16; each costs the thread some 100 µs on these VMs (docs/dnsflows.md).
RECEIVE_BUFFER = 16 << 20


class EventSocket(Protocol):
    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def open_events(receive_buffer: int, use_filter: bool = True) -> socket.socket:
    """The event socket: filter first, then the groups, so no unfiltered event is ever queued."""
    sock = netlink.open_socket()  # never blocks in recv: the listener polls it, then reads with MSG_DONTWAIT
    try:
        netlink.set_receive_buffer(sock, receive_buffer)
        if use_filter:
            netlink.attach_filter(sock, dns_port_filter())
        netlink.subscribe(sock, (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY))
    except BaseException:
        sock.close()
        raise
    return sock


def read_events_sysctl(path: Path = EVENTS_SYSCTL) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# The resync dump, filtered in the kernel (CTA_FILTER, Linux 5.8): only entries whose original tuple is
# UDP or TCP to port 53 become messages, one dump per family and protocol (the filter takes one of each).
# The kernel still walks the table, but builds and sends no message for the rest: on a full table four
# walks cost a quarter of one unfiltered dump parsed here. A kernel without the filter ignores it (an
# attribute it does not know) and sends every entry of the family; the walk below keeps port 53 either way.
CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 2, 1, 3
CTA_FILTER, CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 25, 1, 2
CTA_FILTER_F_PROTO_NUM, CTA_FILTER_F_PROTO_DST_PORT = 1 << 3, 1 << 5
_NESTED = 0x8000
DNS_DUMPS = tuple((family, proto) for family in (socket.AF_INET, socket.AF_INET6)
                  for proto in (socket.IPPROTO_UDP, socket.IPPROTO_TCP))


def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def dns_dump_request(family: int, proto: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_GET dump of the entries of `family` whose original tuple is `proto` to port 53."""
    orig = _attr(CTA_TUPLE_ORIG | _NESTED, _attr(CTA_TUPLE_PROTO | _NESTED, _attr(CTA_PROTO_NUM, bytes([proto]))
                                                 + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", 53))))
    flags = _attr(CTA_FILTER | _NESTED, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack(
        "=I", CTA_FILTER_F_PROTO_NUM | CTA_FILTER_F_PROTO_DST_PORT)) + _attr(CTA_FILTER_REPLY_FLAGS, b"\0" * 4))
    return netlink.build_request(IPCTNL_MSG_CT_GET, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, family=family,
                                 attrs=orig + flags)


def dump_dns_flows(stats: FlowStats, deadline: float) -> list[int]:
    """Dump the table's port-53 entries; the conntrack ids of those that are the exporter's own probes."""
    own: list[int] = []
    sock = netlink.open_socket(recv_timeout=1.0)
    try:
        buf = bytearray(RECV_BUFFER)
        for seq, (family, proto) in enumerate(DNS_DUMPS, 1):
            sock.send(dns_dump_request(family, proto, seq))
            if not _read_dump(sock, buf, stats, own, deadline):
                break
    finally:
        sock.close()
    return own


def _read_dump(sock: socket.socket, buf: bytearray, stats: FlowStats, own: list[int], deadline: float) -> bool:
    """Read one dump to its end, adding own probe flows to `own`; False if it did not end in time."""
    while time.monotonic() < deadline:
        n = sock.recv_into(buf)
        for mtype, flow in iter_flows(buf, n):
            if mtype == netlink.NLMSG_DONE:
                return True
            if mtype == netlink.NLMSG_ERROR:
                err = netlink.error_code(memoryview(buf)[16:n]) if n >= 20 else errno.EIO
                if err:
                    raise netlink.NetlinkError(err, "conntrack table dump (resync)")
                return True
            if flow is not None and stats.own(flow):
                own.append(flow[7])
        if n == 0:
            break
    return False


class FlowListener:
    """Receives conntrack events on its own thread and feeds them into a `FlowStats`."""

    name = "dnsflows"

    def __init__(self, stats: FlowStats, *, receive_buffer: int = RECEIVE_BUFFER, use_filter: bool = True,
                 open_socket: Callable[[], EventSocket] | None = None,
                 events_sysctl: Callable[[], int | None] = read_events_sysctl,
                 resync: Callable[[FlowStats, float], list[int]] = dump_dns_flows,
                 native_drain: bool = True) -> None:
        self.stats = stats
        self.use_filter = use_filter
        self._open = open_socket or (lambda: open_events(receive_buffer, use_filter))
        self._sysctl = events_sysctl
        self._resync = resync
        self.up = False
        self.events_enabled: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_resync: float | None = None
        self._last_lost = float("-inf")
        self._wake: tuple[int, int] | None = None
        # an event takes about 1.3 KB of the buffer (which the kernel doubles): a batch of this size leaves
        # room for the bursts of DESTROY events the kernel's garbage collection sends
        self._batch = max(16, min(BATCH_BIG, receive_buffer // BATCH_BYTES))
        self._pause = min(BATCH_PAUSE, 0.5 * 2 * receive_buffer / EVENT_BYTES / BURST_RATE)
        self._log = logs.get("dnsflows")
        self.drain = "native" if native_drain and native.available() else "python"

    def start(self) -> None:
        self._log.debug("DNS flow listener: %s drain", self.drain)
        self._stop.clear()
        self.check_sysctl()
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._loop, args=(self._wake[0],), name="dnsflows", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                os.write(wake[1], b"\0")  # ends the thread's wait for events at once
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still busy (a daemon thread): leave its pipe open
        if wake is not None:
            self._wake = None
            for fd in wake:
                os.close(fd)

    def check_sysctl(self) -> None:
        value = self._sysctl()
        if value == self.events_enabled:
            return
        if value == 0:
            self._log.warning("nf_conntrack_events is 0: the kernel sends no conntrack events, so no DNS flows "
                              "are seen; set net.netfilter.nf_conntrack_events=2 (or 1) on the node to enable "
                              "them (the exporter never changes it)")
        elif self.events_enabled == 0:
            self._log.warning("nf_conntrack_events enabled again", extra={"kv": {"value": value}})
        self.events_enabled = value

    def _loop(self, wake: int) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                sock = self._open()
            except CollectorError as e:
                if self.up or failures == 0:
                    self._log.warning("DNS flow listener down: %s", e, extra={"kv": {"reason": e.reason}})
                self.up = False
                self._stop.wait(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
                continue
            if failures:
                self._log.warning("DNS flow listener up again")
            failures = 0
            self.up = True
            try:
                self._receive(sock, wake)
            finally:
                sock.close()

    def _receive(self, sock: EventSocket, wake: int) -> None:
        """Wait for events without a timeout (an idle listener costs no wake-ups; `stop()` writes to the
        wake pipe, and the sysctl re-read bounds the wait), then read what is queued. A steady stream is
        read in batches: after a drain that found events the listener pauses and drains again without
        waiting, one wake-up per batch rather than one per event, which would cost more than parsing them
        (and a batch read while the caches are warm costs less per event). The pause lasts until about
        one batch (BATCH_BIG events, fewer with a small receive buffer) is queued at the rate of the last
        drain, at most BATCH_PAUSE (BATCH_FIRST after a quiet time, when the rate is not known yet); the
        receive buffer holds them meanwhile. A full batch means a heavy stream, which is read on at once
        so that the buffer does not overflow."""
        # the C drain reads a real socket's fd (a test's stand-in goes through the Python drain)
        native_drain = native.new_drain(DRAIN_MAX) if self.drain == "native" and isinstance(sock, socket.socket) \
            else None
        buf = bytearray(RECV_BUFFER if native_drain is None else 0)  # the native drain has its own
        stats = self.stats
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(wake, select.POLLIN)
        # the pause between two drains waits on the wake pipe alone: a poll with a timeout costs the thread
        # about a third less CPU than threading.Event.wait (a lock, a condition) on this kind of VM, where
        # every sleep costs tens of microseconds (docs/dnsflows.md)
        pauser = select.poll()
        pauser.register(wake, select.POLLIN)
        next_sysctl = time.monotonic() + SYSCTL_EVERY
        wait = True
        ended = time.monotonic()  # when the previous drain ended
        while not self._stop.is_set():
            woke = wait
            if wait:
                poller.poll(max(0, math.ceil((next_sysctl - time.monotonic()) * 1000)))
                if self._stop.is_set():
                    return
            stats.refresh()  # the pod map and targets, at most once per REFRESH seconds, before accounting
            began = time.monotonic()
            read = self._drain_native(sock, native_drain) if native_drain else self._drain(sock, buf)
            if read < 0:
                self.up = False
                return
            now = time.monotonic()
            if now >= next_sysctl:
                next_sysctl = now + SYSCTL_EVERY
                self.check_sysctl()
            wait = read == 0
            if 0 < read < self._batch:
                # after a quiet time the rate is unknown: a short pause measures it; then the events read
                # came in since the previous drain ended
                pause = (min(BATCH_FIRST, self._pause) if woke
                         else min(self._pause, self._batch * (began - ended) / read))
                pauser.poll(math.ceil(pause * 1000))
            ended = now

    def _drain(self, sock: EventSocket, buf: bytearray) -> int:
        """Read what is queued without waiting (at most DRAIN_MAX datagrams, so that a stop is seen even
        under a flood) and account it as one batch. The number of datagrams read; -1 if the socket failed."""
        stats = self.stats
        recv_into = sock.recv_into
        batch: list[Event] = []
        other = read = 0
        try:
            while read < DRAIN_MAX:
                try:
                    n = recv_into(buf, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        self._log.warning("DNS flow listener: receive failed: %s; reopening", e.strerror)
                        return -1
                    stats.account(batch, other)  # what came before the overflow, then the resync
                    batch, other = [], 0
                    self._overflowed()
                    continue
                if n == 0:
                    break
                read += 1
                try:
                    other += parse_events(buf, n, batch)
                except CollectorError as e:  # a garbled event: count it, keep listening
                    other += 1
                    self._log.debug("unreadable conntrack event: %s", e)
        finally:
            stats.account(batch, other)
        return read

    def _drain_native(self, sock: EventSocket, drain: native.NativeDrain) -> int:
        """`_drain` in C (exporter.dnsflows.native): the same reading, parsing and accounting; a batch
        is accounted at each stop of the C loop (an overflow, full record buffers, the end)."""
        stats = self.stats
        fd = sock.fileno()
        read = 0
        while read < DRAIN_MAX:
            got = drain.read(fd, DRAIN_MAX - read)
            read += got.read
            stats.account(got.events, got.other)
            if got.status == native.ENOBUFS:
                self._overflowed()
            elif got.status == native.ERROR:
                self._log.warning("DNS flow listener: receive failed: %s; reopening", os.strerror(got.errno))
                return -1
            elif got.status != native.FULL or not got.read:
                break
        return read

    def _overflowed(self) -> None:
        """ENOBUFS: the kernel dropped events. Counted, one log line per burst, and a resync."""
        self.stats.lost_events()
        now = time.monotonic()
        if now - self._last_lost > BURST_GAP:
            self._log.warning("conntrack events lost (ENOBUFS: the receive buffer overflowed); resyncing from a "
                              "table dump; raise --collector.dnsflows.receive-buffer if this repeats")
        self._last_lost = now
        self._resync_once()

    def _resync_once(self) -> None:
        now = time.monotonic()
        if self._last_resync is not None and now - self._last_resync < RESYNC_MIN_GAP:
            return
        self._last_resync = now
        try:
            own = self._resync(self.stats, now + RESYNC_MAX_SECONDS)
        except (CollectorError, OSError) as e:
            self._log.warning("resync after lost conntrack events failed: %s", e)
            return
        self.stats.resynced(own)
        self._log.info("resynced after lost conntrack events", extra={"kv": {"own_probe_flows": len(own)}})
