"""diagnose's NodeLocal presence check against the in-process DNS server: packet loss must not be taken for a
NodeLocal DNSCache that is down (the lab's 30 % loss fault was once named NodeLocalDNSCacheDown)."""

from __future__ import annotations

import asyncio

from exporter.diagnose.checks import _nodelocal_answers
from exporter.discovery import Target
from tests.support.dnsserver import Behaviour, DnsServer


def test_a_nodelocal_that_answers_one_query_in_four_is_present() -> None:
    # Seed 3 loses the first 7 queries and answers the 8th: the old three sequential tries (6 queries) said
    # "does not answer"; the first round now sends 6 at once and the second round gets an answer.
    with DnsServer(Behaviour(loss=0.75, seed=3)) as s:
        assert asyncio.run(_nodelocal_answers(Target(s.host, s.port, "nodelocal"), "kubernetes.default.svc")) is True


def test_a_silent_nodelocal_is_absent() -> None:
    with DnsServer(Behaviour(silent=True)) as s:
        assert asyncio.run(_nodelocal_answers(Target(s.host, s.port, "nodelocal"), "kubernetes.default.svc")) is False
        assert len(s.queries) == 18  # 3 rounds of 3 lookups of A and AAAA
