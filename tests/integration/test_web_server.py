"""Issue 8: the HTTP server's behaviour under bad clients, on loopback, with the real ExporterHTTPServer
(in-process so timeouts and limits can be made small) and real TCP connections.

A user would notice: a scrape that waits behind a client that connected and sent nothing or trickles its
request, an exporter that spawns unbounded threads (or silently refuses scrapes) under a connection flood,
a keep-alive connection that is not reused, or a traceback in a response.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from exporter.web.server import ExporterHTTPServer
from tests.support.sockets import closed_within


class _Boom:
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("secret internal detail")


class _Gauge:
    def collect(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("test_value", "A value.", value=1)]


def _serve(**kw: object) -> ExporterHTTPServer:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Gauge())
    srv = ExporterHTTPServer("127.0.0.1", 0, reg, **kw)  # type: ignore[arg-type]
    reg.register(srv)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.ready.set()
    return srv


@pytest.fixture
def server() -> Iterator[ExporterHTTPServer]:
    srv = _serve(read_timeout=0.5, idle_timeout=5.0, max_connections=8)
    yield srv
    srv.shutdown()
    srv.server_close()


def _scrape(port: int, timeout: float = 5.0) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        return r.status, r.read(), time.monotonic() - t0
    finally:
        conn.close()


def test_keepalive_reuses_one_connection(server: ExporterHTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        r.read()
        assert r.version == 11 and r.getheader("Connection") != "close"
        local = conn.sock.getsockname()
        for _ in range(3):
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            assert r.status == 200 and b"test_value 1.0" in r.read()
        assert conn.sock.getsockname() == local, "client had to reconnect"
        assert server.open_connections == 1
    finally:
        conn.close()


def test_keepalive_off_closes_after_each_response() -> None:
    srv = _serve(keepalive=False)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert b"Connection: close" in data and b"test_value 1.0" in data
        s.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_silent_and_trickling_clients_do_not_delay_scrapes(server: ExporterHTTPServer) -> None:
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"GET /metr")  # a request that never completes
    try:
        for _ in range(5):
            status, body, took = _scrape(server.port)
            assert status == 200 and b"test_value" in body
            assert took < 0.4, f"scrape took {took:.2f}s next to silent clients (read timeout is 0.5s)"
        # ... and those clients are cut off after the read timeout instead of holding a thread forever.
        assert all(closed_within(s, 2.0) for s in [*silent, slow])
    finally:
        for s in [*silent, slow]:
            s.close()


def test_connection_cap_new_connections_take_the_slots_of_silent_ones_and_log_once(
        server: ExporterHTTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """At the cap a new connection is served by closing the oldest silent one (issue 13: the cap used to
    close every new connection, kubelet's probes included, while silent clients held all slots)."""
    caplog.set_level(logging.WARNING, logger="exporter.web")
    hogs = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    deadline = time.monotonic() + 2
    while server.open_connections < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.open_connections == 8
    try:
        for _ in range(3):
            status, body, took = _scrape(server.port)
            assert status == 200 and took < 0.4, f"scrape at the cap took {took:.2f}s"
        assert server.open_connections <= 8
        closed = [closed_within(s, 0.05) for s in hogs]
        k = sum(closed)  # 1 to 3: a finished scrape frees its own slot, racing the next one
        assert 1 <= k <= 3 and closed == [True] * k + [False] * (8 - k), f"oldest silent ones first: {closed}"
        assert threading.active_count() < 8 + 10, "a thread per connection over the cap?"
        msgs = [r.getMessage() for r in caplog.records if "connection limit reached" in r.getMessage()]
        assert len(msgs) == 1, msgs  # rate-limited: one line, not one per connection
        assert "(8 open" in msgs[0]
        status, body, _ = _scrape(server.port)
        assert f'conntrack_dns_exporter_web_connections_evicted_total{{state="reading"}} {k}'.encode() in body \
            or f'conntrack_dns_exporter_web_connections_evicted_total{{state="reading"}} {k + 1}'.encode() in body
        assert b"conntrack_dns_exporter_web_connections_rejected_total 0.0" in body
    finally:
        for s in hogs:
            s.close()


def test_at_the_cap_idle_hogs_go_before_the_scraping_keepalive_connection() -> None:
    """Clients that made one request and then hold their keep-alive connection idle fill every slot; new
    connections (kubelet's probes) are served by closing the longest-idle hogs, never the connection
    Prometheus keeps scraping on."""
    srv = _serve(read_timeout=1.0, idle_timeout=60.0, max_connections=6)
    hogs: list[http.client.HTTPConnection] = []
    prom = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=3)
    try:
        for _ in range(2):  # Prometheus has scraped on this connection before
            prom.request("GET", "/metrics")
            prom.getresponse().read()
        prom_local = prom.sock.getsockname()
        for _ in range(5):
            h = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=3)
            h.request("GET", "/-/healthy")
            h.getresponse().read()
            hogs.append(h)
        assert srv.open_connections == 6
        for i in range(8):  # probes arrive; Prometheus scrapes in between, as every scrape interval
            status, _, took = _scrape(srv.port)
            assert status == 200 and took < 0.5
            if i % 2:
                prom.request("GET", "/metrics")
                r = prom.getresponse()
                assert r.status == 200 and b"test_value" in r.read()
                assert prom.sock.getsockname() == prom_local, "Prometheus's connection was closed"
        assert sum(closed_within(h.sock, 0.05) for h in hogs if h.sock is not None) >= 1
        assert srv.evictions.by_state["idle"] >= 1 and srv.rejected == 0
    finally:
        prom.close()
        for h in hogs:
            h.close()
        srv.shutdown()
        srv.server_close()


