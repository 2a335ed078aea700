"""Flags and wiring of the synthetic DNS probes (`dns` collector + `dns-probes` background service).

Targets from flags go into the shared target registry under the origins `static` (`--probe.server`)
and `nodelocal` (`--probe.nodelocal`); the probe loop adds `resolvconf` itself when no origin provides
any target (the Kubernetes feature, registered before this one, may provide `service`/`endpoint`).
"""

from __future__ import annotations

import argparse
import ipaddress

import dns.exception
import dns.name

from exporter.core.feature import AppContext, Built, Feature
from exporter.core.flags import add_flag, parse_duration, parse_hostport, positive_int
from exporter.discovery.targets import Target
from exporter.dns.collector import DnsProbeCollector
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DNS probes")
    add_flag(g, "--collector.dns", default=True, action="bool",
             help="Run synthetic DNS probes (parallel A/AAAA like glibc, sequential, TCP) in the background.")
    add_flag(g, "--probe.server", action="append", type=server_address, metavar="IP[:PORT]",
             help="DNS server to probe (kind static); repeatable.")
    add_flag(g, "--probe.resolv-conf", default="/etc/resolv.conf", metavar="PATH",
             help="Probe this file's nameservers (kind resolvconf) when no other target is configured; "
                  "its search list and ndots drive --probe.search-name.")
    add_flag(g, "--probe.nodelocal", default=None, type=server_address, metavar="IP[:PORT]",
             help="NodeLocal DNSCache address (e.g. 169.254.20.10), probed only while it answers.")
    add_flag(g, "--probe.name", action="append", type=probe_name, default=[DEFAULT_NAME], metavar="NAME",
             help=f"Name to look up (A and AAAA); repeatable (default {DEFAULT_NAME}).")
    add_flag(g, "--probe.cluster-domain", default=DEFAULT_CLUSTER_DOMAIN, type=cluster_domain, metavar="DOMAIN",
             help="Probe names in this domain count as zone=\"cluster\", all others as zone=\"external\" "
                  "(so the upstream's failures show apart from CoreDNS's).")
    add_flag(g, "--probe.modes", default=("parallel", "tcp"), type=modes, metavar="MODE,...",
             help="Probe modes: parallel (one UDP socket, like glibc), sequential (single-request-reopen), "
                  "tcp (use-vc).")
    add_flag(g, "--probe.timeout", default=None, type=parse_duration,
             help=f"Per-attempt timeout, as resolv.conf's options timeout (default {DEFAULT_TIMEOUT:g}s; "
                  "resolv.conf targets: that file's options timeout).")
    add_flag(g, "--probe.attempts", default=None, type=positive_int,
             help=f"Transmissions per query, as resolv.conf's options attempts (default {DEFAULT_ATTEMPTS}; "
                  "resolv.conf targets: that file's options attempts).")
    add_flag(g, "--probe.interval", default=5.0, type=parse_duration, help="Time between probe rounds.")
    add_flag(g, "--probe.concurrency", default=8, type=positive_int, help="Lookups in flight at most.")
    add_flag(g, "--probe.search-name", action="append", type=search_name, metavar="NAME",
             help="Walk resolv.conf's search list for this name as glibc does and record queries and time; "
                  "repeatable.")


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    if not args.collector_dns:
        return Built()
    static = [Target(h, p, "static") for h, p in args.probe_server]
    ctx.targets.set("static", static)
    if args.probe_nodelocal is not None:
        h, p = args.probe_nodelocal
        ctx.targets.set("nodelocal", [Target(h, p, "nodelocal")])
    config = ProbeConfig(
        names=tuple(dict.fromkeys(args.probe_name)),
        modes=args.probe_modes,
        timeout=args.probe_timeout if args.probe_timeout is not None else DEFAULT_TIMEOUT,
        attempts=args.probe_attempts if args.probe_attempts is not None else DEFAULT_ATTEMPTS,
        resolv_timeout=args.probe_timeout is None,
        resolv_attempts=args.probe_attempts is None,
        interval=args.probe_interval,
        concurrency=args.probe_concurrency,
        resolv_conf=args.probe_resolv_conf,
        search_names=tuple(dict.fromkeys(args.probe_search_name)),
    )
    store = ProbeStore(config.names, args.probe_cluster_domain)
    ctx.shared["dns.store"] = store
    return Built(collectors=[DnsProbeCollector(store, ctx.targets)],
                 services=[ProbeService(config, ctx.discovery, store)])


FEATURE = Feature("dns", add_arguments, build)
