"""Flags and wiring of the synthetic DNS probes (`dns` collector + `dns-probes` background service).

Targets from flags go into the shared target registry under the origins `static` (`--probe.server`)
and `nodelocal` (`--probe.nodelocal`); the probe loop adds `resolvconf` itself when no origin provides
any target (the Kubernetes feature, registered before this one, may provide `service`/`endpoint`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket

import dns.exception
import dns.name

from exporter.core.errors import ConfigError
from exporter.core.feature import AppContext, Built, Feature
from exporter.core.flags import add_flag, duration, int_range, parse_hostport
from exporter.discovery.targets import Target
from exporter.dns import resolvconf
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.models import DEFAULT_RESOLVERS, RESOLVERS
from exporter.dns.resolver import MODES
from exporter.dns.scheduler import ProbeConfig, ProbeService
from exporter.dns.store import DEFAULT_CLUSTER_DOMAIN, ProbeStore

DEFAULT_NAME = "kubernetes.default.svc.cluster.local."
DEFAULT_TIMEOUT = 5.0  # glibc's RES_TIMEOUT
DEFAULT_ATTEMPTS = 2  # glibc's RES_DFLRETRY


def server_address(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT` or `[IPv6]:PORT`; names are refused (resolving them would need DNS to work)."""
    host, port = parse_hostport(text, default_port=53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid DNS server {text!r}: want an IP address[:port]") from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"invalid DNS server {text!r}: port 0")
    return host, port


def _name(text: str, absolute: bool) -> str:
    s = text.strip()
    if not s or s == ".":
        raise argparse.ArgumentTypeError(f"invalid DNS name {text!r}")
    try:
        n = dns.name.from_text(s if absolute or s.endswith(".") else s + ".")
    except dns.exception.DNSException as e:
        raise argparse.ArgumentTypeError(f"invalid DNS name {text!r}: {e}") from None
    if not all(label and all(32 < c < 127 for c in label) for label in n.labels[:-1]):
        raise argparse.ArgumentTypeError(f"invalid DNS name {text!r}")
    return n.to_text() if absolute else s


def probe_name(text: str) -> str:
    """A probed name, made absolute (`kubernetes.default.svc.cluster.local.`)."""
    return _name(text, absolute=True)


def search_name(text: str) -> str:
    """A search-probe name, kept as given: whether it has a trailing dot changes the walk."""
    return _name(text, absolute=False)


def cluster_domain(text: str) -> str:
    return probe_name(text).rstrip(".")


def modes(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for m in (p.strip() for p in text.split(",")):
        if m not in MODES:
            raise argparse.ArgumentTypeError(f"unknown probe mode {m!r} (choose from {', '.join(MODES)})")
        if m not in out:
            out.append(m)
    return tuple(out)


def resolvers(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for r in (p.strip() for p in text.split(",")):
        if not r or r == "none":
            continue
        if r not in RESOLVERS:
            raise argparse.ArgumentTypeError(f"unknown resolver {r!r} (choose from {', '.join(RESOLVERS)}, none)")
        if r not in out:
            out.append(r)
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DNS probes")
    add_flag(g, "--collector.dns", default=True, action="bool",
             help="Run synthetic DNS probes (parallel A/AAAA like glibc, sequential, TCP) in the background.")
    add_flag(g, "--probe.server", action="append", type=server_address, metavar="IP[:PORT]",
             help="DNS server to probe (kind static); repeatable.")
    add_flag(g, "--probe.resolv-conf", default="/etc/resolv.conf", metavar="PATH",
             help="Probe this file's nameservers (kind resolvconf) when no other target is configured; "
                  "its search list and ndots drive --probe.search-name. Re-read only when it changes; a FIFO, "
                  "device or file over 256 KiB is refused.")
    add_flag(g, "--probe.nodelocal", default=None, type=server_address, metavar="IP[:PORT]",
             help="NodeLocal DNSCache address (e.g. 169.254.20.10), probed only while it answers.")
    add_flag(g, "--probe.name", action="append", type=probe_name, default=[DEFAULT_NAME], metavar="NAME",
             help=f"Name to look up (A and AAAA); repeatable (default {DEFAULT_NAME}).")
    add_flag(g, "--probe.cluster-domain", default=DEFAULT_CLUSTER_DOMAIN, type=cluster_domain, metavar="DOMAIN",
             help="Probe names in this domain count as zone=\"cluster\", all others as zone=\"external\" "
                  "(so the upstream's failures show apart from CoreDNS's).")
    add_flag(g, "--probe.modes", default=("parallel", "tcp"), type=modes, metavar="MODE,...",
             help="Per-query probe modes: parallel (A+AAAA on one UDP socket), sequential (a fresh socket "
                  "per query), tcp (one connection).")
    add_flag(g, "--probe.resolvers", default=DEFAULT_RESOLVERS, type=resolvers, metavar="RESOLVER,...",
             help="Application lookups that wait as these C libraries do (dns_probe_lookups_total): "
                  f"{', '.join(RESOLVERS)}, or none.")
    add_flag(g, "--probe.timeout", default=None, type=duration(0.001, 30),
             help=f"Per-attempt timeout, as resolv.conf's options timeout (default {DEFAULT_TIMEOUT:g}s; "
                  "resolv.conf targets: that file's options timeout).")
    add_flag(g, "--probe.attempts", default=None, type=int_range(1, 5),
             help=f"Transmissions per query, as resolv.conf's options attempts (default {DEFAULT_ATTEMPTS}; "
                  "resolv.conf targets: that file's options attempts).")
    add_flag(g, "--probe.interval", default=5.0, type=duration(0.1, 86400), help="Time between probe rounds.")
    add_flag(g, "--probe.concurrency", default=8, type=int_range(1, 1024),
             help="Lookups in flight at most, per target (a slow target only delays itself).")
    add_flag(g, "--probe.endpoints-per-round", default=2, type=int_range(1, 1000), metavar="K",
             help="CoreDNS endpoints (kind endpoint) probed per round, chosen by a hash of the node name, so "
                  "that each node covers all within ceil(endpoints/K) rounds and the fleet spreads its load "
                  "(docs/scale.md); the Service IP and NodeLocal are probed every round.")
    add_flag(g, "--probe.search-name", action="append", type=search_name, metavar="NAME",
             help="Walk resolv.conf's search list for this name as glibc does and record queries and time; "
                  "repeatable.")


def node_name(args: argparse.Namespace) -> str:
    """The name seeding the endpoint sampler: --kubernetes.node-name (the Kubernetes feature's flag, env
    NODE_NAME), else NODE_NAME, else the host name (hostNetwork: the node's)."""
    return (getattr(args, "kubernetes_node_name", "") or os.environ.get("NODE_NAME", "").strip()
            or socket.gethostname())


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    if not args.collector_dns:
        return Built()
    why = resolvconf.check(args.probe_resolv_conf)
    if why:  # a FIFO or device would block or flood the probe loop; a missing file may appear later
        raise ConfigError(f"--probe.resolv-conf {args.probe_resolv_conf} {why}")
    static = [Target(h, p, "static") for h, p in args.probe_server]
    ctx.targets.set("static", static)
    if args.probe_nodelocal is not None:
        h, p = args.probe_nodelocal
        ctx.targets.set("nodelocal", [Target(h, p, "nodelocal")])
    config = ProbeConfig(
        names=tuple(dict.fromkeys(args.probe_name)),
        modes=args.probe_modes,
        resolvers=args.probe_resolvers,
        timeout=args.probe_timeout if args.probe_timeout is not None else DEFAULT_TIMEOUT,
        attempts=args.probe_attempts if args.probe_attempts is not None else DEFAULT_ATTEMPTS,
        resolv_timeout=args.probe_timeout is None,
        resolv_attempts=args.probe_attempts is None,
        interval=args.probe_interval,
        concurrency=args.probe_concurrency,
        resolv_conf=args.probe_resolv_conf,
        search_names=tuple(dict.fromkeys(args.probe_search_name)),
        endpoints_per_round=args.probe_endpoints_per_round,
        node=node_name(args),
    )
    store = ProbeStore(config.names, args.probe_cluster_domain)
    ctx.shared["dns.store"] = store
    return Built(collectors=[DnsProbeCollector(store, ctx.targets)],
                 services=[ProbeService(config, ctx.discovery, store)])


FEATURE = Feature("dns", add_arguments, build)
