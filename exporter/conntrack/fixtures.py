"""Recorded conntrack statistics replayed instead of the kernel (`--collector.conntrack.fixtures PATH`).

The format is `exporter.core.fixtures` (the `samples` and `sysctl` parts). Replaying runs the same
parser as live sampling, so a fixture recorded on a user's node reproduces their numbers. Each scrape
advances one sample and stays on the last one, so a fixture of several samples replays counters that
grow. Record one with `conntrack-dns-exporter record` (CAP_NET_ADMIN, in the namespace to record).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from exporter.conntrack.stats import ConntrackStats, NetlinkStatsSource, parse_stats_cpu, parse_stats_global
from exporter.conntrack.sysctl import SysctlSource
from exporter.core import fixtures
from exporter.core.fixtures import FixtureError

__all__ = ["FixtureError", "FixtureStatsSource", "Recorder", "load"]


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a statistics fixture (start-up: a bad file is FixtureError, exit 2)."""
    data = fixtures.load(path, "conntrack fixture")
    samples = data.get("samples")
    if not isinstance(samples, list) or not samples:
        raise FixtureError(f"conntrack fixture {path} has no samples")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise FixtureError(f"conntrack fixture {path}: samples[{i}] is not an object")
        for part in ("stats_cpu", "stats"):
            fixtures.hex_datagrams(s.get(part, []), f"conntrack fixture {path}: samples[{i}].{part}")
    fixtures.int_map(data.get("sysctl"), f"conntrack fixture {path}: sysctl")
    return data


class FixtureStatsSource:
    """Replays the samples of a (checked) fixture, one per call, then keeps returning the last."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._samples = [(fixtures.hex_datagrams(s.get("stats_cpu", []), "stats_cpu"),
                          fixtures.hex_datagrams(s.get("stats", []), "stats")) for s in data["samples"]]
        self._next = 0
        self._lock = threading.Lock()
        self.sysctl: dict[str, int] = fixtures.int_map(data.get("sysctl"), "sysctl")

    def peek(self) -> ConntrackStats:
        """The sample the last `sample()` returned (the first before any), without advancing the replay."""
        with self._lock:
            cpu, glob = self._samples[min(max(self._next - 1, 0), len(self._samples) - 1)]
        entries, limit = parse_stats_global(glob)
        return ConntrackStats(per_cpu=parse_stats_cpu(cpu), entries=entries, limit=limit)

    def sample(self) -> ConntrackStats:
        with self._lock:
            cpu, glob = self._samples[min(self._next, len(self._samples) - 1)]
            self._next += 1
        entries, limit = parse_stats_global(glob)
        return ConntrackStats(per_cpu=parse_stats_cpu(cpu), entries=entries, limit=limit)

    def close(self) -> None:
        pass


class Recorder:
    """Records live samples into the fixture format. Construct and sample in the namespace to record."""

    def __init__(self, description: str = "") -> None:
        self._raw: list[tuple[str, list[bytes]]] = []
        self._src = NetlinkStatsSource(record=self._raw)
        self._samples: list[dict[str, Any]] = []
        self.description = description
        self.sysctl: dict[str, int] = {}

    def sample(self) -> ConntrackStats:
        self._raw.clear()
        stats = self._src.sample()
        self._samples.append({kind: [d.hex() for d in dgrams] for kind, dgrams in self._raw})
        if not self.sysctl:
            self.sysctl = SysctlSource().read()
        return stats

    def close(self) -> None:
        self._src.close()

    def data(self) -> dict[str, Any]:
        return {**fixtures.header(self.description), "sysctl": self.sysctl, "samples": self._samples}

    def write(self, out: Path) -> None:
        fixtures.write(out, self.data())
