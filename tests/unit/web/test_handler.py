"""The web server's request reader (exporter/web/handler.py), on bytes as a client sends them.

A user would notice: a scrape refused or misread (headers lost, keep-alive dropped so every scrape needs
a new connection, which a full conntrack table refuses), or a hostile request that is not refused: an
endless header block, a body taken for the next request, HTTP/2 bytes answered as HTTP/1.
The reference for well-formed requests is the standard library's own header parser (http.client).
"""

from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.web.handler import MAX_HEADERS, MAX_LINE, BadRequest, Request, read_request


def _read(data: bytes) -> Request | None:
    return read_request(io.BufferedReader(io.BytesIO(data)))


def test_a_prometheus_scrape() -> None:
    req = _read(b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.1:9153\r\nUser-Agent: Prometheus/2.53.0\r\n"
                b"Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4\r\n"
                b"Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n")
    assert req is not None
    assert (req.method, req.target, req.version) == ("GET", "/metrics", (1, 1))
    assert req.headers["accept-encoding"] == "gzip" and req.headers["accept"].startswith("application/openmetrics")
    assert req.keep_alive


@pytest.mark.parametrize(("version", "connection", "keep"), [
    ("1.1", None, True), ("1.1", "close", False), ("1.1", "Keep-Alive, Close", False),
    ("1.0", None, False), ("1.0", "keep-alive", True), ("1.0", "Keep-Alive", True),
])
def test_keep_alive_as_http_says(version: str, connection: str | None, keep: bool) -> None:
    extra = f"Connection: {connection}\r\n" if connection else ""
    req = _read(f"GET / HTTP/{version}\r\n{extra}\r\n".encode())
    assert req is not None and req.keep_alive is keep


def test_pipelined_requests_are_read_one_after_the_other() -> None:
    rfile = io.BufferedReader(io.BytesIO(b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\nX: 1\r\n\r\n"))
    first, second = read_request(rfile), read_request(rfile)
    assert first is not None and second is not None
    assert (first.method, first.target, second.method, second.target) == ("GET", "/a", "HEAD", "/b")
    assert second.headers == {"x": "1"}
    assert read_request(rfile) is None  # the client closed


@pytest.mark.parametrize("data", [b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"])
def test_a_client_that_closes_mid_request_gets_no_answer(data: bytes) -> None:
    assert _read(data) is None


@pytest.mark.parametrize(("data", "code"), [
    (b"GET /" + b"a" * MAX_LINE + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * MAX_LINE + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS ClientHello\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"GET /\r\n", 400),                                     # HTTP/0.9
    (b"GET / HTTP/1.x\r\n\r\n", 400),
    (b"GET / FTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: 1\r\n  folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\r\nX : 1\r\n\r\n", 400),              # space before the colon (smuggling)
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
def test_hostile_or_malformed_requests_are_refused(data: bytes, code: int) -> None:
    with pytest.raises(BadRequest) as e:
        _read(data)
    assert e.value.code == code


def test_exactly_at_the_limits_is_served() -> None:
    line = b"GET /" + b"a" * (MAX_LINE - len(b"GET / HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
    assert len(line) == MAX_LINE
    req = _read(line + b"X: 1\r\n" * MAX_HEADERS + b"\r\n")
    assert req is not None and len(req.target) == MAX_LINE - len(b"GET  HTTP/1.1\r\n")


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                 max_size=20).filter(lambda k: k.lower() not in ("content-length", "transfer-encoding"))
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_token, _value), max_size=20))
def test_headers_read_as_the_standard_library_reads_them(headers: list[tuple[str, str]]) -> None:
    block = "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\n"
    ours = _read(b"GET / HTTP/1.1\r\n" + block)
    reference = http.client.parse_headers(io.BytesIO(block))
    assert ours is not None
    for name in {k.lower() for k, _ in headers}:
        assert ours.headers[name] == ", ".join(reference.get_all(name) or [])
    assert set(ours.headers) == {k.lower() for k, _ in headers}
