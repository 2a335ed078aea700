"""IP address -> (namespace, pod) for the pods on this node, kept by the Kubernetes pod watch.

The table collector uses it to name the workloads that fill the conntrack table.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class PodIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_ip: dict[str, tuple[str, str]] = {}

    def replace(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Replace the whole map with (ip, namespace, pod) triples (after a list or relist)."""
        new = {ip: (ns, pod) for ip, ns, pod in entries}
        with self._lock:
            self._by_ip = new

    def update(self, ip: str, namespace: str, pod: str) -> None:
        with self._lock:
            self._by_ip[ip] = (namespace, pod)

    def remove(self, ip: str) -> None:
        with self._lock:
            self._by_ip.pop(ip, None)

    def lookup(self, ip: str) -> tuple[str, str] | None:
        with self._lock:
            return self._by_ip.get(ip)

    def snapshot(self) -> dict[str, tuple[str, str]]:
        with self._lock:
            return dict(self._by_ip)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_ip)
