"""The conntrack collector against the real kernel, in fresh network namespaces (each has its own table).

Cross-checked with the `conntrack` CLI (conntrack-tools) and Debian's prometheus-node-exporter run in
the same namespace. Needs root and nf_conntrack; skipped elsewhere with the reason.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support import ctfill, races
from tests.support.exporter_proc import Exporter, parse, value
from tests.support.netns import Netns, skip_reason

pytestmark = pytest.mark.netns

STATS = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop", "error", "search_restart",
         "clash_resolve", "chain_toolong")


def conntrack_S(ns: Netns) -> dict[str, int]:
    """`conntrack -S` summed over CPUs (its name for chain_toolong is chaintoolong)."""
    totals: dict[str, int] = {}
    for line in ns.exec(["conntrack", "-S"]).stdout.splitlines():
        for field in line.split()[1:]:
            k, _, v = field.partition("=")
            k = {"chaintoolong": "chain_toolong"}.get(k, k)
            totals[k] = totals.get(k, 0) + int(v)
    return totals


@pytest.fixture
def dnat_ns() -> Iterator[tuple[Netns, Netns]]:
    """A namespace that DNATs 10.96.0.10:53 to two backends in a second one (kube-proxy's pattern)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (`nft`) for the DNAT")
    client, backends = races.dnat_pair()
    try:
        yield client, backends
    finally:
        client.delete()
        backends.delete()


def needs_conntrack_cli() -> None:
    if shutil.which("conntrack") is None:
        pytest.skip("needs the conntrack CLI (Debian package conntrack)")


def test_entries_equal_conntrack_count(netns: Netns) -> None:
    needs_conntrack_cli()
    ctfill.fill(netns.name, 1234)
    with Exporter(netns=netns) as exp:
        s = exp.scrape()
    assert value(s, "conntrack_entries") == int(netns.exec(["conntrack", "-C"]).stdout) == 1234
    assert value(s, "conntrack_entries_limit") == int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
    assert value(s, "conntrack_dns_exporter_collector_success", collector="conntrack") == 1


def test_full_table_drops_new_flows_and_the_exporter_sees_it(dnat_ns: tuple[Netns, Netns]) -> None:
    needs_conntrack_cli()
    client, _ = dnat_ns
    with Exporter(netns=client) as exp:
        before = exp.keepalive_scrape()
        ctfill.fill_to(client.name)
        s = client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent_dropped = 0
        for _ in range(20):  # a DNS query needs a new entry: at 100% the kernel refuses it
            try:
                s.sendto(b"\0" * 12, ("10.96.0.10", 53))
            except PermissionError:
                sent_dropped += 1
            s.close()
            s = client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.close()
        after = exp.keepalive_scrape()  # a new connection could not be tracked now
    assert sent_dropped == 20
    assert value(after, "conntrack_entries") == value(after, "conntrack_entries_limit")
    grew = (value(after, "conntrack_stat_drop_total") or 0) - (value(before, "conntrack_stat_drop_total") or 0)
    assert grew >= 20
    cli = conntrack_S(client)
    assert value(after, "conntrack_stat_drop_total") == cli["drop"]


def test_parallel_a_aaaa_race_shows_as_clash_resolve(dnat_ns: tuple[Netns, Netns]) -> None:
    needs_conntrack_cli()
    client, _ = dnat_ns
    with Exporter(netns=client) as exp:
        before = value(exp.scrape(), "conntrack_stat_clash_resolve_total") or 0
        assert races.until_counted(client.name, "clash_resolve",
                                   lambda _: races.dns_pair_race(client.name, "10.96.0.10", pairs=1500)) > 0
        after = exp.scrape()
    assert (value(after, "conntrack_stat_clash_resolve_total") or 0) > before
    cli = conntrack_S(client)
    for stat in STATS:
        if stat in cli:
            assert value(after, f"conntrack_stat_{stat}_total") == cli[stat], stat


def test_tcp_syn_race_shows_as_insert_failed_per_cpu(dnat_ns: tuple[Netns, Netns]) -> None:
    client, _ = dnat_ns
    assert races.until_counted(client.name, "insert_failed", lambda i: races.tcp_syn_race(
        client.name, "10.77.0.1", "10.77.0.9", pairs=1500, sport_base=20000 + 1500 * i)) > 0
    with Exporter(["--collector.conntrack.per-cpu"], netns=client) as exp:
        s = exp.scrape()
    per_cpu = [v for (name, labels), v in s.items() if name == "conntrack_stat_insert_failed_total"]
    assert len(per_cpu) >= 2 and sum(per_cpu) > 0
    assert all(dict(labels).keys() == {"cpu"} for (name, labels) in s if name == "conntrack_stat_drop_total")


def test_agrees_with_node_exporter(dnat_ns: tuple[Netns, Netns]) -> None:
    binary = shutil.which("prometheus-node-exporter")
    if binary is None:
        pytest.skip("needs Debian's prometheus-node-exporter as the reference")
    client, _ = dnat_ns
    # keep the scrapes themselves out of the table, so both exporters see the same count
    client.exec(["nft", "add table ip raw; add chain ip raw pre { type filter hook prerouting priority -300; }; "
                 "add chain ip raw out { type filter hook output priority -300; }; "
                 "add rule ip raw pre iifname lo notrack; add rule ip raw out oifname lo notrack"])
    races.dns_pair_race(client.name, "10.96.0.10", pairs=500)
    ctfill.fill(client.name, 5000)
    port = 19500
    ne = client.popen([binary, "--collector.disable-defaults", "--collector.conntrack",
                       f"--web.listen-address=127.0.0.1:{port}"], stdout=open("/dev/null", "w"),
                      stderr=open("/dev/null", "w"))
    try:
        with Exporter(netns=client) as exp:
            ours = exp.scrape()
            deadline = time.monotonic() + 10
            ref = None
            while time.monotonic() < deadline and ref is None:
                with contextlib.suppress(OSError):
                    c = client.socket()
                    c.settimeout(2)
                    c.connect(("127.0.0.1", port))
                    c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    buf = b""
                    while chunk := c.recv(65536):
                        buf += chunk
                    c.close()
                    ref = parse(buf.split(b"\r\n\r\n", 1)[1].decode())
                if ref is None:
                    time.sleep(0.1)
    finally:
        ne.terminate()
        ne.wait()
    assert ref is not None, "node_exporter did not answer"
    assert value(ours, "conntrack_entries") == value(ref, "node_nf_conntrack_entries")
    assert (value(ours, "conntrack_entries") or 0) >= 5000
    assert value(ours, "conntrack_entries_limit") == value(ref, "node_nf_conntrack_entries_limit")
    compared = 0
    for stat in STATS:
        theirs = value(ref, f"node_nf_conntrack_stat_{stat}")
        if theirs is not None:  # node_exporter 1.5 exports a subset, as gauges
            assert value(ours, f"conntrack_stat_{stat}_total") == theirs, stat
            compared += 1
    assert compared >= 6
