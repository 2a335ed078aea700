"""`conntrack_table_top_sources` names the pods the Kubernetes pod watch reports, and follows it.

The Kubernetes API is a stand-in (`tests.support.fakeapi.FakeAPI`: the real API's JSON and watch streams;
no real kube-apiserver runs here), started inside the test namespace so the exporter, running there too,
reaches it on loopback. The conntrack entries are real kernel entries (ctfill) whose sources are the
pods' IPs; every row is checked against `conntrack -L` of the namespace mapped with the same pods.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_table_scan import _stable, conntrack_list, reference
from tests.support import ctfill
from tests.support.exporter_proc import Exporter, parse
from tests.support.fakeapi import FakeAPI, pod
from tests.support.netns import Netns, in_netns

pytestmark = pytest.mark.netns
NODE = "node-1"
TOP = "conntrack_table_top_sources"


@pytest.fixture
def api(netns: Netns) -> Iterator[FakeAPI]:
    fake = FakeAPI(bookmark_interval=1.0)
    in_netns(netns.name, fake.start)  # its listening socket lives in the test namespace
    try:
        yield fake
    finally:
        fake.stop()


def top_rows(samples: dict[Any, float]) -> dict[tuple[str, str], float]:
    rows = {}
    for (name, labels), v in samples.items():
        if name == TOP:
            d = dict(labels)
            rows[(d["namespace"], d["pod"])] = v
    return rows


def settled(ns: Netns, exp: Exporter, want: set[tuple[str, str]]) -> tuple[dict[Any, float], list[str]]:
    """Samples of a scan that named the pods `want` and started after an unchanged `conntrack -L` listing."""
    conn = exp.connect()
    samples: dict[Any, float] = {}
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            first = conntrack_list(ns)
            t0 = time.time()
            while time.monotonic() < deadline:
                conn.request("GET", "/metrics")
                samples = parse(conn.getresponse().read().decode())
                ts = samples.get(("conntrack_table_last_scan_timestamp_seconds", ()))
                dur = samples.get(("conntrack_table_scan_duration_seconds", ()))
                if ts is not None and dur is not None and ts - dur > t0:
                    break
                time.sleep(0.1)
            lines = conntrack_list(ns)
            if _stable(first) == _stable(lines) and want <= set(top_rows(samples)):
                break
    finally:
        conn.close()
    return samples, lines


def test_top_sources_name_the_pods_of_the_api_server(netns: Netns, api: FakeAPI, tmp_path: Path) -> None:
    ns = netns
    pods = {"198.18.0.1": ("shop", "cart-7d9f-x2"), "198.18.0.2": ("shop", "web-5c4b-q8"),
            "198.18.0.3": ("kube-system", "coredns-6f-9k")}
    for ip, (namespace, name) in pods.items():
        api.put(pod(namespace, name, NODE, ip))
    api.put(pod("kube-system", "kube-proxy-abc", NODE, "198.18.0.4", host_network=True))  # not a source of its own
    api.put(pod("shop", "elsewhere-1", "node-2", "198.18.0.5"))  # another node's pod: not in this node's map
    # 198.18.0.0-5 as sources: .0, .1 and .2 get 101 entries each, .3, .4 and .5 100
    ctfill.fill(ns.name, 603, sources=6)
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
    exp = Exporter(["--kubernetes.kubeconfig", kubeconfig, "--kubernetes.node-name", NODE,
                    "--no-collector.conntrack", "--collector.table.interval=0.3s", "--collector.table.cpu-budget=0",
                    "--collector.table.top-sources=2"], netns=ns)
    try:
        exp.wait_ready()
        samples, lines = settled(ns, exp, {("shop", "cart-7d9f-x2")})
        ref = reference(lines, pods=pods)["sources"]
        ranked = sorted(((n, p) for p, n in ref.items() if p != ("", "")), key=lambda x: (-x[0], x[1]))
        expected = {p: float(n) for n, p in ranked[:2]}
        expected[("", "")] = ref[("", "")]
        expected[("", "other")] = float(sum(n for n, _ in ranked[2:]))
        assert top_rows(samples) == expected, exp.stderr()
        assert set(expected) == {("shop", "cart-7d9f-x2"), ("shop", "web-5c4b-q8"), ("", ""), ("", "other")}
        assert expected[("", "other")] == 100  # kube-system/coredns, outside the top 2

        # the pod is deleted: its entries now count as unknown sources, the next pod moves up
        api.delete("Pod", "shop", "cart-7d9f-x2")
        del pods["198.18.0.1"]
        samples, lines = settled(ns, exp, {("kube-system", "coredns-6f-9k")})
        ref = reference(lines, pods=pods)["sources"]
        rows = top_rows(samples)
        assert rows == {("shop", "web-5c4b-q8"): ref[("shop", "web-5c4b-q8")],
                        ("kube-system", "coredns-6f-9k"): ref[("kube-system", "coredns-6f-9k")],
                        ("", ""): ref[("", "")], ("", "other"): 0.0}, exp.stderr()
        assert rows[("", "")] == 402  # the deleted pod's 101 joined the unknown sources
    finally:
        exp.stop()
