"""The pods on this node -> PodIndex (IP -> namespace/pod), from a list + watch of pods."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from exporter.discovery.pods import PodIndex
from exporter.kubernetes.client import Obj, meta


@dataclass
class PodWatchHandler:
    index: PodIndex
    resource: str = "pods"
    _ips: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _key_ips(obj: Obj) -> tuple[tuple[str, str], tuple[str, ...]]:
        m = meta(obj)
        key = (str(m.get("namespace", "")), str(m.get("name", "")))
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        # hostNetwork pods share the node's IP: attributing it to one of them would mislead.
        if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
            return key, ()
        ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)] or [status.get("podIP")]
        return key, tuple(ip for ip in ips if ip)

    def replace(self, items: list[Obj]) -> None:
        ips = dict(self._key_ips(o) for o in items)
        with self._lock:
            self._ips = {k: v for k, v in ips.items() if v}
            self.index.replace((ip, ns, name) for (ns, name), v in self._ips.items() for ip in v)

    def apply(self, kind: str, obj: Obj) -> None:
        key, ips = self._key_ips(obj)
        if kind == "DELETED":
            ips = ()
        with self._lock:
            old = self._ips.pop(key, ())
            if ips:
                self._ips[key] = ips
            for ip in old:
                # The IP may already belong to a newer pod (events for two pods interleave).
                if ip not in ips and self.index.lookup(ip) == key:
                    self.index.remove(ip)
            for ip in ips:
                self.index.update(ip, *key)

    def count(self) -> int:
        with self._lock:
            return len(self._ips)
