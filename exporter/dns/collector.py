"""The `dns` collector: turns the probe store into metric families at scrape time.

The probes themselves run in the background (`exporter.dns.scheduler`); a scrape only copies what
they accumulated (smokeping_prober's model: a probe may take 10 s, a scrape must not). Families are
built afresh from the store and the live target set on every scrape, so a target that left the target
registry (a Kubernetes rollout replacing endpoints) has no series in the next scrape.

Emits `dns_probe_duration_seconds`, `dns_probe_requests_total`, `dns_probe_failures_total`,
`dns_probe_retries_total`, `dns_probe_partial_pairs_total`, `dns_probe_target_info`,
`dns_probe_nodelocal_present`, `dns_probe_search_queries`, `dns_probe_search_duration_seconds`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from exporter.discovery.targets import TargetRegistry
from exporter.dns.store import ProbeStore

LABELS = ["server", "kind"]


class DnsProbeCollector:
    name = "dns"

    def __init__(self, store: ProbeStore, targets: TargetRegistry) -> None:
        self._store = store
        self._targets = targets

    def collect(self) -> Iterator[Metric]:
        stats, present, search = self._store.snapshot()
        # (server, kind) -> backing pod name (Kubernetes endpoints; "" for other kinds)
        live = {(t.server, t.kind): t.pod for t in self._targets.snapshot()}

        duration = HistogramMetricFamily(
            "dns_probe_duration_seconds",
            "Time a probe lookup (A and AAAA) took until both answers or final failures were in hand.",
            labels=[*LABELS, "mode"])
        requests = CounterMetricFamily(
            "dns_probe_requests", "Probe lookups sent, per query type and name class (zone).",
            labels=[*LABELS, "mode", "qtype", "zone"])
        failures = CounterMetricFamily(
            "dns_probe_failures",
            "Probe queries that failed, by reason; reason mismatch counts ignored stray replies.",
            labels=[*LABELS, "mode", "qtype", "zone", "reason"])
        retries = CounterMetricFamily(
            "dns_probe_retries",
            "Probe queries answered only after a retransmission (the application waited a full timeout).",
            labels=[*LABELS, "mode", "qtype", "zone"])
        partial = CounterMetricFamily(
            "dns_probe_partial_pairs",
            "Parallel probes where one query of the A/AAAA pair was answered on the first attempt and the "
            "other was not (the conntrack race's fingerprint).",
            labels=[*LABELS, "lost_qtype"])
        info = GaugeMetricFamily(
            "dns_probe_target_info", "Always 1 for every DNS server currently probed; pod names a Kubernetes "
            "endpoint's pod.", labels=[*LABELS, "pod"])
        nodelocal = GaugeMetricFamily(
            "dns_probe_nodelocal_present",
            "1 if the configured NodeLocal DNSCache address answers (and is probed), 0 if not.",
            labels=["server"])

        for server, up in sorted(present.items()):
            nodelocal.add_metric([server], 1.0 if up else 0.0)
        for key in sorted(live):
            server, kind = key
            if kind == "nodelocal" and not present.get(server, False):
                continue
            info.add_metric([server, kind, live[key]], 1.0)
            st = stats.get(key)
            if st is None:
                continue
            for mode, h in sorted(st.histograms.items()):
                duration.add_metric([server, kind, mode], h.cumulative(), h.total)
            for (mode, qt, z), n in sorted(st.requests.items()):
                requests.add_metric([server, kind, mode, qt, z], n)
            for (mode, qt, z), n in sorted(st.retries.items()):
                retries.add_metric([server, kind, mode, qt, z], n)
            for (mode, qt, z, reason), n in sorted(st.failures.items()):
                failures.add_metric([server, kind, mode, qt, z, reason], n)
            for qt, n in sorted(st.partial.items()):
                partial.add_metric([server, kind, qt], n)
        yield from (duration, requests, failures, retries, partial, info, nodelocal)

        if search:
            queries = GaugeMetricFamily(
                "dns_probe_search_queries",
                "Queries the last search-path walk for this name sent (A and AAAA per candidate name).",
                labels=["name"])
            seconds = GaugeMetricFamily(
                "dns_probe_search_duration_seconds", "Time the last search-path walk for this name took.",
                labels=["name"])
            for name, s in sorted(search.items()):
                queries.add_metric([name], s.queries)
                seconds.add_metric([name], s.duration)
            yield queries
            yield seconds
