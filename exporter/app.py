"""The process: build the registry from the enabled features, serve HTTP, run background services,
and shut down cleanly on SIGTERM/SIGINT (within 2 s: DaemonSet rollouts wait for it)."""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import threading
from types import FrameType

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from exporter import __version__, logs
from exporter.collectors.base import Collector, CollectorError, ScrapeWrapper, Service
from exporter.features import AppContext, all_features
from exporter.server import ExporterHTTPServer

log = logs.get("main")


class BuildInfo:
    def collect(self) -> list[Metric]:
        g = GaugeMetricFamily("conntrack_dns_exporter_build_info",
                              "Always 1; the exporter's version and Python version as labels.",
                              labels=["version", "python_version"])
        g.add_metric([__version__, platform.python_version()], 1)
        return [g]

    def describe(self) -> list[Metric]:
        return []


def build_registry(collectors: list[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeWrapper(collectors))
    registry.register(BuildInfo())
    ProcessCollector(registry=registry)
    return registry


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    ctx = AppContext()
    collectors: list[Collector] = []
    services: list[Service] = []
    try:
        for feature in all_features():
            built = feature.build(args, ctx)
            collectors += built.collectors
            services += built.services
    except CollectorError as e:
        sys.stderr.write(f"conntrack-dns-exporter: error: {e}\n")
        return 2
    registry = build_registry(collectors)
    host, port = args.web_listen_address
    try:
        server = ExporterHTTPServer(host, port, registry, keepalive=args.web_keepalive,
                                    idle_timeout=args.web_idle_timeout)
    except OSError as e:
        sys.stderr.write(f"conntrack-dns-exporter: error: cannot listen on {host}:{port}: {e.strerror}\n")
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for svc in services:
        svc.start()
    web = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="web", daemon=True)
    web.start()
    server.ready.set()
    log.info("listening", extra={"kv": {"address": f"{host}:{server.port}", "version": __version__,
                                        "collectors": ",".join(c.name for c in collectors)}})
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    for svc in reversed(services):
        try:
            svc.stop(timeout=1.0)
        except Exception:
            log.exception("stopping %s failed", svc.name)
    log.info("stopped")
    return 0
