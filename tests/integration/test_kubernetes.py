"""Kubernetes discovery, end to end: the real exporter process, its in-cluster client, real DNS probes.

Why a stand-in API server: no kube-apiserver (with etcd) can run on these machines, so the exporter is
pointed as in a pod (KUBERNETES_SERVICE_HOST/PORT, a ServiceAccount token and CA the test writes; HTTPS)
at `tests.support.fakeapi.FakeAPI`, a small HTTP server that answers with
the real API's JSON (Service, EndpointSlice discovery.k8s.io/v1, Pod, *List, Status objects) and chunked
watch streams with resourceVersion semantics, bookmarks and 410 Gone. Everything else is real: the
exporter runs as a subprocess with its own flags, the endpoints it discovers are in-process DNS servers
on 127.0.0.x that count the queries they get, and the assertions read what a user sees: the exporter's
/metrics (probe series, `dns_probe_target_info{pod}`, `conntrack_dns_exporter_kubernetes_*`) and its log.
One test goes through a kubeconfig instead (the `kubernetes` package's client, imported only then).

All endpoints share one UDP/TCP port on different loopback addresses, as CoreDNS pods share port 53 on
different pod IPs, so that an EndpointSlice (one port list for all its endpoints) can describe them.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.exporter_proc import Exporter, Samples, value
from tests.support.fakeapi import Endpoint, FakeAPI, endpoint_slice, pod, service
from tests.support.wait import wait_until

NS, SVC, NODE = "kube-system", "kube-dns", "node-1"
UP = "conntrack_dns_exporter_kubernetes_up"
RESTARTS = "conntrack_dns_exporter_kubernetes_watch_restarts_total"
OBJECTS = "conntrack_dns_exporter_kubernetes_objects"


class SharedPortDnsServer(DnsServer):
    """A test DNS server bound to a given port (0: any) on its loopback address."""

    def __init__(self, host: str, port: int) -> None:
        self._wanted_port = port
        super().__init__(host=host)

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        if not self._wanted_port:
            return super()._bind()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((self.host, self._wanted_port))
        tcp.bind((self.host, self._wanted_port))
        tcp.listen(64)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp


class Cluster:
    """The fake API server plus the DNS servers standing in for the kube-dns Service IP and CoreDNS pods."""

    def __init__(self, api: FakeAPI) -> None:
        self.api = api
        self.servers: dict[str, SharedPortDnsServer] = {}
        first = self.dns("127.0.0.10")  # the Service's cluster IP (kube-proxy's DNAT target in a cluster)
        self.port = first.port
        self.svc = api.put(service(NS, SVC, "127.0.0.10", port=self.port))

    def dns(self, host: str) -> SharedPortDnsServer:
        if host not in self.servers:
            self.servers[host] = SharedPortDnsServer(host, getattr(self, "port", 0)).start()
        return self.servers[host]

    def server(self, host: str) -> str:
        return f"{host}:{self.port}"

    def put_slice(self, name: str, endpoints: list[Endpoint]) -> None:
        for e in endpoints:
            self.dns(e.ip)
        self.api.put(endpoint_slice(NS, SVC, name, endpoints, port=self.port,
                                    owner_uid=self.svc["metadata"]["uid"]))

    def close(self) -> None:
        for s in self.servers.values():
            s.close()


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI(bookmark_interval=1.0, tls=True).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def cluster(api: FakeAPI) -> Iterator[Cluster]:
    c = Cluster(api)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def access(api: FakeAPI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """As in a pod: the API server's env vars and the ServiceAccount files; the flag that finds them."""
    for var, v in api.in_cluster_env().items():
        monkeypatch.setenv(var, v)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return f"--kubernetes.service-account-dir={api.write_service_account(str(tmp_path / 'sa'))}"


def exporter_args(access: str, tmp_path: Any, *extra: str) -> list[str]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.9\n")  # loopback, never used while another origin has targets
    return [access, "--kubernetes.node-name", NODE, "--kubernetes.max-backoff=1s",
            "--collector.dns", "--probe.interval=0.5s", "--probe.timeout=1s", "--probe.attempts=1",
            "--probe.modes=parallel", f"--probe.resolv-conf={resolv}", "--no-collector.conntrack",
            "--no-collector.table", *extra]


