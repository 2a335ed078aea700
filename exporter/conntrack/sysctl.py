"""Conntrack tunables from the netfilter sysctls of the exporter's own network namespace.

`/proc/sys/net/netfilter` is resolved against the namespace of the process reading it, so under
`hostNetwork` these are the node's values. Missing files (no nf_conntrack) are simply left out.
They are tunables an administrator changes by hand, not counters: `CachedSysctl` reads them at most once a
`ttl` (60 s), not on every scrape (nine file reads, about a third of a scrape's cost).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

SYSCTL_DIR = Path("/proc/sys/net/netfilter")

# sysctl name -> (protocol, state) for conntrack_timeout_seconds
TIMEOUTS: dict[str, tuple[str, str]] = {
    "nf_conntrack_tcp_timeout_established": ("tcp", "established"),
    "nf_conntrack_tcp_timeout_syn_sent": ("tcp", "syn_sent"),
    "nf_conntrack_tcp_timeout_fin_wait": ("tcp", "fin_wait"),
    "nf_conntrack_tcp_timeout_close_wait": ("tcp", "close_wait"),
    "nf_conntrack_tcp_timeout_time_wait": ("tcp", "time_wait"),
    "nf_conntrack_udp_timeout": ("udp", "unreplied"),
    "nf_conntrack_udp_timeout_stream": ("udp", "stream"),
    "nf_conntrack_icmp_timeout": ("icmp", "default"),
}
BUCKETS = "nf_conntrack_buckets"
NAMES = (BUCKETS, *TIMEOUTS)


class SysctlSource:
    def __init__(self, root: Path = SYSCTL_DIR) -> None:
        self._root = root

    def read(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in NAMES:
            try:
                out[name] = int((self._root / name).read_text().strip())
            except (OSError, ValueError):
                continue
        return out


class StaticSysctlSource:
    """Recorded values (from a fixture file)."""

    def __init__(self, values: dict[str, int]) -> None:
        self._values = dict(values)

    def read(self) -> dict[str, int]:
        return dict(self._values)


class _Reader(Protocol):
    def read(self) -> dict[str, int]: ...


class CachedSysctl:
    """Re-reads `reader` when its last values are older than `ttl` seconds."""

    def __init__(self, reader: _Reader, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._reader, self._ttl = reader, ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, int] | None = None
        self._read_at = 0.0

    def read(self) -> dict[str, int]:
        now = self._clock()
        with self._lock:
            if self._values is None or now - self._read_at >= self._ttl:
                self._values, self._read_at = self._reader.read(), now
            return dict(self._values)
