"""The native drain (exporter/dnsflows/ctevents.c through exporter.dnsflows.native) against the Python one.

`parse_events`, as the listener's Python `_drain` calls it once per datagram, is the reference: for the
recorded kernel events and for generated datagrams (IPv4 and IPv6, zones, other ports and protocols, other
message types, several messages in one datagram, odd address lengths, cut, corrupted and random bytes,
empty datagrams) the C code, reading them from a real socket, must hand the accounting the same events in
the same order, the same other count and the same number of datagrams. Then the paths the C loop stops on:
nothing queued, the read limit, full record buffers, an overflowed receive buffer (ENOBUFS from a real
netlink socket: needs CAP_NET_ADMIN, skipped without) and another socket error. No other test needs root.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from exporter.app import build_registry
from exporter.core.errors import CollectorError
from exporter.dnsflows import native, parse
from exporter.dnsflows.collector import DnsFlowsCollector
from exporter.dnsflows.flows import FlowStats
from exporter.dnsflows.listener import RECV_BUFFER, FlowListener
from exporter.dnsflows.native import NativeDrain
from exporter.dnsflows.parse import CT_DELETE, CT_NEW, Event, parse_events
from exporter.netlink import ParseError
from tests.unit.dnsflows.test_collector import discovery
from tests.unit.dnsflows.test_parse_bpf import events as recorded

NETLINK_USERSOCK = 2
QUEUE = 8  # datagrams queued at once on a socketpair (net.unix.max_dgram_qlen is 10 by default)


def reference(dgrams: Iterable[bytes]) -> tuple[list[Event], int, int]:
    """What the Python drain makes of the datagrams: (events, other, datagrams read). An empty datagram
    ends a drain uncounted (the next drain reads on); one longer than the receive buffer is cut."""
    out: list[Event] = []
    other = read = 0
    buf = bytearray(RECV_BUFFER)
    for d in dgrams:
        if not d:
            continue
        read += 1
        n = min(len(d), len(buf))
        buf[:n] = d[:n]
        try:
            other += parse_events(buf, n, out)
        except CollectorError:
            other += 1
    return out, other, read


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def native_read(dgrams: list[bytes], drain: NativeDrain | None = None,
                limit: int = 1024) -> tuple[list[Event], int, int, list[int]]:
    """The datagrams through a socketpair and the native drain: (events, other, read, statuses)."""
    drain = drain or native_drain()
    out: list[Event] = []
    other = read = 0
    statuses = []
    with pair() as (rx, tx):
        for start in range(0, len(dgrams), QUEUE):
            for d in dgrams[start : start + QUEUE]:
                tx.send(d)
            while readable(rx):
                got = drain.read(rx.fileno(), limit)
                out.extend(got.events)
                other += got.other
                read += got.read
                statuses.append(got.status)
                assert got.read <= limit
        got = drain.read(rx.fileno(), limit)
        assert (got.read, got.other, list(got.events), got.status) == (0, 0, [], native.DRAINED)
    return out, other, read, statuses


def native_drain(records: int = 1024, records6: int | None = None) -> NativeDrain:
    assert native._LIB is not None, native._WHY
    return NativeDrain(native._LIB, records, records6)


def assert_same(dgrams: list[bytes], **kw: int) -> tuple[list[Event], int, int]:
    want = reference(dgrams)
    events, other, read, _ = native_read(dgrams, native_drain(**kw))
    assert (events, other, read) == want
    return want


# ---- generated conntrack messages ------------------------------------------------------------------------
def attr(atype: int, payload: bytes, nested: bool = False) -> bytes:
    hdr = struct.pack("=HH", 4 + len(payload), atype | (0x8000 if nested else 0))
    return hdr + payload + b"\0" * (-len(payload) % 4)


def tuple_attr(atype: int, src: bytes, dst: bytes, proto: int, sport: int, dport: int, zone: bool) -> bytes:
    v6 = len(src) == 16
    ip = attr(3 if v6 else 1, src) + attr(4 if v6 else 2, dst)
    ports = attr(1, bytes([proto])) + attr(2, struct.pack("!H", sport)) + attr(3, struct.pack("!H", dport))
    body = attr(1, ip, True) + attr(2, ports, True) + (attr(6, struct.pack("!H", 7)) if zone else b"")
    return attr(atype, body, True)


def message(mtype: int, family: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def conntrack(mtype: int = CT_NEW, v6: bool = False, proto: int = 17, dport: int = 53, sport: int = 40000,
              src: bytes | None = None, dst: bytes | None = None, rsrc: bytes | None = None, zone: bool = False,
              ct_id: int = 7, status: int = 0x188, reply: bool = True, order: int = 0) -> bytes:
    size = 16 if v6 else 4
    src = src if src is not None else bytes([10] * size)
    dst = dst if dst is not None else bytes([11] * size)
    rsrc = rsrc if rsrc is not None else bytes([12] * size)
    parts = [tuple_attr(1, src, dst, proto, sport, dport, zone)]
    if reply:
        parts.append(tuple_attr(2, rsrc, src, proto, dport, sport, zone))
    parts += [attr(12, struct.pack("!I", ct_id)), attr(3, struct.pack("!I", status))]
    if zone:
        parts.append(attr(18, struct.pack("!H", 7)))
    parts = parts[order % len(parts):] + parts[: order % len(parts)]
    return message(mtype, 10 if v6 else 2, b"".join(parts))


addrs = st.one_of(st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
                  st.binary(max_size=20))
messages = st.builds(
    conntrack,
    mtype=st.sampled_from([CT_NEW, CT_DELETE, CT_NEW, CT_DELETE, 0x101, 0x104, 2, 3, 0x200]),
    v6=st.booleans(), proto=st.sampled_from([17, 6, 17, 1, 132]), dport=st.sampled_from([53, 53, 5353, 0]),
    sport=st.integers(0, 65535), src=st.one_of(st.none(), addrs), dst=st.one_of(st.none(), addrs),
    rsrc=st.one_of(st.none(), st.none(), addrs), zone=st.booleans(), ct_id=st.integers(0, 2**32 - 1),
    status=st.integers(0, 2**32 - 1), reply=st.booleans(), order=st.integers(0, 5))


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    d = b"".join(draw(st.lists(messages, min_size=1, max_size=3)))
    how = draw(st.sampled_from(["whole", "whole", "cut", "flip", "length", "random", "tail"]))
    if how == "cut":
        d = d[: draw(st.integers(0, len(d)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(d) - 1))
            d = d[:i] + bytes([draw(st.integers(0, 255))]) + d[i + 1 :]
    elif how == "length":  # an attribute or message length rewritten
        i = draw(st.integers(0, max(0, len(d) - 2)))
        d = d[:i] + struct.pack("=H", draw(st.integers(0, 400))) + d[i + 2 :]
    elif how == "random":
        d = draw(st.binary(max_size=300))
    else:
        d += draw(st.binary(max_size=15))  # less than a message header after the last message
    return d


# ---- the tests -------------------------------------------------------------------------------------------
def test_ci_has_the_native_drain() -> None:
    """The build step (`make deps`: scripts/bootstrap.sh; the image's build stage) made _ctevents.so."""
    assert native.LIBRARY.exists(), "exporter/dnsflows/_ctevents.so is missing: the build step did not run"
    assert native.drain_name() == "native", native._WHY
    assert isinstance(native.new_drain(), NativeDrain)


def test_recorded_events_agree() -> None:
    evs, other, read = assert_same(recorded())
    assert (len(evs), other, read) == (8, 6, 14)
    assert any(len(e[2]) == 16 for e in evs) and any(len(e[2]) == 4 for e in evs)
    # one datagram holding them all (the kernel sends one event per datagram; the parser reads any number)
    evs, other, read = assert_same([b"".join(recorded())])
    assert (len(evs), other, read) == (8, 6, 1)


def test_the_fast_path_and_the_walk_agree_with_python() -> None:
    kinds = [conntrack(), conntrack(v6=True), conntrack(zone=True), conntrack(order=1), conntrack(proto=6),
             conntrack(dport=5353), conntrack(proto=1), conntrack(mtype=CT_DELETE, status=0),
             conntrack(reply=False), conntrack(src=b"\1\2\3"), conntrack(v6=True, rsrc=bytes(4)),
             conntrack(mtype=0x101), message(2, 0, struct.pack("=i", -1)), b"\0" * 15]
    evs, other, read = assert_same(kinds)
    assert (len(evs), other, read) == (9, 4, 14)
    fields = parse._FAST4_UNPACK(kinds[0], 0)  # the generated IPv4 layout is the kernel's: the fast path reads it
    headers = tuple(fields[i] for i in (1, 2, 3, 5, 7, 8, 10, 12, 14, 15, 16, 18, 20))
    assert len(kinds[0]) == parse._FAST4_SIZE and headers == parse._FAST4_HDRS


def test_ipv4_and_ipv6_events_keep_their_order() -> None:
    """The two families go into separate record buffers; the runs put them back in order (one flow's
    NEW and DESTROY, and the first-come backend labels of a kind, depend on it)."""
    seq = [conntrack(v6=bool(i % 3 == 1 or i % 5 == 0), ct_id=i, mtype=CT_DELETE if i % 2 else CT_NEW)
           for i in range(40)]
    evs, _, _ = assert_same(seq)
    assert [e[7] for e in evs] == list(range(40))
    evs, _, _ = assert_same([b"".join(seq[:20]), b"".join(seq[20:])])
    assert [e[7] for e in evs] == list(range(40))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams(), max_size=20), st.sampled_from([(1024, None), (2, 2), (3, 1), (1, 5)]))
