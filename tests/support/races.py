"""Reproduce the conntrack insert races for real, in a namespace the caller created.

- `dns_pair_race`: the glibc pattern. Two threads pinned to two CPUs send an A and an AAAA query from ONE
  UDP socket (same source port) at the same instant; through a DNAT with `numgen random` both packets
  try to create the same conntrack entry. This kernel resolves the clash (clash_resolve); kernels before
  5.x drop one packet and count insert_failed.
- `tcp_syn_race`: two identical TCP SYNs (raw sockets, same 5-tuple) from two CPUs. TCP does not allow
  clash resolution, so the loser is dropped and counted as insert_failed on any kernel: the fingerprint
  recorded in tests/fixtures for the alert that watches insert_failed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable

import dns.message
import dns.rdatatype

from exporter.conntrack.stats import NetlinkStatsSource
from tests.support.netns import Netns, in_netns, run


def _pinned(cpu: int) -> None:
    ncpu = os.cpu_count() or 1
    os.sched_setaffinity(0, {cpu % ncpu})


def _race(ns: str, pairs: int, send: Callable[[int, int], None]) -> None:
    """Run `pairs` rounds: two threads (CPU 0 and CPU 1) call send(i, which) behind a barrier."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(which: int) -> None:
        try:
            in_netns(ns, lambda: None)  # fail early if the namespace is gone
            _pinned(which)
            for i in range(pairs):
                barrier.wait(timeout=5)
                send(i, which)
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors and not isinstance(errors[0], threading.BrokenBarrierError):
        raise errors[0]


def dns_pair_race(ns: str, server: str, pairs: int = 2000, name: str = "kubernetes.default.svc.cluster.local.",
                  port: int = 53) -> None:
    """A and AAAA from one UDP socket per pair, from two CPUs at once (replies are not awaited)."""
    socks: list[socket.socket] = []
    for _ in range(pairs):
        s = in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(s)
    wires = [dns.message.make_query(name, t).to_wire() for t in (dns.rdatatype.A, dns.rdatatype.AAAA)]

    def send(i: int, which: int) -> None:
        # EPERM: netfilter dropped the packet (the lost half of a pair on an older kernel, or a full table)
        with contextlib.suppress(PermissionError):
            socks[i].sendto(wires[which], (server, port))

    try:
        _race(ns, pairs, send)
    finally:
        for s in socks:
            s.close()


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn_race(ns: str, src: str, dst: str, pairs: int = 2000, dport: int = 9, sport_base: int = 20000) -> None:
    """Identical SYNs (same 5-tuple per round) from two CPUs; TCP clashes end as insert_failed."""
    s0 = in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s1 = in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    srcb, dstb = socket.inet_aton(src), socket.inet_aton(dst)
    segs = []
    for i in range(pairs):
        sport = sport_base + i % 40000
        hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000 + i, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = srcb + dstb + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
        c = _csum(pseudo + hdr)
        segs.append(hdr[:16] + struct.pack("!H", c) + hdr[18:])
    socks = (s0, s1)

    def send(i: int, which: int) -> None:
        with contextlib.suppress(PermissionError):  # EPERM: this SYN lost the race and was dropped
            socks[which].sendto(segs[i], (dst, 0))

    try:
        _race(ns, pairs, send)
    finally:
        s0.close()
        s1.close()


def dnat_pair() -> tuple[Netns, Netns]:
    """kube-proxy's pattern in two fresh namespaces: the client DNATs 10.96.0.10:53 (UDP) at random to two
    backend addresses (10.77.0.2, 10.77.0.3) in the second namespace, over a veth. The caller deletes both."""
    client, backends = Netns(), Netns()
    try:
        a, b = f"{client.name[-10:]}a", f"{client.name[-10:]}b"
        run(["ip", "link", "add", a, "netns", client.name, "type", "veth", "peer", "name", b, "netns", backends.name])
        client.exec(["ip", "addr", "add", "10.77.0.1/24", "dev", a])
        client.exec(["ip", "link", "set", a, "up"])
        client.exec(["ip", "route", "add", "default", "via", "10.77.0.2"])
        for addr in ("10.77.0.2/24", "10.77.0.3/24"):
            backends.exec(["ip", "addr", "add", addr, "dev", b])
        backends.exec(["ip", "link", "set", b, "up"])
        client.exec(["nft", "add table ip svc; add chain ip svc out { type nat hook output priority -100; }; "
                     "add rule ip svc out ip daddr 10.96.0.10 udp dport 53 "
                     "dnat to numgen random mod 2 map { 0 : 10.77.0.2, 1 : 10.77.0.3 }"])
    except BaseException:
        client.delete()
        backends.delete()
        raise
    return client, backends


def until_counted(ns: str, stat: str, race: Callable[[int], None], rounds: int = 24) -> int:
    """Run `race(round)` until the namespace's conntrack `stat` counter (e.g. insert_failed) has grown, at most
    `rounds` times, and return the growth. Each round is a real race: when the other CPU is busy, the two
    senders can be serialised and a round produces no clash, so one round alone is not enough. A round must
    use fresh tuples (the round number is passed for that): a repeated tuple finds the old entry, no clash."""
    src = NetlinkStatsSource()
    try:
        before = in_netns(ns, src.sample).totals()[stat]
        for i in range(rounds):
            race(i)
            grown = int(in_netns(ns, src.sample).totals()[stat] - before)
            if grown > 0:
                return grown
        return 0
    finally:
        src.close()
