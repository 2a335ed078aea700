"""The active checks of `conntrack-dns-exporter diagnose`: the field reports' checklist, run in parallel
with bounded timeouts, each with the exporter's own code (netlink statistics, the table scanner, the
resolver, the Kubernetes discovery). A check that cannot run says why in `Evidence.unchecked`."""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
import urllib.request
from dataclasses import dataclass

from exporter.conntrack.stats import NetlinkStatsSource
from exporter.core.errors import ExporterError
from exporter.core.feature import AppContext
from exporter.diagnose.evidence import (
    CLUSTER,
    EXTERNAL,
    ConntrackEvidence,
    Evidence,
    KubeProxyEvidence,
    ResolvEvidence,
    TableEvidence,
    Tally,
    TargetEvidence,
    table_from_snapshot,
)
from exporter.discovery import Target
from exporter.dns import resolvconf
from exporter.dns.feature import FEATURE as DNS
from exporter.dns.resolver import lookup
from exporter.kubernetes.feature import FEATURE as KUBERNETES
from exporter.table.scan import Scanner
from exporter.table.service import TableScanService

RATES = ("drop", "insert_failed", "clash_resolve", "early_drop")
MODES = ("parallel", "sequential", "tcp")


@dataclass(frozen=True)
class Budget:
    """Wall-clock limits of each phase (the whole run stays under 10 s on a healthy node)."""

    discovery: float = 2.5
    probes: float = 3.0
    lookup_timeout: float = 0.8
    rounds: int = 6
    stats_window: float = 3.0
    table: float = 3.0
    kube_proxy: float = 1.0


def sample_conntrack(src: NetlinkStatsSource) -> tuple[float, dict[str, int], int | None, int | None]:
    s = src.sample()
    return time.monotonic(), s.totals(), s.entries, s.limit


def conntrack_evidence(first: tuple[float, dict[str, int], int | None, int | None],
                       second: tuple[float, dict[str, int], int | None, int | None]) -> ConntrackEvidence:
    t0, c0, _e0, _l0 = first
    t1, c1, e1, l1 = second
    dt = max(t1 - t0, 1e-3)
    return ConntrackEvidence(entries=e1 or 0, limit=l1, window=dt,
                             rates={k: max(0, c1.get(k, 0) - c0.get(k, 0)) / dt for k in RATES})


def table_evidence(ctx: AppContext, budget: Budget) -> TableEvidence:
    svc = TableScanService(Scanner(max_duration=budget.table), top_n=5, discovery=ctx.discovery)
    snap = svc.scan_once()
    ev = table_from_snapshot(snap)
    if ev is None:
        raise ExporterError(snap.message if snap else "table scan stopped", snap.reason if snap else "stopped")
    return ev


SERVICE_DRAWS = 2  # the Service IP's lookups per mode and round


async def _probe_target(t: Target, cluster_name: str, external_name: str, budget: Budget,
                        deadline: float) -> TargetEvidence:
    ev = TargetEvidence(t.server, t.kind, t.pod)
    plan = [("parallel", CLUSTER, cluster_name), ("sequential", CLUSTER, cluster_name), ("tcp", CLUSTER, cluster_name)]
    if external_name:
        plan.append(("parallel", EXTERNAL, external_name))
    if t.kind == "service":
        # each lookup is a new flow, which the Service's DNAT sends to a backend at random: twice the draws
        # (at once, so no extra time) let a stale endpoint with a small share show (verdict.service_ip_path)
        plan = plan * SERVICE_DRAWS
    loop = asyncio.get_running_loop()
    for _ in range(budget.rounds):
        left = deadline - loop.time()
        if left < budget.lookup_timeout * 0.5:
            break
        timeout = min(budget.lookup_timeout, left)
        results = await asyncio.gather(*(lookup(t.host, t.port, name, mode, timeout, 1) for mode, _, name in plan))
        for (mode, scope, _), r in zip(plan, results, strict=True):
            reason = next((o.reason for o in r.outcomes.values() if o.reason), None)
            ev.tallies.setdefault((mode, scope), Tally()).add(r.ok, r.duration, reason)
        await asyncio.sleep(0.05)
    return ev


NODELOCAL_ROUNDS, NODELOCAL_CONCURRENT = 3, 3


