"""The listener's drain in C (`ctevents.c`, built into `_ctevents.so` next to it), called through ctypes.

Read in Python, an event costs about 5 µs of CPU, most of it in CPython: one `recv_into` per datagram
(each multicast event is one), `parse_events` unpacking it, a tuple built per event. `ctevents.c` does
the reading and the parsing of a whole drain in one call (recv with MSG_DONTWAIT in a loop, then the
same fast path and attribute walk as `parse_events`) and writes one fixed-size record per DNS event;
`struct.iter_unpack` turns the records into `parse.Event` tuples as `FlowStats.account` iterates them,
so Python does no per-event work besides the accounting. No Python C API: no headers, no ties to the
interpreter's ABI.

`new_drain` returns a `NativeDrain` when the library loaded, else None (the listener then reads in
Python; `drain_name()` says which; `available()` logs the fallback once). The Python parser stays the
reference: tests/unit/dnsflows/test_native.py holds the two equal on recorded and generated datagrams
read from a real socket. A datagram the records cannot hold (an event whose addresses are not all 4 or
all 16 bytes long: garbled data; or more events than there is room left for) comes back unparsed and is
read by `parse_events`, so the result is the same for any bytes.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from exporter.core import cdll
from exporter.core.errors import CollectorError
from exporter.dnsflows.parse import Event, parse_events

log = logging.getLogger(__name__)

LIBRARY = Path(__file__).with_name("_ctevents.so")
ABI_VERSION = 1

# cte_drain's return values: keep in step with ctevents.c
DRAINED, LIMIT, ENOBUFS, ERROR, FULL, HANDBACK = range(6)
REC4 = struct.Struct("=?B4s4sH4sII")  # is NEW, proto, src, dst, sport, reply src, status, id: a parse.Event
REC6 = struct.Struct("=?B16s16sH16sII")
RECEIVE_BUFFER = 1 << 16  # as the Python drain's (listener.RECV_BUFFER): a datagram is cut where it cuts it

_MESSAGES = {
    1: "truncated netlink message at offset {0} (length {1}, {2} left)",
    2: "garbled conntrack attribute at offset {0} (length {1})",
    3: "garbled conntrack tuple attribute at offset {0} (length {1})",
    4: "garbled address attribute at offset {0}",
    5: "garbled protocol attribute at offset {0}",
}

_I64 = ctypes.c_int64


class _Ctx(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("buflen", _I64), ("rec4", ctypes.c_void_p), ("cap4", _I64),
                ("rec6", ctypes.c_void_p), ("cap6", _I64), ("runs", ctypes.POINTER(_I64)), ("cap_runs", _I64),
                ("read", _I64), ("n4", _I64), ("n6", _I64), ("nruns", _I64), ("other", _I64), ("garbled", _I64),
                ("err", _I64), ("handback", _I64), ("fault", _I64 * 4)]


def load(path: Path = LIBRARY) -> tuple[ctypes.CDLL | None, str]:
    """The library and "", or None and why it is not usable."""
    want = ABI_VERSION * 1000000 + ctypes.sizeof(_Ctx) * 1000 + REC4.size * 10 + REC6.size % 10
    return cdll.load(path, "ctevents.c", "cte_abi", want,
                     {"cte_drain": (ctypes.c_int, [ctypes.POINTER(_Ctx), ctypes.c_int, ctypes.c_int64])})


_LIB, _WHY = load()
_logged = False


def drain_name() -> str:
    """"native" when the C drain is in use, else "python"."""
    return "native" if _LIB is not None else "python"


def available() -> bool:
    """Whether the library loaded; the first time it did not is logged."""
    global _logged
    if _LIB is None and not _logged:
        _logged = True
        log.warning("DNS flow listener: reading conntrack events in Python (about 1.7 times the CPU per event): %s",
                    _WHY)
    return _LIB is not None


def new_drain(records: int = 1024) -> NativeDrain | None:
    """A native drain (its own buffers: one per socket and thread) when the library loaded, else None."""
    return NativeDrain(_LIB, records) if _LIB is not None and available() else None


class Drained(NamedTuple):
    read: int  # datagrams
    events: Iterable[Event]  # valid until the next call
    other: int
    status: int  # DRAINED, LIMIT, ENOBUFS, ERROR or FULL (a handed-back datagram is read here)
    errno: int  # of ERROR


class NativeDrain:
    """One `cte_drain` call per `read`, into buffers allocated once."""

    def __init__(self, lib: ctypes.CDLL, records: int = 1024, records6: int | None = None) -> None:
        self._call = lib.cte_drain
        cap6 = max(2, records if records6 is None else records6)
        cap4 = max(2, records)
        self._buf = bytearray(RECEIVE_BUFFER)
        self._rec4 = bytearray(cap4 * REC4.size)
        self._rec6 = bytearray(cap6 * REC6.size)
        self._view4, self._view6 = memoryview(self._rec4), memoryview(self._rec6)
        self._runs = (_I64 * (cap4 + cap6 + 1))()
        ctx = self._ctx = _Ctx()
        # the ctypes arrays over the bytearrays keep them exported (never resized) and pin their addresses
        self._pins = [(ctypes.c_char * len(b)).from_buffer(b) for b in (self._buf, self._rec4, self._rec6)]
        ctx.buf, ctx.rec4, ctx.rec6 = (ctypes.addressof(p) for p in self._pins)
        ctx.buflen, ctx.cap4, ctx.cap6 = len(self._buf), cap4, cap6
        ctx.runs, ctx.cap_runs = self._runs, len(self._runs)
        self._ref = ctypes.byref(ctx)

    def read(self, fd: int, limit: int) -> Drained:
        """Read up to `limit` datagrams from fd without waiting; their DNS events, in order."""
        status = self._call(self._ref, fd, limit)
        ctx = self._ctx
        other = ctx.other
        if ctx.garbled:
            kind, a, b, c = ctx.fault
            log.debug("unreadable conntrack event: %s (%d garbled datagrams in this read)",
                      _MESSAGES[kind].format(a, b, c), ctx.garbled)
        events: Iterable[Event] = self._events(ctx.nruns, ctx.n4)
        if status == HANDBACK:
            extra: list[Event] = []
            try:
                other += parse_events(self._buf, ctx.handback, extra)
            except CollectorError as e:  # a garbled event: count it, keep listening (as the Python drain)
                other += 1
                log.debug("unreadable conntrack event: %s", e)
            events = itertools.chain(events, extra)
            status = FULL if ctx.read < limit else LIMIT
        return Drained(ctx.read, events, other, status, ctx.err)

    def _events(self, nruns: int, n4: int) -> Iterator[Event]:
        if nruns == 1:  # IPv4 only: the common case
            return REC4.iter_unpack(self._view4[: n4 * REC4.size])
        runs = self._runs[:nruns]
        parts = []
        at4 = at6 = 0
        for i, count in enumerate(runs):
            if i % 2 == 0:
                parts.append(REC4.iter_unpack(self._view4[at4 * REC4.size : (at4 + count) * REC4.size]))
                at4 += count
            else:
                parts.append(REC6.iter_unpack(self._view6[at6 * REC6.size : (at6 + count) * REC6.size]))
                at6 += count
        return itertools.chain.from_iterable(parts)
