"""The Feature type every data path plugs into the process with.

A data-path package (`conntrack/`, `table/`, `dns/`, `kubernetes/`, ...) exposes one `Feature` in its
`feature.py`: its flags (`add_arguments`), an optional start-up check (`validate`, raising `ConfigError`),
and `build`, which turns the parsed flags into collectors (called at scrape time) and background
services (started by the process). `AppContext` carries what data paths share, the discovery state,
so that no data path imports another and nothing is global.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.core.scrape import Collector, Service
from exporter.discovery import Discovery, PodIndex, TargetRegistry


@dataclass(frozen=True)
class ExemptFlow:
    """A TCP flow of the exporter's own that `--web.notrack` exempts from conntrack too: to `address:port`
    from a local port in `local_ports` (the Kubernetes API connection, issue 13 item 11)."""

    address: str
    port: int
    local_ports: range


@dataclass
class AppContext:
    discovery: Discovery = field(default_factory=Discovery)
    notrack_flows: list[ExemptFlow] = field(default_factory=list)
    # what a data path offers to the process-level consumers (the status page's live diagnosis), by name:
    # "conntrack.sample" (a callable returning the current ConntrackStats), "dns.store", "table.service"
    shared: dict[str, object] = field(default_factory=dict)

    @property
    def targets(self) -> TargetRegistry:
        return self.discovery.targets

    @property
    def pods(self) -> PodIndex:
        return self.discovery.pods


@dataclass
class Built:
    collectors: list[Collector] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)


def _no_check(_args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True)
class Feature:
    """One data path's entry points; mypy checks each against these signatures."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace, AppContext], Built]
    validate: Callable[[argparse.Namespace], None] = _no_check
