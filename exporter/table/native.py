"""The dump parser in C (`ctdump.c`, built into `_ctdump.so` next to it), called through ctypes.

`DumpParser._feed` (exporter.table.parse) costs about 1 µs of CPU per entry in CPython, as much as the
kernel spends building the dump. `ctdump.c` is the same parser, statement for statement, in C: one
ctypes call per dump datagram (about 30 KB, over 100 entries), no Python C API (no headers, no ties to
the interpreter's ABI). The Python parser stays the reference and the fallback: `new_parser` returns a
`NativeDumpParser` when the shared library loaded, else a `DumpParser` (`parser_name()` says which;
`conntrack_dns_exporter_build_info` carries it as its `table_parser` label, and the fallback is logged
once). tests/unit/table/test_native.py holds the two equal on recorded and generated dumps.

The counters live in C arrays while a dump is fed; `agg` copies them into an `Aggregate` (same keys,
same insertion order as the Python parser's) whenever it is read.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from pathlib import Path

from exporter.core import cdll
from exporter.netlink import NetlinkError, ParseError
from exporter.table.parse import PROTO_TCP, Aggregate, DumpParser

log = logging.getLogger(__name__)

LIBRARY = Path(__file__).with_name("_ctdump.so")
ABI_VERSION = 1

# acc[] layout: keep in step with ctdump.c
A_ENTRIES, A_STALE, A_INTR, A_DONE, A_NORDER, A_NDNS, A_DNS_ORDER, A_DNS_UDP, A_DNS_TCP, A_ERR = (
    0, 1, 2, 3, 4, 5, 6, 8, 9, 10)
A_STATES = 16
N_SLOTS = 784
A_ORDER = A_STATES + N_SLOTS
A_SIZE = A_ORDER + N_SLOTS
# slot -> the Python parser's counter key: TCP states 0..9 and 10 ("other"), then 16 + proto * 3 + status
SLOT_KEYS = [PROTO_TCP << 8 | (s if s < 10 else 0xFF) for s in range(11)] + [0] * 5 + [
    (s // 3) << 8 | (s % 3) for s in range(N_SLOTS - 16)]

_MESSAGES = {
    1: "truncated netlink message at offset {0} (length {1}, {2} left)",
    2: "garbled conntrack attribute at offset {0} (length {1})",
    3: "garbled conntrack tuple at offset {0}",
    4: "garbled conntrack proto attribute at offset {0}",
    5: "short CTA_STATUS at offset {0}",
    6: "conntrack entry at offset {0} without original tuple or status",
    7: "empty address nest at offset {0}",
    8: "unexpected address attribute {0} at offset {1}",
    9: "garbled TCP protoinfo at offset {0}",
    10: "garbled address attribute at offset {0}",
    11: "garbled conntrack dump message: a {1}-byte read at offset {0} past the end of the buffer",
}

_I64P = ctypes.POINTER(ctypes.c_int64)
_U32P = ctypes.POINTER(ctypes.c_uint32)


class _Ctx(ctypes.Structure):
    _fields_ = [("acc", _I64P), ("src4", ctypes.c_char_p), ("src4_idx", _U32P), ("n_src4", ctypes.c_int64),
                ("src16", ctypes.c_char_p), ("src16_idx", _U32P), ("n_src16", ctypes.c_int64),
                ("src_counts", _I64P), ("srv4", ctypes.c_char_p), ("n_srv4", ctypes.c_int64),
                ("srv16", ctypes.c_char_p), ("n_srv16", ctypes.c_int64), ("check_servers", ctypes.c_int64)]


def load(path: Path = LIBRARY) -> tuple[ctypes.CDLL | None, str]:
    """The library and "", or None and why it is not usable."""
    want = ABI_VERSION * 1000000 + ctypes.sizeof(_Ctx) * 1000 + A_SIZE % 1000
    return cdll.load(path, "ctdump.c", "ctd_abi", want, {
        "ctd_feed": (ctypes.c_int, [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64])})


_LIB, _WHY = load()
_logged = False


def parser_name() -> str:
    """"native" when the C parser is in use, else "python"."""
    return "native" if _LIB is not None else "python"


def new_parser(source_keys: Iterable[bytes] = (),
               dns_servers: Iterable[bytes] | None = None) -> DumpParser | NativeDumpParser:
    """A native parser when the library loaded (and the keys are addresses), else the Python one;
    the first fallback for a missing library is logged once."""
    global _logged
    library = _LIB
    keys = list(source_keys)
    servers = list(dns_servers) if dns_servers is not None else None
    if library is not None and all(len(k) in (4, 16) for k in (*keys, *(servers or ()))):
        return NativeDumpParser(library, keys, servers)
    if library is None and not _logged:
        _logged = True
        log.warning("conntrack table scan: using the Python dump parser (about 2x the CPU per entry): %s", _WHY)
    return DumpParser(keys, servers)


class NativeDumpParser:
    """`DumpParser`'s interface (feed, agg, done) over ctdump.c."""

    def __init__(self, lib: ctypes.CDLL, source_keys: Iterable[bytes] = (),
                 dns_servers: Iterable[bytes] | None = None) -> None:
        self._feed = lib.ctd_feed
        self._agg = Aggregate(sources=dict.fromkeys(source_keys, 0))
        self.dns_servers = frozenset(dns_servers) if dns_servers is not None else None
        self._keys = list(self._agg.sources)
        self._acc = (ctypes.c_int64 * A_SIZE)()
        self._counts = (ctypes.c_int64 * max(len(self._keys), 1))()
        ctx = self._ctx = _Ctx()
        ctx.acc = self._acc
        ctx.src_counts = self._counts
        for size in (4, 16):
            by_key = sorted((k, i) for i, k in enumerate(self._keys) if len(k) == size)
            idx = (ctypes.c_uint32 * max(len(by_key), 1))(*(i for _, i in by_key))
            setattr(ctx, f"src{size}", b"".join(k for k, _ in by_key))
            setattr(ctx, f"src{size}_idx", idx)
            setattr(ctx, f"n_src{size}", len(by_key))
            servers = sorted(k for k in self.dns_servers or () if len(k) == size)
            setattr(ctx, f"srv{size}", b"".join(servers))
            setattr(ctx, f"n_srv{size}", len(servers))
        ctx.check_servers = self.dns_servers is not None
        self._ctx_ref = ctypes.byref(ctx)

    @property
    def done(self) -> bool:
        return bool(self._acc[A_DONE])

    @property
    def agg(self) -> Aggregate:
        """The counters so far (the same `Aggregate` object every time, brought up to date)."""
        acc, agg = self._acc, self._agg
        agg.entries = acc[A_ENTRIES]
        agg.stale_dns = acc[A_STALE]
        agg.dump_interrupted = bool(acc[A_INTR])
        states = agg.states
        for i in range(acc[A_NORDER]):
            slot = acc[A_ORDER + i]
            states[SLOT_KEYS[slot]] = acc[A_STATES + slot]
        dns = agg.dns
        for i in range(acc[A_NDNS]):
            proto = acc[A_DNS_ORDER + i]
            dns[proto] = acc[A_DNS_TCP if proto == PROTO_TCP else A_DNS_UDP]
        if self._keys:
            agg.sources.update(zip(self._keys, self._counts[: len(self._keys)], strict=True))
        return agg

    def feed(self, buf: bytes | bytearray | memoryview, n: int | None = None) -> bool:
        """As `DumpParser.feed`: True once NLMSG_DONE was seen; ParseError / NetlinkError as it raises them."""
        size = len(buf)
        if n is None:
            n = size
        if not 0 <= n <= size:
            raise ValueError(f"datagram length {n} outside its buffer (0..{size})")
        if isinstance(buf, bytes):
            ptr: object = buf
        elif isinstance(buf, memoryview) and buf.readonly:
            ptr = bytes(buf)
        else:
            ptr = (ctypes.c_char * size).from_buffer(buf)
        rc = self._feed(self._ctx_ref, ptr, size, n)
        if rc >= 0:
            return bool(rc)
        acc = self._acc
        if rc == -2:
            raise NetlinkError(acc[A_ERR + 1], "conntrack table dump")
        raise ParseError(_MESSAGES[acc[A_ERR]].format(acc[A_ERR + 1], acc[A_ERR + 2], acc[A_ERR + 3]))
