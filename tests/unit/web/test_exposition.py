"""/metrics rendered once per change (issue 16): the bytes a scrape gets are exactly what prometheus_client's
encoders give for the whole registry, in both formats, before and after the background data changes; a
collector whose data did not change is not collected again. Real collectors over recorded fixtures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exporter.conntrack.collector import ConntrackCollector
from exporter.conntrack.fixtures import FixtureStatsSource, load
from exporter.conntrack.sysctl import StaticSysctlSource
from exporter.core.scrape import ScrapeWrapper
from exporter.discovery.targets import Target, TargetRegistry
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.resolver import ProbeResult, QueryOutcome
from exporter.dns.store import ProbeStore
from exporter.kubernetes.collector import KubernetesCollector
from exporter.kubernetes.state import KubeState
from exporter.web.server import Exposition
from tests.support.golden import GOLDEN

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ACCEPT = {"text": "", "openmetrics": "application/openmetrics-text;version=1.0.0"}
DURATION = re.compile(rb'^(conntrack_dns_exporter_collector_duration_seconds\{[^}]*\}) .*$', re.M)


class Counting:
    """A versioned collector that counts its collections."""

    name = "counting"

    def __init__(self) -> None:
        self.v, self.calls = 0, 0

    def version(self) -> int:
        return self.v

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        yield GaugeMetricFamily("test_version", "The version rendered.", value=self.v)


def setup() -> tuple[CollectorRegistry, ProbeStore, TargetRegistry, KubeState, Counting]:
    src = FixtureStatsSource(load(FIXTURES / "conntrack-incident.json"))
    store, targets, state, counting = ProbeStore(), TargetRegistry(), KubeState(("services",)), Counting()
    targets.set("static", [Target("10.96.0.10", 53, "service")])
    store.ensure(("10.96.0.10:53", "service"), ("parallel",))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScrapeWrapper([ConntrackCollector(src, StaticSysctlSource(src.sysctl)),  # type: ignore[arg-type]
                                KubernetesCollector(state), DnsProbeCollector(store, targets), counting]))
    ProcessCollector(registry=reg)
    return reg, store, targets, state, counting


def rendered(reg: CollectorRegistry, expo: Exposition, fmt: str) -> tuple[bytes, bytes]:
    """(the exposition's bytes, the encoder's bytes for the whole registry), durations masked."""
    encoder, content_type = choose_encoder(ACCEPT[fmt])
    ours = expo.render(content_type, encoder)
    ref = encoder(reg)
    mask = rb"\1 0.0"
    # process_cpu_seconds_total and the collector durations move between the two renderings
    ours, ref = (DURATION.sub(mask, b) for b in (ours, ref))
    cpu = re.compile(rb"^process_cpu_seconds_total .*$", re.M)
    return cpu.sub(b"cpu", ours), cpu.sub(b"cpu", ref)


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_served_bytes_equal_the_encoders_before_and_after_changes(fmt: str) -> None:
    reg, store, targets, state, _ = setup()
    expo = Exposition(reg)
    for _ in range(2):
        ours, ref = rendered(reg, expo, fmt)
        assert ours == ref
    assert b'dns_probe_target_info{kind="service",pod="",server="10.96.0.10:53"} 1.0' in ours
    # Background data changes: a probe result, a new target, a Kubernetes event. The next scrape shows them.
    r = ProbeResult("parallel", duration=0.012, outcomes={"A": QueryOutcome("A", done=True, answers=1),
                                                          "AAAA": QueryOutcome("AAAA", done=True, answers=1)})
    store.record(("10.96.0.10:53", "service"), r)
    targets.set("kubernetes", [Target("10.244.0.5", 53, "endpoint", "coredns-a")])
    state.ok("services", 1)
    ours, ref = rendered(reg, expo, fmt)
    assert ours == ref
    assert b'server="10.96.0.10:53"} 0.012' in ours and b'pod="coredns-a"' in ours
    assert b'conntrack_dns_exporter_kubernetes_up 1.0' in ours


def test_unchanged_collector_is_not_collected_again() -> None:
    reg, _, _, _, counting = setup()
    expo = Exposition(reg)
    encoder, content_type = choose_encoder("")
    for _ in range(3):
        body = expo.render(content_type, encoder)
    assert counting.calls == 1 and b"test_version 0.0" in body
    counting.v = 1
    body = expo.render(content_type, encoder)
    assert counting.calls == 2 and b"test_version 1.0" in body
    body = expo.render(ACCEPT["openmetrics"], choose_encoder(ACCEPT["openmetrics"])[0])
    assert counting.calls == 3 and body.endswith(b"# EOF\n")  # one rendering per version and format


def test_golden_conntrack_exposition_is_byte_identical() -> None:
    src = FixtureStatsSource(load(FIXTURES / "conntrack-incident.json"))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ConntrackCollector(src, StaticSysctlSource(src.sysctl)))  # type: ignore[arg-type]
    encoder, content_type = choose_encoder("")
    assert Exposition(reg).render(content_type, encoder) == (GOLDEN / "conntrack-incident.prom").read_bytes()


def test_a_part_is_rendered_again_when_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dependency missing from version() would show late, not never: parts expire after RENDER_MAX_AGE."""
    import exporter.core.scrape as scrape

    reg, _, _, _, counting = setup()
    expo = Exposition(reg)
    encoder, content_type = choose_encoder("")
    expo.render(content_type, encoder)
    monkeypatch.setattr(scrape, "RENDER_MAX_AGE", 0.0)
    expo.render(content_type, encoder)
    assert counting.calls == 2
