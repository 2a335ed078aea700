"""Table scan: a full conntrack table (262,144 entries) vs `conntrack -L` and pyroute2's generic dump.

One run, in namespaces this benchmark creates and deletes:
1. fill a namespace to 262,144 entries (`tests.support.ctfill`), scan it with
   `exporter.table.parse.Scanner` (the exporter's settings, pacing included)
   and list it with the C tool, `conntrack -L > /dev/null`, 5 rounds interleaved, medians: wall and CPU (user+sys, the
   kernel's dump work included on both sides), as ratios;
2. pyroute2's `NFCTSocket().dump()` costs ~150 µs per entry (about 40 s for the full table), so it reads
   only the first 16,384 entries of the same table, and its time is extrapolated linearly to the whole
   table (said so in the output);
3. peak RSS growth of a scan of the full table, in a fresh process (VmHWM reset before, via clear_refs);
4. the real exporter in the full namespace, scraped back to back over one keep-alive connection for a
   while with `--collector.table.interval=2s`: scrape p50/p99 while a scan runs vs while none does.
Goals (issue 7): faster than the C tool, >= 30x faster than the generic dump, < 10 MB extra RSS, scrape
p99 during a scan within 2x of idle.
"""

from __future__ import annotations

import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FULL = 262_144
SUBSET = 16_384
ROUNDS = 5
SCRAPE_SECONDS = 20
ROOT = Path(__file__).resolve().parent.parent

