"""The `conntrack` collector: table size, limit and the kernel's per-CPU statistics, at scrape time.

Metrics:
- `conntrack_entries`, `conntrack_entries_limit` (gauges);
- `conntrack_stat_<stat>_total` (counters, summed over CPUs; with `per_cpu` a `cpu` label instead) for
  found, invalid, insert, insert_failed, drop, early_drop, error, search_restart, clash_resolve,
  chain_toolong;
- `conntrack_buckets` and `conntrack_timeout_seconds{protocol,state}` (gauges, from the sysctls).
The sysctl-based metrics are yielded first, so they are still served when netlink is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.conntrack.stats import CPU_STAT_NAMES, ConntrackStats
from exporter.conntrack.sysctl import BUCKETS, TIMEOUTS

STAT_HELP = {
    "found": "Lookups that found an existing conntrack entry.",
    "invalid": "Packets conntrack could not track (malformed or out of window).",
    "insert": "Entries inserted into the conntrack table.",
    "insert_failed": "Entries that could not be inserted, usually a clash between packets racing to "
                     "create the same entry (the parallel A/AAAA DNS race); the packet is dropped.",
    "drop": "Packets dropped because a new entry could not be created (table full, or insert failed).",
    "early_drop": "Entries evicted early to make room when the table was full.",
    "error": "ICMP errors conntrack could not match to a connection.",
    "search_restart": "Table lookups restarted because the hash table was resized concurrently.",
    "clash_resolve": "Insert clashes the kernel resolved without dropping the packet.",
    "chain_toolong": "Times a hash chain grew too long (table or hash buckets too small).",
}


class StatsSource(Protocol):
    def sample(self) -> ConntrackStats: ...


class SysctlReader(Protocol):
    def read(self) -> dict[str, int]: ...


class ConntrackCollector:
    name = "conntrack"

    def __init__(self, stats: StatsSource, sysctl: SysctlReader | None = None, per_cpu: bool = False) -> None:
        self._stats = stats
        self._sysctl = sysctl
        self._per_cpu = per_cpu

    def collect(self) -> Iterator[Metric]:
        if self._sysctl is not None:
            yield from self._sysctl_metrics(self._sysctl.read())
        sample = self._stats.sample()
        if sample.entries is not None:
            yield GaugeMetricFamily("conntrack_entries", "Entries in this network namespace's conntrack table.",
                                    value=sample.entries)
        if sample.limit is not None:
            yield GaugeMetricFamily("conntrack_entries_limit",
                                    "Maximum number of conntrack entries (nf_conntrack_max).", value=sample.limit)
        if self._per_cpu:
            for stat in CPU_STAT_NAMES:
                fam = CounterMetricFamily(f"conntrack_stat_{stat}", STAT_HELP[stat], labels=["cpu"])
                for cpu in sorted(sample.per_cpu):
                    fam.add_metric([str(cpu)], sample.per_cpu[cpu][stat])
                yield fam
        else:
            totals = sample.totals()
            for stat in CPU_STAT_NAMES:
                yield CounterMetricFamily(f"conntrack_stat_{stat}", STAT_HELP[stat], value=totals[stat])

    @staticmethod
    def _sysctl_metrics(values: dict[str, int]) -> Iterator[Metric]:
        if BUCKETS in values:
            yield GaugeMetricFamily("conntrack_buckets", "Size of the conntrack hash table (nf_conntrack_buckets).",
                                    value=values[BUCKETS])
        fam = GaugeMetricFamily("conntrack_timeout_seconds",
                                "Conntrack timeout for a protocol and state, from the netfilter sysctls.",
                                labels=["protocol", "state"])
        for name, (proto, state) in TIMEOUTS.items():
            if name in values:
                fam.add_metric([proto, state], values[name])
        if fam.samples:
            yield fam
