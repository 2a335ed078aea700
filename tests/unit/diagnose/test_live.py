"""The status page's live diagnosis, from the exporter's own probe store and conntrack samples: the same
verdict as the command would give, computed from counters over a window, and a page that shows it."""

from __future__ import annotations

from exporter.conntrack.stats import ConntrackStats
from exporter.core.feature import AppContext
from exporter.diagnose import page
from exporter.diagnose.live import LiveDiagnosis
from exporter.discovery import Target
from exporter.dns.resolver import ProbeResult, QueryOutcome
from exporter.dns.store import ProbeStore

SVC = Target("10.96.0.10", 53, "service")
EP_A = Target("10.244.0.2", 53, "endpoint", "coredns-a")
EP_B = Target("10.244.0.3", 53, "endpoint", "coredns-<b>")  # a hostile pod name, shown escaped


def result(ok: bool, duration: float = 0.002) -> ProbeResult:
    reason = None if ok else "timeout"
    outcomes = {"A": QueryOutcome("A", True, reason), "AAAA": QueryOutcome("AAAA", True, reason)}
    return ProbeResult("parallel", duration, outcomes)


class Node:
    def __init__(self) -> None:
        self.ctx = AppContext()
        self.ctx.targets.set("kubernetes", [SVC, EP_A, EP_B])
        self.store = ProbeStore()
        for t in (SVC, EP_A, EP_B):
            self.store.ensure((t.server, t.kind), ("parallel",))
        self.entries, self.drops = 100, 0
        self.ctx.shared["dns.store"] = self.store
        self.ctx.shared["conntrack.sample"] = self.sample
        self.live = LiveDiagnosis(self.ctx, interval=10, window=60)

    def sample(self) -> ConntrackStats:
        return ConntrackStats(per_cpu={0: {"drop": self.drops}}, entries=self.entries, limit=1000)

    def probe(self, t: Target, n: int, ok: bool) -> None:
        for _ in range(n):
            self.store.record((t.server, t.kind), result(ok))


def test_old_failures_leave_the_window_and_the_verdict_heals() -> None:
    node = Node()
    node.live.tick()
    node.probe(SVC, 10, True)
    node.probe(EP_A, 10, False)  # coredns-a stopped answering
    node.probe(EP_B, 10, True)
    v, _ = node.live.tick()
    assert (v.status, v.cause) == ("degraded", "CoreDNSPodNotAnswering")
    assert any("coredns-a" in line for line in v.evidence)
    html = page.render(node.live, "node-1").decode()
    assert "CoreDNSPodNotAnswering" in html and "coredns-&lt;b&gt;" in html and "<b>" not in html.split("<body>")[1]
    # healed: new lookups answer; once the failing interval is older than the window, the verdict is healthy
    for _ in range(7):
        node.probe(SVC, 5, True)
        node.probe(EP_A, 5, True)
        node.probe(EP_B, 5, True)
        for snap in node.live._ring:
            snap.at -= 10  # the clock moves on 10 s per tick
        v, _ = node.live.tick()
    assert (v.status, v.cause) == ("healthy", None)


def test_table_usage_and_drop_rate_come_from_the_samples() -> None:
    node = Node()
    node.live.tick()
    node.entries, node.drops = 1000, 500
    node.live._ring[0].at -= 10
    v, ev = node.live.tick()
    assert ev.conntrack is not None and ev.conntrack.usage == 1.0 and ev.conntrack.rates["drop"] > 40
    assert v.cause == "ConntrackTableFull"
    html = page.render(node.live).decode()
    assert "100.0%" in html and "ConntrackTableFull.md" in html


def test_page_before_the_first_tick_says_it_is_collecting() -> None:
    assert b"Collecting" in page.render(Node().live)


def test_one_unanswered_nodelocal_round_under_loss_is_not_nodelocal_down() -> None:
    node = Node()
    nl = "169.254.20.10:53"
    node.live.nodelocal = nl
    node.store.set_present(nl, True)
    v, _ = node.live.tick()
    assert v.cause != "NodeLocalDNSCacheDown"
    node.store.set_present(nl, False)  # one round's question lost: NodeLocal answered earlier in the window
    node.live._ring[0].at -= 10
    v, ev = node.live.tick()
    assert ev.nodelocal_answers is True and v.cause != "NodeLocalDNSCacheDown"
    for _ in range(7):  # no answer for longer than the window: down
        for snap in node.live._ring:
            snap.at -= 10
        v, ev = node.live.tick()
    assert ev.nodelocal_answers is False and (v.status, v.cause) == ("broken", "NodeLocalDNSCacheDown")
    node.store.set_present(nl, True)  # back: at once
    v, ev = node.live.tick()
    assert ev.nodelocal_answers is True and v.cause != "NodeLocalDNSCacheDown"
