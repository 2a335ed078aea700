"""exporter.web.webconfig: the exporter-toolkit web config file, parsed and validated at load, and the
basic-auth check (bcrypt, cached, timing-safe for unknown users)."""

from __future__ import annotations

import ssl
import statistics
import time
from pathlib import Path

import bcrypt
import pytest

from exporter.web import webconfig
from exporter.web.webconfig import WebConfigError
from tests.support import pki


def _hash(pw: str, cost: int = 4) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()


def _load(tmp_path: Path, text: str) -> webconfig.WebConfig:
    p = tmp_path / "web.yml"
    p.write_text(text)
    return webconfig.load(p)


def test_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.tls is None and not cfg.auth_required and cfg.ssl_context() is None


def test_users_and_headers(tmp_path: Path) -> None:
    cfg = _load(tmp_path, f"basic_auth_users:\n  alice: '{_hash('pw-a')}'\n  bob: '{_hash('pw-b')}'\n"
                          "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    assert cfg.auth_required
    assert cfg.check_password("alice", "pw-a") and cfg.check_password("bob", "pw-b")
    assert not cfg.check_password("alice", "pw-b")
    assert not cfg.check_password("carol", "pw-a")
    assert not cfg.check_password("alice", "")
    assert cfg.headers == {"X-Frame-Options": "deny"}


def test_tls_paths_are_relative_to_the_file_and_a_ca_alone_means_verify(tmp_path: Path) -> None:
    if not pki.available():
        pytest.skip("needs the openssl CLI")
    ca = pki.make_ca(tmp_path, "ca")
    pki.make_cert(tmp_path, "server", ca)
    cfg = _load(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                          "  client_ca_file: ca.crt\n  min_version: TLS13\n")
    assert cfg.tls is not None and cfg.tls.cert_file == tmp_path / "server.crt"
    assert cfg.tls.client_auth_type == "RequireAndVerifyClientCert"
    ctx = cfg.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert cfg.ssl_context() is ctx  # unchanged files: the same context, no reload


@pytest.mark.parametrize("text, expect", [
    ("- a\n- b\n", "the file must be a mapping"),
    ("basic_auth_users: [alice]\n", "basic_auth_users must be a mapping"),
    ("basic_auth_users:\n  alice: $2b$10$short\n", "not a bcrypt hash"),
    ("basic_auth_users:\n  'a:b': '" + "$2b$10$" + "a" * 53 + "'\n", "invalid user name"),
    ("tls_server_config:\n  cert_file: x.crt\n", "needs both cert_file and key_file"),
    ("tls_server_config:\n  cert_file: x\n  key_file: y\n  client_auth_type: Sometimes\n", "invalid client_auth_type"),
    ("tls_server_config:\n  cert_file: x\n  key_file: y\n  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    ("tls_server_config:\n  cert_file: x\n  key_file: y\n  min_version: SSL3\n", "invalid TLS version"),
    # Ignoring these would silently weaken TLS or client authentication: they still stop the start.
    ("tls_server_config:\n  cert: PEM\n  key: PEM\n", "not supported"),
    ("tls_server_config:\n  cert_file: x\n  key_file: y\n  client_allowed_sans: [a]\n", "not supported"),
    ("rate_limit: 5\nbogus: 1\n", "unknown key 'bogus'"),
    ("http_server_config:\n  headers:\n    X-Bad: \"a\\r\\nSet-Cookie: x\"\n", "invalid header"),
    # HTTP headers are bytes: a value that cannot be sent would fail every response, not the start.
    ("http_server_config:\n  headers:\n    X-Team: \"Équipe DNS\"\n", "invalid header"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "cannot load cert_file"),
])
def test_bad_files_fail_at_load_with_one_line(tmp_path: Path, text: str, expect: str) -> None:
    with pytest.raises(WebConfigError) as exc:
        _load(tmp_path, text)
    msg = str(exc.value)
    assert expect in msg and "\n" not in msg and str(tmp_path / "web.yml") in msg, msg


def _median_check_seconds(cfg: webconfig.WebConfig, user: str, password: str, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert not cfg.check_password(user, password)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_unknown_user_costs_a_bcrypt_check_too(tmp_path: Path) -> None:
    """Timing safety: if an unknown user were rejected instantly, response times would reveal valid names."""
    cfg = _load(tmp_path, f"basic_auth_users:\n  alice: '{_hash('right', cost=10)}'\n")
    known = _median_check_seconds(cfg, "alice", "wrong")
    unknown = _median_check_seconds(cfg, "mallory", "wrong")
    assert known > 0.005, f"bcrypt cost 10 took only {known * 1000:.1f} ms?"
    assert unknown > known / 3, f"unknown user answered in {unknown * 1000:.1f} ms vs {known * 1000:.1f} ms"


def test_verified_password_is_cached_but_a_wrong_one_never(tmp_path: Path) -> None:
    cfg = _load(tmp_path, f"basic_auth_users:\n  alice: '{_hash('right', cost=10)}'\n")
    assert cfg.check_password("alice", "right")
    t0 = time.perf_counter()
    for _ in range(100):  # a scrape every few seconds must not pay bcrypt each time
        assert cfg.check_password("alice", "right")
    cached = (time.perf_counter() - t0) / 100
    wrong = _median_check_seconds(cfg, "alice", "righT", n=3)
    assert cached < wrong / 10, f"cached check {cached * 1e6:.0f} µs vs bcrypt {wrong * 1e6:.0f} µs"