async def _nodelocal_answers(t: Target, name: str) -> bool:
    """Whether anything answers at the NodeLocal address. Packet loss must not be taken for absence: at 30 %
    loss on each hook a lookup's A and AAAA both fail a quarter of the time, so three sequential tries said
    "down" about once in fifty runs. Each round sends three lookups at once (18 queries in 3 rounds; the
    time when NodeLocal is really down stays 3 x 0.7 s)."""
    for _ in range(NODELOCAL_ROUNDS):
        rs = await asyncio.gather(*(lookup(t.host, t.port, name, "parallel", 0.7, 1)
                                    for _ in range(NODELOCAL_CONCURRENT)))
        if any(r.heard for r in rs):
            return True
    return False


async def probe_all(targets: list[Target], nodelocal: Target | None, cluster_name: str, external_name: str,
                    budget: Budget) -> tuple[list[TargetEvidence], bool | None]:
    answers: bool | None = None
    probed = list(targets)
    if nodelocal is not None:
        answers = await _nodelocal_answers(nodelocal, cluster_name)
        if answers:
            probed.append(nodelocal)
    deadline = asyncio.get_running_loop().time() + budget.probes
    out = await asyncio.gather(*(_probe_target(t, cluster_name, external_name, budget, deadline) for t in probed))
    return list(out), answers


def kube_proxy(url: str, timeout: float) -> KubeProxyEvidence:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read(4 << 20).decode("utf-8", "replace")
    except Exception as e:
        return KubeProxyEvidence(False, None, f"{url} not reachable ({type(e).__name__})")
    m = re.search(r"^kubeproxy_sync_proxy_rules_last_timestamp_seconds(?:\{[^}]*\})? ([0-9.e+]+)", text, re.M)
    if not m:
        return KubeProxyEvidence(True, None, "kube-proxy's metrics have no last-sync timestamp")
    return KubeProxyEvidence(True, max(0.0, time.time() - float(m.group(1))))


def resolv_evidence(path: str) -> ResolvEvidence:
    conf = resolvconf.load(path)
    return ResolvEvidence(path, list(conf.nameservers), list(conf.search), conf.ndots)


def kubelet_pod_resolv(namespace: str, domain: str, nameserver: str, node: ResolvEvidence | None) -> ResolvEvidence:
    """What the kubelet writes into a ClusterFirst pod (dnsPolicy default): ndots 5 and three cluster domains
    before the node's own search list."""
    search = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain, *(node.search if node else [])]
    return ResolvEvidence("kubelet default (ClusterFirst)", [nameserver], search[:6], 5)


def dns_loop(node: ResolvEvidence, cluster_ips: set[str]) -> str | None:
    into = [ns for ns in node.nameservers if ns in cluster_ips]
    if into:
        return (f"the node's resolv.conf ({node.source}) sends queries to the cluster DNS ({', '.join(into)}): "
                "CoreDNS forwarding to the node's resolver (`forward . /etc/resolv.conf`) loops back into itself")
    return None


