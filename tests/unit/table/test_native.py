"""The native dump parser (exporter/table/ctdump.c through exporter.table.native) against the Python one.

The Python `DumpParser` is the reference: for every recorded dump in tests/fixtures and for generated
datagrams (kernel layouts with and without zones, ICMP, unusual attribute orders, cut, corrupted, random
bytes, bytes past the datagram in its buffer) both must give the same aggregate (same keys in the same
order), the same `done`, and the same exception class and message. No processes, no root.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.netlink import NetlinkError, ParseError
from exporter.table import native
from exporter.table.fixtures import ReplaySocket
from exporter.table.native import NativeDumpParser, new_parser
from exporter.table.parse import DumpParser, ip_key
from exporter.table.scan import Scanner

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
KEYS = [k for k in map(ip_key, ["127.0.0.1", "::1", "10.0.0.1", "10.244.0.5", "fd00::1", "10.0.0.2"]) if k]
SERVERS = [k for k in map(ip_key, ["10.96.0.10", "127.0.0.1", "fd00::53", "10.0.0.1"]) if k]


def _outcome(parser: Any, dgrams: list[bytes | bytearray], n: list[int] | None = None) -> tuple[Any, ...]:
    err: tuple[str, str] | None = None
    done = False
    for i, d in enumerate(dgrams):
        try:
            done = parser.feed(d, None if n is None else n[i])
        except (ParseError, NetlinkError) as e:
            msg = str(e)
            # a read past the buffer: Python words struct.error's text, C its own
            if msg.startswith("garbled conntrack dump message:"):
                msg = "garbled conntrack dump message:"
            err = (type(e).__name__, msg, getattr(e, "errno", None))
            break
        if done:
            break
    agg = parser.agg
    return (list(agg.states.items()), list(agg.dns.items()), agg.stale_dns, agg.entries,
            list(agg.sources.items()), agg.dump_interrupted, done, parser.done, err)


def assert_same(dgrams: list[bytes | bytearray], n: list[int] | None = None,
                keys: list[bytes] = KEYS, servers: list[bytes] | None = SERVERS) -> tuple[Any, ...]:
    ref = _outcome(DumpParser(keys, servers), dgrams, n)
    nat = new_parser(keys, servers)
    assert isinstance(nat, NativeDumpParser)
    got = _outcome(nat, dgrams, n)
    assert got == ref
    return ref


def test_ci_has_the_native_parser() -> None:
    """The build step (`make deps`: scripts/bootstrap.sh; the image's build stage) made _ctdump.so."""
    assert native.LIBRARY.exists(), "exporter/table/_ctdump.so is missing: the build step did not run (make deps)"
    assert native.parser_name() == "native", native._WHY
    assert isinstance(new_parser(KEYS, SERVERS), NativeDumpParser)


@pytest.mark.parametrize("name", ["table-mixed.json", "table-truncated.json", "table-garbled.json"])
def test_recorded_dumps_agree(name: str) -> None:
    data = json.loads((FIXTURES / name).read_text())
    dgrams: list[bytes | bytearray] = [bytes.fromhex(h) for h in data.get("datagrams") or data["complete_messages"]]
    for keys in (KEYS, [], [ip_key("127.0.0.1")]):
        for servers in (SERVERS, None, [ip_key("10.96.0.10"), ip_key("10.244.0.5")], []):
            out = assert_same(dgrams, keys=keys, servers=servers)  # type: ignore[arg-type]
            assert out[3] > 0
    # in a reused receive buffer, as the scanner feeds them (bytearray, stale bytes after n)
    big = [bytearray(d) + bytearray(b"\xff" * 300) for d in dgrams]
    assert_same(big, [len(d) for d in dgrams])  # type: ignore[arg-type]
    # every cut of the first datagram
    first = dgrams[0]
    for cut in range(0, len(first), 7):
        assert_same([first[:cut]])


def test_a_scan_uses_the_native_parser_and_matches_python(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads((FIXTURES / "table-mixed.json").read_text())
    dgrams = [bytes.fromhex(h) for h in data["datagrams"]]
    got = Scanner(lambda: ReplaySocket(dgrams), pace=0).scan(KEYS, SERVERS)
    monkeypatch.setattr(native, "_LIB", None)
    ref = Scanner(lambda: ReplaySocket(dgrams), pace=0).scan(KEYS, SERVERS)
    assert not got.partial and not ref.partial
    assert got.agg == ref.agg and got.agg.entries == data["entries"]


def test_without_the_library_the_python_parser_runs_and_says_so_once(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    lib, why = native.load(Path("/nonexistent/_ctdump.so"))
    assert lib is None and "did not load" in why
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_WHY", why)
    monkeypatch.setattr(native, "_logged", False)
    with caplog.at_level(logging.WARNING, logger="exporter.table.native"):
        parsers = [new_parser(KEYS, SERVERS) for _ in range(3)]
    assert all(type(p) is DumpParser for p in parsers)
    assert native.parser_name() == "python"
    assert [r.getMessage() for r in caplog.records if "Python dump parser" in r.getMessage()] == [
        "conntrack table scan: using the Python dump parser (about 2x the CPU per entry): " + why]


# --- generated datagrams ---------------------------------------------------------------------------------

def attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nest(atype: int, *children: bytes) -> bytes:
    return attr(atype | 0x8000, b"".join(children))


@st.composite
def entry(draw: Any) -> bytes:
    """One conntrack message as kernels lay them out, with the variations that matter to the parser;
    now and then an attribute lies about its length or has a short value."""

    def attr(atype: int, payload: bytes) -> bytes:
        length = 4 + len(payload)
        if draw(st.integers(0, 60)) == 0:
            if draw(st.booleans()):
                payload = payload[: draw(st.integers(0, len(payload)))]
                length = 4 + len(payload)
            else:
                length = draw(st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, length - 1, length + 1, length + 4, 65535]))
        raw = struct.pack("=HH", max(length, 0) & 0xFFFF, atype) + payload
        return raw + b"\0" * (-len(raw) % 4)

    def nest(atype: int, *children: bytes) -> bytes:
        return attr(atype | 0x8000, b"".join(children))

    v6 = draw(st.booleans())
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    size = 16 if v6 else 4
    pool = [k for k in KEYS + SERVERS if len(k) == size] + [b"\x0a" * size]
    addr = st.one_of(st.sampled_from(pool), st.binary(min_size=size, max_size=size))
    proto = draw(st.sampled_from([6, 17, 6, 17, 1, 58, 132, draw(st.integers(0, 255))]))
    dport = draw(st.sampled_from([53, 53, 80, draw(st.integers(0, 65535))]))
    zone = (draw(st.booleans()) and draw(st.integers(0, 3))) or 0

    def tuple_(atype: int, src: bytes, dst: bytes, sport: int, dp: int) -> bytes:
        ip = nest(1, attr(3 if v6 else 1, src), attr(4 if v6 else 2, dst))
        if proto in (1, 58):
            pr = nest(2, attr(1, bytes([proto])), attr(4, struct.pack("!H", sport)), attr(5, b"\x08"),
                      attr(6, b"\0"))
        else:
            pr = nest(2, attr(1, bytes([proto])), attr(2, struct.pack("!H", sport)), attr(3, struct.pack("!H", dp)))
        parts = [ip, pr] + ([attr(3, struct.pack("!H", zone))] if zone == 1 else [])
        return nest(atype, *draw(st.permutations(parts)) if draw(st.integers(0, 9)) == 0 else parts)

    src, dst = draw(addr), draw(addr)
    rsrc, rdst = draw(addr), draw(addr)
    sport = draw(st.integers(0, 65535))
    status = draw(st.sampled_from([0, 2, 6, 0x8, 0x18e, draw(st.integers(0, 2**32 - 1))]))
    attrs = [tuple_(1, src, dst, sport, dport), tuple_(2, rsrc, rdst, dport, sport), attr(3, struct.pack("!I", status))]
    u32 = st.integers(0, 2**32 - 1)
    attrs += [attr(t, struct.pack("!I", draw(u32))) for t in draw(st.permutations([7, 8, 11, 12]))]
    if zone == 2:
        attrs.append(attr(18, struct.pack("!H", 1)))
    if proto == 6 or draw(st.integers(0, 5)) == 0:
        state = draw(st.sampled_from([3, 1, 7, 9, 10, draw(st.integers(0, 255))]))
        tcp = [attr(1, bytes([state])), attr(2, b"\x07"), attr(3, b"\x07"), attr(4, b"\0\0"), attr(5, b"\0\0")]
        kind = draw(st.integers(0, 6))
        if kind == 1:
            tcp = tcp[1:] + tcp[:1]
        elif kind == 2:
            tcp = tcp[1:]
        sub = nest(draw(st.sampled_from([1, 1, 1, 2, 3])), *tcp)
        attrs.append(nest(4, sub) if kind != 3 else nest(4))
    if draw(st.integers(0, 7)) == 0:
        attrs = draw(st.permutations(attrs))
    flags = draw(st.sampled_from([2, 2, 2, 0x12, 0]))
    mtype = 0x100 if draw(st.integers(0, 30)) else draw(st.sampled_from([0x101, 1, 0x200]))
    body = struct.pack("!BBH", fam, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, 1, 0) + body


def control(kind: str, err: int = 0) -> bytes:
    if kind == "done":
        return struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)
    return struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -err) + b"\0" * 16


