"""Concurrent scrapers for load tests and `bench/web.py`: N threads, each with its own keep-alive
connection (as N Prometheus servers would have), scraping `/metrics` for a while; latencies and errors."""

from __future__ import annotations

import gzip
import http.client
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[max(0, int(p * 10) - 1)]


def scrape_load(connect: Callable[[], http.client.HTTPConnection], scrapers: int, seconds: float,
                pause: float = 0.0, check: Callable[[bytes], str | None] | None = None) -> LoadResult:
    """Run `scrapers` threads for `seconds`; each reconnects only after an error.

    `check(body)` returns an error message for a bad body (None when fine).
    """
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        lat: list[float] = []
        errs: list[str] = []
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = connect()
                conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
                r = conn.getresponse()
                body = r.read()
                if r.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if r.status != 200:
                    errs.append(f"status {r.status}")
                elif check is not None and (msg := check(body)):
                    errs.append(msg)
                else:
                    lat.append(time.monotonic() - t0)
            except (OSError, http.client.HTTPException) as e:
                errs.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
            if pause:
                time.sleep(pause)
        if conn is not None:
            conn.close()
        with lock:
            result.latencies += lat
            result.errors += errs

    threads = [threading.Thread(target=worker, name=f"scraper-{i}", daemon=True) for i in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return result


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (kB) of a process, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def blackhole(ns: Any, prefix: str = "10.98.0.0/24") -> None:
    """In namespace `ns` (a tests.support.netns.Netns), route `prefix` to a neighbour that never answers:
    a veth whose other end has no address discards the frames, so sends succeed and lookups time out."""
    ns.exec(["ip", "link", "add", "bh0", "type", "veth", "peer", "name", "bh1"])
    ns.exec(["ip", "addr", "add", "10.97.0.1/24", "dev", "bh0"])
    ns.exec(["ip", "link", "set", "bh0", "up"])
    ns.exec(["ip", "link", "set", "bh1", "up"])
    ns.exec(["ip", "neigh", "add", "10.97.0.2", "lladdr", "02:00:00:00:00:99", "dev", "bh0", "nud", "permanent"])
    ns.exec(["ip", "route", "add", prefix, "via", "10.97.0.2"])
