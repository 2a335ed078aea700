"""Issue 8: `--web.notrack` install/remove and SIGTERM shutdown, with the real exporter process and the real
`nft` binary, each in a namespace of its own (nothing touches the machine's own ruleset).

What a user would notice: a rollout that waits for the grace period (exit slower than 2 s), a NOTRACK table
left behind after the pod is gone (or two after a crash-restart), an exporter that starts "fine" without the
exemption it was asked for.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time

import pytest

from tests.support.exporter_proc import Exporter, value
from tests.support.netns import Netns
from tests.support.scrapeload import blackhole
from tests.support.sockets import closed_within

pytestmark = pytest.mark.netns

TABLE = ("inet", "conntrack_dns_exporter_notrack")


@pytest.fixture(autouse=True)
def _need_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (`nft`) for --web.notrack")


def _ruleset(ns: Netns) -> str:
    return ns.exec(["nft", "list", "ruleset"]).stdout


def _wait_exit(e: Exporter, timeout: float) -> float:
    t0 = time.monotonic()
    e.proc.wait(timeout)
    return time.monotonic() - t0


def test_sigterm_exits_within_2s_closes_connections_and_removes_table(netns: Netns) -> None:
    blackhole(netns)
    # DNS probes in flight at SIGTERM: every lookup is waiting in a 5 s timeout when the signal comes.
    probes = ["--collector.dns", "--probe.timeout=5s", "--probe.interval=200ms",
              *[f"--probe.server=10.98.0.{i}" for i in range(2, 12)]]
    e = Exporter(["--web.notrack", *probes], netns=netns)
    try:
        e.wait_ready()
        time.sleep(0.5)
        assert "dns_probe_requests_total" in e.get("/metrics")[2].decode(), "probes not running"
        rules = _ruleset(netns)
        assert f"table {TABLE[0]} {TABLE[1]}" in rules and f"tcp dport {e.port} notrack" in rules, rules
        assert f"tcp sport {e.port} notrack" in rules, rules
        # An open keep-alive scrape connection and a client that connected and sent nothing.
        conn = e.connect()
        conn.request("GET", "/metrics")
        conn.getresponse().read()
        silent = netns.socket()
        silent.connect(("127.0.0.1", e.port))
        silent.settimeout(3)

        t0 = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)
        assert conn.sock is not None
        conn.sock.settimeout(3)
        assert conn.sock.recv(1) == b"", "keep-alive connection not closed on SIGTERM"
        e.proc.wait(5)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"exit took {elapsed:.2f}s after SIGTERM"
        assert e.proc.returncode == 0, e.stderr()
        assert closed_within(silent, 3), "silent connection left open"
        silent.close()
        conn.close()
        assert TABLE[1] not in _ruleset(netns), "NOTRACK table left behind after SIGTERM"
        assert "conntrack exemption removed" in e.stderr()
    finally:
        e.stop()


def test_restart_after_crash_replaces_leftover_table_and_sigint_removes_it(netns: Netns) -> None:
    first = Exporter(["--web.notrack"], netns=netns, port=19211)
    first.wait_ready()
    first.stop(signal.SIGKILL)  # a crash: no cleanup ran
    assert "tcp dport 19211 notrack" in _ruleset(netns)

    second = Exporter(["--web.notrack"], netns=netns, port=19212)
    try:
        second.wait_ready()
        rules = _ruleset(netns)
        assert rules.count(f"table {TABLE[0]} {TABLE[1]}") == 1, rules
        assert "dport 19212" in rules and "19211" not in rules, rules
        second.proc.send_signal(signal.SIGINT)
        assert _wait_exit(second, 5) < 2.0
        assert second.proc.returncode == 0
        assert TABLE[1] not in _ruleset(netns)
    finally:
        second.stop()


def test_notrack_without_cap_net_admin_serves_without_the_table_and_says_why(netns: Netns) -> None:
    """No NET_ADMIN at all (a policy removed it): nothing that needs it can work, so the exporter serves what
    it can with the rule gauge at 0 instead of crash-looping, and one line says why. A failing nft while
    NET_ADMIN is there still exits 2 (next test)."""
    with Exporter(["--web.notrack", "--no-collector.conntrack"], netns=netns,
                  preexec=["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]) as e:
        samples = e.scrape()
        err = e.stderr()
    assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 0.0
    lines = [ln for ln in err.splitlines() if "--web.notrack" in ln]
    assert len(lines) == 1 and "not permitted" in lines[0] and "bounding set" in lines[0], err
    assert TABLE[1] not in _ruleset(netns)


def test_notrack_without_nft_binary_exits_2_with_one_line(netns: Netns) -> None:
    e = Exporter(["--web.notrack"], netns=netns, preexec=["env", "PATH=/nonexistent"])
    rc = e.proc.wait(15)
    err = e.stderr().strip().splitlines()
    assert rc == 2, e.stderr()
    assert len(err) == 1 and "nft" in err[0] and "nftables" in err[0], err
    # The port was released: the next start can bind it.
    with netns.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", e.port))


def test_ruleset_flush_is_repaired(netns: Netns) -> None:
    """Someone runs `nft flush ruleset` (a firewall reload): the exemption comes back by itself."""
    e = Exporter(["--web.notrack", "--web.notrack.check-interval=200ms"], netns=netns)
    try:
        e.wait_ready()
        netns.exec(["nft", "flush", "ruleset"])
        deadline = time.monotonic() + 5
        body = b""
        while time.monotonic() < deadline:
            body = e.get("/metrics")[2]
            if b"conntrack_dns_exporter_web_notrack_reinstalls_total 1.0" in body:
                break
            time.sleep(0.1)
        assert b"conntrack_dns_exporter_web_notrack_reinstalls_total 1.0" in body
        assert f"tcp dport {e.port} notrack" in _ruleset(netns)
    finally:
        e.stop()
