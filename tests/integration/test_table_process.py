"""The real process replaying recorded table dumps, and its bad table flags (no root needed)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.exporter_proc import Exporter, value
from tests.unit.table.test_table import FIXTURES, load


def test_exporter_replays_a_garbled_fixture_without_crashing() -> None:
    """The real process with `--collector.table.fixtures`: partial scan metric, one log line, scrapes fine."""
    env = {"CONNTRACK_DNS_EXPORTER_COLLECTOR_DNS": "false", "CONNTRACK_DNS_EXPORTER_COLLECTOR_CONNTRACK": "false"}
    exp = Exporter([f"--collector.table.fixtures={FIXTURES / 'table-garbled.json'}", "--collector.table.interval=0.1s",
                    "--collector.table.cpu-budget=0"],
                   env=env)
    try:
        exp.wait_ready()
        first = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = exp.scrape()
            ts = value(samples, "conntrack_table_last_scan_timestamp_seconds")
            if ts is not None and first is None:
                first = ts
            if ts is not None and first is not None and ts > first + 0.15:  # a few scans later
                break
            time.sleep(0.05)
        assert value(samples, "conntrack_table_scan_partial") == 1
        assert value(samples, "conntrack_table_scan_entries") == load("table-garbled.json")["complete_messages"]
        assert value(samples, "conntrack_dns_exporter_collector_success", collector="table") == 1
    finally:
        exp.stop()
    lines = [line for line in exp.stderr().splitlines() if "partial table scan" in line]
    assert len(lines) == 1, exp.stderr()
    assert "garbled" in lines[0] and "Traceback" not in exp.stderr()


@pytest.mark.parametrize("flag", ["--collector.table.interval=0", "--collector.table.top-sources=-1",
                                  "--collector.table.max-duration=soon"])
def test_bad_flag_values_exit_with_one_line(flag: str) -> None:
    r = subprocess.run([sys.executable, "-m", "exporter", flag], capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parent.parent.parent)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and flag.split("=")[0] in r.stderr
