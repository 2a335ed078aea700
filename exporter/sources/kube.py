"""Kubernetes API source: discovers the cluster DNS path and the pods on this node, by list + watch.

Three resources, each followed by one background thread at most (never one watch per target):
- the DNS Service (`get` only: its cluster IP and DNS port; fetched when the EndpointSlice watch (re)lists,
  and again when a slice names a different owning Service UID, i.e. the Service was re-created);
- its EndpointSlices (`discovery.k8s.io/v1`, label `kubernetes.io/service-name=<name>`): list + watch;
- the pods on this node (`spec.nodeName=<node>` field selector): list + watch, kept in a `PodIndex`.

A watch starts from the list's resourceVersion, asks for bookmarks, and is renewed from the last seen
resourceVersion when the API server ends it. `410 Gone` (as a status or an ERROR event) forces a relist;
any other failure (refused, reset mid-stream, 5xx, 403) is retried with capped exponential backoff and
jitter. Failures never clear what is known: the last targets stay probed until the API answers again.

Targets go to `TargetRegistry` under origin `kubernetes`: `kind="service"` for each cluster IP of the
Service, `kind="endpoint"` (with the backing pod's name) for each ready address of its slices.
`KubeState` holds what the `kubernetes` collector exports (up, restarts, last event, object counts).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from exporter import logs
from exporter.probes.targets import Target, TargetRegistry
from exporter.sources.podindex import PodIndex

ORIGIN = "kubernetes"
RESOURCES = ("services", "endpointslices", "pods")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
IN_CLUSTER_TOKEN = f"{SA_DIR}/token"
IN_CLUSTER_CA = f"{SA_DIR}/ca.crt"

# RBAC rule a 403 on each request is missing: (apiGroup, resource, verbs the exporter needs).
RBAC_RULES = {
    "services": ("", "services", "get"),
    "endpointslices": ("discovery.k8s.io", "endpointslices", "list, watch"),
    "pods": ("", "pods", "list, watch"),
}

log = logs.get("kubernetes")

Obj = dict[str, Any]


class Gone(Exception):
    """The resourceVersion we watch from is too old (410): relist."""


class Forbidden(Exception):
    """403: the ServiceAccount lacks an RBAC rule; the message names it."""


class WatchError(Exception):
    """The API server sent a watch ERROR event other than 410."""


def in_cluster_available() -> bool:
    """True inside a pod: the API server's env vars and the ServiceAccount token are there."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
                and os.path.isfile(IN_CLUSTER_TOKEN))


def load_configuration(kubeconfig: str | None, in_cluster: bool) -> Any:
    """A `kubernetes.client.Configuration` from a kubeconfig file or the in-cluster ServiceAccount.

    Raises ValueError with one line if the configuration cannot be loaded.
    """
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    try:
        if in_cluster:
            # The projected token rotates: the loader re-reads it before it expires.
            InClusterConfigLoader(token_filename=IN_CLUSTER_TOKEN, cert_filename=IN_CLUSTER_CA,
                                  try_refresh_token=True).load_and_set(cfg)
        else:
            # KUBECONFIG may list several files (path-separated): the loader merges them.
            config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                    client_configuration=cfg, persist_config=False)
    except Exception as e:  # the loaders raise ConfigException, OSError, yaml errors, TypeError...
        source = kubeconfig or os.environ.get("KUBECONFIG")
        where = "in-cluster service account" if in_cluster else f"kubeconfig {source}"
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot load Kubernetes configuration from {where}: {msg}") from None
    # Failures are ours to retry (with backoff and a metric), not urllib3's silent immediate retries.
    cfg.retries = False
    # Long idle watches must survive (or fail fast behind) NAT and load balancers.
    cfg.keep_alive = True
    return cfg


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

    def ok(self, resource: str, objects: int | None = None) -> None:
        with self._lock:
            st = self._res[resource]
            st.synced, st.error = True, ""
            if objects is not None:  # a list or get answered (a watch merely opening is not an event)
                st.objects, st.last_event = objects, time.time()

    def event(self, resource: str, objects: int | None = None) -> None:
        with self._lock:
            st = self._res[resource]
            st.last_event = time.time()
            if objects is not None:
                st.objects = objects

    def failed(self, resource: str, error: str) -> bool:
        """Record a failure (and a restart); return True if this is a new error (log it at warn)."""
        with self._lock:
            st = self._res[resource]
            new = st.synced or st.error != error
            st.synced, st.error = False, error
            st.restarts += 1
            return new

    def restarted(self, resource: str) -> None:
        with self._lock:
            self._res[resource].restarts += 1

    @property
    def up(self) -> bool:
        with self._lock:
            return all(st.synced for st in self._res.values())

    def snapshot(self) -> dict[str, ResourceState]:
        with self._lock:
            return {r: ResourceState(st.synced, st.restarts, st.last_event, st.objects, st.error)
                    for r, st in self._res.items()}


