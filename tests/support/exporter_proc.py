"""Run the real exporter as a subprocess (optionally inside a network namespace) and scrape it."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.netns import Netns

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class Exporter:
    """`python -m exporter` with the given flags; `scrape()` returns parsed samples."""

    def __init__(self, args: Sequence[str] = (), netns: Netns | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, preexec: Sequence[str] = ()) -> None:
        self.netns = netns
        self.port = port or (19000 + os.getpid() % 5000 if netns else free_port())
        argv = [*preexec, sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}", *args]
        if netns is not None:
            argv = netns.cmd(argv)
        full_env = {**os.environ, **(env or {})}
        # stderr goes to a file, never a pipe: a chatty exporter must not block on a full pipe.
        self._log = tempfile.TemporaryFile(mode="w+")
        self._conn: http.client.HTTPConnection | None = None
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log, text=True,
                                     env=full_env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

    def connect(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if self.netns is not None:
            sock = self.netns.socket()
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", self.port))
            conn.sock = sock
        return conn

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connect(timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if self.get("/-/ready", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"exporter not ready after {timeout}s: {self.stderr()}")

    def scrape(self) -> Samples:
        """Scrape on a new connection (like a first scrape, or an HTTP/1.0 client)."""
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return parse(body.decode())

    def keepalive_scrape(self, timeout: float = 5.0) -> Samples:
        """Scrape on one persistent HTTP/1.1 connection, as Prometheus does (its conntrack entry exists
        already, so this keeps working when the table is full)."""
        if self._conn is None:
            self._conn = self.connect(timeout)
        self._conn.request("GET", "/metrics")
        r = self._conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        return parse(body.decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        """Everything the exporter has logged so far."""
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> Exporter:
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
