"""State that data paths share without importing each other: the DNS servers to watch (targets), the
pods on this node (pod index), the local ports of the exporter's own DNS probes, and a "synced" event.

`synced` answers "has every discovery source given its first answer?". A source that will provide
targets (the Kubernetes watch) calls `expect(name)` while the process is being built and `done(name)`
after its first list returned (targets or an error: either way there is an answer). Consumers that
would judge too early (the table scan's stale-DNS check, the resolv.conf fallback of the probes) call
`wait_synced(timeout)` once before their first round; with no source expected it returns at once.
"""

from __future__ import annotations

import threading

from exporter.discovery.ownports import OwnPorts
from exporter.discovery.pods import PodIndex
from exporter.discovery.targets import KINDS, Target, TargetRegistry

__all__ = ["KINDS", "Discovery", "OwnPorts", "PodIndex", "Target", "TargetRegistry"]

SYNC_TIMEOUT = 5.0  # seconds a consumer waits for discovery at most before its first round


class Discovery:
    def __init__(self, targets: TargetRegistry | None = None, pods: PodIndex | None = None) -> None:
        self.targets = targets if targets is not None else TargetRegistry()
        self.pods = pods if pods is not None else PodIndex()
        self.own_ports = OwnPorts()  # the DNS probes' sockets, excluded from the passive DNS flows
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._synced = threading.Event()
        self._synced.set()

    def expect(self, source: str) -> None:
        with self._lock:
            self._pending.add(source)
            self._synced.clear()

    def done(self, source: str) -> None:
        with self._lock:
            self._pending.discard(source)
            if not self._pending:
                self._synced.set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float = SYNC_TIMEOUT, stop: threading.Event | None = None) -> bool:
        """Wait until synced, `timeout` passes, or `stop` is set; True if synced."""
        if stop is None:
            return self._synced.wait(timeout)
        deadline = timeout
        while deadline > 0 and not stop.is_set():
            if self._synced.wait(min(0.1, deadline)):
                return True
            deadline -= 0.1
        return self._synced.is_set()
