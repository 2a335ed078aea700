"""The probe loop (`ProbeService`) and the `dns` collector together, against in-process DNS servers:
targets coming and going, the resolv.conf fallback, NodeLocal presence, the search-path walk, the
cardinality budget, and the real exporter process serving the probe metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from exporter.discovery import Discovery
from exporter.discovery.targets import Target, TargetRegistry
from exporter.dns import resolvconf
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.scheduler import ProbeConfig, ProbeService
from exporter.dns.store import ProbeStore
from tests.support.dnsserver import Behaviour, DnsServer

FAST = {"timeout": 0.2, "attempts": 2, "interval": 0.15}


class Loop:
    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.targets = TargetRegistry()
        self.store = ProbeStore()
        conf = {**FAST, "resolv_conf": str(tmp_path / "resolv.conf"), **config}
        self.service = ProbeService(ProbeConfig(**conf), Discovery(self.targets), self.store)  # type: ignore[arg-type]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DnsProbeCollector(self.store, self.targets))  # type: ignore[arg-type]

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        out = {}
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == name:
                    out[tuple(sorted(s.labels.items()))] = s.value
        return out

    def get(self, metric: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(metric, labels)


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    lp = Loop(tmp_path)
    yield lp
    lp.service.stop(2.0)


@pytest.fixture
def servers() -> Iterator[list[DnsServer]]:
    with DnsServer() as a, DnsServer() as b:
        yield [a, b]


def requests(lp: Loop, server: str, kind: str = "static") -> float:
    """Parallel-mode A queries sent; for a sampled endpoint (results only), every query it was sent."""
    if kind == "endpoint":
        return sum(v for labels, v in lp.samples("dns_probe_endpoint_queries_total").items()
                   if ("server", server) in labels)
    return lp.get("dns_probe_requests_total", server=server, kind=kind, mode="parallel", qtype="A",
                  zone="cluster") or 0.0


def test_scrape_does_not_wait_for_a_slow_probe(loop: Loop, servers: list[DnsServer]) -> None:
    servers[0].set(silent=True)
    loop.targets.set("static", [Target(servers[0].host, servers[0].port, "static")])
    loop.service.start()
    time.sleep(0.1)
    start = time.perf_counter()
    loop.registry.get_sample_value("dns_probe_target_info", {})
    assert time.perf_counter() - start < 0.15, "the probe in flight waits 0.4 s; the scrape must not"


def test_removed_target_disappears_from_the_next_scrape(loop: Loop, servers: list[DnsServer]) -> None:
    a, b = (Target(s.host, s.port, "endpoint", pod=f"dns-{i}") for i, s in enumerate(servers))
    loop.targets.set("kubernetes", [a, b])
    loop.service.start()
    wait_for(lambda: requests(loop, a.server, "endpoint") >= 2 and requests(loop, b.server, "endpoint") >= 2)
    loop.targets.set("kubernetes", [a])  # a rollout replaced endpoint b
    assert all(("server", b.server) not in labels for name in ("dns_probe_endpoint_queries_total",
                                                                "dns_probe_target_info")
               for labels in loop.samples(name))
    assert requests(loop, a.server, "endpoint") >= 2
    # ... and the probe loop stops probing it within one interval.
    wait_for(lambda: loop.store.snapshot()[0].keys() == {(a.server, "endpoint")})
    time.sleep(2 * FAST["interval"])  # a lookup already in flight may still finish
    n = len(servers[1].logged())
    time.sleep(3 * FAST["interval"])
    assert len(servers[1].logged()) == n


def test_added_target_is_probed_within_one_interval(loop: Loop, servers: list[DnsServer]) -> None:
    a, b = (Target(s.host, s.port, "static") for s in servers)
    loop.targets.set("static", [a])
    loop.service.start()
    wait_for(lambda: requests(loop, a.server) >= 1)
    t0 = time.monotonic()
    loop.targets.set("static", [a, b])
    wait_for(lambda: requests(loop, b.server) >= 1)
    assert time.monotonic() - t0 < 2 * FAST["interval"] + 1.0


def test_concurrency_bound_is_per_target(tmp_path: Path) -> None:
    """Three targets answering after 0.3 s, two lookups each (parallel, tcp), one lookup in flight per target:
    each target's two lookups go out one answer delay apart, while the three targets start together (a
    shared bound would send them in waves). Jitter is off."""
    servers = [DnsServer(Behaviour(delay=0.3)) for _ in range(3)]
    for s in servers:
        s.__enter__()
    try:
        lp = Loop(tmp_path, concurrency=1, modes=("parallel", "tcp"), interval=30.0, jitter=0.0, timeout=2.0,
                  resolvers=())
        lp.targets.set("static", [Target(s.host, s.port, "static") for s in servers])
        lp.service.start()
        try:
            wait_for(lambda: all(len(s.logged()) >= 4 for s in servers))
        finally:
            lp.service.stop(2.0)
        firsts = sorted(min(q.at for q in s.logged()) for s in servers)
        assert firsts[2] - firsts[0] < 0.2, firsts
        for s in servers:
            by_transport = {t: min(q.at for q in s.logged() if q.transport == t) for t in ("udp", "tcp")}
            assert abs(by_transport["tcp"] - by_transport["udp"]) >= 0.25, by_transport
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def test_slow_targets_do_not_starve_a_healthy_one(tmp_path: Path) -> None:
    """Issue 13: five targets that never answer (each lookup holds 2 x 0.4 s) beside a healthy one, default
    concurrency. The healthy target is probed in (nearly) every round; the slow ones skip the rounds that
    come while their last probe still runs, and say so. With one shared bound of 8 lookups, the slow
    targets' 10 lookups held every slot and the healthy target got a fraction of its rounds."""
    slow = [DnsServer(Behaviour(silent=True)) for _ in range(5)]
    for s in slow:
        s.__enter__()
    try:
        with DnsServer() as ok:
            lp = Loop(tmp_path, timeout=0.4, attempts=2, interval=0.1, jitter=0.0)
            healthy = Target(ok.host, ok.port, "static")
            lp.targets.set("static", [healthy, *(Target(s.host, s.port, "static") for s in slow)])
            lp.service.start()
            try:
                wait_for(lambda: lp.service.rounds >= 3)
                r0, n0 = lp.service.rounds, requests(lp, healthy.server)
                # 20 rounds (2 s on time; counted in rounds, not seconds, so a loaded machine only slows it)
                wait_for(lambda: lp.service.rounds >= r0 + 20, timeout=30.0)
                r1, n1 = lp.service.rounds, requests(lp, healthy.server)
            finally:
                lp.service.stop(2.0)
        assert n1 - n0 >= 0.8 * (r1 - r0), (n1 - n0, r1 - r0)
        for s in slow:
            t = Target(s.host, s.port, "static")
            assert (lp.get("dns_probe_skipped_total", server=t.server, kind="static", reason="busy") or 0) >= 5
        assert lp.get("dns_probe_skipped_total", server=healthy.server, kind="static", reason="busy") is None
    finally:
        for s in slow:
            s.__exit__(None, None, None)


