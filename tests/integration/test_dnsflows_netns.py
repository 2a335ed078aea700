"""The dnsflows listener against real kernel events in a fresh namespace: the BPF filter attached to the
real event socket keeps non-DNS churn out (and without it the same churn does arrive, so the check can
fail), and an overflowing receive buffer is counted, resynced and survived.

The exporter runs as a process inside the namespace; the churn is `tests.support.churn` in a second
process there (UDP datagrams to ever new destinations, TCP SYNs to a closed port, DNS queries to
127.53.x.y where nothing answers). The namespace's UDP timeout is lowered to 1 s (a child namespace's
own sysctl) so DESTROY events follow within seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.exporter_proc import Exporter, value
from tests.support.netns import Netns
from tests.support.wait import wait_until

pytestmark = pytest.mark.netns
BASE = ["--no-collector.conntrack", "--no-collector.table", "--no-collector.dns"]


@pytest.fixture
def tracked(netns: Netns) -> Iterator[Netns]:
    """The namespace with conntrack in use (a rule that needs it) and a 1 s UDP timeout."""
    netns.exec(["nft", "add table inet t; add chain inet t o { type filter hook output priority 0; }; "
                       "add rule inet t o ct state new counter"])
    netns.exec(["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1"])
    yield netns


def churn(ns: Netns, seconds: float, other: int, dns: int) -> dict[str, Any]:
    out = ns.exec([sys.executable, "-m", "tests.support.churn", str(seconds), str(other), str(dns)],
                  timeout=seconds + 30)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def reap(ns: Netns) -> None:
    """Dump the namespace's table: the kernel evicts the expired entries it meets (their DESTROY events go
    out now rather than at the garbage collector's next pass, which can be a minute away)."""
    subprocess.run(ns.cmd(["conntrack", "-L"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def events(exp: Exporter, typ: str) -> float:
    return value(exp.scrape(), "conntrack_dns_events_total", type=typ) or 0.0


def test_non_dns_churn_never_reaches_the_listener_with_the_filter(tracked: Netns) -> None:
    with Exporter(BASE, netns=tracked) as exp:
        wait_until("listener up", lambda: value(exp.scrape(), "conntrack_dns_listener_up") == 1, 10)
        sent = churn(tracked, 2, 15000, 100)
        dns = sent["dns_udp"] + sent["dns_tcp"]
        assert sent["other_udp"] + sent["other_tcp"] > 10 * dns
        wait_until("every DNS flow's NEW event", lambda: events(exp, "new") >= dns, 15)
        samples = exp.scrape()
        assert value(samples, "conntrack_dns_events_total", type="new") == dns
        assert value(samples, "conntrack_dns_events_total", type="other") == 0
        assert value(samples, "conntrack_dns_events_lost_total") == 0
        assert value(samples, "conntrack_dns_flows_total", server_kind="other", backend="other") == dns
        # nobody answers at 127.53.x.y: once the entries expire, every one of them is unanswered. The kernel's
        # garbage collection may take up to a minute to reach expired entries; a table dump evicts them at once
        wait_until("the DESTROY events", lambda: reap(tracked) or events(exp, "destroy") >= dns, 40, interval=0.5)
        samples = exp.scrape()
        assert value(samples, "conntrack_dns_unanswered_flows_total", server_kind="other", backend="other") == dns
        assert value(samples, "conntrack_dns_events_total", type="other") == 0


def test_without_the_filter_the_same_churn_floods_the_listener(tracked: Netns) -> None:
    with Exporter([*BASE, "--collector.dnsflows.debug-unfiltered"], netns=tracked) as exp:
        wait_until("listener up", lambda: value(exp.scrape(), "conntrack_dns_listener_up") == 1, 10)
        sent = churn(tracked, 2, 15000, 100)
        other = sent["other_udp"] + sent["other_tcp"]
        # every non-DNS NEW event arrives (some may be lost to overflow under this flood: that is the point)
        lost = lambda: value(exp.scrape(), "conntrack_dns_events_lost_total") or 0  # noqa: E731
        wait_until("the non-DNS events", lambda: events(exp, "other") >= other * 0.9 or lost() > 0, 20)
        assert events(exp, "other") > 1000


@pytest.mark.parametrize("drain", ["native", "python"])
def test_an_overflowing_receive_buffer_is_counted_resynced_and_survived(tracked: Netns, drain: str) -> None:
    """The exporter is frozen (SIGSTOP) during a burst of DNS flows, so its 64 KiB receive buffer overflows
    for certain; thawed, it counts the loss, resyncs once, logs one line, and then sees new flows whole.
    With the native drain (exporter/dnsflows/_ctevents.so) and with the Python one."""
    flags = ["--collector.dnsflows.debug-python-drain"] if drain == "python" else []
    with Exporter([*BASE, "--collector.dnsflows.receive-buffer=65536", "--log.level=debug", *flags],
                  netns=tracked) as exp:
        wait_until("listener up", lambda: value(exp.scrape(), "conntrack_dns_listener_up") == 1, 10)
        exp.proc.send_signal(signal.SIGSTOP)
        try:
            sent = churn(tracked, 0.5, 0, 2000)
        finally:
            exp.proc.send_signal(signal.SIGCONT)
        dns = sent["dns_udp"] + sent["dns_tcp"]
        wait_until("lost events", lambda: (value(exp.scrape(), "conntrack_dns_events_lost_total") or 0) > 0, 15)
        wait_until("a resync", lambda: (value(exp.scrape(), "conntrack_dns_resyncs_total") or 0) >= 1, 15)
        assert 0 < events(exp, "new") < dns  # what fitted in the buffer was read
        log = exp.stderr()
        assert log.count("conntrack events lost") == 1 and "resynced after lost conntrack events" in log, log
        # it recovers: a trickle afterwards is seen whole
        before = events(exp, "new")
        trickle = churn(tracked, 1, 0, 20)
        n = trickle["dns_udp"] + trickle["dns_tcp"]
        wait_until("the trickle's NEW events", lambda: events(exp, "new") >= before + n, 15)
        assert value(exp.scrape(), "conntrack_dns_listener_up") == 1
        assert exp.proc.poll() is None
        assert "Traceback" not in exp.stderr()
        assert f"DNS flow listener: {drain} drain" in exp.stderr()


def test_an_unprivileged_exporter_reports_the_listener_down_in_one_line(netns: Netns) -> None:
    """Without CAP_NET_ADMIN the kernel refuses the event groups: listener down, one log line, no crash."""
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs setpriv (util-linux)")
    exp = Exporter(BASE, netns=netns, preexec=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                                 "--inh-caps=-all", "--bounding-set=-all"])
    try:
        exp.wait_ready()
        wait_until("listener down", lambda: value(exp.scrape(), "conntrack_dns_listener_up") == 0, 10)
        log = exp.stderr()
        assert log.count("DNS flow listener down") == 1 and "CAP_NET_ADMIN" in log, log
    finally:
        exp.stop()


def test_events_disabled_is_reported_and_the_sysctl_left_alone(tracked: Netns) -> None:
    """nf_conntrack_events=0 in the namespace (its own sysctl): the kernel sends nothing; the exporter says
    so once and in a metric, and the sysctl is still 0 afterwards."""
    tracked.exec(["sysctl", "-qw", "net.netfilter.nf_conntrack_events=0"])
    with Exporter(BASE, netns=tracked) as exp:
        wait_until("events_enabled 0", lambda: value(exp.scrape(), "conntrack_dns_events_enabled") == 0, 10)
        churn(tracked, 0.5, 0, 50)
        time.sleep(1)
        assert events(exp, "new") == 0  # so the metric is the only hint
        assert exp.stderr().count("nf_conntrack_events is 0") == 1, exp.stderr()
    assert tracked.exec(["sysctl", "-n", "net.netfilter.nf_conntrack_events"]).stdout.strip() == "0"


def test_the_resync_dump_is_filtered_in_the_kernel_and_finds_every_own_probe_flow(tracked: Netns) -> None:
    """The resync after lost events (`dump_dns_flows`) asks the kernel for the port-53 entries only (CTA_FILTER,
    one dump per family and protocol): on a table of 20,000 other entries the kernel sends a message per DNS
    entry, not per entry, so a resync on a full table stays cheap. And it still finds the same own probe
    flows as an unfiltered dump read here: UDP over IPv4 and IPv6 and TCP from registered ports, not a
    pod's query, not the own port's non-DNS flow."""
    import socket

    from exporter import netlink
    from exporter.discovery import Discovery
    from exporter.discovery.targets import TargetRegistry
    from exporter.dnsflows.flows import FlowStats
    from exporter.dnsflows.listener import IPCTNL_MSG_CT_GET, dns_dump_request, dump_dns_flows
    from exporter.dnsflows.parse import iter_flows
    from tests.support import ctfill
    from tests.support.netns import in_netns, socket_in

    assert ctfill.fill(tracked.name, 20_000) == 20_000
    discovery = Discovery(TargetRegistry())
    stats = FlowStats(discovery)
    keep: list[socket.socket] = []

    def own(family: int, kind: int) -> socket.socket:
        s = socket_in(tracked.name, family, kind)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        discovery.own_ports.register(socket.IPPROTO_TCP if kind == socket.SOCK_STREAM else socket.IPPROTO_UDP,
                                     s.getsockname()[1])
        keep.append(s)
        return s

    listener = socket_in(tracked.name, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 53))
    listener.listen(4)
    keep.append(listener)
    try:
        own(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"q", ("127.53.0.1", 53))
        own(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"q", ("::1", 53))
        own(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 53))  # established: the entry stays
        own(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"q", ("127.53.0.2", 5353))  # own port, no DNS
        pod = socket_in(tracked.name, socket.AF_INET, socket.SOCK_DGRAM)  # no registered port: a client's
        pod.sendto(b"q", ("127.53.0.3", 53))
        keep.append(pod)

        def messages(request: bytes) -> tuple[int, list[int]]:
            sock = in_netns(tracked.name, netlink.open_socket, 2.0)
            try:
                sock.send(request)
                buf, n_msgs, ids = bytearray(1 << 16), 0, []
                while True:
                    n = sock.recv_into(buf)
                    for mtype, flow in iter_flows(buf, n):
                        if mtype in (netlink.NLMSG_DONE, netlink.NLMSG_ERROR):
                            return n_msgs, ids
                        n_msgs += 1
                        if flow is not None and stats.own(flow):
                            ids.append(flow[7])
            finally:
                sock.close()

        assert messages(dns_dump_request(socket.AF_INET, socket.IPPROTO_UDP, 1))[0] == 2  # own + the client's
        assert messages(dns_dump_request(socket.AF_INET, socket.IPPROTO_TCP, 1))[0] == 1
        assert messages(dns_dump_request(socket.AF_INET6, socket.IPPROTO_UDP, 1))[0] == 1
        everything, expected = messages(netlink.build_request(IPCTNL_MSG_CT_GET,
                                                              netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, 1))
        assert everything > 20_000 and len(expected) == 3
        found = in_netns(tracked.name, dump_dns_flows, stats, time.monotonic() + 10)
        assert sorted(found) == sorted(expected)
    finally:
        for s in keep:
            s.close()


