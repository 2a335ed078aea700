"""Conntrack collector: scrape cost on a full 262,144-entry table vs node_exporter, idle RSS, sample cost.

One run, in a namespace this benchmark creates and fills to the limit (tests.support.ctfill):
1. our exporter with only the conntrack collector, and Debian's prometheus-node-exporter with only its
   conntrack collector, each scraped 500 times back to back over one keep-alive connection (the
   namespace's loopback is NOTRACKed so the scrapes do not need table entries): median and p99, ratio;
2. RSS of each idle process after the scrapes;
3. one netlink sample (per-CPU stats + count) on our raw socket vs pyroute2's NFCTSocket.stat() + count(),
   2,000 times each, in-process: median per sample, ratio.
"""

from __future__ import annotations

import http.client
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from exporter.conntrack.stats import NetlinkStatsSource
from tests.support import ctfill
from tests.support.exporter_proc import Exporter
from tests.support.netns import Netns, in_netns, skip_reason

SCRAPES = 500
SAMPLES = 2000


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _scrape_times(conn: http.client.HTTPConnection, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        out.append(time.perf_counter() - t0)
        assert r.status == 200 and body
    return out


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _connect(ns: Netns, port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sock = ns.socket()
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.connect(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.sock = sock
    return conn


def run(argv: list[str]) -> list[str]:
    reason = skip_reason()
    if reason:
        return [f"skipped: {reason}"]
    node_exporter = shutil.which("prometheus-node-exporter")
    out: list[str] = []
    ns = Netns()
    try:
        ns.exec(["nft", "add table ip raw; add chain ip raw pre { type filter hook prerouting priority -300; }; "
                 "add chain ip raw out { type filter hook output priority -300; }; "
                 "add rule ip raw pre iifname lo notrack; add rule ip raw out oifname lo notrack"])
        entries = ctfill.fill_to(ns.name)
        out.append(f"namespace table: {entries} entries (limit {ctfill.stats(ns.name)[1]})")

        exp = Exporter(["--no-collector.table", "--no-collector.dns", "--kubernetes.enabled=false"], netns=ns)
        exp.wait_ready()
        conn = _connect(ns, exp.port)
        _scrape_times(conn, "/metrics", 50)  # warm-up
        ours = _scrape_times(conn, "/metrics", SCRAPES)
        conn.close()
        our_rss = _rss_mib(exp.proc.pid)
        exp.stop()
        out.append(f"conntrack-dns-exporter (conntrack collector only): {SCRAPES} scrapes, median "
                   f"{statistics.median(ours) * 1000:.2f} ms, p99 {_pct(ours, 99) * 1000:.2f} ms; "
                   f"idle RSS {our_rss:.1f} MiB")

        if node_exporter is None:
            out.append("node_exporter: skipped (Debian package prometheus-node-exporter not installed)")
        else:
            port = 19501
            ne = ns.popen([node_exporter, "--collector.disable-defaults", "--collector.conntrack",
                           f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
            try:
                conn = _connect(ns, port)
                _scrape_times(conn, "/metrics", 50)
                theirs = _scrape_times(conn, "/metrics", SCRAPES)
                conn.close()
                ne_rss = _rss_mib(ne.pid)
            finally:
                ne.terminate()
                ne.wait()
            out.append(f"node_exporter 1.5 (conntrack collector only, reads /proc): median "
                       f"{statistics.median(theirs) * 1000:.2f} ms, p99 {_pct(theirs, 99) * 1000:.2f} ms; "
                       f"idle RSS {ne_rss:.1f} MiB")
            out.append(f"ratio ours/node_exporter: median {statistics.median(ours) / statistics.median(theirs):.2f}x, "
                       f"p99 {_pct(ours, 99) / _pct(theirs, 99):.2f}x, RSS {our_rss / ne_rss:.2f}x")

        src = NetlinkStatsSource()
        in_netns(ns.name, src.sample)  # opens the socket inside the namespace
        raw = []
        for _ in range(SAMPLES):
            t0 = time.perf_counter()
            src.sample()
            raw.append(time.perf_counter() - t0)
        src.close()
        from pyroute2 import NFCTSocket

        nfct = in_netns(ns.name, NFCTSocket)
        gen = []
        try:
            for _ in range(SAMPLES):
                t0 = time.perf_counter()
                nfct.stat()
                nfct.count()
                gen.append(time.perf_counter() - t0)
        finally:
            nfct.close()
        out.append(f"one sample (per-CPU stats + count): raw netlink {statistics.median(raw) * 1e6:.0f} µs, "
                   f"pyroute2 NFCTSocket {statistics.median(gen) * 1e6:.0f} µs: "
                   f"{statistics.median(gen) / statistics.median(raw):.0f}x faster")
    finally:
        ns.delete()
    return out
