"""One conntrack table dump at a time: the request, the receive, restarts and the time cap.

With the native parser (`exporter.table.native`, the usual case) the scanning thread receives and parses
in turn: parsing a datagram takes about a tenth of what the kernel spends building it inside `recv`,
and both the `recv` and the ctypes call release the GIL, so scrapes served meanwhile are not held up.

With the Python parser (`exporter.table.parse`, the fallback) parsing costs as much as the kernel's
part: a second thread receives the next datagrams (a few reused 64 KB buffers) while the scanning thread
parses, so the two overlap, and the scanning thread sleeps briefly every few datagrams so that it does
not hold the GIL for long stretches.

A dump the kernel interrupts (ENOBUFS, EINTR, EBUSY, or a message flagged NLM_F_DUMP_INTR) is
restarted once from scratch; a second interruption, a scan exceeding its time cap, or a garbled or
truncated message leaves a *partial* scan: what was counted so far, flagged, with one log line.
"""

from __future__ import annotations

import errno
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from exporter.core.errors import CollectorError
from exporter.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    RETRY_ERRNOS,
    NetlinkError,
    ParseError,
    build_request,
    open_socket,
)
from exporter.table.native import NativeDumpParser, new_parser
from exporter.table.parse import IPCTNL_MSG_CT_GET, RECV_BUFFER, Aggregate, DumpParser

_HH = struct.Struct("=HH").unpack_from
PYTHON_PACE = 0.0002  # seconds slept every `pace_every` datagrams with the Python parser


class DumpSocket(Protocol):
    def send(self, data: bytes, /) -> int: ...

    def recv_into(self, buffer: bytearray, /) -> int: ...

    def close(self) -> None: ...


def open_netlink(recv_timeout: float = 5.0) -> socket.socket:
    """A NETLINK_NETFILTER socket in the caller's network namespace, blocking with SO_RCVTIMEO."""
    return open_socket(recv_timeout)


def dump_request(seq: int = 1) -> bytes:
    return build_request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family=socket.AF_UNSPEC)


@dataclass
class ScanResult:
    """What one scan found (immutable once published)."""

    agg: Aggregate
    started: float  # time.time() at start
    duration: float  # wall seconds
    cpu: float  # thread CPU seconds
    partial: bool
    reason: str = ""  # why partial: timeout, interrupted, parse, error, stopped
    message: str = ""
    restarts: int = 0
    stale_checked: bool = False


class Scanner:
    """Runs one dump at a time over sockets from `open_socket` (the netlink socket, or a replay).

    `pace` (seconds) is slept after every `pace_every` datagrams: with the recv calls themselves, that
    keeps the Python parser from holding the GIL for long stretches, so scrapes are not delayed. By default
    (None) only the Python parser paces: the native one holds the GIL for a few µs per datagram (the recv
    and the ctypes call both release it), and the sleeps would cost more CPU than its parsing (about
    0.08 µs per entry, measured).
    """

    def __init__(self, open_socket: Callable[[], DumpSocket] = open_netlink, max_duration: float = 30.0,
                 pace: float | None = None, pace_every: int = 4, record: list[bytes] | None = None) -> None:
        self._open = open_socket
        self.max_duration = max_duration
        self.pace = pace
        self.pace_every = pace_every
        self._record = record
        self._stop = threading.Event()
        self._reader_cpu = 0.0

    def abort(self) -> None:
        """Stop a scan in progress (it returns reason "stopped"), and every later one until `resume()`."""
        self._stop.set()

    def resume(self) -> None:
        self._stop.clear()

    def scan(self, source_keys: Iterable[bytes] = (), dns_servers: Iterable[bytes] | None = None) -> ScanResult:
        keys = list(source_keys)
        servers = frozenset(dns_servers) if dns_servers is not None else None
        started = time.time()
        t0 = time.monotonic()
        c0 = time.thread_time()
        deadline = t0 + self.max_duration
        restarts = 0
        self._reader_cpu = 0.0
        while True:
            parser = new_parser(keys, servers)
            reason, message = self._run(parser, deadline)
            if reason == "interrupted" and restarts == 0 and time.monotonic() < deadline:
                restarts += 1
                continue
            break
        return ScanResult(agg=parser.agg, started=started, duration=time.monotonic() - t0,
                          cpu=time.thread_time() - c0 + self._reader_cpu, partial=bool(reason), reason=reason,
                          message=message, restarts=restarts, stale_checked=servers is not None)

    def _run(self, parser: DumpParser | NativeDumpParser, deadline: float) -> tuple[str, str]:
        """One dump into `parser`; returns ("", "") when complete, else (reason, one-line message)."""
        try:
            sock = self._open()
        except CollectorError as e:
            return e.reason, str(e)
        feed = parser.feed
        record = self._record
        native = isinstance(parser, NativeDumpParser)
        pace = self.pace if self.pace is not None else 0.0 if native else PYTHON_PACE
        pace_every = self.pace_every
        stop = self._stop
        reader: _PipelinedReader | _DirectReader | None = None
        try:
            sock.send(dump_request())
            reader = _DirectReader(sock) if native else _PipelinedReader(sock)
            k = 0
            while True:
                try:
                    buf, n = reader.next(deadline - time.monotonic())
                except (BlockingIOError, TimeoutError):
                    return "timeout", (f"conntrack table dump: no data from the kernel before the time cap "
                                       f"({self.max_duration:g}s, {parser.agg.entries} entries read)")
                if record is not None:
                    record.append(bytes(buf[:n]))
                if n == 0:
                    return "parse", "conntrack table dump: the replay ended before NLMSG_DONE"
                if feed(buf, n):
                    break
                reader.release(buf)
                k += 1
                if stop.is_set():
                    return "stopped", "scan stopped"
                if time.monotonic() > deadline:
                    return "timeout", (f"conntrack table dump exceeded --collector.table.max-duration "
                                       f"({self.max_duration:g}s) after {parser.agg.entries} entries")
                if pace and k % pace_every == 0:
                    time.sleep(pace)
            if parser.agg.dump_interrupted:
                return "interrupted", "the kernel flagged the dump as interrupted (NLM_F_DUMP_INTR)"
            return "", ""
        except ParseError as e:
            return "parse", f"conntrack table dump: {e} (scan counted {parser.agg.entries} entries before it)"
        except NetlinkError as e:
            if e.errno in RETRY_ERRNOS:
                return "interrupted", str(e)
            return e.reason, str(e)
        except OSError as e:
            if e.errno in RETRY_ERRNOS:
                return "interrupted", f"conntrack table dump interrupted: {e.strerror}"
            err = NetlinkError(e.errno or errno.EIO, "conntrack table dump")
            return err.reason, str(err)
        finally:
            if reader is not None:
                reader.close()
                self._reader_cpu += reader.cpu
            else:
                sock.close()