@contextlib.contextmanager
def running(args: list[str], ready: bool = True) -> Iterator[Exporter]:
    exp = Exporter(args)
    try:
        if ready:
            exp.wait_ready()
        yield exp
    finally:
        exp.stop()


def wait_for(fn: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    return wait_until(what or str(fn), fn, timeout, 0.1)


def probed(samples: Samples) -> dict[tuple[str, str], str]:
    """(server, kind) -> pod, from dns_probe_target_info."""
    out = {}
    for (name, labels), v in samples.items():
        if name == "dns_probe_target_info" and v == 1:
            d = dict(labels)
            out[(d["server"], d["kind"])] = d.get("pod", "")
    return out


def requests_sent(samples: Samples, server: str) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name in ("dns_probe_requests_total", "dns_probe_endpoint_queries_total")
               and dict(labels).get("server") == server)


def series_of(samples: Samples, server: str) -> list[str]:
    return sorted({name for (name, labels), _ in samples.items() if dict(labels).get("server") == server})


def test_initial_list_probes_service_ip_and_ready_endpoints(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-4xk2p", [Endpoint("127.0.0.11", "coredns-7db6d8ff4d-abcde"),
                                         Endpoint("127.0.0.12", "coredns-7db6d8ff4d-fghij"),
                                         Endpoint("127.0.0.13", "coredns-7db6d8ff4d-notready", ready=False)])
    cluster.api.put(pod("default", "web-1", NODE, "10.244.1.5"))
    cluster.api.put(pod("default", "web-2", "node-2", "10.244.2.5"))  # another node: not ours
    with running(exporter_args(access, tmp_path)) as exp:
        want = {(cluster.server("127.0.0.10"), "service"): "",
                (cluster.server("127.0.0.11"), "endpoint"): "coredns-7db6d8ff4d-abcde",
                (cluster.server("127.0.0.12"), "endpoint"): "coredns-7db6d8ff4d-fghij"}
        wait_for(lambda: probed(exp.scrape()) == want, what="the Service IP and both ready endpoints probed")
        # The probes really reach the discovered addresses, and only the ready ones.
        s = wait_for(lambda: (lambda s: s if all(requests_sent(s, srv) > 0 for srv, _ in want) else None)(
            exp.scrape()), what="probe requests to every target")
        assert all(cluster.servers[h].logged() for h in ("127.0.0.10", "127.0.0.11", "127.0.0.12"))
        assert not cluster.servers["127.0.0.13"].logged(), "a not-ready endpoint was probed"
        assert value(s, UP) == 1
        assert value(s, OBJECTS, resource="endpointslices") == 1
        assert value(s, OBJECTS, resource="services") == 1
        assert value(s, OBJECTS, resource="pods") == 1, "pods of other nodes must be field-selected away"
        assert value(s, "conntrack_dns_exporter_kubernetes_last_event_timestamp_seconds",
                     resource="endpointslices") > time.time() - 60
    # list, then a watch from the list's resourceVersion with bookmarks: the informer pattern.
    lists, watches = cluster.api.calls("endpointslices", "list"), cluster.api.calls("endpointslices", "watch")
    assert lists[0].query["labelSelector"] == f"kubernetes.io/service-name={SVC}"
    assert len(watches) == 1 and watches[0].query["allowWatchBookmarks"] == "true"
    assert int(watches[0].query["resourceVersion"]) >= 1000
    assert cluster.api.calls("pods", "list")[0].query["fieldSelector"] == f"spec.nodeName={NODE}"
    # No polling: one list, one watch, one Service GET for the whole run (bookmarks kept the watch fresh).
    assert len(lists) == 1 and len(cluster.api.calls("services", "get")) == 1


