"""A stand-in Kubernetes API server for tests: the real API's JSON, list + chunked watch streams.

No kube-apiserver (nor etcd) can run on the test machines, so the exporter's real `kubernetes` client is
pointed (through a kubeconfig, `FakeAPI.write_kubeconfig`) at this small threaded HTTP/1.1 server on
127.0.0.1. It serves what the exporter uses, shaped like a 1.30+ API server:

- `GET /api/v1/namespaces/{ns}/services/{name}`;
- `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` (and cluster-wide), `labelSelector=k=v`;
- `GET /api/v1/pods` and `/api/v1/namespaces/{ns}/pods`, `fieldSelector=spec.nodeName=X`;
- lists (`*List` kinds, `metadata.resourceVersion`, `limit`/`continue` paging; items without kind/apiVersion,
  as the real server sends them) and `?watch=true` streams: chunked newline-delimited events
  ADDED/MODIFIED/DELETED from the requested resourceVersion, BOOKMARK events when `allowWatchBookmarks`,
  a clean end after `timeoutSeconds`, and `410 Gone` as an ERROR event carrying a Status object when the
  requested resourceVersion is older than the compacted history;
- errors as `Status` objects (404 NotFound, 403 Forbidden worded like the real authorizer's).

In-cluster mode (`tls=True`): HTTPS with a throw-away CA (`tests.support.pki`); `write_service_account(DIR)`
writes the ServiceAccount's `token` and `ca.crt` there, and the exporter then finds the server through
KUBERNETES_SERVICE_HOST/PORT as in a pod. With `token` set, every request must carry
`Authorization: Bearer <token>` (401 Unauthorized otherwise), so token rotation can be tested.

Test controls: `put`/`delete` objects (one global resourceVersion counter, like etcd), `compact()`,
`send_gone()` (410 on the open watches), `drop_watches()` (cut streams mid-event), `stop()`/`start()` on the
same port (a restarting API server), `forbid(verb, resource)`, and `requests` (what the client asked, to
assert list + watch and no polling).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support import pki

Obj = dict[str, Any]

RESOURCE_OF_KIND = {"Service": "services", "EndpointSlice": "endpointslices", "Pod": "pods"}
API_VERSION = {"services": "v1", "endpointslices": "discovery.k8s.io/v1", "pods": "v1"}
KIND_OF = {v: k for k, v in RESOURCE_OF_KIND.items()}
GROUP = {"services": "", "endpointslices": "discovery.k8s.io", "pods": ""}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


# -- object builders (what `kubectl get -o json` shows on a 1.30 cluster, minus managedFields) -------------


def service(namespace: str, name: str, cluster_ip: str, *, port: int = 53, ip_family: str = "IPv4") -> Obj:
    return {
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true",
                                "kubernetes.io/name": "CoreDNS"},
                     "annotations": {"prometheus.io/port": "9153", "prometheus.io/scrape": "true"}},
        "spec": {"ports": [{"name": "dns", "protocol": "UDP", "port": port, "targetPort": 53},
                           {"name": "dns-tcp", "protocol": "TCP", "port": port, "targetPort": 53},
                           {"name": "metrics", "protocol": "TCP", "port": 9153, "targetPort": 9153}],
                 "selector": {"k8s-app": "kube-dns"}, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": [ip_family],
                 "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    }


@dataclass
class Endpoint:
    ip: str
    pod: str
    ready: bool = True
    node: str = "node-1"


def endpoint_slice(namespace: str, service_name: str, name: str, endpoints: list[Endpoint], *, port: int = 53,
                   owner_uid: str = "", address_type: str = "IPv4") -> Obj:
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "generateName": f"{service_name}-", "namespace": namespace, "generation": 1,
                     "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                "k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true",
                                "kubernetes.io/name": "CoreDNS", "kubernetes.io/service-name": service_name},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": _now()},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service_name,
                                          "uid": owner_uid, "controller": True, "blockOwnerDeletion": True}]},
        "addressType": address_type,
        "endpoints": [{"addresses": [e.ip],
                       "conditions": {"ready": e.ready, "serving": e.ready, "terminating": False},
                       "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod,
                                     "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, e.pod))},
                       "nodeName": e.node} for e in endpoints],
        "ports": [{"name": "dns-tcp", "protocol": "TCP", "port": port},
                  {"name": "dns", "protocol": "UDP", "port": port},
                  {"name": "metrics", "protocol": "TCP", "port": 9153}],
    }


def pod(namespace: str, name: str, node: str, ip: str, *, host_network: bool = False,
        phase: str = "Running") -> Obj:
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name.rsplit("-", 1)[0]}},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9",
                                 "resources": {}, "terminationMessagePath": "/dev/termination-log",
                                 "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
                 "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                 "serviceAccountName": "default", "nodeName": node, "hostNetwork": host_network,
                 "schedulerName": "default-scheduler", "enableServiceLinks": True, "preemptionPolicy":
                 "PreemptLowerPriority", "priority": 0},
        "status": {"phase": phase, "hostIP": "192.168.0.10", "hostIPs": [{"ip": "192.168.0.10"}],
                   "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort", "startTime": _now()},
    }


# -- the server ----------------------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    resource: str
    verb: str  # get, list, watch
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Event:
    rv: int
    type: str
    resource: str
    obj: Obj


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client gone mid-TLS-handshake or mid-stream (an exporter stopping) is not a test failure


class FakeAPI:
    def __init__(self, bookmark_interval: float = 1.0, host: str = "127.0.0.1", tls: bool = False) -> None:
        self.bookmark_interval = bookmark_interval
        self.tls = tls
        self.token: str | None = None  # the bearer token required (None: any)
        self._pki: Path | None = None
        self.host = host  # e.g. the lab's root-side link address, for an exporter in the lab's node namespace
        self.port = 0
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._rv = 1000
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._events: list[_Event] = []
        self._compacted = 0
        self._forbidden: set[tuple[str, str]] = set()
        self._generation = 0  # bumped by send_gone/drop_watches: open streams act on it
        self._action = ""
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # -- lifecycle --
    def start(self) -> FakeAPI:
        api = self

        class Handler(_Handler):
            fake = api

        server = _Server((self.host, self.port), Handler, bind_and_activate=False)
        server.allow_reuse_address = True
        server.daemon_threads = True
        server.server_bind()
        server.server_activate()
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self._certificate())
            # The handshake happens at the handler thread's first read, never in the accept loop.
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="fakeapi").start()
        return self

    def stop(self) -> None:
        """Go down like a crashed API server: stop listening and cut every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _certificate(self) -> tuple[Path, Path]:
        if self._pki is None:
            self._pki = Path(tempfile.mkdtemp(prefix="fakeapi-pki-"))
            ca = pki.make_ca(self._pki, "fakeapi-ca")
            pki.make_cert(self._pki, "apiserver", ca, san=f"IP:{self.host},DNS:kubernetes.default.svc")
        return self._pki / "apiserver.crt", self._pki / "apiserver.key"

    def write_service_account(self, directory: str, token: str = "test-token") -> str:
        """The pod's ServiceAccount files (`token`, `ca.crt`) in `directory`; requests then need that token.
        Set KUBERNETES_SERVICE_HOST=`host`, KUBERNETES_SERVICE_PORT=`port` for the client."""
        assert self.tls, "the in-cluster path is HTTPS: FakeAPI(tls=True)"
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._certificate()
        assert self._pki is not None
        (d / "ca.crt").write_bytes((self._pki / "fakeapi-ca.crt").read_bytes())
        self.rotate_token(directory, token)
        return directory

    def rotate_token(self, directory: str, token: str) -> None:
        """What the kubelet does to a projected token: a new file swapped in atomically, the old one refused."""
        tmp = Path(directory) / ".token.tmp"
        tmp.write_text(token)
        os.replace(tmp, Path(directory) / "token")
        self.token = token

    def in_cluster_env(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}

    def write_kubeconfig(self, path: str, token: str = "test-token") -> str:
        cluster: Obj = {"server": self.url}
        if self.tls:
            self._certificate()
            assert self._pki is not None
            cluster["certificate-authority"] = str(self._pki / "fakeapi-ca.crt")
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake", "preferences": {},
               "clusters": [{"name": "fake", "cluster": cluster}],
               "users": [{"name": "fake", "user": {"token": token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        return path

    # -- data --
    def put(self, obj: Obj) -> Obj:
        """Create or update an object (ADDED / MODIFIED); returns the stored copy with server-set fields."""
        obj = copy.deepcopy(obj)
        resource = RESOURCE_OF_KIND[obj["kind"]]
        m = obj["metadata"]
        key = (resource, m["namespace"], m["name"])
        with self._cond:
            old = self._objects.get(key)
            self._rv += 1
            if old is None:
                m.setdefault("uid", str(uuid.uuid4()))
                m["creationTimestamp"] = _now()
            else:
                m["uid"] = old["metadata"]["uid"]
                m["creationTimestamp"] = old["metadata"]["creationTimestamp"]
                if "generation" in m:
                    m["generation"] = old["metadata"].get("generation", 1) + 1
            m["resourceVersion"] = str(self._rv)
            self._objects[key] = obj
            self._events.append(_Event(self._rv, "MODIFIED" if old else "ADDED", resource, obj))
            self._cond.notify_all()
        return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        resource = RESOURCE_OF_KIND[kind]
        with self._cond:
            obj = self._objects.pop((resource, namespace, name))
            self._rv += 1
            gone = copy.deepcopy(obj)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            gone["metadata"]["deletionTimestamp"] = _now()
            self._events.append(_Event(self._rv, "DELETED", resource, gone))
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        with self._cond:
            return copy.deepcopy(self._objects[(RESOURCE_OF_KIND[kind], namespace, name)])

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def compact(self) -> None:
        """Forget the event history: a watch from an older resourceVersion gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def send_gone(self) -> None:
        """Send 410 Gone (an ERROR event) on every open watch, as a cacher does to a watcher that fell behind."""
        with self._cond:
            self.compact()
            self._generation += 1
            self._action = "gone"
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch in the middle of an event (half a chunk, then the TCP connection closes)."""
        with self._cond:
            self._generation += 1
            self._action = "drop"
            self._cond.notify_all()

    def forbid(self, verb: str, resource: str) -> None:
        self._forbidden.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        self._forbidden.discard((verb, resource))

    def calls(self, resource: str, verb: str) -> list[Request]:
        return [r for r in list(self.requests) if r.resource == resource and r.verb == verb]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeAPI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._conns_lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._conns_lock:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # -- plumbing --
    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, type_: str, obj: Obj) -> None:
        self._chunk(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def do_GET(self) -> None:
        token = self.fake.token
        if token is not None and self.headers.get("Authorization", "") != f"Bearer {token}":
            self._send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        route = self._route(parts)
        if route is None:
            self._send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
            return
        resource, ns, name = route
        watch = q.get("watch") in ("1", "true")
        verb = "get" if name else ("watch" if watch else "list")
        self.fake.requests.append(Request("GET", url.path, q, resource, verb))
        if (verb, resource) in self.fake._forbidden:
            self._forbidden(verb, resource, ns, name)
            return
        if name:
            self._get(resource, ns, name)
        elif watch:
            self._watch(resource, ns, q)
        else:
            self._list(resource, ns, q)

    @staticmethod
    def _route(parts: list[str]) -> tuple[str, str, str] | None:
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:3] == ["apis", "discovery.k8s.io", "v1"]:
            rest = parts[3:]
        else:
            return None
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in API_VERSION or len(rest) > 2:
            return None
        if API_VERSION[rest[0]] != ("v1" if parts[0] == "api" else "discovery.k8s.io/v1"):
            return None
        return rest[0], ns, rest[1] if len(rest) == 2 else ""

    def _forbidden(self, verb: str, resource: str, ns: str, name: str) -> None:
        group = GROUP[resource]
        what = f"{resource}.{group}" if group else resource
        named = f' "{name}"' if name else ""
        scope = f' in the namespace "{ns}"' if ns else " at the cluster scope"
        in_group = f' in API group "{group}"'
        msg = (f'{what}{named} is forbidden: User "system:serviceaccount:monitoring:conntrack-dns-exporter" '
               f'cannot {verb} resource "{resource}"{in_group}{scope}')
        details: Obj = {"group": group, "kind": resource}
        if name:
            details["name"] = name
        self._send_json(403, status(403, "Forbidden", msg, details))

    def _matches(self, resource: str, obj: Obj, ns: str, q: dict[str, str]) -> bool:
        m = obj["metadata"]
        if ns and m["namespace"] != ns:
            return False
        for sel in filter(None, q.get("labelSelector", "").split(",")):
            k, _, v = sel.partition("=")
            if (m.get("labels") or {}).get(k) != v.lstrip("="):
                return False
        for sel in filter(None, q.get("fieldSelector", "").split(",")):
            k, _, v = sel.partition("=")
            value = {"spec.nodeName": obj.get("spec", {}).get("nodeName"), "metadata.name": m["name"],
                     "metadata.namespace": m["namespace"]}.get(k)
            if value != v.lstrip("="):
                return False
        return True

    def _get(self, resource: str, ns: str, name: str) -> None:
        with self.fake._cond:
            obj = self.fake._objects.get((resource, ns, name))
            obj = copy.deepcopy(obj) if obj else None
        if obj is None:
            self._send_json(404, status(404, "NotFound", f'{resource} "{name}" not found',
                                        {"name": name, "kind": resource}))
            return
        self._send_json(200, obj)

    def _list(self, resource: str, ns: str, q: dict[str, str]) -> None:
        with self.fake._cond:
            rv = self.fake._rv
            items = [copy.deepcopy(o) for (r, _, _), o in sorted(self.fake._objects.items())
                     if r == resource and self._matches(resource, o, ns, q)]
        start = 0
        if q.get("continue"):
            token = json.loads(base64.b64decode(q["continue"]))
            start, rv = token["start"], token["rv"]
        limit = int(q.get("limit") or 0) or len(items) + 1
        page = items[start:start + limit]
        for o in page:  # items of a list carry no kind/apiVersion
            o.pop("kind", None)
            o.pop("apiVersion", None)
        meta: Obj = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = base64.b64encode(json.dumps({"start": start + limit, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        self._send_json(200, {"kind": KIND_OF[resource] + "List", "apiVersion": API_VERSION[resource],
                              "metadata": meta, "items": page})

    def _watch(self, resource: str, ns: str, q: dict[str, str]) -> None:
        fake = self.fake
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        requested = q.get("resourceVersion", "")
        with fake._cond:
            generation = fake._generation
            if requested in ("", "0"):
                # "Any" resourceVersion: synthetic ADDED for the current state, then changes.
                pos = fake._rv
                initial = [copy.deepcopy(o) for (r, _, _), o in sorted(fake._objects.items())
                           if r == resource and self._matches(resource, o, ns, q)]
            else:
                pos, initial = int(requested), []
                if pos < fake._compacted:
                    gone = status(410, "Expired", f"too old resource version: {pos} ({fake._compacted})")
                    pos = -1
        try:
            if pos < 0:
                self._event("ERROR", gone)
                self._chunk(b"")
                return
            for o in initial:
                self._event("ADDED", o)
            next_bookmark = time.monotonic() + fake.bookmark_interval
            while True:
                with fake._cond:
                    while True:
                        now = time.monotonic()
                        pending = [e for e in fake._events if e.rv > pos and e.resource == resource]
                        action = fake._action if fake._generation != generation else ""
                        if (pending or action or not fake.running or now >= deadline
                                or (bookmarks and now >= next_bookmark)):
                            break
                        fake._cond.wait(min(deadline, next_bookmark if bookmarks else deadline) - now)
                    current = fake._rv
                if not fake.running:
                    return  # stop() cuts the socket
                if action == "drop":
                    self.wfile.write(b"40\r\n{\"type\":\"MODIFIED\",\"object\":{\"kind\":")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if action == "gone":
                    self._event("ERROR", status(410, "Expired", f"too old resource version: {pos} ({current})"))
                    self._chunk(b"")
                    return
                for e in pending:
                    if self._matches(resource, e.obj, ns, q):
                        self._event(e.type, e.obj)
                    pos = e.rv
                if bookmarks and time.monotonic() >= next_bookmark:
                    pos = max(pos, current)
                    self._event("BOOKMARK", {"kind": KIND_OF[resource], "apiVersion": API_VERSION[resource],
                                             "metadata": {"resourceVersion": str(pos), "creationTimestamp": None}})
                    next_bookmark = time.monotonic() + fake.bookmark_interval
                if time.monotonic() >= deadline:
                    self._chunk(b"")  # the server's timeout: a clean end of the stream
                    return
        except OSError:
            self.close_connection = True
