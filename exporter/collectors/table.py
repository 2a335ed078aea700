"""The `table` collector: what fills the conntrack table, who fills it, and which DNS entries are stale.

A background service (`TableScanService`, one thread) dumps the whole table every
`--collector.table.interval` through the streaming parser in `exporter.sources.ctdump` and publishes an
immutable snapshot of the aggregates; `TableCollector.collect()` only turns the last snapshot into
metric families, so a scrape never waits for a scan. This departs from "sample at scrape time" on
purpose: a full table takes about a second to dump, far too long to do per scrape.

Metrics (from the last finished scan; nothing before the first one finishes):
- `conntrack_table_entries{protocol,state}`: TCP by conntrack TCP state; UDP, ICMP, ICMPv6 and other
  protocols by `unreplied` (no reply seen) / `replied` / `assured` (from the entry's status bits);
- `conntrack_table_dns_entries{transport}`: entries whose original destination port is 53;
- `conntrack_table_stale_dns_entries`: DNS entries addressed to a current probe target (DNS Service IP,
  NodeLocal, configured servers) whose reply source (where DNAT sent them) is no current target (DNS
  endpoints included): stale NAT after a rollout. DNS to other servers (CoreDNS's upstream queries
  crossing the node, pods asking public resolvers) never counts. Only emitted while targets are known;
- `conntrack_table_top_sources{namespace,pod}`: entries by original source address, for the top N pods
  (pod map at scan start), plus `namespace="",pod=""` for sources that are no known pod (no IP label, to
  keep cardinality bounded) and `namespace="",pod="other"` for the pods outside the top N;
- `conntrack_table_scan_duration_seconds`, `conntrack_table_scan_entries`,
  `conntrack_table_last_scan_timestamp_seconds`, `conntrack_table_scan_partial` (1 when the scan was cut
  short: time cap, interrupted twice, garbled message, error; its counts are then incomplete).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exporter import logs
from exporter.collectors.base import CollectorError
from exporter.probes.targets import TargetRegistry
from exporter.sources.ctdump import Scanner, ScanResult, ip_key
from exporter.sources.podindex import PodIndex

# Always exported (0 when absent), so dashboards and alerts see stable series.
BASE_STATES = (
    *(("tcp", s) for s in ("syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack",
                           "time_wait", "close")),
    *(("udp", s) for s in ("unreplied", "replied", "assured")),
)
OTHER_ROW = ("", "other")
UNKNOWN_ROW = ("", "")
# Failures that leave no data at all: the collector then reports failure (collector_success 0).
HARD_FAILURES = ("permission", "unavailable", "error")
FIRST_SCAN_GRACE = 2.0  # seconds the first scan waits for DNS targets to appear
RESCAN_MIN_GAP = 2.0  # seconds between a scan and a rescan caused by changed DNS targets


@dataclass(frozen=True)
class TableSnapshot:
    """The published outcome of one scan, ready to render."""

    states: tuple[tuple[tuple[str, str], int], ...]
    dns: tuple[tuple[str, int], ...]
    stale_dns: int | None
    top_sources: tuple[tuple[tuple[str, str], int], ...]
    duration: float
    entries: int
    timestamp: float
    partial: bool
    reason: str
    message: str


def summarize(result: ScanResult, pods: dict[bytes, tuple[str, str]], top_n: int) -> TableSnapshot:
    agg = result.agg
    states = dict.fromkeys(BASE_STATES, 0)
    for k, v in agg.named_states().items():
        states[k] = states.get(k, 0) + v
    by_pod: dict[tuple[str, str], int] = {}
    known = 0
    for key, n in agg.sources.items():
        if n:
            pod = pods[key]
            by_pod[pod] = by_pod.get(pod, 0) + n
            known += n
    ranked = sorted(by_pod.items(), key=lambda kv: (-kv[1], kv[0]))
    top = ranked[:top_n]
    other = sum(n for _, n in ranked[top_n:])
    rows = (*top, (UNKNOWN_ROW, agg.entries - known), (OTHER_ROW, other))
    return TableSnapshot(
        states=tuple(sorted(states.items())),
        dns=tuple(sorted(agg.dns_by_transport().items())),
        stale_dns=agg.stale_dns if result.stale_checked else None,
        top_sources=rows,
        duration=result.duration,
        entries=agg.entries,
        timestamp=result.started + result.duration,
        partial=result.partial,
        reason=result.reason,
        message=result.message,
    )


class TableScanService:
    """Scans the table every `interval` seconds on its own thread and publishes a `TableSnapshot`.

    A change of the DNS targets (a CoreDNS rollout seen by the Kubernetes watch) triggers a rescan after
    RESCAN_MIN_GAP instead of waiting for the interval: that is when stale DNS entries matter.
    """

    name = "table-scan"

    def __init__(self, scanner: Scanner, *, interval: float = 60.0, top_n: int = 10,
                 targets: TargetRegistry | None = None, pods: PodIndex | None = None,
                 on_scan: Callable[[TableSnapshot], None] | None = None) -> None:
        self.scanner = scanner
        self.interval = interval
        self.top_n = top_n
        self._targets = targets
        self._pods = pods
        self._on_scan = on_scan
        self._latest: TableSnapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = ""
        self._log = logs.get("table")

    def latest(self) -> TableSnapshot | None:
        # One reference read: a snapshot is immutable and replaced whole, so no lock is needed.
        return self._latest

    def start(self) -> None:
        self._stop.clear()
        self.scanner.resume()
        self._thread = threading.Thread(target=self._loop, name="table-scan", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.scanner.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        targets = self._targets
        if targets is not None and not targets.addresses():
            # At start-up the DNS targets (Kubernetes discovery, flags) usually arrive within a second:
            # a first scan without them could not judge stale DNS entries for a whole interval.
            self._wait_for_targets(targets.version, time.monotonic() + FIRST_SCAN_GRACE)
        while not self._stop.is_set():
            version = targets.version if targets is not None else 0
            self.scan_once()
            end = time.monotonic() + self.interval
            if targets is None:
                self._stop.wait(self.interval)
            elif self._wait_for_targets(version, end):
                # The DNS endpoints changed (a rollout): rescan soon, so stale entries show now rather
                # than an interval later; the gap bounds the cost of a burst of changes.
                self._stop.wait(RESCAN_MIN_GAP)

    def _wait_for_targets(self, version: int, until: float) -> bool:
        """Wait until `until`, a stop, or a change of the targets (then True)."""
        assert self._targets is not None
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return False
            if self._targets.wait_for_change(version, min(left, 0.25)) != version:
                return True
        return False

    def scan_once(self) -> TableSnapshot | None:
        """One scan, published; never raises (a failure becomes a partial snapshot and a log line)."""
        try:
            pods: dict[bytes, tuple[str, str]] = {}
            if self._pods is not None:
                for ip, pod in self._pods.snapshot().items():
                    key = ip_key(ip)
                    if key is not None:
                        pods[key] = pod
            servers: list[bytes] | None = None
            if self._targets is not None:
                keys = [k for k in map(ip_key, self._targets.addresses()) if k is not None]
                servers = keys or None
            result = self.scanner.scan(pods, servers)
            if result.reason == "stopped":
                return None
            snap = summarize(result, pods, self.top_n)
        except Exception as e:  # the service boundary: never let the thread die
            self._log.error("table scan failed: %s: %s", type(e).__name__, e, exc_info=True)
            snap = TableSnapshot(states=(), dns=(), stale_dns=None, top_sources=(), duration=0.0, entries=0,
                                 timestamp=time.time(), partial=True, reason="internal",
                                 message=f"table scan failed: {type(e).__name__}: {e}")
        self._latest = snap
        self._report(snap)
        if self._on_scan is not None:
            self._on_scan(snap)
        return snap

    def _report(self, snap: TableSnapshot) -> None:
        kv = {"entries": snap.entries, "duration_seconds": round(snap.duration, 3)}
        if snap.partial:
            level = logging.WARNING if snap.reason != self._failing else logging.DEBUG
            self._failing = snap.reason
            self._log.log(level, "partial table scan: %s", snap.message, extra={"kv": {**kv, "reason": snap.reason}})
            return
        if self._failing:
            self._log.info("table scans complete again", extra={"kv": kv})
            self._failing = ""
        else:
            self._log.debug("table scan", extra={"kv": kv})


class TableCollector:
    name = "table"

    def __init__(self, service: TableScanService) -> None:
        self._service = service

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
