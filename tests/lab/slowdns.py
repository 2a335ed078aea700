"""A DNS relay that waits before answering: the lab's `slow-backend` fault (sch_netem is not available here).

It listens on UDP and TCP, holds each query for --delay-ms, forwards it to the real server (--forward) and
relays the answer back. Run in a backend namespace behind an nftables redirect of port 53:

    python -m tests.lab.slowdns --listen 0.0.0.0:5353 --forward 127.0.0.1:53 --delay-ms 300
"""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any


def _hostport(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    return host or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slowdns")
    ap.add_argument("--listen", type=_hostport, required=True)
    ap.add_argument("--forward", type=_hostport, required=True)
    ap.add_argument("--delay-ms", type=int, required=True)
    ap.add_argument("--tag", default="", help="ignored; names the lab instance in the process list")
    a = ap.parse_args(argv)
    delay = a.delay_ms / 1000.0
    fwd = a.forward

    def ask_udp(data: bytes) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(data, fwd)
            try:
                return s.recv(65535)
            except OSError:
                return None

    def ask_tcp(data: bytes) -> bytes | None:
        try:
            with socket.create_connection(fwd, timeout=5) as s:
                s.sendall(struct.pack("!H", len(data)) + data)
                n = struct.unpack("!H", _recv_exact(s, 2))[0]
                return _recv_exact(s, n)
        except (OSError, struct.error):
            return None

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            time.sleep(delay)
            answer = ask_udp(data)
            if answer is not None:
                sock.sendto(answer, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s = self.request
            s.settimeout(10)
            try:
                while True:
                    n = struct.unpack("!H", _recv_exact(s, 2))[0]
                    data = _recv_exact(s, n)
                    time.sleep(delay)
                    answer = ask_tcp(data)
                    if answer is None:
                        return
                    s.sendall(struct.pack("!H", len(answer)) + answer)
            except (OSError, struct.error):
                return

    class UdpServer(socketserver.ThreadingUDPServer):
        daemon_threads = True
        allow_reuse_address = True

    class TcpServer(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    servers: list[Any] = [UdpServer(a.listen, Udp), TcpServer(a.listen, Tcp)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    for srv in servers:
        srv.shutdown()
    return 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


if __name__ == "__main__":
    sys.exit(main())