def test_sampled_endpoints_rotate_while_the_service_ip_is_probed_every_round(tmp_path: Path) -> None:
    """Six endpoints, two per round: the Service IP gets a probe every round, each endpoint about a third of
    them, and every endpoint at least one within three rounds' worth."""
    servers = [DnsServer() for _ in range(7)]
    for s in servers:
        s.__enter__()
    try:
        lp = Loop(tmp_path, modes=("parallel",), interval=0.1, jitter=0.0, endpoints_per_round=2, node="node-7")
        service = Target(servers[0].host, servers[0].port, "service")
        eps = [Target(s.host, s.port, "endpoint", pod=f"coredns-{i}") for i, s in enumerate(servers[1:])]
        lp.targets.set("kubernetes", [service, *eps])
        lp.service.start()
        try:
            wait_for(lambda: lp.service.rounds >= 2)
            r0 = lp.service.rounds
            base = {t.server: len(s.logged()) for t, s in zip([service, *eps], servers, strict=True)}
            time.sleep(3.0)
            r1 = lp.service.rounds
            got = {t.server: len(s.logged()) - base[t.server] for t, s in zip([service, *eps], servers, strict=True)}
        finally:
            lp.service.stop(2.0)
        rounds = r1 - r0
        assert rounds >= 20, rounds
        assert got[service.server] >= 2 * 0.9 * rounds, (got, rounds)  # A + AAAA every round
        for t in eps:
            assert 2 * 0.2 * rounds <= got[t.server] <= 2 * (rounds / 3 + 2), (t.server, got, rounds)
        # Endpoints keep only their result counters; the histogram stays on the Service IP.
        assert lp.get("dns_probe_duration_seconds_count", server=service.server, kind="service", mode="parallel")
        assert lp.get("dns_probe_duration_seconds_count", server=eps[0].server, kind="endpoint",
                      mode="parallel") is None
        assert (lp.get("dns_probe_endpoint_queries_total", server=eps[0].server, kind="endpoint", zone="cluster",
                   result="ok")
                or 0) >= 2
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def test_resolv_conf_is_the_fallback_only_while_nothing_else_is_configured(loop: Loop,
                                                                            servers: list[DnsServer],
                                                                            tmp_path: Path) -> None:
    (tmp_path / "resolv.conf").write_text("search default.svc.cluster.local\nnameserver 127.0.0.1\n"
                                          "options ndots:5\n")
    loop.service.start()
    wait_for(lambda: loop.get("dns_probe_target_info", server="127.0.0.1:53", kind="resolvconf", pod="") == 1)
    assert loop.get("dns_probe_resolv_conf_usable") == 1
    # The Kubernetes feature starts providing targets: resolv.conf's nameserver is dropped.
    k = Target(servers[0].host, servers[0].port, "service")
    loop.targets.set("kubernetes", [k])
    wait_for(lambda: loop.get("dns_probe_target_info", server="127.0.0.1:53", kind="resolvconf", pod="") is None)
    wait_for(lambda: loop.get("dns_probe_resolv_conf_usable") is None)  # the fallback is not in use
    wait_for(lambda: requests(loop, k.server, "service") >= 1)
    # ... and comes back when they are gone.
    loop.targets.set("kubernetes", [])
    wait_for(lambda: loop.get("dns_probe_target_info", server="127.0.0.1:53", kind="resolvconf", pod="") == 1)


