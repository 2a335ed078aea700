"""The `dnsflows` collector: real clients' DNS seen passively, from conntrack events.

A background listener (`exporter.dnsflows.listener`, one thread) counts DNS flows as the kernel creates
and destroys them (`exporter.dnsflows.flows`); `collect()` only copies those counters, so a scrape never
waits for the kernel. This departs from "sample at scrape time" on purpose: events are a stream, they
cannot be sampled.

Metrics:
- `conntrack_dns_flows_total{server_kind,backend}`: DNS flows (UDP or TCP to port 53) created, by the
  kind of server the client asked (original destination: `service`, `nodelocal`, `endpoint`, `static`,
  `resolvconf`, `other`) and the backend that got the flow (reply source after DNAT; `other` for servers
  that are no known target): the DNAT's spread over the CoreDNS pods;
- `conntrack_dns_unanswered_flows_total{server_kind,backend}`: flows destroyed without ever seeing a
  reply (no IPS_SEEN_REPLY): queries nobody answered;
- `conntrack_dns_unanswered_top_pods{namespace,pod}`: unanswered flows over the last
  `--collector.dnsflows.window`, for the top `--collector.dnsflows.top-pods` client pods; `pod=""` for
  clients that are no known pod (the node itself, hostNetwork pods), `pod="other"` for the rest;
- `conntrack_dns_events_total{type}`: events received (`new`, `destroy`; `other`: events that are no DNS
  flow, which only arrive with the kernel filter off);
- `conntrack_dns_events_lost_total`: receive-buffer overflows (ENOBUFS): the kernel dropped events;
- `conntrack_dns_resyncs_total`: table dumps made after lost events;
- `conntrack_dns_excluded_flows_total`: the exporter's own probe flows, left out of the counts above;
- `conntrack_dns_listener_up`: 1 while subscribed to the event groups;
- `conntrack_dns_events_enabled`: 1 if `nf_conntrack_events` is on (1 or 2), 0 if events are disabled.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.dnsflows.listener import FlowListener


class DnsFlowsCollector:
    name = "dnsflows"

    def __init__(self, listener: FlowListener) -> None:
        self._listener = listener

    def collect(self) -> Iterator[Metric]:
        snap = self._listener.stats.snapshot()
        yield GaugeMetricFamily("conntrack_dns_listener_up",
                                "1 while the exporter is subscribed to the kernel's conntrack event groups.",
                                value=1.0 if self._listener.up else 0.0)
        enabled = self._listener.events_enabled
        if enabled is not None:
            yield GaugeMetricFamily("conntrack_dns_events_enabled",
                                    "1 if nf_conntrack_events is on, 0 if the kernel sends no conntrack events.",
                                    value=1.0 if enabled else 0.0)
        for name, help_text, counts in (
                ("conntrack_dns_flows", "DNS flows (UDP/TCP to port 53) created, by server kind and the backend "
                                        "the DNAT chose.", snap.flows),
                ("conntrack_dns_unanswered_flows", "DNS flows destroyed without ever seeing a reply, by server "
                                                   "kind and backend.", snap.unanswered)):
            fam = CounterMetricFamily(name, help_text, labels=["server_kind", "backend"])
            for (kind, backend), n in sorted(counts.items()):
                fam.add_metric([kind, backend], n)
            yield fam
        top = GaugeMetricFamily("conntrack_dns_unanswered_top_pods",
                                "Unanswered DNS flows over the last window, for the client pods with the most; "
                                'pod="" for clients that are no known pod, pod="other" for the remaining pods.',
                                labels=["namespace", "pod"])
        for (ns, pod), n in snap.top_pods:
            top.add_metric([ns, pod], n)
        yield top
        fam = CounterMetricFamily("conntrack_dns_events", "Conntrack events received, by type (other: no DNS flow).",
                                  labels=["type"])
        for typ, n in sorted(snap.events.items()):
            fam.add_metric([typ], n)
        yield fam
        yield CounterMetricFamily("conntrack_dns_events_lost",
                                  "Times the event socket overflowed (ENOBUFS) and the kernel dropped events.",
                                  value=snap.lost)
        yield CounterMetricFamily("conntrack_dns_resyncs", "Table dumps made to resync after lost events.",
                                  value=snap.resyncs)
        yield CounterMetricFamily("conntrack_dns_excluded_flows",
                                  "The exporter's own DNS probe flows, left out of the DNS flow counts.",
                                  value=snap.excluded)
