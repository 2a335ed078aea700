"""The probe name's class (`zone`): cluster names and external names are separate series, so the rules can
tell an upstream outage (external names fail on every server, cluster names resolve) from a CoreDNS or path
problem. Decided from `--probe.cluster-domain`; bounded to two values; one name class adds no series."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from exporter.cli import parse_args
from exporter.core.feature import AppContext
from exporter.discovery.targets import Target, TargetRegistry
from exporter.dns import feature
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.resolver import ProbeResult, QueryOutcome
from exporter.dns.store import ProbeStore, zone_of

CLUSTER = "kubernetes.default.svc.cluster.local."
EXTERNAL = "www.example.com."


@pytest.mark.parametrize("name,domain,zone", [
    (CLUSTER, "cluster.local", "cluster"),
    ("KUBERNETES.default.svc.Cluster.Local", "cluster.local.", "cluster"),
    ("cluster.local.", "cluster.local", "cluster"),
    (EXTERNAL, "cluster.local", "external"),
    ("notcluster.local.", "cluster.local", "external"),   # a suffix match on labels, not on characters
    ("kubernetes.default.svc.corp.internal.", "corp.internal", "cluster"),
    (CLUSTER, "corp.internal", "external"),
])
def test_zone_of(name: str, domain: str, zone: str) -> None:
    assert zone_of(name, domain) == zone


def ok() -> ProbeResult:
    return ProbeResult("parallel", 0.002, {"A": QueryOutcome("A", True, None, attempt=0, answers=1),
                                           "AAAA": QueryOutcome("AAAA", True, None, attempt=0, answers=1)})


def servfail() -> ProbeResult:
    return ProbeResult("parallel", 0.002, {"A": QueryOutcome("A", True, "servfail", 0, 0),
                                           "AAAA": QueryOutcome("AAAA", True, "servfail", 0, 0)})


SERVICE = Target("10.96.0.10", 53, "service")


def exposition(store: ProbeStore, target: Target = SERVICE) -> CollectorRegistry:
    targets = TargetRegistry()
    targets.set("static", [target])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DnsProbeCollector(store, targets))  # type: ignore[arg-type]
    return reg


def samples(reg: CollectorRegistry, name: str) -> dict[tuple[str, str, str], float]:
    return {(s.labels["qtype"], s.labels["zone"], s.labels.get("reason", "")): s.value
            for fam in reg.collect() for s in fam.samples if s.name == name}


def test_an_upstream_outage_shows_as_failures_of_external_names_only() -> None:
    store = ProbeStore((CLUSTER, EXTERNAL))
    key = ("10.96.0.10:53", "service")
    store.ensure(key, ("parallel",))
    for _ in range(3):
        store.record(key, ok(), CLUSTER)
        store.record(key, servfail(), EXTERNAL)
    reg = exposition(store)
    assert samples(reg, "dns_probe_requests_total") == {
        ("A", "cluster", ""): 3, ("AAAA", "cluster", ""): 3, ("A", "external", ""): 3, ("AAAA", "external", ""): 3}
    assert samples(reg, "dns_probe_failures_total") == {
        ("A", "external", "servfail"): 3, ("AAAA", "external", "servfail"): 3}
    assert set(samples(reg, "dns_probe_retries_total")) == {
        ("A", "cluster", ""), ("AAAA", "cluster", ""), ("A", "external", ""), ("AAAA", "external", "")}


def test_several_names_of_one_class_share_series_and_the_default_adds_none() -> None:
    store = ProbeStore((CLUSTER, "kube-dns.kube-system.svc.cluster.local."))
    key = ("10.96.0.10:53", "service")
    store.ensure(key, ("parallel",))
    store.record(key, ok(), CLUSTER)
    store.record(key, ok(), "kube-dns.kube-system.svc.cluster.local.")
    reg = exposition(store)
    assert samples(reg, "dns_probe_requests_total") == {("A", "cluster", ""): 2, ("AAAA", "cluster", ""): 2}


def test_cluster_domain_flag_decides_the_zone() -> None:
    args = parse_args(["--collector.dns", "--probe.server=10.0.0.1", "--probe.cluster-domain=corp.internal",
                       "--probe.name=kubernetes.default.svc.corp.internal", f"--probe.name={EXTERNAL}"])
    built = feature.build(args, AppContext())
    store = built.services[0].store  # type: ignore[attr-defined]
    assert store.cluster_domain == "corp.internal"
    key = ("10.0.0.1:53", "static")
    store.ensure(key, ("parallel",))
    store.record(key, ok(), "kubernetes.default.svc.corp.internal.")
    reg = exposition(store, Target("10.0.0.1", 53, "static"))
    assert samples(reg, "dns_probe_requests_total")[("A", "cluster", "")] == 1
    assert {z for (_, z, _) in samples(reg, "dns_probe_requests_total")} == {"cluster", "external"}


def test_bad_cluster_domain_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--probe.cluster-domain=bad..domain"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cardinality_budget_with_both_zones_and_five_failing_targets() -> None:
    """Defaults (parallel, tcp) plus an external name, 5 targets, every query of both zones timing out: at most
    300 series (docs/metrics.md)."""
    store = ProbeStore((CLUSTER, EXTERNAL))
    targets = TargetRegistry()
    targets.set("static", [Target("10.0.0.1", 53 + i, "static") for i in range(5)])
    for t in targets.snapshot():
        store.ensure((t.server, t.kind), ("parallel", "tcp"))
        for mode in ("parallel", "tcp"):
            timeout = ProbeResult(mode, 10.0, {"A": QueryOutcome("A", True, "timeout", 0, 1),
                                               "AAAA": QueryOutcome("AAAA", True, "timeout", 0, 1)})
            store.record((t.server, t.kind), timeout, CLUSTER)
            store.record((t.server, t.kind), timeout, EXTERNAL)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DnsProbeCollector(store, targets))  # type: ignore[arg-type]
    total = sum(len(fam.samples) for fam in reg.collect())
    # per target: histograms, requests+retries per mode and zone, partial pairs, info, lone queries; + failures
    assert total == 5 * (15 * 2 + 4 * 2 * 2 + 2 + 1 + 2) + 5 * 8  # 295
    assert total <= 300


def test_sampled_endpoints_report_results_by_zone_and_slow_answers_apart() -> None:
    """Endpoints have no histogram (issue 17): an answer on the first transmission that took over 0.5 s is
    result `slow`, so the rules can name a slow CoreDNS pod; results carry the name's zone."""
    store = ProbeStore((CLUSTER, EXTERNAL))
    key = ("10.244.10.2:53", "endpoint")
    store.ensure(key, ("parallel",))
    slow = ok()
    slow.duration = 0.8
    store.record(key, ok(), CLUSTER)
    store.record(key, slow, CLUSTER)
    store.record(key, servfail(), EXTERNAL)
    reg = exposition(store, Target("10.244.10.2", 53, "endpoint"))
    got = {(s.labels["zone"], s.labels["result"]): s.value for fam in reg.collect() for s in fam.samples
           if s.name == "dns_probe_endpoint_queries_total"}
    assert got == {("cluster", "ok"): 2, ("cluster", "slow"): 2, ("external", "servfail"): 2}
