"""The table scan against real kernel conntrack tables in fresh namespaces, checked against `conntrack -L`.

The scene is made of real traffic (TCP connections driven into ESTABLISHED, TIME_WAIT, CLOSE_WAIT,
SYN_SENT and CLOSE; UDP with and without replies, DNS over UDP and TCP, ICMP and ICMPv6 echoes, IPv4
and IPv6) plus filler entries from `tests.support.ctfill`. Every count the scan reports must equal what
the C tool `conntrack -L` lists for the same namespace at the same moment.

Also the fixture recorder: `python -m tests.integration.test_table_scan record` rebuilds the scene and
writes `tests/fixtures/table-mixed.json` (raw dump datagrams + the `conntrack -L` reference) and its
deliberately truncated and garbled copies.
"""

from __future__ import annotations

import contextlib
import json
import platform
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.discovery import Discovery
from exporter.discovery.pods import PodIndex
from exporter.discovery.targets import Target, TargetRegistry
from exporter.table.parse import ip_key
from exporter.table.scan import Scanner, ScanResult, open_netlink
from exporter.table.service import TableScanService
from tests.support import ctfill
from tests.support.exporter_proc import Exporter, parse, value
from tests.support.netns import Netns, in_netns, skip_reason

pytestmark = pytest.mark.netns

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# `conntrack -L` prints TCP state 9 (SYN_SENT2) as LISTEN.
CLI_TCP_STATES = {"LISTEN": "syn_sent2"}
KNOWN_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")


# --- the reference: `conntrack -L -o extended`, parsed -------------------------------------------------

def conntrack_list(ns: Netns) -> list[str]:
    out = ns.exec(["conntrack", "-L", "-o", "extended"]).stdout
    return [line for line in out.splitlines() if line.strip()]


