"""Flags and wiring of the `dnsflows` collector (real clients' DNS flows, from conntrack events).

On by default: with the kernel filter, the cost grows with DNS flows only (see docs/dnsflows.md for the
measured figures); where the exporter may not subscribe to the events (no CAP_NET_ADMIN, no
ctnetlink) the listener reports itself down with one log line and keeps retrying.
"""

from __future__ import annotations

import argparse

from exporter.core.feature import AppContext, Built, Feature
from exporter.core.flags import add_flag, duration, int_range
from exporter.dnsflows.collector import DnsFlowsCollector
from exporter.dnsflows.flows import FlowStats
from exporter.dnsflows.listener import RECEIVE_BUFFER, FlowListener


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dnsflows collector")
    add_flag(g, "--collector.dnsflows", default=True, action="bool",
             help="Count real clients' DNS flows (by backend, unanswered, top pods) from the kernel's conntrack "
                  "events.")
    add_flag(g, "--collector.dnsflows.top-pods", default=10, type=int_range(1, 1000),
             help="Pods reported by conntrack_dns_unanswered_top_pods (the rest are summed into pod=\"other\").")
    add_flag(g, "--collector.dnsflows.window", default=300.0, type=duration(10, 86400),
             help="Window of conntrack_dns_unanswered_top_pods: unanswered flows destroyed within it.")
    add_flag(g, "--collector.dnsflows.receive-buffer", default=RECEIVE_BUFFER, type=int_range(1, 1 << 30),
             metavar="BYTES",
             help="Receive buffer of the event socket; when it overflows the kernel drops events "
                  "(conntrack_dns_events_lost_total).")
    add_flag(g, "--collector.dnsflows.debug-unfiltered", default=False, action="bool",
             help="Debugging only: do not attach the kernel-side filter, so every conntrack event of the node "
                  "reaches the exporter (counted as conntrack_dns_events_total{type=\"other\"}).")
    add_flag(g, "--collector.dnsflows.debug-python-drain", default=False, action="bool",
             help="Debugging only: read and parse the conntrack events in Python rather than with the native "
                  "drain (exporter/dnsflows/_ctevents.so; about 1.7 times the CPU per event). The same counts.")


def build(args: argparse.Namespace, ctx: AppContext) -> Built:
    if not args.collector_dnsflows:
        return Built()
    stats = FlowStats(ctx.discovery, top_n=args.collector_dnsflows_top_pods, window=args.collector_dnsflows_window)
    listener = FlowListener(stats, receive_buffer=args.collector_dnsflows_receive_buffer,
                            use_filter=not args.collector_dnsflows_debug_unfiltered,
                            native_drain=not args.collector_dnsflows_debug_python_drain)
    return Built(collectors=[DnsFlowsCollector(listener)], services=[listener])


FEATURE = Feature("dnsflows", add_arguments, build)
