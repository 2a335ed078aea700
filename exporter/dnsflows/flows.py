"""Accounting of DNS flows from conntrack events: who asked (client), whom (server kind), who got it
(backend), and whether it was ever answered.

- NEW: one flow created, counted by (server kind, backend). The server kind comes from the original
  destination looked up in the shared `TargetRegistry` (`service`, `nodelocal`, `endpoint`, `static`,
  `resolvconf`; `other` for anything else), the backend from the reply tuple's source: where the DNAT
  sent the flow (a CoreDNS pod IP behind the Service IP). Backends of `other` servers are collapsed into
  `backend="other"` (pods may ask any resolver on the internet: that would be unbounded), and each kind
  keeps at most MAX_BACKENDS distinct backend labels (more are counted as `other`).
- DESTROY without IPS_SEEN_REPLY: a query that was never answered, counted the same way, and charged to
  the client pod (original source, from the shared `PodIndex`) in a sliding window for the top-pods gauge.
- The exporter's own probes: a flow whose source is no pod and whose (protocol, source port) the probes
  registered (`exporter.discovery.ownports`) is not counted; its conntrack id is remembered until its
  DESTROY event so that one is skipped too. Skipped flows are counted in `excluded`.

Everything is updated by the listener thread; `snapshot()` hands the scrape a consistent copy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from exporter.discovery import Discovery
from exporter.dnsflows.parse import IPS_SEEN_REPLY, Event, Flow

KIND_ORDER = ("nodelocal", "service", "endpoint", "static", "resolvconf")  # an address with several kinds
OTHER = "other"
MAX_BACKENDS = 64
OWN_IDS_MAX = 8192
OWN_ID_TTL = 600.0  # seconds: longer than any DNS flow lives in conntrack (TCP TIME_WAIT 120 s)
REFRESH = 1.0  # seconds between re-reads of the pod map and target registry
NO_POD = ("", "")
OTHER_PODS = ("", "other")
OTHER_LABEL = (OTHER, OTHER)  # the flows to a server that is no target


@dataclass(frozen=True)
class FlowSnapshot:
    flows: dict[tuple[str, str], int]
    unanswered: dict[tuple[str, str], int]
    top_pods: list[tuple[tuple[str, str], int]]
    events: dict[str, int]
    lost: int
    resyncs: int
    excluded: int


def _addr(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed)


class FlowStats:
    def __init__(self, discovery: Discovery, top_n: int = 10, window: float = 300.0, buckets: int = 10) -> None:
        self._discovery = discovery
        self.top_n = top_n
        self.window = window
        self._width = window / buckets
        self._lock = threading.Lock()
        self.flows: dict[tuple[str, str], int] = {}
        self.unanswered: dict[tuple[str, str], int] = {}
        self.events = {"new": 0, "destroy": 0, "other": 0}
        self.lost = 0
        self.resyncs = 0
        self.excluded = 0
        self._buckets: list[tuple[int, dict[tuple[str, str], int]]] = []  # (bucket number, pod -> unanswered)
        self._own_ids: dict[int, float] = {}
        self._kinds: dict[bytes, str] = {}
        self._pods: dict[bytes, tuple[str, str]] = {}
        self._labels: dict[tuple[bytes, bytes], tuple[str, str]] = {}
        self._backends: dict[str, set[str]] = {}
        self._targets_version = -1
        self._next_refresh = 0.0

    # ---- classification ----------------------------------------------------------------------------------
    def refresh(self, now: float | None = None) -> None:
        """Re-read the pod map (every REFRESH seconds) and the targets (when their version changed)."""
        now = time.monotonic() if now is None else now
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH
        pods: dict[bytes, tuple[str, str]] = {}
        for ip, pod in self._discovery.pods.snapshot().items():
            try:
                pods[socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)] = pod
            except OSError:
                continue
        self._pods = pods
        version = self._discovery.targets.version
        if version != self._targets_version:
            self._targets_version = version
            kinds: dict[bytes, str] = {}
            rank = {k: i for i, k in enumerate(KIND_ORDER)}
            for t in self._discovery.targets.snapshot():
                try:
                    key = socket.inet_pton(socket.AF_INET6 if ":" in t.host else socket.AF_INET, t.host)
                except OSError:
                    continue
                if key not in kinds or rank.get(t.kind, 99) < rank.get(kinds[key], 99):
                    kinds[key] = t.kind
            self._kinds = kinds
            self._labels = {}  # a server's kind may have changed; backend label budget stays as it was

    def _label(self, dst: bytes, backend: bytes) -> tuple[str, str]:
        key = (dst, backend)
        label = self._labels.get(key)
        if label is not None:
            return label
        kind = self._kinds.get(dst, OTHER)
        if kind == OTHER:  # not cached: pods may ask any server, and these would crowd out the targets
            return OTHER_LABEL
        if len(backend) not in (4, 16):  # garbled: no address to name
            label = (kind, OTHER)
        else:
            name = _addr(backend)
            names = self._backends.setdefault(kind, set())
            if name in names or len(names) < MAX_BACKENDS:
                names.add(name)
                label = (kind, name)
            else:
                label = (kind, OTHER)
        if len(self._labels) < 4096:
            self._labels[key] = label
        return label

    # ---- events ------------------------------------------------------------------------------------------
    def own(self, flow: Flow) -> bool:
        """Whether a flow is one of the exporter's own probes (by its source port, while it is registered)."""
        proto, src, _dst, sport, _dport, _rsrc, _status, _id = flow
        return src not in self._pods and (proto, sport) in self._discovery.own_ports

    def remember_own(self, ct_id: int, now: float) -> None:
        if len(self._own_ids) >= OWN_IDS_MAX:
            self._own_ids = {i: t for i, t in self._own_ids.items() if t > now}
            if len(self._own_ids) >= OWN_IDS_MAX:
                self._own_ids.clear()
        self._own_ids[ct_id] = now + OWN_ID_TTL

    def new(self, flow: Flow) -> None:
        proto, src, dst, sport, _dport, rsrc, status, ct_id = flow
        self.account([(True, proto, src, dst, sport, rsrc, status, ct_id)])

    def destroy(self, flow: Flow) -> None:
        proto, src, dst, sport, _dport, rsrc, status, ct_id = flow
        self.account([(False, proto, src, dst, sport, rsrc, status, ct_id)])

    def account(self, events: Iterable[Event], other: int = 0) -> None:
        """A batch of events in the order they came (`parse.Event`: NEW or DESTROY and the flow; any
        iterable, read once), plus `other` events that were no DNS flow: one lock and one clock reading for
        the batch, the per-event work in one loop (this runs for every DNS event the node sees)."""
        if self._targets_version < 0:
            self.refresh()  # first event; afterwards the listener refreshes once per batch
        now = time.monotonic()
        pods = self._pods
        ports = self._discovery.own_ports.table()  # read after the batch was received: see OwnPorts
        # the source ports of the registrations still valid: one int lookup per event rules most events out
        own_sports = {port for (_proto, port), until in ports.items() if until > now} if ports else ()
        labels = self._labels
        kinds = self._kinds
        label_of = self._label
        created = destroyed = 0
        with self._lock:
            flows, unanswered, own_ids = self.flows, self.unanswered, self._own_ids
            counts: dict[tuple[str, str], int] | None = None
            for is_new, proto, src, dst, sport, rsrc, status, ct_id in events:
                if is_new:
                    created += 1
                    # one of the exporter's own probes: no pod, from a port the probes registered
                    if sport in own_sports and src not in pods and ports.get((proto, sport), 0.0) > now:
                        self.excluded += 1
                        self.remember_own(ct_id, now)
                        own_ids = self._own_ids  # remember_own may have replaced it
                        continue
                    label = (labels.get((dst, rsrc)) or label_of(dst, rsrc)) if dst in kinds else OTHER_LABEL
                    flows[label] = flows.get(label, 0) + 1
                    continue
                destroyed += 1
                if own_ids and own_ids.pop(ct_id, None) is not None:
                    continue
                if status & IPS_SEEN_REPLY:
                    continue
                # an own probe whose NEW event was lost or came before we listened
                if sport in own_sports and src not in pods and ports.get((proto, sport), 0.0) > now:
                    continue
                label = (labels.get((dst, rsrc)) or label_of(dst, rsrc)) if dst in kinds else OTHER_LABEL
                unanswered[label] = unanswered.get(label, 0) + 1
                if counts is None:
                    bucket = int(now / self._width)
                    if not self._buckets or self._buckets[-1][0] != bucket:
                        self._buckets.append((bucket, {}))
                        self._expire(bucket)
                    counts = self._buckets[-1][1]
                pod = pods.get(src, NO_POD)
                counts[pod] = counts.get(pod, 0) + 1
            events_seen = self.events
            if created:
                events_seen["new"] += created
            if destroyed:
                events_seen["destroy"] += destroyed
            if other:
                events_seen["other"] += other

    def lost_events(self) -> None:
        with self._lock:
            self.lost += 1

    def resynced(self, own_ids: list[int]) -> None:
        now = time.monotonic()
        with self._lock:
            self.resyncs += 1
            for ct_id in own_ids:
                self.remember_own(ct_id, now)

    def _expire(self, bucket: int) -> None:
        oldest = bucket - round(self.window / self._width) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.pop(0)

    # ---- scrape ------------------------------------------------------------------------------------------
    def snapshot(self) -> FlowSnapshot:
        with self._lock:
            self._expire(int(time.monotonic() / self._width))
            by_pod: dict[tuple[str, str], int] = {}
            for _, counts in self._buckets:
                for pod, n in counts.items():
                    by_pod[pod] = by_pod.get(pod, 0) + n
            snap = FlowSnapshot(dict(self.flows), dict(self.unanswered), [], dict(self.events), self.lost,
                                self.resyncs, self.excluded)
        unknown = by_pod.pop(NO_POD, 0)
        ranked = sorted(by_pod.items(), key=lambda kv: (-kv[1], kv[0]))
        rows = ranked[: self.top_n]
        rows.append((NO_POD, unknown))
        rows.append((OTHER_PODS, sum(n for _, n in ranked[self.top_n :])))
        snap.top_pods.extend(rows)
        return snap
