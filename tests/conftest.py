from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab import Lab, missing_binaries
from tests.support.netns import Netns, skip_reason

# The DNS probes are on by default and, with nothing else configured, probe the nameservers of
# /etc/resolv.conf: outside any namespace a test creates. Every exporter a test starts (in-process or as
# a subprocess, which inherits this environment) therefore has them off unless the test turns them on
# with --collector.dns and names its own targets.
os.environ.setdefault("CONNTRACK_DNS_EXPORTER_COLLECTOR_DNS", "false")


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace (its own conntrack table), deleted afterwards."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """One lab (tests/lab, docs/lab.md) for the whole session: pod -> node (DNAT) -> 2 dnsmasq backends ->
    unbound upstream, plus NodeLocal DNSCache. Torn down at session end, also when tests fail."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    missing = missing_binaries()
    if missing:
        pytest.skip(f"the lab needs {', '.join(missing)} (scripts/bootstrap.sh installs them)")
    the_lab = Lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def healthy_lab(lab: Lab) -> Iterator[Lab]:
    """The session lab, every fault healed after the test."""
    try:
        yield lab
    finally:
        lab.heal_all()