def reference(lines: list[str], servers: set[str] | None = None,
              pods: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """What the breakdown must say, computed from `conntrack -L -o extended` lines."""
    states: dict[tuple[str, str], int] = {}
    dns = {"udp": 0, "tcp": 0}
    stale = 0
    by_source: dict[tuple[str, str], int] = {}
    for line in lines:
        tok = line.split()
        proto = tok[2] if tok[2] in KNOWN_PROTOCOLS else "other"
        if proto == "tcp":
            state = CLI_TCP_STATES.get(tok[5], tok[5].lower())
        elif "[ASSURED]" in tok:
            state = "assured"
        elif "[UNREPLIED]" in tok:
            state = "unreplied"
        else:
            state = "replied"
        states[(proto, state)] = states.get((proto, state), 0) + 1
        srcs = [t[4:] for t in tok if t.startswith("src=")]
        dsts = [t[4:] for t in tok if t.startswith("dst=")]
        dports = [t[6:] for t in tok if t.startswith("dport=")]
        if proto in ("udp", "tcp") and dports and dports[0] == "53":
            dns[proto] += 1
            # UDP addressed to a known DNS server, answered from an address that is none of them
            if servers is not None and proto == "udp" and dsts[0] in servers and srcs[1] not in servers:
                stale += 1
        if pods is not None:
            pod = pods.get(srcs[0], ("", ""))
            by_source[pod] = by_source.get(pod, 0) + 1
    return {"entries": len(lines), "states": states, "dns": dns, "stale": stale, "sources": by_source}


def scan_result_view(result: ScanResult) -> dict[str, Any]:
    return {"entries": result.agg.entries, "states": result.agg.named_states(),
            "dns": result.agg.dns_by_transport(), "stale": result.agg.stale_dns}


def scanner_in(ns: Netns, **kw: Any) -> Scanner:
    return Scanner(open_socket=lambda: in_netns(ns.name, open_netlink), **kw)


# --- the scene -----------------------------------------------------------------------------------------

class Scene:
    """Real flows in several states inside `ns`; keeps its sockets open until `close()`."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def sock(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        s = self.ns.socket(family, type, proto)
        self.socks.append(s)
        return s

    def build(self) -> None:
        ns = self.ns
        # Conntrack only tracks a namespace's traffic once a rule needs it; also drop SYNs to port 9
        # on input (after the entry is confirmed on output), which leaves SYN_SENT entries.
        ns.exec(["nft", "add table inet track; "
                 "add chain inet track cout { type filter hook output priority 0; }; "
                 "add rule inet track cout ct state new counter; "
                 "add chain inet track cin { type filter hook input priority 0; }; "
                 "add rule inet track cin tcp dport 9 drop"])
        # TCP, IPv4 and IPv6 listeners (port 53 too: DNS over TCP)
        lst4 = self.sock()
        lst4.bind(("127.0.0.1", 8080))
        lst4.listen(64)
        lst6 = self.sock(socket.AF_INET6)
        lst6.bind(("::1", 8080))
        lst6.listen(64)
        lst53 = self.sock()
        lst53.bind(("127.0.0.1", 53))
        lst53.listen(64)
        for _ in range(3):  # ESTABLISHED
            self.connect(lst4, ("127.0.0.1", 8080))
        self.connect(lst6, ("::1", 8080), socket.AF_INET6)
        self.connect(lst53, ("127.0.0.1", 53))
        for _ in range(2):  # TIME_WAIT: both sides close, all FINs acknowledged
            c, s = self.connect(lst4, ("127.0.0.1", 8080))
            c.close()
            s.close()
        c, s = self.connect(lst4, ("127.0.0.1", 8080))  # CLOSE_WAIT: one FIN, acknowledged
        c.shutdown(socket.SHUT_WR)
        for _ in range(2):  # SYN_SENT: the SYN is dropped on input
            c = self.sock()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", 9))
        for _ in range(2):  # CLOSE: an established connection reset (SO_LINGER 0)
            c, s = self.connect(lst4, ("127.0.0.1", 8080))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        # UDP: an echo server (replied), DNS to it and to a dead port (unreplied)
        echo = self.sock(type=socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 53))
        self._serve_udp(echo)
        for _ in range(4):
            self.udp_exchange(("127.0.0.1", 53))
        for _ in range(3):
            u = self.sock(type=socket.SOCK_DGRAM)
            u.sendto(b"q", ("127.0.0.1", 5353))
        u6 = self.sock(socket.AF_INET6, socket.SOCK_DGRAM)
        u6.sendto(b"q", ("::1", 53))
        # DNS to a "Service IP" DNAT'ed to an "endpoint" where nothing listens (kube-proxy style)
        for addr in ("10.96.0.10/32", "10.244.0.5/32"):
            ns.exec(["ip", "addr", "add", addr, "dev", "lo"])
        ns.exec(["nft", "add table ip nat; add chain ip nat natout { type nat hook output priority -100; }; "
                 "add rule ip nat natout ip daddr 10.96.0.10 udp dport 53 dnat to 10.244.0.5; "
             "add rule ip nat natout ip daddr 10.96.0.10 tcp dport 53 dnat to 10.244.0.5; "
             "add table ip f; add chain ip f in { type filter hook input priority 0; }; "
             "add rule ip f in tcp dport 53 drop"])  # a dead pod: the SYN stays unanswered (SYN_SENT)
        for _ in range(2):
            u = self.sock(type=socket.SOCK_DGRAM)
            u.sendto(b"q", ("10.96.0.10", 53))
        # ICMP and ICMPv6 echo (the kernel answers both)
        ic = self.sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ic.sendto(bytes.fromhex("0800f7fe00010000"), ("127.0.0.1", 0))
        ic6 = self.sock(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        ic6.sendto(bytes.fromhex("8000000000020001"), ("::1", 0))
        time.sleep(0.3)  # let the last FINs/ACKs and echo replies land

    def connect(self, listener: socket.socket, addr: tuple[str, int],
                family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
        c = self.sock(family)
        c.connect(addr)
        s, _ = listener.accept()
        self.socks.append(s)
        return c, s

    def udp_exchange(self, addr: tuple[str, int]) -> None:
        u = self.sock(type=socket.SOCK_DGRAM)
        u.settimeout(2)
        u.sendto(b"q", addr)
        u.recv(512)

    def _serve_udp(self, s: socket.socket) -> None:
        s.settimeout(0.2)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    data, peer = s.recvfrom(512)
                except (TimeoutError, OSError):
                    continue
                with contextlib.suppress(OSError):
                    s.sendto(data, peer)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def scene(netns: Netns) -> Iterator[Scene]:
    sc = Scene(netns)
    try:
        sc.build()
        yield sc
    finally:
        sc.close()


def _stable(lines: list[str]) -> list[str]:
    """Lines without the timeout column (it ticks down between two listings)."""
    return sorted(" ".join(t[:4] + t[5:]) for t in (line.split() for line in lines))


def scan_and_list(ns: Netns, scanner: Scanner, **kw: Any) -> tuple[ScanResult, list[str]]:
    """A scan between two `conntrack -L` listings; repeated until the table did not move meanwhile."""
    for _ in range(5):
        first = conntrack_list(ns)
        result = scanner.scan(**kw)
        lines = conntrack_list(ns)
        if _stable(first) == _stable(lines):
            break
        time.sleep(0.2)
    return result, lines


# --- tests ---------------------------------------------------------------------------------------------

def test_every_count_matches_conntrack_list(scene: Scene) -> None:
    ns = scene.ns
    ctfill.fill(ns.name, 3000)
    result, lines = scan_and_list(ns, scanner_in(ns))
    assert not result.partial, result.message
    ref = reference(lines)
    got = scan_result_view(result)
    assert got["entries"] == ref["entries"] == ctfill.count(ns.name)
    assert got["states"] == ref["states"]
    assert got["dns"] == ref["dns"]
    # the scene really has the variety this test claims
    for key in [("tcp", "established"), ("tcp", "time_wait"), ("tcp", "close_wait"), ("tcp", "syn_sent"),
                ("tcp", "close"), ("udp", "replied"), ("udp", "unreplied"), ("udp", "assured"),
                ("icmp", "replied"), ("icmpv6", "replied")]:
        assert got["states"].get(key, 0) > 0, (key, got["states"])
    assert got["dns"]["udp"] >= 5 and got["dns"]["tcp"] >= 1


def test_top_sources_name_pods_from_the_pod_map(scene: Scene) -> None:
    ns = scene.ns
    # filler entries come from 198.18.0.0 + i % sources: 40 sources, 100 entries each
    ctfill.fill(ns.name, 4000, sources=40)
    pods = PodIndex()
    pods.replace([("198.18.0.1", "shop", "cart-7d9f"), ("198.18.0.2", "shop", "cart-7d9f"),
                  ("198.18.0.3", "dns", "coredns-1"), ("127.0.0.1", "default", "web-0"),
                  ("::1", "default", "web-0"), ("10.1.2.3", "idle", "nothing")])
    snaps = []
    svc = TableScanService(scanner_in(ns), top_n=2, discovery=Discovery(pods=pods), on_scan=snaps.append)
    snap = svc.scan_once()
    lines = conntrack_list(ns)
    assert snap is not None and not snap.partial and snap.entries == len(lines)
    ref = reference(lines, pods=pods.snapshot())["sources"]
    rows = dict(snap.top_sources)
    # top 2 of: cart (2 addresses, 200 entries), web-0 (the scene's loopback flows), coredns-1 (100)
    ranked = sorted(((n, p) for p, n in ref.items() if p != ("", "")), reverse=True)
    top2 = {p for _, p in ranked[:2]}
    assert set(rows) == top2 | {("", ""), ("", "other")}
    for pod in top2:
        assert rows[pod] == ref[pod]
    assert rows[("shop", "cart-7d9f")] == 200
    assert rows[("", "")] == ref[("", "")]  # unknown sources, no IP label
    assert rows[("", "other")] == sum(n for n, _ in ranked[2:])
    assert sum(rows.values()) == snap.entries
    assert snaps == [snap]


def test_stale_dns_entries_after_a_rollout(netns: Netns) -> None:
    """The service IP 10.96.0.10 is DNAT'ed to endpoint .5; after a 'rollout' the new endpoint is .6.

    Entries created before the rollout still answer from .5: stale once the targets say .6, not before.
    DNS to a server that is no target (an upstream, 10.53.0.1 here) is never counted, nor is TCP DNS to the old
    endpoint: a connection pins nothing (the next one gets a new port and the current DNAT), and counting its
    entries kept the stale-entries alert firing for the kernel's 120 s SYN_SENT timeout after a healed path.
    """
    ns = netns
    for addr in ("10.96.0.10/32", "10.244.0.5/32", "10.244.0.6/32", "10.53.0.1/32"):
        ns.exec(["ip", "addr", "add", addr, "dev", "lo"])
    ns.exec(["nft", "add table ip nat; "
             "add chain ip nat natout { type nat hook output priority -100; }; "
             "add rule ip nat natout ip daddr 10.96.0.10 udp dport 53 dnat to 10.244.0.5; "
             "add rule ip nat natout ip daddr 10.96.0.10 tcp dport 53 dnat to 10.244.0.5; "
             "add table ip f; add chain ip f in { type filter hook input priority 0; }; "
             "add rule ip f in tcp dport 53 drop"])  # a dead pod: the SYN stays unanswered (SYN_SENT)
    socks = []
    try:
        def query(n: int) -> None:
            for _ in range(n):
                u = ns.socket(type=socket.SOCK_DGRAM)
                u.sendto(b"q", ("10.96.0.10", 53))
                socks.append(u)

        query(3)
        tcp = ns.socket(type=socket.SOCK_STREAM)
        tcp.setblocking(False)
        with contextlib.suppress(OSError):
            tcp.connect(("10.96.0.10", 53))  # DNAT'ed to .5 like the UDP queries
        socks.append(tcp)
        upstream = ns.socket(type=socket.SOCK_DGRAM)
        upstream.sendto(b"q", ("10.53.0.1", 53))
        socks.append(upstream)
        targets = TargetRegistry()
        targets.set("endpoint", [Target("10.96.0.10", kind="service"), Target("10.244.0.5", kind="endpoint")])
        scanner = scanner_in(ns)
        servers = [k for k in map(ip_key, targets.addresses()) if k]
        before, lines = scan_and_list(ns, scanner, dns_servers=servers)
        assert before.agg.dns_by_transport()["udp"] == 4
        assert before.agg.stale_dns == 0 == reference(lines, servers=set(targets.addresses()))["stale"]

        # rollout: the endpoint moves to .6; new queries go there, the old entries stay
        ns.exec(["nft", "flush chain ip nat natout; add rule ip nat natout ip daddr 10.96.0.10 udp dport 53 "
                 "dnat to 10.244.0.6"])
        query(2)
        targets.set("endpoint", [Target("10.96.0.10", kind="service"), Target("10.244.0.6", kind="endpoint")])
        svc = TableScanService(scanner, discovery=Discovery(targets))
        snap = svc.scan_once()
        lines = conntrack_list(ns)
        assert snap is not None and not snap.partial
        assert snap.stale_dns == 3 == reference(lines, servers=set(targets.addresses()))["stale"]
        assert any(" tcp " in f" {line} " and "src=10.244.0.5" in line for line in lines)  # there, not counted
        assert dict(snap.dns)["udp"] == 6

        # no targets known: nothing can be called stale, so the metric is absent
        assert TableScanService(scanner).scan_once().stale_dns is None  # type: ignore[union-attr]
    finally:
        for s in socks:
            s.close()


def test_time_cap_gives_a_partial_scan(netns: Netns) -> None:
    ctfill.fill(netns.name, 20000)
    result = scanner_in(netns, max_duration=0.2, pace=0.05, pace_every=1).scan()
    assert result.partial and result.reason == "timeout"
    assert 0 < result.agg.entries < 20000
    assert "max-duration" in result.message


def test_exporter_serves_the_breakdown(scene: Scene) -> None:
    """The real exporter process in the namespace: its table metrics equal `conntrack -L`."""
    ns = scene.ns
    ctfill.fill(ns.name, 2000)
    env = {"CONNTRACK_DNS_EXPORTER_COLLECTOR_DNS": "false", "CONNTRACK_DNS_EXPORTER_COLLECTOR_CONNTRACK": "false"}
    exp = Exporter(["--collector.table.interval=0.5s", "--collector.table.cpu-budget=0"], netns=ns, env=env)
    try:
        exp.wait_ready()
        conn = exp.connect()  # one keep-alive connection: scraping adds a single, stable entry

        def scrape() -> dict[Any, float]:
            conn.request("GET", "/metrics")
            return parse(conn.getresponse().read().decode())

        scrape()
        samples: dict[Any, float] = {}
        lines: list[str] = []
        for _ in range(10):
            first = conntrack_list(ns)
            t0 = time.time()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # a scan that started after the first listing
                samples = scrape()
                ts = value(samples, "conntrack_table_last_scan_timestamp_seconds")
                dur = value(samples, "conntrack_table_scan_duration_seconds")
                if ts is not None and dur is not None and ts - dur > t0:
                    break
                time.sleep(0.1)
            lines = conntrack_list(ns)
            if _stable(first) == _stable(lines):
                break
        conn.close()
        ref = reference(lines)
        assert value(samples, "conntrack_table_scan_partial") == 0, exp.stderr()
        assert value(samples, "conntrack_table_scan_entries") == ref["entries"]
        for (proto, state), n in ref["states"].items():
            assert value(samples, "conntrack_table_entries", protocol=proto, state=state) == n, (proto, state)
        assert value(samples, "conntrack_table_entries", protocol="tcp", state="last_ack") == 0
        for transport, n in ref["dns"].items():
            assert value(samples, "conntrack_table_dns_entries", transport=transport) == n
        assert value(samples, "conntrack_table_top_sources", namespace="", pod="") == ref["entries"]
        assert value(samples, "conntrack_table_top_sources", namespace="", pod="other") == 0
        assert value(samples, "conntrack_dns_exporter_collector_success", collector="table") == 1
    finally:
        exp.stop()


# --- fixture recording ---------------------------------------------------------------------------------

def record_fixtures(out_dir: Path = FIXTURES) -> None:
    reason = skip_reason()
    if reason:
        raise SystemExit(reason)
    with Netns() as ns:
        sc = Scene(ns)
        try:
            sc.build()
            ctfill.fill(ns.name, 150, sources=7)
            for _ in range(5):
                first = conntrack_list(ns)
                datagrams: list[bytes] = []
                result = scanner_in(ns, record=datagrams).scan()
                lines = conntrack_list(ns)
                if _stable(first) == _stable(lines):
                    break
        finally:
            sc.close()
    if result.partial or result.agg.entries != len(lines):
        raise SystemExit(f"table moved while recording: {result.agg.entries} vs {len(lines)}")
    meta = {"kernel": platform.release(), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "conntrack_list": lines, "entries": len(lines)}
    good = {"description": "One conntrack table dump (raw netlink datagrams, hex) of a namespace with real TCP "
                           "flows (established, time_wait, close_wait, syn_sent, close), UDP with and without "
                           "replies, DNS over UDP and TCP (2 UDP queries to 10.96.0.10 DNAT'ed to 10.244.0.5), "
                           "ICMP/ICMPv6 echoes and 150 ctfill entries; "
                           "`conntrack_list` is `conntrack -L -o extended` taken right after.",
            **meta, "datagrams": [d.hex() for d in datagrams]}
    (out_dir / "table-mixed.json").write_text(json.dumps(good, indent=1) + "\n")
    # Truncated on purpose: the first datagram cut in the middle of its 11th message, the rest dropped.
    first = datagrams[0]
    cut = _message_offsets(first)[10] + 30
    truncated = {"description": "table-mixed.json cut ON PURPOSE for the partial-scan test: the first datagram "
                                "is truncated 30 bytes into its 11th message and the rest of the dump is "
                                "missing, so exactly 10 entries parse.",
                 **meta, "complete_messages": 10, "datagrams": [first[:cut].hex()]}
    (out_dir / "table-truncated.json").write_text(json.dumps(truncated, indent=1) + "\n")
    # Garbled on purpose: the 6th message's first attribute claims a length past the message end.
    offs = _message_offsets(first)
    bad = bytearray(first)
    bad[offs[5] + 20 : offs[5] + 22] = (0xFFF0).to_bytes(2, sys.byteorder)
    garbled = {"description": "table-mixed.json garbled ON PURPOSE for the partial-scan test: in the first "
                              "datagram the 6th message's first attribute (CTA_TUPLE_ORIG) claims a length of "
                              "65520 bytes, past the end of its message; 5 entries parse before it.",
               **meta, "complete_messages": 5, "datagrams": [bytes(bad).hex(), *(d.hex() for d in datagrams[1:])]}
    (out_dir / "table-garbled.json").write_text(json.dumps(garbled, indent=1) + "\n")
    print(f"recorded {len(lines)} entries in {len(datagrams)} datagrams")


def _message_offsets(dgram: bytes) -> list[int]:
    offs, off = [], 0
    while off + 16 <= len(dgram):
        offs.append(off)
        off += (int.from_bytes(dgram[off : off + 4], sys.byteorder) + 3) & ~3
    return offs


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record_fixtures()
    else:
        raise SystemExit("usage: python -m tests.integration.test_table_scan record")
