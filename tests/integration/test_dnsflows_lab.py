"""The dnsflows collector in the lab: real pods' DNS seen from the kernel's conntrack events.

The exporter runs in the lab's node namespace (as under hostNetwork) with Kubernetes discovery pointed at
the project's stand-in API server (tests/support/fakeapi.py: the real API's JSON and watch streams, no
real kube-apiserver runs here), which serves the DNS Service (10.96.0.10), its two endpoints (the dnsmasq
backends) and the lab pod (10.244.1.2). Its own probes run too (every second, Service IP and both
endpoints) and must not show in the flow counts. The pod sends real lookups through kube-proxy-style
DNAT; the node namespace's UDP timeout is lowered to 2 s for the test (its own sysctl, restored after),
so unanswered entries expire, and their DESTROY events arrive, within seconds.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import dns.exception
import dns.message
import dns.query
import pytest

from tests.lab import Lab
from tests.lab.dnsq import query
from tests.lab.topology import STALE_IP
from tests.support import fakeapi
from tests.support.exporter_proc import Samples
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.lab]
NODE = "lab-node"
POD = ("shop", "cart-7d9f-x2")
_PORTS = itertools.count(21000)


class Env:
    def __init__(self, lab: Lab, exporter: Any) -> None:
        self.lab, self.exporter = lab, exporter

    def samples(self) -> Samples:
        s: Samples = self.exporter.scrape()
        return s

    def counter(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)

    def by_backend(self, name: str, kind: str = "service") -> dict[str, float]:
        out = {}
        for (n, labels), v in self.samples().items():
            d = dict(labels)
            if n == name and d.get("server_kind") == kind:
                out[d["backend"]] = v
        return out


@pytest.fixture(scope="module")
def env(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    api = fakeapi.FakeAPI(host=lab.host_root_ip).start()
    api.put(fakeapi.service("kube-system", "kube-dns", lab.service_ip))
    api.put(fakeapi.endpoint_slice("kube-system", "kube-dns", "kube-dns-flows", [
        fakeapi.Endpoint(b.ip, f"coredns-{i}", node=NODE) for i, b in enumerate(lab.backends)]))
    api.put(fakeapi.pod(POD[0], POD[1], NODE, lab.pod_ip))
    kubeconfig = api.write_kubeconfig(str(tmp_path_factory.mktemp("dnsflows") / "kubeconfig"))
    old_timeout = lab.node.exec(["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]).stdout.strip()
    lab.node.exec(["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=2"])
    exporter = lab.start_exporter(
        "--collector.dns", "--kubernetes.enabled=true", f"--kubernetes.kubeconfig={kubeconfig}",
        f"--kubernetes.node-name={NODE}", "--probe.interval=1s", "--probe.timeout=0.5s", "--no-collector.table",
        "--collector.dnsflows.window=10m")
    try:
        e = Env(lab, exporter)
        wait_until("the pod map and the targets", lambda: e.counter("conntrack_dns_exporter_kubernetes_objects",
                                                                    resource="pods") == 1, 20)
        yield e
    finally:
        exporter.stop()
        lab.node.exec(["sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={old_timeout}"])
        api.stop()


def glibc_lookups(lab: Lab, n: int) -> None:
    """`getent ahosts` in the pod namespace: glibc's getaddrinfo with the pod's resolv.conf (search list,
    ndots:5, parallel A/AAAA from one socket), through the Service IP."""
    for i in range(n):
        name = "web" if i % 2 else "kubernetes.default"
        subprocess.run(["ip", "netns", "exec", lab.pod.name, "getent", "ahosts", name], check=True,
                       capture_output=True, timeout=20)


def pod_queries(lab: Lab, n: int) -> list[str]:
    """n single queries from the pod to the Service IP, each from its own socket bound to a port no other
    query of this session used: each its own flow (a reused port could meet its predecessor's entry)."""
    out = []
    for _ in range(n):
        sock = lab.pod.socket(type=socket.SOCK_DGRAM)
        try:
            sock.settimeout(0.3)
            sock.bind(("0.0.0.0", next(_PORTS)))
            q = dns.message.make_query(f"n{time.time_ns()}.cluster.local", "A")
            dns.query.udp(q, lab.service_ip, timeout=0.3, sock=sock)
            out.append("answered")
        except (dns.exception.Timeout, TimeoutError):
            out.append("timeout")
        finally:
            sock.close()
    return out


def settle(env: Env, flush: bool = False) -> None:
    """Wait until every DNS entry of the pod has expired and its DESTROY event has been counted (the
    probes keep making entries of their own all the time). `flush` first deletes every DNS entry earlier
    tests of the session left in the node table (made before this module lowered the UDP timeout, or assured
    ones living 120 s), so none of them expires into the counters after a baseline is taken."""
    lab = env.lab
    if flush:
        for proto in ("udp", "tcp"):
            lab.node.exec(["conntrack", "-D", "-p", proto, "--orig-port-dst", "53"], check=False)
    wait_until("no DNS entry of the pod left in the node table",
               lambda: " dport=53 " not in lab.node.exec(["conntrack", "-L", "-s", lab.pod_ip]).stdout, 60,
               interval=0.5)
    time.sleep(0.5)


def test_healthy_pod_lookups_are_counted_per_backend_and_all_answered(env: Env) -> None:
    lab = env.lab
    settle(env, flush=True)
    flows0 = env.by_backend("conntrack_dns_flows_total")
    unanswered0 = env.by_backend("conntrack_dns_unanswered_flows_total")
    excluded0 = env.counter("conntrack_dns_excluded_flows_total")
    glibc_lookups(lab, 20)
    backends = {b.ip for b in lab.backends}
    wait_until("flows to both backends", lambda: all(env.by_backend("conntrack_dns_flows_total").get(b, 0)
                                                     > flows0.get(b, 0) for b in backends), 15)
    settle(env)
    flows = env.by_backend("conntrack_dns_flows_total")
    assert set(flows) == backends, flows  # the DNAT spread, and nothing else behind the Service IP
    assert sum(flows.values()) - sum(flows0.values()) >= 20
    # not one unanswered flow during the healthy lookups (earlier tests' leftovers may be in the baseline)
    assert env.by_backend("conntrack_dns_unanswered_flows_total") == unanswered0
    # the probes ran all along (Service IP and both endpoints, every second) and were left out
    assert env.counter("conntrack_dns_excluded_flows_total") > excluded0 + 10
    assert env.by_backend("conntrack_dns_flows_total", kind="endpoint") == {}
    assert env.counter("conntrack_dns_unanswered_top_pods", namespace=POD[0], pod=POD[1]) == 0
    assert env.counter("conntrack_dns_events_lost_total") == 0
    assert env.counter("conntrack_dns_listener_up") == 1


def test_backend_down_unanswered_flows_go_to_that_backend_and_the_pod(env: Env) -> None:
    lab = env.lab
    down, live = lab.backends[0].ip, lab.backends[1].ip
    settle(env, flush=True)
    before = env.by_backend("conntrack_dns_unanswered_flows_total")
    pod_before = env.counter("conntrack_dns_unanswered_top_pods", namespace=POD[0], pod=POD[1])
    lab.fault("backend-down", 0)
    try:
        rcodes = pod_queries(lab, 30)
        failed = rcodes.count("timeout")
        assert 0 < failed < 30, rcodes
        settle(env)
    finally:
        lab.heal("backend-down")
    after = env.by_backend("conntrack_dns_unanswered_flows_total")
    rows = {k: v for k, v in env.samples().items() if k[0] == "conntrack_dns_unanswered_top_pods"}
    assert after.get(down, 0) - before.get(down, 0) == failed, (before, after, rows, env.exporter.stderr()[-3000:])
    assert after.get(live, 0) == before.get(live, 0) == 0
    assert env.counter("conntrack_dns_unanswered_top_pods", namespace=POD[0], pod=POD[1]) - pod_before == failed


def test_stale_endpoint_unanswered_flows_name_the_stale_address(env: Env) -> None:
    lab = env.lab
    settle(env, flush=True)
    unanswered0 = env.by_backend("conntrack_dns_unanswered_flows_total")
    before = unanswered0.get(STALE_IP, 0)
    lab.fault("stale-endpoint")
    try:
        rcodes = pod_queries(lab, 30)
        failed = rcodes.count("timeout")
        assert failed > 0, rcodes
        settle(env)
    finally:
        lab.heal("stale-endpoint")
    after = env.by_backend("conntrack_dns_unanswered_flows_total")
    assert after.get(STALE_IP, 0) - before == failed, after
    assert all(after.get(b.ip, 0) == unanswered0.get(b.ip, 0) for b in lab.backends), (unanswered0, after)
    assert env.by_backend("conntrack_dns_flows_total").get(STALE_IP, 0) >= failed


def nodelocal_queries(lab: Lab, n: int) -> list[str]:
    """n queries from the pod to NodeLocal for names it has not cached (each asked upstream, which answers
    NXDOMAIN): the outcomes."""
    return [query(lab.pod.name, lab.nodelocal_ip, f"nl{time.time_ns()}.default.svc.cluster.local",
                  timeout=2.0).outcome for _ in range(n)]


def test_nodelocal_upstream_flows_are_counted_and_pod_to_nodelocal_ones_are_not(env: Env) -> None:
    """NodeLocal DNSCache's NOTRACK rules hide pod -> NodeLocal flows, but NodeLocal's own upstream
    queries (TCP from the node to the Service IP, DNAT to a backend) are tracked: they are counted per
    backend and answered, and nothing is counted for the NodeLocal address (docs/dnsflows.md)."""
    lab = env.lab
    settle(env, flush=True)
    flows0 = env.by_backend("conntrack_dns_flows_total")
    unanswered0 = env.by_backend("conntrack_dns_unanswered_flows_total")
    others0 = {k: env.by_backend("conntrack_dns_flows_total", kind=k) for k in ("nodelocal", "other")}
    lab.start_nodelocal()  # a fresh NodeLocal: nothing cached, no upstream connection open to reuse
    wait_until("NodeLocal answering", lambda: query(lab.node.name, lab.nodelocal_ip, lab.cluster_name,
                                                    timeout=0.5).ok, 15, interval=0.2)
    outcomes = nodelocal_queries(lab, 10)
    assert set(outcomes) == {"NXDOMAIN"}, outcomes  # answered (by the backends, through NodeLocal)
    backends = {b.ip for b in lab.backends}
    wait_until("NodeLocal's upstream flows counted",
               lambda: sum(env.by_backend("conntrack_dns_flows_total").values()) > sum(flows0.values()), 15)
    tcp = lab.node.exec(["conntrack", "-L", "-p", "tcp", "--orig-dst", lab.service_ip]).stdout
    assert f"src={lab.node_ip}" in tcp, tcp  # NodeLocal connected upstream (the probes' flows are excluded)
    flows = env.by_backend("conntrack_dns_flows_total")
    grown = {b for b, n in flows.items() if n > flows0.get(b, 0)}
    assert grown and grown <= backends, (flows0, flows)  # through the Service IP's DNAT to the backends
    assert {k: env.by_backend("conntrack_dns_flows_total", kind=k) for k in ("nodelocal", "other")} == others0
    assert lab.nodelocal_ip not in lab.node.exec(["conntrack", "-L"]).stdout  # pod -> NodeLocal: NOTRACK
    settle(env)
    assert env.by_backend("conntrack_dns_unanswered_flows_total") == unanswered0