@st.composite
def datagram(draw: Any) -> tuple[bytearray, int]:
    raw = b"".join(draw(st.lists(entry(), min_size=1, max_size=6)))
    end = draw(st.sampled_from(["", "", "done", "error", "ack", "short-error", "error20"]))
    if end == "done":
        raw += control("done")
    elif end in ("error", "ack"):
        raw += control("error", draw(st.sampled_from([1, 16, 105, -3])) if end == "error" else 0)
    elif end == "short-error":
        raw += struct.pack("=IHHII", 16, 2, 0, 1, 0)
    elif end == "error20":  # an error reply with the errno but no copy of the request
        raw += struct.pack("=IHHIIi", draw(st.integers(20, 23)), 2, 0, 1, 0, -draw(st.sampled_from([0, 1, 16])))
    buf = bytearray(raw)
    mutation = draw(st.sampled_from(["none", "none", "cut", "flip", "flips", "splice", "lengths"]))
    if mutation == "cut":
        buf = buf[: draw(st.integers(0, len(buf)))]
    elif mutation == "flip":
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = draw(st.integers(0, 255))
    elif mutation == "flips":
        for i in draw(st.lists(st.integers(0, len(buf) - 1), max_size=12)):
            buf[i] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "splice":
        i = draw(st.integers(0, len(buf)))
        buf[i:i] = draw(st.binary(max_size=12))
    elif mutation == "lengths":  # attribute/message length fields are the usual liars
        for i in draw(st.lists(st.integers(0, len(buf) // 4 - 1), max_size=4)):
            buf[4 * i: 4 * i + 2] = struct.pack("=H", draw(st.sampled_from([0, 3, 4, 5, 6, 7, 8, 65535])))
    n = len(buf)
    buf += draw(st.binary(max_size=8))  # the receive buffer goes on past the datagram
    return buf, n


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagram(), min_size=1, max_size=3), st.sampled_from(["both", "no-servers", "no-keys"]))
def test_generated_datagrams_agree(dgrams: list[tuple[bytearray, int]], config: str) -> None:
    servers = None if config == "no-servers" else SERVERS
    keys = [] if config == "no-keys" else KEYS
    assert_same([b for b, _ in dgrams], [n for _, n in dgrams], keys=keys, servers=servers)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.booleans())
