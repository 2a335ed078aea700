"""The process: build the registry from the enabled features, serve HTTP, run background services,
and shut down cleanly on SIGTERM/SIGINT (within 2 s: DaemonSet rollouts wait for it) and on every other
signal whose default would kill the process (so the NOTRACK table is always removed). SIGHUP reloads
`--web.config.file` (a broken file keeps the previous one) and logs it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import platform
import select
import signal
import sys
import threading
import time
from types import FrameType

from prometheus_client import GCCollector, PlatformCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.core import caps, logs
from exporter.core.errors import ExporterError
from exporter.core.feature import AppContext
from exporter.core.process import ProcessCollector
from exporter.core.scrape import Collector, ScrapeWrapper, Service
from exporter.diagnose import page
from exporter.diagnose.live import LiveDiagnosis
from exporter.discovery import Target
from exporter.dnsflows.native import drain_name as event_parser_name
from exporter.features import all_features
from exporter.table.native import parser_name as table_parser_name
from exporter.web import webconfig
from exporter.web.notrack import Notrack, NotrackError
from exporter.web.server import ExporterHTTPServer

log = logs.get("main")


def build_revision() -> tuple[str, str]:
    """(revision, branch) of this build: the image build writes them into exporter/_build.py from its
    REVISION and BRANCH build args; a source checkout has none ("unknown")."""
    try:
        mod = importlib.import_module("exporter._build")
    except ImportError:
        return "unknown", "unknown"
    return str(getattr(mod, "REVISION", "") or "unknown"), str(getattr(mod, "BRANCH", "") or "unknown")


class BuildInfo:
    def __init__(self) -> None:
        self.revision, self.branch = build_revision()

    def collect(self) -> list[Metric]:
        g = GaugeMetricFamily("conntrack_dns_exporter_build_info",
                              "Always 1; the exporter's version, VCS revision and branch, Python version and "
                              "conntrack table dump parser and conntrack event parser (native or python) as labels.",
                              labels=["version", "revision", "branch", "python_version", "table_parser",
                                      "event_parser"])
        g.add_metric([__version__, self.revision, self.branch, platform.python_version(), table_parser_name(),
                      event_parser_name()], 1)
        return [g]

    def describe(self) -> list[Metric]:
        return []


def build_registry(collectors: list[Collector], exporter_metrics: bool = True) -> CollectorRegistry:
    """The exporter's registry. `exporter_metrics=False` (--web.disable-exporter-metrics) leaves out the
    metrics about the exporter process itself (process_*, python_*), as node_exporter leaves out go_* and
    process_*; build_info and the collector success/duration stay (dashboards and alerts use them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeWrapper(collectors))
    registry.register(BuildInfo())
    if exporter_metrics:
        registry.register(ProcessCollector())
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    ctx = AppContext()
    collectors: list[Collector] = []
    services: list[Service] = []
    try:
        for feature in all_features():
            feature.validate(args)
            built = feature.build(args, ctx)
            collectors += built.collectors
            services += built.services
    except ExporterError as e:
        sys.stderr.write(f"conntrack-dns-exporter: error: {e}\n")
        return 2
    registry = build_registry(collectors, exporter_metrics=not args.web_disable_exporter_metrics)
    live = _live_diagnosis(args, ctx)
    services.append(live)
    signals = Signals()
    web_config = None
    if args.web_config_file:
        try:
            web_config = webconfig.load(args.web_config_file)
        except webconfig.WebConfigError as e:
            sys.stderr.write(f"conntrack-dns-exporter: error: {e}\n")
            return 2
    host, port = args.web_listen_address
    try:
        server = ExporterHTTPServer(host, port, registry, keepalive=args.web_keepalive,
                                    idle_timeout=args.web_idle_timeout, read_timeout=args.web_read_timeout,
                                    max_connections=args.web_max_connections, web_config=web_config,
                                    telemetry_path=args.web_telemetry_path,
                                    landing=lambda: page.render(live, args.kubernetes_node_name,
                                                                args.web_telemetry_path),
                                    landing_public=args.web_status_page_public)
    except OSError as e:
        sys.stderr.write(f"conntrack-dns-exporter: error: cannot listen on {host}:{port}: {e.strerror}\n")
        return 2
    if not args.web_disable_exporter_metrics:
        registry.register(server)  # the web server's own counters (node_exporter's promhttp_* counterpart)
    exempt: Notrack | None = None
    if args.web_notrack:
        exempt = Notrack(server.port, check_interval=args.web_notrack_check_interval, flows=ctx.notrack_flows)
        try:
            exempt.install()
        except NotrackError as e:
            if not caps.net_admin_missing():
                # Asked for explicitly: fail the start (visible as CrashLoopBackOff during the rollout) rather
                # than run without it and be unreachable exactly when the table fills.
                server.server_close()
                sys.stderr.write(f"conntrack-dns-exporter: error: {e}\n")
                return 2
            # No NET_ADMIN at all (e.g. removed by policy): nothing that needs it can work, so serve what can
            # be served (DNS probes, collector_success 0) instead of crash-looping; the rule gauge says 0.
            log.warning("%s; serving without it: %s", e, caps.why_missing())
        registry.register(exempt)
        services.append(exempt)
    try:
        code = _serve(server, services, collectors, host, signals, args.web_config_file)
    finally:
        if exempt is not None:
            exempt.remove()
    _exit_if_threads_linger(code)
    return code


