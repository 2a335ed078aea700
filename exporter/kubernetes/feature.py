"""Flags and wiring of the Kubernetes discovery (DNS Service + EndpointSlices -> probe targets, pods -> PodIndex).

See docs/kubernetes.md for the RBAC rules it needs and how it behaves when the API server blips.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re

from exporter.core import files, logs
from exporter.core.errors import ConfigError
from exporter.core.feature import AppContext, Built, ExemptFlow, Feature
from exporter.core.flags import add_flag, duration
from exporter.kubernetes.client import Timeouts
from exporter.kubernetes.collector import KubernetesCollector
from exporter.kubernetes.config import SA_DIR, in_cluster_available, load_configuration
from exporter.kubernetes.incluster import API_SOURCE_PORTS
from exporter.kubernetes.watcher import KubeWatcher

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

log = logs.get("kubernetes")


def dns_service(text: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` -> (namespace, name), both DNS-1123 labels as Kubernetes requires."""
    ns, sep, name = text.strip().partition("/")
    if not sep or not _DNS1123_LABEL.fullmatch(ns) or not _DNS1123_LABEL.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"invalid DNS service {text!r} (want NAMESPACE/NAME, e.g. kube-system/kube-dns)")
    return ns, name


def node_name(text: str) -> str:
    s = text.strip()
    if s and not _DNS1123_SUBDOMAIN.fullmatch(s):
        raise argparse.ArgumentTypeError(f"invalid node name {text!r} (want a DNS-1123 subdomain)")
    return s


def api_address(text: str) -> tuple[str, int] | None:
    """`IP:PORT` (`[IPv6]:PORT`) of the API server itself; empty: none."""
    s = text.strip()
    if not s:
        return None
    host, sep, port = s.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        if not sep or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid API server address {text!r} (want IP:PORT, e.g. 192.168.0.2:6443)") from None
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("kubernetes discovery")
    add_flag(g, "--kubernetes.enabled", default="auto", choices=("auto", "true", "false"),
             help="Discover the cluster DNS Service and its endpoints from the Kubernetes API. auto: when running "
                  "in a pod (service account) or a kubeconfig is given (--kubernetes.kubeconfig or KUBECONFIG).")
    add_flag(g, "--kubernetes.kubeconfig", default=None, metavar="PATH",
             help="kubeconfig file to use instead of the in-cluster service account (default: KUBECONFIG).")
    add_flag(g, "--kubernetes.service-account-dir", default=SA_DIR, metavar="DIR",
             help="Where the in-cluster ServiceAccount's token and ca.crt are (the API server is "
                  "KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT).")
    add_flag(g, "--kubernetes.api-server-address", default=None, type=api_address, metavar="IP:PORT",
             help="In a pod: reach the API server at its own address instead of the kubernetes Service IP "
                  "(KUBERNETES_SERVICE_HOST), so that --web.notrack can exempt the connection from conntrack "
                  "and discovery starts even while the table is full. The certificate is checked for "
                  "kubernetes.default.svc.")
    add_flag(g, "--kubernetes.dns-service", default=("kube-system", "kube-dns"), type=dns_service,
             metavar="NAMESPACE/NAME", help="The cluster DNS Service whose IP and endpoints are probed.")
    add_flag(g, "--kubernetes.node-name", default=os.environ.get("NODE_NAME", "").strip(), type=node_name,
             metavar="NODE", help="This node's name, to watch the pods on it (default: env NODE_NAME, set from "
                                  "the downward API; argparse checks that default too). Empty: no pod map.")
    add_flag(g, "--kubernetes.max-backoff", default=30.0, type=duration(0.1, 3600),
             help="Longest wait between retries when the API server fails (backoff doubles up to it, with jitter).")


def resolve(args: argparse.Namespace) -> tuple[str | None, bool] | None:
    """Which configuration to load: (kubeconfig path or None, in_cluster), or None when disabled.

    Raises ConfigError (exit 2) for `true` without any configuration or an unreadable kubeconfig flag.
    """
    mode = args.kubernetes_enabled
    if mode == "false":
        return None
    if args.kubernetes_kubeconfig:
        if not os.path.isfile(args.kubernetes_kubeconfig):
            why = files.not_regular(args.kubernetes_kubeconfig) or "no such file"
            raise ConfigError(f"--kubernetes.kubeconfig {args.kubernetes_kubeconfig}: {why}")
        return args.kubernetes_kubeconfig, False
    if in_cluster_available(args.kubernetes_service_account_dir):
        return None, True
    if os.environ.get("KUBECONFIG"):
        return None, False
    if mode == "true":
        raise ConfigError("--kubernetes.enabled=true but no Kubernetes configuration: not running in a pod "
                             "(KUBERNETES_SERVICE_HOST/PORT and a service account token) and neither "
                             "--kubernetes.kubeconfig nor KUBECONFIG is set")
    return None


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    choice = resolve(args)
    if choice is None:
        if args.kubernetes_enabled == "auto":
            log.debug("Kubernetes discovery off: not in a pod and no kubeconfig given")
        return Built()
    kubeconfig, in_cluster = choice
    address = args.kubernetes_api_server_address if in_cluster else None
    try:
        cfg = load_configuration(kubeconfig, in_cluster, args.kubernetes_service_account_dir, address)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    exempt = False
    if getattr(args, "web_notrack", False):
        if address is not None:
            cfg.source_ports = API_SOURCE_PORTS
            ctx.notrack_flows.append(ExemptFlow(address[0], address[1], API_SOURCE_PORTS))
            exempt = True
        else:
            log.warning("the Kubernetes API connection is not exempt from conntrack: it goes through a Service IP "
                        "(DNAT needs conntrack) or a kubeconfig; an exporter (re)started while the table is full "
                        "cannot start discovery. Set --kubernetes.api-server-address to the API server's own "
                        "address to exempt it (docs/kubernetes.md)")
    ns, name = args.kubernetes_dns_service
    timeouts = Timeouts(max_backoff=args.kubernetes_max_backoff)
    watcher = KubeWatcher(cfg, ns, name, args.kubernetes_node_name, ctx.discovery, timeouts)
    watcher.state.exempt = exempt
    return Built(collectors=[KubernetesCollector(watcher.state)], services=[watcher])


FEATURE = Feature("kubernetes", add_arguments, build)
