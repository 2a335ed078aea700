"""The real process on bad start-up input: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.core.test_flags_and_cli import run_exporter


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--web.listen-address=nohost"], {}, "--web.listen-address"),
        (["--web.listen-address=1.2.3.4:99999"], {}, "invalid port"),
        (["--log.level=loud"], {}, "--log.level"),
        ([], {"CONNTRACK_DNS_EXPORTER_LOG_FORMAT": "xml"}, "CONNTRACK_DNS_EXPORTER_LOG_FORMAT"),
        ([], {"CONNTRACK_DNS_EXPORTER_COLLECTOR_CONNTRACK": "maybe"}, "not a boolean"),
        (["--collector.conntrack.fixtures=/nonexistent.json", "--web.listen-address=127.0.0.1:0"], {},
         "cannot read conntrack fixture"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    r = run_exporter(*args, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_listen_address_in_use_exits_2() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_exporter(f"--web.listen-address=127.0.0.1:{port}", "--no-collector.conntrack")
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_version_flag() -> None:
    r = run_exporter("--version")
    assert r.returncode == 0 and r.stdout.startswith("conntrack-dns-exporter ")


def test_bad_env_twin_exits_2_with_one_line() -> None:
    env = {"CONNTRACK_DNS_EXPORTER_PROBE_SERVER": "10.0.0.1,not an ip", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "exporter"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "CONNTRACK_DNS_EXPORTER_PROBE_SERVER" in p.stderr
