"""Web config reload check: what re-reading --web.config.file on change (one stat per request) costs.

1. in process: `WebConfig.reloaded()` on an unchanged file (the per-request check) against rendering one
   exposition of the exporter's own registry (the work of the request it is added to);
2. end to end: one scraper, back to back over one keep-alive connection, against the real exporter without
   a web config (reference) and with one (response headers only, so no bcrypt), 10 s each (BENCH_QUICK=1: 3 s).
No root needed.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.exposition import generate_latest

from exporter.app import build_registry
from exporter.web import webconfig
from tests.support.exporter_proc import Exporter
from tests.support.scrapeload import scrape_load

QUIET = ["--no-collector.dns", "--kubernetes.enabled=false", "--no-collector.table"]


def _per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def run(argv: list[str]) -> list[str]:
    seconds = 3.0 if os.environ.get("BENCH_QUICK") else 10.0
    out: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "web.yml"
        f.write_text("http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
        cfg = webconfig.load(f)
        check = _per_call(cfg.reloaded, 200_000)
        registry = build_registry([])
        render = _per_call(lambda: generate_latest(registry), 2_000)
        out.append(f"reload check (unchanged file): {check * 1e6:.2f} us; rendering the exporter's own registry: "
                   f"{render * 1e6:.0f} us; ratio {check / render:.3f}x")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_DNS_EXPORTER_")}
        results = {}
        for name, extra in (("without web config (reference)", []), ("with web config", [f"--web.config.file={f}"])):
            e = Exporter([*QUIET, *extra], env=env)
            try:
                e.wait_ready()
                r = scrape_load(functools.partial(e.connect, timeout=10), scrapers=1, seconds=seconds)
            finally:
                e.stop()
            results[name] = r
            out.append(f"{name}: {len(r.latencies)} scrapes, p50 {r.pct(50) * 1000:.2f} ms, "
                       f"p99 {r.pct(99) * 1000:.2f} ms, errors {len(r.errors)}")
        ref, cur = results["without web config (reference)"], results["with web config"]
        out.append(f"ratio with/without: p50 {cur.pct(50) / ref.pct(50):.2f}x, p99 {cur.pct(99) / ref.pct(99):.2f}x")
    return out
