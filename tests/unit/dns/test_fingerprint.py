"""The race fingerprint (docs/resolvers.md): the partial-pair rate against the loss rate of queries sent
alone, both from the real probe loop against in-process DNS servers. Uniform loss keeps the ratio near
1 - q (below the alert's 3x); a server that loses only the second query of a back-to-back pair (what
the conntrack insert race does; a lone re-send never races) pushes it far above."""

from __future__ import annotations

from pathlib import Path

from exporter.discovery.targets import Target
from tests.support.dnsserver import Behaviour, DnsServer
from tests.unit.dns.test_scheduler import Loop, wait_for

PAIRS = 300
THRESHOLD = 3.0  # the alert's factor


def _ratio(tmp_path: Path, behaviour: Behaviour) -> tuple[float, float, float]:
    with DnsServer(behaviour) as s:
        lp = Loop(tmp_path, timeout=0.03, attempts=2, interval=0.005, jitter=0.0, modes=("parallel",),
                  resolvers=())
        lp.targets.set("static", [Target(s.host, s.port, "static")])
        labels = {"server": f"{s.host}:{s.port}", "kind": "static"}
        lp.service.start()
        try:
            wait_for(lambda: (lp.get("dns_probe_requests_total", **labels, mode="parallel", qtype="A",
                                     zone="cluster") or 0) >= PAIRS,
                     timeout=60)
        finally:
            lp.service.stop(2.0)
    pairs = lp.get("dns_probe_requests_total", **labels, mode="parallel", qtype="A", zone="cluster") or 0
    partial = sum(lp.get("dns_probe_partial_pairs_total", **labels, lost_qtype=q) or 0 for q in ("A", "AAAA"))
    lost = lp.get("dns_probe_lone_queries_total", **labels, result="lost") or 0
    answered = lp.get("dns_probe_lone_queries_total", **labels, result="answered") or 0
    pi, lam = partial / pairs, lost / max(lost + answered, 1)
    return pi, lam, pi / (2 * lam) if lam else float("inf")


def test_uniform_loss_is_not_the_race(tmp_path: Path) -> None:
    pi, lam, ratio = _ratio(tmp_path, Behaviour(loss=0.2, seed=1))
    assert pi > 0.15, pi  # plenty of partial pairs: the old fingerprint alone would call this the race
    assert 0.1 < lam < 0.3, lam
    assert ratio < THRESHOLD, (pi, lam, ratio)


def test_paired_loss_only_is_the_race(tmp_path: Path) -> None:
    pi, lam, ratio = _ratio(tmp_path, Behaviour(pair_loss=0.2, seed=1))
    assert pi > 0.1, pi
    assert ratio > THRESHOLD, (pi, lam, ratio)