def test_missing_resolv_conf_means_no_targets_not_a_crash(loop: Loop) -> None:
    loop.service.start()
    wait_for(lambda: loop.service.rounds >= 2)
    assert loop.samples("dns_probe_target_info") == {}
    assert loop.get("dns_probe_resolv_conf_usable") == 0, "nothing is probed: the metric must say so"
    assert loop.service._thread is not None and loop.service._thread.is_alive()


def test_resolv_conf_without_a_nameserver_is_reported_unusable_until_it_names_one(loop: Loop,
                                                                                   tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search cluster.local\noptions ndots:5\n")
    loop.service.start()
    wait_for(lambda: loop.service.rounds >= 2)
    assert loop.get("dns_probe_resolv_conf_usable") == 0
    conf.write_text("nameserver 127.0.0.1\n")
    wait_for(lambda: loop.get("dns_probe_resolv_conf_usable") == 1)


def test_nodelocal_is_probed_only_while_it_answers(loop: Loop, servers: list[DnsServer]) -> None:
    s = servers[0]
    t = Target(s.host, s.port, "nodelocal")
    loop.targets.set("nodelocal", [t])
    loop.service.start()
    wait_for(lambda: loop.get("dns_probe_nodelocal_present", server=t.server) == 1)
    wait_for(lambda: requests(loop, t.server, "nodelocal") >= 1)
    assert loop.get("dns_probe_target_info", server=t.server, kind="nodelocal", pod="") == 1
    s.set(silent=True)  # NodeLocal DNSCache removed from the node
    wait_for(lambda: loop.get("dns_probe_nodelocal_present", server=t.server) == 0, timeout=10)
    assert loop.get("dns_probe_target_info", server=t.server, kind="nodelocal", pod="") is None
    assert loop.get("dns_probe_failures_total", server=t.server, kind="nodelocal", mode="parallel", qtype="A",
                    zone="cluster", reason="timeout") in (None, 0.0, 1.0), "an absent cache is not a stream of failures"


def test_search_walk_counts_the_ndots_amplification(tmp_path: Path) -> None:
    # A pod's resolv.conf: ndots:5 and three search domains. `api.example.com` has two dots, so glibc
    # tries every search domain first (NXDOMAIN each) and the name as is last: 4 names, 8 queries.
    with DnsServer(Behaviour(names=("api.example.com.",))) as s:
        (tmp_path / "resolv.conf").write_text(
            "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n"
            "options ndots:5\n")
        # One walk per name: no jitter (both walks run at once, at the first round) and a long interval, so
        # the next grid round (which can follow the off-grid first one closely) does not walk them again.
        lp = Loop(tmp_path, search_names=("api.example.com", "api.example.com."), search_port=s.port,
                  interval=3600.0, jitter=0.0)
        lp.service.start()
        try:
            wait_for(lambda: len(lp.samples("dns_probe_search_queries")) == 2)
        finally:
            lp.service.stop(2.0)
        assert lp.get("dns_probe_search_queries", name="api.example.com") == 8
        assert lp.get("dns_probe_search_queries", name="api.example.com.") == 2
        assert 0 < (lp.get("dns_probe_search_duration_seconds", name="api.example.com") or 0) < 1
        asked = [q.qtype for q in s.logged()]
        assert asked.count("A") == asked.count("AAAA") == 5


def test_cardinality_budget_with_five_failing_targets(tmp_path: Path) -> None:
    """Defaults (parallel,tcp; resolvers glibc,musl; one name), 5 targets, every query timing out: at most
    420 series (docs/metrics.md: 77 per target healthy, +4 in a typical incident)."""
    with DnsServer(Behaviour(silent=True)) as s:
        lp = Loop(tmp_path, timeout=0.05, attempts=1, interval=0.1, jitter=0.0)
        lp.targets.set("static", [Target(s.host, s.port + i, "static") for i in range(5)])
        lp.service.start()
        try:
            wait_for(lambda: len(lp.samples("dns_probe_failures_total")) >= 5 * 4)
        finally:
            lp.service.stop(2.0)
    total = sum(len(fam.samples) for fam in lp.registry.collect())
    assert total <= 420, total


# The real exporter process ----------------------------------------------------------------------------



def walk(name: str, conf: resolvconf.ResolvConf, answers: dict[str, str]) -> list[str]:
    async def ask(candidate: str) -> str:
        return answers.get(candidate, "nxdomain")

    return asyncio.run(resolvconf.search(name, conf, ask)).names


def test_search_walk_order_matches_glibc_res_search() -> None:
    conf = resolvconf.ResolvConf(search=["a.svc.", "svc"], ndots=2)
    # Fewer dots than ndots: search list first, as-is last.
    assert walk("web", conf, {}) == ["web.a.svc.", "web.svc.", "web."]
    # Enough dots: as-is first; found there, nothing else.
    assert walk("x.y.z", conf, {"x.y.z.": "ok"}) == ["x.y.z."]
    # Enough dots but not found: then the search list, and no second as-is.
    assert walk("x.y.z", conf, {}) == ["x.y.z.", "x.y.z.a.svc.", "x.y.z.svc."]
    # Trailing dot: as is only.
    assert walk("web.", conf, {}) == ["web."]
    # SERVFAIL and NODATA move on; a timeout ends the search list but glibc still tries as is.
    assert walk("web", conf, {"web.a.svc.": "servfail", "web.svc.": "ok"}) == ["web.a.svc.", "web.svc."]
    assert walk("web", conf, {"web.a.svc.": "error"}) == ["web.a.svc.", "web."]
    # The root in the search list replaces the final as-is query.
    assert walk("web", resolvconf.ResolvConf(search=["."], ndots=1), {}) == ["web."]


def test_resolvconf_parse_follows_glibc() -> None:
    rc = resolvconf.parse("# comment\ndomain a.example\nsearch b.example c.example\nnameserver 10.0.0.1\n"
                          "nameserver fe80::1%eth0\nnameserver bogus\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"
                          "options ndots:5 timeout:1 attempts:3 single-request-reopen\n")
    assert rc.nameservers == ["10.0.0.1", "fe80::1", "10.0.0.2"]  # at most three, bad ones skipped
    assert rc.search == ["b.example", "c.example"]  # the last of domain/search wins
    assert (rc.ndots, rc.timeout, rc.attempts, rc.mode) == (5, 1.0, 3, "sequential")
    assert resolvconf.parse("options use-vc\n").mode == "tcp"
    assert resolvconf.parse("").mode == "parallel"


def test_resolver_models_count_application_outcomes(tmp_path: Path) -> None:
    """A server that never answers AAAA: glibc's application gets A only (partial) after three budgets,
    musl's gets nothing (failed) after its timeout; both show up per resolver in the new families."""
    with DnsServer(Behaviour(only="A")) as s:
        lp = Loop(tmp_path, timeout=0.1, attempts=2, interval=0.1, jitter=0.0, resolvers=("glibc", "musl"))
        lp.targets.set("static", [Target(s.host, s.port, "static")])
        lp.service.start()
        labels = {"server": f"{s.host}:{s.port}", "kind": "static"}
        try:
            wait_for(lambda: (lp.get("dns_probe_lookups_total", **labels, resolver="glibc", result="partial") or 0) >= 1
                     and (lp.get("dns_probe_lookups_total", **labels, resolver="musl", result="failed") or 0) >= 1)
        finally:
            lp.service.stop(2.0)
    assert lp.get("dns_probe_lookups_total", **labels, resolver="glibc", result="ok") == 0
    assert lp.get("dns_probe_lookups_total", **labels, resolver="musl", result="partial") == 0
    # glibc waited 3 x 0.1 s (pair, single-request, single-request-reopen), musl 0.1 s: both below 1 s here
    assert lp.get("dns_probe_lookup_duration_seconds_bucket", **labels, resolver="glibc", le="0.5") >= 1
    # the parallel mode re-sent the lost AAAA alone: lone queries lost, the race fingerprint's reference
    assert (lp.get("dns_probe_lone_queries_total", **labels, result="lost") or 0) >= 1


def test_a_round_right_after_a_probe_began_is_not_counted_busy(tmp_path: Path) -> None:
    """The first round starts when the service does, off this node's round grid, so the next grid round
    can follow it by milliseconds while the target's probe is still out: that is not a missed round, and
    a healthy target must not show `reason="busy"` skips. A round half an interval later that still finds
    the probe running is one. Rounds are driven by hand against a server that answers after 1 s."""
    with DnsServer(Behaviour(delay=1.0)) as slow:
        lp = Loop(tmp_path, timeout=3.0, attempts=1, interval=0.4, jitter=0.0, modes=("parallel",))
        target = Target(slow.host, slow.port, "static")
        lp.targets.set("static", [target])
        busy = {"server": target.server, "kind": "static", "reason": "busy"}

        async def drive() -> tuple[float | None, float | None]:
            running: dict[object, asyncio.Task[None]] = {}
            lp.service.round(running, 0)
            await asyncio.sleep(0.01)
            lp.service.round(running, 1)  # 10 ms later: the probe of round 0 is out
            soon = lp.get("dns_probe_skipped_total", **busy)
            await asyncio.sleep(0.3)
            lp.service.round(running, 2)  # 0.31 s later (> interval / 2): still out, a skipped round
            later = lp.get("dns_probe_skipped_total", **busy)
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            return soon, later

        soon, later = asyncio.run(drive())
    assert soon is None
    assert later == 1
