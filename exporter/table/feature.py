"""Flags and wiring of the `table` collector (conntrack table breakdown, background scan).

On by default: a scan of a full 262,144-entry table costs about 0.3 s of CPU with the native parser
(1.2 µs per entry, 1.15 µs of it the kernel building the dump; about 0.55 s with the Python fallback), a
typical node table of tens of thousands of entries a tenth of that, and scrapes never wait for it. The
interval stretches so that scans stay within `--collector.table.cpu-budget` (0.1% of one core by
default) on tables of any size.
"""

from __future__ import annotations

import argparse
import math

from exporter.core.feature import AppContext, Built, Feature
from exporter.core.flags import add_flag, duration, int_range
from exporter.table.collector import TableCollector
from exporter.table.fixtures import fixture_socket_factory, load_fixture
from exporter.table.scan import Scanner
from exporter.table.service import TableScanService


def cpu_fraction(text: str) -> float:
    """`0.001` or `0.1%`: a finite share of one core in [0, 1]."""
    s = text.strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise argparse.ArgumentTypeError(f"invalid CPU budget {text!r} (want a fraction of one core in [0, 1], "
                                         "e.g. 0.001 or 0.1%)")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("table collector")
    add_flag(g, "--collector.table", default=True, action="bool",
             help="Scan the whole conntrack table in the background and break it down by state, DNS, "
                  "stale DNS and source pod.")
    add_flag(g, "--collector.table.interval", default=60.0, type=duration(0.1, 86400),
             help="Time between the end of one table scan and the start of the next.")
    add_flag(g, "--collector.table.cpu-budget", default="0.1%", type=cpu_fraction, metavar="FRACTION",
             help="Average share of one core the table scans may use (a fraction such as 0.001, or a percentage): "
                  "the time between scans is max(--collector.table.interval, CPU of the last scan / budget). "
                  "0: a fixed interval.")
    add_flag(g, "--collector.table.top-sources", default=10, type=int_range(1, 1000),
             help="Pods reported by conntrack_table_top_sources (the rest are summed into pod=\"other\").")
    add_flag(g, "--collector.table.max-duration", default=20.0, type=duration(0.01, 3600),
             help="Cut a table scan short after this long (it is then reported partial).")
    add_flag(g, "--collector.table.fixtures", default=None, metavar="PATH",
             help="Replay a recorded table dump from this JSON file instead of asking the kernel.")


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    if not args.collector_table:
        return Built()
    if args.collector_table_fixtures:
        scanner = Scanner(fixture_socket_factory(load_fixture(args.collector_table_fixtures)),
                          max_duration=args.collector_table_max_duration)
    else:
        scanner = Scanner(max_duration=args.collector_table_max_duration)
    service = TableScanService(scanner, interval=args.collector_table_interval,
                               top_n=args.collector_table_top_sources, discovery=ctx.discovery,
                               cpu_budget=args.collector_table_cpu_budget)
    ctx.shared["table.service"] = service
    return Built(collectors=[TableCollector(service)], services=[service])


FEATURE = Feature("table", add_arguments, build)
