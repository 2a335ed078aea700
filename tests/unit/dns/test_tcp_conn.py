"""DNS over TCP as the probes read it (`resolver.TcpConn`): the length-prefixed stream is reassembled
whatever the segment boundaries, and a connection that ends mid-message is a network failure, never a hang
or a wrong answer. The server is a plain socket (no DNS library framing) so each test chooses the bytes and
their segments exactly."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.rrset
import pytest

from exporter.dns.models import ResolverOptions, run
from exporter.dns.resolver import lookup

NAME = "web.default.svc.cluster.local."
Behave = Callable[[socket.socket, list[bytes]], None]
Start = Callable[[Behave], tuple[str, int]]


def _answer(wire: bytes) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    rdtype = q.question[0].rdtype
    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", rdtype,
                                        "10.0.0.1" if rdtype == dns.rdatatype.A else "fd00::1"))
    out = r.to_wire()
    return struct.pack("!H", len(out)) + out


def _read_queries(conn: socket.socket, n: int) -> list[bytes]:
    buf = b""
    out: list[bytes] = []
    while len(out) < n:
        data = conn.recv(4096)
        if not data:
            break
        buf += data
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            size = struct.unpack("!H", buf[:2])[0]
            out.append(buf[2:2 + size])
            buf = buf[2 + size:]
    return out


@pytest.fixture
def server() -> Iterator[Start]:
    """A TCP server on 127.0.0.1 that hands each connection and the queries it read to `behave`."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    threads: list[threading.Thread] = []

    def start(behave: Behave) -> tuple[str, int]:
        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    behave(conn, _read_queries(conn, 2))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        host, port = listener.getsockname()
        return host, port

    yield start
    listener.close()


def _probe(host: str, port: int) -> dict[str, str | None]:
    r = asyncio.run(lookup(host, port, NAME, "tcp", timeout=1.0, attempts=1))
    return {q: o.reason for q, o in r.outcomes.items()}


def test_answers_split_into_single_bytes_are_reassembled(server: Start) -> None:
    def dribble(conn: socket.socket, queries: list[bytes]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"".join(_answer(q) for q in queries):
            conn.sendall(bytes([b]))
            time.sleep(0.0005)

    assert _probe(*server(dribble)) == {"A": None, "AAAA": None}


def test_both_answers_in_one_segment_are_both_read(server: Start) -> None:
    def together(conn: socket.socket, queries: list[bytes]) -> None:
        conn.sendall(b"".join(_answer(q) for q in reversed(queries)))  # AAAA first, then A, in one send
        time.sleep(0.2)

    assert _probe(*server(together)) == {"A": None, "AAAA": None}


def test_a_connection_closed_mid_answer_is_a_network_failure(server: Start) -> None:
    def half(conn: socket.socket, queries: list[bytes]) -> None:
        first = _answer(queries[0])
        conn.sendall(first + _answer(queries[1])[:7])  # one whole answer, then the length and 5 bytes of the next

    t0 = time.monotonic()
    outcome = _probe(*server(half))
    assert time.monotonic() - t0 < 0.9  # the close ends the wait, not the 1 s timeout
    assert sorted(outcome.values(), key=str) == [None, "network"], outcome


def test_glibc_model_reads_the_same_split_stream(server: Start) -> None:
    def dribble(conn: socket.socket, queries: list[bytes]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b"".join(_answer(q) for q in queries)
        for i in range(0, len(data), 3):
            conn.sendall(data[i:i + 3])
            time.sleep(0.0005)

    host, port = server(dribble)
    r = asyncio.run(run("glibc", [(host, port)], NAME, ResolverOptions(timeout=1.0, attempts=1, use_vc=True)))
    assert r.result == "ok", r
