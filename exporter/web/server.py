"""The HTTP side: `/metrics` (`--web.telemetry-path`), `/-/healthy`, `/-/ready` and a landing page at `/`.

`/metrics?name[]=a&name[]=b` returns only the samples named (or of the families named), as
prometheus_client's own handler does; everything is still collected, only the output is filtered.

prometheus_client's own server speaks HTTP/1.0 and closes the connection after every scrape. When the
node's conntrack table is full, a new TCP connection to the exporter cannot be tracked and the scrape
fails exactly when it matters. So this server speaks HTTP/1.1 with keep-alive: Prometheus reuses its
connection, whose conntrack entry already exists (`--web.notrack` covers new connections too).

Every connection is served on its own thread, so a slow or silent client never delays other scrapes, and
collection never waits for a probe (probes run in the background and only publish results). Threads are
bounded by `--web.max-connections`; requests must be complete within `--web.read-timeout`, idle keep-alive
connections last `--web.idle-timeout`, and at the limit a new connection takes the slot of the slowest or
longest-idle one, so kubelet's probes and Prometheus are served during a slowloris attack (slots.py).
TLS handshakes happen on the connection's thread, never in the accept loop; requests are read and
answered by handler.py. With `--web.config.file`
(TLS, basic auth; see exporter/webconfig.py) every path needs credentials except `/`, `/-/healthy` and
`/-/ready`, which kubelet probes must reach without them.

Metrics: `conntrack_dns_exporter_web_connections` (gauge, open connections),
`conntrack_dns_exporter_web_connections_rejected_total` (over the limit), `..._evicted_total{state}`,
`conntrack_dns_exporter_web_request_timeouts_total`,
`conntrack_dns_exporter_web_tls_handshake_errors_total`, `conntrack_dns_exporter_web_auth_failures_total`,
`conntrack_dns_exporter_web_scrapes_total`, `conntrack_dns_exporter_web_scrapes_shared_total` (scrapes that
arrived while another rendered the registry and shared its result), with TLS the certificate's dates
(certinfo.py).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from exporter.core import logs
from exporter.web import certinfo, handler, slots
from exporter.web.render import OPENMETRICS, FamilyTemplates, render_registry
from exporter.web.slots import Conn
from exporter.web.webconfig import WebConfig, WebConfigError

log = logs.get("web")

REJECT_LOG_INTERVAL = 10.0


class _Flight:
    __slots__ = ("body", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.body = b""
        self.error: BaseException | None = None


class Exposition:
    """Renders the registry; scrapes that arrive while a rendering of the same format is running share it.

    Rendering is CPU work under the GIL, so N simultaneous scrapes rendering N times would each take N
    times longer; sharing keeps a scrape's latency near one rendering however many scrapers there are.
    A shared result is at most one rendering old, which Prometheus cannot tell from network delay.

    A rendering walks the registry's collectors in registration order, as `registry.collect()` does, and
    formats each one's families with the chosen encoder; a collector with `render_parts` (the scrape
    wrapper) returns ready bytes, reusing what did not change since the last scrape. The result is
    byte for byte what the encoder gives for the whole registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._inflight: dict[str, _Flight] = {}
        self._templates: dict[str, FamilyTemplates] = {}
        self.renders = 0
        self.shared = 0

    def counts(self) -> tuple[int, int]:
        """(renderings done, requests answered with another's rendering)."""
        with self._lock:
            return self.renders, self.shared

    def render(self, key: str, encoder: Callable[[CollectorRegistry], bytes]) -> bytes:
        with self._lock:
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = _Flight()
                self.renders += 1
            else:
                self.shared += 1
        if leader:
            try:
                flight.body = self._render(key, encoder)
            except BaseException as e:
                flight.error = e
            finally:
                with self._lock:
                    del self._inflight[key]
                flight.done.set()
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.body

    def _render(self, key: str, encoder: Callable[[Any], bytes]) -> bytes:
        with self._lock:
            templates = self._templates.get(key)
            if templates is None or templates.encoder is not encoder:
                templates = self._templates[key] = FamilyTemplates(encoder, key.startswith(OPENMETRICS))
        return render_registry(self.registry, key, templates)