def test_generated_datagrams_agree(dgrams: list[bytes], caps: tuple[int, int | None]) -> None:
    assert_same(dgrams, records=caps[0], records6=caps[1])  # type: ignore[arg-type]


def test_empty_and_oversized_datagrams_are_read_as_the_python_drain_reads_them() -> None:
    big = conntrack() + b"\0" * (RECV_BUFFER + 100)  # cut at the receive buffer, as recv_into cuts it
    assert_same([conntrack(), b"", conntrack(v6=True), big, b"", b"", conntrack()])
    _, _, read, statuses = native_read([conntrack(), b"", conntrack()])
    assert read == 2 and statuses[0] == native.DRAINED  # the empty one ended the first read


def test_the_read_limit_and_full_record_buffers_stop_the_read_without_losing_events() -> None:
    seq = [conntrack(v6=i % 4 == 3, ct_id=i) for i in range(8)]
    evs, _, read, statuses = native_read(seq, native_drain(1024), limit=3)
    assert [e[7] for e in evs] == list(range(8)) and read == 8
    assert statuses == [native.LIMIT, native.LIMIT, native.DRAINED]
    evs, _, read, statuses = native_read(seq, native_drain(2))  # room for 2 records of each family
    assert [e[7] for e in evs] == list(range(8)) and read == 8
    assert statuses[0] == native.FULL and statuses[-1] == native.DRAINED
    # a datagram with more events than there is room for is read by the Python parser, in order
    evs, other, read, statuses = native_read([b"".join(seq[:5]), seq[5]], native_drain(2))
    assert [e[7] for e in evs] == list(range(6)) and (other, read) == (0, 2)


