"""A slowloris attacker and kubelet/Prometheus-style clients, for the web server's slot tests (issue 13).

The attacker holds `connections` connections, each trickling a request line one byte every `gap`
seconds (below the server's per-`recv` timeout, so only a whole-request deadline catches it) and
reconnecting shortly after the server closes one, as a real attacker would. Over TLS it completes the
handshake first and trickles inside the TLS session.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"


class Slowloris:
    def __init__(self, port: int, connections: int, gap: float, tls: ssl.SSLContext | None = None,
                 reconnect_delay: float = 0.05) -> None:
        self.port, self.connections, self.gap, self.tls = port, connections, gap, tls
        self.reconnect_delay = reconnect_delay
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._one, daemon=True) for _ in range(connections)]
        self.opened = 0
        self.closed_by_server = 0
        self._lock = threading.Lock()

    def start(self) -> Slowloris:
        for t in self._threads:
            t.start()
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if self.tls is not None:
            s = self.tls.wrap_socket(s, server_hostname="127.0.0.1")
        with self._lock:
            self.opened += 1
        return s

    def _one(self) -> None:
        while not self._stop.is_set():
            try:
                s = self._connect()
            except (OSError, ssl.SSLError):
                self._stop.wait(self.reconnect_delay)
                continue
            try:
                for i in range(len(REQUEST)):
                    if self._stop.is_set():
                        return
                    s.sendall(REQUEST[i:i + 1])
                    if self._stop.wait(self.gap):
                        return
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            raise ConnectionResetError
                    except (BlockingIOError, ssl.SSLWantReadError):
                        pass
                    finally:
                        s.setblocking(True)
            except (OSError, ssl.SSLError):
                with self._lock:
                    self.closed_by_server += 1
            finally:
                s.close()
            self._stop.wait(self.reconnect_delay)


@dataclass
class Tally:
    ok: int = 0
    tries: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ok / self.tries if self.tries else 0.0


def kubelet_probe(port: int, path: str, tls: ssl.SSLContext | None, timeout: float = 1.0) -> str | None:
    """One kubelet httpGet probe: a new connection, `Connection: close`, success = 2xx/3xx within the
    timeout (kubelet's default timeoutSeconds is 1). None on success, else why it failed."""
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("GET", path, headers={"Connection": "close", "User-Agent": "kube-probe/1.30"})
        r = conn.getresponse()
        r.read()
        if not 200 <= r.status < 400:
            return f"status {r.status}"
        if time.monotonic() - t0 > timeout:
            return "slow"
        return None
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def probe_for(port: int, seconds: float, every: float, tls: ssl.SSLContext | None) -> Tally:
    """kubelet's liveness (/-/healthy) and readiness (/-/ready) probes, alternating, for `seconds`."""
    tally = Tally()
    end = time.monotonic() + seconds
    paths = ["/-/healthy", "/-/ready"]
    while time.monotonic() < end:
        why = kubelet_probe(port, paths[tally.tries % 2], tls)
        tally.tries += 1
        if why is None:
            tally.ok += 1
        else:
            tally.errors.append(why)
        time.sleep(every)
    return tally


class KeepAliveScraper:
    """Prometheus: one keep-alive connection opened before the attack, scraping every `every` seconds."""

    def __init__(self, port: int, every: float, tls: ssl.SSLContext | None, headers: dict[str, str]) -> None:
        self.conn: http.client.HTTPConnection
        if tls is not None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=2)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        self.every, self.headers = every, headers
        self.tally = Tally()
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.scrape()  # the connection exists before the attack starts

    def scrape(self) -> None:
        self.tally.tries += 1
        try:
            before = self.conn.sock
            self.conn.request("GET", "/metrics", headers=self.headers)
            r = self.conn.getresponse()
            body = r.read()
            if before is not None and self.conn.sock is not before:
                self.reconnects += 1
            if r.status == 200 and b"conntrack_dns_exporter_build_info" in body:
                self.tally.ok += 1
            else:
                self.tally.errors.append(f"status {r.status}")
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            self.tally.errors.append(type(e).__name__)
            self.conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.scrape()

    def start(self) -> KeepAliveScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()