def test_a_garbage_collection_burst_fits_the_default_receive_buffer(tracked: Netns) -> None:
    """The kernel's conntrack garbage collection sends the DESTROY events of all entries expired since its
    last pass at once (here: 12,000 port-53 entries that expire within about a second of each other, next
    to a steady 1,000 DNS flows/s that keeps the listener pausing between drains). The default buffer and
    the pause between drains must hold it: with the old 4 MiB (about 6,400 events) and a 0.5 s pause the
    burst overflowed the buffer, lost events and cost a resync; with 16 MiB the pause is capped at 0.26 s."""
    from tests.support import ctfill

    with Exporter(BASE, netns=tracked) as exp:
        wait_until("listener up", lambda: value(exp.scrape(), "conntrack_dns_listener_up") == 1, 10)
        stream = tracked.popen([sys.executable, "-m", "tests.support.churn", "40", "0", "1000"],
                               stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)
            d0 = events(exp, "destroy")
            # paced creation (its NEW events must not be the burst), timeouts counted down so that every
            # entry expires at about the same second
            t0 = time.monotonic()
            for i in range(30):
                left = 8 - int(time.monotonic() - t0)
                ctfill.fill(tracked.name, 400, start=i * 400, timeout=left, dport=53)
                time.sleep(0.1)
            wait_until("the burst's DESTROY events", lambda: events(exp, "destroy") - d0 >= 12_000, 60, interval=0.5)
        finally:
            stream.terminate()
            stream.wait()
        assert value(exp.scrape(), "conntrack_dns_events_lost_total") == 0