def run(args: argparse.Namespace, budget: Budget) -> Evidence:
    """Every check; never raises for a check that fails (it goes to `unchecked`)."""
    ev = Evidence(external_name=args.diagnose_external_name)
    ctx = AppContext()
    # conntrack: first sample now, second at the end (rates over the whole run)
    src = NetlinkStatsSource()
    first = None
    try:
        first = sample_conntrack(src)
    except ExporterError as e:
        ev.unchecked.append(f"conntrack: {e}")
    # the same targets the running exporter would probe: flags, then Kubernetes, then resolv.conf
    try:
        # diagnose always probes, whatever --collector.dns says for the exporter
        DNS.build(argparse.Namespace(**{**vars(args), "collector_dns": True}), ctx)
    except ExporterError as e:
        ev.unchecked.append(f"probe flags: {e}")
    watcher = None
    try:
        built = KUBERNETES.build(args, ctx)
        watcher = built.services[0] if built.services else None
    except ExporterError as e:
        ev.unchecked.append(f"kubernetes: {e}")
    if watcher is None:
        if not any("kubernetes" in u for u in ev.unchecked):
            ev.unchecked.append("kubernetes: not configured (not in a pod, no kubeconfig): Service endpoints "
                                "not checked")
    else:
        watcher.start()
        ctx.discovery.wait_synced(budget.discovery)
        state = getattr(watcher, "state", None)
        errors = [f"{r}: {s.error}" for r, s in (state.snapshot().items() if state else []) if s.error]
        kube = [t for t in ctx.targets.origin("kubernetes")]
        if errors and not kube:
            ev.unchecked.append(f"kubernetes: API not answering ({'; '.join(errors)}): Service endpoints not checked")
        else:
            ev.kube_endpoints = sum(1 for t in kube if t.kind == "endpoint")
            ev.kube_service_ips = [t.host for t in kube if t.kind == "service"]
    targets = [t for t in ctx.targets.snapshot() if t.kind != "nodelocal"]
    nodelocal = next((t for t in ctx.targets.snapshot() if t.kind == "nodelocal"), None)
    try:
        ev.resolv_node = resolv_evidence(args.probe_resolv_conf)
    except OSError as e:
        ev.unchecked.append(f"node resolv.conf {args.probe_resolv_conf}: {e.strerror}")
    if not targets and ev.resolv_node is not None:
        targets = [Target(ns, 53, "resolvconf") for ns in ev.resolv_node.nameservers]
        ctx.targets.set("resolvconf", targets)
    if nodelocal is not None:
        ev.nodelocal = nodelocal.server
    # the rest in parallel: table scan and kube-proxy in threads, probes on an event loop
    results: dict[str, object] = {}

    def in_thread(key: str, fn: object) -> threading.Thread:
        def body() -> None:
            try:
                results[key] = fn()  # type: ignore[operator]
            except Exception as e:  # a check's failure is a line in the verdict, not a traceback
                results[key] = e
        th = threading.Thread(target=body, name=f"diagnose-{key}", daemon=True)
        th.start()
        return th

    threads = [in_thread("table", lambda: table_evidence(ctx, budget))]
    if args.diagnose_kube_proxy_url:
        threads.append(in_thread("kube_proxy", lambda: kube_proxy(args.diagnose_kube_proxy_url, budget.kube_proxy)))
    names = args.probe_name
    if targets or nodelocal:
        ev.targets, ev.nodelocal_answers = asyncio.run(
            probe_all(targets, nodelocal, names[0], args.diagnose_external_name, budget))
    else:
        ev.unchecked.append("DNS: no server to probe (no --probe.server, no Kubernetes, no nameserver in resolv.conf)")
    for th in threads:
        th.join(budget.table + 1.0)
    table = results.get("table")
    if isinstance(table, TableEvidence):
        ev.table = table
    else:
        ev.unchecked.append(f"conntrack table scan: {table}" if table else "conntrack table scan: did not finish")
    kp = results.get("kube_proxy")
    if isinstance(kp, KubeProxyEvidence):
        ev.kube_proxy = kp
        if not kp.reachable or kp.error:
            ev.unchecked.append(f"kube-proxy: {kp.error}")
    if first is not None:
        wait = budget.stats_window - (time.monotonic() - first[0])
        if wait > 0:
            time.sleep(wait)
        try:
            ev.conntrack = conntrack_evidence(first, sample_conntrack(src))
        except ExporterError as e:
            ev.unchecked.append(f"conntrack: {e}")
    src.close()
    if watcher is not None:
        watcher.stop(0.5)
    cluster_ips = set(ev.kube_service_ips) | {t.host for t in ctx.targets.snapshot()
                                              if t.kind in ("service", "endpoint")}
    if ev.resolv_node is not None:
        ev.loop = dns_loop(ev.resolv_node, cluster_ips)
    if args.diagnose_pod_resolv_conf:
        try:
            ev.resolv_pod = resolv_evidence(args.diagnose_pod_resolv_conf)
        except OSError as e:
            ev.unchecked.append(f"pod resolv.conf {args.diagnose_pod_resolv_conf}: {e.strerror}")
    else:
        server = (ev.kube_service_ips or [t.host for t in targets] or ["10.96.0.10"])[0]
        if nodelocal is not None and ev.nodelocal_answers:
            server = nodelocal.host
        ev.resolv_pod = kubelet_pod_resolv("default", args.diagnose_cluster_domain, server, ev.resolv_node)
    return ev
