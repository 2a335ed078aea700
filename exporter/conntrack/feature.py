"""Flags and wiring of the `conntrack` collector."""

from __future__ import annotations

import argparse

from exporter.conntrack import fixtures
from exporter.conntrack.collector import ConntrackCollector, StatsSource, SysctlReader
from exporter.conntrack.stats import NetlinkStatsSource
from exporter.conntrack.sysctl import CachedSysctl, StaticSysctlSource, SysctlSource
from exporter.core.feature import AppContext, Built, Feature
from exporter.core.flags import add_flag


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
        ctx.shared["conntrack.sample"] = src.peek
    else:
        stats, sysctl = NetlinkStatsSource(), CachedSysctl(SysctlSource())
        ctx.shared["conntrack.sample"] = NetlinkStatsSource().sample  # its own socket: never delays a scrape
    return Built(collectors=[ConntrackCollector(stats, sysctl, per_cpu=args.collector_conntrack_per_cpu)])


FEATURE = Feature("conntrack", add_arguments, build)
