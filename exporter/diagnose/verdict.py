"""The cause model: evidence in, one named cause out (the same names as the shipped alerts), with what
supports it, the runbook to open, and what was ruled out.

Rules are tried in a fixed order, causes before symptoms: a full table breaks every path, so it is named
before the DNS failures it causes; a dead CoreDNS pod before the Service-IP failures it causes. The first
rule that holds names the cause; every other rule that could be checked and did not hold is "ruled out".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.diagnose.evidence import CLUSTER, EXTERNAL, Evidence, Tally, TargetEvidence

HEALTHY, DEGRADED, BROKEN = "healthy", "degraded", "broken"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, BROKEN: 2}
RUNBOOK_BASE_URL = "https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/runbooks/"

# thresholds for a diagnosis window of a few seconds (the alerts use longer windows; see docs/runbooks)
TABLE_FULL = 0.98
TABLE_NEAR_FULL = 0.90
DEAD = 0.9  # a target failing this share of its lookups does not answer (packet loss stays below it)
FAILING = 0.20  # the Service IP failing this share while its endpoints answer: a broken path
# ... or failing fewer, but more than its endpoints can explain: at least PATH_MIN_FAILED lookups, and a path
# failing as often as the endpoints do (at least PATH_BASE) would fail that many less than PATH_P of the time
# (a stale endpoint with a small share of the DNAT map: its share of a few seconds' lookups varies a lot)
PATH_MIN_FAILED = 3
PATH_BASE = 0.02
PATH_P = 0.005
HEALTHY_MAX = 0.05  # a target failing at most this share is answering
LOSS_MIN = 0.10  # UDP lookups failing on several targets at this share, while TCP is fine: packet loss
SLOW = 0.5  # the share of answers slower than SLOW_SECONDS that makes a target slow


@dataclass
class Finding:
    cause: str
    severity: str
    evidence: list[str]


@dataclass
class Verdict:
    status: str  # healthy, degraded, broken
    cause: str | None
    evidence: list[str] = field(default_factory=list)
    runbook: str | None = None
    also: list[Finding] = field(default_factory=list)  # further causes that hold (after the first)
    ruled_out: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


Rule = Callable[[Evidence], Finding | None]


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _describe(t: TargetEvidence, scope: str | None = CLUSTER, udp_only: bool = False) -> str:
    tal = t.tally(scope=scope, udp_only=udp_only)
    reasons = ",".join(f"{k}={v}" for k, v in sorted(tal.reasons.items()))
    return f"{t.label}: {tal.failed}/{tal.lookups} lookups failed" + (f" ({reasons})" if reasons else "")


def table_full(ev: Evidence) -> Finding | None:
    c = ev.conntrack
    if c is None or c.usage is None:
        return None
    if c.usage >= TABLE_FULL or (c.usage >= TABLE_NEAR_FULL and c.rates.get("drop", 0) > 0):
        return Finding("ConntrackTableFull", BROKEN, [
            f"conntrack table {c.entries}/{c.limit} ({_pct(c.usage)})",
            f"drop {c.rates.get('drop', 0):.1f}/s, early_drop {c.rates.get('early_drop', 0):.1f}/s: new flows "
            "(DNS included) are dropped"])
    return None


def nodelocal_down(ev: Evidence) -> Finding | None:
    if ev.nodelocal and ev.nodelocal_answers is False:
        return Finding("NodeLocalDNSCacheDown", BROKEN, [
            f"NodeLocal DNSCache {ev.nodelocal} does not answer: pods whose resolv.conf points at it cannot resolve"])
    return None


def insert_failed(ev: Evidence) -> Finding | None:
    c = ev.conntrack
    if c is not None and c.rates.get("insert_failed", 0) > 0:
        return Finding("ConntrackInsertFailed", DEGRADED, [
            f"insert_failed {c.rates['insert_failed']:.2f}/s: packets dropped on conntrack insert (the A/AAAA "
            "race on kernels without clash resolution); lookups wait the 5 s resolver timeout"])
    return None


def _endpoints(ev: Evidence) -> tuple[list[TargetEvidence], list[TargetEvidence]]:
    eps = ev.of_kind("endpoint")
    dead = [t for t in eps if t.tally(scope=CLUSTER).fail_ratio >= DEAD]
    return eps, dead


def coredns_not_answering(ev: Evidence) -> Finding | None:
    eps, dead = _endpoints(ev)
    if dead and len(dead) < len(eps):
        lines = [_describe(t) for t in dead]
        lines += [f"other endpoints answer ({', '.join(t.server for t in eps if t not in dead)})"]
        for s in ev.of_kind("service"):
            lines.append(f"through the Service IP: {_describe(s)} (its DNAT still sends a share to the dead pod)")
        return Finding("CoreDNSPodNotAnswering", DEGRADED, lines)
    if dead and len(dead) == len(eps):
        return Finding("CoreDNSPodNotAnswering", BROKEN, [_describe(t) for t in dead] + ["no endpoint answers"])
    return None


def service_ip_path(ev: Evidence) -> Finding | None:
    svc = ev.of_kind("service")
    eps = ev.of_kind("endpoint")
    if not svc or not eps:
        return None
    if not all(t.tally(scope=CLUSTER).fail_ratio <= HEALTHY_MAX for t in eps):
        return None
    pooled = Tally()
    for t in eps:
        pooled.merge(t.tally(scope=CLUSTER))
    base = max(PATH_BASE, pooled.fail_ratio)
    bad = [s for s in svc if _fails_more(s.tally(scope=CLUSTER), base)]
    if bad:
        lines = [_describe(s) for s in bad] + [f"every endpoint answers directly ({len(eps)} checked)"]
        if ev.table is not None and ev.table.stale_dns:
            lines.append(f"{ev.table.stale_dns} DNS conntrack entries answered by no current endpoint (stale NAT)")
        if ev.kube_proxy is not None and ev.kube_proxy.last_sync_age is not None:
            lines.append(f"kube-proxy last synced its rules {ev.kube_proxy.last_sync_age:.0f} s ago")
        return Finding("DNSServiceIPPathBroken", BROKEN, lines)
    return None


def _fails_more(t: Tally, base: float) -> bool:
    """Whether a target fails at least FAILING of its lookups, or more than a path failing `base` of them
    would: at least PATH_MIN_FAILED failures, and the binomial tail P(X >= failed | lookups, base) < PATH_P."""
    if t.fail_ratio >= FAILING:
        return True
    if t.failed < PATH_MIN_FAILED:
        return False
    n, k = t.lookups, t.failed
    # P(X < k) in log space (lgamma): no overflow of C(n, i) however many lookups the window holds
    below = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                         + i * math.log(base) + (n - i) * math.log1p(-base)) for i in range(k))
    return 1.0 - below < PATH_P


def packet_loss(ev: Evidence) -> Finding | None:
    # cluster names only: an external name failing is the upstream's business (see `upstream`)
    probed = [t for t in ev.targets if t.tally(scope=CLUSTER, udp_only=True).lookups]
    lossy = [t for t in probed if LOSS_MIN <= t.tally(scope=CLUSTER, udp_only=True).fail_ratio < DEAD]
    tcp = [t.tally(mode="tcp") for t in probed if t.tally(mode="tcp").lookups]
    tcp_ok = bool(tcp) and all(x.fail_ratio <= HEALTHY_MAX for x in tcp)
    if len(lossy) >= 2 and (tcp_ok or not tcp):
        lines = [_describe(t, scope=CLUSTER, udp_only=True) for t in lossy]
        if tcp_ok:
            lines.append("TCP lookups to the same servers all succeed: UDP packets are lost on the way")
        return Finding("DNSNodePacketLoss", DEGRADED, lines)
    return None


def upstream(ev: Evidence) -> Finding | None:
    # NodeLocal is a cache: it keeps answering external names it has seen, so it cannot rule this out
    answering = [t for t in ev.targets if t.kind != "nodelocal" and t.tally(scope=CLUSTER).lookups
                 and t.tally(scope=CLUSTER).fail_ratio <= HEALTHY_MAX and t.tally(scope=EXTERNAL).lookups]
    if answering and all(t.tally(scope=EXTERNAL).fail_ratio >= 0.5 for t in answering):
        lines = [f"{_describe(t, scope=EXTERNAL)} for {ev.external_name or 'the external name'}" for t in answering]
        lines.append("cluster names resolve everywhere: CoreDNS answers, what it forwards to does not")
        return Finding("DNSUpstreamFailing", BROKEN, lines)
    return None


def coredns_slow(ev: Evidence) -> Finding | None:
    eps = ev.of_kind("endpoint") or ev.of_kind("service", "static", "resolvconf")
    slow = [t for t in eps if t.tally(scope=CLUSTER).slow_ratio >= SLOW]
    if slow:
        lines = []
        for t in slow:
            med = t.tally(scope=CLUSTER).median()
            lines.append(f"{t.label}: median answer {med * 1000:.0f} ms" if med is not None else t.label)
        return Finding("CoreDNSPodSlow", DEGRADED, lines)
    return None


def table_near_full(ev: Evidence) -> Finding | None:
    c = ev.conntrack
    if c is not None and c.usage is not None and c.usage >= TABLE_NEAR_FULL:
        return Finding("ConntrackTableNearFull", DEGRADED, [
            f"conntrack table {c.entries}/{c.limit} ({_pct(c.usage)}): at 100% new flows are dropped"])
    return None


def clash_resolving(ev: Evidence) -> Finding | None:
    c = ev.conntrack
    if c is not None and c.rates.get("clash_resolve", 0) > 0:
        return Finding("ConntrackClashResolving", DEGRADED, [
            f"clash_resolve {c.rates['clash_resolve']:.1f}/s: parallel A/AAAA queries race in conntrack; this "
            "kernel resolves the clash (no packet lost), older kernels drop one (insert_failed)"])
    return None


def forwarding_loop(ev: Evidence) -> Finding | None:
    if ev.loop:
        return Finding("DNSForwardingLoop", DEGRADED, [ev.loop])
    return None


def kube_proxy_stale(ev: Evidence) -> Finding | None:
    kp = ev.kube_proxy
    if kp is not None and kp.last_sync_age is not None and kp.last_sync_age > 300:
        return Finding("KubeProxySyncStale", DEGRADED, [
            f"kube-proxy last synced its rules {kp.last_sync_age:.0f} s ago: Service changes are not applied"])
    return None


RULES: tuple[tuple[str, Rule, Callable[[Evidence], bool]], ...] = (
    ("ConntrackTableFull", table_full, lambda ev: ev.conntrack is not None),
    ("NodeLocalDNSCacheDown", nodelocal_down, lambda ev: ev.nodelocal is not None),
    ("ConntrackInsertFailed", insert_failed, lambda ev: ev.conntrack is not None),
    ("CoreDNSPodNotAnswering", coredns_not_answering, lambda ev: bool(ev.of_kind("endpoint"))),
    ("DNSServiceIPPathBroken", service_ip_path, lambda ev: bool(ev.of_kind("service") and ev.of_kind("endpoint"))),
    ("DNSNodePacketLoss", packet_loss, lambda ev: bool(ev.targets)),
    ("DNSUpstreamFailing", upstream, lambda ev: bool(ev.targets)),
    ("CoreDNSPodSlow", coredns_slow, lambda ev: bool(ev.targets)),
    ("ConntrackTableNearFull", table_near_full, lambda ev: ev.conntrack is not None),
    ("ConntrackClashResolving", clash_resolving, lambda ev: ev.conntrack is not None),
    ("DNSForwardingLoop", forwarding_loop, lambda ev: ev.resolv_node is not None),
    ("KubeProxySyncStale", kube_proxy_stale, lambda ev: ev.kube_proxy is not None and ev.kube_proxy.reachable),
)
CAUSES = tuple(name for name, _, _ in RULES)


def decide(ev: Evidence, runbook_base_url: str = RUNBOOK_BASE_URL) -> Verdict:
    found: list[Finding] = []
    ruled_out: list[str] = []
    for name, rule, checkable in RULES:
        finding = rule(ev)
        if finding is not None:
            found.append(finding)
        elif checkable(ev):
            ruled_out.append(name)
    unchecked = list(ev.unchecked)
    if not found:
        if not ev.targets and ev.conntrack is None:
            return Verdict(HEALTHY, None, ["nothing could be checked"], None, [], ruled_out, unchecked)
        failing = [t for t in ev.targets if t.tally().fail_ratio > HEALTHY_MAX]
        if failing:  # failures no rule explains: say so rather than call it healthy
            return Verdict(DEGRADED, "DNSProbeFailures", [_describe(t, scope=None) for t in failing],
                           f"{runbook_base_url}DNSProbeFailures.md", [], ruled_out, unchecked)
        return Verdict(HEALTHY, None, [], None, [], ruled_out, unchecked)
    # the most severe first, in rule order within a severity
    found.sort(key=lambda f: 0 if f.severity == BROKEN else 1)
    first, rest = found[0], found[1:]
    return Verdict(first.severity, first.cause, first.evidence, f"{runbook_base_url}{first.cause}.md", rest,
                   ruled_out, unchecked)
