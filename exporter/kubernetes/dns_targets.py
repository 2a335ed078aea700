"""The DNS Service and its EndpointSlices -> probe targets (origin `kubernetes`).

`kind="service"` for each cluster IP of the Service, `kind="endpoint"` (with the backing pod's name) for
each ready address of its slices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.core import logs
from exporter.discovery.targets import Target, TargetRegistry
from exporter.kubernetes.client import Obj, meta

ORIGIN = "kubernetes"

log = logs.get("kubernetes")


@dataclass
class ServiceInfo:
    uid: str
    cluster_ips: tuple[str, ...]
    port: int
    port_name: str


def parse_service(obj: Obj) -> ServiceInfo:
    spec = obj.get("spec") or {}
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
    ports = spec.get("ports") or []
    chosen = _pick_port(ports)
    return ServiceInfo(uid=str(meta(obj).get("uid", "")), cluster_ips=tuple(ips),
                       port=int(chosen.get("port") or 53) if chosen else 53,
                       port_name=str(chosen.get("name") or "") if chosen else "")


def _pick_port(ports: list[Obj], name: str | None = None) -> Obj | None:
    """The DNS port among a Service's or slice's ports: the one named like the Service's, else UDP `dns`,
    else any UDP port on 53, else the first UDP port."""
    udp = [p for p in ports if isinstance(p, dict) and (p.get("protocol") or "TCP") == "UDP"]
    if name is not None:
        for p in udp:
            if (p.get("name") or "") == name:
                return p
    for pred in (lambda p: p.get("name") == "dns", lambda p: p.get("port") == 53, lambda p: True):
        for p in udp:
            if pred(p):
                return p
    return None


@dataclass
class DNSDiscovery:
    """Handler for the DNS Service's EndpointSlices; publishes targets to the registry."""

    registry: TargetRegistry
    namespace: str
    name: str
    resource: str = "endpointslices"
    service: ServiceInfo | None = None
    slices: dict[str, Obj] = field(default_factory=dict)
    on_slices: Callable[[], None] | None = None  # called after each list and event (Service re-creation check)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _published: bool = False

    def set_service(self, info: ServiceInfo | None) -> None:
        with self._lock:
            self.service = info
        self.publish()

    def service_uid(self) -> str:
        with self._lock:
            return self.service.uid if self.service else ""

    def replace(self, items: list[Obj]) -> None:
        with self._lock:
            self.slices = {str(meta(o).get("name", "")): o for o in items}
        self.publish()
        if self.on_slices is not None:
            self.on_slices()

    def apply(self, kind: str, obj: Obj) -> None:
        name = str(meta(obj).get("name", ""))
        with self._lock:
            if kind == "DELETED":
                self.slices.pop(name, None)
            else:
                self.slices[name] = obj
        self.publish()
        if self.on_slices is not None:
            self.on_slices()

    def count(self) -> int:
        with self._lock:
            return len(self.slices)

    def owner_uids(self) -> set[str]:
        """UIDs of the Service the slices say they belong to (differs from ours after a re-creation)."""
        with self._lock:
            return {str(ref.get("uid", "")) for s in self.slices.values()
                    for ref in (meta(s).get("ownerReferences") or [])
                    if ref.get("kind") == "Service" and ref.get("name") == self.name}

    def targets(self) -> list[Target]:
        with self._lock:
            svc = self.service
            slices = list(self.slices.values())
        out: list[Target] = []
        if svc is not None:
            out += [Target(host=ip, port=svc.port, kind="service") for ip in svc.cluster_ips]
        for s in slices:
            if s.get("addressType") not in ("IPv4", "IPv6"):
                continue  # FQDN slices name no address to probe
            port_obj = _pick_port(s.get("ports") or [], svc.port_name if svc else None)
            port = int(port_obj.get("port") or 53) if port_obj else (svc.port if svc else 53)
            for ep in s.get("endpoints") or []:
                # The API documents a missing `ready` as "unknown, treat as ready".
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                ref = ep.get("targetRef") or {}
                pod = str(ref.get("name", "")) if ref.get("kind") == "Pod" else ""
                out += [Target(host=a, port=port, kind="endpoint", pod=pod) for a in ep.get("addresses") or []]
        return out

    def publish(self) -> None:
        targets = self.targets()
        before = self.registry.origin(ORIGIN)
        self.registry.set(ORIGIN, targets)
        after = self.registry.origin(ORIGIN)
        if after != before or not self._published:
            self._published = True
            log.info("DNS targets from Kubernetes", extra={"kv": {
                "service": f"{self.namespace}/{self.name}",
                "targets": ",".join(f"{t.kind}={t.server}" + (f"({t.pod})" if t.pod else "") for t in after)}})