def test_idle_keepalive_connection_closed_after_idle_timeout() -> None:
    srv = _serve(read_timeout=5.0, idle_timeout=0.3)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/-/healthy")
        conn.getresponse().read()
        assert conn.sock is not None and closed_within(conn.sock, 2.0)
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_no_traceback_in_responses(caplog: pytest.LogCaptureFixture) -> None:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Boom())
    srv = ExporterHTTPServer("127.0.0.1", 0, reg)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        status, body, _ = _scrape(srv.port)
        assert status == 500 and b"Traceback" not in body and b"secret internal detail" not in body
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
        s.sendall(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
        data = s.recv(65536)
        assert b"400" in data and b"Traceback" not in data  # 400 Bad request (HTTP/0.9-style, no headers)
        s.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_shutdown_closes_open_connections_promptly(server: ExporterHTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/metrics")
    conn.getresponse().read()
    t0 = time.monotonic()
    server.shutdown()
    assert conn.sock is not None and closed_within(conn.sock, 1.0)
    assert time.monotonic() - t0 < 1.0
    conn.close()


class _Slow:
    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        time.sleep(0.3)
        return [GaugeMetricFamily("slow_value", "A value that takes a while.", value=self.calls)]


def test_simultaneous_scrapes_share_one_rendering() -> None:
    """Ten scrapers at once cost one collection, not ten (each would otherwise wait for all the others)."""
    reg = CollectorRegistry(auto_describe=False)
    slow = _Slow()
    reg.register(slow)
    srv = ExporterHTTPServer("127.0.0.1", 0, reg)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        results: list[tuple[int, bytes, float]] = []
        threads = [threading.Thread(target=lambda: results.append(_scrape(srv.port))) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 10 and all(r[0] == 200 and b"slow_value" in r[1] for r in results)
        assert slow.calls <= 3, f"{slow.calls} collections for 10 simultaneous scrapes"
        _scrape(srv.port)
        assert slow.calls <= 4  # a later scrape renders afresh, never serves an old result
        assert slow.calls >= 2
    finally:
        srv.shutdown()
        srv.server_close()


def _exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data` on a new connection; what came back, and whether the server closed the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(data)
        got = b""
        s.settimeout(0.5)
        try:
            while chunk := s.recv(65536):
                got += chunk
            return got, True
        except TimeoutError:
            return got, False
    finally:
        s.close()


def test_pipelined_requests_answered_in_order_on_one_connection(server: ExporterHTTPServer) -> None:
    got, closed = _exchange(server.port, b"GET /-/healthy HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n"
                                         b"GET /metrics HTTP/1.1\r\n\r\n")
    first, second, third = got.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert first.endswith(b"\r\n\r\nHealthy\n")
    length = int(second.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert second.endswith(b"\r\n\r\n"), "HEAD got a body"
    body = third.split(b"\r\n\r\n", 1)[1]
    assert len(body) == length and b"test_value 1.0" in body
    assert not closed, "a keep-alive connection was closed"


@pytest.mark.parametrize(("request_", "status"), [
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", b"431"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"501"),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 4\r\n\r\nGET ", b"400"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505"),
])
def test_refused_requests_get_one_answer_and_the_connection_closes(server: ExporterHTTPServer, request_: bytes,
                                                                   status: bytes) -> None:
    got, closed = _exchange(server.port, request_)
    assert got.startswith(b"HTTP/1.1 " + status) and got.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close" in got and closed and b"Traceback" not in got
    assert _scrape(server.port)[0] == 200  # and the server serves the next client


@pytest.mark.parametrize(("request_", "stays_open"), [
    (b"GET /-/healthy HTTP/1.0\r\n\r\n", False),
    (b"GET /-/healthy HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET /-/healthy HTTP/1.1\r\nConnection: close\r\n\r\n", False),
])
def test_connection_kept_open_as_the_client_asks(server: ExporterHTTPServer, request_: bytes,
                                                 stays_open: bool) -> None:
    got, closed = _exchange(server.port, request_)
    assert got.endswith(b"Healthy\n") and closed is not stays_open
    assert (b"Connection: close" in got) is not stays_open
