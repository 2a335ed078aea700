"""Conntrack events recorded from the real kernel (tests/fixtures/dnsflows-events.json, made by
tests/fixtures/record_dnsflows.py): the parser reads them right, and the BPF program lets through exactly
the DNS ones (run by the interpreter in bpfvm.py; the lab tests attach it to a real socket)."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

from exporter.dnsflows.bpf import dns_port_filter
from exporter.dnsflows.parse import CT_DELETE, CT_NEW, IPS_SEEN_REPLY, _walk, iter_flows, parse_events, parse_flow
from exporter.netlink import ParseError
from tests.unit.dnsflows import bpfvm

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "dnsflows-events.json"


def events() -> list[bytes]:
    return [bytes.fromhex(h) for h in json.loads(FIXTURE.read_text())["events"]]


def ip(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def test_recorded_events_parse_into_the_flows_that_were_made() -> None:
    flows = [(mtype, f) for d in events() for mtype, f in iter_flows(d, len(d))]
    assert len(flows) == 14
    dns = [(m, f) for m, f in flows if f is not None]
    assert len(dns) == 8 and sum(m == CT_NEW for m, _ in dns) == 4  # 4 DNS flows, created and destroyed
    by_id: dict[int, dict[int, tuple]] = {}
    for m, f in dns:
        by_id.setdefault(f[7], {})[m] = f
    assert all(set(v) == {CT_NEW, CT_DELETE} for v in by_id.values())
    final = {(f[0], f[2], f[5]): bool(f[6] & IPS_SEEN_REPLY) for v in by_id.values() for f in [v[CT_DELETE]]}
    assert final == {
        (17, ip("10.96.0.10"), ip("127.0.0.1")): True,  # via the DNAT: the backend is the reply source
        (6, ip("10.96.0.10"), ip("127.0.0.1")): True,
        (17, ip("127.0.0.9"), ip("127.0.0.9")): False,  # nobody listened
        (17, ip("::1"), ip("::1")): False,
    }
    # at creation nothing has been answered yet
    assert not any(v[CT_NEW][6] & IPS_SEEN_REPLY for v in by_id.values())
    assert all(f[4] == 53 and f[3] > 1024 for _, f in dns)


def test_the_fixed_offset_fast_path_reads_what_the_attribute_walk_reads() -> None:
    """IPv4 events take the fast path (one unpack, every header checked); it must agree with the walk, and
    a layout it does not know (here: the reply tuple's header changed) must fall back to the walk."""
    fast = 0
    for d in events():
        assert parse_flow(d, 0, len(d)) == _walk(d, 0, len(d))
        fast += d[16] == socket.AF_INET
    assert fast >= 8
    d = next(e for e in events() if e[16] == socket.AF_INET and parse_flow(e, 0, len(e)) is not None)
    moved = d[:74] + struct.pack("=H", 2 | 0x8000 | 0x4000) + d[76:]  # reply tuple type with an extra flag bit
    assert parse_flow(moved, 0, len(moved)) == _walk(moved, 0, len(moved)) == parse_flow(d, 0, len(d))


def test_the_listeners_parser_reads_what_parse_flow_reads() -> None:
    """`parse_events` (the listener's, with the fast path inline) yields the same flows and types as
    `iter_flows`/`parse_flow`, counts the rest as other, and takes the walk for a layout it does not know."""
    d4 = next(e for e in events() if e[16] == socket.AF_INET and parse_flow(e, 0, len(e)) is not None)
    moved = d4[:74] + struct.pack("=H", 2 | 0x8000 | 0x4000) + d4[76:]
    for d in [*events(), moved]:
        out: list[tuple] = []
        other = parse_events(d, len(d), out)
        want = [((m == CT_NEW, f[0], f[1], f[2], f[3], f[5], f[6], f[7]) if f is not None else None)
                for m, f in iter_flows(d, len(d))]
        assert out == [w for w in want if w is not None]
        assert other == sum(w is None for w in want)
    with pytest.raises(ParseError):
        parse_events(d4[:-8], len(d4) - 8, [])  # the message claims more bytes than the datagram has


def test_the_bpf_program_passes_exactly_the_dns_events() -> None:
    prog = dns_port_filter()
    for d in events():
        (mtype, flow), = list(iter_flows(d, len(d)))
        verdict = bpfvm.run(prog, d)
        assert verdict == (0xFFFFFFFF if flow is not None else 0), (mtype, flow)


def test_the_bpf_program_reads_the_port_not_a_fixed_offset() -> None:
    """Rewriting only the destination port attribute of a DNS event flips the verdict."""
    prog = dns_port_filter()
    d = next(e for e in events() if next(iter_flows(e, len(e)))[1] is not None)
    at = d.index(struct.pack("=HH", 6, 3) + struct.pack("!H", 53))  # CTA_PROTO_DST_PORT = 53
    other = d[:at + 4] + struct.pack("!H", 5353) + d[at + 6:]
    assert bpfvm.run(prog, d) and not bpfvm.run(prog, other)
    assert next(iter_flows(other, len(other)))[1] is None
    # ICMP (protocol 1) with a 53 in the same place is no DNS flow either
    num = d.index(struct.pack("=HHB", 5, 1, 17))
    icmp = d[:num + 4] + b"\x01" + d[num + 5:]
    assert not bpfvm.run(prog, icmp)
    assert bpfvm.run(prog, d[:20]) == 0  # no attributes at all


def test_a_truncated_or_garbled_event_is_a_parse_error() -> None:
    d = events()[0]
    with pytest.raises(ParseError):
        list(iter_flows(d, len(d) - 8))  # the datagram ends before the message does
    garbled = d[:20] + struct.pack("=H", 200) + d[22:]  # the first attribute claims 200 bytes
    with pytest.raises(ParseError):
        list(iter_flows(garbled, len(garbled)))
