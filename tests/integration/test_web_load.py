"""Issue 8: scrapes under load while the DNS probes run, and a probe storm, with the real exporter process in
a namespace of its own.

Probe targets: a real dnsmasq in the namespace (answers) plus 40 blackholed addresses, where
every query vanishes (each lookup runs into its timeout: a probe storm, as when the cluster DNS is down).
Twenty scrapers with their own keep-alive connections scrape for 10 s next to three silent clients.

A user would notice: failed or stalled scrapes while DNS is down (exactly when they look at the
dashboard), or an exporter whose threads or memory grow while every probe times out.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.exporter_proc import Exporter
from tests.support.netns import Netns
from tests.support.scrapeload import blackhole, proc_status, scrape_load

pytestmark = pytest.mark.netns

BLACKHOLES = [f"10.98.0.{i}" for i in range(2, 42)]


@pytest.fixture
def storm(netns: Netns) -> Iterator[Exporter]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq")
    blackhole(netns)
    dnsmasq = netns.popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=5353",
                           "--listen-address=127.0.0.1", "--bind-interfaces", "--address=/#/192.0.2.1",
                           "--pid-file=", "--user=root"], stderr=open("/dev/null", "w"))
    args = ["--collector.dns", "--probe.server=127.0.0.1:5353", *[f"--probe.server={ip}" for ip in BLACKHOLES],
            "--probe.interval=500ms", "--probe.timeout=1s", "--probe.attempts=2", "--no-collector.table"]
    e = Exporter(args, netns=netns)
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()
        dnsmasq.terminate()
        dnsmasq.wait(5)


def _check(body: bytes) -> str | None:
    for name in (b"\nconntrack_entries ", b"conntrack_dns_exporter_web_connections "):
        if name not in body:
            return f"missing {name.strip().decode()}"
    return None


def test_twenty_scrapers_during_a_probe_storm(storm: Exporter, netns: Netns) -> None:
    e = storm
    silent = []
    for _ in range(3):
        s = netns.socket()
        s.connect(("127.0.0.1", e.port))
        silent.append(s)
    time.sleep(2)  # let the storm build up: every blackholed lookup is in its timeout by now
    early = proc_status(e.proc.pid)
    peak = dict(early)
    done = threading.Event()

    def sample() -> None:  # thread count and memory while the load runs, not after
        while not done.wait(0.25):
            now = proc_status(e.proc.pid)
            for k in now:
                peak[k] = max(peak[k], now[k])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = scrape_load(lambda: e.connect(timeout=5), scrapers=20, seconds=10, pause=0.05, check=_check)
    done.set()
    sampler.join()
    for s in silent:
        s.close()

    n = len(result.latencies)
    print(f"\n{n} scrapes, p50 {result.pct(50) * 1000:.1f} ms, p99 {result.pct(99) * 1000:.1f} ms, "
          f"max {max(result.latencies) * 1000:.0f} ms, errors {len(result.errors)}; threads {early['Threads']}"
          f" (peak {peak['Threads']}), RSS {early['VmRSS'] // 1024} MB (peak {peak['VmRSS'] // 1024} MB)")
    assert not result.errors, result.errors[:5]
    assert n >= 20 * 5, f"only {n} scrapes in 10 s"
    assert max(result.latencies) < 5.0, "a scrape took longer than a typical scrape timeout"
    # Bounded: one thread per open connection (20 scrapers + 3 silent clients until the read timeout
    # closes them) plus a fixed few; the storm's 40 timing-out targets must add neither threads nor memory.
    assert 20 <= peak["Threads"] <= 20 + 3 + 16, peak
    assert peak["VmRSS"] - early["VmRSS"] < 30 * 1024, (early, peak)
    body = e.get("/metrics")[2].decode()
    assert "dns_probe" in body, "probes not running"
    timeouts = sum(float(line.split()[-1]) for line in body.splitlines()
                   if line.startswith("dns_probe") and "timeout" in line and "_total" in line
                   and not line.startswith("#"))
    assert timeouts > 0, "the blackholed targets produced no timeouts: no storm happened"


def test_scrape_survives_a_client_that_never_reads(storm: Exporter, netns: Netns) -> None:
    """A client that sends requests but never reads the responses blocks only its own connection."""
    hog = netns.socket()
    hog.connect(("127.0.0.1", e_port := storm.port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(50):
        hog.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        t0 = time.monotonic()
        for _ in range(5):
            status, _, _ = storm.get("/metrics")
            assert status == 200
        assert time.monotonic() - t0 < 5.0
        assert e_port == storm.port
    finally:
        hog.close()
