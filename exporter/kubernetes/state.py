"""Per-resource health of the watches (synced, restarts, last event, objects), read by the collector."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class ResourceState:
    synced: bool = False
    restarts: int = 0
    last_event: float | None = None
    objects: int = 0
    error: str = ""


class KubeState:
    """What the collector exports; written by the watch threads, read at scrape time."""

    def __init__(self, resources: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self._res = {r: ResourceState() for r in resources}
        self.version = 0  # bumped by every change: the collector renders once per change
        self.exempt = False  # the API connections are exempt from conntrack (--web.notrack)
        self._blocked: set[str] = set()  # resources whose last request could not connect, table full

    def ok(self, resource: str, objects: int | None = None) -> None:
        with self._lock:
            self.version += 1
            self._blocked.discard(resource)
            st = self._res[resource]
            st.synced, st.error = True, ""
            if objects is not None:  # a list or get answered (a watch merely opening is not an event)
                st.objects, st.last_event = objects, time.time()

    def event(self, resource: str, objects: int | None = None) -> None:
        with self._lock:
            self.version += 1
            st = self._res[resource]
            st.last_event = time.time()
            if objects is not None:
                st.objects = objects

    def failed(self, resource: str, error: str, blocked: bool = False) -> bool:
        """Record a failure (and a restart); return True if this is a new error (log it at warn).
        `blocked`: the request could not connect while the conntrack table was full."""
        with self._lock:
            self.version += 1
            if blocked:
                self._blocked.add(resource)
            else:
                self._blocked.discard(resource)
            st = self._res[resource]
            new = st.synced or st.error != error
            st.synced, st.error = False, error
            st.restarts += 1
            return new

    def restarted(self, resource: str) -> None:
        with self._lock:
            self.version += 1
            self._res[resource].restarts += 1

    def blocked(self) -> bool:
        with self._lock:
            return bool(self._blocked)

    def snapshot(self) -> dict[str, ResourceState]:
        with self._lock:
            return {r: ResourceState(st.synced, st.restarts, st.last_event, st.objects, st.error)
                    for r, st in self._res.items()}
