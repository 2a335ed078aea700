"""`conntrack-dns-exporter record` on a real namespace, replayed by the exporter without root.

A user records where the problem is; we replay the file anywhere. What the replay serves must be what
the kernel said at recording time: the entry count and limit, and the table breakdown's entry count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ctfill
from tests.support.exporter_proc import Exporter, value
from tests.support.netns import Netns, skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.fixture
def ns() -> Iterator[Netns]:
    n = Netns()
    try:
        yield n
    finally:
        n.delete()


def test_record_then_replay_serves_the_recorded_numbers(ns: Netns, tmp_path: Path) -> None:
    ctfill.fill(ns.name, 1500, sources=10)
    out = tmp_path / "node.json"
    r = subprocess.run(ns.cmd([sys.executable, "-m", "exporter", "record", str(out), "--samples", "2",
                               "--interval", "100ms", "--description", "test"]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "2 statistics sample(s) and a table dump of 1500 entries" in r.stdout
    data = json.loads(out.read_text())
    assert data["entries"] == 1500 and len(data["samples"]) == 2 and data["sysctl"]["nf_conntrack_buckets"] > 0

    # the replay runs outside the namespace (no CAP_NET_ADMIN needed to read a file)
    with Exporter([f"--collector.conntrack.fixtures={out}", f"--collector.table.fixtures={out}",
                   "--no-collector.dns", "--collector.table.interval=0.1s", "--collector.table.cpu-budget=0"]) as exp:
        samples = exp.scrape()
        assert value(samples, "conntrack_entries") == 1500
        assert value(samples, "conntrack_entries_limit") == ctfill.stats(ns.name)[1]
        for _ in range(50):
            if value(samples, "conntrack_table_scan_entries") is not None:
                break
            samples = exp.scrape()
        assert value(samples, "conntrack_table_scan_entries") == 1500


def test_record_refuses_bad_arguments_with_one_line(tmp_path: Path) -> None:
    for argv in (["record"], ["record", str(tmp_path / "x.json"), "--samples", "0"],
                 ["record", str(tmp_path / "missing-dir" / "x.json"), "--no-table"]):
        r = subprocess.run([sys.executable, "-m", "exporter", *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
