"""The table scan's background service: dumps the whole conntrack table every
`--collector.table.interval` on its own thread (`exporter.table.scan`) and publishes an immutable
`TableSnapshot` of the aggregates, which `exporter.table.collector` renders at scrape time.

A change of the DNS targets (a CoreDNS rollout seen by the Kubernetes watch) triggers a rescan soon
after instead of waiting for the interval: that is when stale DNS entries matter. The first scan waits
for discovery's "synced" event (bounded), so it can judge stale entries from the start.

CPU budget (`--collector.table.cpu-budget`, a fraction of one core, issue 16): a scan's CPU time grows
with the table, so the time from the end of one scan to the start of the next is

    interval = max(--collector.table.interval, cpu of the last scan / budget)

and the scans' average share of a core stays at or under the budget on tables of any size (docs/metrics.md
works out 262,144, 1M and 4M entries).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from exporter.core import logs
from exporter.discovery import Discovery
from exporter.table.parse import ip_key
from exporter.table.scan import Scanner, ScanResult

# Always exported (0 when absent), so dashboards and alerts see stable series.
BASE_STATES = (
    *(("tcp", s) for s in ("syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack",
                           "time_wait", "close")),
    *(("udp", s) for s in ("unreplied", "replied", "assured")),
)
OTHER_ROW = ("", "other")
UNKNOWN_ROW = ("", "")
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
    cpu: float = 0.0  # CPU seconds of the scan (both threads, the kernel's dump work included)


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
        cpu=result.cpu,
    )


def budgeted_interval(interval: float, cpu: float, budget: float) -> float:
    """max(interval, cpu / budget): the wait after a scan that cost `cpu` seconds (budget 0: `interval`)."""
    return max(interval, cpu / budget) if budget > 0 else interval


class TableScanService:
    """Scans the table every `interval` seconds on its own thread and publishes a `TableSnapshot`.

    A change of the DNS targets (a CoreDNS rollout seen by the Kubernetes watch) triggers a rescan after
    RESCAN_MIN_GAP instead of waiting for the interval: that is when stale DNS entries matter.
    """

    name = "table-scan"

    def __init__(self, scanner: Scanner, *, interval: float = 60.0, top_n: int = 10,
                 discovery: Discovery | None = None,
                 on_scan: Callable[[TableSnapshot], None] | None = None, cpu_budget: float = 0.0) -> None:
        self.scanner = scanner
        self.interval = interval
        self.cpu_budget = cpu_budget  # fraction of one core; 0: a fixed interval
        self.next_interval = interval  # what the loop waits after the last scan
        self.top_n = top_n
        self._discovery = discovery
        self._targets = discovery.targets if discovery is not None else None
        self._pods = discovery.pods if discovery is not None else None
        self._on_scan = on_scan
        self._latest: TableSnapshot | None = None
        self.published = 0  # snapshots published so far (bumped after `_latest` is replaced)
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
        if self._targets is not None:
            self._targets.wake()
        self.scanner.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        targets = self._targets
        if self._discovery is not None:
            # A first scan before discovery answered could not judge stale DNS entries for a whole interval.
            self._discovery.wait_synced(stop=self._stop)
        while not self._stop.is_set():
            version = targets.version if targets is not None else 0
            self.scan_once()
            end = time.monotonic() + self.next_interval
            if targets is None:
                self._stop.wait(self.next_interval)
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
            if self._targets.wait_for_change(version, left, self._stop) != version:
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
        if not snap.partial or snap.entries:
            self.next_interval = budgeted_interval(self.interval, snap.cpu, self.cpu_budget)
        self._latest = snap  # before `published` moves: a rendering by the new count sees this snapshot
        self.published += 1
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