def _ends_dump(buf: bytearray, n: int) -> bool:
    """Whether a datagram ends with NLMSG_DONE or NLMSG_ERROR (then the kernel sends nothing more)."""
    for size, mtype in ((20, NLMSG_DONE), (36, NLMSG_ERROR)):
        if n >= size and _HH(buf, n - size)[0] == size and _HH(buf, n - size + 4)[0] == mtype:
            return True
    return n == 0


class _DirectReader:
    """Receives in the scanning thread, for the native parser: it parses a datagram in about a tenth of
    the time the kernel takes to build it, so a second thread's hand-offs would cost more than they save.
    Both the recv and the ctypes call release the GIL. The time cap is checked between datagrams; a kernel
    that stops sending is caught by the socket's receive timeout (SO_RCVTIMEO, 5 s) instead."""

    def __init__(self, sock: DumpSocket) -> None:
        self._sock = sock
        self._buf = bytearray(RECV_BUFFER)
        self.cpu = 0.0  # all of it is the scanning thread's

    def next(self, timeout: float) -> tuple[bytearray, int]:
        return self._buf, self._sock.recv_into(self._buf)

    def release(self, buf: bytearray) -> None:
        pass

    def close(self) -> None:
        self._sock.close()


class _PipelinedReader:
    """A thread receives the next datagrams while the scanning thread parses the previous ones.

    The kernel builds each dump datagram inside the recv call, without the GIL, so receiving on one
    thread and parsing on another overlaps the kernel's half of the work with ours. A few reused
    buffers circulate between the two (bounded memory); the reader owns and closes the socket.
    """

    BUFFERS = 4

    def __init__(self, sock: DumpSocket) -> None:
        self._sock = sock
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._full: queue.Queue[tuple[bytearray | None, int, OSError | None]] = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(RECV_BUFFER))
        self.cpu = 0.0  # the reader thread's CPU time, once it has ended
        self._thread = threading.Thread(target=self._loop, name="table-scan-recv", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        c0 = time.thread_time()
        try:
            while True:
                buf = self._free.get()
                if buf is None:
                    return
                try:
                    n = self._sock.recv_into(buf)
                except OSError as e:
                    self._full.put((None, 0, e))
                    return
                self._full.put((buf, n, None))
                if _ends_dump(buf, n):
                    return
        finally:
            self._sock.close()
            self.cpu = time.thread_time() - c0

    def next(self, timeout: float) -> tuple[bytearray, int]:
        try:
            buf, n, err = self._full.get(timeout=max(timeout, 0.05))
        except queue.Empty:
            raise TimeoutError from None
        if err is not None:
            raise err
        assert buf is not None
        return buf, n

    def release(self, buf: bytearray) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._free.put(None)  # the reader stops at its next buffer (or when its recv times out)
        self._thread.join(0.1)  # normally it has already ended (it saw the end of the dump)
