"""The `dns` collector: turns the probe store into metric families at scrape time.

The probes themselves run in the background (`exporter.dns.scheduler`); a scrape only copies what
they accumulated (smokeping_prober's model: a probe may take 10 s, a scrape must not). Families are
built afresh from the store and the live target set on every scrape, so a target that left the target
registry (a Kubernetes rollout replacing endpoints) has no series in the next scrape.

Emits `dns_probe_duration_seconds`, `dns_probe_requests_total`, `dns_probe_failures_total`,
`dns_probe_retries_total`, `dns_probe_partial_pairs_total`, `dns_probe_target_info`,
`dns_probe_nodelocal_present`, `dns_probe_search_queries`, `dns_probe_search_duration_seconds`;
from the resolver models (`exporter.dns.models`): `dns_probe_lookups_total`,
`dns_probe_lookup_duration_seconds`; for the race fingerprint: `dns_probe_lone_queries_total`. The
sampled CoreDNS endpoints get only `dns_probe_endpoint_queries_total` (one series per result) and
`dns_probe_target_info` (issue 17); `dns_probe_skipped_total` counts rounds a target could not run on time;
`dns_probe_resolv_conf_usable` says whether the resolv.conf fallback can be used.
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
from exporter.dns.store import COMPACT_KINDS, ProbeStore

LABELS = ["server", "kind"]


class DnsProbeCollector:
    name = "dns"

    def __init__(self, store: ProbeStore, targets: TargetRegistry) -> None:
        self._store = store
        self._targets = targets

    def version(self) -> tuple[int, int]:
        """Changes whenever `collect()` could yield something else: the exposition renders once per change."""
        return self._store.version(), self._targets.version

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
        lookups = CounterMetricFamily(
            "dns_probe_lookups",
            "Application lookups (getaddrinfo A+AAAA) by resolver model and what the application got: ok, "
            "partial (one address family only) or failed.",
            labels=[*LABELS, "resolver", "result"])
        waits = HistogramMetricFamily(
            "dns_probe_lookup_duration_seconds",
            "What the application waited for a lookup by this resolver model, failed lookups included.",
            labels=[*LABELS, "resolver"])
        lone = CounterMetricFamily(
            "dns_probe_lone_queries",
            "UDP probe queries sent with no other query in flight on their socket (sequential mode, the "
            "re-send of a pair's lost half), answered or lost: the path's plain loss rate.",
            labels=[*LABELS, "result"])
        nodelocal = GaugeMetricFamily(
            "dns_probe_nodelocal_present",
            "1 if the configured NodeLocal DNSCache address answers (and is probed), 0 if not.",
            labels=["server"])

        endpoint = CounterMetricFamily(
            "dns_probe_endpoint_queries",
            "Probe queries to a sampled DNS endpoint, by result: ok, retried (answered after a retransmission) "
            "or the failure reason; slow: answered on the first transmission after more than 0.5 s.",
            labels=[*LABELS, "zone", "result"])
        skipped = CounterMetricFamily(
            "dns_probe_skipped",
            "Probe rounds a target could not run on time; reason busy: its previous probe was still running.",
            labels=[*LABELS, "reason"])

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
            for reason, n in sorted(st.skipped.items()):
                skipped.add_metric([server, kind, reason], n)
            if kind in COMPACT_KINDS:  # sampled CoreDNS endpoints: results only (docs/scale.md)
                for (z, result), n in sorted(st.results.items()):
                    endpoint.add_metric([server, kind, z, result], n)
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
            if st.partial:
                for outcome, n in sorted(st.lone.items()):
                    lone.add_metric([server, kind, outcome], n)
            for (res, outcome), n in sorted(st.lookups.items()):
                lookups.add_metric([server, kind, res, outcome], n)
            for res, h in sorted(st.waits.items()):
                waits.add_metric([server, kind, res], h.cumulative(), h.total)
        yield from (duration, requests, failures, retries, partial, lone, lookups, waits, info, nodelocal, endpoint,
                    skipped)

        usable = self._store.resolv_conf_usable()
        if usable is not None:
            resolv = GaugeMetricFamily(
                "dns_probe_resolv_conf_usable",
                "1 if --probe.resolv-conf (the targets' fallback: no other origin is configured) was read and "
                "names a nameserver, 0 if it cannot be read or names none (then nothing is probed).")
            resolv.add_metric([], 1.0 if usable else 0.0)
            yield resolv

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
