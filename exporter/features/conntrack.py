"""Flags and wiring of the `conntrack` collector."""

from __future__ import annotations

import argparse

from exporter.collectors.conntrack import ConntrackCollector, StatsSource, SysctlReader
from exporter.config import add_flag
from exporter.features import AppContext, Built
from exporter.sources import fixtures
from exporter.sources.netlink import NetlinkStatsSource
from exporter.sources.sysctl import StaticSysctlSource, SysctlSource


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("conntrack collector")
    add_flag(g, "--collector.conntrack", default=True, action="bool",
             help="Sample the conntrack table size and per-CPU statistics over netlink at each scrape.")
    add_flag(g, "--collector.conntrack.per-cpu", default=False, action="bool",
             help="Expose conntrack_stat_*_total per CPU (label cpu) instead of summed.")
    add_flag(g, "--collector.conntrack.fixtures", default=None, metavar="PATH",
             help="Replay recorded netlink replies from this JSON file instead of asking the kernel.")


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    if not args.collector_conntrack:
        return Built()
    stats: StatsSource
    sysctl: SysctlReader
    if args.collector_conntrack_fixtures:
        data = fixtures.load(args.collector_conntrack_fixtures)
        src = fixtures.FixtureStatsSource(data)
        stats, sysctl = src, StaticSysctlSource(src.sysctl)
    else:
        stats, sysctl = NetlinkStatsSource(), SysctlSource()
    return Built(collectors=[ConntrackCollector(stats, sysctl, per_cpu=args.collector_conntrack_per_cpu)])
