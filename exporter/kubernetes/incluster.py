"""A small Kubernetes API client on the standard library, for the in-cluster ServiceAccount (issue 16).

Inside a pod the API server is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, verified with
the ServiceAccount's `ca.crt`, authenticated with its `token` (a projected token the kubelet rotates:
re-read every minute, when the file changes, and right after a 401). That is all the exporter needs for
its three requests (GET a Service; LIST with `limit`/`continue` paging and WATCH with chunked streams and
bookmarks, for EndpointSlices and pods), so in a pod it does not import the `kubernetes` package (about
23 MB of RSS for the generated client); that package is still used when a kubeconfig is given (exec
plugins, OIDC, client certificates ...).

`CoreV1` and `DiscoveryV1` take the same arguments as the generated client's methods the informer loop
(`exporter.kubernetes.client`) calls with `_preload_content=False`, and return a response with the same
few members (`data`, `read1`, `close`, `shutdown`, `status`); errors carry `status` and `reason` as
`kubernetes.client.ApiException` does, so one loop serves both clients.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import quote, urlencode

from exporter import __version__

SERVER_NAME = "kubernetes.default.svc"  # in every API server certificate: the name checked for a given address
API_SOURCE_PORTS = range(19154, 19170)  # local ports of the API connections when --web.notrack exempts them
TOKEN_REFRESH = 60.0  # seconds; client-go re-reads the projected token every minute as well
USER_AGENT = f"conntrack-dns-exporter/{__version__}"


class ApiError(Exception):
    """An HTTP error answer of the API server (`status`, `reason`, the Status body)."""

    def __init__(self, status: int, reason: str, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.body = status, reason, body


class ConnectFailed(OSError):
    """The TCP connection to the API server could not be made (refused, timed out, unreachable)."""


class InClusterConfig:
    """Host, CA and (rotating) token of the pod's ServiceAccount. `load` raises ValueError with one line.

    `server_name`: the name the certificate is checked for (the host itself unless an address was given);
    `source_ports`: local ports to connect from (the flows `--web.notrack` exempts), None: any.
    """

    def __init__(self, host: str, port: int, token_file: str, ca_file: str, server_name: str | None = None) -> None:
        self.api_host, self.api_port = host, port
        self.server_name = server_name or host
        self.source_ports: range | None = None
        self.token_file, self.ca_file = token_file, ca_file
        self._lock = threading.Lock()
        self._token = ""
        self._token_read = -1e9
        self._token_stat: tuple[float, int, int] | None = None
        self._ctx: ssl.SSLContext | None = None
        self._ca_stat: tuple[float, int, int] | None = None

    @property
    def host(self) -> str:
        h = f"[{self.api_host}]" if ":" in self.api_host else self.api_host
        return f"https://{h}:{self.api_port}"

    @classmethod
    def load(cls, sa_dir: str, address: tuple[str, int] | None = None) -> InClusterConfig:
        """From KUBERNETES_SERVICE_HOST/PORT, or `address` (the API server's own, instead of its Service
        IP; the certificate is then checked for `kubernetes.default.svc`)."""
        if address is not None:
            cfg = cls(address[0], address[1], os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt"),
                      server_name=SERVER_NAME)
            cfg.token(force=True)
            cfg.ssl_context()
            return cfg
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "").strip()
        port_text = os.environ.get("KUBERNETES_SERVICE_PORT", "").strip()
        if not host or not port_text:
            raise ValueError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set")
        try:
            port = int(port_text)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(f"KUBERNETES_SERVICE_PORT is not a port: {port_text!r}") from None
        cfg = cls(host, port, os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt"))
        cfg.token(force=True)
        cfg.ssl_context()
        return cfg

    @staticmethod
    def _stat(path: str) -> tuple[float, int, int]:
        st = os.stat(path)
        return st.st_mtime, st.st_ino, st.st_size

    def token(self, force: bool = False) -> str:
        """The bearer token, re-read when a minute has passed, the file changed, or `force`."""
        with self._lock:
            now = time.monotonic()
            try:
                stat = self._stat(self.token_file)
            except OSError as e:
                if not self._token:
                    raise ValueError(f"cannot read the service account token {self.token_file}: "
                                     f"{e.strerror or e}") from None
                return self._token  # keep the last good token while the kubelet swaps the file
            if force or stat != self._token_stat or now - self._token_read >= TOKEN_REFRESH:
                try:
                    with open(self.token_file, "rb") as f:
                        text = f.read(1 << 16).decode("ascii").strip()
                except (OSError, UnicodeDecodeError) as e:
                    if not self._token:
                        raise ValueError(f"cannot read the service account token {self.token_file}: {e}") from None
                    return self._token
                if not text:
                    if not self._token:
                        raise ValueError(f"the service account token {self.token_file} is empty")
                    return self._token
                self._token, self._token_stat, self._token_read = text, stat, now
            return self._token

    def token_rejected(self) -> None:
        """A 401: read the token again before the next request (it may just have rotated)."""
        with self._lock:
            self._token_stat = None

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying TLS context for the CA bundle, rebuilt when the file changes (CA rotation)."""
        with self._lock:
            try:
                stat = self._stat(self.ca_file)
            except OSError as e:
                if self._ctx is not None:
                    return self._ctx
                raise ValueError(f"cannot read the service account CA {self.ca_file}: {e.strerror or e}") from None
            if self._ctx is None or stat != self._ca_stat:
                try:
                    ctx = ssl.create_default_context(cafile=self.ca_file)
                except (OSError, ssl.SSLError, ValueError) as e:
                    if self._ctx is not None:
                        return self._ctx
                    msg = " ".join(str(e).split())
                    raise ValueError(f"cannot load the service account CA {self.ca_file}: {msg}") from None
                self._ctx, self._ca_stat = ctx, stat
            return self._ctx


