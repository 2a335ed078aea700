"""The HTTP side: `/metrics`, `/-/healthy`, `/-/ready` and a landing page at `/`.

prometheus_client's own server speaks HTTP/1.0 and closes the connection after every scrape. When the
node's conntrack table is full, a new TCP connection to the exporter cannot be tracked and the scrape
fails exactly when it matters. So this server speaks HTTP/1.1 with keep-alive: Prometheus reuses its
connection, whose conntrack entry already exists. Every connection is served on its own thread, so a
slow or silent client never delays other scrapes, and collection never waits for a probe (probes run in
the background and only publish results).
"""

from __future__ import annotations

import gzip
import html
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter import __version__, logs

log = logs.get("web")


class ExporterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *, keepalive: bool = True,
                 idle_timeout: float = 300.0, landing_extra: str = "") -> None:
        self.registry = registry
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.landing_extra = landing_extra
        self.ready = threading.Event()
        self.address_family = socket.AF_INET6 if (":" in host or host == "") and socket.has_ipv6 else socket.AF_INET
        bind_host = host or ("::" if self.address_family == socket.AF_INET6 else "0.0.0.0")
        try:
            super().__init__((bind_host, port), _Handler)
        except OSError:
            if host != "" or self.address_family != socket.AF_INET6:
                raise
            self.address_family = socket.AF_INET  # no IPv6 in this namespace: listen on IPv4 only
            super().__init__(("0.0.0.0", port), _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"conntrack-dns-exporter/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        # The socket timeout bounds how long an idle keep-alive connection (or a client that never sends
        # a request) holds its thread.
        self.request.settimeout(self.server.idle_timeout)
        super().setup()
        if not self.server.keepalive:
            self.protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._metrics()
        elif path == "/-/healthy":
            self._send(200, b"Healthy\n", "text/plain; charset=utf-8")
        elif path == "/-/ready":
            if self.server.ready.is_set():
                self._send(200, b"Ready\n", "text/plain; charset=utf-8")
            else:
                self._send(503, b"Not ready\n", "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, self._landing(), "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _metrics(self) -> None:
        accept = self.headers.get("Accept", "")
        try:
            encoder, content_type = choose_encoder(accept)
            body = encoder(self.server.registry)
        except Exception:  # never a traceback in a response
            log.exception("exposition failed")
            self._send(500, b"internal error while collecting metrics; see the exporter's log\n",
                       "text/plain; charset=utf-8")
            return
        headers = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, headers)

    def _landing(self) -> bytes:
        extra = self.server.landing_extra
        return (
            "<!DOCTYPE html><html><head><title>conntrack-dns-exporter</title></head><body>"
            f"<h1>conntrack-dns-exporter</h1><p>Version {html.escape(__version__)}</p>"
            "<p>Conntrack table statistics and synthetic DNS probes of the node's DNS path.</p>"
            '<ul><li><a href="metrics">Metrics</a></li><li><a href="-/healthy">Health</a></li>'
            '<li><a href="-/ready">Readiness</a></li></ul>'
            f"{extra}</body></html>\n"
        ).encode()

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not self.server.keepalive:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug(format % args)
