"""One HTTP connection of the web server: read requests, route them, write responses (issue 16).

The standard library's BaseHTTPRequestHandler parses every request's headers with the `email` package,
sends a response's headers and its body in two writes and formats an access-log line per request: about
0.1 ms a request, a third of what a `/metrics` scrape at the defaults costs the exporter. This module
does the same work directly, with the same limits for hostile clients:

- a request line or header line of at most 64 KiB (414 / 431), at most 100 headers (431);
- the request line and headers complete within `--web.read-timeout` (slots.DeadlineReader), idle
  keep-alive connections closed after `--web.idle-timeout`;
- HTTP/1.1 keeps the connection open unless the client says `Connection: close`; HTTP/1.0 closes it
  unless the client says `Connection: keep-alive`; `--web.keepalive=false` answers in HTTP/1.0 and closes;
- a malformed request gets one 4xx/5xx response and the connection is closed; so does a request with a
  body (GET and HEAD have none; the body is never read, so nothing of it can be taken for a request);
- only GET and HEAD (501 otherwise); HTTP/2 and later get 505, HTTP/0.9 400.

Each response (status line, headers, body) is one `sendall`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import gzip
import html
import io
import time
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.core import logs
from exporter.web import slots
from exporter.web.slots import Conn

if TYPE_CHECKING:
    from exporter.web.server import ExporterHTTPServer

log = logs.get("web")

MAX_LINE = 65536   # request line and each header line, as http.server
MAX_HEADERS = 100  # as http.client
PUBLIC_PATHS = frozenset({"/-/healthy", "/-/ready"})  # kubelet probes; "/" only with landing_public
SERVER = f"conntrack-dns-exporter/{__version__}"
TEXT = "text/plain; charset=utf-8"
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class BadRequest(Exception):
    """The request cannot be served: answer `code` and close the connection."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Request:
    __slots__ = ("headers", "keep_alive", "method", "target", "version")

    def __init__(self, method: str, target: str, version: tuple[int, int], headers: dict[str, str],
                 keep_alive: bool) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.keep_alive = keep_alive


def _version(word: str) -> tuple[int, int]:
    if not word.startswith("HTTP/"):
        raise BadRequest(400, f"bad request version {word[:40]!r}")
    major, dot, minor = word[5:].partition(".")
    if not dot or not (major.isdigit() and minor.isdigit()) or len(major) > 10 or len(minor) > 10:
        raise BadRequest(400, f"bad request version {word[:40]!r}")
    version = int(major), int(minor)
    if version >= (2, 0):
        raise BadRequest(505, f"HTTP version {word[5:20]} not supported")
    return version


class _Lines(Protocol):
    def readline(self, size: int = ..., /) -> bytes: ...


def read_request(rfile: _Lines) -> Request | None:
    """The next request on the connection, None when the client closed it (or stopped mid-request).

    Raises BadRequest for a request that must be refused, slots.RequestTimeout (from the reader) when
    it is not complete in time."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise BadRequest(414, "request line too long")
    words = line.decode("latin-1").split()
    if len(words) != 3:
        raise BadRequest(400, "bad request line (HTTP/0.9 is not supported)" if len(words) == 2
                         else "bad request line")
    method, target, version_word = words
    version = _version(version_word)
    headers: dict[str, str] = {}
    count = 0
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise BadRequest(431, "header line too long")
        if line in (b"\r\n", b"\n"):
            break
        count += 1
        if count > MAX_HEADERS:
            raise BadRequest(431, f"more than {MAX_HEADERS} headers")
        text = line.decode("latin-1")
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip() or text[0] in " \t":
            raise BadRequest(400, "malformed header line")  # also obsolete line folding
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers:
        raise BadRequest(400, "a request with a body")
    tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
    keep = "close" not in tokens and (version >= (1, 1) or "keep-alive" in tokens)
    return Request(method, target, version, headers, keep)


class _Date:
    """The Date header, formatted once per second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def now(self) -> str:
        t = int(time.time())
        if t != self.second:
            self.second, self.text = t, email.utils.formatdate(t, usegmt=True)
        return self.text


_date = _Date()