class Response:
    """One answered request on its own connection (closed with the response)."""

    chunked = False  # `exporter.kubernetes.client.iter_lines` reads with read1(): http.client de-chunks

    def __init__(self, conn: http.client.HTTPSConnection, resp: http.client.HTTPResponse) -> None:
        self._conn, self._resp = conn, resp
        self.status = resp.status
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._resp.read()
        return self._data

    def read1(self, n: int = 65536) -> bytes:
        return self._resp.read1(n)

    def shutdown(self) -> None:
        """Wake a thread blocked reading this response."""
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


_QUERY = {"limit": "limit", "_continue": "continue", "watch": "watch", "resource_version": "resourceVersion",
          "allow_watch_bookmarks": "allowWatchBookmarks", "timeout_seconds": "timeoutSeconds",
          "label_selector": "labelSelector", "field_selector": "fieldSelector"}


class RestClient:
    def __init__(self, cfg: InClusterConfig) -> None:
        self.cfg = cfg

    def get(self, path: str, timeout: tuple[float, float] | float | None = None, **params: Any) -> Response:
        query = {}
        for k, v in params.items():
            if v is None or k == "_preload_content":
                continue
            if k not in _QUERY:
                raise TypeError(f"unexpected argument {k}")
            query[_QUERY[k]] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        cfg = self.cfg
        conn = _Connection(cfg, connect)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(read)
            _keepalive(conn.sock)
            url = path + ("?" + urlencode(query) if query else "")
            conn.request("GET", url, headers={"Authorization": f"Bearer {cfg.token()}",
                                              "Accept": "application/json", "User-Agent": USER_AGENT})
            resp = conn.getresponse()
            if resp.status >= 400:
                body = resp.read(1 << 16)
                if resp.status == 401:
                    cfg.token_rejected()
                raise ApiError(resp.status, resp.reason, body)
        except BaseException:
            conn.close()
            raise
        return Response(conn, resp)


class _Connection(http.client.HTTPSConnection):
    """HTTPS to the API server: the certificate checked for `server_name`, from `source_ports` if set."""

    def __init__(self, cfg: InClusterConfig, timeout: float | None) -> None:
        super().__init__(cfg.api_host, cfg.api_port, timeout=timeout, context=cfg.ssl_context())
        self._cfg = cfg
        self._ctx = cfg.ssl_context()

    def connect(self) -> None:
        cfg = self._cfg
        try:
            sock = _open(cfg.api_host, cfg.api_port, self.timeout, cfg.source_ports)
        except OSError as e:
            raise ConnectFailed(e.errno or 0, f"connect to {cfg.api_host}:{cfg.api_port}: {e.strerror or e}") \
                from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self._ctx.wrap_socket(sock, server_hostname=cfg.server_name)
        except BaseException:
            sock.close()
            raise


def _open(host: str, port: int, timeout: float | None, source_ports: range | None) -> socket.socket:
    if source_ports is None:
        return socket.create_connection((host, port), timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError = OSError(errno.EADDRINUSE, "every exempt local port is busy")
    for local in source_ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", local))
            sock.connect((host, port))
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            last = e
    raise last


def _keepalive(sock: socket.socket) -> None:
    """A long idle watch behind NAT or a load balancer: probe the peer, fail within about 2 minutes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    except (OSError, AttributeError):
        pass


def _timeout(kw: dict[str, Any]) -> Any:
    return kw.pop("_request_timeout", None)


class CoreV1:
    def __init__(self, rest: RestClient) -> None:
        self._rest = rest

    def read_namespaced_service(self, name: str, namespace: str, **kw: Any) -> Response:
        t = _timeout(kw)
        return self._rest.get(f"/api/v1/namespaces/{quote(namespace)}/services/{quote(name)}", t, **kw)

    def list_pod_for_all_namespaces(self, **kw: Any) -> Response:
        return self._rest.get("/api/v1/pods", _timeout(kw), **kw)


class DiscoveryV1:
    def __init__(self, rest: RestClient) -> None:
        self._rest = rest

    def list_namespaced_endpoint_slice(self, namespace: str, **kw: Any) -> Response:
        t = _timeout(kw)
        return self._rest.get(f"/apis/discovery.k8s.io/v1/namespaces/{quote(namespace)}/endpointslices", t, **kw)
