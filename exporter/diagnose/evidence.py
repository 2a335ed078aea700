"""What a diagnosis looks at: plain data, filled either by the active checks (`diagnose` command) or from
the running exporter's state (the `/` status page), and judged by `verdict.decide` the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

from exporter.table.service import TableSnapshot

CLUSTER, EXTERNAL = "cluster", "external"  # the two kinds of name asked
SLOW_SECONDS = 0.3  # an answer slower than this is "slow" (a CoreDNS pod answers in milliseconds)


@dataclass
class Tally:
    """Lookups of one target in one mode for one kind of name."""

    lookups: int = 0
    failed: int = 0
    slow: int = 0
    durations: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, ok: bool, duration: float, reason: str | None) -> None:
        self.lookups += 1
        if not ok:
            self.failed += 1
            if reason:
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        elif duration > SLOW_SECONDS:
            self.slow += 1
        if len(self.durations) < 1000:
            self.durations.append(duration)

    def merge(self, other: Tally) -> None:
        self.lookups += other.lookups
        self.failed += other.failed
        self.slow += other.slow
        self.durations += other.durations[: max(0, 1000 - len(self.durations))]
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    @property
    def fail_ratio(self) -> float:
        return self.failed / self.lookups if self.lookups else 0.0

    @property
    def slow_ratio(self) -> float:
        answered = self.lookups - self.failed
        return self.slow / answered if answered else 0.0

    def median(self) -> float | None:
        if not self.durations:
            return None
        d = sorted(self.durations)
        return d[len(d) // 2]


@dataclass
class TargetEvidence:
    server: str
    kind: str  # service, endpoint, nodelocal, static, resolvconf
    pod: str = ""
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)  # (mode, CLUSTER|EXTERNAL)

    def tally(self, mode: str | None = None, scope: str | None = None, udp_only: bool = False) -> Tally:
        out = Tally()
        for (m, s), t in self.tallies.items():
            if (mode is None or m == mode) and (scope is None or s == scope) and not (udp_only and m == "tcp"):
                out.merge(t)
        return out

    @property
    def label(self) -> str:
        return f"{self.kind} {self.server}" + (f" ({self.pod})" if self.pod else "")


@dataclass
class ConntrackEvidence:
    entries: int
    limit: int | None
    rates: dict[str, float]  # per second over the sample window: drop, insert_failed, clash_resolve, early_drop
    window: float

    @property
    def usage(self) -> float | None:
        return self.entries / self.limit if self.limit else None


@dataclass
class TableEvidence:
    entries: int
    dns_entries: dict[str, int]
    stale_dns: int | None
    top_states: list[tuple[str, str, int]]
    top_sources: list[tuple[str, str, int]]
    partial: bool
    duration: float


def table_from_snapshot(snap: TableSnapshot | None) -> TableEvidence | None:
    """The breakdown of a finished scan (None when there is none, or it read nothing)."""
    if snap is None or (snap.partial and snap.entries == 0):
        return None
    states = sorted(((p, s, n) for (p, s), n in snap.states if n), key=lambda x: -x[2])[:5]
    sources = [(ns, pod, n) for (ns, pod), n in snap.top_sources if n and pod not in ("", "other")][:5]
    return TableEvidence(entries=snap.entries, dns_entries=dict(snap.dns), stale_dns=snap.stale_dns,
                         top_states=states, top_sources=sources, partial=snap.partial, duration=snap.duration)


@dataclass
class ResolvEvidence:
    source: str  # a path, or "kubelet default" when synthesised
    nameservers: list[str]
    search: list[str]
    ndots: int

    def queries_for(self, name: str) -> int:
        """Queries glibc sends for `name` (A+AAAA per candidate) before it reaches the name as given."""
        dots = name.rstrip(".").count(".")
        if name.endswith(".") or dots >= self.ndots:
            return 2
        return 2 * (len(self.search) + 1)


@dataclass
class KubeProxyEvidence:
    reachable: bool
    last_sync_age: float | None = None
    error: str = ""


@dataclass
class Evidence:
    """Everything one diagnosis knows; None (with a line in `unchecked`) for what it could not check."""

    conntrack: ConntrackEvidence | None = None
    table: TableEvidence | None = None
    targets: list[TargetEvidence] = field(default_factory=list)
    nodelocal: str | None = None  # the configured NodeLocal address
    nodelocal_answers: bool | None = None
    kube_endpoints: int | None = None  # ready endpoints the API lists (None: not checked)
    kube_service_ips: list[str] = field(default_factory=list)
    resolv_node: ResolvEvidence | None = None
    resolv_pod: ResolvEvidence | None = None
    loop: str | None = None  # why the node's resolver forwards back into the cluster, if it does
    kube_proxy: KubeProxyEvidence | None = None
    unchecked: list[str] = field(default_factory=list)
    external_name: str = ""

    def of_kind(self, *kinds: str) -> list[TargetEvidence]:
        return [t for t in self.targets if t.kind in kinds and t.tally().lookups]
