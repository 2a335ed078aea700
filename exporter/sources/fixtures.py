"""Recorded netlink replies, replayed instead of the kernel (`--collector.conntrack.fixtures PATH`).

A fixture is JSON: the raw reply datagrams of each sample, hex-encoded exactly as the kernel sent them,
plus the netfilter sysctls at recording time. Replaying runs the same parser as live sampling, so a
fixture recorded on a user's node reproduces their numbers. Each scrape advances one sample and stays
on the last one, so a fixture of several samples replays counters that grow.

Record one (needs CAP_NET_ADMIN, in the namespace to record):
    python -m exporter.sources.fixtures record out.json --samples 3 --interval 1 --description "..."
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

from exporter.collectors.base import CollectorError
from exporter.sources.netlink import ConntrackStats, NetlinkStatsSource, parse_stats_cpu, parse_stats_global
from exporter.sources.sysctl import SysctlSource


class FixtureError(CollectorError):
    reason = "fixture"


def load(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise FixtureError(f"cannot read fixture {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise FixtureError(f"fixture {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or not data["samples"]:
        raise FixtureError(f"fixture {path} has no samples")
    return data


class FixtureStatsSource:
    """Replays the samples of a fixture, one per call, then keeps returning the last."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._samples: list[dict[str, Any]] = data["samples"]
        self._next = 0
        self._lock = threading.Lock()
        self.sysctl: dict[str, int] = {k: int(v) for k, v in data.get("sysctl", {}).items()}

    def sample(self) -> ConntrackStats:
        with self._lock:
            s = self._samples[min(self._next, len(self._samples) - 1)]
            self._next += 1
        cpu = [bytes.fromhex(h) for h in s.get("stats_cpu", [])]
        glob = [bytes.fromhex(h) for h in s.get("stats", [])]
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
        return {
            "description": self.description,
            "kernel": platform.release(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sysctl": self.sysctl,
            "samples": self._samples,
        }

    def write(self, out: Path) -> None:
        out.write_text(json.dumps(self.data(), indent=1) + "\n")


def record(out: Path, samples: int, interval: float, description: str) -> None:
    rec = Recorder(description)
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            rec.sample()
    finally:
        rec.close()
    rec.write(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.sources.fixtures")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record netlink conntrack statistics replies to a fixture file")
    r.add_argument("out", type=Path)
    r.add_argument("--samples", type=int, default=1)
    r.add_argument("--interval", type=float, default=1.0)
    r.add_argument("--description", default="")
    args = p.parse_args(argv)
    try:
        record(args.out, args.samples, args.interval, args.description)
    except CollectorError as e:
        print(f"record: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
