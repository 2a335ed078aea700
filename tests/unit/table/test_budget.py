"""The table scan's CPU budget (`--collector.table.cpu-budget`): the interval stretches with the scan's
CPU so that scans stay within the budget on tables of any size; real scans of a recorded kernel dump."""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytest
from prometheus_client.registry import CollectorRegistry

from exporter.cli import parse_args
from exporter.core.scrape import ScrapeWrapper
from exporter.table.collector import TableCollector
from exporter.table.feature import cpu_fraction
from exporter.table.service import TableScanService, budgeted_interval
from tests.unit.table.test_table import datagrams, replay


@pytest.mark.parametrize(("entries", "want"), [(262_144, 524.288), (1_000_000, 2000.0), (4_000_000, 8000.0)])
def test_formula_worked_out_in_the_docs(entries: int, want: float) -> None:
    """docs/metrics.md: at the measured 2 µs of CPU per entry and the default 0.1% budget, cpu / budget."""
    assert budgeted_interval(60.0, entries * 2e-6, 0.001) == pytest.approx(want)
    assert budgeted_interval(60.0, 20_000 * 1e-6, 0.001) == 60.0  # a small table keeps the interval
    assert budgeted_interval(60.0, 5.0, 0.0) == 60.0  # no budget: a fixed interval


def test_interval_follows_the_last_scans_cpu_and_is_exported() -> None:
    svc = TableScanService(replay(datagrams("table-mixed.json")), interval=60.0, cpu_budget=1e-6)
    snap = svc.scan_once()
    assert snap is not None and snap.cpu > 0
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScrapeWrapper([TableCollector(svc)]))
    assert reg.get_sample_value("conntrack_table_scan_cpu_seconds") == snap.cpu
    assert reg.get_sample_value("conntrack_table_scan_interval_seconds") == max(60.0, snap.cpu / 1e-6)
    assert svc.next_interval > 60.0  # stretched: this scan's CPU alone would exceed a millionth of a core


def test_the_loop_waits_the_stretched_interval() -> None:
    """With a tiny budget one scan's CPU buys a long wait: a 10 ms interval no longer means 100 scans/s."""
    def scans(budget: float) -> int:
        svc = TableScanService(replay(datagrams("table-mixed.json")), interval=0.01, cpu_budget=budget)
        seen: list[Any] = []
        svc._on_scan = seen.append
        svc.start()
        time.sleep(0.5)
        svc.stop(timeout=2)
        return len(seen)

    assert scans(0.0) >= 5
    assert scans(1e-9) == 1


@pytest.mark.parametrize("text", ["nan", "inf", "-0.1", "2", "150%", "lots"])
def test_bad_budgets_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cpu_fraction(text)
    with pytest.raises(SystemExit) as e:
        parse_args([f"--collector.table.cpu-budget={text}"])
    assert e.value.code == 2


def test_default_budget() -> None:
    assert parse_args([]).collector_table_cpu_budget == 0.001
    assert cpu_fraction("0.5%") == 0.005 and cpu_fraction("0") == 0.0
