"""Issue 13 item 7: an expired or not-yet-valid serving certificate is logged once and its validity is
exported, so an alert can fire before Prometheus's TLS check starts failing.

The real process serving real certificates made with the `openssl` CLI (`openssl ca -startdate/-enddate`
for the out-of-date ones). A user would notice scrapes failing with "certificate has expired" while the
exporter's log and metrics said nothing.
"""

from __future__ import annotations

import calendar
import http.client
import json
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import pki
from tests.support.exporter_proc import Exporter, parse, value

NOT_AFTER = "conntrack_dns_exporter_web_tls_certificate_not_after_timestamp_seconds"
NOT_BEFORE = "conntrack_dns_exporter_web_tls_certificate_not_before_timestamp_seconds"


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not pki.available():
        pytest.skip("needs the openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("expiry")
    ca = pki.make_ca(d, "ca")
    pki.make_cert(d, "valid", ca)
    pki.make_cert_dated(d, "expired", ca, "20200101000000Z", "20200201000000Z")
    pki.make_cert_dated(d, "future", ca, "20990101000000Z", "20990201000000Z")
    return d


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # like insecure_skip_verify: we want to see what is served
    return ctx


def _scrape(port: int) -> str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_insecure(), timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _start(d: Path, name: str) -> Exporter:
    cfg = d / f"{name}.yml"
    cfg.write_text(json.dumps({"tls_server_config": {"cert_file": f"{name}.crt", "key_file": f"{name}.key"}}))
    e = Exporter([f"--web.config.file={cfg}"])
    deadline = time.monotonic() + 15
    while True:
        try:
            _scrape(e.port)
            return e
        except (OSError, ssl.SSLError):
            if e.proc.poll() is not None or time.monotonic() > deadline:
                e.stop()
                raise RuntimeError(e.stderr()) from None
            time.sleep(0.05)


def _openssl_dates(cert: Path) -> tuple[float, float]:
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-startdate", "-enddate"],
                         capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.strip().splitlines())
    conv = [calendar.timegm(time.strptime(got[k], "%b %d %H:%M:%S %Y GMT")) for k in ("notBefore", "notAfter")]
    return float(conv[0]), float(conv[1])


@pytest.mark.parametrize(("name", "needle", "when"), [
    ("expired", "is expired at 2020-02-01T00:00:00Z", (1577836800.0, 1580515200.0)),
    ("future", "is not valid before 2099-01-01T00:00:00Z", (4070908800.0, 4073587200.0)),
])
def test_out_of_date_certificate_is_logged_once_and_exported(pkidir: Path, name: str, needle: str,
                                                             when: tuple[float, float]) -> None:
    e = _start(pkidir, name)
    try:
        for _ in range(3):  # several handshakes, still one line
            s = parse(_scrape(e.port))
        assert (value(s, NOT_BEFORE), value(s, NOT_AFTER)) == when
        lines = [ln for ln in e.stderr().splitlines() if "serving TLS certificate" in ln]
        assert len(lines) == 1, e.stderr()
        assert needle in lines[0] and "level=warn" in lines[0]
    finally:
        e.stop()


def test_valid_certificate_exports_its_dates_and_logs_nothing(pkidir: Path) -> None:
    e = _start(pkidir, "valid")
    try:
        s = parse(_scrape(e.port))
        assert (value(s, NOT_BEFORE), value(s, NOT_AFTER)) == _openssl_dates(pkidir / "valid.crt")
        assert "serving TLS certificate" not in e.stderr()
    finally:
        e.stop()