def _live_diagnosis(args: argparse.Namespace, ctx: AppContext) -> LiveDiagnosis:
    """The `/` page's verdict, from what the data paths already measure (no extra probes or scans)."""
    nodelocal = None
    if getattr(args, "probe_nodelocal", None) is not None:
        host, port = args.probe_nodelocal
        nodelocal = Target(host, port, "nodelocal").server
    return LiveDiagnosis(ctx, nodelocal=nodelocal)


def _exit_if_threads_linger(code: int) -> None:
    """Python waits for non-daemon threads at exit; one stuck in a blocking call would hold the pod in
    Terminating until the grace period ends. Exit now instead (everything that matters is done)."""
    lingering = [t.name for t in threading.enumerate()
                 if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if lingering:
        log.warning("exiting with threads still running: %s", ",".join(lingering))
        logging.shutdown()
        os._exit(code)


# Signals whose default action ends the process (crash signals aside): each becomes a clean shutdown.
TERMINATING = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
               "SIGXCPU", "SIGIO", "SIGPWR", "SIGSTKFLT")


class Signals:
    """Installed before anything needs cleaning up (the NOTRACK table): a signal sets a flag, the main
    loop acts on it. The main loop sleeps in `wait()` until a signal comes: a signal may be delivered to any
    thread, and Python runs its handler only on the main one, so the C-level handler's write to the wakeup
    fd (whatever thread it ran on) is what wakes the loop, and the signal numbers read from it set the
    flags at once (the Python handler, which logs, runs right after on the main thread)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        for name in TERMINATING:
            sig = getattr(signal, name, None)
            if sig is not None and (sig in (signal.SIGINT, signal.SIGTERM) or signal.getsignal(sig) == signal.SIG_DFL):
                signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload.set()

    def wait(self) -> None:
        """Until a signal has come (no wake-ups meanwhile); then stop or reload is set."""
        if self.stop.is_set() or self.reload.is_set():
            return
        select.select([self._wakeup[0]], [], [])
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._wakeup[0], 512):
                (self.reload if signum == signal.SIGHUP else self.stop).set()


def reload_web_config(server: ExporterHTTPServer, path: str) -> None:
    """SIGHUP: re-read the web config now (it is also re-read when it changes); a broken file is logged
    by the web config and the previous one kept."""
    if not path:
        log.info("received SIGHUP; no --web.config.file to reload")
        return
    log.info("received SIGHUP; reloading the web config", extra={"kv": {"file": path}})
    server.reload_web_config()


def _serve(server: ExporterHTTPServer, services: list[Service], collectors: list[Collector], host: str,
           signals: Signals, web_config_file: str = "") -> int:
    stop = signals.stop
    for svc in services:
        svc.start()
    # Wake-ups cost CPU on every node (15 a second were 0.1% of a core): the accept loop waits without a
    # timeout (server.shutdown() wakes it), the main loop until a signal comes (Signals.wait).
    web = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, name="web", daemon=True)
    web.start()
    server.ready.set()
    log.info("listening", extra={"kv": {"address": f"{host}:{server.port}", "version": __version__,
                                        "collectors": ",".join(c.name for c in collectors)}})
    while not stop.is_set():
        signals.wait()
        if signals.reload.is_set() and not stop.is_set():
            signals.reload.clear()
            reload_web_config(server, web_config_file)
    # Everything below must finish well within 2 s (DaemonSet rollouts; terminationGracePeriodSeconds).
    server.shutdown()
    server.server_close()
    stop_services(services, SERVICE_STOP_BUDGET)
    log.info("stopped")
    return 0


SERVICE_STOP_BUDGET = 1.0


def stop_services(services: list[Service], budget: float) -> None:
    """Stop every service concurrently (newest first), waiting at most `budget` seconds in total.

    A service still busy after that is left behind: its threads are daemons and the process exits.
    """
    deadline = time.monotonic() + budget

    def stop_one(svc: Service) -> None:
        try:
            svc.stop(timeout=budget)
        except Exception:
            log.exception("stopping %s failed", svc.name)

    threads = [threading.Thread(target=stop_one, args=(svc,), name=f"stop-{svc.name}", daemon=True)
               for svc in reversed(services)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = [t.name.removeprefix("stop-") for t in threads if t.is_alive()]
    if late:
        log.warning("services still stopping after %.1fs, exiting anyway: %s", budget, ",".join(late))
