"""The probes against an in-process DNS server that misbehaves on purpose (tests/support/dnsserver.py).

Each test runs real lookups over loopback UDP/TCP, records them in a `ProbeStore`, and asserts on what
a scrape of the `dns` collector shows (fresh registry, `get_sample_value`): the metric contract a user
sees. Timeouts are 0.2 s so the retry plateaus are short.
"""

from __future__ import annotations

import asyncio
import os
import socket

import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.registry import CollectorRegistry

from exporter.discovery.targets import Target, TargetRegistry
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.resolver import ProbeResult, lookup
from exporter.dns.store import ProbeStore
from tests.support.dnsserver import DnsServer

TIMEOUT = 0.2
NAME = "kubernetes.default.svc.cluster.local."
MODES = ("parallel", "sequential", "tcp")


class Probe:
    """A target registry with one static target, a store, and the collector on a fresh registry."""

    def __init__(self, host: str, port: int) -> None:
        self.target = Target(host, port, "static")
        self.targets = TargetRegistry()
        self.targets.set("static", [self.target])
        self.store = ProbeStore()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DnsProbeCollector(self.store, self.targets))  # type: ignore[arg-type]
        self.store.ensure(self.key, MODES)

    @property
    def key(self) -> tuple[str, str]:
        return (self.target.server, self.target.kind)

    def run(self, mode: str, attempts: int = 2, timeout: float = TIMEOUT, name: str = NAME) -> ProbeResult:
        r = asyncio.run(lookup(self.target.host, self.target.port, name, mode, timeout, attempts))
        self.store.record(self.key, r, name)
        return r

    def value(self, metric: str, **labels: str) -> float | None:
        if metric in ("dns_probe_requests_total", "dns_probe_retries_total", "dns_probe_failures_total"):
            labels = {"zone": "cluster", **labels}  # NAME is inside the cluster domain
        return self.registry.get_sample_value(metric, {"server": self.target.server, "kind": "static", **labels})

    def failures(self, mode: str, qtype: str, reason: str) -> float | None:
        return self.value("dns_probe_failures_total", mode=mode, qtype=qtype, reason=reason)

    def failure_reasons(self) -> set[tuple[str, str, str]]:
        out = set()
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == "dns_probe_failures_total" and s.value > 0:
                    out.add((s.labels["mode"], s.labels["qtype"], s.labels["reason"]))
        return out

    def count(self, mode: str) -> float | None:
        return self.value("dns_probe_duration_seconds_count", mode=mode)

    def seconds(self, mode: str) -> float:
        return self.value("dns_probe_duration_seconds_sum", mode=mode) or 0.0


@pytest.fixture
def server() -> DnsServer:
    with DnsServer() as s:
        yield s


@pytest.fixture
def probe(server: DnsServer) -> Probe:
    return Probe(server.host, server.port)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", MODES)
def test_answer_counts_one_request_per_type_and_no_failure(probe: Probe, mode: str) -> None:
    r = probe.run(mode)
    assert r.ok
    for qt in ("A", "AAAA"):
        assert probe.value("dns_probe_requests_total", mode=mode, qtype=qt) == 1
        assert probe.value("dns_probe_retries_total", mode=mode, qtype=qt) == 0
    assert probe.failure_reasons() == set()
    assert probe.count(mode) == 1
    assert probe.seconds(mode) < TIMEOUT
    assert probe.value("dns_probe_duration_seconds_bucket", mode=mode, le="0.1") == 1
    assert probe.value("dns_probe_target_info", pod="") == 1


def test_parallel_sends_a_and_aaaa_back_to_back_from_one_port(server: DnsServer, probe: Probe) -> None:
    probe.run("parallel")
    a, aaaa = server.logged("udp")
    assert (a.qtype, aaaa.qtype) == ("A", "AAAA")
    assert a.src == aaaa.src, "the pair must share one socket (one conntrack entry), like glibc"
    assert aaaa.at - a.at < 0.05
    assert a.id != aaaa.id


def test_sequential_uses_a_fresh_socket_per_query(server: DnsServer, probe: Probe) -> None:
    probe.run("sequential")
    a, aaaa = server.logged("udp")
    assert (a.qtype, aaaa.qtype) == ("A", "AAAA")
    assert a.src[1] != aaaa.src[1]


def test_tcp_sends_both_queries_on_one_connection(server: DnsServer, probe: Probe) -> None:
    probe.run("tcp")
    assert server.logged("udp") == []
    a, aaaa = server.logged("tcp")
    assert a.src == aaaa.src