def test_a_socket_error_is_reported_with_its_errno() -> None:
    r, w = os.pipe()
    try:
        got = native_drain().read(r, 16)
    finally:
        os.close(r)
        os.close(w)
    assert (got.status, got.errno, got.read) == (native.ERROR, errno.ENOTSOCK, 0)


@contextmanager
def multicast(rcvbuf: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A NETLINK_USERSOCK receiver joined to group 1 and a sender multicasting there: a receiver whose
    buffer is full gets ENOBUFS, as the event socket does. Joining needs CAP_NET_ADMIN (skipped without)."""
    try:
        rx = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    except OSError as e:
        pytest.skip(f"no netlink: {e}")
    tx = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            rx.bind((0, 1))
        except PermissionError:
            pytest.skip("joining a netlink multicast group needs CAP_NET_ADMIN")
        tx.bind((0, 0))
        yield rx, tx
    finally:
        rx.close()
        tx.close()


def send_multicast(tx: socket.socket, d: bytes) -> None:
    with contextlib.suppress(ConnectionRefusedError):
        tx.sendto(d, (0, 1))  # delivered to the group; the unicast to port 0 that follows finds no kernel socket


class Recorder(FlowStats):
    """FlowStats that records what the listener hands it."""

    def __init__(self) -> None:
        super().__init__(discovery())
        self.batches: list[tuple[list[Event], int]] = []

    def account(self, events: Iterable[Event], other: int = 0) -> None:
        events = list(events)
        self.batches.append((events, other))
        super().account(events, other)


def drain_both(feed: list[bytes], rcvbuf: int) -> list[tuple[list[Event], int, int, int]]:
    """The same datagrams multicast to a real netlink socket, drained by the Python and the native path of
    the listener: (events, other, read, lost) of each."""
    out = []
    for use_native in (False, True):
        stats = Recorder()
        listener = FlowListener(stats, native_drain=use_native, resync=lambda s, deadline: [])
        assert (listener.drain == "native") == use_native
        with multicast(rcvbuf) as (rx, tx):
            for d in feed:
                send_multicast(tx, d)
            read = 0
            drain = native.new_drain() if use_native else None
            while (n := (listener._drain_native(rx, drain) if drain
                         else listener._drain(rx, bytearray(RECV_BUFFER)))) > 0:
                read += n
        events = [e for batch, _ in stats.batches for e in batch]
        out.append((events, sum(o for _, o in stats.batches), read, stats.lost))
    return out


def test_an_overflow_is_counted_and_reading_goes_on_as_in_python() -> None:
    feed = [conntrack(ct_id=i, v6=i % 7 == 0) for i in range(300)] + [message(0x101, 2, b"")] * 5
    py, nat = drain_both(feed, 4096)
    assert py == nat
    events, _, read, lost = nat
    assert lost == 1 and 0 < read < 300 and events  # the buffer overflowed; what it held was read
    py, nat = drain_both(feed[:6], 1 << 20)
    assert py == nat and nat[3] == 0 and len(nat[0]) == 6 and nat[1] == 0


def test_the_listener_reports_a_failed_socket_and_which_drain_runs(caplog: pytest.LogCaptureFixture) -> None:
    listener = FlowListener(Recorder(), events_sysctl=lambda: 2)
    assert listener.drain == "native"
    r, w = os.pipe()
    try:
        with caplog.at_level(logging.WARNING, logger="exporter.dnsflows"):
            assert listener._drain_native(FakeFd(r), native_drain()) == -1  # type: ignore[arg-type]
    finally:
        os.close(r)
        os.close(w)
    assert "receive failed: Socket operation on non-socket; reopening" in caplog.text
    assert FlowListener(Recorder(), native_drain=False).drain == "python"


class FakeFd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_a_missing_library_falls_back_to_python_once(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    lib, why = native.load(native.LIBRARY.with_name("_missing.so"))
    assert lib is None and "did not load" in why
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_WHY", why)
    monkeypatch.setattr(native, "_logged", False)
    with caplog.at_level(logging.WARNING, logger="exporter.dnsflows"):
        assert native.new_drain() is None and native.new_drain() is None
        assert FlowListener(Recorder()).drain == "python"
    assert caplog.text.count("reading conntrack events in Python") == 1
    assert native.drain_name() == "python"


def exposition(use_native: bool) -> list[str]:
    """The collector's exposition after the listener thread read the recorded events from a socketpair."""
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stats = FlowStats(discovery(), top_n=10, window=60)
    listener = FlowListener(stats, open_socket=lambda: rx, events_sysctl=lambda: 2, native_drain=use_native)
    try:
        listener.start()
        for d in recorded():
            tx.send(d)  # blocks while 10 are queued: the listener reads meanwhile
        deadline = time.monotonic() + 5
        while sum(stats.snapshot().events.values()) < 14 and time.monotonic() < deadline:
            time.sleep(0.01)
        listener.stop(2)
    finally:
        tx.close()
        rx.close()
    text = generate_latest(build_registry([DnsFlowsCollector(listener)])).decode()
    return [line for line in text.splitlines() if line.startswith("conntrack_dns") and "duration" not in line]


def test_the_listener_thread_exposes_the_same_with_either_drain() -> None:
    nat, py = exposition(True), exposition(False)
    assert nat == py
    assert 'conntrack_dns_events_total{type="other"} 6.0' in nat
    assert 'conntrack_dns_flows_total{backend="127.0.0.1",server_kind="service"} 2.0' in nat


def _garble(at: int, value: int) -> bytes:
    d = conntrack(v6=True)  # the walk (the fast path has no faults of its own)
    return d[:at] + struct.pack("=H", value) + d[at + 2 :]


@pytest.mark.parametrize("garbled", [
    _garble(0, 400),  # the message claims more than the datagram has
    _garble(20, 2),  # a top-level attribute shorter than its header
    _garble(24, 300),  # a tuple attribute past its nest
    _garble(28, 3),  # an address attribute
    _garble(72, 1),  # a protocol attribute (IPv6: the proto nest follows the 44-byte ip nest at 24)
])
def test_a_garbled_datagram_is_logged_with_the_python_parsers_message(garbled: bytes,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ParseError) as raised:
        parse_events(garbled, len(garbled), [])
    with caplog.at_level(logging.DEBUG, logger="exporter.dnsflows"):
        assert native_read([garbled, conntrack()])[1:3] == (1, 2)  # one other for it, and reading went on
    assert f"unreadable conntrack event: {raised.value} (1 garbled datagrams in this read)" in caplog.text
