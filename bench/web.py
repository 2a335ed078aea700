"""Web: scrape latency with 50 concurrent scrapers during DNS probing, vs one idle scraper.

The real exporter runs in a namespace this benchmark creates, with its DNS probes on: a real dnsmasq in
the namespace plus 10 blackholed servers (every lookup to them times out, a probe storm). Then:
1. reference: one scraper, back to back over one keep-alive connection, for a fifth of the run;
2. load: 50 scrapers, each on its own keep-alive connection, back to back, for 60 s (BENCH_QUICK=1: 10 s).
Reports scrape p50/p99, errors, scrapes/s, the exporter's peak threads and RSS, and the ratio of loaded
p99 to idle p99. Goal (issue 8): no errors; p99 under load bounded (scrapes share one rendering).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

from tests.support.exporter_proc import Exporter
from tests.support.netns import Netns, skip_reason
from tests.support.scrapeload import LoadResult, blackhole, proc_status, scrape_load

SCRAPERS = 50


def _line(name: str, r: LoadResult, seconds: float) -> str:
    return (f"{name}: {len(r.latencies)} scrapes ({len(r.latencies) / seconds:.0f}/s), p50 {r.pct(50) * 1000:.1f} ms, "
            f"p99 {r.pct(99) * 1000:.1f} ms, errors {len(r.errors)}")


def run(argv: list[str]) -> list[str]:
    reason = skip_reason()
    if reason:
        return [f"skipped: {reason}"]
    if shutil.which("dnsmasq") is None:
        return ["skipped: needs dnsmasq"]
    seconds = 10.0 if os.environ.get("BENCH_QUICK") else 60.0
    ns = Netns()
    dnsmasq = None
    e = None
    out: list[str] = []
    try:
        blackhole(ns)
        dnsmasq = ns.popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=5353",
                            "--listen-address=127.0.0.1", "--bind-interfaces", "--address=/#/192.0.2.1",
                            "--pid-file=", "--user=root"], stderr=subprocess.DEVNULL)
        probes = ["--collector.dns", "--probe.server=127.0.0.1:5353", "--probe.interval=1s", "--probe.timeout=1s",
                  *[f"--probe.server=10.98.0.{i}" for i in range(2, 12)]]
        e = Exporter(probes, netns=ns)
        e.wait_ready()
        time.sleep(3)  # probes have results and the blackholed ones are timing out
        size = len(e.get("/metrics")[2])
        out.append(f"exposition {size / 1024:.0f} KiB; probes: dnsmasq + 10 blackholed servers")

        idle_s = max(2.0, seconds / 5)
        idle = scrape_load(lambda: e.connect(timeout=10), scrapers=1, seconds=idle_s)  # type: ignore[union-attr]
        out.append(_line("idle, 1 scraper (reference)", idle, idle_s))

        peak = proc_status(e.proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                now = proc_status(e.proc.pid)  # type: ignore[union-attr]
                for k in now:
                    peak[k] = max(peak[k], now[k])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = scrape_load(lambda: e.connect(timeout=10), scrapers=SCRAPERS, seconds=seconds)  # type: ignore[union-attr]
        done.set()
        sampler.join()
        out.append(_line(f"load, {SCRAPERS} scrapers, {seconds:.0f} s", load, seconds))
        if load.errors:
            out.append(f"first errors: {load.errors[:3]}")
        out.append(f"exporter peak: {peak['Threads']} threads, {peak['VmRSS'] / 1024:.0f} MB RSS")
        out.append(f"ratio p99 load/idle: {load.pct(99) / idle.pct(99):.1f}x "
                   f"(p50 {load.pct(50) / idle.pct(50):.1f}x; {SCRAPERS} scrapers share the GIL and the renderings)")
        out += [x for x in e.get("/metrics")[2].decode().splitlines()
                if x.startswith("conntrack_dns_exporter_web_scrapes")]
    finally:
        if e is not None:
            e.stop()
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait(5)
        ns.delete()
    return out
