"""The diagnosis, continuously, from the running exporter's own state (for the `/` status page).

Every `interval` it takes a snapshot of what the data paths already measure (the conntrack statistics,
the probe store's counters, the last table scan, NodeLocal presence, the discovered targets), keeps the
snapshots of the last `window` seconds, and judges the difference between the oldest and the newest
with the same `verdict.decide` as the `diagnose` command. No extra probes, no extra scans.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.core import logs
from exporter.core.feature import AppContext
from exporter.diagnose.evidence import CLUSTER, ConntrackEvidence, Evidence, Tally, TargetEvidence, table_from_snapshot
from exporter.diagnose.verdict import RUNBOOK_BASE_URL, Verdict, decide
from exporter.dns.store import BUCKETS, ProbeStore, TargetStats
from exporter.table.service import TableScanService

log = logs.get("diagnose")
RATES = ("drop", "insert_failed", "clash_resolve", "early_drop")
_SLOW_BUCKET = bisect.bisect_left(BUCKETS, 0.5) + 1  # counts above the 0.5 s bound are "slow"


@dataclass
class Snapshot:
    at: float
    conntrack: tuple[dict[str, int], int | None, int | None] | None
    probes: dict[tuple[str, str], TargetStats]
    present: dict[str, bool]


def _tallies(new: TargetStats, old: TargetStats | None) -> dict[tuple[str, str], Tally]:
    """Per (mode, zone): the store counts cluster and external names apart (`zone`); the duration histogram
    has no zone, so slowness is told on the cluster names' tally."""
    out: dict[tuple[str, str], Tally] = {}
    for (mode, qt, zone), n in new.requests.items():
        if qt != "A":
            continue
        lookups = n - (old.requests.get((mode, qt, zone), 0) if old else 0)
        if lookups <= 0:
            continue
        failed_by_qt: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for (m, q, z, reason), f in new.failures.items():
            if m != mode or z != zone or reason == "mismatch":
                continue
            d = f - (old.failures.get((m, q, z, reason), 0) if old else 0)
            if d > 0:
                failed_by_qt[q] = failed_by_qt.get(q, 0) + d
                reasons[reason] = reasons.get(reason, 0) + d
        h = new.histograms.get(mode)
        slow = 0
        if h is not None and zone == CLUSTER:
            before = old.histograms.get(mode) if old else None
            slow = sum(h.counts[_SLOW_BUCKET:]) - (sum(before.counts[_SLOW_BUCKET:]) if before else 0)
        failed = min(lookups, max(failed_by_qt.values(), default=0))
        out[(mode, zone)] = Tally(lookups=lookups, failed=failed, slow=max(0, slow - failed), reasons=reasons)
    return out


class LiveDiagnosis:
    """A `Service`: the verdict of the last `window` seconds, refreshed every `interval`."""

    name = "diagnose-live"

    def __init__(self, ctx: AppContext, *, nodelocal: str | None = None, interval: float = 10.0,
                 window: float = 60.0, runbook_base_url: str = RUNBOOK_BASE_URL) -> None:
        self._ctx = ctx
        self._sample: Callable[[], Any] | None = ctx.shared.get("conntrack.sample")  # type: ignore[assignment]
        store = ctx.shared.get("dns.store")
        self._store = store if isinstance(store, ProbeStore) else None
        table = ctx.shared.get("table.service")
        self._table = table if isinstance(table, TableScanService) else None
        self.nodelocal = nodelocal
        self.interval, self.window, self.runbook_base_url = interval, window, runbook_base_url
        self._ring: collections.deque[Snapshot] = collections.deque()
        self._latest: tuple[Verdict, Evidence] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conntrack_error = ""

    def latest(self) -> tuple[Verdict, Evidence] | None:
        return self._latest

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="diagnose-live", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the page is best effort: never let the thread die
                log.exception("live diagnosis failed")
            self._stop.wait(self.interval)

    def snapshot(self) -> Snapshot:
        conntrack = None
        if self._sample is not None:
            try:
                s = self._sample()
                conntrack = (s.totals(), s.entries, s.limit)
                self._conntrack_error = ""
            except Exception as e:
                self._conntrack_error = str(e)
        probes: dict[tuple[str, str], TargetStats] = {}
        present: dict[str, bool] = {}
        if self._store is not None:
            probes, present, _ = self._store.snapshot()
        return Snapshot(time.monotonic(), conntrack, probes, present)

    def tick(self) -> tuple[Verdict, Evidence]:
        snap = self.snapshot()
        self._ring.append(snap)
        while len(self._ring) > 2 and snap.at - self._ring[1].at >= self.window:
            self._ring.popleft()
        ev = self.evidence(self._ring[0], snap)
        result = (decide(ev, self.runbook_base_url), ev)
        self._latest = result
        return result

    def evidence(self, old: Snapshot, new: Snapshot) -> Evidence:
        ev = Evidence()
        if new.conntrack is not None:
            totals, entries, limit = new.conntrack
            dt = new.at - old.at
            rates = dict.fromkeys(RATES, 0.0)
            if old.conntrack is not None and dt > 0:
                rates = {k: max(0, totals.get(k, 0) - old.conntrack[0].get(k, 0)) / dt for k in RATES}
            ev.conntrack = ConntrackEvidence(entries or 0, limit, rates, dt)
        elif self._conntrack_error:
            ev.unchecked.append(f"conntrack: {self._conntrack_error}")
        pods = {(t.server, t.kind): t.pod for t in self._ctx.targets.snapshot()}
        for key, st in sorted(new.probes.items()):
            if key not in pods:
                continue
            tallies = _tallies(st, old.probes.get(key) if old is not new else None)
            if tallies:
                ev.targets.append(TargetEvidence(key[0], key[1], pods[key], tallies))
        if self.nodelocal:
            ev.nodelocal = self.nodelocal
            # Down only when no round in the window had an answer: one round is one short question, and under
            # packet loss it fails now and then while NodeLocal is there (the verdict is of the whole window).
            answers = new.present.get(self.nodelocal)
            if answers is False and any(s.present.get(self.nodelocal) for s in self._ring if s.at >= old.at):
                answers = True
            ev.nodelocal_answers = answers
        kube = self._ctx.targets.origin("kubernetes")
        if kube:
            ev.kube_endpoints = sum(1 for t in kube if t.kind == "endpoint")
            ev.kube_service_ips = [t.host for t in kube if t.kind == "service"]
        ev.table = table_from_snapshot(self._table.latest() if self._table is not None else None)
        return ev
