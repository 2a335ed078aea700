"""Health of the Kubernetes discovery (the watches are kept by `exporter.kubernetes.watcher.KubeWatcher`).

Emits:
- `conntrack_dns_exporter_kubernetes_up` (gauge): 1 when the DNS Service was read and every watch is
  listed and streaming; 0 while any request fails (the last known targets are still probed);
- `conntrack_dns_exporter_kubernetes_watch_restarts_total{resource}` (counter): restarts after a failure,
  a dropped stream or 410 Gone (not the routine renewal when the server ends a watch);
- `conntrack_dns_exporter_kubernetes_last_event_timestamp_seconds{resource}` (gauge): last list, event or
  bookmark received;
- `conntrack_dns_exporter_kubernetes_objects{resource}` (gauge): objects currently known.
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