@pytest.mark.parametrize("rcode,reason", [(dns.rcode.SERVFAIL, "servfail"), (dns.rcode.NXDOMAIN, "nxdomain"),
                                          (dns.rcode.REFUSED, "refused"), (dns.rcode.FORMERR, "formerr")])
@pytest.mark.parametrize("mode", MODES)
def test_error_rcodes_are_failures_with_their_reason(server: DnsServer, probe: Probe, mode: str, rcode: int,
                                                     reason: str) -> None:
    server.set(rcode=rcode)
    probe.run(mode)
    assert probe.failure_reasons() == {(mode, "A", reason), (mode, "AAAA", reason)}
    assert len(server.logged()) == 2, "an error rcode is final, not retransmitted"


@pytest.mark.parametrize("mode,expected_wait", [("parallel", 2 * TIMEOUT), ("sequential", 4 * TIMEOUT),
                                                ("tcp", 2 * TIMEOUT)])
def test_silence_times_out_after_every_attempt(server: DnsServer, probe: Probe, mode: str,
                                               expected_wait: float) -> None:
    server.set(silent=True)
    probe.run(mode, attempts=2)
    assert probe.failures(mode, "A", "timeout") == 1
    assert probe.failures(mode, "AAAA", "timeout") == 1
    assert expected_wait <= probe.seconds(mode) < expected_wait + 0.3
    assert len(server.logged()) == 4, "each query is sent once per attempt"
    if mode == "parallel":
        assert len({q.src for q in server.logged()}) == 1, "retransmissions reuse the socket, like glibc"
        assert probe.value("dns_probe_partial_pairs_total", lost_qtype="A") == 0
        assert probe.value("dns_probe_partial_pairs_total", lost_qtype="AAAA") == 0


@pytest.mark.parametrize("answered,lost", [("A", "AAAA"), ("AAAA", "A")])
def test_half_answered_parallel_pair_counts_a_partial_pair(server: DnsServer, probe: Probe, answered: str,
                                                           lost: str) -> None:
    server.set(only=answered)
    probe.run("parallel")
    assert probe.value("dns_probe_partial_pairs_total", lost_qtype=lost) == 1
    assert probe.value("dns_probe_partial_pairs_total", lost_qtype=answered) == 0
    assert probe.failure_reasons() == {("parallel", lost, "timeout")}
    # Only the missing query is retransmitted.
    assert [q.qtype for q in server.logged()].count(answered) == 1
    assert [q.qtype for q in server.logged()].count(lost) == 2


def test_partial_pairs_are_a_parallel_mode_fingerprint_only(server: DnsServer, probe: Probe) -> None:
    server.set(only="A")
    probe.run("sequential")
    probe.run("tcp")
    assert probe.value("dns_probe_partial_pairs_total", lost_qtype="AAAA") == 0
    assert probe.failures("sequential", "AAAA", "timeout") == 1
    assert probe.failures("tcp", "AAAA", "timeout") == 1


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_answer_only_after_retransmission_counts_a_retry_and_waits_one_timeout(server: DnsServer, probe: Probe,
                                                                               mode: str) -> None:
    server.set(ignore_first=1)
    r = probe.run(mode)
    assert r.ok
    assert probe.failure_reasons() == set()
    assert probe.value("dns_probe_retries_total", mode=mode, qtype="A") == 1
    assert probe.value("dns_probe_retries_total", mode=mode, qtype="AAAA") == 1
    per_query_waits = 1 if mode == "parallel" else 2  # sequential waits a timeout for each query
    assert per_query_waits * TIMEOUT <= probe.seconds(mode) < per_query_waits * TIMEOUT + 0.3
    if mode == "parallel":
        # The first attempt got nothing back at all: not the half-answered pair of the race.
        assert probe.value("dns_probe_partial_pairs_total", lost_qtype="A") == 0