def test_random_bytes_agree(raw: bytes, as_entry: bool) -> None:
    if as_entry:  # a plausible header in front, so the garbage reaches the attribute walk
        raw = struct.pack("=IHHII", 20 + len(raw), 0x100, 2, 1, 0) + bytes([raw[0] % 12 if raw else 2, 0, 0, 0]) + raw
    assert_same([raw])


@pytest.mark.parametrize("tail", [b"", b"\x00", b"\x00\x35", b"\x11\x00\x35\x00"])
@pytest.mark.parametrize("empty", ["num", "port"])
def test_short_value_at_the_end_of_the_buffer(tail: bytes, empty: str) -> None:
    """A CTA_PROTO_NUM / CTA_PROTO_DST_PORT without its value, last in the datagram: Python reads on into
    the buffer (stale bytes of an earlier datagram) and fails only past its end; so must C."""
    proto = attr(1, b"") if empty == "num" else attr(1, b"\x11")
    port = attr(3, b"") if empty == "port" else attr(3, b"\x00\x35")
    sport = attr(2, b"\x30\x39")
    ports = nest(2, sport, port, proto) if empty == "num" else nest(2, proto, sport, port)
    orig = nest(1, nest(1, attr(1, b"\x7f\0\0\x01"), attr(2, b"\x0a\x60\0\x0a")), ports)
    body = struct.pack("!BBH", socket.AF_INET, 0, 0) + attr(3, struct.pack("!I", 6)) + orig
    msg = struct.pack("=IHHII", 16 + len(body), 0x100, 2, 1, 0) + body
    out = assert_same([bytearray(msg + tail)], [len(msg)])
    if not tail or (empty == "port" and len(tail) < 2):  # the read goes past the buffer
        assert out[-1] is not None and out[-1][0] == "ParseError"
    else:
        assert out[3] == 1
