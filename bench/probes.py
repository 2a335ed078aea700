"""DNS probes: timing accuracy, and the exporter's CPU, memory and conntrack cost while probing.

1. Accuracy: an in-process DNS server delays every answer by exactly 100 ms; the median and p90 error of
   the parallel-mode duration are compared with dnspython's `dns.query.udp` (named reference: one
   query, fresh socket) timed the same way around the call.
2. Cost: the real exporter probes 10 in-process servers every second (defaults: parallel,tcp,
   glibc,musl) for 60 s (`BENCH_QUICK=1`: 10 s). CPU share and RSS are compared with the same exporter with
   `--no-collector.dns` (reference).
3. Resolver models (issue 18): CPU per healthy lookup of each model (`exporter.dns.models`), measured as
   the probing thread's CPU time, as a ratio to the `parallel` mode (reference); then the real exporter
   at the DaemonSet defaults (interval 5 s, modes parallel,tcp, resolvers glibc,musl, 3 targets: the
   Service and two CoreDNS endpoints) against the same exporter with `--probe.resolvers=none`.
4. Conntrack cost (root + the lab's binaries): the exporter in the lab's node namespace probes the
   DNAT'd Service IP and both backends every second; the entries it holds are counted with the
   conntrack CLI and compared with the steady-state formula in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import dns.message
import dns.query

from exporter.dns.models import RESOLVERS, ResolverOptions
from exporter.dns.models import run as model_run
from exporter.dns.resolver import lookup
from tests.support.dnsserver import Behaviour, DnsServer
from tests.support.exporter_proc import Exporter

DELAY = 0.100
SAMPLES = 40
TARGETS = 10


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _accuracy(quick: bool) -> list[str]:
    n = SAMPLES // 4 if quick else SAMPLES
    ours: list[float] = []
    ref: list[float] = []
    with DnsServer(Behaviour(delay=DELAY)) as s:
        for _ in range(n):
            r = asyncio.run(lookup(s.host, s.port, "bench.example.", "parallel", 2.0, 1))
            assert r.ok
            ours.append(r.duration - DELAY)
            q = dns.message.make_query("bench.example.", "A")
            t0 = time.perf_counter()
            dns.query.udp(q, s.host, port=s.port, timeout=2.0)
            ref.append(time.perf_counter() - t0 - DELAY)
    med, med_ref = statistics.median(ours), statistics.median(ref)
    p90 = sorted(ours)[int(0.9 * (len(ours) - 1))]
    return [
        f"accuracy: server delays every answer {DELAY * 1000:.0f} ms, {n} parallel A+AAAA probes",
        f"  median error {med * 1000:+.2f} ms, p90 {p90 * 1000:+.2f} ms "
        f"(reference dns.query.udp, one query: median {med_ref * 1000:+.2f} ms; ratio {med / med_ref:.2f}x)",
    ]


def _run_exporter(args: list[str], seconds: float) -> tuple[float, float, Exporter]:
    exp = Exporter(args)
    exp.wait_ready()
    time.sleep(1.0)  # imports and first round out of the way
    pid = exp.proc.pid
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    share = (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    return share, _rss_mib(pid), exp


def _conntrack_cost(quick: bool) -> list[str]:
    """In the lab's node namespace (conntrack active, kube-proxy DNAT): the entries the probes hold."""
    from tests.lab import Lab, missing_binaries
    from tests.support.netns import skip_reason

    reason = skip_reason() or (missing_binaries() and f"missing {', '.join(missing_binaries())}")
    if reason:
        return [f"conntrack cost: skipped ({reason})"]
    seconds = 12.0 if quick else 40.0
    with Lab.up(nodelocal=False) as lab:
        servers = [lab.service_ip, *(b.ip for b in lab.backends)]
        exp = lab.start_exporter("--collector.dns", "--no-collector.table", "--probe.interval=1s",
                                 f"--probe.name={lab.cluster_name}", *(f"--probe.server={s}" for s in servers))
        time.sleep(seconds)
        rows: dict[str, list[tuple[int, str]]] = {"udp": [], "tcp": []}
        for proto in rows:
            out = lab.node.exec(["conntrack", "-L", "-p", proto, "--dport", "53"], check=False).stdout
            for line in out.splitlines():
                f = line.split()
                if len(f) > 3 and f[2].isdigit():
                    rows[proto].append((int(f[2]), f[3] if proto == "tcp" else ""))
        udp_to = int(lab.node.exec(["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"]).stdout)
        tw_to = int(lab.node.exec(["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait"]).stdout)
        exp.stop()
    n = len(servers)
    udp, tcp = rows["udp"], rows["tcp"]
    states = sorted({s for _, s in tcp})
    # per round and target: the parallel mode's socket and one per default resolver model (glibc, musl)
    sockets = 3
    expect_udp, expect_tcp = sockets * min(seconds, udp_to), min(seconds, tw_to)
    return [
        f"conntrack cost: lab node namespace, {n} targets (Service IP + backends), parallel,tcp + glibc,musl "
        f"every 1 s, after {seconds:.0f} s",
        f"  UDP entries {len(udp)} = {len(udp) / n:.1f} per target (expected ~{expect_udp:.0f}: {sockets} per "
        f"round, living {udp_to} s; longest remaining timeout {max((t for t, _ in udp), default=0)} s)",
        f"  TCP entries {len(tcp)} = {len(tcp) / n:.1f} per target in {','.join(states) or '-'} (expected "
        f"~{expect_tcp:.0f}: one per round, living {tw_to} s in TIME_WAIT)",
        f"  steady state per target: ({sockets} x {udp_to} + {tw_to}) / interval = "
        f"{(sockets * udp_to + tw_to) / 5:.0f} entries at the default 5 s interval, {sockets * udp_to + tw_to} at 1 s",
    ]