def test_aaaa_answered_only_after_retransmission_is_the_race_signature(server: DnsServer, probe: Probe) -> None:
    # A answered at once, AAAA lost once and answered after the retransmission: what an application
    # sees when the conntrack insert race drops one packet of the pair.
    server.set(ignore_first=1, ignore_qtype="AAAA")
    r = probe.run("parallel")
    assert r.ok
    assert probe.failure_reasons() == set()
    assert probe.value("dns_probe_partial_pairs_total", lost_qtype="AAAA") == 1
    assert probe.value("dns_probe_retries_total", mode="parallel", qtype="AAAA") == 1
    assert probe.value("dns_probe_retries_total", mode="parallel", qtype="A") == 0
    assert TIMEOUT <= probe.seconds("parallel") < TIMEOUT + 0.3


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_truncated_answer_is_retried_over_tcp(server: DnsServer, probe: Probe, mode: str) -> None:
    server.set(truncate=True)
    r = probe.run(mode)
    assert r.ok
    assert probe.failure_reasons() == set()
    assert sorted(q.qtype for q in server.logged("tcp")) == ["A", "AAAA"]
    assert len(server.logged("udp")) == 2, "no UDP retransmission: the TC answer was an answer"


def test_truncated_answer_with_tcp_refused_fails_as_truncated(server: DnsServer, probe: Probe) -> None:
    server.set(truncate=True, tcp=False)
    probe.run("parallel")
    assert probe.failure_reasons() == {("parallel", "A", "truncated"), ("parallel", "AAAA", "truncated")}


@pytest.mark.parametrize("fault", ["wrong_id", "wrong_question", "other_port", "other_address"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_stray_replies_are_ignored_and_counted_as_mismatch(server: DnsServer, probe: Probe, mode: str,
                                                           fault: str) -> None:
    server.set(**{fault: True})
    r = probe.run(mode)
    assert r.ok, "the real answer after the stray one must still be accepted"
    reasons = probe.failure_reasons()
    assert reasons and all(reason == "mismatch" for _, _, reason in reasons)
    total = sum(probe.failures(mode, qt, "mismatch") or 0 for qt in ("A", "AAAA"))
    assert total == 2, "one stray reply per query"
    assert len(server.logged()) == 2, "no retransmission: the real answer right after was taken"


def test_tcp_reply_with_wrong_id_is_ignored(server: DnsServer, probe: Probe) -> None:
    server.set(wrong_id=True)
    r = probe.run("tcp")
    assert r.ok
    assert sum(probe.failures("tcp", qt, "mismatch") or 0 for qt in ("A", "AAAA")) == 2


@pytest.mark.parametrize("mode", MODES)
def test_closed_port_is_a_network_failure_at_once(mode: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = Probe("127.0.0.1", port)
    probe.run(mode)
    # ICMP port unreachable (TCP: reset) ends each attempt at once, as ECONNREFUSED does in glibc.
    assert probe.failure_reasons() == {(mode, "A", "network"), (mode, "AAAA", "network")}
    assert probe.seconds(mode) < 2 * TIMEOUT


def test_no_socket_leak_over_many_faulty_lookups(server: DnsServer, probe: Probe) -> None:
    probe.run("parallel")  # warm up lazily opened resources (event loop selector etc.)
    before = open_fds()
    for behaviour in ({"silent": True}, {"truncate": True}, {"wrong_id": True}, {"only": "A"}):
        server.set(**behaviour)
        for mode in MODES:
            probe.run(mode, timeout=0.05)
    server.wait_idle()  # the server's side of closed TCP connections is not the prober's
    assert open_fds() == before
    server.set(truncate=True, tcp=False)  # closes the server's own TCP listener: a new baseline
    before = open_fds()
    for mode in MODES:
        probe.run(mode, timeout=0.05)
    server.wait_idle()
    assert open_fds() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=3), real=st.booleans(),
       keep_header=st.booleans())
def test_random_reply_bytes_never_escape_or_leak(server: DnsServer, probe: Probe, payloads: list[bytes],
                                                 real: bool, keep_header: bool) -> None:
    def extra(q: object, wire: bytes) -> list[bytes]:
        # Half the time keep the query's id and flags, so the garbage reaches the question matching.
        return [wire[:2] + b"\x81\x80" + p if keep_header else p for p in payloads]

    server.set(extra=extra, suppress_answer=not real)
    before = open_fds()

    async def probe_and_count_tasks() -> tuple[ProbeResult, int]:
        result = await lookup(server.host, server.port, NAME, "parallel", 0.05, 1)
        return result, len(asyncio.all_tasks())

    r, tasks = asyncio.run(probe_and_count_tasks())
    assert tasks == 1, "a lookup must not leave tasks behind"
    server.wait_idle()
    assert open_fds() == before
    if real:
        assert r.ok
    else:
        assert not r.ok
        assert {o.reason for o in r.outcomes.values()} <= {"timeout", "servfail", "nxdomain", "refused",
                                                           "formerr", None}
