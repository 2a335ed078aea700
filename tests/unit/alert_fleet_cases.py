"""The fleet cases for `promtool test rules`: 20 nodes' probe series at a time, built here because writing
1,500 series by hand would hide the few that matter. Each case says which nodes see what (failures, retries,
slow answers per target and name class) and which alerts must fire, with their exact labels and annotations;
`promtool_file()` turns them into one promtool test file (tests/unit/test_alerts.py runs it).

Traffic per node and target: 100 lookups of each name class (`zone`) every 15 s (the ServiceMonitor's
scrape interval); a target that does not answer completes 40 (each failed lookup waits for its timeout).
CoreDNS endpoints report as the exporter reports sampled endpoints: `dns_probe_endpoint_queries_total` by
`zone` and `result` (ok, retried, timeout, slow), no histogram and no per mode/qtype counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

JOB = "conntrack-dns-exporter"
RUNBOOKS = "https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/runbooks/"
NODES = [f"node-{i:02d}" for i in range(1, 21)]
SERVICE = "10.96.0.10:53"
EP_A, POD_A = "10.244.10.2:53", "coredns-6d4b75cb6d-a1b2c"
EP_B, POD_B = "10.244.11.2:53", "coredns-6d4b75cb6d-x9y8z"
TARGETS = [(SERVICE, "service", ""), (EP_A, "endpoint", POD_A), (EP_B, "endpoint", POD_B)]
STEPS = 40  # 10 minutes of 15 s samples
HEAL_STEP = 20  # where a case heals: at 5m

# (node, server, zone) -> fraction of lookups that fail / are retried / answer slowly
Fraction = Callable[[str, str, str], float]


def _none(node: str, server: str, zone: str) -> float:
    return 0.0


@dataclass
class Case:
    name: str
    fails: Fraction = _none
    retries: Fraction = _none
    slow: Fraction = _none
    zones: tuple[str, ...] = ("cluster",)
    full_tables: frozenset[str] = frozenset()
    heals: bool = False
    # alertname -> [(labels, description)] expected firing at FIRE_AT; every alert in CHECKED not listed is silent
    expect: dict[str, list[tuple[dict[str, str], str]]] = field(default_factory=dict)


# Checked pending (silent) at its `for`, firing a minute later, and silent again 2.5m after a heal at 5m.
FOR = {"CoreDNSPodNotAnswering": 60, "CoreDNSPodSlow": 60, "DNSUpstreamFailing": 60, "DNSNodePacketLoss": 60,
       "DNSServiceIPPathBroken": 60}
AFTER_HEAL = "7m30s"
CHECKED = ["CoreDNSPodNotAnswering", "CoreDNSPodSlow", "DNSUpstreamFailing", "DNSNodePacketLoss",
           "DNSServiceIPPathBroken"]


def _counter(per_step: float, heal_per_step: float | None) -> str:
    """Cumulative values: `per_step` added every sample, `heal_per_step` from HEAL_STEP on (if given)."""
    if heal_per_step is None:
        return f"0+{per_step:g}x{STEPS}"
    at_heal = per_step * HEAL_STEP
    return f"0+{per_step:g}x{HEAL_STEP} {at_heal + heal_per_step:g}+{heal_per_step:g}x{STEPS - HEAL_STEP - 1}"


def _series(case: Case) -> list[dict[str, str]]:
    out = []
    for i, node in enumerate(NODES):
        base = f'job="{JOB}", instance="10.0.1.{i + 1}:19153", node="{node}"'
        full = node in case.full_tables
        out.append({"series": f"conntrack_entries{{{base}}}", "values": f"{262144 if full else 9000}x{STEPS}"})
        out.append({"series": f"conntrack_entries_limit{{{base}}}", "values": f"262144x{STEPS}"})
        for server, kind, pod in TARGETS:
            t = f'{base}, server="{server}", kind="{kind}"'
            out.append({"series": f'dns_probe_target_info{{{t}, pod="{pod}"}}', "values": f"1x{STEPS}"})
            slow = 0.0 if full else case.slow(node, server, "cluster")
            if kind == "endpoint":  # sampled endpoints report results only (dns_probe_endpoint_queries_total)
                out += _endpoint_results(case, node, server, t, full, slow)
                continue
            hist = f'{t}, mode="parallel"'
            answered = 100
            out.append({"series": f'dns_probe_duration_seconds_bucket{{{hist}, le="0.5"}}',
                        "values": _counter(answered * (1 - slow), answered if case.heals else None)})
            out.append({"series": f'dns_probe_duration_seconds_bucket{{{hist}, le="5.0"}}',
                        "values": _counter(answered, None)})
            out.append({"series": f"dns_probe_duration_seconds_count{{{hist}}}", "values": _counter(answered, None)})
            for zone in case.zones:
                z = f'{t}, mode="parallel", qtype="A", zone="{zone}"'
                fail = 1.0 if full else case.fails(node, server, zone)
                retry = 0.0 if full else case.retries(node, server, zone)
                requests = 40 if fail >= 1.0 else 100
                healed = 100 if case.heals else None
                out.append({"series": f"dns_probe_requests_total{{{z}}}", "values": _counter(requests, healed)})
                out.append({"series": f'dns_probe_failures_total{{{z}, reason="timeout"}}',
                            "values": _counter(round(requests * fail), 0 if case.heals else None)})
                out.append({"series": f"dns_probe_retries_total{{{z}}}",
                            "values": _counter(round(requests * retry), 0 if case.heals else None)})
    return out


def _endpoint_results(case: Case, node: str, server: str, t: str, full: bool, slow: float) -> list[dict[str, str]]:
    out = []
    healed = 100 if case.heals else None
    for zone in case.zones:
        fail = 1.0 if full else case.fails(node, server, zone)
        retry = 0.0 if full else case.retries(node, server, zone)
        queries = 40 if fail >= 1.0 else 100
        failed = round(queries * fail)
        retried = round((queries - failed) * retry)
        slow_n = round((queries - failed - retried) * slow) if zone == "cluster" else 0
        ok = queries - failed - retried - slow_n
        z = f'{t}, zone="{zone}"'
        for result, n, after in (("ok", ok, healed), ("retried", retried, 0 if case.heals else None),
                                 ("timeout", failed, 0 if case.heals else None),
                                 ("slow", slow_n, 0 if case.heals else None)):
            if n or result == "ok":
                out.append({"series": f'dns_probe_endpoint_queries_total{{{z}, result="{result}"}}',
                            "values": _counter(n, after)})
    return out


def _alert(name: str, labels: dict[str, str], description: str, severity: str) -> dict[str, Any]:
    return {"exp_labels": {"severity": severity, "role": "cause", "job": JOB, **labels},
            "exp_annotations": {"summary": SUMMARIES[name], "description": description,
                                "runbook_url": f"{RUNBOOKS}{name}.md"}}


SUMMARIES = {
    "CoreDNSPodNotAnswering": "A CoreDNS pod does not answer, seen from most nodes.",
    "CoreDNSPodSlow": "A CoreDNS pod answers slowly, seen from most nodes.",
    "DNSUpstreamFailing": "External names fail on every DNS server while cluster names resolve: the upstream DNS "
                          "is failing.",
    "DNSNodePacketLoss": "This node loses DNS packets to every DNS server, CoreDNS endpoints included.",
}
SEVERITIES = {"CoreDNSPodNotAnswering": "critical", "CoreDNSPodSlow": "warning", "DNSUpstreamFailing": "critical",
              "DNSNodePacketLoss": "critical"}


def pod_down(server: str, pod: str, share: str) -> tuple[dict[str, str], str]:
    return ({"server": server, "pod": pod},
            f"CoreDNS pod {pod} ({server}) failed more than 10% of the cluster-name probes sent to it directly "
            f"from {share} of the nodes probing it, over the last 2m. The pod is the problem, not the nodes; "
            "through the Service IP every node loses the share of lookups kube-proxy sends to it.")


def pod_slow(server: str, pod: str, share: str) -> tuple[dict[str, str], str]:
    return ({"server": server, "pod": pod},
            f"More than 5% of the answers of CoreDNS pod {pod} ({server}) took longer than 500 ms (without any "
            f"retransmission) from {share} of the nodes probing it, over the last 2m.")


def node_loss(node: str, value: str) -> tuple[dict[str, str], str]:
    i = NODES.index(node) + 1
    return ({"instance": f"10.0.1.{i}:19153", "node": node},
            f"From node {node}, even the CoreDNS endpoint that did best lost or failed {value} of its probe "
            "queries in the last 2m (retransmissions and failures), while other nodes reach the same pods: packets "
            "are lost on this node's path (NIC, CNI, node network), not in CoreDNS and not only behind the Service IP.")


def upstream(value: str) -> tuple[dict[str, str], str]:
    return ({}, f"Even the DNS server that did best failed {value} of the probes of external names over the last "
                "2m, across all nodes, while cluster names failed less than 5%. CoreDNS works; what it forwards to "
                "(the Corefile's `forward`, the nodes' upstream resolvers) does not.")


def _dead_a(node: str, server: str, zone: str) -> float:
    return {EP_A: 1.0, SERVICE: 0.5}.get(server, 0.0)


def _node07_broken(node: str, server: str, zone: str) -> float:
    return 1.0 if node == "node-07" else 0.0


def _first(n: int) -> Fraction:
    nodes = set(NODES[:n])
    return lambda node, server, zone: _dead_a(node, server, zone) if node in nodes else 0.0


def _both(node: str, server: str, zone: str) -> float:
    return _dead_a(node, server, zone)


def _node07_loss(node: str, server: str, zone: str) -> float:
    return 0.3 if node == "node-07" else 0.0


def _external_everywhere(node: str, server: str, zone: str) -> float:
    return 1.0 if zone == "external" else 0.0


def _external_on_a(node: str, server: str, zone: str) -> float:
    return 1.0 if zone == "external" and server == EP_A else 0.0


def _external_and_cluster(node: str, server: str, zone: str) -> float:
    return 1.0 if zone == "external" else 0.2


def _slow_b(n: int) -> Fraction:
    nodes = set(NODES[:n])
    return lambda node, server, zone: 0.2 if server == EP_B and node in nodes else 0.0


CASES = [
    Case("one CoreDNS endpoint broken from all 20 nodes: one alert naming the pod, no node alert", fails=_both,
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "100%")]}),
    Case("the same dead pod healed at 5m: the alert is gone 2.5m later", fails=_both, heals=True,
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "100%")]}),
    Case("one node broken (every lookup from node-07 fails): a node alert, no CoreDNS alert", fails=_node07_broken,
         expect={"DNSNodePacketLoss": [node_loss("node-07", "100%")]}),
    Case("both at once: the dead pod once, and node-07's 30% loss on the endpoint that answers", fails=_both,
         retries=_node07_loss,
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "100%")],
                 "DNSNodePacketLoss": [node_loss("node-07", "30%")]}),
    Case("the pod fails from 10 of 20 nodes: a CoreDNS problem (just above half)", fails=_first(10),
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "50%")]}),
    Case("the pod fails from 9 of 20 nodes: not a CoreDNS problem (just below half)", fails=_first(9)),
    Case("12 nodes with a full conntrack table fail everything: their failures do not blame CoreDNS",
         full_tables=frozenset(NODES[:12])),
    Case("a CoreDNS pod slow from all nodes: one alert", slow=_slow_b(20),
         expect={"CoreDNSPodSlow": [pod_slow(EP_B, POD_B, "100%")]}),
    Case("a CoreDNS pod slow from 9 of 20 nodes: silent", slow=_slow_b(9)),
    Case("the slow pod healed at 5m: gone 2.5m later", slow=_slow_b(20), heals=True,
         expect={"CoreDNSPodSlow": [pod_slow(EP_B, POD_B, "100%")]}),
    Case("upstream down: external names fail on every server from every node, cluster names fine: one alert",
         fails=_external_everywhere, zones=("cluster", "external"),
         expect={"DNSUpstreamFailing": [upstream("100%")]}),
    Case("upstream healed at 5m: gone 2.5m later", fails=_external_everywhere, zones=("cluster", "external"),
         heals=True, expect={"DNSUpstreamFailing": [upstream("100%")]}),
    Case("external names fail on one CoreDNS pod only (its forward is broken): not the upstream",
         fails=_external_on_a, zones=("cluster", "external")),
    Case("external names and 20% of cluster names fail everywhere: CoreDNS itself, not the upstream",
         fails=_external_and_cluster, zones=("cluster", "external"),
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "100%"), pod_down(EP_B, POD_B, "100%")]}),
    Case("every CoreDNS pod fails from every node: two pod alerts, no node is blamed",
         fails=lambda node, server, zone: 1.0,
         expect={"CoreDNSPodNotAnswering": [pod_down(EP_A, POD_A, "100%"), pod_down(EP_B, POD_B, "100%")]}),
    Case("3% errors on every endpoint from every node: CoreDNS's errors do not blame each node",
         retries=lambda node, server, zone: 0.03),
]


def promtool_tests(rule_file: str) -> dict[str, Any]:
    tests = []
    for case in CASES:
        checks: list[dict[str, Any]] = []
        for name in CHECKED:
            expected = [_alert(name, labels, desc, SEVERITIES[name]) for labels, desc in case.expect.get(name, [])]
            if expected:
                checks.append({"eval_time": f"{FOR[name]}s", "alertname": name, "exp_alerts": []})
            checks.append({"eval_time": f"{FOR[name] + 60}s", "alertname": name, "exp_alerts": expected})
            if case.heals:
                checks.append({"eval_time": AFTER_HEAL, "alertname": name, "exp_alerts": []})
        tests.append({"name": case.name, "interval": "15s", "input_series": _series(case),
                      "alert_rule_test": checks})
    return {"rule_files": [rule_file], "evaluation_interval": "15s", "tests": tests}