def test_watch_added_modified_deleted(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-a", [Endpoint("127.0.0.11", "coredns-a")])
    with running(exporter_args(access, tmp_path)) as exp:
        svc, a, b = (cluster.server(h) for h in ("127.0.0.10", "127.0.0.11", "127.0.0.12"))
        wait_for(lambda: (a, "endpoint") in probed(exp.scrape()), what="initial endpoint")
        # ADDED: a second slice (the controller splits large Services into several).
        cluster.put_slice("kube-dns-b", [Endpoint("127.0.0.12", "coredns-b")])
        wait_for(lambda: probed(exp.scrape()).get((b, "endpoint")) == "coredns-b", what="ADDED slice probed")
        wait_for(lambda: cluster.servers["127.0.0.12"].logged(), what="queries at the added endpoint")
        # MODIFIED: the pod behind b turns not-ready: it must stop being probed.
        cluster.put_slice("kube-dns-b", [Endpoint("127.0.0.12", "coredns-b", ready=False)])
        wait_for(lambda: (b, "endpoint") not in probed(exp.scrape()), what="not-ready endpoint dropped")
        # DELETED: slice a goes away; the Service IP stays probed.
        cluster.api.delete("EndpointSlice", NS, "kube-dns-a")
        wait_for(lambda: set(probed(exp.scrape())) == {(svc, "service")}, what="only the Service left")
        # Pods on this node follow too.
        cluster.api.put(pod("default", "web-1", NODE, "10.244.1.5"))
        wait_for(lambda: value(exp.scrape(), OBJECTS, resource="pods") == 1, what="pod ADDED")
        cluster.api.delete("Pod", "default", "web-1")
        wait_for(lambda: value(exp.scrape(), OBJECTS, resource="pods") == 0, what="pod DELETED")
        assert value(exp.scrape(), UP) == 1
    # Followed by watching, not by polling: one list per resource for the whole test.
    assert len(cluster.api.calls("endpointslices", "list")) == 1
    assert len(cluster.api.calls("pods", "list")) == 1


def test_rollout_replacing_every_endpoint(cluster: Cluster, access: str, tmp_path: Any) -> None:
    old = [Endpoint("127.0.0.11", "coredns-old-1"), Endpoint("127.0.0.12", "coredns-old-2")]
    new = [Endpoint("127.0.0.21", "coredns-new-1"), Endpoint("127.0.0.22", "coredns-new-2")]
    cluster.put_slice("kube-dns-r", old)
    for e in new:
        cluster.dns(e.ip)
    with running(exporter_args(access, tmp_path)) as exp:
        old_servers = [cluster.server(e.ip) for e in old]
        new_servers = [cluster.server(e.ip) for e in new]
        s = wait_for(lambda: (lambda s: s if all(requests_sent(s, o) > 0 for o in old_servers) else None)(
            exp.scrape()), what="old endpoints probed")
        assert series_of(s, old_servers[0]), "no probe series for an old endpoint before the rollout"
        # The rollout: the EndpointSlice controller rewrites the slice with the new pods only.
        cluster.put_slice("kube-dns-r", new)
        t0 = time.monotonic()

        def switched() -> Samples | None:
            s = exp.scrape()
            got = {srv for srv, kind in probed(s) if kind == "endpoint"}
            return s if got == set(new_servers) else None

        s = wait_for(switched, timeout=5.0, what="probed set switched to the new endpoints")
        assert time.monotonic() - t0 < 5.0
        assert probed(s)[(new_servers[0], "endpoint")] == "coredns-new-1"
        s = wait_for(lambda: (lambda s: s if all(requests_sent(s, n) > 0 for n in new_servers) else None)(
            exp.scrape()), what="probe requests to the new endpoints")
        for o in old_servers:  # every probe series of the removed endpoints is gone, not just target_info
            assert series_of(s, o) == [], f"stale series for removed endpoint {o}: {series_of(s, o)}"
        before = {h: len(cluster.servers[h].logged()) for h in ("127.0.0.11", "127.0.0.12")}
        time.sleep(1.2)  # two probe intervals: nothing more may reach the old pods
        assert {h: len(cluster.servers[h].logged()) for h in before} == before
    assert len(cluster.api.calls("endpointslices", "list")) == 1


def test_410_gone_forces_a_relist(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-g", [Endpoint("127.0.0.11", "coredns-a")])
    with running(exporter_args(access, tmp_path)) as exp:
        a, b = cluster.server("127.0.0.11"), cluster.server("127.0.0.12")
        wait_for(lambda: (a, "endpoint") in probed(exp.scrape()), what="initial endpoint")
        restarts = value(exp.scrape(), RESTARTS, resource="endpointslices")
        # The watch cache drops history and tells the watcher 410 (an ERROR event with a Status). The
        # change made meanwhile is only visible to a client that relists.
        cluster.api.send_gone()
        cluster.put_slice("kube-dns-g", [Endpoint("127.0.0.12", "coredns-b")])
        wait_for(lambda: set(probed(exp.scrape())) >= {(b, "endpoint")} and
                 (a, "endpoint") not in probed(exp.scrape()), what="state after the relist")
        assert value(exp.scrape(), RESTARTS, resource="endpointslices") > restarts
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="every watch relisted")
    assert len(cluster.api.calls("endpointslices", "list")) == 2, "410 must cause exactly one relist"


def test_stream_dropped_mid_event_resumes_without_relist(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-d", [Endpoint("127.0.0.11", "coredns-a")])
    with running(exporter_args(access, tmp_path)) as exp:
        a, b, c = (cluster.server(h) for h in ("127.0.0.11", "127.0.0.12", "127.0.0.13"))
        wait_for(lambda: (a, "endpoint") in probed(exp.scrape()), what="initial endpoint")
        cluster.put_slice("kube-dns-d", [Endpoint("127.0.0.11", "coredns-a"), Endpoint("127.0.0.12", "coredns-b")])
        wait_for(lambda: (b, "endpoint") in probed(exp.scrape()), what="a watched change")
        rv_seen = cluster.api.resource_version
        cluster.api.drop_watches()  # half an event, then the TCP connection closes
        wait_for(lambda: value(exp.scrape(), RESTARTS, resource="endpointslices") >= 1, what="a watch restart")
        assert {(a, "endpoint"), (b, "endpoint")} <= set(probed(exp.scrape())), "targets lost with the stream"
        cluster.put_slice("kube-dns-d", [Endpoint("127.0.0.13", "coredns-c")])
        wait_for(lambda: {srv for srv, k in probed(exp.scrape()) if k == "endpoint"} == {c},
                 what="change after the reconnect followed")
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="both watches back")
    watches = cluster.api.calls("endpointslices", "watch")
    # The new watch resumes after the last event received, not from the initial list.
    assert len(watches) >= 2 and int(watches[1].query["resourceVersion"]) >= rv_seen
    assert len(cluster.api.calls("endpointslices", "list")) == 1, "a dropped stream resumes, it does not relist"


def test_api_down_at_start_then_back_then_blip(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-s", [Endpoint("127.0.0.11", "coredns-a")])
    static = cluster.dns("127.0.0.30")
    cluster.api.stop()
    args = exporter_args(access, tmp_path, f"--probe.server={static.address}")
    with running(args) as exp:
        s = wait_for(lambda: (lambda s: s if requests_sent(s, static.address) > 0 else None)(exp.scrape()),
                     what="static target probed while the API is down")
        assert value(s, UP) == 0
        assert set(probed(s)) == {(static.address, "static")}
        wait_for(lambda: value(exp.scrape(), RESTARTS, resource="endpointslices") >= 2, what="retries")
        cluster.api.start()  # same port, as an API server restarting
        svc, a = cluster.server("127.0.0.10"), cluster.server("127.0.0.11")
        wait_for(lambda: {(svc, "service"), (a, "endpoint")} <= set(probed(exp.scrape())), timeout=8,
                 what="targets discovered once the API is back")
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="kubernetes_up back to 1")
        # A later blip: the last known targets keep being probed, and say so with kubernetes_up 0.
        cluster.api.stop()
        wait_for(lambda: value(exp.scrape(), UP) == 0, what="kubernetes_up 0 during the blip")
        n = len(cluster.servers["127.0.0.11"].logged())
        wait_for(lambda: len(cluster.servers["127.0.0.11"].logged()) > n, what="endpoint still probed")
        assert {(svc, "service"), (a, "endpoint")} <= set(probed(exp.scrape()))
        assert "Traceback" not in exp.stderr()


def test_403_logs_the_missing_rbac_rule_once(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-f", [Endpoint("127.0.0.11", "coredns-a")])
    cluster.api.forbid("list", "endpointslices")
    static = cluster.dns("127.0.0.30")
    with running(exporter_args(access, tmp_path, f"--probe.server={static.address}")) as exp:
        wait_for(lambda: len(cluster.api.calls("endpointslices", "list")) >= 3, what="several retries")
        s = exp.scrape()  # still serving
        assert value(s, UP) == 0
        assert (cluster.server("127.0.0.11"), "endpoint") not in probed(s)
        assert (static.address, "static") in probed(s)
        lines = [ln for ln in exp.stderr().splitlines() if "(403)" in ln or "Forbidden" in ln]
        assert len(lines) == 1, lines
        for word in ("list", "endpointslices", "discovery.k8s.io", "namespace kube-system", "watch"):
            assert word in lines[0], (word, lines[0])
        # The rule is granted: discovery recovers without a restart.
        cluster.api.allow("list", "endpointslices")
        wait_for(lambda: (cluster.server("127.0.0.11"), "endpoint") in probed(exp.scrape()), timeout=5,
                 what="recovery after the RBAC fix")
        assert value(exp.scrape(), UP) == 1


def test_stop_is_prompt_with_open_watches(cluster: Cluster, access: str, tmp_path: Any) -> None:
    cluster.put_slice("kube-dns-t", [Endpoint("127.0.0.11", "coredns-a")])
    exp = Exporter(exporter_args(access, tmp_path))
    try:
        exp.wait_ready()
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="watches open")
        t0 = time.monotonic()
        assert exp.stop() == 0
        assert time.monotonic() - t0 < 2.5, "SIGTERM must not wait for the watch streams"
    finally:
        exp.stop()


@pytest.mark.parametrize(("args", "message"), [
    (["--kubernetes.enabled=true"], "no Kubernetes configuration"),
    (["--kubernetes.dns-service=kube-dns"], "NAMESPACE/NAME"),
    (["--kubernetes.enabled=maybe"], "invalid choice"),
    (["--kubernetes.kubeconfig=/nonexistent/kubeconfig"], "no such file"),
])
def test_bad_configuration_exits_2_with_one_line(args: list[str], message: str) -> None:
    exp = Exporter(args, env={"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""})
    assert exp.proc.wait(15) == 2
    err = exp.stderr().strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_in_a_pod_the_kubernetes_package_is_not_imported(cluster: Cluster, access: str, tmp_path: Any) -> None:
    """The in-cluster client is the standard library's: the ~23 MB `kubernetes` package stays unloaded
    (Python's own import log, PYTHONPROFILEIMPORTTIME, lists every module the process imported)."""
    cluster.put_slice("kube-dns-m", [Endpoint("127.0.0.11", "coredns-a")])
    exp = Exporter(exporter_args(access, tmp_path), env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        exp.wait_ready()
        wait_for(lambda: (cluster.server("127.0.0.11"), "endpoint") in probed(exp.scrape()), what="discovered")
        imported = {line.rsplit("|", 1)[1].strip() for line in exp.stderr().splitlines() if "import time:" in line}
    finally:
        exp.stop()
    assert "exporter.kubernetes.incluster" in imported
    assert not {m for m in imported if m == "kubernetes" or m.startswith(("kubernetes.", "urllib3"))}


def test_kubeconfig_goes_through_the_kubernetes_package(cluster: Cluster, api: FakeAPI, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig (HTTPS, its CA) is read by the `kubernetes` package; discovery works the same."""
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        monkeypatch.delenv(var, raising=False)
    cluster.put_slice("kube-dns-k", [Endpoint("127.0.0.11", "coredns-a")])
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
    with running(exporter_args(f"--kubernetes.kubeconfig={kubeconfig}", tmp_path)) as exp:
        want = {(cluster.server("127.0.0.10"), "service"), (cluster.server("127.0.0.11"), "endpoint")}
        wait_for(lambda: set(probed(exp.scrape())) == want, what="Service IP and endpoint via the kubeconfig")
        assert value(exp.scrape(), UP) == 1
    assert len(cluster.api.calls("endpointslices", "watch")) == 1


def test_rotated_service_account_token_is_picked_up(cluster: Cluster, api: FakeAPI, access: str,
                                                   tmp_path: Any) -> None:
    """The kubelet swaps the projected token file; the API server then refuses the old token (401). The
    exporter reads the new one and follows changes again, without a restart."""
    cluster.put_slice("kube-dns-r", [Endpoint("127.0.0.11", "coredns-a")])
    with running(exporter_args(access, tmp_path)) as exp:
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="watches open")
        api.rotate_token(str(tmp_path / "sa"), "rotated-token")
        api.drop_watches()  # the next requests carry a token: must be the new one
        cluster.put_slice("kube-dns-r", [Endpoint("127.0.0.12", "coredns-b")])
        wait_for(lambda: (cluster.server("127.0.0.12"), "endpoint") in probed(exp.scrape()), timeout=8,
                 what="change followed with the rotated token")
        wait_for(lambda: value(exp.scrape(), UP) == 1, what="kubernetes_up back to 1")
        assert "Traceback" not in exp.stderr()
