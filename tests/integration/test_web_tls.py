"""Issue 8: `--web.config.file` (exporter-toolkit format) against the real exporter process on loopback, with
Python's `ssl` module as the client and certificates made by the `openssl` CLI.

Proves: an HTTPS scrape with the right password works (keep-alive too); wrong/missing/unknown credentials
get 401 and never the metrics; `/`, `/-/healthy`, `/-/ready` answer without credentials (kubelet probes);
client certificates are enforced with RequireAndVerifyClientCert; certificates rotate without a restart;
a bad file stops the start with exit 2 and one line.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.support import pki
from tests.support.exporter_proc import Exporter

PASSWORD = "s3cret-scrape"


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if not pki.available():
        pytest.skip("needs the openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca(d, "ca")
    other = pki.make_ca(d, "other-ca")
    return {"ca": ca, "other": other, "server": pki.make_cert(d, "server", ca),
            "server2": pki.make_cert(d, "server2", ca),
            "client": pki.make_cert(d, "client", ca, san="DNS:prometheus", client=True),
            "stranger": pki.make_cert(d, "stranger", other, san="DNS:stranger", client=True)}


def _write_config(d: Path, certs: dict[str, tuple[Path, Path]], **tls: str) -> Path:
    # Relative cert paths: the toolkit resolves them against the config file's directory.
    for name in ("server", "ca"):
        for src in certs[name]:
            shutil.copy(src, d / src.name)
    cfg = {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", **tls},
        "basic_auth_users": {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    }
    path = d / "web.yml"
    path.write_text(json.dumps(cfg))
    return path


def _client_ctx(certs: dict[str, tuple[Path, Path]], client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"][0]))
    if client:
        ctx.load_cert_chain(str(certs[client][0]), str(certs[client][1]))
    return ctx


def _https(port: int, ctx: ssl.SSLContext, path: str, headers: dict[str, str] | None = None
           ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _start(config: Path, ctx: ssl.SSLContext) -> Exporter:
    # Loopback in the machine's own namespace: no DNS probes (they would go to the host's resolver).
    e = Exporter([f"--web.config.file={config}", "--no-collector.dns"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if e.proc.poll() is not None:
            raise RuntimeError(f"exporter exited: {e.stderr()}")
        try:
            if _https(e.port, ctx, "/-/ready")[0] == 200:
                return e
        except (OSError, ssl.SSLError):
            time.sleep(0.05)
    e.stop()
    raise TimeoutError(e.stderr())


@pytest.fixture(scope="module")
def tls_exporter(certs: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Exporter, Path]]:
    d = tmp_path_factory.mktemp("web")
    e = _start(_write_config(d, certs), _client_ctx(certs))
    yield e, d
    e.stop()


def test_https_scrape_with_password_and_keepalive(tls_exporter: tuple[Exporter, Path],
                                                  certs: dict[str, tuple[Path, Path]]) -> None:
    e, _ = tls_exporter
    conn = http.client.HTTPSConnection("127.0.0.1", e.port, context=_client_ctx(certs), timeout=5)
    try:
        for _ in range(2):  # two scrapes on one TLS connection
            conn.request("GET", "/metrics", headers=_basic("prometheus", PASSWORD))
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200
            assert b"conntrack_dns_exporter_build_info" in body
            assert r.getheader("X-Content-Type-Options") == "nosniff"
        assert conn.sock is not None and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        conn.close()


@pytest.mark.parametrize("headers", [
    {},
    _basic("prometheus", "wrong"),
    _basic("prometheus", PASSWORD + "x"),
    _basic("nobody", PASSWORD),
    {"Authorization": "Basic !!notbase64"},
    {"Authorization": "Bearer " + PASSWORD},
], ids=["none", "wrong", "longer", "unknown-user", "garbled", "bearer"])
def test_wrong_credentials_get_401_and_no_metrics(tls_exporter: tuple[Exporter, Path],
                                                   certs: dict[str, tuple[Path, Path]],
                                                   headers: dict[str, str]) -> None:
    e, _ = tls_exporter
    status, hdrs, body = _https(e.port, _client_ctx(certs), "/metrics", headers)
    assert status == 401
    assert hdrs["www-authenticate"].startswith("Basic realm=")
    assert b"conntrack" not in body and b"Traceback" not in body


def test_kubelet_probes_need_no_password_the_status_page_does(tls_exporter: tuple[Exporter, Path],
                                                              certs: dict[str, tuple[Path, Path]]) -> None:
    e, _ = tls_exporter
    for path in ("/-/healthy", "/-/ready"):
        status, _, body = _https(e.port, _client_ctx(certs), path)
        assert status == 200, path
        assert b"conntrack_dns_exporter_build_info" not in body
    # the status page names nodes and pods: it follows the web config like /metrics
    assert _https(e.port, _client_ctx(certs), "/")[0] == 401
    status, hdrs, body = _https(e.port, _client_ctx(certs), "/", _basic("prometheus", PASSWORD))
    assert status == 200 and hdrs["content-type"].startswith("text/html") and b"conntrack-dns-exporter" in body
    assert _https(e.port, _client_ctx(certs), "/nonexistent")[0] == 401  # unknown paths are not public


def test_status_page_public_when_the_operator_opens_it(certs: dict[str, tuple[Path, Path]],
                                                        tmp_path: Path) -> None:
    config = _write_config(tmp_path, certs)
    e = Exporter([f"--web.config.file={config}", "--no-collector.dns", "--web.status-page.public"])
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if _https(e.port, _client_ctx(certs), "/-/ready")[0] == 200:
                    break
            except (OSError, ssl.SSLError):
                time.sleep(0.05)
        assert _https(e.port, _client_ctx(certs), "/")[0] == 200
        assert _https(e.port, _client_ctx(certs), "/metrics")[0] == 401  # only the page is opened
    finally:
        e.stop()


def test_plain_http_is_refused_and_counted(tls_exporter: tuple[Exporter, Path],
                                           certs: dict[str, tuple[Path, Path]]) -> None:
    e, _ = tls_exporter
    with pytest.raises((OSError, http.client.HTTPException)):
        conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=3)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        r.read()
        conn.close()
        if r.status != 200:
            raise OSError(f"status {r.status}")
    body = _https(e.port, _client_ctx(certs), "/metrics", _basic("prometheus", PASSWORD))[2].decode()
    line = next(x for x in body.splitlines() if x.startswith("conntrack_dns_exporter_web_tls_handshake_errors_total"))
    assert float(line.split()[1]) >= 1


def test_client_that_never_starts_tls_does_not_block_others(tls_exporter: tuple[Exporter, Path],
                                                             certs: dict[str, tuple[Path, Path]]) -> None:
    """Handshakes run on the connection's own thread: a stalled one never holds up the accept loop."""
    e, _ = tls_exporter
    stalled = [socket.create_connection(("127.0.0.1", e.port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        for _ in range(3):
            assert _https(e.port, _client_ctx(certs), "/-/healthy")[0] == 200
        assert time.monotonic() - t0 < 3.0
    finally:
        for s in stalled:
            s.close()


def test_certificate_rotation_without_restart(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    e = _start(_write_config(tmp_path, certs), _client_ctx(certs))
    try:
        def served_cn() -> str:
            conn = http.client.HTTPSConnection("127.0.0.1", e.port, context=_client_ctx(certs), timeout=5)
            try:
                conn.request("GET", "/-/healthy")
                conn.getresponse().read()
                assert isinstance(conn.sock, ssl.SSLSocket)
                cert = conn.sock.getpeercert()
                assert cert is not None
                return str(dict(x[0] for x in cert["subject"])["commonName"])
            finally:
                conn.close()

        assert served_cn() == "server"
        # cert-manager style: new files in place (key first, then cert).
        shutil.copy(certs["server2"][1], tmp_path / "server.key")
        shutil.copy(certs["server2"][0], tmp_path / "server.crt")
        assert served_cn() == "server2"
    finally:
        e.stop()


def test_client_certificate_required(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    cfg = _write_config(tmp_path, certs, client_ca_file="ca.crt", client_auth_type="RequireAndVerifyClientCert")
    e = _start(cfg, _client_ctx(certs, "client"))
    try:
        ok = _https(e.port, _client_ctx(certs, "client"), "/metrics", _basic("prometheus", PASSWORD))
        assert ok[0] == 200
        for client in (None, "stranger"):  # no certificate; one from a CA the exporter does not trust
            with pytest.raises((ssl.SSLError, OSError)):
                _https(e.port, _client_ctx(certs, client), "/metrics", _basic("prometheus", PASSWORD))
        assert _https(e.port, _client_ctx(certs, "client"), "/-/healthy")[0] == 200
    finally:
        e.stop()


@pytest.mark.parametrize("content, expect", [
    (None, "cannot read"),
    ("tls_server_config: [unclosed", "invalid YAML"),
    ("basic_auth_users:\n  prometheus: hunter2\n", "not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "cannot load cert_file"),
    ("tls_srever_config: {}\n", "unknown key 'tls_srever_config'"),
], ids=["missing", "yaml", "plaintext-password", "missing-cert", "typo"])
def test_bad_web_config_exits_2_with_one_line(tmp_path: Path, content: str | None, expect: str) -> None:
    path = tmp_path / "web.yml"
    if content is not None:
        path.write_text(content)
    e = Exporter([f"--web.config.file={path}", "--no-collector.dns"])
    rc = e.proc.wait(15)
    lines = e.stderr().strip().splitlines()
    assert rc == 2
    assert len(lines) == 1 and expect in lines[0] and str(path) in lines[0], lines