class Backoff:
    """Capped exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to `cap`, each scaled by 0.5-1.0."""

    def __init__(self, cap: float, base: float = 0.5) -> None:
        self.cap, self.base, self.attempt = cap, base, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


def describe_error(e: BaseException) -> str:
    """A short bounded description for logs: `403 Forbidden`, `connection refused`, `reset mid-stream`."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and status:
        return f"HTTP {status} {getattr(e, 'reason', '')}".strip()
    text = " ".join(str(e).split())
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timeout"),
                          ("Read timed out", "timeout"), ("ended prematurely", "stream ended mid-event"),
                          ("InvalidChunkLength", "stream reset mid-chunk"), ("IncompleteRead", "stream reset")):
        if needle in text:
            return short
    return f"{type(e).__name__}: {text[:200]}"


class Handler(Protocol):
    resource: str

    def replace(self, items: list[Obj]) -> None: ...

    def apply(self, kind: str, obj: Obj) -> None: ...

    def count(self) -> int: ...


@dataclass
class Timeouts:
    connect: float = 5.0
    list_read: float = 30.0
    watch_seconds: int = 300  # server side; the server ends the watch cleanly, we renew it
    watch_slack: float = 30.0  # client read timeout = watch_seconds + slack (dead peer behind a NAT)
    max_backoff: float = 30.0
    page_size: int = 500  # list in pages, as informers do, so a big list never loads the API server at once


class ListWatch:
    """list + watch of one resource in one thread, until `stop` is set."""

    def __init__(self, handler: Handler, list_fn: Callable[..., Any], rbac_namespace: str, state: KubeState,
                 stop: threading.Event, timeouts: Timeouts, before_list: Callable[[], None] | None = None,
                 after_watch: Callable[[], None] | None = None) -> None:
        self.h = handler
        self.resource = handler.resource
        self._list_fn = list_fn
        self._ns = rbac_namespace
        self._state = state
        self._stop = stop
        self._t = timeouts
        self._before_list = before_list
        self._after_watch = after_watch
        self._lock = threading.Lock()
        self._resp: Any = None
        self._rv: str | None = None  # where the next watch resumes; None: (re)list first
        self._watch_opened: float | None = None
        self._watch_events = 0
        self._last_gone = -1e9
        self._forbidden_logged: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"kube-{self.resource}", daemon=True)

    # -- lifecycle --
    def start(self) -> None:
        self.thread.start()

    def interrupt(self) -> None:
        """Unblock a read in progress (called after `stop` is set)."""
        with self._lock:
            resp = self._resp
        if resp is not None:
            shutdown_response(resp)

    def _run(self) -> None:
        backoff = Backoff(self._t.max_backoff)
        while not self._stop.is_set():
            verb = "list" if self._rv is None else "watch"
            try:
                if self._rv is None:
                    if self._before_list is not None:
                        self._before_list()
                    self._rv = self._list()
                    backoff.reset()
                verb = "watch"
                started = time.monotonic()
                events = self._watch()
                if self._stop.is_set():
                    break
                if self._after_watch is not None:
                    self._after_watch()
                # The server ended the watch (its timeout): renew from where we are, at once; but a
                # server that keeps closing watches straight away must not make us spin.
                if events == 0 and time.monotonic() - started < 1.0:
                    self._stop.wait(backoff.next())
                else:
                    backoff.reset()
                continue
            except Gone:
                if self._stop.is_set():
                    break
                log.info("watch expired (410 Gone), relisting", extra={"kv": {"resource": self.resource}})
                self._state.restarted(self.resource)
                self._rv = None
                # A server answering 410 again right after a relist must not make us spin.
                now = time.monotonic()
                if now - self._last_gone < 1.0:
                    self._stop.wait(backoff.next())
                self._last_gone = now
                continue
            except Forbidden as e:
                if self._stop.is_set():
                    break
                self._state.failed(self.resource, "forbidden")
                if str(e) not in self._forbidden_logged:
                    self._forbidden_logged.add(str(e))
                    log.error("%s", e)
            except Exception as e:
                if self._stop.is_set():
                    break
                if self._watch_was_healthy():
                    backoff.reset()  # a long-lived stream that broke: retry soon, it is not a flapping server
                desc = describe_error(e)
                if self._state.failed(self.resource, desc):
                    log.warning("Kubernetes API request failed, retrying with backoff; keeping the last known "
                                "state", extra={"kv": {"resource": self.resource, "verb": verb, "error": desc}})
                else:
                    log.debug("Kubernetes API request failed again", extra={"kv": {"resource": self.resource,
                                                                                   "error": desc}})
            self._stop.wait(backoff.next())

    def _watch_was_healthy(self) -> bool:
        opened, self._watch_opened = self._watch_opened, None
        return opened is not None and (self._watch_events > 0 or time.monotonic() - opened > 10.0)

    # -- requests --
    def _call(self, verb: str, **kwargs: Any) -> Any:
        try:
            return self._list_fn(_preload_content=False, **kwargs)
        except Exception as e:
            if getattr(e, "status", None) == 403:
                raise Forbidden(forbidden_message(self.resource, verb, self._ns)) from None
            if getattr(e, "status", None) == 410:
                raise Gone() from None
            raise

    def _list(self) -> str:
        items: list[Obj] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self._t.page_size,
                                      "_request_timeout": (self._t.connect, self._t.list_read)}
            if token:
                kwargs["_continue"] = token
            resp = self._call("list", **kwargs)
            with self._lock:
                self._resp = resp
            try:
                if self._stop.is_set():  # stop() came before we published resp: it could not interrupt us
                    raise InterruptedError("stopping")
                body = json.loads(resp.data)
            finally:
                with self._lock:
                    self._resp = None
                # One connection per request keeps a half-read response from ever being reused.
                resp.close()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.h.replace(items)
        self._state.ok(self.resource, self.h.count())
        rv = str(meta.get("resourceVersion") or "")
        log.debug("listed", extra={"kv": {"resource": self.resource, "items": len(items), "resource_version": rv}})
        return rv

    def _watch(self) -> int:
        """Follow one watch stream from `self._rv` (advanced as events arrive, so that a stream cut
        mid-way resumes after the last event seen); return the number of events when the server ends it."""
        rv = self._rv
        # Spread renewals so that a fleet of DaemonSet pods does not re-watch in lock step.
        seconds = int(self._t.watch_seconds * random.uniform(0.9, 1.1))
        resp = self._call("watch", watch=True, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=seconds,
                          _request_timeout=(self._t.connect, seconds + self._t.watch_slack))
        with self._lock:
            self._resp = resp
        self._state.ok(self.resource)
        self._watch_opened, self._watch_events = time.monotonic(), 0
        events = 0
        try:
            if self._stop.is_set():  # stop() came before we published resp: it could not interrupt us
                return 0
            for line in iter_lines(resp):
                if self._stop.is_set():
                    break
                ev = json.loads(line)
                kind = ev.get("type")
                obj = ev.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise WatchError(f"watch error event: {obj.get('code')} {obj.get('reason')} "
                                     f"{obj.get('message', '')}"[:300])
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                events += 1
                self._watch_events = events
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.h.apply(kind, obj)
                    log.debug("watch event", extra={"kv": {"resource": self.resource, "type": kind,
                                                           "name": (obj.get("metadata") or {}).get("name", "")}})
                if new_rv:
                    self._rv = str(new_rv)
                self._state.event(self.resource, self.h.count())
        finally:
            with self._lock:
                self._resp = None
            resp.close()
        return events


def forbidden_message(resource: str, verb: str, namespace: str) -> str:
    group, res, verbs = RBAC_RULES[resource]
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    kind = "Role" if namespace else "ClusterRole"
    return (f"Kubernetes API denied {verb} on {res}{'.' + group if group else ''} {where} (403): the exporter's "
            f"ServiceAccount needs a {kind} rule apiGroups=[\"{group}\"] resources=[\"{res}\"] verbs=[{verbs}]"
            + (f" in namespace {namespace}" if namespace else ""))


def iter_lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON watch events, as chunks arrive (a line may span several chunks)."""
    buf = b""
    for chunk in resp.stream(None, decode_content=True) if resp.chunked else _read1(resp):
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].strip(), buf[nl + 1:]
            if line:
                yield line
    if buf.strip():
        yield buf.strip()


