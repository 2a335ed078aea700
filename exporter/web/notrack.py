"""`--web.notrack`: exempt the exporter's own listen port from conntrack, so new scrape connections work
even when the conntrack table is full (NodeLocal DNSCache does the same for its DNS traffic).

At start the exporter installs an nftables table of its own, in one atomic `nft -f` transaction:

    table inet conntrack_dns_exporter_notrack {
      chain prerouting { type filter hook prerouting priority raw; policy accept; tcp dport PORT notrack }
      chain output     { type filter hook output priority raw; policy accept; tcp sport PORT notrack
                         fib daddr type local tcp dport PORT notrack }
    }

The second output rule covers a scraper on the node itself (127.0.0.1, the node's own addresses): its
SYN is created locally, so conntrack sees it in `output`, never in `prerouting`; `fib daddr type local`
keeps the node's outgoing connections to port PORT elsewhere (other nodes' exporters) tracked.

The transaction first declares and deletes the table, so a table left over by a crashed (SIGKILLed)
exporter is replaced, never duplicated; the table is deleted again on SIGTERM/SIGINT and normal exit.
It uses the `nft` binary (package `nftables`, in the image) rather than hand-built netlink messages: the
rule is four lines a person can read with `nft list table inet conntrack_dns_exporter_notrack`.
One exporter per network namespace owns the table (the DaemonSet runs one per node).

With Kubernetes discovery pointed at the API server's own address (`--kubernetes.api-server-address`),
the exporter's API connections (from local ports 19154-19169) are exempted too, in both directions, so
that discovery starts even when the exporter (re)starts while the table is full:

      ip daddr API tcp dport 6443 tcp sport 19154-19169 notrack
      ip saddr API tcp sport 6443 tcp dport 19154-19169 notrack

Untracked packets skip NAT and have `ct state untracked`: a node firewall that only accepts
`ct state established,related` must also accept untracked packets to this port.

Metrics: `conntrack_dns_exporter_web_notrack_rule_present` (gauge, 1 while the table is installed;
rechecked in the background, reinstalled if someone flushed the ruleset).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.core import logs
from exporter.core.feature import ExemptFlow

log = logs.get("notrack")

TABLE = "conntrack_dns_exporter_notrack"
FAMILY = "inet"
CHECK_INTERVAL = 30.0


class NotrackError(Exception):
    """nftables is missing or refused the rule; the message is one line."""


def _flow_rules(flows: Iterable[ExemptFlow]) -> str:
    """Both directions of each flow, in both chains (the peer may be on this node: a control-plane node,
    or loopback), matched on the flow's local port range too, so that only the exporter's own
    connections are exempted, never other clients of the same server."""
    out = ""
    for f in flows:
        ip = "ip6" if ":" in f.address else "ip"
        ports = f"{f.local_ports.start}-{f.local_ports.stop - 1}"
        out += (f"    {ip} daddr {f.address} tcp dport {f.port} tcp sport {ports} notrack\n"
                f"    {ip} saddr {f.address} tcp sport {f.port} tcp dport {ports} notrack\n")
    return out


def ruleset(port: int, flows: Iterable[ExemptFlow] = ()) -> str:
    flows = list(flows)
    return (
        f"table {FAMILY} {TABLE} {{}}\n"
        f"delete table {FAMILY} {TABLE}\n"
        f"table {FAMILY} {TABLE} {{\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f"    tcp dport {port} notrack\n"
        + _flow_rules(flows) +
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority raw; policy accept;\n"
        f"    tcp sport {port} notrack\n"
        f"    fib daddr type local tcp dport {port} notrack\n"
        + _flow_rules(flows) +
        "  }\n"
        "}\n"
    )


def _nft(args: list[str], stdin: str | None = None, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise NotrackError("--web.notrack needs nftables: the `nft` binary is not on PATH (install nftables)")
    try:
        return subprocess.run([nft, *args], input=stdin, text=True, capture_output=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NotrackError(f"--web.notrack: running nft failed: {e}") from None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "no message"


class Notrack:
    """The NOTRACK table for one port: `install()` at start, `remove()` at exit (idempotent both)."""

    name = "notrack"

    def __init__(self, port: int, check_interval: float = CHECK_INTERVAL, flows: Iterable[ExemptFlow] = ()) -> None:
        self.port = port
        self.flows = list(flows)
        self.check_interval = check_interval
        self.installed = False
        self.reinstalls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def install(self) -> None:
        r = _nft(["-f", "-"], stdin=ruleset(self.port, self.flows))
        if r.returncode != 0:
            msg = _first_line(r.stderr)
            if "Operation not permitted" in r.stderr:
                msg = "Operation not permitted (needs CAP_NET_ADMIN in the node's network namespace)"
            elif "No such file or directory" in r.stderr or "not supported" in r.stderr.lower():
                msg = f"{msg} (kernel without nf_tables / raw-priority chains?)"
            raise NotrackError(f"--web.notrack: cannot install nftables table {FAMILY} {TABLE}: {msg}")
        with self._lock:
            self.installed = True
        log.info("conntrack exemption installed", extra={"kv": {"table": f"{FAMILY} {TABLE}", "port": self.port}})

    def present(self) -> bool:
        try:
            return _nft(["list", "table", FAMILY, TABLE]).returncode == 0
        except NotrackError:
            return False

    def remove(self) -> None:
        with self._lock:
            was = self.installed
            self.installed = False
        if not was:
            return
        try:
            r = _nft(["delete", "table", FAMILY, TABLE], timeout=1.0)
        except NotrackError as e:
            log.warning("%s", e)
            return
        if r.returncode != 0 and "No such file" not in r.stderr:
            log.warning("cannot remove nftables table %s %s: %s", FAMILY, TABLE, _first_line(r.stderr))
        else:
            log.info("conntrack exemption removed")

    # Service protocol: a background check that puts the table back if a ruleset flush removed it.
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="notrack", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_interval):
            with self._lock:
                if not self.installed:
                    return
            if self.present():
                continue
            log.warning("nftables table %s %s vanished (ruleset flushed?); reinstalling", FAMILY, TABLE)
            try:
                self.install()
                self.reinstalls += 1
            except NotrackError as e:
                with self._lock:
                    self.installed = False
                log.error("%s", e)

    # Collector protocol
    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily("conntrack_dns_exporter_web_notrack_rule_present",
                              "1 while the exporter's nftables NOTRACK table for its listen port is installed.")
        g.add_metric([], 1.0 if self.installed else 0.0)
        c = CounterMetricFamily("conntrack_dns_exporter_web_notrack_reinstalls_total",
                                "Times the NOTRACK table was found missing and installed again.")
        c.add_metric([], float(self.reinstalls))
        return [g, c]