class Connection:
    """Serves one accepted connection until it closes, times out or the server shuts it down."""

    def __init__(self, server: ExporterHTTPServer, conn: Conn) -> None:
        self.server = server
        self.conn = conn
        self.rfile = io.BufferedReader(slots.DeadlineReader(conn, server.read_timeout, server.idle_timeout))
        self.status_line = "HTTP/1.1" if server.keepalive else "HTTP/1.0"

    def serve(self) -> None:
        server, conn = self.server, self.conn
        while True:
            try:
                req = read_request(self.rfile)
            except slots.RequestTimeout:
                server.evictions.count_timeout()
                return
            except BadRequest as e:
                conn.request_parsed()
                log.debug("bad request: %s", e)
                self._send(e.code, f"{REASONS.get(e.code, 'Error')}: {e}\n".encode(), TEXT, keep=False)
                return
            if req is None:
                return
            conn.request_parsed()
            with contextlib.suppress(OSError):  # writing the response: each send may wait this long
                conn.sock.settimeout(server.read_timeout)
            keep = req.keep_alive and server.keepalive
            if req.method in ("GET", "HEAD"):
                keep = self._route(req, keep)
            else:
                self._send(501, f"Not Implemented: method {req.method[:20]!r}\n".encode(), TEXT, keep=False,
                           extra={"Allow": "GET, HEAD"})
                keep = False
            log.debug("%s %s", req.method, req.target[:200])
            conn.response_sent()
            if not keep:
                return

    # --- routes -----------------------------------------------------------------------------------------
    def _route(self, req: Request, keep: bool) -> bool:
        server = self.server
        url = urlsplit(req.target)
        path = url.path
        public = path in PUBLIC_PATHS or (path == "/" and server.landing_public)
        head = req.method == "HEAD"
        if not public and not self._authorized(req, keep, head):
            return keep
        if path == server.telemetry_path:
            self._metrics(req, parse_qs(url.query).get("name[]", []), keep, head)
        elif path == "/-/healthy":
            self._send(200, b"Healthy\n", TEXT, keep, head=head)
        elif path == "/-/ready":
            if server.ready.is_set():
                self._send(200, b"Ready\n", TEXT, keep, head=head)
            else:
                self._send(503, b"Not ready\n", TEXT, keep, head=head)
        elif path == "/":
            self._send(200, self._landing(), "text/html; charset=utf-8", keep, {"Cache-Control": "no-store"},
                       head=head)
        else:
            self._send(404, b"Not found\n", TEXT, keep, head=head)
        return keep

    def _authorized(self, req: Request, keep: bool, head: bool) -> bool:
        cfg = self.server.web_config
        if cfg is None or not cfg.auth_required:
            return True
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, sep, password = "", "", ""
            if sep and cfg.check_password(user, password):
                return True
        self.server.count_auth_failure()
        self._send(401, b"Unauthorized\n", TEXT, keep,
                   {"WWW-Authenticate": 'Basic realm="conntrack-dns-exporter", charset="UTF-8"'}, head=head)
        return False

    def _metrics(self, req: Request, names: list[str], keep: bool, head: bool) -> None:
        server = self.server
        try:
            encoder, content_type = choose_encoder(req.headers.get("accept", ""))
            # name[] is rare (ad-hoc debugging): rendered on its own, not shared with full scrapes
            body = (encoder(server.only(frozenset(names))) if names
                    else server.exposition.render(content_type, encoder))
        except Exception as e:  # never a traceback in a response (collectors are wrapped; this is a last resort)
            log.error("exposition failed: %s: %s", type(e).__name__, e)
            self._send(500, b"internal error while collecting metrics; see the exporter's log\n", TEXT, keep,
                       head=head)
            return
        extra = None
        if "gzip" in req.headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            extra = {"Content-Encoding": "gzip"}
        self._send(200, body, content_type, keep, extra, head=head)

    def _landing(self) -> bytes:
        server = self.server
        if server.landing is not None:
            try:
                return server.landing()
            except Exception as e:  # the page is best effort; the links below always work
                log.error("status page failed: %s: %s", type(e).__name__, e)
        return (
            "<!DOCTYPE html><html><head><title>conntrack-dns-exporter</title></head><body>"
            f"<h1>conntrack-dns-exporter</h1><p>Version {html.escape(__version__)}</p>"
            "<p>Conntrack table statistics and synthetic DNS probes of the node's DNS path.</p>"
            f'<ul><li><a href="{html.escape(server.telemetry_path.lstrip("/"))}">Metrics</a></li>'
            '<li><a href="-/healthy">Health</a></li>'
            '<li><a href="-/ready">Readiness</a></li></ul>'
            "</body></html>\n"
        ).encode()

    # --- responses --------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, content_type: str, keep: bool, extra: dict[str, str] | None = None,
              *, head: bool = False) -> None:
        lines = [f"{self.status_line} {code} {REASONS.get(code, 'Error')}", f"Server: {SERVER}",
                 f"Date: {_date.now()}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        cfg = self.server.web_config
        headers = {**cfg.headers, **(extra or {})} if cfg is not None and cfg.headers else extra
        if headers:
            lines += [f"{k}: {v}" for k, v in headers.items()]
        if not keep:
            lines.append("Connection: close")
        lines.append("\r\n")
        data = "\r\n".join(lines).encode("latin-1")
        self.conn.sock.sendall(data if head else data + body)

