"""Issue 13 item 11: an exporter (re)started while the node's conntrack table is full still discovers.

Real kernel, real process: namespace "node" has conntrack active (an nftables rule that uses it, as
kube-proxy's do) and its table filled to nf_conntrack_max with real entries (tests.support.ctfill). The
stand-in API server (tests.support.fakeapi: the real API's JSON and watch streams over HTTPS, a
ServiceAccount token and CA the test writes; no kube-apiserver can run here) listens inside that
namespace, and the exporter runs there as in a pod (KUBERNETES_SERVICE_HOST/PORT, `--web.notrack`).
The test's own scrapes are exempted by a table of the test (the exporter's port only), never the API's.

1. Without `--kubernetes.api-server-address` the API connection needs a conntrack entry: discovery cannot
   start, and `kubernetes_blocked_by_conntrack` says why (the failure the lab showed).
2. With it, `--web.notrack` exempts the exporter's own API connections: the Service IP and the endpoint
   are discovered at 100% and `kubernetes_up` is 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import ctfill
from tests.support.exporter_proc import Exporter, Samples, value
from tests.support.fakeapi import Endpoint, FakeAPI, endpoint_slice, service
from tests.support.netns import Netns, in_netns, skip_reason
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 19153
NS, SVC, NODE = "kube-system", "kube-dns", "node-1"
BLOCKED = "conntrack_dns_exporter_kubernetes_blocked_by_conntrack"
UP = "conntrack_dns_exporter_kubernetes_up"


def discovered(s: Samples) -> set[tuple[str, str]]:
    return {(d["server"], d["kind"]) for (name, labels), v in s.items()
            if name == "dns_probe_target_info" and v == 1 and (d := dict(labels))["kind"] in ("service", "endpoint")}


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_discovery_starts_in_a_full_table_only_with_the_api_exempt(tmp_path: Path) -> None:
    ns = Netns()
    api = FakeAPI(bookmark_interval=1.0, tls=True)
    try:
        ns.exec(["nft", "add table ip usesct; add chain ip usesct out { type filter hook output priority 0; }; "
                 "add rule ip usesct out ct state new counter; "
                 "add table ip testscrape; "
                 "add chain ip testscrape pre { type filter hook prerouting priority -300; }; "
                 "add chain ip testscrape out { type filter hook output priority -300; }; "
                 f"add rule ip testscrape pre tcp dport {PORT} notrack; add rule ip testscrape out tcp dport {PORT} "
                 "notrack"])
        in_netns(ns.name, api.start)
        svc = api.put(service(NS, SVC, "10.96.0.10"))
        api.put(endpoint_slice(NS, SVC, "kube-dns-x", [Endpoint("10.244.0.5", "coredns-a", node=NODE)],
                               owner_uid=svc["metadata"]["uid"]))
        sa = api.write_service_account(str(tmp_path / "sa"))
        entries = ctfill.fill_to(ns.name)
        assert entries == ctfill.stats(ns.name)[1], "the table must be full before the exporter starts"
        env = {**api.in_cluster_env(), "NODE_NAME": NODE, "KUBECONFIG": ""}
        base = ["--web.notrack", f"--kubernetes.service-account-dir={sa}", "--kubernetes.max-backoff=1s",
                "--no-collector.table", "--collector.dns", "--probe.interval=1s"]

        # 1. through an address that needs conntrack: blocked, and the metric says so
        exp = Exporter(base, netns=ns, port=PORT, env=env)
        try:
            exp.wait_ready()
            s = wait_until("blocked_by_conntrack 1", lambda: (lambda s: s if value(s, BLOCKED) == 1 else None)(
                exp.scrape()), 20, 0.5)
            assert value(s, UP) == 0 and discovered(s) == set()
            assert value(s, "conntrack_dns_exporter_kubernetes_api_notrack") == 0
            assert "not exempt from conntrack" in exp.stderr()
        finally:
            exp.stop()

        # 2. the API server's own address: exempt, discovery works at 100%
        exp = Exporter([*base, f"--kubernetes.api-server-address=127.0.0.1:{api.port}"], netns=ns, port=PORT,
                       env=env)
        try:
            exp.wait_ready()
            t0 = time.monotonic()
            s = wait_until("discovered", lambda: (lambda s: s if discovered(s) else None)(exp.scrape()), 10, 0.2)
            assert time.monotonic() - t0 < 10
            assert discovered(s) == {("10.96.0.10:53", "service"), ("10.244.0.5:53", "endpoint")}
            s = wait_until("kubernetes_up 1", lambda: (lambda s: s if value(s, UP) == 1 else None)(exp.scrape()),
                           10, 0.2)
            assert value(s, BLOCKED) == 0 and value(s, "conntrack_dns_exporter_kubernetes_api_notrack") == 1
            rules = ns.exec(["nft", "list", "table", "inet", "conntrack_dns_exporter_notrack"]).stdout
            assert f"tcp dport {api.port} tcp sport 19154-19169 notrack" in rules
        finally:
            exp.stop()
        assert ctfill.stats(ns.name)[0] >= 0.99 * ctfill.stats(ns.name)[1], "the table emptied during the test"
    finally:
        api.stop()
        ns.delete()
