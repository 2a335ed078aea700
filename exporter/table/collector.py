"""The `table` collector: what fills the conntrack table, who fills it, and which DNS entries are stale.

A background service (`exporter.table.service.TableScanService`, one thread) dumps the whole table every
`--collector.table.interval` and publishes an immutable snapshot of the aggregates;
`TableCollector.collect()` only turns the last snapshot into metric families, so a scrape never
waits for a scan. This departs from "sample at scrape time" on purpose: a full table takes about a
second to dump, far too long to do per scrape.

Metrics (from the last finished scan; nothing before the first one finishes):
- `conntrack_table_entries{protocol,state}`: TCP by conntrack TCP state; UDP, ICMP, ICMPv6 and other
  protocols by `unreplied` (no reply seen) / `replied` / `assured` (from the entry's status bits);
- `conntrack_table_dns_entries{transport}`: entries whose original destination port is 53;
- `conntrack_table_stale_dns_entries`: UDP DNS entries addressed to a current probe target (DNS Service IP,
  NodeLocal, configured servers) whose reply source (where DNAT sent them) is no current target (DNS
  endpoints included): stale NAT after a rollout. DNS to other servers (CoreDNS's upstream queries
  crossing the node, pods asking public resolvers) never counts. Only emitted while targets are known;
- `conntrack_table_top_sources{namespace,pod}`: entries by original source address, for the top N pods
  (pod map at scan start), plus `namespace="",pod=""` for sources that are no known pod (no IP label, to
  keep cardinality bounded) and `namespace="",pod="other"` for the pods outside the top N;
- with a CPU budget (`--collector.table.cpu-budget`, on by default): `conntrack_table_scan_cpu_seconds`
  (CPU of the last scan) and `conntrack_table_scan_interval_seconds` (the wait before the next scan);
- `conntrack_table_scan_duration_seconds`, `conntrack_table_scan_entries`,
  `conntrack_table_last_scan_timestamp_seconds`, `conntrack_table_scan_partial` (1 when the scan was cut
  short: time cap, interrupted twice, garbled message, error; its counts are then incomplete).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exporter.core.errors import CollectorError
from exporter.table.service import TableScanService

# Failures that leave no data at all: the collector then reports failure (collector_success 0).
HARD_FAILURES = ("permission", "unavailable", "error")


class TableCollector:
    name = "table"

    def __init__(self, service: TableScanService) -> None:
        self._service = service

    def version(self) -> int:
        """The scan count: `collect()` only renders the last scan's snapshot (rendered once per scan)."""
        return self._service.published

    def collect(self) -> Iterator[Metric]:
        snap = self._service.latest()
        if snap is None:
            return
        yield GaugeMetricFamily("conntrack_table_scan_duration_seconds",
                                "Wall time of the last conntrack table scan, in seconds.", value=snap.duration)
        yield GaugeMetricFamily("conntrack_table_scan_entries", "Entries the last conntrack table scan read.",
                                value=snap.entries)
        yield GaugeMetricFamily("conntrack_table_last_scan_timestamp_seconds",
                                "Unix time at which the last conntrack table scan finished.", value=snap.timestamp)
        yield GaugeMetricFamily("conntrack_table_scan_partial",
                                "1 if the last conntrack table scan was cut short and its counts are incomplete.",
                                value=1.0 if snap.partial else 0.0)
        if self._service.cpu_budget > 0:
            yield GaugeMetricFamily("conntrack_table_scan_cpu_seconds",
                                    "CPU time the last conntrack table scan took (the kernel's dump work included).",
                                    value=snap.cpu)
            yield GaugeMetricFamily("conntrack_table_scan_interval_seconds",
                                    "Time from the end of the last table scan to the start of the next: "
                                    "max(--collector.table.interval, scan CPU / --collector.table.cpu-budget).",
                                    value=self._service.next_interval)
        if snap.partial and snap.reason in HARD_FAILURES and snap.entries == 0:
            raise CollectorError(snap.message, snap.reason)
        if snap.reason == "internal":
            raise CollectorError(snap.message, "internal")
        fam = GaugeMetricFamily("conntrack_table_entries",
                                "Conntrack entries by protocol and state (TCP state; otherwise unreplied, "
                                "replied or assured), from the last table scan.", labels=["protocol", "state"])
        for (proto, state), n in snap.states:
            fam.add_metric([proto, state], n)
        yield fam
        fam = GaugeMetricFamily("conntrack_table_dns_entries",
                                "Conntrack entries to destination port 53, by transport, from the last table scan.",
                                labels=["transport"])
        for transport, n in snap.dns:
            fam.add_metric([transport], n)
        yield fam
        if snap.stale_dns is not None:
            yield GaugeMetricFamily("conntrack_table_stale_dns_entries",
                                    "DNS conntrack entries addressed to a current DNS server but answered from an "
                                    "address that is none of them (stale NAT, e.g. after a CoreDNS rollout).",
                                    value=snap.stale_dns)
        fam = GaugeMetricFamily("conntrack_table_top_sources",
                                "Conntrack entries by original source, for the pods with the most entries; "
                                'pod="" for sources that are no known pod, pod="other" for the remaining pods.',
                                labels=["namespace", "pod"])
        for (ns, pod), n in snap.top_sources:
            fam.add_metric([ns, pod], n)
        yield fam
