"""The HTTP contract of the real exporter process (replaying a recorded fixture, so no root needed):
text and OpenMetrics exposition, gzip, health, readiness, landing page, 404."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from tests.support.exporter_proc import Exporter, parse, value

FIXTURE = Path(__file__).parent.parent / "fixtures" / "conntrack-incident.json"


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    args = [f"--collector.conntrack.fixtures={FIXTURE}", "--no-collector.table", "--no-collector.dns",
            "--kubernetes.enabled=false"]
    with Exporter(args) as exp:
        yield exp


def test_text_exposition(exporter: Exporter) -> None:
    status, headers, body = exporter.get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    s = parse(body.decode())
    assert value(s, "conntrack_entries") == value(s, "conntrack_entries_limit") == 262144
    assert value(s, "conntrack_dns_exporter_collector_success", collector="conntrack") == 1
    info = [labels for (name, labels) in s if name == "conntrack_dns_exporter_build_info"]
    assert len(info) == 1 and dict(info[0])["version"]


def test_openmetrics_when_asked(exporter: Exporter) -> None:
    status, headers, body = exporter.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in om_parse(text)}
    assert fams["conntrack_stat_insert_failed"].type == "counter"
    assert fams["conntrack_stat_insert_failed"].samples[0].value > 0


def test_gzip_when_asked(exporter: Exporter) -> None:
    status, headers, body = exporter.get("/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    plain = gzip.decompress(body).decode()
    assert "conntrack_stat_clash_resolve_total" in plain
    status, headers, body = exporter.get("/metrics")
    assert "content-encoding" not in headers and body.startswith(b"# HELP")


def test_health_ready_landing_and_404(exporter: Exporter) -> None:
    assert exporter.get("/-/healthy")[0] == 200
    assert exporter.get("/-/ready")[0] == 200
    status, headers, body = exporter.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'href="metrics"' in body
    assert exporter.get("/nope")[0] == 404
