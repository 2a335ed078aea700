"""The table collector in the lab: stale DNS entries appear after the stale-endpoint fault, and not before.

The exporter runs in the lab's node namespace (as under hostNetwork) with the DNS Service IP, the real
CoreDNS stand-ins (dnsmasq backends) and NodeLocal as its targets. The pod sends real DNS queries to the
Service IP; kube-proxy-style DNAT spreads them over the endpoints. After `stale-endpoint` the map also
holds an address where no pod exists: entries NATed there answer (or rather, never answer) from an
address that is no target, which is what `conntrack_table_stale_dns_entries` counts. Every figure is
compared with `conntrack -L` of the node namespace at the same moment.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import dns.message
import pytest

from tests.integration.test_table_scan import _stable, conntrack_list, reference
from tests.lab import Lab
from tests.lab.dnsq import query
from tests.lab.topology import STALE_IP, UPSTREAM_IP
from tests.support.exporter_proc import Exporter, parse, value

pytestmark = [pytest.mark.netns, pytest.mark.lab]


def send_queries(lab: Lab, n: int) -> None:
    """n DNS queries from the pod to the Service IP, each from its own socket (its own conntrack entry)."""
    wire = dns.message.make_query(lab.cluster_name, "A").to_wire()
    for _ in range(n):
        s = lab.pod.socket(type=socket.SOCK_DGRAM)
        try:
            s.sendto(wire, (lab.service_ip, 53))
        finally:
            s.close()


def settled_scan(lab: Lab, exp: Exporter) -> tuple[dict[Any, float], list[str]]:
    """Samples of a scan that started after a `conntrack -L` listing equal to the one taken after it."""
    conn = exp.connect()
    samples: dict[Any, float] = {}
    lines: list[str] = []
    try:
        for _ in range(10):
            first = conntrack_list(lab.node)
            t0 = time.time()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                conn.request("GET", "/metrics")
                samples = parse(conn.getresponse().read().decode())
                ts = value(samples, "conntrack_table_last_scan_timestamp_seconds")
                dur = value(samples, "conntrack_table_scan_duration_seconds")
                if ts is not None and dur is not None and ts - dur > t0:
                    break
                time.sleep(0.1)
            lines = conntrack_list(lab.node)
            if _stable(first) == _stable(lines):
                break
    finally:
        conn.close()
    return samples, lines


def test_stale_dns_entries_after_the_stale_endpoint_fault(healthy_lab: Lab) -> None:
    lab = healthy_lab
    targets = {lab.service_ip, *(b.ip for b in lab.backends)}
    args = ["--collector.dns", "--probe.interval=1h", "--collector.table.interval=0.5s",
            "--collector.table.cpu-budget=0",
            *(f"--probe.server={t}" for t in sorted(targets))]
    if lab.nodelocal:
        targets.add(lab.nodelocal_ip)
        args.append(f"--probe.nodelocal={lab.nodelocal_ip}")
    # a clean slate: earlier lab tests may have left unreplied entries to the stale address (30 s timeout)
    lab.node.exec(["conntrack", "-D", "--reply-src", STALE_IP], check=False)
    exp = lab.start_exporter(*args)
    try:
        # a name no cache holds: a backend asks the upstream resolver, through the node; DNS to a server
        # that is no target must not count as stale
        query(lab.pod.name, lab.service_ip, f"n{time.time_ns()}.{lab.external_name}")
        send_queries(lab, 12)
        samples, lines = settled_scan(lab, exp)
        ref = reference(lines, servers=targets)
        assert ref["dns"]["udp"] >= 12
        assert value(samples, "conntrack_table_dns_entries", transport="udp") == ref["dns"]["udp"]
        assert value(samples, "conntrack_table_stale_dns_entries") == ref["stale"] == 0, exp.stderr()
        assert any(f"dst={UPSTREAM_IP} " in line and " dport=53 " in line for line in lines)

        lab.fault("stale-endpoint")
        send_queries(lab, 30)  # about a third go to the address where no pod exists
        samples, lines = settled_scan(lab, exp)
        ref = reference(lines, servers=targets)
        stale_lines = [line for line in lines if " udp " in f" {line} " and " dport=53 " in line
                       and f"src={STALE_IP} " in line]
        assert ref["stale"] == len(stale_lines) > 0
        assert value(samples, "conntrack_table_stale_dns_entries") == ref["stale"]
        assert value(samples, "conntrack_table_scan_partial") == 0
    finally:
        exp.stop()
