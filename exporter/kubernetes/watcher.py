"""The Kubernetes service: discovers the cluster DNS path and the pods on this node, by list + watch.

Three resources, each followed by one background thread at most (never one watch per target):
- the DNS Service (`get` only: its cluster IP and DNS port; fetched when the EndpointSlice watch (re)lists,
  and again when a slice names a different owning Service UID, i.e. the Service was re-created);
- its EndpointSlices (`discovery.k8s.io/v1`, label `kubernetes.io/service-name=<name>`): list + watch;
- the pods on this node (`spec.nodeName=<node>` field selector): list + watch, kept in a `PodIndex`.

The informer loop is `exporter.kubernetes.client`, the Service/slices -> targets translation
`dns_targets`, the pod map `pods`, the exported health `state`. Discovery's "synced" event is marked once
the first EndpointSlice list has answered (or failed): the probes and the table scan wait for it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from exporter.core import logs
from exporter.discovery import Discovery
from exporter.kubernetes.client import (
    SERVICE_NAME_LABEL,
    ListWatch,
    Timeouts,
    blocked_by_conntrack,
    describe_error,
    forbidden_message,
)
from exporter.kubernetes.dns_targets import ORIGIN, DNSDiscovery, parse_service
from exporter.kubernetes.pods import PodWatchHandler
from exporter.kubernetes.state import KubeState

log = logs.get("kubernetes")


class KubeWatcher:
    """Starts the EndpointSlice watch (with the Service get) and, given a node name, the pod watch."""

    name = "kubernetes"

    def __init__(self, cfg: Any, namespace: str, service: str, node: str, discovery: Discovery,
                 timeouts: Timeouts | None = None) -> None:
        self._t = timeouts or Timeouts()
        self._core, self._disc, self.host, self._close = _apis(cfg)
        self.namespace, self.service, self.node = namespace, service, node
        self._stop = threading.Event()
        resources = ("services", "endpointslices", "pods") if node else ("services", "endpointslices")
        self.state = KubeState(resources)
        self.dns = DNSDiscovery(discovery.targets, namespace, service, on_slices=self._maybe_refetch)
        self._discovery = discovery
        discovery.expect(ORIGIN)
        self._svc_forbidden_logged = False
        self._owners_seen: set[str] | None = None
        self._svc_lock = threading.Lock()
        slices_fn = _bind(self._disc.list_namespaced_endpoint_slice, namespace,
                          label_selector=f"{SERVICE_NAME_LABEL}={service}")
        self._watches = [ListWatch(self.dns, slices_fn, namespace, self.state, self._stop, self._t,
                                   before_list=self.fetch_service, after_watch=self._maybe_refetch,
                                   listed=lambda: discovery.done(ORIGIN))]
        if node:
            pods_fn = _bind(self._core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
            self._watches.append(ListWatch(PodWatchHandler(discovery.pods), pods_fn, "", self.state, self._stop,
                                           self._t))

    def _maybe_refetch(self) -> None:
        """Get the Service again when the slices name an owner UID we have not tried yet: the Service was
        created or re-created (new cluster IP). Event-driven: at most one GET per new owner UID."""
        uid = self.dns.service_uid()
        owners = self.dns.owner_uids()
        if owners == self._owners_seen:
            return
        self._owners_seen = owners
        if not uid or (owners and uid not in owners):
            self.fetch_service()

    def fetch_service(self) -> None:
        """GET the DNS Service; failures are recorded and logged, never clear a known Service (but 404 does)."""
        if self._stop.is_set():
            return
        with self._svc_lock:
            try:
                obj: Any = self._core.read_namespaced_service(self.service, self.namespace, _preload_content=False,
                                                         _request_timeout=(self._t.connect, self._t.list_read))
                try:
                    body = json.loads(obj.data)
                finally:
                    obj.close()
            except Exception as e:
                status = getattr(e, "status", None)
                if status == 404:
                    self.dns.set_service(None)
                    self.state.event("services", 0)
                    if self.state.failed("services", "not found"):
                        log.warning("DNS Service not found; probing its endpoints only",
                                    extra={"kv": {"service": f"{self.namespace}/{self.service}"}})
                    return
                if status == 403:
                    self.state.failed("services", "forbidden")
                    if not self._svc_forbidden_logged:
                        self._svc_forbidden_logged = True
                        log.error("%s", forbidden_message("services", "get", self.namespace))
                    return
                desc = describe_error(e)
                blocked = blocked_by_conntrack(e)
                if blocked:
                    desc = "conntrack table full"
                if self.state.failed("services", desc, blocked):
                    log.warning("cannot get the DNS Service; keeping the last known one",
                                extra={"kv": {"service": f"{self.namespace}/{self.service}", "error": desc}})
                return
            info = parse_service(body)
            self.dns.set_service(info)
            self.state.ok("services", 1)

    def start(self) -> None:
        log.info("watching the Kubernetes API", extra={"kv": {
            "host": self.host, "dns_service": f"{self.namespace}/{self.service}",
            "node": self.node or "(none: pod map disabled)"}})
        for w in self._watches:
            w.start()

    def alive(self) -> list[str]:
        """Resources whose watch thread is still running."""
        return [w.resource for w in self._watches if w.thread.is_alive()]

    def stop(self, timeout: float) -> None:
        self._stop.set()
        for w in self._watches:
            w.interrupt()
        deadline = time.monotonic() + timeout
        for w in self._watches:
            w.thread.join(max(0.0, deadline - time.monotonic()))
        alive = self.alive()
        if alive:
            log.debug("watch threads still finishing a request", extra={"kv": {"resources": ",".join(alive)}})
        try:
            self._close()
        except Exception:
            log.debug("closing the API connection pool failed", exc_info=True)


def _apis(cfg: Any) -> tuple[Any, Any, str, Callable[[], None]]:
    """(core/v1, discovery/v1, host, close): the standard-library client in a pod, else `kubernetes`'s."""
    from exporter.kubernetes.incluster import CoreV1, DiscoveryV1, InClusterConfig, RestClient

    if isinstance(cfg, InClusterConfig):
        rest = RestClient(cfg)
        return CoreV1(rest), DiscoveryV1(rest), cfg.host, lambda: None  # one connection per request
    from kubernetes import client

    api = client.ApiClient(cfg)
    return client.CoreV1Api(api), client.DiscoveryV1Api(api), cfg.host, api.rest_client.pool_manager.clear


def _bind(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    def call(**more: Any) -> Any:
        return fn(*args, **kwargs, **more)
    return call