def _read1(resp: Any) -> Iterator[bytes]:
    while True:
        data = resp.read1(65536)
        if not data:
            return
        yield data


def shutdown_response(resp: Any) -> None:
    """Wake a thread blocked reading `resp` (urllib3 >= 2.3 shutdown(); else shut the socket down)."""
    try:
        resp.shutdown()
        return
    except Exception:
        pass
    try:
        sock = resp._fp.fp.raw._sock  # http.client's socket; older urllib3 only
        sock.shutdown(2)
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------
# The DNS Service and its EndpointSlices -> probe targets


def _meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


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
    return ServiceInfo(uid=str(_meta(obj).get("uid", "")), cluster_ips=tuple(ips),
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
            self.slices = {str(_meta(o).get("name", "")): o for o in items}
        self.publish()
        if self.on_slices is not None:
            self.on_slices()

    def apply(self, kind: str, obj: Obj) -> None:
        name = str(_meta(obj).get("name", ""))
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
                    for ref in (_meta(s).get("ownerReferences") or [])
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


# ---------------------------------------------------------------------------------------------------------
# Pods on this node -> PodIndex


@dataclass
class PodWatchHandler:
    index: PodIndex
    resource: str = "pods"
    _ips: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _key_ips(obj: Obj) -> tuple[tuple[str, str], tuple[str, ...]]:
        m = _meta(obj)
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


# ---------------------------------------------------------------------------------------------------------
# The service the feature starts


class KubeWatcher:
    """Starts the EndpointSlice watch (with the Service get) and, given a node name, the pod watch."""

    name = "kubernetes"

    def __init__(self, cfg: Any, namespace: str, service: str, node: str, registry: TargetRegistry,
                 pods: PodIndex, timeouts: Timeouts | None = None) -> None:
        from kubernetes import client

        self._t = timeouts or Timeouts()
        self._api = client.ApiClient(cfg)
        self._core = client.CoreV1Api(self._api)
        self._disc = client.DiscoveryV1Api(self._api)
        self.namespace, self.service, self.node = namespace, service, node
        self._stop = threading.Event()
        resources = ("services", "endpointslices", "pods") if node else ("services", "endpointslices")
        self.state = KubeState(resources)
        self.dns = DNSDiscovery(registry, namespace, service, on_slices=self._maybe_refetch)
        self._svc_forbidden_logged = False
        self._owners_seen: set[str] | None = None
        self._svc_lock = threading.Lock()
        slices_fn = _bind(self._disc.list_namespaced_endpoint_slice, namespace,
                          label_selector=f"{SERVICE_NAME_LABEL}={service}")
        self._watches = [ListWatch(self.dns, slices_fn, namespace, self.state, self._stop, self._t,
                                   before_list=self.fetch_service, after_watch=self._maybe_refetch)]
        if node:
            pods_fn = _bind(self._core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
            self._watches.append(ListWatch(PodWatchHandler(pods), pods_fn, "", self.state, self._stop, self._t))

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
                if self.state.failed("services", desc):
                    log.warning("cannot get the DNS Service; keeping the last known one",
                                extra={"kv": {"service": f"{self.namespace}/{self.service}", "error": desc}})
                return
            info = parse_service(body)
            self.dns.set_service(info)
            self.state.ok("services", 1)

    def start(self) -> None:
        log.info("watching the Kubernetes API", extra={"kv": {
            "host": self._api.configuration.host, "dns_service": f"{self.namespace}/{self.service}",
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
            self._api.rest_client.pool_manager.clear()
        except Exception:
            log.debug("closing the API connection pool failed", exc_info=True)


def _bind(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    def call(**more: Any) -> Any:
        return fn(*args, **kwargs, **more)
    return call

