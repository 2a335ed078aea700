"""The web config as the exporter-toolkit treats it: keys the toolkit accepts but this exporter cannot honour
are warned about and ignored (not an exit 2), and the file is re-read when it changes, as the toolkit re-reads
it per request. The reload cases run the real exporter (`python -m exporter --web.config.file`) and talk
to it over loopback: a user added to the file gets in without a restart, a broken edit keeps the previous
configuration with one log line and `conntrack_dns_exporter_web_config_last_reload_successful 0`."""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from exporter.web import webconfig
from tests.support.exporter_proc import Exporter, parse, value

QUIET = ["--no-collector.dns", "--kubernetes.enabled=false", "--no-collector.table", "--no-collector.conntrack"]


def _hash(pw: str) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()


def _basic(user: str, pw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


IGNORED = [
    ("http_server_config:\n  http2: true\n", "http_server_config.http2 is ignored"),
    ("rate_limit:\n  interval: 1s\n  burst: 10\n", "rate_limit is ignored"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"
     "  curve_preferences: [X25519]\n  prefer_server_cipher_suites: true\n",
     "tls_server_config.cipher_suites is ignored"),
]


@pytest.mark.parametrize(("text", "warning"), IGNORED, ids=["http2", "rate_limit", "tls-ciphers"])
def test_toolkit_keys_we_cannot_honour_are_warned_about_and_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, warning: str) -> None:
    if "tls_server_config" in text:
        from tests.support import pki
        if not pki.available():
            pytest.skip("needs the openssl CLI")
        pki.make_cert(tmp_path, "server", pki.make_ca(tmp_path, "ca"))
    f = tmp_path / "web.yml"
    f.write_text(text)
    with caplog.at_level(logging.WARNING, logger="exporter.web"):
        cfg = webconfig.load(f)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(warning in w and str(f) in w for w in warnings), warnings
    assert ("tls_server_config" in text) == (cfg.ssl_context() is not None)


def test_the_real_exporter_starts_with_an_http2_key(tmp_path: Path) -> None:
    f = tmp_path / "web.yml"
    f.write_text(f"http_server_config:\n  http2: true\nbasic_auth_users:\n  alice: '{_hash('pw')}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_DNS_EXPORTER_")}
    with Exporter([*QUIET, f"--web.config.file={f}"], env=env) as exp:
        assert exp.get("/metrics", headers=_basic("alice", "pw"))[0] == 200
        assert "http2 is ignored" in exp.stderr()


def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _rewrite(f: Path, text: str) -> None:
    """Replace the file the way config management does (new inode), with a new mtime even on coarse clocks."""
    tmp = f.with_suffix(".new")
    tmp.write_text(text)
    st = f.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    tmp.replace(f)


def test_the_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "web.yml"
    alice = f"basic_auth_users:\n  alice: '{_hash('pw-a')}'\n"
    f.write_text(alice)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_DNS_EXPORTER_")}
    with Exporter([*QUIET, f"--web.config.file={f}"], env=env) as exp:
        def status(user: str, pw: str) -> int:
            return exp.get("/metrics", headers=_basic(user, pw))[0]

        def reload_ok() -> float | None:
            return value(parse(exp.get("/metrics", headers=_basic("alice", "pw-a"))[2].decode()),
                         "conntrack_dns_exporter_web_config_last_reload_successful")

        assert status("alice", "pw-a") == 200 and status("bob", "pw-b") == 401
        assert reload_ok() == 1.0
        # A user added: in on the next request, no restart; a header added applies too.
        _rewrite(f, alice + f"  bob: '{_hash('pw-b')}'\nhttp_server_config:\n  headers:\n    X-Test: yes-1\n")
        _until("bob to get in", lambda: status("bob", "pw-b") == 200)
        assert exp.get("/metrics", headers=_basic("bob", "pw-b"))[1]["x-test"] == "yes-1"
        # A broken edit: the previous configuration stays (bob still gets in), one warning, the gauge says 0.
        _rewrite(f, "basic_auth_users: [not, a, mapping]\n")
        _until("the failed reload to show", lambda: exp.get("/metrics", headers=_basic("bob", "pw-b"))[0] == 200
               and reload_ok() == 0.0)
        assert status("bob", "pw-b") == 200 and status("carol", "x") == 401
        assert exp.stderr().count("keeping the previous web config") == 1, exp.stderr()
        # Fixed again, without bob: he is out, the gauge back to 1.
        _rewrite(f, alice)
        _until("bob to be out", lambda: status("bob", "pw-b") == 401)
        assert reload_ok() == 1.0 and status("alice", "pw-a") == 200
        assert exp.proc.poll() is None
