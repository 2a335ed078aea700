"""The Kubernetes watcher in-process: what it hands to the rest of the exporter that /metrics does not show.

Why a stand-in API server: no kube-apiserver (with etcd) can run on these machines, so the exporter's
in-cluster client talks (HTTPS, a ServiceAccount token and CA the test writes, KUBERNETES_SERVICE_HOST/PORT
as in a pod) to `tests.support.fakeapi.FakeAPI`, which answers with
the real API's JSON and chunked watch streams. These tests read the shared objects the table collector and
the probes use (`PodIndex`, `TargetRegistry`) and check that `stop()` ends every thread within its timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.core.feature import AppContext
from exporter.discovery.targets import Target
from exporter.kubernetes import client, config, dns_targets
from exporter.kubernetes import watcher as kube
from tests.support.fakeapi import Endpoint, FakeAPI, endpoint_slice, pod, service
from tests.support.wait import wait_until

NS, SVC, NODE = "kube-system", "kube-dns", "node-1"


def up(w: kube.KubeWatcher) -> bool:
    """What kubernetes_up exports: every resource listed and streaming."""
    return all(st.synced for st in w.state.snapshot().values())


def wait_for(fn: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    return wait_until(what or str(fn), fn, timeout, 0.1)


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI(bookmark_interval=0.5, tls=True).start()
    try:
        yield fake
    finally:
        fake.stop()


def in_cluster(api: FakeAPI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for var, v in api.in_cluster_env().items():
        monkeypatch.setenv(var, v)
    return config.load_configuration(None, True, api.write_service_account(str(tmp_path / "sa")))


@pytest.fixture
def watcher(api: FakeAPI, tmp_path: Any,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[kube.KubeWatcher, AppContext]]:
    cfg = in_cluster(api, tmp_path, monkeypatch)
    ctx = AppContext()
    w = kube.KubeWatcher(cfg, NS, SVC, NODE, ctx.discovery, client.Timeouts(max_backoff=0.5))
    try:
        yield w, ctx
    finally:
        w.stop(1.0)


def test_pod_index_follows_the_pods_on_this_node(api: FakeAPI, watcher: tuple[kube.KubeWatcher, AppContext]) -> None:
    w, ctx = watcher
    api.put(pod("default", "web-1", NODE, "10.244.1.5"))
    api.put(pod("default", "other-node", "node-2", "10.244.2.5"))
    api.put(pod("kube-system", "kube-proxy-x", NODE, "192.168.0.10", host_network=True))
    w.start()
    wait_for(lambda: ctx.pods.snapshot() == {"10.244.1.5": ("default", "web-1")}, what="initial pod map")
    # A pod restarted with a new IP, one that finished, one added in another namespace.
    api.put(pod("default", "web-1", NODE, "10.244.1.9"))
    api.put(pod("batch", "job-1", NODE, "10.244.1.7"))
    wait_for(lambda: ctx.pods.snapshot() == {"10.244.1.9": ("default", "web-1"), "10.244.1.7": ("batch", "job-1")},
             what="MODIFIED (new IP) and ADDED")
    api.put(pod("batch", "job-1", NODE, "10.244.1.7", phase="Succeeded"))  # its IP is released
    api.delete("Pod", "default", "web-1")
    wait_for(lambda: ctx.pods.snapshot() == {}, what="Succeeded and DELETED pods gone")
    # An IP reused by a new pod before the old pod's DELETED arrives keeps the new owner.
    api.put(pod("default", "a", NODE, "10.244.1.20"))
    wait_for(lambda: ctx.pods.lookup("10.244.1.20") == ("default", "a"), what="pod a")
    api.put(pod("default", "b", NODE, "10.244.1.20"))
    api.delete("Pod", "default", "a")
    api.put(pod("default", "marker", NODE, "10.244.1.30"))  # events arrive in order: a's DELETED came first
    wait_for(lambda: ctx.pods.lookup("10.244.1.30"), what="marker pod")
    assert ctx.pods.snapshot() == {"10.244.1.20": ("default", "b"), "10.244.1.30": ("default", "marker")}


def test_recreated_service_new_cluster_ip(api: FakeAPI, watcher: tuple[kube.KubeWatcher, AppContext]) -> None:
    w, ctx = watcher
    svc = api.put(service(NS, SVC, "10.96.0.10"))
    api.put(endpoint_slice(NS, SVC, "kube-dns-x", [Endpoint("10.244.0.3", "coredns-a")],
                           owner_uid=svc["metadata"]["uid"]))
    w.start()
    wait_for(lambda: Target("10.96.0.10", 53, "service") in ctx.targets.snapshot(), what="service target")
    gets = len(api.calls("services", "get"))
    # Deleting a Service deletes its slices; the new one gets a new UID, cluster IP and slices.
    api.delete("EndpointSlice", NS, "kube-dns-x")
    api.delete("Service", NS, SVC)
    svc2 = api.put(service(NS, SVC, "10.96.0.53"))
    api.put(endpoint_slice(NS, SVC, "kube-dns-y", [Endpoint("10.244.0.4", "coredns-b")],
                           owner_uid=svc2["metadata"]["uid"]))
    want = (Target("10.244.0.4", 53, "endpoint", "coredns-b"), Target("10.96.0.53", 53, "service"))
    wait_for(lambda: ctx.targets.origin(dns_targets.ORIGIN) == want, what="the new Service IP and endpoint")
    assert len(api.calls("services", "get")) == gets + 1, "one GET per Service re-creation, no polling"
    assert len(api.calls("endpointslices", "list")) == 1


def test_stop_ends_every_thread_within_a_second(api: FakeAPI, watcher: tuple[kube.KubeWatcher, AppContext]) -> None:
    w, _ = watcher
    api.put(service(NS, SVC, "10.96.0.10"))
    w.start()
    wait_for(lambda: up(w) and len(api.calls("pods", "watch")) == 1
             and len(api.calls("endpointslices", "watch")) == 1, what="both watches open")
    time.sleep(0.2)  # both threads now blocked reading their watch streams
    t0 = time.monotonic()
    w.stop(1.0)
    assert time.monotonic() - t0 < 1.0
    assert w.alive() == []


def test_stop_while_retrying_an_unreachable_api(api: FakeAPI, watcher: tuple[kube.KubeWatcher, AppContext]) -> None:
    w, ctx = watcher
    api.stop()
    w.start()
    wait_for(lambda: w.state.snapshot()["endpointslices"].restarts >= 2, what="retries")
    assert not up(w)
    assert ctx.targets.origin(dns_targets.ORIGIN) == (), "no targets invented while the API was never reached"
    t0 = time.monotonic()
    w.stop(1.0)
    assert time.monotonic() - t0 < 1.0 and w.alive() == []


def test_paged_list_and_missing_service(api: FakeAPI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists are read page by page (limit/continue); a missing DNS Service leaves its endpoints probed and
    is picked up, without polling, when its slices name it as their owner."""
    for i in range(5):
        api.put(pod("default", f"web-{i}", NODE, f"10.244.1.{10 + i}"))
    api.put(endpoint_slice(NS, SVC, "kube-dns-x", [Endpoint("10.244.0.3", "coredns-a")], owner_uid="old-uid"))
    cfg = in_cluster(api, tmp_path, monkeypatch)
    ctx = AppContext()
    w = kube.KubeWatcher(cfg, NS, SVC, NODE, ctx.discovery, client.Timeouts(max_backoff=0.5, page_size=2))
    try:
        w.start()
        wait_for(lambda: len(ctx.pods) == 5, what="all pages of pods")
        assert [r.query.get("limit") for r in api.calls("pods", "list")] == ["2", "2", "2"]
        wait_for(lambda: ctx.targets.origin(dns_targets.ORIGIN) == (Target("10.244.0.3", 53, "endpoint", "coredns-a"),),
                 what="endpoints probed without the Service")
        snap = w.state.snapshot()
        assert not up(w) and snap["services"].objects == 0 and snap["services"].error == "not found"
        svc = api.put(service(NS, SVC, "10.96.0.10"))
        api.put(endpoint_slice(NS, SVC, "kube-dns-x", [Endpoint("10.244.0.3", "coredns-a")],
                               owner_uid=svc["metadata"]["uid"]))
        wait_for(lambda: Target("10.96.0.10", 53, "service") in ctx.targets.snapshot(), what="Service found")
        wait_for(lambda: up(w), what="kubernetes up")
    finally:
        w.stop(1.0)


def test_bookmarks_advance_the_resume_point(api: FakeAPI, watcher: tuple[kube.KubeWatcher, AppContext]) -> None:
    """A quiet watch still moves forward with the server's bookmarks, so after a cut it resumes from a recent
    resourceVersion (not one the server may already have compacted away)."""
    w, _ = watcher
    api.put(service(NS, SVC, "10.96.0.10"))
    w.start()
    wait_for(lambda: len(api.calls("endpointslices", "watch")) == 1, what="slice watch open")
    first = int(api.calls("endpointslices", "watch")[0].query["resourceVersion"])
    for i in range(3):  # changes elsewhere move the global resourceVersion, not the slices
        api.put(pod("default", f"web-{i}", NODE, f"10.244.1.{i + 1}"))
    latest = api.resource_version
    time.sleep(1.2)  # > bookmark interval (0.5 s)
    api.compact()
    api.drop_watches()
    wait_for(lambda: len(api.calls("endpointslices", "watch")) == 2, what="re-watch")
    resumed = int(api.calls("endpointslices", "watch")[1].query["resourceVersion"])
    assert resumed >= latest > first
    time.sleep(0.3)
    assert len(api.calls("endpointslices", "list")) == 1, "resumed from the bookmark: no 410, no relist"
