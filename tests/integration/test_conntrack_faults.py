"""Faults the exporter must survive: no CAP_NET_ADMIN, no ctnetlink, and many scrapes (no leaks).

Runs the real exporter process in a fresh network namespace; needs root (to create the namespace and to
drop privileges in controlled ways). Skipped elsewhere with the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from exporter.conntrack.stats import NetlinkStatsSource
from tests.support.exporter_proc import Exporter, value
from tests.support.netns import Netns, in_netns

pytestmark = pytest.mark.netns

PRIVILEGE_DROPS = {
    # root, but with CAP_NET_ADMIN removed from the bounding set before exec (so not effective)
    "root-without-cap-net-admin": ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"],
    # an ordinary user (nobody)
    "unprivileged-user": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
}


@pytest.mark.parametrize("mode", sorted(PRIVILEGE_DROPS))
def test_without_cap_net_admin_it_serves_and_says_why(netns: Netns, mode: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop the capability")
    with Exporter(["--no-collector.table"] if _has_flag("--collector.table") else [], netns=netns,
                  preexec=PRIVILEGE_DROPS[mode]) as exp:
        scrapes = [exp.scrape() for _ in range(5)]
        log = exp.stderr()
    last = scrapes[-1]
    assert value(last, "conntrack_dns_exporter_collector_success", collector="conntrack") == 0
    assert value(last, "conntrack_dns_exporter_collector_errors_total", collector="conntrack", reason="permission") == 5
    assert value(last, "conntrack_entries") is None  # nothing made up
    assert (value(last, "conntrack_buckets") or 0) > 0  # what needs no privilege is still served
    lines = [ln for ln in log.splitlines() if "collector=conntrack" in ln and "level=warn" in ln]
    assert len(lines) == 1, log  # one line, not one per scrape
    assert "CAP_NET_ADMIN" in lines[0] and "permission denied" in lines[0]
    assert "Traceback" not in log


def test_without_ctnetlink_the_error_says_what_to_load(netns: Netns) -> None:
    """The kernel's answer for an nfnetlink subsystem nobody registered, as on a node without
    nf_conntrack_netlink (the module is built in here, so an unused subsystem id stands in for it)."""
    src = NetlinkStatsSource(subsys=15)
    with pytest.raises(Exception) as info:
        in_netns(netns.name, src.sample)
    err = info.value
    assert getattr(err, "reason", None) == "unavailable"
    assert "nf_conntrack_netlink" in str(err)


@pytest.mark.slow
def test_ten_thousand_scrapes_leak_nothing(netns: Netns) -> None:
    args = ["--no-collector.table"] if _has_flag("--collector.table") else []
    with Exporter(args, netns=netns) as exp:
        pid = _exporter_pid(exp)
        for _ in range(500):  # warm-up: caches, allocator arenas
            exp.keepalive_scrape()
        fds0, rss0 = _fds(pid), _rss_kib(pid)
        t0 = time.monotonic()
        for i in range(10_000):
            if i % 1000 == 0:  # a fresh connection now and then, as after a Prometheus restart
                exp.scrape()
            exp.keepalive_scrape()
        elapsed = time.monotonic() - t0
        fds1, rss1 = _fds(pid), _rss_kib(pid)
        s = exp.keepalive_scrape()
    assert value(s, "conntrack_dns_exporter_collector_success", collector="conntrack") == 1
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 4096, f"RSS grew {rss1 - rss0} KiB over 10,000 scrapes ({elapsed:.1f} s)"


def _has_flag(flag: str) -> bool:
    from exporter.cli import build_parser

    return any(flag in a.option_strings for a in build_parser()._actions)


def _exporter_pid(exp: Exporter) -> int:
    """The python process under `ip netns exec` (which execs, so it is the same pid)."""
    return exp.proc.pid


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
