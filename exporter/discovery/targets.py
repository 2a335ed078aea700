"""The set of DNS servers to probe, fed by several origins (flags, resolv.conf, Kubernetes).

Each origin replaces its own share with `TargetRegistry.set(origin, targets)`; the probe scheduler reads
`snapshot()` and follows `version` to notice changes. The table collector reads it too: a DNS conntrack
entry whose reply source is not a current target is stale.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("static", "resolvconf", "nodelocal", "service", "endpoint")


@dataclass(frozen=True, order=True)
class Target:
    """One DNS server address to probe. `kind` is one of KINDS; `pod` names an endpoint's pod."""

    host: str
    port: int = 53
    kind: str = "static"
    pod: str = ""

    @property
    def server(self) -> str:
        """The `server` label: `10.96.0.10:53`, `[fd00::a]:53`."""
        try:
            is_v6 = ipaddress.ip_address(self.host).version == 6
        except ValueError:
            is_v6 = False
        return f"[{self.host}]:{self.port}" if is_v6 else f"{self.host}:{self.port}"


class TargetRegistry:
    """Thread-safe union of the targets each origin currently provides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_origin: dict[str, tuple[Target, ...]] = {}
        self._version = 0
        self._changed = threading.Condition(self._lock)

    def set(self, origin: str, targets: Iterable[Target]) -> None:
        new = tuple(sorted(set(targets)))
        with self._lock:
            if self._by_origin.get(origin) == new:
                return
            self._by_origin[origin] = new
            self._version += 1
            self._changed.notify_all()

    def snapshot(self) -> tuple[Target, ...]:
        with self._lock:
            seen: dict[tuple[str, int, str], Target] = {}
            for origin in sorted(self._by_origin):
                for t in self._by_origin[origin]:
                    seen.setdefault((t.host, t.port, t.kind), t)
            return tuple(sorted(seen.values()))

    def origin(self, origin: str) -> tuple[Target, ...]:
        with self._lock:
            return self._by_origin.get(origin, ())

    def origins(self) -> tuple[str, ...]:
        """Names of the origins that currently provide at least one target."""
        with self._lock:
            return tuple(sorted(o for o, ts in self._by_origin.items() if ts))

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def wait_for_change(self, version: int, timeout: float, stop: threading.Event | None = None) -> int:
        """Block until the version differs from `version`, `stop` is set (and `wake()` called), or the timeout
        passes; return the version. A waiter needs no polling loop (each wake-up costs CPU on every node)."""
        with self._lock:
            self._changed.wait_for(lambda: self._version != version or (stop is not None and stop.is_set()),
                                   timeout)
            return self._version

    def wake(self) -> None:
        """Let waiters re-check their `stop` event."""
        with self._lock:
            self._changed.notify_all()

    def addresses(self) -> frozenset[str]:
        """Every host currently probed (for the table scan's stale-DNS check)."""
        return frozenset(t.host for t in self.snapshot())
