"""Thread-safe accumulation of probe results, written by the probe loop and read at scrape time.

Keyed by target (`server`, `kind`): `ensure()` creates a target's series, `retain()` forgets targets
that left the target registry, and `record()` drops results for a target it does not know (removed while
its lookup was in flight), so a removed target's series never come back. The collector renders the
targets the registry lists now, so a removed target disappears from the very next scrape.

Counters are kept per name class (`zone`): `cluster` for probe names inside the cluster domain, `external` for
the others, so an upstream outage (external names fail, cluster names resolve) is visible as series of its own
while several names of one class still add into one series (two values at most: the label stays bounded).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from exporter.dns.models import RESULTS, Lookup
from exporter.dns.resolver import QTYPES, ProbeResult

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
ZONES = ("cluster", "external")


def zone_of(name: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """`cluster` if `name` is the cluster domain or inside it (case-insensitive, trailing dots ignored)."""
    n, d = name.rstrip(".").lower(), cluster_domain.strip(".").lower()
    return "cluster" if n == d or n.endswith("." + d) else "external"

# Sub-millisecond (a node-local cache) to tens of ms (a cluster DNS pod), 0.5 s (the slow-probe alert),
# then the resolver plateaus:
# an answer after one retransmission lands just above 5 s (le=7.5), after two or a total failure just
# above 10 s (le=15). No bound sits exactly on 5 or 10: the plateaus are slightly above them.
BUCKETS = (0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0)

# What an application waited (resolver models): glibc's waits are multiples of the timeout (5 s) plus
# round trips; musl resends at 2.5 s and gives up at 5 s; glibc use-vc can hang for the kernel's SYN
# retries. Each class sits between two bounds: < 1 s, ~2.5 s (1-3.75), ~5 (3.75-7.5), ~10 (7.5-12.5),
# ~15 (12.5-17.5), ~20 (17.5-25), a TCP hang (25-140).
LOOKUP_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 3.75, 7.5, 12.5, 17.5, 25.0, 140.0)

TargetKey = tuple[str, str]  # (server label, kind)

COMPACT_KINDS = ("endpoint",)  # kinds recorded as results only (dns_probe_endpoint_queries_total)
# A compact kind has no histogram: an answer on the first transmission slower than this counts as result
# `slow` instead of `ok`, so a slow CoreDNS pod can still be named (the alerts' 500 ms, the field's p99).
SLOW_ANSWER_SECONDS = 0.5


def result_of(reason: str | None, attempt: int) -> str:
    """A query's result for the compact counters: ok, retried (answered after a retransmission) or the reason."""
    if reason is None:
        return "retried" if attempt > 0 else "ok"
    return reason


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    bounds: tuple[float, ...] = BUCKETS

    @classmethod
    def with_bounds(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls([0] * (len(bounds) + 1), 0.0, bounds)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip((*(str(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, float(acc)))
        return out


@dataclass
class TargetStats:
    histograms: dict[str, Histogram] = field(default_factory=dict)              # mode
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)     # (mode, qtype, zone)
    retries: dict[tuple[str, str, str], int] = field(default_factory=dict)      # (mode, qtype, zone)
    failures: dict[tuple[str, str, str, str], int] = field(default_factory=dict)  # (mode, qtype, zone, reason)
    partial: dict[str, int] = field(default_factory=dict)                       # lost qtype (parallel only)
    results: dict[tuple[str, str], int] = field(default_factory=dict)           # (zone, result) (compact kinds)
    skipped: dict[str, int] = field(default_factory=dict)                       # reason
    lone: dict[str, int] = field(default_factory=lambda: {"answered": 0, "lost": 0})  # lone UDP sends
    lookups: dict[tuple[str, str], int] = field(default_factory=dict)           # (resolver, result)
    waits: dict[str, Histogram] = field(default_factory=dict)                   # resolver


@dataclass
class SearchStats:
    queries: int
    duration: float


class _CountingLock:
    """A lock that counts how often it was taken: every change to the store happens under it, so the
    count is a version the collector renders by (reads use `lock` directly and do not count)."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class ProbeStore:
    def __init__(self, names: tuple[str, ...] = ("kubernetes.default.svc.cluster.local.",),
                 cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> None:
        """`names`: the probed names, whose zones get their series at zero from the start."""
        self.cluster_domain = cluster_domain
        self._zones = tuple(z for z in ZONES if z in {zone_of(n, cluster_domain) for n in names}) or ZONES[:1]
        self._lock = _CountingLock()
        self._targets: dict[TargetKey, TargetStats] = {}
        self._present: dict[str, bool] = {}        # nodelocal server -> answering
        self._search: dict[str, SearchStats] = {}  # search-probe name -> last walk
        self._resolv_conf: bool | None = None  # resolv.conf fallback in use: usable or not; None: not in use

    def ensure(self, key: TargetKey, modes: tuple[str, ...], resolvers: tuple[str, ...] = ()) -> None:
        """Create a target's series at zero, so rate() works from its first failure."""
        with self._lock:
            if key in self._targets:
                return
            st = TargetStats()
            self._targets[key] = st
            for res in resolvers:
                st.waits[res] = Histogram.with_bounds(LOOKUP_BUCKETS)
                for outcome in RESULTS:
                    st.lookups[(res, outcome)] = 0
            for mode in modes:
                st.histograms[mode] = Histogram()
                for qt in QTYPES:
                    for z in self._zones:
                        st.requests[(mode, qt, z)] = 0
                        st.retries[(mode, qt, z)] = 0
                if mode == "parallel":
                    for qt in QTYPES:
                        st.partial[qt] = 0

    def record(self, key: TargetKey, result: ProbeResult, name: str | None = None) -> None:
        """Add one lookup of `name` (counted in its zone; without a name, in the first configured zone)."""
        mode = result.mode
        z = zone_of(name, self.cluster_domain) if name is not None else self._zones[0]
        with self._lock:
            st = self._targets.get(key)
            if st is None:
                return
            if key[1] in COMPACT_KINDS:
                for out in result.outcomes.values():
                    r = result_of(out.reason, out.attempt)
                    if r == "ok" and result.duration > SLOW_ANSWER_SECONDS:
                        r = "slow"
                    st.results[(z, r)] = st.results.get((z, r), 0) + 1
            st.histograms.setdefault(mode, Histogram()).observe(result.duration)
            for qt, out in result.outcomes.items():
                st.requests[(mode, qt, z)] = st.requests.get((mode, qt, z), 0) + 1
                if out.reason is not None:
                    k = (mode, qt, z, out.reason)
                    st.failures[k] = st.failures.get(k, 0) + 1
                st.retries.setdefault((mode, qt, z), 0)
            for qt in result.retried:
                st.retries[(mode, qt, z)] += 1
            for qt, n in result.mismatches.items():
                k = (mode, qt, z, "mismatch")
                st.failures[k] = st.failures.get(k, 0) + n
            if mode == "parallel" and result.partial_lost is not None:
                st.partial[result.partial_lost] = st.partial.get(result.partial_lost, 0) + 1
            st.lone["answered"] += result.lone_sent - result.lone_lost
            st.lone["lost"] += result.lone_lost

    def record_lookup(self, key: TargetKey, lookup: Lookup) -> None:
        """One resolver model's lookup: the application's result and wait."""
        with self._lock:
            st = self._targets.get(key)
            if st is None:
                return
            k = (lookup.resolver, lookup.result)
            st.lookups[k] = st.lookups.get(k, 0) + 1
            st.waits.setdefault(lookup.resolver, Histogram.with_bounds(LOOKUP_BUCKETS)).observe(lookup.duration)

    def skip(self, key: TargetKey, reason: str) -> None:
        """Count a round in which this target could not be probed (reason `busy`: its last probe still runs)."""
        with self._lock:
            st = self._targets.get(key)
            if st is not None:
                st.skipped[reason] = st.skipped.get(reason, 0) + 1

    def set_present(self, server: str, present: bool) -> bool:
        """Record whether a nodelocal server answers; returns True when that changed."""
        with self._lock:
            changed = self._present.get(server) != present
            self._present[server] = present
            return changed

    def is_present(self, server: str) -> bool:
        with self._lock.lock:  # a read: does not move the version
            return self._present.get(server, False)

    def set_resolv_conf(self, usable: bool | None) -> None:
        """Whether the resolv.conf fallback's file is usable (None: the fallback is not in use)."""
        with self._lock.lock:
            if self._resolv_conf is usable:
                return
        with self._lock:
            self._resolv_conf = usable

    def resolv_conf_usable(self) -> bool | None:
        with self._lock.lock:
            return self._resolv_conf

    def record_search(self, name: str, queries: int, duration: float) -> None:
        with self._lock:
            self._search[name] = SearchStats(queries, duration)

    def retain(self, keys: set[TargetKey]) -> None:
        """Forget every target not in `keys`."""
        with self._lock:
            for k in [k for k in self._targets if k not in keys]:
                del self._targets[k]
            live_servers = {server for server, kind in keys if kind == "nodelocal"}
            for s in [s for s in self._present if s not in live_servers]:
                del self._present[s]

    def version(self) -> int:
        """Changes whenever the store may have changed (see `_CountingLock`)."""
        return self._lock.count

    def snapshot(self) -> tuple[dict[TargetKey, TargetStats], dict[str, bool], dict[str, SearchStats]]:
        """Deep-enough copies for the collector to read without the lock."""
        with self._lock.lock:
            targets = {
                k: TargetStats(
                    {m: Histogram(list(h.counts), h.total, h.bounds) for m, h in st.histograms.items()},
                    dict(st.requests), dict(st.retries), dict(st.failures), dict(st.partial),
                    dict(st.results), dict(st.skipped), dict(st.lone), dict(st.lookups),
                    {r: Histogram(list(h.counts), h.total, h.bounds) for r, h in st.waits.items()},
                )
                for k, st in self._targets.items()
            }
            return targets, dict(self._present), dict(self._search)
