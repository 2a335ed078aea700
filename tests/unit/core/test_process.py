"""process_* (exporter/core/process.py) against prometheus_client's ProcessCollector, the reference.

A user would notice: a process_* series renamed, retyped or with another help text (dashboards and the
kube-prometheus-stack rules for process memory and CPU would stop matching), a wrong memory or CPU
figure, or a value that stops changing because the kept-open stat file is not re-read.
"""

from __future__ import annotations

import os
import resource
import time

from prometheus_client import ProcessCollector as Reference

from exporter.core.process import ProcessCollector


def _values(collector: object) -> dict[str, tuple[str, str, float]]:
    return {f.name: (f.type, f.documentation, f.samples[0].value) for f in collector.collect()}  # type: ignore[attr-defined]


def test_same_families_and_values_as_prometheus_client() -> None:
    ours, ref = ProcessCollector(), Reference(registry=None)
    a, b = _values(ours), _values(ref)
    assert list(a) == list(b) == ["process_virtual_memory_bytes", "process_resident_memory_bytes",
                                  "process_start_time_seconds", "process_cpu_seconds", "process_open_fds",
                                  "process_max_fds"]
    for name in a:
        assert a[name][:2] == b[name][:2], name
    assert a["process_start_time_seconds"][2] == b["process_start_time_seconds"][2]
    assert a["process_max_fds"][2] == b["process_max_fds"][2]
    assert abs(a["process_resident_memory_bytes"][2] - b["process_resident_memory_bytes"][2]) < 4 << 20
    assert abs(a["process_cpu_seconds"][2] - b["process_cpu_seconds"][2]) < 0.5
    # the kept stat descriptor is counted: at most one more than the reference sees
    assert 0 <= a["process_open_fds"][2] - b["process_open_fds"][2] <= 1


def test_values_are_read_anew_on_every_scrape() -> None:
    ours = ProcessCollector()
    cpu0 = _values(ours)["process_cpu_seconds"][2]
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        sum(range(10000))
    rss0 = _values(ours)["process_resident_memory_bytes"][2]
    blob = b"x" * (64 << 20)  # written: resident
    v = _values(ours)
    assert v["process_cpu_seconds"][2] >= cpu0 + 0.2
    assert v["process_resident_memory_bytes"][2] >= rss0 + (60 << 20)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert _values(ours)["process_open_fds"][2] == v["process_open_fds"][2] + 1
    finally:
        os.close(fd)
    del blob
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    try:
        assert _values(ours)["process_max_fds"][2] == soft - 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