class _Only:
    """A registry view with only the samples named in `name[]` (a family's name selects all its samples)."""

    def __init__(self, registry: CollectorRegistry, names: frozenset[str]) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> Iterable[Metric]:
        for fam in self.registry.collect():
            samples = fam.samples if fam.name in self.names else [s for s in fam.samples if s.name in self.names]
            if samples:
                out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                out.samples = list(samples)
                yield out


class ExporterHTTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *, keepalive: bool = True,
                 idle_timeout: float = 300.0, read_timeout: float = 10.0, max_connections: int = 64,
                 web_config: WebConfig | None = None, telemetry_path: str = "/metrics",
                 landing: Callable[[], bytes] | None = None, landing_public: bool = False) -> None:
        self.registry = registry
        self.telemetry_path = telemetry_path
        self.landing = landing  # the status page's renderer (HTML bytes); None: a plain page of links
        self.landing_public = landing_public
        self.exposition = Exposition(registry)
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._web_config = web_config
        self.ready = threading.Event()
        self._conns: set[Conn] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.rejected = 0
        self.evictions = slots.Evictions(max_connections)
        self.tls_errors = 0
        self.auth_failures = 0
        self._rejected_logged = 0
        self._last_reject_log = 0.0
        self.address_family = socket.AF_INET6 if (":" in host or host == "") and socket.has_ipv6 else socket.AF_INET
        bind_host = host or ("::" if self.address_family == socket.AF_INET6 else "0.0.0.0")
        try:
            super().__init__((bind_host, port), socketserver.BaseRequestHandler)
        except OSError:
            if host != "" or self.address_family != socket.AF_INET6:
                raise
            self.address_family = socket.AF_INET  # no IPv6 in this namespace: listen on IPv4 only
            super().__init__(("0.0.0.0", port), socketserver.BaseRequestHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def web_config(self) -> WebConfig | None:
        """The web config now: re-read when its file changed (webconfig.WebConfig.reloaded)."""
        cfg = self._web_config
        if cfg is None:
            return None
        new = cfg.reloaded()
        if new is not cfg:
            self._web_config = new
        return new

    def reload_web_config(self) -> None:
        """SIGHUP: re-read --web.config.file now, even if it looks unchanged (a broken one is kept out)."""
        cfg = self._web_config
        if cfg is not None:
            self._web_config = cfg.reloaded(force=True)

    def only(self, names: frozenset[str]) -> _Only:
        """The registry with only the samples (or families) named: `/metrics?name[]=...`."""
        return _Only(self.registry, names)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # --- connection lifecycle ----------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        # Headers and body are two writes; without TCP_NODELAY, Nagle plus the client's delayed ACK can add
        # 40 ms to a scrape.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(request, self.read_timeout)
        evict: Conn | None = None
        with self._lock:
            full = self._closing or len(self._conns) >= self.max_connections
            if full and not self._closing:
                evict = slots.victim(self._conns)
                if evict is not None:
                    evict.evicted = True
                    self._conns.discard(evict)
                    full = False
            if not full:
                self._conns.add(conn)
        if evict is not None:
            self.evictions.close(evict)
        if full:
            self._reject(request)
            return
        t = threading.Thread(target=self._serve_conn, args=(conn, client_address), name="web-conn", daemon=True)
        try:
            t.start()
        except RuntimeError:  # cannot start a thread (resource limit): drop this connection, keep serving
            with self._lock:
                self._conns.discard(conn)
            self._reject(request)

    def _reject(self, request: socket.socket) -> None:
        now = time.monotonic()
        with self._lock:
            self.rejected += 1
            closing = self._closing
            should_log = now - self._last_reject_log >= REJECT_LOG_INTERVAL
            if should_log:
                self._last_reject_log = now
                n, self._rejected_logged = self.rejected - self._rejected_logged, self.rejected
        if should_log and not closing:
            log.warning("connection limit reached (%d open, --web.max-connections); closed %d new connection(s)",
                        self.max_connections, n)
        self.shutdown_request(request)

    def _serve_conn(self, conn: Conn, client_address: Any) -> None:
        try:
            tls = self.web_config is not None and self.web_config.tls is not None
            if tls and not self._handshake(conn):
                return
            handler.Connection(self, conn).serve()
        except Exception as e:  # one line, never a traceback on stderr or in a response
            log.debug("connection from %s failed: %s: %s", client_address, type(e).__name__, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            self.shutdown_request(conn.sock)

    def _handshake(self, conn: Conn) -> bool:
        assert self.web_config is not None
        try:
            ctx = self.web_config.ssl_context()
        except WebConfigError as e:
            log.error("%s", e)
            return False
        assert ctx is not None
        try:
            slots.handshake(conn, ctx)
        except (OSError, ssl.SSLError, ValueError) as e:
            with self._lock:
                self.tls_errors += 1
            log.debug("TLS handshake failed: %s", e)
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error serving %s", client_address)

    def shutdown(self) -> None:
        """Stop accepting, then close every open connection so their threads end now."""
        with self._lock:
            self._closing = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):  # wakes serve_forever's wait at once (it may poll without a timeout)
            self.socket.shutdown(socket.SHUT_RDWR)
        super().shutdown()
        for c in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(c.sock, socket.SHUT_RDWR)

    # --- metrics about the web server itself -------------------------------------------------------------
    def count_auth_failure(self) -> None:
        with self._lock:
            self.auth_failures += 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            open_, rejected, tls_errors, auth = len(self._conns), self.rejected, self.tls_errors, self.auth_failures
        g = GaugeMetricFamily("conntrack_dns_exporter_web_connections", "Open HTTP connections to the exporter.")
        g.add_metric([], open_)
        lim = GaugeMetricFamily("conntrack_dns_exporter_web_connections_limit",
                                "Open connections above which new ones are closed (--web.max-connections).")
        lim.add_metric([], self.max_connections)
        r = CounterMetricFamily("conntrack_dns_exporter_web_connections_rejected",
                                "New connections closed because --web.max-connections were open.")
        r.add_metric([], rejected)
        t = CounterMetricFamily("conntrack_dns_exporter_web_tls_handshake_errors",
                                "TLS handshakes that failed (no or bad client certificate, plain HTTP, timeout).")
        t.add_metric([], tls_errors)
        a = CounterMetricFamily("conntrack_dns_exporter_web_auth_failures",
                                "Requests refused with 401: missing or wrong basic-auth credentials.")
        a.add_metric([], auth)
        evicted, timeouts = self.evictions.counts()
        ev = CounterMetricFamily("conntrack_dns_exporter_web_connections_evicted",
                                 "Connections closed to give their slot to a new one while --web.max-connections "
                                 "were open, by the state they were in (reading a request, idle keep-alive).",
                                 labels=["state"])
        for state in (slots.READING, slots.IDLE):
            ev.add_metric([state], evicted.get(state, 0))
        rt = CounterMetricFamily("conntrack_dns_exporter_web_request_timeouts",
                                 "Requests closed because their line and headers were not complete within "
                                 "--web.read-timeout (slow or silent clients).")
        rt.add_metric([], timeouts)
        renders, shared = self.exposition.counts()
        sc = CounterMetricFamily("conntrack_dns_exporter_web_scrapes",
                                 "Metrics requests answered (with status 200 or 500).")
        sc.add_metric([], renders + shared)
        sh = CounterMetricFamily("conntrack_dns_exporter_web_scrapes_shared",
                                 "Metrics requests answered with a rendering another simultaneous request started.")
        sh.add_metric([], shared)
        out: list[Metric] = [g, lim, r, t, a, sc, sh, ev, rt]
        cfg = self.web_config
        if cfg is not None:
            ok = GaugeMetricFamily("conntrack_dns_exporter_web_config_last_reload_successful",
                                   "1 if the last change of --web.config.file loaded (or it never changed), 0 if "
                                   "it did not and the previous configuration is still in use.")
            ok.add_metric([], 1.0 if cfg.reload_ok else 0.0)
            out.append(ok)
            out += certinfo.families(cfg.cert_period)
        return out

    def describe(self) -> list[Metric]:
        return []
