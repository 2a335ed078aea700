"""Wiring: each feature adds its flags and builds its collectors and background services.

A feature module exposes `add_arguments(parser)` and `build(args, ctx) -> Built`. The shared
`AppContext` carries what features exchange (probe targets, the pod map) so that nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from exporter.collectors.base import Collector, Service
from exporter.probes.targets import TargetRegistry
from exporter.sources.podindex import PodIndex


@dataclass
class AppContext:
    targets: TargetRegistry = field(default_factory=TargetRegistry)
    pods: PodIndex = field(default_factory=PodIndex)


@dataclass
class Built:
    collectors: list[Collector] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)


def all_features() -> list[ModuleType]:
    """Feature modules in start order (Kubernetes discovery before the probes that use its targets)."""
    from exporter.features import conntrack, kubernetes, probes, table

    return [conntrack, kubernetes, probes, table]
