"""Health of the Kubernetes discovery (the watches are kept by `exporter.kubernetes.watcher.KubeWatcher`).

Emits:
- `conntrack_dns_exporter_kubernetes_up` (gauge): 1 when the DNS Service was read and every watch is
  listed and streaming; 0 while any request fails (the last known targets are still probed);
- `conntrack_dns_exporter_kubernetes_watch_restarts_total{resource}` (counter): restarts after a failure,
  a dropped stream or 410 Gone (not the routine renewal when the server ends a watch);
- `conntrack_dns_exporter_kubernetes_last_event_timestamp_seconds{resource}` (gauge): last list, event or
  bookmark received;
- `conntrack_dns_exporter_kubernetes_objects{resource}` (gauge): objects currently known.
- `conntrack_dns_exporter_kubernetes_blocked_by_conntrack` (gauge): 1 while requests to the API cannot
  connect and this namespace's conntrack table is full (discovery is degraded: the last known targets,
  or none, are probed);
- `conntrack_dns_exporter_kubernetes_api_notrack` (gauge): 1 when `--web.notrack` exempts the API
  connections from conntrack (`--kubernetes.api-server-address` given).
`resource` is one of `services`, `endpointslices`, `pods`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.core.scrape import PREFIX
from exporter.kubernetes.state import KubeState


class KubernetesCollector:
    name = "kubernetes"

    def __init__(self, state: KubeState) -> None:
        self._state = state

    def version(self) -> int:
        """Changes with every list, event, bookmark or failure: rendered once per change."""
        return self._state.version

    def collect(self) -> Iterator[Metric]:
        snap = self._state.snapshot()
        yield GaugeMetricFamily(f"{PREFIX}_kubernetes_up",
                                "1 if the Kubernetes API answers every list, watch and get the exporter needs.",
                                value=1.0 if all(s.synced for s in snap.values()) else 0.0)
        restarts = CounterMetricFamily(f"{PREFIX}_kubernetes_watch_restarts",
                                       "Kubernetes requests restarted after an error, a dropped stream or 410 Gone.",
                                       labels=["resource"])
        last = GaugeMetricFamily(f"{PREFIX}_kubernetes_last_event_timestamp_seconds",
                                 "Unix time of the last list, watch event or bookmark received.",
                                 labels=["resource"])
        objects = GaugeMetricFamily(f"{PREFIX}_kubernetes_objects",
                                    "Kubernetes objects currently known (DNS Service, its EndpointSlices, pods on "
                                    "this node).", labels=["resource"])
        for res, st in sorted(snap.items()):
            restarts.add_metric([res], st.restarts)
            objects.add_metric([res], st.objects)
            if st.last_event is not None:
                last.add_metric([res], st.last_event)
        yield restarts
        yield last
        yield objects
        yield GaugeMetricFamily(f"{PREFIX}_kubernetes_blocked_by_conntrack",
                                "1 while Kubernetes API requests cannot connect because the conntrack table is "
                                "full (discovery degraded).", value=1.0 if self._state.blocked() else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_kubernetes_api_notrack",
                                "1 if the exporter's Kubernetes API connections are exempt from conntrack "
                                "(--web.notrack with --kubernetes.api-server-address).",
                                value=1.0 if self._state.exempt else 0.0)