RSS_PROBE = r"""
import sys
from exporter.table.scan import Scanner

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

scanner = Scanner()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
r = scanner.scan()
grow = status("VmHWM") - before
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
control = bytearray(16 << 20)  # the control: 16 MB, touched
print(r.agg.entries, grow, int(r.partial), status("VmHWM") - before)
"""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(argv: list[str]) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from tests.support.netns import skip_reason

    reason = skip_reason()
    if reason:
        return [f"skipped: {reason}"]
    from exporter.table.scan import Scanner, open_netlink
    from tests.support import ctfill
    from tests.support.netns import Netns, in_netns

    out: list[str] = []
    ns = Netns()
    try:
        t = time.monotonic()
        have = ctfill.fill_to(ns.name, FULL)
        out.append(f"table: {have} entries in namespace {ns.name} (filled in {time.monotonic() - t:.1f} s)")

        # 1. scanner vs conntrack -L on the full table
        scanner = Scanner(open_socket=lambda: in_netns(ns.name, open_netlink), max_duration=60)
        # interleaved, so that both see the same background load (this machine is shared)
        scans = []
        cli_wall, cli_cpu = [], []
        for _ in range(ROUNDS):
            scans.append(scanner.scan())
            c0, t0 = _children_cpu(), time.monotonic()
            subprocess.run(ns.cmd(["conntrack", "-L"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True)
            cli_wall.append(time.monotonic() - t0)
            cli_cpu.append(_children_cpu() - c0)
        assert all(not r.partial and r.agg.entries == have for r in scans), [r.message for r in scans]
        wall = statistics.median(r.duration for r in scans)
        cpu = statistics.median(r.cpu for r in scans)
        unpaced = Scanner(open_socket=lambda: in_netns(ns.name, open_netlink), max_duration=60, pace=0).scan()
        cw, cc = statistics.median(cli_wall), statistics.median(cli_cpu)
        load = os.getloadavg()[0]
        out.append(f"load average during the run: {load:.1f} on {os.cpu_count()} CPUs (wall times suffer first)")
        out.append(f"scan (exporter settings): wall {wall:.3f} s, CPU {cpu:.3f} s "
                   f"({wall / have * 1e6:.2f} µs/entry); unpaced: wall {unpaced.duration:.3f} s")
        out.append(f"conntrack -L > /dev/null (C tool, reference): wall {cw:.3f} s, CPU {cc:.3f} s")
        out.append(f"ratio vs conntrack -L: {cw / wall:.2f}x faster (wall), {cc / cpu:.2f}x less CPU  "
                   f"[goal: > 1x] {'OK' if cw > wall else 'MISSED'}")

        # 2. pyroute2's generic dump: the first SUBSET entries of the same full table, extrapolated
        def pyroute2_dump() -> tuple[int, float, float]:
            from pyroute2 import NFCTSocket

            sock = NFCTSocket()
            t0, c0 = time.monotonic(), time.process_time()
            n = 0
            for _ in sock.dump():
                n += 1
                if n >= SUBSET:
                    break
            w, c = time.monotonic() - t0, time.process_time() - c0
            sock.close()
            return n, w, c

        n_py, p_wall, p_cpu = in_netns(ns.name, pyroute2_dump)
        ext_wall, ext_cpu = p_wall / n_py * have, p_cpu / n_py * have
        out.append(f"pyroute2 NFCTSocket().dump() (generic, reference): first {n_py} entries of this table in "
                   f"wall {p_wall:.2f} s, CPU {p_cpu:.2f} s ({p_wall / n_py * 1e6:.0f} µs/entry); the whole table "
                   f"would take ~{ext_wall:.0f} s, so it is extrapolated linearly: wall {ext_wall:.0f} s, "
                   f"CPU {ext_cpu:.0f} s")
        out.append(f"ratio vs pyroute2 (extrapolated full table): {ext_wall / wall:.0f}x faster (wall), "
                   f"{ext_cpu / cpu:.0f}x less CPU  [goal: >= 30x] {'OK' if ext_wall / wall >= 30 else 'MISSED'}")

        # 3. peak RSS growth of a full-table scan in a fresh process
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(ns.cmd([sys.executable, "-c", RSS_PROBE]), capture_output=True, text=True, env=env,
                           timeout=120, check=True)
        entries, grow_kb, partial, control_kb = (int(x) for x in r.stdout.split())
        out.append(f"peak RSS growth during a scan of {entries} entries: {grow_kb / 1024:.2f} MB (the same "
                   f"measure sees a 16 MB allocation as {control_kb / 1024:.1f} MB)  "
                   f"[goal: < 10 MB] {'OK' if grow_kb < 10 * 1024 and not partial else 'MISSED'}")

        # 4. scrape latency during scans vs idle
        out += _scrape_latency(ns)
    finally:
        ns.delete()
    return out


def _scrape_latency(ns: Any) -> list[str]:
    from tests.support.exporter_proc import Exporter, parse, value

    env = {"CONNTRACK_DNS_EXPORTER_COLLECTOR_DNS": "false"}
    exp = Exporter(["--collector.table.interval=2s", "--collector.table.cpu-budget=0"], netns=ns, env=env)
    try:
        exp.wait_ready()
        conn: http.client.HTTPConnection = exp.connect(timeout=10)
        times: list[tuple[float, float, float]] = []  # (start, end) monotonic, latency
        windows: list[tuple[float, float]] = []  # scans, in time.time()
        offset = time.time() - time.monotonic()
        end = time.monotonic() + SCRAPE_SECONDS
        while time.monotonic() < end:
            t0 = time.monotonic()
            conn.request("GET", "/metrics")
            # ACK at once: the server writes headers and body separately, and Nagle + delayed ACK would
            # add a flat 40 ms to every scrape, hiding what this measures.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            body = conn.getresponse().read()
            t1 = time.monotonic()
            times.append((t0, t1, t1 - t0))
            if len(times) % 20 == 0:
                s = parse(body.decode())
                ts = value(s, "conntrack_table_last_scan_timestamp_seconds")
                dur = value(s, "conntrack_table_scan_duration_seconds")
                if ts is not None and dur is not None:
                    windows.append((ts - dur, ts))
            time.sleep(0.002)
        conn.close()
        scans = sorted(set(windows))
        # skip the first 2 s (start-up); a scrape is "during a scan" if it overlaps one
        during, idle = [], []
        start = times[0][0] + 2
        for t0, t1, lat in times:
            if t0 < start:
                continue
            w0, w1 = t0 + offset, t1 + offset
            (during if any(a <= w1 and w0 <= b for a, b in scans) else idle).append(lat)
        if len(during) < 20 or len(idle) < 20:
            return [f"scrape latency: too few samples (during {len(during)}, idle {len(idle)})"]
        p99d, p99i = _pct(during, 0.99), _pct(idle, 0.99)
        return [
            f"scrape latency idle: p50 {_pct(idle, 0.5) * 1e3:.1f} ms, p90 {_pct(idle, 0.9) * 1e3:.1f} ms, "
            f"p99 {p99i * 1e3:.1f} ms ({len(idle)} scrapes)",
            f"scrape latency during scans: p50 {_pct(during, 0.5) * 1e3:.1f} ms, p90 {_pct(during, 0.9) * 1e3:.1f} ms, "
            f"p99 {p99d * 1e3:.1f} ms ({len(during)} scrapes, {len(scans)} scans)",
            f"ratio scrape p99 during/idle: {p99d / p99i:.2f}  [goal: <= 2] {'OK' if p99d <= 2 * p99i else 'MISSED'}",
        ]
    finally:
        exp.stop()


if __name__ == "__main__":
    for line in run(sys.argv[1:]):
        print(line)
