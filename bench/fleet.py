"""Fleet scale (issue 17): series per node and probe qps per CoreDNS endpoint per node at 2, 10 and 30 endpoints.

The real probe loop and `dns` collector run in-process against 1 + E in-process DNS servers (the Service IP
and E endpoints); every query each server receives is counted there. Rounds are 0.1 s; the figures are
per round, converted to the default 5 s interval.
- after: the defaults (`--probe.endpoints-per-round` 2, endpoints kept as results only);
- named reference "before": what the code did before issue 17, run with today's code: every endpoint
  every round (endpoints per round = E) with the node-local targets' full series set (the endpoints
  registered as kind `static`, which is how every target was treated then).
Series are the DNS probe families of one node (Service IP + E endpoints, healthy, no NodeLocal); the whole
node adds about 90 (conntrack, table, kubernetes, web; `tests/integration/test_probes_fleet.py`
measures 303 in all with 30 endpoints, 28 dead, and NodeLocal). The fleet figure multiplies the measured
per-node qps by 5,000 nodes.
"""

from __future__ import annotations

import os
import time

from prometheus_client.registry import CollectorRegistry

from exporter.discovery import Discovery
from exporter.discovery.targets import Target, TargetRegistry
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.scheduler import ProbeConfig, ProbeService
from exporter.dns.store import ProbeStore
from tests.support.dnsserver import DnsServer

INTERVAL = 0.1
DEFAULT_INTERVAL = 5.0
FLEET = 5000


def _measure(n_endpoints: int, before: bool, rounds: int) -> tuple[int, float, float]:
    """(DNS series, queries per endpoint per round, queries to the Service IP per round)."""
    servers = [DnsServer() for _ in range(n_endpoints + 1)]
    for s in servers:
        s.__enter__()
    try:
        registry = TargetRegistry()
        kind = "static" if before else "endpoint"
        svc = Target(servers[0].host, servers[0].port, "service")
        eps = [Target(s.host, s.port, kind, pod=f"coredns-{i}") for i, s in enumerate(servers[1:])]
        registry.set("kubernetes", [svc, *eps])
        store = ProbeStore()
        config = ProbeConfig(interval=INTERVAL, timeout=1.0, jitter=0.0, node="bench-node-17",
                             endpoints_per_round=n_endpoints if before else 2, resolv_conf="/nonexistent")
        service = ProbeService(config, Discovery(registry), store)
        service.start()
        try:
            while service.rounds < 3:
                time.sleep(0.01)
            r0 = service.rounds
            base = [len(s.logged()) for s in servers]
            while service.rounds < r0 + rounds:
                time.sleep(0.01)
            got = [len(s.logged()) - b for s, b in zip(servers, base, strict=True)]
            done = service.rounds - r0
        finally:
            service.stop(2.0)
        reg = CollectorRegistry(auto_describe=False)
        reg.register(DnsProbeCollector(store, registry))  # type: ignore[arg-type]
        series = sum(len(fam.samples) for fam in reg.collect())
        per_endpoint = sum(got[1:]) / n_endpoints / done
        return series, per_endpoint, got[0] / done
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def run(argv: list[str]) -> list[str]:
    rounds = 30 if os.environ.get("BENCH_QUICK") == "1" else 90
    lines = [f"{rounds} rounds each; qps at the default {DEFAULT_INTERVAL:g} s interval; reference: before"]
    for n in (2, 10, 30):
        s_before, q_before, svc_before = _measure(n, True, rounds)
        s_after, q_after, svc_after = _measure(n, False, rounds)
        qps_b, qps_a = q_before / DEFAULT_INTERVAL, q_after / DEFAULT_INTERVAL
        lines += [
            f"{n:2d} endpoints: DNS series per node {s_before} -> {s_after} ({s_after / s_before:.2f}x); "
            f"probe qps per endpoint per node {qps_b:.3f} -> {qps_a:.3f} ({qps_a / qps_b:.2f}x); "
            f"at {FLEET} nodes {qps_b * FLEET:.0f} -> {qps_a * FLEET:.0f} qps per CoreDNS pod; "
            f"Service IP queries per round {svc_before:.2f} -> {svc_after:.2f}",
        ]
    return lines