def _cost(quick: bool) -> list[str]:
    seconds = 10.0 if quick else 60.0
    servers = [DnsServer().start() for _ in range(TARGETS)]
    try:
        base = ["--no-collector.table", "--no-collector.conntrack", "--probe.resolv-conf=/nonexistent"]
        ref_share, ref_rss, ref = _run_exporter([*base, "--no-collector.dns"], min(seconds, 10.0))
        ref.stop()
        args = [*base, "--collector.dns", "--probe.interval=1s", *(f"--probe.server={s.address}" for s in servers)]
        share, rss, exp = _run_exporter(args, seconds)
        samples = exp.scrape()
        exp.stop()
    finally:
        for s in servers:
            s.close()
    probes = sum(v for (name, _), v in samples.items() if name == "dns_probe_duration_seconds_count")
    lines = [
        f"cost: {TARGETS} targets x modes parallel,tcp + resolvers glibc,musl every 1 s for {seconds:.0f} s "
        f"({probes:.0f} lookups so far)",
        f"  CPU {share * 100:.2f}% of one core (reference --no-collector.dns: {ref_share * 100:.2f}%; "
        f"+{(share - ref_share) * 100:.2f} points)",
        f"  RSS {rss:.1f} MiB (reference: {ref_rss:.1f} MiB; ratio {rss / ref_rss:.2f}x)",
    ]
    return lines


def _models_cpu(quick: bool) -> list[str]:
    n = 100 if quick else 500
    opts = ResolverOptions(timeout=2.0, attempts=1)
    per: dict[str, float] = {}
    with DnsServer() as s:
        async def series(which: str) -> None:
            for i in range(n):
                name = f"b{i}.bench.example."
                if which == "parallel":
                    r = await lookup(s.host, s.port, name, "parallel", 2.0, 1)
                    assert r.ok
                else:
                    m = await model_run(which, [(s.host, s.port)], name, opts)
                    assert m.result == "ok", m

        for which in ("parallel", *RESOLVERS):
            asyncio.run(series(which))  # warm-up (imports, first sockets)
            t0 = time.thread_time()
            asyncio.run(series(which))
            per[which] = (time.thread_time() - t0) / n
    ref = per["parallel"]
    lines = [f"models: CPU per healthy lookup (probe thread), {n} lookups each; reference mode parallel "
             f"{ref * 1e6:.0f} us"]
    lines += [f"  {k:<28} {v * 1e6:6.0f} us  ratio {v / ref:.2f}x" for k, v in per.items() if k != "parallel"]
    return lines


def _daemonset_defaults(quick: bool) -> list[str]:
    seconds = 20.0 if quick else 60.0
    servers = [DnsServer().start() for _ in range(3)]
    try:
        base = ["--no-collector.table", "--no-collector.conntrack", "--probe.resolv-conf=/nonexistent",
                *(f"--probe.server={s.address}" for s in servers)]
        ref_share, _, ref = _run_exporter([*base, "--probe.resolvers=none"], seconds)
        ref.stop()
        share, _, exp = _run_exporter(base, seconds)
        samples = exp.scrape()
        exp.stop()
    finally:
        for s in servers:
            s.close()
    lookups = sum(v for (name, _), v in samples.items() if name == "dns_probe_lookup_duration_seconds_count")
    return [
        f"DaemonSet defaults (3 targets, interval 5 s, parallel,tcp + glibc,musl) for {seconds:.0f} s "
        f"({lookups:.0f} model lookups)",
        f"  CPU {share * 100:.3f}% of one core; reference --probe.resolvers=none {ref_share * 100:.3f}% "
        f"(models add {(share - ref_share) * 100:+.3f} points; budget 1%)",
    ]


def run(argv: list[str]) -> list[str]:
    quick = os.environ.get("BENCH_QUICK") == "1"
    return [*_accuracy(quick), *_cost(quick), *_models_cpu(quick), *_daemonset_defaults(quick),
            *_conntrack_cost(quick)]
