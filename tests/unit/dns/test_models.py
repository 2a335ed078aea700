"""The resolver models (exporter/dns/models) against the in-process DNS server: the waits and results
the libraries' source implies (the real libraries themselves: tests/integration/test_resolver_models.py)."""

from __future__ import annotations

import asyncio
import time

import dns.rcode
import pytest

from exporter.dns.models import GlibcState, Lookup, ResolverOptions, run
from tests.support.dnsserver import Behaviour, DnsServer

T = 0.2
OPTS = ResolverOptions(timeout=T, attempts=2, vc_limit=1.0)


def lookup(s: DnsServer, resolver: str, state: GlibcState | None = None, opts: ResolverOptions = OPTS) -> Lookup:
    return asyncio.run(run(resolver, [(s.host, s.port)], "x.example.", opts, state))


@pytest.mark.parametrize("resolver", ["glibc", "glibc-single-request", "glibc-single-request-reopen",
                                      "glibc-use-vc", "musl"])
def test_healthy_lookup_is_ok_at_once(resolver: str) -> None:
    with DnsServer() as s:
        r = lookup(s, resolver)
    assert r.result == "ok" and r.duration < T and r.sent == 2


def test_glibc_half_answer_costs_three_budgets_and_returns_one_family() -> None:
    with DnsServer(Behaviour(only="A")) as s:
        state = GlibcState()
        r = lookup(s, "glibc", state)
        ports = {q.src[1] for q in s.logged("udp")}
    # pair (budget 1), single-request on the same socket (2), single-request-reopen on new ones (3)
    assert r.result == "partial" and 3 * T <= r.duration < 4 * T
    assert r.sent == 6 and len(ports) == 3
    assert state.single_request and state.single_request_reopen  # sticky for the process


def test_musl_never_returns_one_family_and_resends_at_half_the_timeout() -> None:
    with DnsServer(Behaviour(only="A")) as s:
        r = lookup(s, "musl")
        aaaa = [q.at for q in s.logged("udp") if q.qtype == "AAAA"]
    assert r.result == "failed" and T <= r.duration < T + 0.1
    assert len(aaaa) == 2 and abs((aaaa[1] - aaaa[0]) - T / 2) < 0.05
    assert len({q.src[1] for q in s.logged("udp")}) == 1  # one socket for the lookup


def test_glibc_total_loss_waits_attempts_times_timeout_on_one_socket() -> None:
    with DnsServer(Behaviour(silent=True)) as s:
        r = lookup(s, "glibc")
        ports = {q.src[1] for q in s.logged("udp")}
    assert r.result == "failed" and 2 * T <= r.duration < 2 * T + 0.1 and len(ports) == 1


def test_sticky_state_starts_the_next_lookup_in_single_request_reopen() -> None:
    with DnsServer() as s:
        state = GlibcState(single_request=True, single_request_reopen=True)
        r = lookup(s, "glibc-sticky", state)
        log = s.logged("udp")
    assert r.result == "ok"
    assert [q.qtype for q in log] == ["A", "AAAA"] and log[0].src[1] != log[1].src[1]


def test_glibc_refused_port_fails_fast_with_a_new_socket_per_try() -> None:
    with DnsServer() as s:
        port = s.port
    r = asyncio.run(run("glibc", [("127.0.0.1", port)], "x.example.", OPTS))
    assert r.result == "failed" and r.duration < T and r.error == "ECONNREFUSED"


def test_lame_replies_end_each_glibc_try_at_once() -> None:
    """The test server's TC replies carry no records and neither AA nor RA: glibc's lame-server check
    (before the TC check) ends both tries at once (real glibc 2.36 measured: 1.7 ms, no TCP)."""
    with DnsServer(Behaviour(truncate=True)) as s:
        r = lookup(s, "glibc")
        tcp = s.logged("tcp")
    assert r.result == "failed" and r.duration < T and r.sent == 4 and not tcp


def test_nxdomain_is_a_final_answer_but_no_address() -> None:
    with DnsServer(Behaviour(rcode=dns.rcode.NXDOMAIN)) as s:
        for resolver in ("glibc", "musl"):
            r = lookup(s, resolver)
            assert r.result == "failed" and r.duration < T, (resolver, r)


def test_musl_asks_every_nameserver_at_once_and_takes_the_first_answer() -> None:
    with DnsServer(Behaviour(silent=True)) as dead, DnsServer() as live:
        servers = [(dead.host, dead.port), (live.host, live.port)]
        r = asyncio.run(run("musl", servers, "x.example.", OPTS))
        assert r.result == "ok" and r.duration < T / 2
        # the dead one was asked too (its server thread may log the datagrams a moment after the answer)
        deadline = time.monotonic() + 2.0
        while {q.qtype for q in dead.logged("udp")} != {"A", "AAAA"} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {q.qtype for q in dead.logged("udp")} == {"A", "AAAA"}


def test_glibc_turns_to_the_next_nameserver_after_the_first_ones_budget() -> None:
    opts = ResolverOptions(timeout=0.2, attempts=2)
    with DnsServer(Behaviour(silent=True)) as dead, DnsServer() as live:
        servers = [(dead.host, dead.port), (live.host, live.port)]
        r = asyncio.run(run("glibc", servers, "x.example.", opts))
        first_live = min(q.at for q in live.logged("udp"))
        first_dead = min(q.at for q in dead.logged("udp"))
    assert r.result == "ok" and 0.2 <= r.duration < 0.3
    assert 0.19 <= first_live - first_dead < 0.25
